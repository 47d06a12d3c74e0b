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

// Tensors of a back end: on its device, fp32.
Tensor empty_on(const Backend& b, std::vector<int64_t> shape) {
  return Tensor::empty(std::move(shape), DType::kF32, b.device());
}
Tensor zeros_on(const Backend& b, std::vector<int64_t> shape) {
  return Tensor::zeros(std::move(shape), DType::kF32, b.device());
}
// Parameters are drawn on the host (one Rng stream each, in memory order) and then moved.
Tensor normal_on(const Backend& b, std::vector<int64_t> shape, uint64_t seed, float std) {
  Tensor host = Tensor::zeros(std::move(shape));
  Rng(seed).fill_normal(host, 0.0f, std);
  return b.device() == Device::kCpu ? host : host.to(b.device());
}

void check_device(const Backend& b, const Tensor& t, const std::string& who) {
  if (t.device() != b.device() || t.dtype() != DType::kF32)
    throw Error(fmt::format("{}: got {}, but the layer runs on {} (f32 on its device)", who, t.describe(), b.name()));
}

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
  for (Param& p : params_) p.grad.fill_zero();
}

// ---- Linear ----------------------------------------------------------------------------------

Linear::Linear(Backend& backend, std::string name, int64_t in_features, int64_t out_features, uint64_t seed,
               LinearOptions options)
    : backend_(&backend), name_(std::move(name)), in_(in_features), out_(out_features), has_bias_(options.bias) {
  MOESIM_ASSERT(in_ > 0 && out_ > 0, "{}: bad shape {} x {}", name_, in_, out_);
  weight_ = normal_on(backend, {in_, out_}, derive_seed(seed, name_ + ".weight"), options.init_std);
  dweight_ = zeros_on(backend, {in_, out_});
  if (has_bias_) {
    bias_ = zeros_on(backend, {out_});
    dbias_ = zeros_on(backend, {out_});
  }
}

Tensor Linear::forward(const Tensor& x) {
  const int64_t rows = rows_of(x, in_, name_);
  check_device(*backend_, x, name_);
  x_ = x;
  Tensor y = empty_on(*backend_, with_last(x.shape(), out_));
  float* yp = y.device_f32();
  backend_->gemm(false, false, rows, out_, in_, 1.0f, x.device_f32(), weight_.device_f32(), 0.0f, yp);
  if (has_bias_) backend_->add_bias(yp, bias_.device_f32(), rows, out_);
  return y;
}

Tensor Linear::backward(const Tensor& dy) {
  const int64_t rows = rows_of(dy, out_, name_);
  MOESIM_ASSERT(x_.numel() == rows * in_, "{}: backward of {} without a matching forward", name_, shape_str(dy));
  check_device(*backend_, dy, name_);
  const float* dyp = dy.device_f32();
  backend_->gemm(true, false, in_, out_, rows, 1.0f, x_.device_f32(), dyp, 1.0f, dweight_.device_f32());
  if (has_bias_) backend_->column_sums_add(dyp, dbias_.device_f32(), rows, out_);
  Tensor dx = empty_on(*backend_, x_.shape());
  backend_->gemm(false, true, rows, in_, out_, 1.0f, dyp, weight_.device_f32(), 0.0f, dx.device_f32());
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
  table_ = normal_on(backend, {vocab_, dim_}, derive_seed(seed, name_ + ".weight"), init_std);
  dtable_ = zeros_on(backend, {vocab_, dim_});
}

Tensor Embedding::forward(std::span<const int32_t> ids) {
  for (size_t t = 0; t < ids.size(); ++t)
    if (ids[t] < 0 || ids[t] >= vocab_)
      throw Error(fmt::format("{}: token id {} at position {} is outside the vocabulary [0, {})", name_, ids[t], t,
                              vocab_));
  const auto n = static_cast<int64_t>(ids.size());
  // The ids, and where the back end reads one, the backward's plan of them after them: one copy to
  // the device.
  rows_ = n;
  groups_ = -1;
  if (!backend_->scatter_reads_plan()) {
    ids_ = Tensor::from_i32({n}, ids.data(), ids.size(), backend_->device());
  } else {
    ScatterPlan plan = scatter_add_plan(ids.data(), ids.size());
    groups_ = plan.groups;
    plan.packed.insert(plan.packed.begin(), ids.begin(), ids.end());
    ids_ = Tensor::from_i32({static_cast<int64_t>(plan.packed.size())}, plan.packed.data(), plan.packed.size(),
                            backend_->device());
  }
  Tensor y = empty_on(*backend_, {n, dim_});
  backend_->gather_rows(table_.device_f32(), ids_.device_i32(), y.device_f32(), n, dim_);
  return y;
}

void Embedding::backward(const Tensor& dy) {
  const int64_t n = rows_;
  MOESIM_ASSERT(dy.numel() == n * dim_, "{}: backward of {} after a forward of {} ids", name_, shape_str(dy), n);
  check_device(*backend_, dy, name_);
  const int32_t* plan = groups_ >= 0 ? ids_.device_i32() + n : nullptr;
  backend_->scatter_add_rows(dy.device_f32(), ids_.device_i32(), plan, groups_, dtable_.device_f32(), n, dim_);
}

void Embedding::register_params(ParamRegistry& registry, ParamSharing sharing) {
  registry.add(name_ + ".weight", table_, dtable_, sharing);
}

// ---- LayerNorm -------------------------------------------------------------------------------

LayerNorm::LayerNorm(Backend& backend, std::string name, int64_t dim, float eps)
    : backend_(&backend), name_(std::move(name)), dim_(dim), eps_(eps) {
  MOESIM_ASSERT(dim_ > 0 && eps_ > 0, "{}: bad dim {} or eps {}", name_, dim_, eps_);
  gamma_ = Tensor::from({dim_}, std::vector<float>(static_cast<size_t>(dim_), 1.0f), backend.device());
  beta_ = zeros_on(backend, {dim_});
  dgamma_ = zeros_on(backend, {dim_});
  dbeta_ = zeros_on(backend, {dim_});
}

Tensor LayerNorm::forward(const Tensor& x) {
  const int64_t rows = rows_of(x, dim_, name_);
  check_device(*backend_, x, name_);
  x_ = x;
  mean_ = empty_on(*backend_, {rows});
  rstd_ = empty_on(*backend_, {rows});
  Tensor y = empty_on(*backend_, x.shape());
  backend_->layernorm(x.device_f32(), gamma_.device_f32(), beta_.device_f32(), y.device_f32(), mean_.device_f32(),
                      rstd_.device_f32(), rows, dim_, eps_);
  return y;
}

Tensor LayerNorm::backward(const Tensor& dy) {
  const int64_t rows = rows_of(dy, dim_, name_);
  MOESIM_ASSERT(x_.numel() == rows * dim_, "{}: backward of {} without a matching forward", name_, shape_str(dy));
  check_device(*backend_, dy, name_);
  Tensor dx = empty_on(*backend_, x_.shape());
  backend_->layernorm_backward(x_.device_f32(), gamma_.device_f32(), mean_.device_f32(), rstd_.device_f32(),
                               dy.device_f32(), dx.device_f32(), dgamma_.device_f32(), dbeta_.device_f32(), rows,
                               dim_);
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
  const Tensor qkv = qkv_.forward(x);  // [B, S, 3D] = [B, S, 3, H, d]
  qkv_heads_ = empty_on(*backend_, {3, B, H, S, d});  // Q, K, V one after the other
  backend_->split_heads(qkv.device_f32(), qkv_heads_.device_f32(), B, S, 3, H, d);
  const float* q = qkv_heads_.device_f32();
  const float* k = q + B * H * S * d;
  const float* v = k + B * H * S * d;

  // Scores, causally masked, then a row softmax over all B H S rows at once.
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  Tensor scores = empty_on(*backend_, {B, H, S, S});
  float* sc = scores.device_f32();
  backend_->gemm_batched(false, true, S, S, d, scale, q, S * d, k, S * d, 0.0f, sc, S * S, B * H);
  backend_->causal_mask(sc, B * H, S);
  att_ = empty_on(*backend_, {B, H, S, S});
  const float* att = att_.device_f32();
  backend_->softmax_rows(sc, att_.device_f32(), B * H * S, S);

  // O = A V per head [B, H, S, d], then the heads' columns of [B, S, D].
  Tensor o_heads = empty_on(*backend_, {B, H, S, d});
  float* oh = o_heads.device_f32();
  backend_->gemm_batched(false, false, S, d, S, 1.0f, att, S * S, v, S * d, 0.0f, oh, S * d, B * H);
  Tensor o = empty_on(*backend_, {B, S, D});
  backend_->merge_heads(oh, o.device_f32(), B, S, 1, H, d);
  return proj_.forward(o);
}

Tensor CausalSelfAttention::backward(const Tensor& dy) {
  const int64_t B = batch_, S = seq_, D = d_model_, H = n_heads_, d = head_dim_;
  MOESIM_ASSERT(dy.rank() == 3 && dy.dim(0) == B && dy.dim(1) == S && dy.dim(2) == D,
                "{}: backward of {} after a forward of [{}, {}, {}]", name_, shape_str(dy), B, S, D);
  const Tensor d_o = proj_.backward(dy);  // [B, S, D]
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t head_block = B * H * S * d;
  const float* q = qkv_heads_.device_f32();
  const float* k = q + head_block;
  const float* v = k + head_block;
  const float* att = att_.device_f32();

  Tensor do_heads = empty_on(*backend_, {B, H, S, d});
  backend_->split_heads(d_o.device_f32(), do_heads.device_f32(), B, S, 1, H, d);
  const float* dop = do_heads.device_f32();
  Tensor dqkv_heads = empty_on(*backend_, {3, B, H, S, d});
  float* dq = dqkv_heads.device_f32();
  float* dk = dq + head_block;
  float* dv = dk + head_block;
  Tensor da = empty_on(*backend_, {B, H, S, S});
  float* ds = da.device_f32();
  backend_->gemm_batched(false, true, S, S, d, 1.0f, dop, S * d, v, S * d, 0.0f, ds, S * S, B * H);
  backend_->gemm_batched(true, false, S, d, S, 1.0f, att, S * S, dop, S * d, 0.0f, dv, S * d, B * H);
  // Softmax backward in place over dA (masked entries have A = 0, so their dS is 0).
  backend_->softmax_backward_rows(att, ds, ds, B * H * S, S);
  backend_->gemm_batched(false, false, S, d, S, scale, ds, S * S, k, S * d, 0.0f, dq, S * d, B * H);
  backend_->gemm_batched(true, false, S, d, S, scale, ds, S * S, q, S * d, 0.0f, dk, S * d, B * H);
  Tensor dqkv = empty_on(*backend_, {B, S, 3 * D});
  backend_->merge_heads(dqkv_heads.device_f32(), dqkv.device_f32(), B, S, 3, H, d);
  return qkv_.backward(dqkv);
}

void CausalSelfAttention::register_params(ParamRegistry& registry, ParamSharing sharing) {
  qkv_.register_params(registry, sharing);
  proj_.register_params(registry, sharing);
}

// ---- Residual connections --------------------------------------------------------------------

Tensor residual_add(Backend& backend, const Tensor& a, const Tensor& b) {
  check_same_shape(a, b, "residual_add");
  check_device(backend, a, "residual_add");
  check_device(backend, b, "residual_add");
  Tensor y = empty_on(backend, a.shape());
  backend.add(a.device_f32(), b.device_f32(), y.device_f32(), a.numel());
  return y;
}

void accumulate(Backend& backend, Tensor& dst, const Tensor& src) {
  MOESIM_ASSERT(dst.numel() == src.numel(), "accumulate: {} += {}", shape_str(dst), shape_str(src));
  check_device(backend, dst, "accumulate");
  check_device(backend, src, "accumulate");
  backend.axpy(1.0f, src.device_f32(), dst.device_f32(), dst.numel());
}

// ---- Loss ------------------------------------------------------------------------------------

LossAndGrad cross_entropy(Backend& backend, const Tensor& logits, std::span<const int32_t> targets) {
  MOESIM_ASSERT(logits.rank() >= 1, "cross_entropy: logits {}", shape_str(logits));
  check_device(backend, logits, "cross_entropy");
  const int64_t V = logits.dim(logits.rank() - 1);
  const int64_t T = logits.numel() / V;
  MOESIM_ASSERT(T > 0 && static_cast<int64_t>(targets.size()) == T, "cross_entropy: {} targets for logits {}",
                targets.size(), shape_str(logits));
  for (int64_t t = 0; t < T; ++t) {
    const int32_t y = targets[static_cast<size_t>(t)];
    if (y < 0 || y >= V)
      throw Error(fmt::format("cross_entropy: target {} at row {} is outside the vocabulary [0, {})", y, t, V));
  }
  LossAndGrad out;
  out.dlogits = empty_on(backend, logits.shape());
  const Tensor device_targets = Tensor::from_i32({T}, targets.data(), targets.size(), backend.device());
  Tensor row_loss = Tensor::empty({T}, DType::kF64, backend.device());
  backend.cross_entropy(logits.device_f32(), device_targets.device_i32(), out.dlogits.device_f32(),
                        row_loss.device_f64(), T, V, 1.0 / static_cast<double>(T));
  // The T row losses come to the host (synchronously) and are summed there in row order.
  double total = 0;
  for (double l : row_loss.to_f64_vector()) total += l;
  out.loss = total / static_cast<double>(T);
  return out;
}

LossAndGrad cross_entropy(const Tensor& logits, std::span<const int32_t> targets) {
  return cross_entropy(default_cpu_backend(), logits, targets);
}

}  // namespace moesim::exec
