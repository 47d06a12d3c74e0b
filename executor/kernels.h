// Kernel math of the executor, written once as MOESIM_HOST_DEVICE functions: the CPU back end
// loops over them and the CUDA kernels call them per thread (../shared/CONVENTIONS.md: the tested
// code is the shipped code). Header-only, C++17 (nvcc compiles it too), no allocation, no throws.
//
// Row kernels come in "parts" over the strided subset {begin, begin + stride, ...} of a row, so a
// CUDA block can run them with begin = threadIdx.x, stride = blockDim.x and reduce the partial
// results across the block, while the CPU runs the same parts with begin = 0, stride = 1 (the
// *_row helpers below). Only the order of the final additions differs between the two.
#pragma once

#include "common/host_device.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moesim::exec::kernels {

// ---- bf16 <-> fp32 -------------------------------------------------------------------------
// bf16 is the upper half of an IEEE-754 binary32: 1 sign, 8 exponent, 7 mantissa bits. Stored as
// raw uint16_t bits.

MOESIM_HOST_DEVICE inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MOESIM_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate. A carry
// out of the mantissa bumps the exponent, so the largest finite values round to infinity as IEEE
// requires. NaN stays NaN (quieted, sign kept) instead of rounding to infinity.
MOESIM_HOST_DEVICE inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

// Exact: every bf16 value is an fp32 value.
MOESIM_HOST_DEVICE inline float bf16_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// ---- GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. in sec. 2) -----------------------
//   gelu(x)  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

inline constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
inline constexpr float kGeluCubic = 0.044715f;

MOESIM_HOST_DEVICE inline float gelu(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.0f + tanhf(u));
}

MOESIM_HOST_DEVICE inline float gelu_grad(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  const float t = tanhf(u);
  const float du_dx = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du_dx;
}

// ---- softmax over a row ----------------------------------------------------------------------
//   y_j = exp(x_j - m) / sum_i exp(x_i - m),  m = max_i x_i
// Subtracting the row maximum keeps every exponent <= 0: no overflow for large inputs, and the
// largest term is exactly 1, so the sum is >= 1 (no division by zero or underflow to 0/0).

MOESIM_HOST_DEVICE inline float row_max_part(const float* x, int64_t cols, int64_t begin, int64_t stride) {
  float m = -INFINITY;
  for (int64_t j = begin; j < cols; j += stride) m = fmaxf(m, x[j]);
  return m;
}

MOESIM_HOST_DEVICE inline float softmax_exp_sum_part(const float* x, float row_max, int64_t cols, int64_t begin,
                                                     int64_t stride) {
  float s = 0.0f;
  for (int64_t j = begin; j < cols; j += stride) s += expf(x[j] - row_max);
  return s;
}

MOESIM_HOST_DEVICE inline void softmax_write_part(const float* x, float row_max, float exp_sum, float* y,
                                                  int64_t cols, int64_t begin, int64_t stride) {
  const float inv_sum = 1.0f / exp_sum;
  for (int64_t j = begin; j < cols; j += stride) y[j] = expf(x[j] - row_max) * inv_sum;
}

MOESIM_HOST_DEVICE inline void softmax_row(const float* x, float* y, int64_t cols) {
  const float m = row_max_part(x, cols, 0, 1);
  const float s = softmax_exp_sum_part(x, m, cols, 0, 1);
  softmax_write_part(x, m, s, y, cols, 0, 1);
}

// ---- layer normalisation over a row (Ba, Kiros & Hinton 2016) --------------------------------
// Forward, with C = cols:
//   mean = sum_j x_j / C,  var = sum_j (x_j - mean)^2 / C  (biased; two passes, so a large mean
//   does not cancel catastrophically as E[x^2] - E[x]^2 would),  rstd = 1 / sqrt(var + eps)
//   xhat_j = (x_j - mean) rstd,  y_j = gamma_j xhat_j + beta_j
// Backward, with g_j = gamma_j dy_j (the gradient reaching xhat):
//   dx_j = rstd (g_j - mean_i(g_i) - xhat_j mean_i(g_i xhat_i))
//   dgamma_j += sum over rows of dy_j xhat_j,  dbeta_j += sum over rows of dy_j

MOESIM_HOST_DEVICE inline float row_sum_part(const float* x, int64_t cols, int64_t begin, int64_t stride) {
  float s = 0.0f;
  for (int64_t j = begin; j < cols; j += stride) s += x[j];
  return s;
}

MOESIM_HOST_DEVICE inline float row_sq_dev_sum_part(const float* x, float mean, int64_t cols, int64_t begin,
                                                    int64_t stride) {
  float s = 0.0f;
  for (int64_t j = begin; j < cols; j += stride) {
    const float d = x[j] - mean;
    s += d * d;
  }
  return s;
}

MOESIM_HOST_DEVICE inline float layernorm_rstd(float sq_dev_sum, int64_t cols, float eps) {
  return 1.0f / sqrtf(sq_dev_sum / static_cast<float>(cols) + eps);
}

MOESIM_HOST_DEVICE inline void layernorm_apply_part(const float* x, const float* gamma, const float* beta, float mean,
                                                    float rstd, float* y, int64_t cols, int64_t begin,
                                                    int64_t stride) {
  for (int64_t j = begin; j < cols; j += stride) y[j] = (x[j] - mean) * rstd * gamma[j] + beta[j];
}

// a * b rounded to fp32, never fused into a following add. nvcc contracts `a * b - c` into
// fma(a, b, -c) by default, which subtracts c from the unrounded product: in the backward pass
// below, g_j - mean_i(g_i) then misses the exact cancellation it has when every g_j equals the
// mean (cols = 1: dx must be 0, not rstd times g's rounding error, ~1.6e-5 at eps = 1e-5). The
// host build does not contract (ISO C++ mode, no -ffp-contract=fast).
MOESIM_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Partial sums of g_j and g_j xhat_j for the backward pass.
MOESIM_HOST_DEVICE inline void layernorm_backward_sums_part(const float* x, const float* gamma, const float* dy,
                                                            float mean, float rstd, int64_t cols, int64_t begin,
                                                            int64_t stride, float* sum_g, float* sum_g_xhat) {
  float sg = 0.0f, sgx = 0.0f;
  for (int64_t j = begin; j < cols; j += stride) {
    const float g = mul_rn(gamma[j], dy[j]);
    sg += g;
    sgx += g * (x[j] - mean) * rstd;
  }
  *sum_g = sg;
  *sum_g_xhat = sgx;
}

MOESIM_HOST_DEVICE inline void layernorm_backward_dx_part(const float* x, const float* gamma, const float* dy,
                                                          float mean, float rstd, float sum_g, float sum_g_xhat,
                                                          float* dx, int64_t cols, int64_t begin, int64_t stride) {
  const float mean_g = sum_g / static_cast<float>(cols);
  const float mean_g_xhat = sum_g_xhat / static_cast<float>(cols);
  for (int64_t j = begin; j < cols; j += stride) {
    const float xhat = (x[j] - mean) * rstd;
    const float g = mul_rn(gamma[j], dy[j]);  // the same rounded g the sums saw
    dx[j] = rstd * (g - mean_g - xhat * mean_g_xhat);
  }
}

// One row's term of dgamma_j and dbeta_j, added to running sums. Both back ends sum the rows in
// row order into a zeroed accumulator and then add it to dgamma_j, dbeta_j (deterministic; the
// CPU walks the rows in memory order, CUDA runs one thread per column).
MOESIM_HOST_DEVICE inline void layernorm_param_grads_add(float x, float dy, float mean, float rstd, float* dgamma_sum,
                                                         float* dbeta_sum) {
  *dgamma_sum += dy * (x - mean) * rstd;
  *dbeta_sum += dy;
}

MOESIM_HOST_DEVICE inline void layernorm_row(const float* x, const float* gamma, const float* beta, float* y,
                                             float* mean_out, float* rstd_out, int64_t cols, float eps) {
  const float mean = row_sum_part(x, cols, 0, 1) / static_cast<float>(cols);
  const float rstd = layernorm_rstd(row_sq_dev_sum_part(x, mean, cols, 0, 1), cols, eps);
  layernorm_apply_part(x, gamma, beta, mean, rstd, y, cols, 0, 1);
  if (mean_out) *mean_out = mean;
  if (rstd_out) *rstd_out = rstd;
}

MOESIM_HOST_DEVICE inline void layernorm_backward_row(const float* x, const float* gamma, float mean, float rstd,
                                                      const float* dy, float* dx, int64_t cols) {
  float sum_g = 0.0f, sum_g_xhat = 0.0f;
  layernorm_backward_sums_part(x, gamma, dy, mean, rstd, cols, 0, 1, &sum_g, &sum_g_xhat);
  layernorm_backward_dx_part(x, gamma, dy, mean, rstd, sum_g, sum_g_xhat, dx, cols, 0, 1);
}

}  // namespace moesim::exec::kernels
