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

// tanh(u) = 1 - 2 / (exp(2u) + 1): one expf, whose cost does not depend on u. glibc's tanhf
// takes 13 ns per call near 0 and 25 ns at |u| ~ 1 on the development VM, so GELU's time
// followed its inputs' spread and no calibration on other data could predict it. exp(2u)
// overflowing to inf gives 1, underflowing to 0 gives -1; the absolute error stays within a
// few float ulps of 1, which is what 1 + tanh(u) and 1 - tanh(u)^2 need.
MOESIM_HOST_DEVICE inline float tanh_by_exp(float u) { return 1.0f - 2.0f / (expf(2.0f * u) + 1.0f); }

MOESIM_HOST_DEVICE inline float gelu(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.0f + tanh_by_exp(u));
}

MOESIM_HOST_DEVICE inline float gelu_grad(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  const float t = tanh_by_exp(u);
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

// One thread's row (the CPU back end): each exponential once, kept in y and then scaled (the
// parts above recompute it, which is cheaper than a second pass over memory on a GPU; on a CPU
// the expf dominates). The same values as the parts: y_j = expf(x_j - m) * (1 / sum). x may be y.
MOESIM_HOST_DEVICE inline void softmax_row(const float* x, float* y, int64_t cols) {
  const float m = row_max_part(x, cols, 0, 1);
  float s = 0.0f;
  for (int64_t j = 0; j < cols; ++j) {
    y[j] = expf(x[j] - m);
    s += y[j];
  }
  const float inv_sum = 1.0f / s;
  for (int64_t j = 0; j < cols; ++j) y[j] *= inv_sum;
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

// ---- index maps of the gathers, scatters and attention heads ---------------------------------

// Attention heads: x [B, S, G, H, d] (a token's G groups of H heads of d values: [Q | K | V] with
// G = 3, or O with G = 1) <-> y [G, B, H, S, d] (per group, head-major rows for the per-head GEMMs).
// Element i of y comes from element heads_source_index(i) of x.
MOESIM_HOST_DEVICE inline int64_t heads_source_index(int64_t i, int64_t B, int64_t S, int64_t G, int64_t H,
                                                    int64_t d) {
  const int64_t e = i % d;
  int64_t r = i / d;
  const int64_t s = r % S;
  r /= S;
  const int64_t h = r % H;
  r /= H;
  const int64_t b = r % B;
  const int64_t g = r / B;
  return (((b * S + s) * G + g) * H + h) * d + e;
}

// Element i of x [batches, S, S] lies above the diagonal (key u after query t): masked by -inf.
MOESIM_HOST_DEVICE inline bool causal_masked(int64_t i, int64_t S) { return i % S > (i / S) % S; }

// ---- softmax backward over a row ---------------------------------------------------------------
//   dx_j = y_j (dy_j - sum_i y_i dy_i)
// (y = softmax(x)). Masked entries (y = 0) get dx = 0. dx may alias dy: every dy is read by the
// dot product before any dx is written (the CUDA kernel reduces across the block in between).

MOESIM_HOST_DEVICE inline float dot_part(const float* a, const float* b, int64_t n, int64_t begin, int64_t stride) {
  float s = 0.0f;
  for (int64_t j = begin; j < n; j += stride) s += mul_rn(a[j], b[j]);
  return s;
}

MOESIM_HOST_DEVICE inline void softmax_backward_write_part(const float* y, const float* dy, float dot, float* dx,
                                                           int64_t cols, int64_t begin, int64_t stride) {
  for (int64_t j = begin; j < cols; j += stride) dx[j] = y[j] * (dy[j] - dot);
}

// ---- softmax cross-entropy over a row of logits z [V] with target y ----------------------------
//   loss = m + log sum_v exp(z_v - m) - z_y,  m = max_v z_v
//   dz_v = (exp(z_v - m) / sum - [v == y]) * grad_scale         (grad_scale = 1/T for a mean over T rows)
// in double from the fp32 logits (the sum of V exponentials keeps its digits for large V).

MOESIM_HOST_DEVICE inline double ce_exp_sum_part(const float* z, double m, int64_t V, int64_t begin, int64_t stride) {
  double s = 0.0;
  for (int64_t v = begin; v < V; v += stride) s += exp(static_cast<double>(z[v]) - m);
  return s;
}

MOESIM_HOST_DEVICE inline double ce_row_loss(const float* z, double m, double exp_sum, int32_t y) {
  return m + log(exp_sum) - static_cast<double>(z[y]);
}

// dz_v from its exponential exp(z_v - m) (the CPU keeps a row's exponentials from the sum; a GPU
// thread computes its own again).
MOESIM_HOST_DEVICE inline float ce_grad_element(double exp_zv, double exp_sum, bool target, double grad_scale) {
  return static_cast<float>((exp_zv / exp_sum - (target ? 1.0 : 0.0)) * grad_scale);
}

MOESIM_HOST_DEVICE inline void ce_grad_part(const float* z, double m, double exp_sum, int32_t y, double grad_scale,
                                            float* dz, int64_t V, int64_t begin, int64_t stride) {
  for (int64_t v = begin; v < V; v += stride)
    dz[v] = ce_grad_element(exp(static_cast<double>(z[v]) - m), exp_sum, v == y, grad_scale);
}

// ---- MoE combine and its backward ---------------------------------------------------------------
// combine:  y[t] = sum over kept choices j (slot >= 0), in j order from 0, of w_tj * out[slot_tj]
// backward: d out[slot_tj] = w_tj dy[t],  d w_tj = dy[t] . out[slot_tj] (in double)

MOESIM_HOST_DEVICE inline float combine_element(const float* src, const int32_t* slot, const float* weight,
                                                int64_t t, int k, int64_t cols, int64_t c) {
  float acc = 0.0f;
  for (int j = 0; j < k; ++j) {
    const int64_t a = t * k + j;
    if (slot[a] < 0) continue;
    const float o = src[static_cast<int64_t>(slot[a]) * cols + c];
    acc += weight ? mul_rn(weight[a], o) : o;
  }
  return acc;
}

// Writes grad_src's row for one assignment over its part of the columns; returns the part's dot.
MOESIM_HOST_DEVICE inline double combine_backward_part(const float* dy_row, const float* src_row, float w,
                                                       float* grad_row, int64_t cols, int64_t begin, int64_t stride) {
  double dot = 0.0;
  for (int64_t c = begin; c < cols; c += stride) {
    dot += static_cast<double>(dy_row[c]) * static_cast<double>(src_row[c]);
    grad_row[c] = w * dy_row[c];
  }
  return dot;
}

// The same over a whole row (the CPU's kernel): the dot in kCombineDotLanes interleaved partial sums
// (lane i takes columns i, i + 8, ...), added pairwise at the end. One chain of double adds, as a
// single combine_backward_part(0, 1) runs it, waits out the add's latency at every column: moe-tiny's
// combine backward took 8 us with it on a warm cache, 3.8 with the lanes (its forward takes 1.6).
inline constexpr int kCombineDotLanes = 8;
MOESIM_HOST_DEVICE inline double combine_backward_row(const float* dy_row, const float* src_row, float w,
                                                      float* grad_row, int64_t cols) {
  double lane[kCombineDotLanes] = {};
  int64_t c = 0;
  for (; c + kCombineDotLanes <= cols; c += kCombineDotLanes)
    for (int i = 0; i < kCombineDotLanes; ++i) {
      lane[i] += static_cast<double>(dy_row[c + i]) * static_cast<double>(src_row[c + i]);
      grad_row[c + i] = w * dy_row[c + i];
    }
  for (int i = 0; c < cols; ++c, ++i) {
    lane[i] += static_cast<double>(dy_row[c]) * static_cast<double>(src_row[c]);
    grad_row[c] = w * dy_row[c];
  }
  static_assert(kCombineDotLanes == 8, "the pairwise sum adds eight lanes");
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// ---- counter-based random numbers (the MoE gate noise) ------------------------------------------
// Every value is a hash of (stream key, index), so it does not depend on how many were drawn
// before it or on which rank (or thread) draws it.

MOESIM_HOST_DEVICE inline uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
MOESIM_HOST_DEVICE inline uint64_t hash2(uint64_t key, uint64_t index) {
  return mix64(key ^ mix64(index + 0x632BE59BD9B4E019ull));
}
MOESIM_HOST_DEVICE inline double unit_open(uint64_t h) {  // (0, 1)
  return (static_cast<double>(h >> 11) + 0.5) * 0x1.0p-53;
}

inline constexpr double kPi = 3.14159265358979323846;

// eps ~ N(0, 1) for logit `expert` of global token `token` in step `step` (Box-Muller on two
// hashed uniforms). The CUDA and C libraries' log/cos may differ in the last bits of the double,
// which moves the fp32 result only when it lies on a rounding boundary.
MOESIM_HOST_DEVICE inline float gate_noise_sample(uint64_t key, uint64_t step, int64_t token, int expert) {
  const uint64_t row = hash2(hash2(key, step), static_cast<uint64_t>(token));
  const double u1 = unit_open(hash2(row, 2 * static_cast<uint64_t>(expert)));
  const double u2 = unit_open(hash2(row, 2 * static_cast<uint64_t>(expert) + 1));
  return static_cast<float>(sqrt(-2 * log(u1)) * cos(2 * kPi * u2));
}

// ---- the MoE router's backward pass, per token ----------------------------------------------------
// From d(gate weight) of the token's k choices and the aux losses' coefficients to d(logits):
//   dp_e = dp_const_e + [e = c_j] (dgate_j                           without renormalisation,
//                                  (dgate_j - sum_i dgate_i w_i) / sum_i p_{c_i}   with it)
//   dz_e = p_e (dp_e - sum_i p_i dp_i)                               (softmax backward)
//        + damex_coef (p_e - [e = h(dataset)])                       (tokens with a DAMEX label)
//        + load_coef_e phi((logit_e - eta) / sigma) / sigma          (load loss, noisy gate)
//   dz_{c_k} -= sum_e of the load terms                              (through eta, the k-th noisy logit)
// In double, rounded to fp32 once per term as the CPU layer always did.
struct RouterBackward {
  const float* probs = nullptr;          // p [T, E]
  const int32_t* choice = nullptr;       // c [T, k]
  const float* dgate = nullptr;          // [T, k]
  const float* gate_w = nullptr;         // w [T, k]
  const double* dp_const = nullptr;      // [E]: d(switch + importance losses)/dp_e, the same for every token
  bool renormalize = false;
  const int32_t* dataset = nullptr;      // [T]: -1 or a dataset id; null: none
  const int32_t* damex_expert = nullptr; // h(d)
  double damex_coef = 0;                 // damex weight / labelled tokens of the group
  const double* load_coef = nullptr;     // [E]: load weight * d CV^2 / d L_e; null: no load term
  const float* logits = nullptr;         // clean g [T, E] (load term)
  const float* eta = nullptr;            // [T] (load term)
  double sigma = 1;                      // noise scale (load term)
  float* dlogits = nullptr;              // out: [T, E]
  int64_t tokens = 0;
  int experts = 0;
  int k = 1;
};

MOESIM_HOST_DEVICE inline void router_backward_token(const RouterBackward& a, int64_t t) {
  const int E = a.experts, k = a.k;
  const float* p = a.probs + t * E;
  const int32_t* c = a.choice + t * k;
  const float* dg = a.dgate + t * k;
  float* dz = a.dlogits + t * E;
  double sum = 0, dot = 0;
  if (a.renormalize)
    for (int j = 0; j < k; ++j) {
      sum += p[c[j]];
      dot += static_cast<double>(dg[j]) * a.gate_w[t * k + j];
    }
  // dp_e, recomputed wherever needed: the k choices are distinct experts.
  auto dp = [&](int e) {
    double v = a.dp_const[e];
    for (int j = 0; j < k; ++j)
      if (c[j] == e) v += a.renormalize ? (dg[j] - dot) / sum : static_cast<double>(dg[j]);
    return v;
  };
  double pdp = 0;
  for (int e = 0; e < E; ++e) pdp += p[e] * dp(e);
  for (int e = 0; e < E; ++e) dz[e] = static_cast<float>(p[e] * (dp(e) - pdp));
  const int d = a.dataset ? a.dataset[t] : -1;
  if (d >= 0 && a.damex_coef > 0) {
    const int h = a.damex_expert[d];
    for (int e = 0; e < E; ++e) dz[e] += static_cast<float>(a.damex_coef * (p[e] - (e == h ? 1.0 : 0.0)));
  }
  if (a.load_coef) {
    double to_eta = 0;
    for (int e = 0; e < E; ++e) {
      const double u = (a.logits[t * E + e] - a.eta[t]) / a.sigma;
      const double v = a.load_coef[e] * (exp(-0.5 * u * u) / sqrt(2 * kPi)) / a.sigma;
      dz[e] += static_cast<float>(v);
      to_eta += v;
    }
    dz[c[k - 1]] -= static_cast<float>(to_eta);
  }
}

// ---- optimizers, per element (executor/optimizer.h has the formulas) ------------------------------
// Every product that feeds an add is rounded first (mul_rn), so CUDA computes the same bits as the
// CPU.

struct SgdHyper {
  float lr = 0, momentum = 0, weight_decay = 0;
  bool nesterov = false;
};

MOESIM_HOST_DEVICE inline void sgd_update(float* p, float grad, float* velocity, const SgdHyper& h) {
  const float g = grad + mul_rn(h.weight_decay, *p);
  *velocity = mul_rn(h.momentum, *velocity) + g;
  *p = *p - mul_rn(h.lr, h.nesterov ? g + mul_rn(h.momentum, *velocity) : *velocity);
}

struct AdamHyper {
  float step_size = 0;  // lr / (1 - beta1^t)
  float bc2_sqrt = 1;   // sqrt(1 - beta2^t)
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float decay = 1;  // 1 - lr wd (AdamW) or 1
  float l2 = 0;     // wd (Adam with an L2 term) or 0
};

MOESIM_HOST_DEVICE inline void adam_update(float* p, float grad, float* m, float* v, const AdamHyper& h) {
  const float g = grad + mul_rn(h.l2, *p);
  *p = mul_rn(*p, h.decay);
  *m = mul_rn(h.beta1, *m) + mul_rn(1.0f - h.beta1, g);
  *v = mul_rn(h.beta2, *v) + mul_rn(mul_rn(1.0f - h.beta2, g), g);
  *p = *p - mul_rn(h.step_size, *m) / (sqrtf(*v) / h.bc2_sqrt + h.eps);
}

}  // namespace moesim::exec::kernels
