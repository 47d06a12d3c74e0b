#include "executor/tensor.h"

#include "common/error.h"
#include "executor/cuda_memory.h"
#include "executor/error.h"
#include "executor/kernels.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdlib>
#include <cstring>
#include <new>

namespace moesim::exec {

namespace {

constexpr size_t kCpuAlignment = 64;  // a cache line, and the widest (AVX-512) vector

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    MOESIM_ASSERT(d >= 0, "tensor dimension {} in shape [{}] is negative", d, fmt::join(shape, ", "));
    n *= d;
  }
  return n;
}

std::shared_ptr<void> cpu_alloc(size_t bytes) {
  // aligned_alloc wants a size that is a multiple of the alignment.
  const size_t rounded = (bytes + kCpuAlignment - 1) / kCpuAlignment * kCpuAlignment;
  void* p = std::aligned_alloc(kCpuAlignment, rounded);
  if (!p) throw std::bad_alloc();
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

detail::CopyKind copy_kind(Device from, Device to) {
  if (from == Device::kCpu) return detail::CopyKind::kHostToDevice;
  return to == Device::kCpu ? detail::CopyKind::kDeviceToHost : detail::CopyKind::kDeviceToDevice;
}

const char* device_name(Device d) { return d == Device::kCpu ? "cpu" : "cuda"; }

}  // namespace

size_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

const char* dtype_name(DType t) { return t == DType::kF32 ? "f32" : "bf16"; }

Tensor Tensor::empty(std::vector<int64_t> shape, DType dtype, Device device) {
  Tensor t;
  t.numel_ = element_count(shape);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  if (t.numel_ > 0) t.data_ = device == Device::kCpu ? cpu_alloc(t.bytes()) : detail::cuda_alloc(t.bytes());
  return t;
}

Tensor Tensor::zeros(std::vector<int64_t> shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  if (t.numel_ == 0) return t;
  if (device == Device::kCpu)
    std::memset(t.data(), 0, t.bytes());
  else
    detail::cuda_memset_zero(t.data(), t.bytes());
  return t;
}

Tensor Tensor::from(std::vector<int64_t> shape, const std::vector<float>& values) {
  Tensor t = empty(std::move(shape));
  MOESIM_ASSERT(static_cast<int64_t>(values.size()) == t.numel_, "Tensor::from: {} values for {} ({} elements)",
                values.size(), t.describe(), t.numel_);
  if (t.numel_ > 0) std::memcpy(t.data(), values.data(), t.bytes());
  return t;
}

float* Tensor::f32() {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kF32, "f32() on {}", describe());
  return static_cast<float*>(data());
}

const float* Tensor::f32() const {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kF32, "f32() on {}", describe());
  return static_cast<const float*>(data());
}

uint16_t* Tensor::bf16() {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kBF16, "bf16() on {}", describe());
  return static_cast<uint16_t*>(data());
}

const uint16_t* Tensor::bf16() const {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kBF16, "bf16() on {}", describe());
  return static_cast<const uint16_t*>(data());
}

float* Tensor::device_f32() {
  MOESIM_ASSERT(dtype_ == DType::kF32, "device_f32() on {}", describe());
  return static_cast<float*>(data());
}

const float* Tensor::device_f32() const {
  MOESIM_ASSERT(dtype_ == DType::kF32, "device_f32() on {}", describe());
  return static_cast<const float*>(data());
}

Tensor Tensor::to(Device device) const {
  Tensor t = empty(shape_, dtype_, device);
  if (numel_ == 0) return t;
  if (device_ == Device::kCpu && device == Device::kCpu)
    std::memcpy(t.data(), data(), bytes());
  else
    detail::cuda_copy(t.data(), data(), bytes(), copy_kind(device_, device));
  return t;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  Tensor t = empty(shape_, dtype, device_);
  if (numel_ == 0) return t;
  const bool to_bf16 = dtype == DType::kBF16;
  if (device_ == Device::kCuda) {
    if (to_bf16)
      detail::cuda_f32_to_bf16(static_cast<const float*>(data()), static_cast<uint16_t*>(t.data()), numel_);
    else
      detail::cuda_bf16_to_f32(static_cast<const uint16_t*>(data()), static_cast<float*>(t.data()), numel_);
  } else if (to_bf16) {
    const float* src = f32();
    uint16_t* dst = t.bf16();
    for (int64_t i = 0; i < numel_; ++i) dst[i] = kernels::f32_to_bf16(src[i]);
  } else {
    const uint16_t* src = bf16();
    float* dst = t.f32();
    for (int64_t i = 0; i < numel_; ++i) dst[i] = kernels::bf16_to_f32(src[i]);
  }
  return t;
}

Tensor Tensor::reshaped(std::vector<int64_t> shape) const {
  Tensor t = *this;
  const int64_t n = element_count(shape);
  MOESIM_ASSERT(n == numel_, "reshaped: {} has {} elements, shape [{}] has {}", describe(), numel_,
                fmt::join(shape, ", "), n);
  t.shape_ = std::move(shape);
  return t;
}

std::vector<float> Tensor::to_vector() const {
  const Tensor host = device_ == Device::kCpu ? *this : to(Device::kCpu);
  if (dtype_ == DType::kF32) {
    const float* p = host.f32();
    return std::vector<float>(p, p + numel_);
  }
  std::vector<float> out(static_cast<size_t>(numel_));
  const uint16_t* p = host.bf16();
  for (int64_t i = 0; i < numel_; ++i) out[static_cast<size_t>(i)] = kernels::bf16_to_f32(p[i]);
  return out;
}

std::string Tensor::describe() const {
  return fmt::format("{}[{}] {}", dtype_name(dtype_), fmt::join(shape_, ", "), device_name(device_));
}

}  // namespace moesim::exec
