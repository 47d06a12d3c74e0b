#include "executor/tensor.h"

#include "common/error.h"
#include "executor/cuda_memory.h"
#include "executor/error.h"
#include "executor/kernels.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdlib>
#include <cstring>
#include <malloc.h>
#include <mutex>
#include <unordered_map>
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

// A block cache for CPU tensors, as the CUDA back end has one: freed blocks wait, by their
// rounded size, for the next tensor of that size. Every training step frees and reallocates the
// same sizes; handed back to glibc, big blocks return to the kernel and the next step's tensors
// fault their pages in again one by one, which in a VM made moe-tiny's MoE exchanges 20x slower
// than the copies themselves and its MLPs 2x slower than the same kernels on reused buffers
// (found by `moesim validate`). MoE tensors change size every step with the routing, so blocks
// come in size classes a quarter of a power of two apart (at most 25% unused) rather than exact
// sizes. The cache keeps what a step needs at its peak; nothing is returned before exit.
class CpuBlockCache {
 public:
  // The size class of `bytes`: the next of 4, 5, 6 or 7 x 2^k / 4 (whole alignment units).
  static size_t size_class(size_t bytes) {
    size_t units = std::max<size_t>(1, (bytes + kCpuAlignment - 1) / kCpuAlignment);
    if (units > 4) {
      size_t step = 1;
      while ((units - 1) / step >= 8) step *= 2;  // step = 2^k / 4 for units in (4 step, 8 step]
      units = (units + step - 1) / step * step;
    }
    return units * kCpuAlignment;
  }

  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) std::free(p);
    free_.clear();
  }

  std::shared_ptr<void> allocate(size_t bytes) {
    // aligned_alloc wants a size that is a multiple of the alignment (classes are).
    const size_t rounded = size_class(bytes);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(rounded);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
      }
    }
    if (p == nullptr) p = std::aligned_alloc(kCpuAlignment, rounded);
    if (!p) throw std::bad_alloc();
    return std::shared_ptr<void>(p, [this, rounded](void* q) {
      std::lock_guard<std::mutex> lock(mutex_);
      free_[rounded].push_back(q);
    });
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

CpuBlockCache& cpu_cache() {
  static CpuBlockCache* cache = new CpuBlockCache;  // never destroyed: tensors may outlive statics
  return *cache;
}

std::shared_ptr<void> cpu_alloc(size_t bytes) {
  return cpu_cache().allocate(bytes);
}

detail::CopyKind copy_kind(Device from, Device to) {
  if (from == Device::kCpu) return detail::CopyKind::kHostToDevice;
  return to == Device::kCpu ? detail::CopyKind::kDeviceToHost : detail::CopyKind::kDeviceToDevice;
}

const char* device_name(Device d) { return d == Device::kCpu ? "cpu" : "cuda"; }

}  // namespace

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
    case DType::kF64: return 8;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
    case DType::kF64: return "f64";
  }
  return "?";
}

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

namespace {
Tensor from_host(std::vector<int64_t> shape, DType dtype, const void* values, size_t count, Device device) {
  Tensor t = Tensor::empty(std::move(shape), dtype, device);
  MOESIM_ASSERT(static_cast<int64_t>(count) == t.numel(), "Tensor::from: {} values for {} ({} elements)", count,
                t.describe(), t.numel());
  if (t.numel() == 0) return t;
  if (device == Device::kCpu)
    std::memcpy(t.data(), values, t.bytes());
  else
    detail::cuda_copy(t.data(), values, t.bytes(), detail::CopyKind::kHostToDevice);
  return t;
}
}  // namespace

Tensor Tensor::from(std::vector<int64_t> shape, const std::vector<float>& values, Device device) {
  return from_host(std::move(shape), DType::kF32, values.data(), values.size(), device);
}

Tensor Tensor::from_i32(std::vector<int64_t> shape, const int32_t* values, size_t count, Device device) {
  return from_host(std::move(shape), DType::kI32, values, count, device);
}

Tensor Tensor::from_f64(std::vector<int64_t> shape, const double* values, size_t count, Device device) {
  return from_host(std::move(shape), DType::kF64, values, count, device);
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

int32_t* Tensor::i32() {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kI32, "i32() on {}", describe());
  return static_cast<int32_t*>(data());
}

const int32_t* Tensor::i32() const {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kI32, "i32() on {}", describe());
  return static_cast<const int32_t*>(data());
}

double* Tensor::f64() {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kF64, "f64() on {}", describe());
  return static_cast<double*>(data());
}

const double* Tensor::f64() const {
  MOESIM_ASSERT(device_ == Device::kCpu && dtype_ == DType::kF64, "f64() on {}", describe());
  return static_cast<const double*>(data());
}

int32_t* Tensor::device_i32() {
  MOESIM_ASSERT(dtype_ == DType::kI32, "device_i32() on {}", describe());
  return static_cast<int32_t*>(data());
}

const int32_t* Tensor::device_i32() const {
  MOESIM_ASSERT(dtype_ == DType::kI32, "device_i32() on {}", describe());
  return static_cast<const int32_t*>(data());
}

double* Tensor::device_f64() {
  MOESIM_ASSERT(dtype_ == DType::kF64, "device_f64() on {}", describe());
  return static_cast<double*>(data());
}

const double* Tensor::device_f64() const {
  MOESIM_ASSERT(dtype_ == DType::kF64, "device_f64() on {}", describe());
  return static_cast<const double*>(data());
}

void Tensor::fill_zero() {
  if (numel_ == 0) return;
  if (device_ == Device::kCpu)
    std::memset(data(), 0, bytes());
  else
    detail::cuda_memset_zero(data(), bytes());
}

void Tensor::copy_from(const Tensor& src) {
  MOESIM_ASSERT(src.dtype_ == dtype_ && src.numel_ == numel_, "copy_from: {} into {}", src.describe(), describe());
  if (numel_ == 0) return;
  if (src.device_ == Device::kCpu && device_ == Device::kCpu)
    std::memcpy(data(), src.data(), bytes());
  else
    detail::cuda_copy(data(), src.data(), bytes(), copy_kind(src.device_, device_));
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
  MOESIM_ASSERT((dtype_ == DType::kF32 || dtype_ == DType::kBF16) && (dtype == DType::kF32 || dtype == DType::kBF16),
                "to({}): {} converts between f32 and bf16 only", dtype_name(dtype), describe());
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

std::vector<int32_t> Tensor::to_i32_vector() const {
  const Tensor host = device_ == Device::kCpu ? *this : to(Device::kCpu);
  const int32_t* p = host.i32();
  return std::vector<int32_t>(p, p + numel_);
}

std::vector<double> Tensor::to_f64_vector() const {
  const Tensor host = device_ == Device::kCpu ? *this : to(Device::kCpu);
  const double* p = host.f64();
  return std::vector<double>(p, p + numel_);
}

std::vector<float> Tensor::to_vector() const {
  MOESIM_ASSERT(dtype_ == DType::kF32 || dtype_ == DType::kBF16, "to_vector() on {}", describe());
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

void release_cached_cpu_blocks() {
  cpu_cache().release();
  ::malloc_trim(0);
}

}  // namespace moesim::exec
