// Internal: the CUDA back end and the NCCL engine live in a module of their own
// (libmoesim_cuda.so, built from cuda_backend.cu, nccl_comm.cu and cuda_module.cc), loaded by
// cuda_loader.cc on the first CUDA request. cuBLAS's libraries take half a second to load (their
// static initialisers fault in hundreds of MB), which every command paid at start when the CUDA
// libraries were linked into moesim; now only commands that touch a GPU do.
//
// The module exports one C symbol, moesim_cuda_module(), returning this table. The module and the
// loader come from the same build (the module's path is compiled into the loader), so the table
// may carry C++ types; `version` guards against a module left behind by another build.
#pragma once

#include "executor/cuda_memory.h"

#include <cstddef>
#include <cstdint>
#include <memory>

namespace moesim::exec {

class Backend;
class Comm;

inline constexpr int kCudaModuleVersion = 1;

struct CudaModule {
  int version = 0;
  int (*device_count)() = nullptr;  // visible devices; 0 without a driver or device
  std::unique_ptr<Backend> (*make_backend)(int device) = nullptr;
  std::shared_ptr<void> (*alloc)(size_t bytes) = nullptr;
  void (*memset_zero)(void* device_ptr, size_t bytes) = nullptr;
  size_t (*peak_allocated_bytes)() = nullptr;
  void (*copy)(void* dst, const void* src, size_t bytes, detail::CopyKind kind) = nullptr;
  void (*f32_to_bf16)(const float* src, uint16_t* dst, int64_t n) = nullptr;
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int64_t n) = nullptr;
  // The NCCL engine over the ranks of `host` (an MPI Comm of MPI_COMM_WORLD, which it keeps for
  // host data); null in modules built without NCCL.
  std::unique_ptr<Comm> (*make_nccl_comm)(std::unique_ptr<Comm> host, double timeout_s) = nullptr;
};

// Defined in the module only (cuda_backend.cu, nccl_comm.cu); cuda_module.cc puts them in the table.
namespace cuda {
int device_count();
std::unique_ptr<Backend> make_backend(int device);
std::shared_ptr<void> alloc(size_t bytes);
void memset_zero(void* device_ptr, size_t bytes);
size_t peak_allocated_bytes();
void copy(void* dst, const void* src, size_t bytes, detail::CopyKind kind);
void f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n);
std::unique_ptr<Comm> make_nccl_comm(std::unique_ptr<Comm> host, double timeout_s);
}  // namespace cuda

}  // namespace moesim::exec

extern "C" const moesim::exec::CudaModule* moesim_cuda_module();
