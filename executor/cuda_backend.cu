// The CUDA back end: cuBLAS GEMMs and CUDA kernels over the kernels.h math, plus the CUDA side of
// exec::Tensor (cuda_memory.h). C++17 (nvcc). Everything runs on the legacy default stream, so
// kernels, cuBLAS calls and Tensor copies stay in issue order without events.
#include "executor/backend.h"
#include "executor/cuda_memory.h"
#include "executor/error.h"
#include "executor/kernels.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <string>

namespace moesim::exec {

namespace detail {
namespace {

[[noreturn]] void fail(const char* file, int line, const char* call, const std::string& message) {
  throw Error(std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " + message);
}

void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so the next call does not report it again
  fail(file, line, call, std::string(cudaGetErrorString(status)) + " (" + cudaGetErrorName(status) + ")");
}

void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail(file, line, call, std::string(cublasGetStatusString(status)) + " (" + cublasGetStatusName(status) + ")");
}

}  // namespace
}  // namespace detail

// Every CUDA runtime and cuBLAS call goes through these: file:line, the call, the library's text.
#define MOESIM_CUDA_CHECK(call) ::moesim::exec::detail::cuda_check((call), #call, __FILE__, __LINE__)
#define MOESIM_CUBLAS_CHECK(call) ::moesim::exec::detail::cublas_check((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors surface here, execution errors at the next
// synchronising call.
#define MOESIM_CUDA_CHECK_LAUNCH(kernel) \
  ::moesim::exec::detail::cuda_check(cudaGetLastError(), "launch of " #kernel, __FILE__, __LINE__)

namespace {

constexpr int kThreads = 256;          // per block; a power of two (block_reduce)
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)); }
int blocks_for_rows(int64_t rows) { return static_cast<int>(std::min<int64_t>(rows, kMaxBlocks)); }

// ---- kernels -----------------------------------------------------------------------------

__global__ void gelu_kernel(const float* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = kernels::gelu(x[i]);
}

__global__ void gelu_backward_kernel(const float* x, const float* dy, float* dx, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dx[i] = dy[i] * kernels::gelu_grad(x[i]);
}

__global__ void add_kernel(const float* a, const float* b, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = a[i] + b[i];
}

__global__ void axpy_kernel(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += alpha * x[i];
}

__global__ void f32_to_bf16_kernel(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = kernels::f32_to_bf16(src[i]);
}

__global__ void bf16_to_f32_kernel(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = kernels::bf16_to_f32(src[i]);
}

// Tree reduction over the block in a fixed order (deterministic). Every thread gets the result.
// All threads of the block must call it.
struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class Op>
__device__ float block_reduce(float v, Op op) {
  __shared__ float scratch[kThreads];
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + s]);
    __syncthreads();
  }
  const float result = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return result;
}

// One block per row (grid-stride over rows); threads stride over the row's columns.
__global__ void softmax_rows_kernel(const float* x, float* y, int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * cols;
    const float m = block_reduce(kernels::row_max_part(xr, cols, threadIdx.x, blockDim.x), Max{});
    const float s = block_reduce(kernels::softmax_exp_sum_part(xr, m, cols, threadIdx.x, blockDim.x), Sum{});
    kernels::softmax_write_part(xr, m, s, y + r * cols, cols, threadIdx.x, blockDim.x);
  }
}

__global__ void layernorm_kernel(const float* x, const float* gamma, const float* beta, float* y, float* mean_out,
                                 float* rstd_out, int64_t rows, int64_t cols, float eps) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * cols;
    const float mean = block_reduce(kernels::row_sum_part(xr, cols, threadIdx.x, blockDim.x), Sum{}) /
                       static_cast<float>(cols);
    const float sq = block_reduce(kernels::row_sq_dev_sum_part(xr, mean, cols, threadIdx.x, blockDim.x), Sum{});
    const float rstd = kernels::layernorm_rstd(sq, cols, eps);
    kernels::layernorm_apply_part(xr, gamma, beta, mean, rstd, y + r * cols, cols, threadIdx.x, blockDim.x);
    if (threadIdx.x == 0) {
      if (mean_out) mean_out[r] = mean;
      if (rstd_out) rstd_out[r] = rstd;
    }
  }
}

__global__ void layernorm_backward_dx_kernel(const float* x, const float* gamma, const float* mean, const float* rstd,
                                             const float* dy, float* dx, int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    kernels::layernorm_backward_sums_part(x + r * cols, gamma, dy + r * cols, mean[r], rstd[r], cols, threadIdx.x,
                                          blockDim.x, &sum_g, &sum_g_xhat);
    sum_g = block_reduce(sum_g, Sum{});
    sum_g_xhat = block_reduce(sum_g_xhat, Sum{});
    kernels::layernorm_backward_dx_part(x + r * cols, gamma, dy + r * cols, mean[r], rstd[r], sum_g, sum_g_xhat,
                                        dx + r * cols, cols, threadIdx.x, blockDim.x);
  }
}

// One thread per column; adjacent threads read adjacent columns (coalesced).
__global__ void layernorm_param_grads_kernel(const float* x, const float* mean, const float* rstd, const float* dy,
                                             float* dgamma, float* dbeta, int64_t rows, int64_t cols) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dgamma_sum = 0.0f, dbeta_sum = 0.0f;
    for (int64_t r = 0; r < rows; ++r)
      kernels::layernorm_param_grads_add(x[r * cols + j], dy[r * cols + j], mean[r], rstd[r], &dgamma_sum, &dbeta_sum);
    dgamma[j] += dgamma_sum;
    dbeta[j] += dbeta_sum;
  }
}

// ---- the back end ------------------------------------------------------------------------

int blas_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX)
    throw Error(std::string("cuda gemm: ") + what + " = " + std::to_string(v) + " is out of range for cuBLAS");
  return static_cast<int>(v);
}

// Row-major C[m,n] = op(A) op(B) is column-major C^T[n,m] = op(B)^T op(A)^T: cuBLAS gets B as its
// first operand and A as its second, with m and n swapped; the leading dimensions are the
// row-major row lengths as stored.
struct ColumnMajorGemm {
  cublasOperation_t op_first, op_second;
  int rows, cols, inner, ld_first, ld_second, ld_out;
};

ColumnMajorGemm column_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k) {
  ColumnMajorGemm g;
  g.op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  g.op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  g.rows = blas_int(n, "n");
  g.cols = blas_int(m, "m");
  g.inner = blas_int(k, "k");
  g.ld_first = std::max(1, blas_int(trans_b ? k : n, "ldb"));
  g.ld_second = std::max(1, blas_int(trans_a ? m : k, "lda"));
  g.ld_out = std::max(1, g.rows);
  return g;
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    MOESIM_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    MOESIM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    name_ = "cuda:" + std::to_string(device) + " (" + prop.name + ")";
    MOESIM_CUBLAS_CHECK(cublasCreate(&handle_));
  }
  ~CudaBackend() override { cublasDestroy(handle_); }  // no throwing from a destructor
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return name_; }

  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
            const float* b, float beta, float* c) override {
    const ColumnMajorGemm g = column_major(trans_a, trans_b, m, n, k);
    if (m == 0 || n == 0) return;
    MOESIM_CUBLAS_CHECK(cublasSgemm(handle_, g.op_first, g.op_second, g.rows, g.cols, g.inner, &alpha, b, g.ld_first,
                                    a, g.ld_second, &beta, c, g.ld_out));
  }

  void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                 const uint16_t* b, float beta, float* c) override {
    const ColumnMajorGemm g = column_major(trans_a, trans_b, m, n, k);
    if (m == 0 || n == 0) return;
    MOESIM_CUBLAS_CHECK(cublasGemmEx(handle_, g.op_first, g.op_second, g.rows, g.cols, g.inner, &alpha, b,
                                     CUDA_R_16BF, g.ld_first, a, CUDA_R_16BF, g.ld_second, &beta, c, CUDA_R_32F,
                                     g.ld_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  void gelu(const float* x, float* y, int64_t n) override {
    if (n == 0) return;
    gelu_kernel<<<blocks_for(n), kThreads>>>(x, y, n);
    MOESIM_CUDA_CHECK_LAUNCH(gelu_kernel);
  }

  void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) override {
    if (n == 0) return;
    gelu_backward_kernel<<<blocks_for(n), kThreads>>>(x, dy, dx, n);
    MOESIM_CUDA_CHECK_LAUNCH(gelu_backward_kernel);
  }

  void softmax_rows(const float* x, float* y, int64_t rows, int64_t cols) override {
    if (rows == 0 || cols == 0) return;
    softmax_rows_kernel<<<blocks_for_rows(rows), kThreads>>>(x, y, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(softmax_rows_kernel);
  }

  void add(const float* a, const float* b, float* y, int64_t n) override {
    if (n == 0) return;
    add_kernel<<<blocks_for(n), kThreads>>>(a, b, y, n);
    MOESIM_CUDA_CHECK_LAUNCH(add_kernel);
  }

  void axpy(float alpha, const float* x, float* y, int64_t n) override {
    if (n == 0) return;
    axpy_kernel<<<blocks_for(n), kThreads>>>(alpha, x, y, n);
    MOESIM_CUDA_CHECK_LAUNCH(axpy_kernel);
  }

  void layernorm(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                 int64_t rows, int64_t cols, float eps) override {
    if (rows == 0 || cols == 0) return;
    layernorm_kernel<<<blocks_for_rows(rows), kThreads>>>(x, gamma, beta, y, mean, rstd, rows, cols, eps);
    MOESIM_CUDA_CHECK_LAUNCH(layernorm_kernel);
  }

  void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd, const float* dy,
                          float* dx, float* dgamma, float* dbeta, int64_t rows, int64_t cols) override {
    if (rows == 0 || cols == 0) return;
    layernorm_backward_dx_kernel<<<blocks_for_rows(rows), kThreads>>>(x, gamma, mean, rstd, dy, dx, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(layernorm_backward_dx_kernel);
    layernorm_param_grads_kernel<<<blocks_for(cols), kThreads>>>(x, mean, rstd, dy, dgamma, dbeta, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(layernorm_param_grads_kernel);
  }

  void copy(const void* src, void* dst, size_t bytes) override {
    if (bytes == 0) return;
    MOESIM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
  }

  void synchronize() override { MOESIM_CUDA_CHECK(cudaStreamSynchronize(0)); }

 private:
  int device_;
  std::string name_;
  cublasHandle_t handle_ = nullptr;
};

}  // namespace

bool cuda_available() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // "no device" / "no driver" is an answer here, not an error to keep
    return false;
  }
  return count > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  int count = 0;
  MOESIM_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count)
    throw Error("make_cuda_backend: no CUDA device " + std::to_string(device) + " (" + std::to_string(count) +
                " visible)");
  return std::make_unique<CudaBackend>(device);
}

namespace detail {

std::shared_ptr<void> cuda_alloc(size_t bytes) {
  void* p = nullptr;
  MOESIM_CUDA_CHECK(cudaMalloc(&p, bytes));
  return std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });  // a deleter must not throw
}

void cuda_memset_zero(void* device_ptr, size_t bytes) { MOESIM_CUDA_CHECK(cudaMemset(device_ptr, 0, bytes)); }

void cuda_copy(void* dst, const void* src, size_t bytes, CopyKind kind) {
  const cudaMemcpyKind k = kind == CopyKind::kHostToDevice   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                             : cudaMemcpyDeviceToDevice;
  MOESIM_CUDA_CHECK(cudaMemcpy(dst, src, bytes, k));
}

void cuda_f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  if (n == 0) return;
  f32_to_bf16_kernel<<<blocks_for(n), kThreads>>>(src, dst, n);
  MOESIM_CUDA_CHECK_LAUNCH(f32_to_bf16_kernel);
}

void cuda_bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  if (n == 0) return;
  bf16_to_f32_kernel<<<blocks_for(n), kThreads>>>(src, dst, n);
  MOESIM_CUDA_CHECK_LAUNCH(bf16_to_f32_kernel);
}

}  // namespace detail

}  // namespace moesim::exec
