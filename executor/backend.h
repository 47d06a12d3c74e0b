// Compute back ends: the kernels the executor's layers are written against, once per device.
// The CPU back end is the reference (OpenBLAS sgemm, plain loops over the shared kernel math in
// kernels.h); the CUDA back end runs cuBLAS GEMMs and CUDA kernels over the same kernel math.
// Every CUDA kernel has this CPU reference, and tests/executor_backend_test runs one test body
// over both (the CUDA half skips with a visible message when no device is present).
//
// All tensors are row-major and contiguous, on the back end's device, fp32 unless said otherwise
// (gemm_bf16 takes bf16 inputs, accumulating in fp32). Pointers are raw device pointers
// (Tensor::device_f32()). The CUDA back end runs asynchronously on the legacy default stream, in
// order with Tensor copies; synchronize() before reading results on the host. Its sgemm keeps
// cuBLAS's default math mode, i.e. true fp32 (no TF32), so it compares with the CPU at fp32
// tolerance.
#pragma once

#include "executor/kernels.h"
#include "executor/tensor.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace moesim::exec {

// One tensor of an optimizer step over several (Backend::adam_step_many): n elements each.
struct AdamTensor {
  float* param;
  const float* grad;
  float* m;
  float* v;
  int64_t n;
};
// At most this many tensors a GPU launch (their pointers travel in the kernel's parameters).
inline constexpr int kAdamTensorsPerLaunch = 48;
// At most this many groups of rows a GPU launch (Backend::repeat_row_grouped; their offsets travel
// in the kernel's parameters).
inline constexpr int kRowGroupsPerLaunch = 64;

// A scatter-add's index grouped by destination row, built on the host (scatter_add_plan) for
// Backend::scatter_add_rows: one int32 array, [the source rows sorted by destination, stably
// (`rows`) | each group's destination row (`groups`) | group g's rows are sorted[begin[g]] up to
// sorted[begin[g + 1]] (groups + 1)], so that it reaches a device in one copy.
struct ScatterPlan {
  std::vector<int32_t> packed;
  int64_t rows = 0, groups = 0;
};
ScatterPlan scatter_add_plan(const int32_t* index, size_t count);

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;  // "cpu (OpenBLAS, 2 threads)", "cuda:0 (NVIDIA H100 ...)"

  // C[m,n] = alpha * op(A) op(B) + beta * C, op(X) = X or X^T as the flags say; A is [m,k]
  // (or [k,m] when trans_a), B is [k,n] (or [n,k] when trans_b). Views by pointer offset let a
  // grouped expert GEMM run expert by expert over one buffer.
  virtual void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                    const float* b, float beta, float* c) = 0;
  // `batch` GEMMs as gemm's, the i-th on a + i stride_a, b + i stride_b, c + i stride_c (elements):
  // attention's per (sequence, head) products. One cuBLAS call on a GPU (a call each cost about
  // 9 us of the host on an H200, 64 of them a moe-tiny attention forward); a loop here.
  virtual void gemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                            int64_t stride_a, const float* b, int64_t stride_b, float beta, float* c, int64_t stride_c,
                            int64_t batch) {
    for (int64_t i = 0; i < batch; ++i)
      gemm(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, b + i * stride_b, beta, c + i * stride_c);
  }
  // The same with bf16 inputs (raw bits, kernels.h) and an fp32 C, products accumulated in fp32.
  // The CPU reference widens A and B to fp32 (exact) and runs sgemm; CUDA runs cublasGemmEx.
  virtual void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const uint16_t* a, const uint16_t* b, float beta, float* c) = 0;

  // Elementwise and row-wise kernels (n = element count; rows x cols for row-wise ones); the math
  // and its formulas are in kernels.h. Outputs may alias inputs for the elementwise ones.
  virtual void gelu(const float* x, float* y, int64_t n) = 0;                         // tanh approximation
  virtual void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) = 0;  // dx = dy gelu'(x)
  virtual void softmax_rows(const float* x, float* y, int64_t rows, int64_t cols) = 0;  // max-subtracted
  virtual void add(const float* a, const float* b, float* y, int64_t n) = 0;          // y = a + b
  virtual void axpy(float alpha, const float* x, float* y, int64_t n) = 0;             // y += alpha x
  // Over each row of x[rows, cols]; gamma, beta[cols]; mean, rstd[rows] are saved for the backward
  // pass (either may be null when no backward follows).
  virtual void layernorm(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                         int64_t rows, int64_t cols, float eps) = 0;
  // dx is overwritten; dgamma, dbeta[cols] accumulate (+=) over the rows, in row order.
  virtual void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd,
                                  const float* dy, float* dx, float* dgamma, float* dbeta, int64_t rows,
                                  int64_t cols) = 0;

  // ---- rows, gathers and scatters (the layers' data movement; index math in kernels.h) ----
  // Sums below run in a fixed order on both back ends (deterministic; exact on small integers).
  virtual void add_bias(float* y, const float* bias, int64_t rows, int64_t cols) = 0;   // y[r, c] += bias[c]
  virtual void repeat_row(const float* row, float* y, int64_t rows, int64_t cols) = 0;  // y[r, c] = row[c]
  // sums[c] += x[r, c], r = 0, 1, ... in order (a bias gradient).
  virtual void column_sums_add(const float* x, float* sums, int64_t rows, int64_t cols) = 0;
  // The same over groups of rows (the experts' biases and their gradients): group g < groups holds
  // rows [begin[g], begin[g + 1]) of y or x (`begin`, groups + 1 offsets, on the host; empty groups
  // allowed); y[r, c] = row[g, c] for its rows, and sums[g, c] += its rows' x[r, c] in order. One
  // kernel launch per kRowGroupsPerLaunch groups on a GPU (a launch per expert cost moe-tiny's
  // experts 2 x 8 launches a pass on an H200, each about 10 us of the host); a loop here.
  virtual void repeat_row_grouped(const float* row, float* y, const int64_t* begin, int groups, int64_t cols) {
    for (int g = 0; g < groups; ++g) repeat_row(row + g * cols, y + begin[g] * cols, begin[g + 1] - begin[g], cols);
  }
  virtual void column_sums_add_grouped(const float* x, float* sums, const int64_t* begin, int groups, int64_t cols) {
    for (int g = 0; g < groups; ++g)
      column_sums_add(x + begin[g] * cols, sums + g * cols, begin[g + 1] - begin[g], cols);
  }
  // dst[i, :] = src[index[i], :] for i < rows (embedding lookup, MoE dispatch). index is int32 on
  // the device, each in range (the caller checks ids on the host).
  virtual void gather_rows(const float* src, const int32_t* index, float* dst, int64_t rows, int64_t cols) = 0;
  // dst[index[i], :] += src[i, :], i = 0, 1, ... in order: a repeated index collects its rows in
  // order (embedding backward). A GPU reads the index as its ScatterPlan (`plan`, packed, on the
  // device; `groups` groups) and sums each destination element's rows in one thread, in order
  // (deterministic, no atomics: a thread per column over every row took moe-tiny's lookup
  // backward 118 us on an H200, 2.6x its model); the CPU reads `index` and takes a null plan.
  virtual void scatter_add_rows(const float* src, const int32_t* index, const int32_t* plan, int64_t groups, float* dst,
                                int64_t rows, int64_t cols) = 0;
  // Whether scatter_add_rows reads a plan (a GPU's).
  virtual bool scatter_reads_plan() const { return false; }
  // MoE combine (kernels::combine_element): dst[t, :] = sum over j < k with slot[t k + j] >= 0, in
  // j order, of weight[t k + j] src[slot[t k + j], :]; weight null: 1 (the dispatch backward).
  virtual void gather_sum_rows(const float* src, const int32_t* slot, const float* weight, float* dst,
                               int64_t tokens, int k, int64_t cols) = 0;
  // Its backward: for each a = t k + j with slot[a] >= 0, grad_src[slot[a], :] = weight[a] dy[t, :]
  // and dweight[a] = dy[t, :] . src[slot[a], :] (summed in double); dweight[a] = 0 where slot < 0.
  virtual void gather_sum_rows_backward(const float* dy, const float* src, const int32_t* slot, const float* weight,
                                        float* grad_src, float* dweight, int64_t tokens, int k, int64_t cols) = 0;
  // Attention heads (kernels::heads_source_index): x [B, S, G, H, d] -> y [G, B, H, S, d], and back.
  virtual void split_heads(const float* x, float* y, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) = 0;
  virtual void merge_heads(const float* y, float* x, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) = 0;
  // x [batches, S, S]: every entry above the diagonal (key after query) to -inf.
  virtual void causal_mask(float* x, int64_t batches, int64_t S) = 0;
  // dx = y (dy - rowsum(y dy)) over rows of y = softmax(x); dx may alias dy.
  virtual void softmax_backward_rows(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols) = 0;
  // Softmax cross-entropy per row of logits [rows, V] against int32 targets (in range):
  // row_loss[r] (double) and dlogits = (softmax - onehot) grad_scale (kernels.h, ce_*).
  virtual void cross_entropy(const float* logits, const int32_t* targets, float* dlogits, double* row_loss,
                             int64_t rows, int64_t V, double grad_scale) = 0;
  virtual void scale(float alpha, float* x, int64_t n) = 0;  // x *= alpha

  // ---- the MoE router -------------------------------------------------------------------------
  // noisy[t, e] = logits[t, e] + sigma kernels::gate_noise_sample(key, step, token_offset + t, e).
  virtual void gate_noise(const float* logits, float* noisy, int64_t tokens, int experts, uint64_t key,
                          uint64_t step, int64_t token_offset, float sigma) = 0;
  // kernels::router_backward_token for every token (all pointers on the device).
  virtual void router_backward(const kernels::RouterBackward& args) = 0;

  // ---- optimizer steps over n elements (kernels::sgd_update, adam_update) -----------------------
  virtual void sgd_step(float* param, const float* grad, float* velocity, int64_t n, const kernels::SgdHyper& h) = 0;
  virtual void adam_step(float* param, const float* grad, float* m, float* v, int64_t n,
                         const kernels::AdamHyper& h) = 0;
  // adam_step on every tensor, in one kernel launch per kAdamTensorsPerLaunch on a GPU (where a
  // launch per tensor cost moe-tiny's 35 tensors 0.12-0.16 ms a step on an H200); a loop here.
  virtual void adam_step_many(const AdamTensor* tensors, size_t count, const kernels::AdamHyper& h) {
    for (const AdamTensor* t = tensors; t != tensors + count; ++t) adam_step(t->param, t->grad, t->m, t->v, t->n, h);
  }

  // Memory on the back end's device.
  virtual void copy(const void* src, void* dst, size_t bytes) = 0;  // device to device
  virtual void synchronize() = 0;
};

// threads > 0 sets OpenBLAS's thread count, which is process-wide; threads <= 0 keeps its default
// (OPENBLAS_NUM_THREADS or the core count). The elementwise and row kernels run on the caller's
// thread.
//
// Host-side decisions: the layers run every tensor op through a Backend, except the MoE layer's
// routing decisions (top-k, the capacity assignment in the cost model's fill order, the aux-loss
// batch statistics), which run on the host over an explicit device-to-host copy of the router's
// probabilities ([tokens, experts], small), as MoE frameworks do for the capacity assignment.
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);
// Throws exec::Error when moesim was built without CUDA or no device `device` exists.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);
// True when a CUDA build sees at least one device.
bool cuda_available();
// True when moesim was built with CUDA (whether or not a device is present).
bool built_with_cuda();
// Visible CUDA devices (0 without CUDA or without a driver).
int cuda_device_count();
// A CPU back end shared by the CPU-only conveniences (cross_entropy without a back end, optimizers
// built without one); it leaves OpenBLAS's thread count alone.
Backend& default_cpu_backend();

}  // namespace moesim::exec
