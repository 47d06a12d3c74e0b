// Internal: the CUDA side of exec::Tensor, so tensor.cc compiles without nvcc. Defined in
// cuda_loader.cc, which forwards them to the CUDA module (cuda_module.h); in builds without CUDA
// they throw exec::Error("... built without CUDA"). All of them throw exec::Error on a failed
// CUDA call.
// They work on the current CUDA device and the legacy default stream, so they are ordered with
// the CUDA back end's kernels (which run on that stream too).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace moesim::exec::detail {

// `bytes` of device memory, returned to a cache of blocks when the last owner goes (reused by later
// allocations of the same rounded size; see cuda_backend.cu).
std::shared_ptr<void> cuda_alloc(size_t bytes);
void cuda_memset_zero(void* device_ptr, size_t bytes);
// The most bytes cuda_alloc's callers have held at once in this process (0 without CUDA).
size_t cuda_peak_allocated_bytes();

enum class CopyKind { kHostToDevice, kDeviceToHost, kDeviceToDevice };
// Synchronous with respect to the host for host copies.
void cuda_copy(void* dst, const void* src, size_t bytes, CopyKind kind);

// Elementwise conversions of device buffers (kernels.h math; fp32 -> bf16 rounds to nearest even).
void cuda_f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void cuda_bf16_to_f32(const uint16_t* src, float* dst, int64_t n);

}  // namespace moesim::exec::detail
