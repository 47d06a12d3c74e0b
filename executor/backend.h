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

#include "executor/tensor.h"

#include <memory>

namespace moesim::exec {

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

  // Memory on the back end's device.
  virtual void copy(const void* src, void* dst, size_t bytes) = 0;  // device to device
  virtual void synchronize() = 0;
};

// threads > 0 sets OpenBLAS's thread count, which is process-wide; threads <= 0 keeps its default
// (OPENBLAS_NUM_THREADS or the core count). The elementwise and row kernels run on the caller's
// thread.
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);
// Throws exec::Error when moesim was built without CUDA or no device `device` exists.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);
// True when a CUDA build sees at least one device.
bool cuda_available();

}  // namespace moesim::exec
