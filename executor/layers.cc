#include "executor/layers.h"

#include "common/error.h"
#include "executor/error.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <utility>

namespace moesim::exec {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t fnv1a64(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

Tensor zeros_like(const Tensor& t) { return Tensor::zeros(t.shape()); }

std::string shape_str(const Tensor& t) { return t.describe(); }

// Rows of a [..., cols] tensor.
int64_t rows_of(const Tensor& t, int64_t cols, const std::string& who) {
  MOESIM_ASSERT(t.rank() >= 1 && t.dim(t.rank() - 1) == cols, "{}: expected a [..., {}] tensor, got {}", who, cols,
                shape_str(t));
  return t.numel() / cols;
}

void check_same_shape(const Tensor& a, const Tensor& b, const std::string& who) {
  MOESIM_ASSERT(a.shape() == b.shape(), "{}: shapes differ: {} vs {}", who, shape_str(a), shape_str(b));
}

std::vector<int64_t> with_last(std::vector<int64_t> shape, int64_t last) {
  shape.back() = last;
  return shape;
}

}  // namespace

// ---- Randomness ------------------------------------------------------------------------------

uint64_t derive_seed(uint64_t seed, std::string_view name) { return splitmix64(seed ^ splitmix64(fnv1a64(name))); }

double Rng::uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  if (has_spare_normal_) {
    has_spare_normal_ = false;
    return spare_normal_;
  }
  const double u1 = 1.0 - uniform();  // (0, 1]: log(u1) is finite
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = 2.0 * std::numbers::pi * u2;
  spare_normal_ = r * std::sin(theta);
  has_spare_normal_ = true;
  return r * std::cos(theta);
}

void Rng::fill_uniform(Tensor& t, float lo, float hi) {
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(lo + (static_cast<double>(hi) - lo) * uniform());
}

void Rng::fill_normal(Tensor& t, float mean, float std) {
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(mean + static_cast<double>(std) * normal());
}

// ---- Parameter registry ----------------------------------------------------------------------

const char* param_sharing_name(ParamSharing s) {
  switch (s) {
    case ParamSharing::kReplicated: return "replicated";
    case ParamSharing::kLocal: return "local";
  }
  return "?";
}

void ParamRegistry::add(std::string name, Tensor value, Tensor grad, ParamSharing sharing) {
  MOESIM_ASSERT(find(name) == nullptr, "parameter '{}' registered twice", name);
  MOESIM_ASSERT(value.numel() > 0, "parameter '{}' is empty", name);
  MOESIM_ASSERT(value.shape() == grad.shape(), "parameter '{}': value {} but gradient {}", name, value.describe(),
                grad.describe());
  params_.push_back(Param{std::move(name), std::move(value), std::move(grad), sharing});
}

const Param* ParamRegistry::find(std::string_view name) const {
  for (const Param& p : params_)
    if (p.name == name) return &p;
  return nullptr;
}

int64_t ParamRegistry::numel() const {
  int64_t n = 0;
  for (const Param& p : params_) n += p.value.numel();
  return n;
}

int64_t ParamRegistry::numel(ParamSharing sharing) const {
  int64_t n = 0;
  for (const Param& p : params_)
    if (p.sharing == sharing) n += p.value.numel();
  return n;
}

void ParamRegistry::zero_grad() {
  for (Param& p : params_) std::fill_n(p.grad.f32(), p.grad.numel(), 0.0f);
}

// ---- Linear ----------------------------------------------------------------------------------

Linear::Linear(Backend& backend, std::string name, int64_t in_features, int64_t out_features, uint64_t seed,
               LinearOptions options)
    : backend_(&backend), name_(std::move(name)), in_(in_features), out_(out_features), has_bias_(options.bias) {
  MOESIM_ASSERT(in_ > 0 && out_ > 0, "{}: bad shape {} x {}", name_, in_, out_);
  weight_ = Tensor::zeros({in_, out_});
  dweight_ = Tensor::zeros({in_, out_});
  Rng(derive_seed(seed, name_ + ".weight")).fill_normal(weight_, 0.0f, options.init_std);
  if (has_bias_) {
    bias_ = Tensor::zeros({out_});
    dbias_ = Tensor::zeros({out_});
  }
}

Tensor Linear::forward(const Tensor& x) {
  const int64_t rows = rows_of(x, in_, name_);
  x_ = x;
  Tensor y = Tensor::empty(with_last(x.shape(), out_));
  float* yp = y.f32();
  backend_->gemm(false, false, rows, out_, in_, 1.0f, x.f32(), weight_.f32(), 0.0f, yp);
  if (has_bias_)
    for (int64_t r = 0; r < rows; ++r) backend_->axpy(1.0f, bias_.f32(), yp + r * out_, out_);
  return y;
}

Tensor Linear::backward(const Tensor& dy) {
  const int64_t rows = rows_of(dy, out_, name_);
  MOESIM_ASSERT(x_.numel() == rows * in_, "{}: backward of {} without a matching forward", name_, shape_str(dy));
  const float* dyp = dy.f32();
  backend_->gemm(true, false, in_, out_, rows, 1.0f, x_.f32(), dyp, 1.0f, dweight_.f32());
  if (has_bias_)
    for (int64_t r = 0; r < rows; ++r) backend_->axpy(1.0f, dyp + r * out_, dbias_.f32(), out_);
  Tensor dx = Tensor::empty(x_.shape());
  backend_->gemm(false, true, rows, in_, out_, 1.0f, dyp, weight_.f32(), 0.0f, dx.f32());
  return dx;
}

void Linear::register_params(ParamRegistry& registry, ParamSharing sharing) {
  registry.add(name_ + ".weight", weight_, dweight_, sharing);
  if (has_bias_) registry.add(name_ + ".bias", bias_, dbias_, sharing);
}

// ---- Embedding -------------------------------------------------------------------------------

Embedding::Embedding(Backend& backend, std::string name, int64_t vocab, int64_t dim, uint64_t seed, float init_std)
    : backend_(&backend), name_(std::move(name)), vocab_(vocab), dim_(dim) {
  MOESIM_ASSERT(vocab_ > 0 && dim_ > 0, "{}: bad shape {} x {}", name_, vocab_, dim_);
  table_ = Tensor::zeros({vocab_, dim_});
  dtable_ = Tensor::zeros({vocab_, dim_});
  Rng(derive_seed(seed, name_ + ".weight")).fill_normal(table_, 0.0f, init_std);
}

Tensor Embedding::forward(std::span<const int32_t> ids) {
  for (size_t t = 0; t < ids.size(); ++t)
    if (ids[t] < 0 || ids[t] >= vocab_)
      throw Error(fmt::format("{}: token id {} at position {} is outside the vocabulary [0, {})", name_, ids[t], t,
                              vocab_));
  ids_.assign(ids.begin(), ids.end());
  const auto n = static_cast<int64_t>(ids.size());
  Tensor y = Tensor::empty({n, dim_});
  const float* table = table_.f32();
  float* yp = y.f32();
  for (int64_t t = 0; t < n; ++t)
    std::memcpy(yp + t * dim_, table + static_cast<int64_t>(ids_[t]) * dim_, sizeof(float) * dim_);
  return y;
}

void Embedding::backward(const Tensor& dy) {
  const auto n = static_cast<int64_t>(ids_.size());
  MOESIM_ASSERT(dy.numel() == n * dim_, "{}: backward of {} after a forward of {} ids", name_, shape_str(dy), n);
  const float* dyp = dy.f32();
  float* dtable = dtable_.f32();
  for (int64_t t = 0; t < n; ++t)
    backend_->axpy(1.0f, dyp + t * dim_, dtable + static_cast<int64_t>(ids_[t]) * dim_, dim_);
}

void Embedding::register_params(ParamRegistry& registry, ParamSharing sharing) {
  registry.add(name_ + ".weight", table_, dtable_, sharing);
}

// ---- LayerNorm -------------------------------------------------------------------------------

LayerNorm::LayerNorm(Backend& backend, std::string name, int64_t dim, float eps)
    : backend_(&backend), name_(std::move(name)), dim_(dim), eps_(eps) {
  MOESIM_ASSERT(dim_ > 0 && eps_ > 0, "{}: bad dim {} or eps {}", name_, dim_, eps_);
  gamma_ = Tensor::from({dim_}, std::vector<float>(static_cast<size_t>(dim_), 1.0f));
  beta_ = Tensor::zeros({dim_});
  dgamma_ = Tensor::zeros({dim_});
  dbeta_ = Tensor::zeros({dim_});
}

Tensor LayerNorm::forward(const Tensor& x) {
  const int64_t rows = rows_of(x, dim_, name_);
  x_ = x;
  mean_ = Tensor::empty({rows});
  rstd_ = Tensor::empty({rows});
  Tensor y = Tensor::empty(x.shape());
  backend_->layernorm(x.f32(), gamma_.f32(), beta_.f32(), y.f32(), mean_.f32(), rstd_.f32(), rows, dim_, eps_);
  return y;
}

Tensor LayerNorm::backward(const Tensor& dy) {
  const int64_t rows = rows_of(dy, dim_, name_);
  MOESIM_ASSERT(x_.numel() == rows * dim_, "{}: backward of {} without a matching forward", name_, shape_str(dy));
  Tensor dx = Tensor::zeros(x_.shape());
  backend_->layernorm_backward(x_.f32(), gamma_.f32(), mean_.f32(), rstd_.f32(), dy.f32(), dx.f32(), dgamma_.f32(),
                               dbeta_.f32(), rows, dim_);
  return dx;
}

void LayerNorm::register_params(ParamRegistry& registry, ParamSharing sharing) {
  registry.add(name_ + ".weight", gamma_, dgamma_, sharing);
  registry.add(name_ + ".bias", beta_, dbeta_, sharing);
}

// ---- Causal self-attention -------------------------------------------------------------------

CausalSelfAttention::CausalSelfAttention(Backend& backend, std::string name, int64_t d_model, int64_t n_heads,
                                         uint64_t seed, AttentionOptions options)
    : backend_(&backend),
      name_(std::move(name)),
      d_model_(d_model),
      n_heads_(n_heads),
      head_dim_(n_heads > 0 ? d_model / n_heads : 0),
      qkv_(backend, name_ + ".qkv", d_model, 3 * d_model, seed, LinearOptions{options.bias, options.init_std}),
      proj_(backend, name_ + ".proj", d_model, d_model, seed, LinearOptions{options.bias, options.proj_init_std}) {
  MOESIM_ASSERT(n_heads_ > 0 && d_model_ % n_heads_ == 0, "{}: d_model {} is not a multiple of {} heads", name_,
                d_model_, n_heads_);
}

Tensor CausalSelfAttention::forward(const Tensor& x) {
  MOESIM_ASSERT(x.rank() == 3 && x.dim(2) == d_model_, "{}: expected x [B, S, {}], got {}", name_, d_model_,
                shape_str(x));
  const int64_t B = x.dim(0), S = x.dim(1), D = d_model_, H = n_heads_, d = head_dim_;
  batch_ = B;
  seq_ = S;
  const Tensor qkv = qkv_.forward(x);  // [B, S, 3D]
  q_ = Tensor::empty({B, H, S, d});
  k_ = Tensor::empty({B, H, S, d});
  v_ = Tensor::empty({B, H, S, d});
  const float* src = qkv.f32();
  float* q = q_.f32();
  float* k = k_.f32();
  float* v = v_.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const float* row = src + (b * S + s) * 3 * D;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t dst = ((b * H + h) * S + s) * d;
        std::memcpy(q + dst, row + h * d, sizeof(float) * d);
        std::memcpy(k + dst, row + D + h * d, sizeof(float) * d);
        std::memcpy(v + dst, row + 2 * D + h * d, sizeof(float) * d);
      }
    }

  // Scores, causally masked, then a row softmax over all B H S rows at once.
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  Tensor scores = Tensor::empty({B, H, S, S});
  float* sc = scores.f32();
  for (int64_t bh = 0; bh < B * H; ++bh) {
    float* s_bh = sc + bh * S * S;
    backend_->gemm(false, true, S, S, d, scale, q + bh * S * d, k + bh * S * d, 0.0f, s_bh);
    for (int64_t t = 0; t < S; ++t)
      for (int64_t u = t + 1; u < S; ++u) s_bh[t * S + u] = -INFINITY;
  }
  att_ = Tensor::empty({B, H, S, S});
  float* att = att_.f32();
  backend_->softmax_rows(sc, att, B * H * S, S);

  // O = A V per head, written into the heads' columns of [B, S, D].
  Tensor o_bh = Tensor::empty({S, d});
  Tensor o = Tensor::empty({B, S, D});
  float* op = o.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      backend_->gemm(false, false, S, d, S, 1.0f, att + bh * S * S, v + bh * S * d, 0.0f, o_bh.f32());
      for (int64_t s = 0; s < S; ++s) std::memcpy(op + (b * S + s) * D + h * d, o_bh.f32() + s * d, sizeof(float) * d);
    }
  return proj_.forward(o);
}

Tensor CausalSelfAttention::backward(const Tensor& dy) {
  const int64_t B = batch_, S = seq_, D = d_model_, H = n_heads_, d = head_dim_;
  MOESIM_ASSERT(dy.rank() == 3 && dy.dim(0) == B && dy.dim(1) == S && dy.dim(2) == D,
                "{}: backward of {} after a forward of [{}, {}, {}]", name_, shape_str(dy), B, S, D);
  const Tensor d_o = proj_.backward(dy);  // [B, S, D]
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const float* dop = d_o.f32();
  const float* q = q_.f32();
  const float* k = k_.f32();
  const float* v = v_.f32();
  const float* att = att_.f32();

  Tensor dqkv = Tensor::empty({B, S, 3 * D});
  float* dqkvp = dqkv.f32();
  Tensor do_bh = Tensor::empty({S, d});
  Tensor da = Tensor::empty({S, S});
  Tensor dq = Tensor::empty({S, d}), dk = Tensor::empty({S, d}), dv = Tensor::empty({S, d});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      const float* a = att + bh * S * S;
      for (int64_t s = 0; s < S; ++s)
        std::memcpy(do_bh.f32() + s * d, dop + (b * S + s) * D + h * d, sizeof(float) * d);
      backend_->gemm(false, true, S, S, d, 1.0f, do_bh.f32(), v + bh * S * d, 0.0f, da.f32());
      backend_->gemm(true, false, S, d, S, 1.0f, a, do_bh.f32(), 0.0f, dv.f32());
      // Softmax backward in place over dA (masked entries have A = 0, so their dS is 0).
      float* ds = da.f32();
      for (int64_t t = 0; t < S; ++t) {
        float dot = 0.0f;
        for (int64_t u = 0; u <= t; ++u) dot += a[t * S + u] * ds[t * S + u];
        for (int64_t u = 0; u < S; ++u) ds[t * S + u] = u <= t ? a[t * S + u] * (ds[t * S + u] - dot) : 0.0f;
      }
      backend_->gemm(false, false, S, d, S, scale, ds, k + bh * S * d, 0.0f, dq.f32());
      backend_->gemm(true, false, S, d, S, scale, ds, q + bh * S * d, 0.0f, dk.f32());
      for (int64_t s = 0; s < S; ++s) {
        float* row = dqkvp + (b * S + s) * 3 * D;
        std::memcpy(row + h * d, dq.f32() + s * d, sizeof(float) * d);
        std::memcpy(row + D + h * d, dk.f32() + s * d, sizeof(float) * d);
        std::memcpy(row + 2 * D + h * d, dv.f32() + s * d, sizeof(float) * d);
      }
    }
  return qkv_.backward(dqkv);
}

void CausalSelfAttention::register_params(ParamRegistry& registry, ParamSharing sharing) {
  qkv_.register_params(registry, sharing);
  proj_.register_params(registry, sharing);
}

// ---- Residual connections --------------------------------------------------------------------

Tensor residual_add(Backend& backend, const Tensor& a, const Tensor& b) {
  check_same_shape(a, b, "residual_add");
  Tensor y = Tensor::empty(a.shape());
  backend.add(a.f32(), b.f32(), y.f32(), a.numel());
  return y;
}

void accumulate(Backend& backend, Tensor& dst, const Tensor& src) {
  MOESIM_ASSERT(dst.numel() == src.numel(), "accumulate: {} += {}", shape_str(dst), shape_str(src));
  backend.axpy(1.0f, src.f32(), dst.f32(), dst.numel());
}

// ---- Loss ------------------------------------------------------------------------------------

LossAndGrad cross_entropy(const Tensor& logits, std::span<const int32_t> targets) {
  MOESIM_ASSERT(logits.rank() >= 1, "cross_entropy: logits {}", shape_str(logits));
  const int64_t V = logits.dim(logits.rank() - 1);
  const int64_t T = logits.numel() / V;
  MOESIM_ASSERT(T > 0 && static_cast<int64_t>(targets.size()) == T, "cross_entropy: {} targets for logits {}",
                targets.size(), shape_str(logits));
  LossAndGrad out;
  out.dlogits = zeros_like(logits);
  const float* z = logits.f32();
  float* dz = out.dlogits.f32();
  const double inv_T = 1.0 / static_cast<double>(T);
  double total = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int32_t y = targets[static_cast<size_t>(t)];
    if (y < 0 || y >= V)
      throw Error(fmt::format("cross_entropy: target {} at row {} is outside the vocabulary [0, {})", y, t, V));
    const float* zt = z + t * V;
    float* dzt = dz + t * V;
    const double m = *std::max_element(zt, zt + V);
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(zt[v] - m);
    total += m + std::log(sum) - zt[y];
    for (int64_t v = 0; v < V; ++v)
      dzt[v] = static_cast<float>((std::exp(zt[v] - m) / sum - (v == y ? 1.0 : 0.0)) * inv_T);
  }
  out.loss = total * inv_T;
  return out;
}

}  // namespace moesim::exec
