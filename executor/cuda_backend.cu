// The CUDA back end: cuBLAS GEMMs and CUDA kernels over the kernels.h math, plus the CUDA side of
// exec::Tensor (cuda_memory.h: allocation through a block cache). Part of the CUDA module
// (cuda_module.h): its entry points are exec::cuda::*. Row kernels run one block per row and
// reduce across it in a fixed tree order; sums that must match the CPU's order exactly (column
// sums, scatter-adds) run one thread per column over the rows in order, without atomics. C++17
// (nvcc). Everything runs on the legacy default stream, so kernels, cuBLAS calls and Tensor copies
// stay in issue order without events.
#include "executor/backend.h"
#include "executor/cuda_memory.h"
#include "executor/cuda_module.h"
#include "executor/error.h"
#include "executor/kernels.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>
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
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T scratch[kThreads];
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + s]);
    __syncthreads();
  }
  const T result = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return result;
}

// One block per row (grid-stride over rows); threads stride over the row's columns.
__global__ void softmax_rows_kernel(const float* x, float* y, int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * cols;
    const float m = block_reduce<float>(kernels::row_max_part(xr, cols, threadIdx.x, blockDim.x), Max{});
    const float s = block_reduce<float>(kernels::softmax_exp_sum_part(xr, m, cols, threadIdx.x, blockDim.x), Sum{});
    kernels::softmax_write_part(xr, m, s, y + r * cols, cols, threadIdx.x, blockDim.x);
  }
}

__global__ void layernorm_kernel(const float* x, const float* gamma, const float* beta, float* y, float* mean_out,
                                 float* rstd_out, int64_t rows, int64_t cols, float eps) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * cols;
    const float mean = block_reduce<float>(kernels::row_sum_part(xr, cols, threadIdx.x, blockDim.x), Sum{}) /
                       static_cast<float>(cols);
    const float sq = block_reduce<float>(kernels::row_sq_dev_sum_part(xr, mean, cols, threadIdx.x, blockDim.x), Sum{});
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
    sum_g = block_reduce<float>(sum_g, Sum{});
    sum_g_xhat = block_reduce<float>(sum_g_xhat, Sum{});
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

// Grid-stride loop over [0, n).
#define MOESIM_FOR_EACH(i, n)                                                                    \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n);        \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void add_bias_kernel(float* y, const float* bias, int64_t rows, int64_t cols) {
  MOESIM_FOR_EACH(i, rows * cols) y[i] += bias[i % cols];
}

__global__ void repeat_row_kernel(const float* row, float* y, int64_t rows, int64_t cols) {
  MOESIM_FOR_EACH(i, rows * cols) y[i] = row[i % cols];
}

// One thread per column, rows in order (the CPU's order: the same bits).
__global__ void column_sums_add_kernel(const float* x, float* sums, int64_t rows, int64_t cols) {
  MOESIM_FOR_EACH(c, cols) {
    float s = sums[c];
    for (int64_t r = 0; r < rows; ++r) s += x[r * cols + c];
    sums[c] = s;
  }
}

// Up to kRowGroupsPerLaunch groups' row offsets by value: group y's rows [begin[y], begin[y + 1]).
struct RowGroups {
  int64_t begin[kRowGroupsPerLaunch + 1];
};

// Block row y fills group y's rows with its row.
__global__ void repeat_row_grouped_kernel(const float* row, float* y, RowGroups groups, int64_t cols) {
  const int64_t first = groups.begin[blockIdx.y], rows = groups.begin[blockIdx.y + 1] - first;
  const float* r = row + blockIdx.y * cols;
  float* out = y + first * cols;
  MOESIM_FOR_EACH(i, rows * cols) out[i] = r[i % cols];
}

// Block row y sums group y's rows: one thread per column, rows in order (column_sums_add's bits).
__global__ void column_sums_add_grouped_kernel(const float* x, float* sums, RowGroups groups, int64_t cols) {
  const int64_t first = groups.begin[blockIdx.y], last = groups.begin[blockIdx.y + 1];
  float* out = sums + blockIdx.y * cols;
  MOESIM_FOR_EACH(c, cols) {
    float s = out[c];
    for (int64_t r = first; r < last; ++r) s += x[r * cols + c];
    out[c] = s;
  }
}

__global__ void gather_rows_kernel(const float* src, const int32_t* index, float* dst, int64_t rows, int64_t cols) {
  MOESIM_FOR_EACH(i, rows * cols) dst[i] = src[static_cast<int64_t>(index[i / cols]) * cols + i % cols];
}

// One thread per destination element, its rows in order (the plan's groups; the CPU's sums):
// deterministic without atomics.
__global__ void scatter_add_rows_kernel(const float* src, const int32_t* plan, int64_t rows, int64_t groups,
                                        float* dst, int64_t cols) {
  const int32_t *sorted = plan, *dst_row = plan + rows, *begin = dst_row + groups;
  MOESIM_FOR_EACH(i, groups * cols) {
    const int64_t g = i / cols, c = i % cols;
    float* d = dst + static_cast<int64_t>(dst_row[g]) * cols + c;
    float s = *d;
    for (int32_t j = begin[g]; j < begin[g + 1]; ++j) s += src[static_cast<int64_t>(sorted[j]) * cols + c];
    *d = s;
  }
}

__global__ void gather_sum_rows_kernel(const float* src, const int32_t* slot, const float* weight, float* dst,
                                       int64_t tokens, int k, int64_t cols) {
  MOESIM_FOR_EACH(i, tokens * cols) dst[i] = kernels::combine_element(src, slot, weight, i / cols, k, cols, i % cols);
}

// One block per assignment; the dot product reduced across the block in double.
__global__ void gather_sum_rows_backward_kernel(const float* dy, const float* src, const int32_t* slot,
                                                const float* weight, float* grad_src, float* dweight,
                                                int64_t assignments, int k, int64_t cols) {
  for (int64_t a = blockIdx.x; a < assignments; a += gridDim.x) {
    if (slot[a] < 0) {
      if (threadIdx.x == 0) dweight[a] = 0.0f;
      continue;  // uniform across the block: no thread reaches block_reduce
    }
    const int64_t row = static_cast<int64_t>(slot[a]) * cols;
    const double part = kernels::combine_backward_part(dy + (a / k) * cols, src + row, weight[a], grad_src + row,
                                                       cols, threadIdx.x, blockDim.x);
    const double dot = block_reduce<double>(part, Sum{});
    if (threadIdx.x == 0) dweight[a] = static_cast<float>(dot);
  }
}

__global__ void split_heads_kernel(const float* x, float* y, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) {
  MOESIM_FOR_EACH(i, B * S * G * H * d) y[i] = x[kernels::heads_source_index(i, B, S, G, H, d)];
}

__global__ void merge_heads_kernel(const float* y, float* x, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) {
  MOESIM_FOR_EACH(i, B * S * G * H * d) x[kernels::heads_source_index(i, B, S, G, H, d)] = y[i];
}

__global__ void causal_mask_kernel(float* x, int64_t batches, int64_t S) {
  MOESIM_FOR_EACH(i, batches * S * S) if (kernels::causal_masked(i, S)) x[i] = -INFINITY;
}

__global__ void softmax_backward_rows_kernel(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float dot =
        block_reduce<float>(kernels::dot_part(y + r * cols, dy + r * cols, cols, threadIdx.x, blockDim.x), Sum{});
    kernels::softmax_backward_write_part(y + r * cols, dy + r * cols, dot, dx + r * cols, cols, threadIdx.x,
                                         blockDim.x);
  }
}

__global__ void cross_entropy_kernel(const float* logits, const int32_t* targets, float* dlogits, double* row_loss,
                                     int64_t rows, int64_t V, double grad_scale) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* z = logits + r * V;
    const double m = block_reduce<float>(kernels::row_max_part(z, V, threadIdx.x, blockDim.x), Max{});
    const double sum = block_reduce<double>(kernels::ce_exp_sum_part(z, m, V, threadIdx.x, blockDim.x), Sum{});
    if (threadIdx.x == 0) row_loss[r] = kernels::ce_row_loss(z, m, sum, targets[r]);
    kernels::ce_grad_part(z, m, sum, targets[r], grad_scale, dlogits + r * V, V, threadIdx.x, blockDim.x);
  }
}

__global__ void scale_kernel(float alpha, float* x, int64_t n) {
  MOESIM_FOR_EACH(i, n) x[i] *= alpha;
}

__global__ void gate_noise_kernel(const float* logits, float* noisy, int64_t tokens, int experts, uint64_t key,
                                  uint64_t step, int64_t token_offset, float sigma) {
  MOESIM_FOR_EACH(i, tokens * experts) {
    const int64_t t = i / experts;
    const int e = static_cast<int>(i % experts);
    noisy[i] = logits[i] + kernels::mul_rn(sigma, kernels::gate_noise_sample(key, step, token_offset + t, e));
  }
}

// One thread per token (a token's work is O(E k): the experts of one router).
__global__ void router_backward_kernel(kernels::RouterBackward args) {
  MOESIM_FOR_EACH(t, args.tokens) kernels::router_backward_token(args, t);
}

__global__ void sgd_step_kernel(float* param, const float* grad, float* velocity, int64_t n, kernels::SgdHyper h) {
  MOESIM_FOR_EACH(i, n) kernels::sgd_update(param + i, grad[i], velocity + i, h);
}

__global__ void adam_step_kernel(float* param, const float* grad, float* m, float* v, int64_t n, kernels::AdamHyper h) {
  MOESIM_FOR_EACH(i, n) kernels::adam_update(param + i, grad[i], m + i, v + i, h);
}

// Up to kAdamTensorsPerLaunch tensors by value (1.9 KB of the kernel's 4 KB of parameters): block
// row y steps tensor y.
struct AdamTensors {
  AdamTensor t[kAdamTensorsPerLaunch];
};

__global__ void adam_step_many_kernel(AdamTensors tensors, kernels::AdamHyper h) {
  const AdamTensor& t = tensors.t[blockIdx.y];
  MOESIM_FOR_EACH(i, t.n) kernels::adam_update(t.param + i, t.grad[i], t.m + i, t.v + i, h);
}

// Calls f(first, count, offsets, most) for each run of up to kRowGroupsPerLaunch of `groups` groups
// (`begin`: groups + 1 row offsets), `most` the run's largest group's rows.
template <typename F>
void for_row_groups(const int64_t* begin, int groups, F f) {
  for (int first = 0; first < groups; first += kRowGroupsPerLaunch) {
    const int count = std::min(kRowGroupsPerLaunch, groups - first);
    RowGroups g{};
    int64_t most = 0;
    for (int i = 0; i <= count; ++i) g.begin[i] = begin[first + i];
    for (int i = 0; i < count; ++i) most = std::max(most, g.begin[i + 1] - g.begin[i]);
    f(first, count, g, most);
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

  void gemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    int64_t stride_a, const float* b, int64_t stride_b, float beta, float* c, int64_t stride_c,
                    int64_t batch) override {
    const ColumnMajorGemm g = column_major(trans_a, trans_b, m, n, k);
    if (m == 0 || n == 0 || batch == 0) return;
    MOESIM_CUBLAS_CHECK(cublasSgemmStridedBatched(handle_, g.op_first, g.op_second, g.rows, g.cols, g.inner, &alpha, b,
                                                  g.ld_first, stride_b, a, g.ld_second, stride_a, &beta, c, g.ld_out,
                                                  stride_c, blas_int(batch, "batch")));
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

  void add_bias(float* y, const float* bias, int64_t rows, int64_t cols) override {
    if (rows * cols == 0) return;
    add_bias_kernel<<<blocks_for(rows * cols), kThreads>>>(y, bias, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(add_bias_kernel);
  }

  void repeat_row(const float* row, float* y, int64_t rows, int64_t cols) override {
    if (rows * cols == 0) return;
    repeat_row_kernel<<<blocks_for(rows * cols), kThreads>>>(row, y, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(repeat_row_kernel);
  }

  void column_sums_add(const float* x, float* sums, int64_t rows, int64_t cols) override {
    if (rows == 0 || cols == 0) return;
    column_sums_add_kernel<<<blocks_for(cols), kThreads>>>(x, sums, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(column_sums_add_kernel);
  }

  // Each launch takes up to kRowGroupsPerLaunch groups, its grid's rows as wide as its largest.
  void repeat_row_grouped(const float* row, float* y, const int64_t* begin, int groups, int64_t cols) override {
    for_row_groups(begin, groups, [&](int first, int count, const RowGroups& g, int64_t most) {
      if (most * cols == 0) return;
      repeat_row_grouped_kernel<<<dim3(blocks_for(most * cols), static_cast<unsigned>(count)), kThreads>>>(
          row + first * cols, y, g, cols);
      MOESIM_CUDA_CHECK_LAUNCH(repeat_row_grouped_kernel);
    });
  }

  void column_sums_add_grouped(const float* x, float* sums, const int64_t* begin, int groups, int64_t cols) override {
    for_row_groups(begin, groups, [&](int first, int count, const RowGroups& g, int64_t most) {
      if (most == 0 || cols == 0) return;
      column_sums_add_grouped_kernel<<<dim3(blocks_for(cols), static_cast<unsigned>(count)), kThreads>>>(
          x, sums + first * cols, g, cols);
      MOESIM_CUDA_CHECK_LAUNCH(column_sums_add_grouped_kernel);
    });
  }

  void gather_rows(const float* src, const int32_t* index, float* dst, int64_t rows, int64_t cols) override {
    if (rows * cols == 0) return;
    gather_rows_kernel<<<blocks_for(rows * cols), kThreads>>>(src, index, dst, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(gather_rows_kernel);
  }

  void scatter_add_rows(const float* src, const int32_t* /*index*/, const int32_t* plan, int64_t groups, float* dst,
                        int64_t rows, int64_t cols) override {
    if (groups == 0 || cols == 0) return;
    if (plan == nullptr) throw Error("cuda scatter_add_rows: no plan (scatter_add_plan) of its index");
    scatter_add_rows_kernel<<<blocks_for(groups * cols), kThreads>>>(src, plan, rows, groups, dst, cols);
    MOESIM_CUDA_CHECK_LAUNCH(scatter_add_rows_kernel);
  }
  bool scatter_reads_plan() const override { return true; }

  void gather_sum_rows(const float* src, const int32_t* slot, const float* weight, float* dst, int64_t tokens, int k,
                       int64_t cols) override {
    if (tokens * cols == 0) return;
    gather_sum_rows_kernel<<<blocks_for(tokens * cols), kThreads>>>(src, slot, weight, dst, tokens, k, cols);
    MOESIM_CUDA_CHECK_LAUNCH(gather_sum_rows_kernel);
  }

  void gather_sum_rows_backward(const float* dy, const float* src, const int32_t* slot, const float* weight,
                                float* grad_src, float* dweight, int64_t tokens, int k, int64_t cols) override {
    if (tokens * k == 0) return;
    gather_sum_rows_backward_kernel<<<blocks_for_rows(tokens * k), kThreads>>>(dy, src, slot, weight, grad_src,
                                                                                dweight, tokens * k, k, cols);
    MOESIM_CUDA_CHECK_LAUNCH(gather_sum_rows_backward_kernel);
  }

  void split_heads(const float* x, float* y, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) override {
    const int64_t n = B * S * G * H * d;
    if (n == 0) return;
    split_heads_kernel<<<blocks_for(n), kThreads>>>(x, y, B, S, G, H, d);
    MOESIM_CUDA_CHECK_LAUNCH(split_heads_kernel);
  }

  void merge_heads(const float* y, float* x, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) override {
    const int64_t n = B * S * G * H * d;
    if (n == 0) return;
    merge_heads_kernel<<<blocks_for(n), kThreads>>>(y, x, B, S, G, H, d);
    MOESIM_CUDA_CHECK_LAUNCH(merge_heads_kernel);
  }

  void causal_mask(float* x, int64_t batches, int64_t S) override {
    if (batches * S == 0) return;
    causal_mask_kernel<<<blocks_for(batches * S * S), kThreads>>>(x, batches, S);
    MOESIM_CUDA_CHECK_LAUNCH(causal_mask_kernel);
  }

  void softmax_backward_rows(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols) override {
    if (rows == 0 || cols == 0) return;
    softmax_backward_rows_kernel<<<blocks_for_rows(rows), kThreads>>>(y, dy, dx, rows, cols);
    MOESIM_CUDA_CHECK_LAUNCH(softmax_backward_rows_kernel);
  }

  void cross_entropy(const float* logits, const int32_t* targets, float* dlogits, double* row_loss, int64_t rows,
                     int64_t V, double grad_scale) override {
    if (rows == 0 || V == 0) return;
    cross_entropy_kernel<<<blocks_for_rows(rows), kThreads>>>(logits, targets, dlogits, row_loss, rows, V, grad_scale);
    MOESIM_CUDA_CHECK_LAUNCH(cross_entropy_kernel);
  }

  void scale(float alpha, float* x, int64_t n) override {
    if (n == 0) return;
    scale_kernel<<<blocks_for(n), kThreads>>>(alpha, x, n);
    MOESIM_CUDA_CHECK_LAUNCH(scale_kernel);
  }

  void gate_noise(const float* logits, float* noisy, int64_t tokens, int experts, uint64_t key, uint64_t step,
                  int64_t token_offset, float sigma) override {
    if (tokens * experts == 0) return;
    gate_noise_kernel<<<blocks_for(tokens * experts), kThreads>>>(logits, noisy, tokens, experts, key, step,
                                                                  token_offset, sigma);
    MOESIM_CUDA_CHECK_LAUNCH(gate_noise_kernel);
  }

  void router_backward(const kernels::RouterBackward& args) override {
    if (args.tokens == 0) return;
    router_backward_kernel<<<blocks_for(args.tokens), kThreads>>>(args);
    MOESIM_CUDA_CHECK_LAUNCH(router_backward_kernel);
  }

  void sgd_step(float* param, const float* grad, float* velocity, int64_t n, const kernels::SgdHyper& h) override {
    if (n == 0) return;
    sgd_step_kernel<<<blocks_for(n), kThreads>>>(param, grad, velocity, n, h);
    MOESIM_CUDA_CHECK_LAUNCH(sgd_step_kernel);
  }

  void adam_step(float* param, const float* grad, float* m, float* v, int64_t n, const kernels::AdamHyper& h) override {
    if (n == 0) return;
    adam_step_kernel<<<blocks_for(n), kThreads>>>(param, grad, m, v, n, h);
    MOESIM_CUDA_CHECK_LAUNCH(adam_step_kernel);
  }

  void adam_step_many(const AdamTensor* tensors, size_t count_all, const kernels::AdamHyper& h) override {
    for (size_t first = 0; first < count_all; first += kAdamTensorsPerLaunch) {
      AdamTensors batch{};
      const size_t count = std::min<size_t>(kAdamTensorsPerLaunch, count_all - first);
      int64_t most = 0;
      for (size_t i = 0; i < count; ++i) {
        batch.t[i] = tensors[first + i];
        most = std::max(most, batch.t[i].n);
      }
      if (most == 0) continue;
      adam_step_many_kernel<<<dim3(blocks_for(most), static_cast<unsigned>(count)), kThreads>>>(batch, h);
      MOESIM_CUDA_CHECK_LAUNCH(adam_step_many_kernel);
    }
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

namespace cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // "no device" / "no driver" is an answer here, not an error to keep
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> make_backend(int device) {
  int count = 0;
  MOESIM_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count)
    throw Error("make_cuda_backend: no CUDA device " + std::to_string(device) + " (" + std::to_string(count) +
                " visible)");
  return std::make_unique<CudaBackend>(device);
}

}  // namespace cuda

namespace detail {

namespace {

// A caching allocator: freed blocks go to a free list by (rounded) size and are handed out again,
// so the layers' per-call temporaries do not pay cudaMalloc and the synchronising cudaFree every
// step. Safe without events because every user of these buffers is ordered with the legacy default
// stream (the back end's kernels and copies run on it; the NCCL engine's blocking stream syncs with
// it and is waited for on the host). Blocks go back to the driver only at process exit.
class BlockCache {
 public:
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache;  // never destroyed: deleters may run at exit
    return *cache;
  }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        note_use(bytes);
        return p;
      }
    }
    void* p = nullptr;
    cudaError_t rc = cudaMalloc(&p, bytes);
    if (rc == cudaErrorMemoryAllocation) {  // give the cached blocks back and try once more
      cudaGetLastError();
      release_all();
      rc = cudaMalloc(&p, bytes);
    }
    MOESIM_CUDA_CHECK(rc);
    std::lock_guard<std::mutex> lock(mu_);
    note_use(bytes);
    return p;
  }
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    free_[bytes].push_back(p);
    in_use_ -= bytes;
  }
  size_t peak() {
    std::lock_guard<std::mutex> lock(mu_);
    return peak_;
  }

 private:
  void note_use(size_t bytes) {
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
  }
  void release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) cudaFree(p);
    free_.clear();
  }
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t in_use_ = 0, peak_ = 0;
};

}  // namespace
}  // namespace detail

namespace cuda {

std::shared_ptr<void> alloc(size_t bytes) {
  const size_t rounded = (bytes + 511) / 512 * 512;
  void* p = detail::BlockCache::instance().take(rounded);
  return std::shared_ptr<void>(p, [rounded](void* q) { detail::BlockCache::instance().give(q, rounded); });
}

size_t peak_allocated_bytes() { return detail::BlockCache::instance().peak(); }

void memset_zero(void* device_ptr, size_t bytes) { MOESIM_CUDA_CHECK(cudaMemset(device_ptr, 0, bytes)); }

void copy(void* dst, const void* src, size_t bytes, detail::CopyKind kind) {
  using detail::CopyKind;
  const cudaMemcpyKind k = kind == CopyKind::kHostToDevice   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                             : cudaMemcpyDeviceToDevice;
  MOESIM_CUDA_CHECK(cudaMemcpy(dst, src, bytes, k));
}

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  if (n == 0) return;
  f32_to_bf16_kernel<<<blocks_for(n), kThreads>>>(src, dst, n);
  MOESIM_CUDA_CHECK_LAUNCH(f32_to_bf16_kernel);
}

void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  if (n == 0) return;
  bf16_to_f32_kernel<<<blocks_for(n), kThreads>>>(src, dst, n);
  MOESIM_CUDA_CHECK_LAUNCH(bf16_to_f32_kernel);
}

}  // namespace cuda

}  // namespace moesim::exec
