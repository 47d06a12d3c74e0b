// The CPU back end: the reference every CUDA kernel is tested against. GEMMs go to OpenBLAS;
// everything else is a plain loop over kernels.h.
#include "executor/backend.h"
#include "executor/error.h"
#include "executor/kernels.h"

#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace moesim::exec {

namespace {

// Row-major leading dimensions of op(A)[m,k] and op(B)[k,n] as stored; BLAS wants them >= 1
// even when a dimension is 0.
int64_t lead_a(bool trans_a, int64_t m, int64_t k) { return std::max<int64_t>(1, trans_a ? m : k); }
int64_t lead_b(bool trans_b, int64_t k, int64_t n) { return std::max<int64_t>(1, trans_b ? k : n); }

void check_blas_int(int64_t m, int64_t n, int64_t k) {
  // OpenBLAS's cblas interface takes 32-bit ints (blasint) in the Debian build.
  constexpr int64_t kMax = static_cast<int64_t>(std::numeric_limits<blasint>::max());
  if (m > kMax || n > kMax || k > kMax || m < 0 || n < 0 || k < 0)
    throw Error(fmt::format("gemm: dimensions m={} n={} k={} out of range for OpenBLAS ({} at most)", m, n, k, kMax));
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) {
    if (threads > 0) openblas_set_num_threads(threads);
  }

  Device device() const override { return Device::kCpu; }

  std::string name() const override {
    const int threads = openblas_get_num_threads();
    return fmt::format("cpu (OpenBLAS, {} thread{})", threads, threads == 1 ? "" : "s");
  }

  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
            const float* b, float beta, float* c) override {
    check_blas_int(m, n, k);
    if (m == 0 || n == 0) return;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
                static_cast<blasint>(lead_a(trans_a, m, k)), b, static_cast<blasint>(lead_b(trans_b, k, n)), beta, c,
                static_cast<blasint>(std::max<int64_t>(1, n)));
  }

  void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                 const uint16_t* b, float beta, float* c) override {
    const std::vector<float> a32 = widen(a, m * k);
    const std::vector<float> b32 = widen(b, k * n);
    gemm(trans_a, trans_b, m, n, k, alpha, a32.data(), b32.data(), beta, c);
  }

  void gelu(const float* x, float* y, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) y[i] = kernels::gelu(x[i]);
  }

  void gelu_backward(const float* x, const float* dy, float* dx, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * kernels::gelu_grad(x[i]);
  }

  void softmax_rows(const float* x, float* y, int64_t rows, int64_t cols) override {
    for (int64_t r = 0; r < rows; ++r) kernels::softmax_row(x + r * cols, y + r * cols, cols);
  }

  void add(const float* a, const float* b, float* y, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
  }

  void axpy(float alpha, const float* x, float* y, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
  }

  void layernorm(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                 int64_t rows, int64_t cols, float eps) override {
    for (int64_t r = 0; r < rows; ++r)
      kernels::layernorm_row(x + r * cols, gamma, beta, y + r * cols, mean ? mean + r : nullptr,
                             rstd ? rstd + r : nullptr, cols, eps);
  }

  void layernorm_backward(const float* x, const float* gamma, const float* mean, const float* rstd, const float* dy,
                          float* dx, float* dgamma, float* dbeta, int64_t rows, int64_t cols) override {
    std::vector<float> dgamma_sum(static_cast<size_t>(cols), 0.0f), dbeta_sum(static_cast<size_t>(cols), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * cols;
      const float* dyr = dy + r * cols;
      kernels::layernorm_backward_row(xr, gamma, mean[r], rstd[r], dyr, dx + r * cols, cols);
      for (int64_t j = 0; j < cols; ++j)
        kernels::layernorm_param_grads_add(xr[j], dyr[j], mean[r], rstd[r], &dgamma_sum[static_cast<size_t>(j)],
                                           &dbeta_sum[static_cast<size_t>(j)]);
    }
    for (int64_t j = 0; j < cols; ++j) {
      dgamma[j] += dgamma_sum[static_cast<size_t>(j)];
      dbeta[j] += dbeta_sum[static_cast<size_t>(j)];
    }
  }

  void add_bias(float* y, const float* bias, int64_t rows, int64_t cols) override {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) y[r * cols + c] += bias[c];
  }

  void repeat_row(const float* row, float* y, int64_t rows, int64_t cols) override {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * cols, row, sizeof(float) * static_cast<size_t>(cols));
  }

  void column_sums_add(const float* x, float* sums, int64_t rows, int64_t cols) override {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) sums[c] += x[r * cols + c];
  }

  void gather_rows(const float* src, const int32_t* index, float* dst, int64_t rows, int64_t cols) override {
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(dst + i * cols, src + static_cast<int64_t>(index[i]) * cols, sizeof(float) * static_cast<size_t>(cols));
  }

  void scatter_add_rows(const float* src, const int32_t* index, const int32_t* /*plan*/, int64_t /*groups*/, float* dst,
                        int64_t rows, int64_t cols) override {
    for (int64_t i = 0; i < rows; ++i) {
      float* d = dst + static_cast<int64_t>(index[i]) * cols;
      for (int64_t c = 0; c < cols; ++c) d[c] += src[i * cols + c];
    }
  }

  void gather_sum_rows(const float* src, const int32_t* slot, const float* weight, float* dst, int64_t tokens, int k,
                       int64_t cols) override {
    // Row by row (each kept choice's row added over the whole destination row, in j order, so every
    // element sums exactly as combine_element does): the loops over columns vectorise, where one
    // element at a time re-read the slots and took 3x longer.
    for (int64_t t = 0; t < tokens; ++t) {
      float* y = dst + t * cols;
      std::fill(y, y + cols, 0.0f);
      for (int j = 0; j < k; ++j) {
        const int64_t a = t * k + j;
        if (slot[a] < 0) continue;
        const float* o = src + static_cast<int64_t>(slot[a]) * cols;
        if (weight) {
          const float w = weight[a];
          for (int64_t c = 0; c < cols; ++c) y[c] += kernels::mul_rn(w, o[c]);
        } else {
          for (int64_t c = 0; c < cols; ++c) y[c] += o[c];
        }
      }
    }
  }

  void gather_sum_rows_backward(const float* dy, const float* src, const int32_t* slot, const float* weight,
                                float* grad_src, float* dweight, int64_t tokens, int k, int64_t cols) override {
    for (int64_t a = 0; a < tokens * k; ++a) {
      if (slot[a] < 0) {
        dweight[a] = 0.0f;
        continue;
      }
      const int64_t row = static_cast<int64_t>(slot[a]) * cols;
      dweight[a] =
          static_cast<float>(kernels::combine_backward_row(dy + (a / k) * cols, src + row, weight[a], grad_src + row, cols));
    }
  }

  // Rows of d stay whole under the permutation: one index per row, not per element (the per-element
  // divisions took each of these 11% of moe-tiny's step).
  void split_heads(const float* x, float* y, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) override {
    const int64_t rows = B * S * G * H;
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(x + kernels::heads_source_index(r * d, B, S, G, H, d), d, y + r * d);
  }

  void merge_heads(const float* y, float* x, int64_t B, int64_t S, int64_t G, int64_t H, int64_t d) override {
    const int64_t rows = B * S * G * H;
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(y + r * d, d, x + kernels::heads_source_index(r * d, B, S, G, H, d));
  }

  void causal_mask(float* x, int64_t batches, int64_t S) override {
    const int64_t n = batches * S * S;
    for (int64_t i = 0; i < n; ++i)
      if (kernels::causal_masked(i, S)) x[i] = -std::numeric_limits<float>::infinity();
  }

  void softmax_backward_rows(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols) override {
    for (int64_t r = 0; r < rows; ++r) {
      const float dot = kernels::dot_part(y + r * cols, dy + r * cols, cols, 0, 1);
      kernels::softmax_backward_write_part(y + r * cols, dy + r * cols, dot, dx + r * cols, cols, 0, 1);
    }
  }

  void cross_entropy(const float* logits, const int32_t* targets, float* dlogits, double* row_loss, int64_t rows,
                     int64_t V, double grad_scale) override {
    // Each exponential once: kept from the sum for the gradient (computing them again made moe-tiny's
    // head forward 1.4x as long), summed in ce_exp_sum_part's order, so the results are the same bits.
    std::vector<double> e(static_cast<size_t>(V));
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = logits + r * V;
      const double m = kernels::row_max_part(z, V, 0, 1);
      double sum = 0.0;
      for (int64_t v = 0; v < V; ++v) sum += (e[static_cast<size_t>(v)] = std::exp(static_cast<double>(z[v]) - m));
      row_loss[r] = kernels::ce_row_loss(z, m, sum, targets[r]);
      float* dz = dlogits + r * V;
      for (int64_t v = 0; v < V; ++v) dz[v] = kernels::ce_grad_element(e[static_cast<size_t>(v)], sum, v == targets[r], grad_scale);
    }
  }

  void scale(float alpha, float* x, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
  }

  void gate_noise(const float* logits, float* noisy, int64_t tokens, int experts, uint64_t key, uint64_t step,
                  int64_t token_offset, float sigma) override {
    for (int64_t t = 0; t < tokens; ++t)
      for (int e = 0; e < experts; ++e)
        noisy[t * experts + e] =
            logits[t * experts + e] + kernels::mul_rn(sigma, kernels::gate_noise_sample(key, step, token_offset + t, e));
  }

  void router_backward(const kernels::RouterBackward& args) override {
    for (int64_t t = 0; t < args.tokens; ++t) kernels::router_backward_token(args, t);
  }

  void sgd_step(float* param, const float* grad, float* velocity, int64_t n, const kernels::SgdHyper& h) override {
    for (int64_t i = 0; i < n; ++i) kernels::sgd_update(param + i, grad[i], velocity + i, h);
  }

  void adam_step(float* param, const float* grad, float* m, float* v, int64_t n, const kernels::AdamHyper& h) override {
    for (int64_t i = 0; i < n; ++i) kernels::adam_update(param + i, grad[i], m + i, v + i, h);
  }

  void copy(const void* src, void* dst, size_t bytes) override {
    if (bytes > 0) std::memmove(dst, src, bytes);
  }

  void synchronize() override {}

 private:
  static std::vector<float> widen(const uint16_t* p, int64_t n) {
    std::vector<float> out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = kernels::bf16_to_f32(p[i]);
    return out;
  }
};

}  // namespace

ScatterPlan scatter_add_plan(const int32_t* index, size_t count) {
  ScatterPlan plan;
  plan.rows = static_cast<int64_t>(count);
  // The rows by destination, stably: counting them when the destinations are few against the rows
  // (a vocabulary of 64: moe-tiny's), else sorting (destination, row) keys.
  const int32_t most = count == 0 ? -1 : *std::max_element(index, index + count);
  std::vector<int32_t> sorted(count);
  if (static_cast<size_t>(most) < 8 * count + 64) {
    std::vector<int32_t> next(static_cast<size_t>(most) + 2, 0);
    for (size_t i = 0; i < count; ++i) ++next[static_cast<size_t>(index[i]) + 1];
    for (size_t d = 1; d < next.size(); ++d) next[d] += next[d - 1];
    for (size_t i = 0; i < count; ++i)
      sorted[static_cast<size_t>(next[static_cast<size_t>(index[i])]++)] = static_cast<int32_t>(i);
  } else {
    std::vector<uint64_t> keys(count);
    for (size_t i = 0; i < count; ++i) keys[i] = static_cast<uint64_t>(static_cast<uint32_t>(index[i])) << 32 | i;
    std::sort(keys.begin(), keys.end());
    for (size_t j = 0; j < count; ++j) sorted[j] = static_cast<int32_t>(keys[j] & 0xffffffffu);
  }
  std::vector<int32_t> dst_row, begin;
  for (size_t j = 0; j < count; ++j)
    if (j == 0 || index[sorted[j]] != index[sorted[j - 1]]) {
      dst_row.push_back(index[sorted[j]]);
      begin.push_back(static_cast<int32_t>(j));
    }
  begin.push_back(static_cast<int32_t>(count));
  plan.groups = static_cast<int64_t>(dst_row.size());
  plan.packed = std::move(sorted);
  plan.packed.insert(plan.packed.end(), dst_row.begin(), dst_row.end());
  plan.packed.insert(plan.packed.end(), begin.begin(), begin.end());
  return plan;
}

std::unique_ptr<Backend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

Backend& default_cpu_backend() {
  static CpuBackend backend(0);
  return backend;
}

}  // namespace moesim::exec
