// Tensors of the executor: a shape, a data type, a device and an owned buffer. A small runtime,
// not a framework (../shared/DESIGN.md, "Executor"): row-major, contiguous, no autograd; layers
// write their forward and backward by hand.
//
//   exec::Tensor x = exec::Tensor::zeros({tokens, hidden});       // CPU, fp32
//   float* p = x.f32();                                          // CPU fp32 data
//   exec::Tensor g = x.to(exec::Device::kCuda);                  // a copy on the GPU (CUDA builds)
//   exec::Tensor ids = exec::Tensor::from_i32({n}, ids.data(), ids.size(), exec::Device::kCuda);
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moesim::exec {

// kF32 and kBF16 are the compute types; kI32 holds indices (token ids, slots) and kF64 the few
// per-row values kept in double (cross-entropy row losses, router coefficients).
enum class DType { kF32, kBF16, kI32, kF64 };
enum class Device { kCpu, kCuda };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

class Tensor {
 public:
  Tensor() = default;  // empty: numel() == 0, no buffer

  // Uninitialised / zero-filled storage. CPU buffers are 64-byte aligned; CUDA buffers come from
  // cudaMalloc on the current device. CUDA tensors need a CUDA build and a device (else an
  // exec::Error is thrown). Every dimension must be >= 0; a zero-element tensor holds no buffer.
  static Tensor empty(std::vector<int64_t> shape, DType dtype = DType::kF32, Device device = Device::kCpu);
  static Tensor zeros(std::vector<int64_t> shape, DType dtype = DType::kF32, Device device = Device::kCpu);
  // A tensor on `device` holding `values` (size must match the shape).
  static Tensor from(std::vector<int64_t> shape, const std::vector<float>& values, Device device = Device::kCpu);
  // The same from `count` host values (C++17 here: nvcc compiles this header too, so no std::span).
  static Tensor from_i32(std::vector<int64_t> shape, const int32_t* values, size_t count,
                         Device device = Device::kCpu);
  static Tensor from_f64(std::vector<int64_t> shape, const double* values, size_t count,
                         Device device = Device::kCpu);

  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(static_cast<size_t>(i)); }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t bytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }

  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  // Typed CPU access (MOESIM_ASSERTs device and dtype): fp32 values, or bf16 as raw bits
  // (kernels::bf16_to_f32 reads them).
  float* f32();
  const float* f32() const;
  uint16_t* bf16();
  const uint16_t* bf16() const;
  int32_t* i32();
  const int32_t* i32() const;
  double* f64();
  const double* f64() const;
  // The fp32 buffer on the tensor's own device, CPU or CUDA, to hand to a Backend of that device
  // (MOESIM_ASSERTs dtype only; a CUDA pointer must not be dereferenced on the host).
  float* device_f32();
  const float* device_f32() const;
  int32_t* device_i32();
  const int32_t* device_i32() const;
  double* device_f64();
  const double* device_f64() const;

  // Every byte to zero, on the tensor's device (CUDA: cudaMemset on the default stream).
  void fill_zero();
  // Copies src's bytes into this tensor's buffer, whatever the two devices (same dtype and element
  // count; host copies are synchronous with the host).
  void copy_from(const Tensor& src);
  // A deep copy on `device` (and `dtype`: fp32 <-> bf16 converts, rounding to nearest even, on the
  // tensor's own device). Copies to or from the host are synchronous with the host.
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;
  Tensor clone() const { return to(device_); }
  // The same buffer seen with another shape of the same element count.
  Tensor reshaped(std::vector<int64_t> shape) const;
  std::vector<float> to_vector() const;  // fp32 values (from fp32 or bf16), copied to the host
  std::vector<int32_t> to_i32_vector() const;  // kI32 only
  std::vector<double> to_f64_vector() const;   // kF64 only

  std::string describe() const;  // "f32[4096, 512] cpu"

 private:
  std::vector<int64_t> shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCpu;
  std::shared_ptr<void> data_;  // freed with the device's allocator
};

// Hands the CPU tensor blocks that wait for reuse back to the system (glibc, which returns what
// it can to the kernel): after work whose sizes will not come again (calibrate's microbenchmarks,
// hundreds of MB), so that what runs next finds a heap like a fresh process's.
void release_cached_cpu_blocks();

}  // namespace moesim::exec
