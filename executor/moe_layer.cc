#include "executor/moe_layer.h"

#include "common/error.h"
#include "common/precision.h"
#include "costmodel/routing_model.h"
#include "executor/error.h"

#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numbers>
#include <numeric>

namespace moesim::exec {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Counter-based random numbers: every value is a hash of (stream key, index), so a value does not
// depend on how many were drawn before it (or on which rank draws it).
uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t hash2(uint64_t key, uint64_t index) { return mix64(key ^ mix64(index + 0x632BE59BD9B4E019ull)); }
double unit_open(uint64_t h) { return (static_cast<double>(h >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1)

constexpr uint64_t kDataStream = 4;

double normal_cdf(double u) { return 0.5 * std::erfc(-u / std::sqrt(2.0)); }
double normal_pdf(double u) { return std::exp(-0.5 * u * u) / std::sqrt(2 * std::numbers::pi); }

// Squared coefficient of variation Var(v) / Mean(v)^2 (population variance) and its gradient.
double cv2(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  const double m = std::accumulate(v.begin(), v.end(), 0.0) / n;
  if (!(m > 0)) return 0;
  double var = 0;
  for (double x : v) var += (x - m) * (x - m);
  return var / n / (m * m);
}
std::vector<double> cv2_grad(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  const double m = std::accumulate(v.begin(), v.end(), 0.0) / n;
  std::vector<double> g(v.size(), 0.0);
  if (!(m > 0)) return g;
  double var = 0;
  for (double x : v) var += (x - m) * (x - m);
  var /= n;
  for (size_t i = 0; i < v.size(); ++i) g[i] = 2 * (v[i] - m) / (n * m * m) - 2 * var / (n * m * m * m);
  return g;
}

void check_cpu_f32(const Tensor& t, const char* what, int64_t rows, int64_t cols) {
  if (t.device() != Device::kCpu || t.dtype() != DType::kF32 || t.rank() != 2 || (rows >= 0 && t.dim(0) != rows) ||
      t.dim(1) != cols)
    throw Error(fmt::format("MoE layer: {} must be f32[{}, {}] on the CPU, got {}", what,
                            rows >= 0 ? std::to_string(rows) : "T", cols, t.describe()));
}

constexpr std::array<std::pair<RoutingPolicy, const char*>, 6> kPolicyNames{{
    {RoutingPolicy::kVanilla, "vanilla"},
    {RoutingPolicy::kBatchPriority, "batch_priority"},
    {RoutingPolicy::kNoDrop, "no_drop"},
    {RoutingPolicy::kVanilla, "VANILLA"},
    {RoutingPolicy::kBatchPriority, "BATCH_PRIORITY"},
    {RoutingPolicy::kNoDrop, "NO_DROP"},
}};

}  // namespace

const char* routing_policy_name(RoutingPolicy policy) {
  for (const auto& [p, name] : kPolicyNames)
    if (p == policy) return name;
  return "?";
}

std::optional<RoutingPolicy> routing_policy_from_name(std::string_view name) {
  for (const auto& [p, n] : kPolicyNames)
    if (name == n) return p;
  return std::nullopt;
}

std::vector<std::string> validate(const MoeLayerConfig& c, int ep_size) {
  std::vector<std::string> bad;
  auto nonneg = [&](double w, const char* field) {
    if (!(std::isfinite(w) && w >= 0)) bad.push_back(fmt::format("{} must be finite and >= 0, got {}", field, w));
  };
  if (c.hidden <= 0) bad.push_back(fmt::format("hidden must be > 0, got {}", c.hidden));
  if (c.ffn_hidden <= 0) bad.push_back(fmt::format("ffn_hidden must be > 0, got {}", c.ffn_hidden));
  if (c.num_experts <= 0) bad.push_back(fmt::format("num_experts must be > 0, got {}", c.num_experts));
  if (c.top_k < 1 || (c.num_experts > 0 && c.top_k > c.num_experts))
    bad.push_back(fmt::format("top_k must be in [1, num_experts = {}], got {}", c.num_experts, c.top_k));
  if (ep_size < 1) bad.push_back(fmt::format("the EP group must have >= 1 rank, got {}", ep_size));
  if (ep_size >= 1 && c.num_experts > 0 && c.num_experts % ep_size != 0)
    bad.push_back(fmt::format("num_experts {} is not a multiple of the EP group size {}", c.num_experts, ep_size));
  if (c.routing != RoutingPolicy::kNoDrop && !(std::isfinite(c.capacity_factor) && c.capacity_factor > 0))
    bad.push_back(fmt::format("capacity_factor must be finite and > 0, got {}", c.capacity_factor));
  nonneg(c.switch_loss_weight, "switch_loss_weight");
  nonneg(c.importance_loss_weight, "importance_loss_weight");
  nonneg(c.load_loss_weight, "load_loss_weight");
  nonneg(c.damex_loss_weight, "damex_loss_weight");
  nonneg(c.gate_noise_std, "gate_noise_std");
  if (c.load_loss_weight > 0 && !(c.gate_noise_std > 0))
    bad.push_back("load_loss_weight > 0 needs the noisy gate: gate_noise_std > 0");
  if (c.damex_loss_weight > 0 && c.damex_expert_of_dataset.empty())
    bad.push_back("damex_loss_weight > 0 needs damex_expert_of_dataset (the expert of every dataset)");
  for (size_t d = 0; d < c.damex_expert_of_dataset.size(); ++d) {
    const int e = c.damex_expert_of_dataset[d];
    if (e < 0 || e >= c.num_experts)
      bad.push_back(fmt::format("damex_expert_of_dataset[{}] = {} is not an expert in [0, {})", d, e, c.num_experts));
  }
  return bad;
}

float gate_noise_sample(uint64_t key, uint64_t step, int64_t token, int expert) {
  const uint64_t row = hash2(hash2(key, step), static_cast<uint64_t>(token));
  const double u1 = unit_open(hash2(row, 2 * static_cast<uint64_t>(expert)));
  const double u2 = unit_open(hash2(row, 2 * static_cast<uint64_t>(expert) + 1));
  return static_cast<float>(std::sqrt(-2 * std::log(u1)) * std::cos(2 * std::numbers::pi * u2));
}

void top_k_rows(const float* probs, int64_t rows, int cols, int k, int32_t* experts) {
  MOESIM_ASSERT(k >= 1 && k <= cols, "top_k {} outside [1, {}]", k, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs + r * cols;
    int32_t* out = experts + r * k;
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int e = 0; e < cols; ++e) {
        if (std::find(out, out + j, e) != out + j) continue;
        if (best < 0 || p[e] > p[best]) best = e;  // strict: ties keep the lower index
      }
      out[j] = best;
    }
  }
}

std::vector<uint8_t> assign_capacity(RoutingPolicy policy, int64_t capacity, int experts, int k, int64_t tokens,
                                     std::span<const int32_t> expert_of_assignment, std::span<const float> top_prob) {
  const size_t n = static_cast<size_t>(tokens) * static_cast<size_t>(k);
  MOESIM_ASSERT(expert_of_assignment.size() == n, "{} assignments for {} tokens x {}", expert_of_assignment.size(),
                tokens, k);
  std::vector<uint8_t> keep(n, 0);
  if (policy == RoutingPolicy::kNoDrop) {
    std::fill(keep.begin(), keep.end(), 1);
    return keep;
  }
  std::vector<int64_t> used(static_cast<size_t>(experts), 0);
  const strategy::DropPolicy order_policy =
      policy == RoutingPolicy::kBatchPriority ? strategy::BATCH_PRIORITY : strategy::VANILLA;
  const std::vector<double> priority(top_prob.begin(), top_prob.end());
  for (int64_t a : cost::fill_order(order_policy, tokens, k, priority)) {
    const int e = expert_of_assignment[static_cast<size_t>(a)];
    MOESIM_ASSERT(e >= 0 && e < experts, "assignment {} goes to expert {} of {}", a, e, experts);
    if (used[e] < capacity) {
      ++used[e];
      keep[static_cast<size_t>(a)] = 1;
    }
  }
  return keep;
}

// ---------------------------------------------------------------------------------------------

MoeLayer::MoeLayer(MoeLayerConfig config, Backend& backend, Comm* ep_comm)
    : config_(std::move(config)), backend_(backend) {
  if (ep_comm != nullptr && ep_comm->size() > 1) {
    comm_ = ep_comm;
    ep_size_ = ep_comm->size();
    ep_rank_ = ep_comm->rank();
  }
  const std::vector<std::string> bad = validate(config_, ep_size_);
  if (!bad.empty()) {
    std::string msg = "invalid MoE layer config:";
    for (const std::string& b : bad) msg += "\n  " + b;
    throw Error(msg);
  }
  if (backend_.device() != Device::kCpu)
    throw Error(fmt::format("the MoE layer runs on the CPU back end, got {}", backend_.name()));
  local_experts_ = config_.num_experts / ep_size_;
  init_parameters();
}

void MoeLayer::init_parameters() {
  const int64_t D = config_.hidden, F = config_.ffn_hidden, E = config_.num_experts, El = local_experts_;
  auto fill = [&](float* p, int64_t n, const std::string& stream, int64_t fan_in) {
    Rng rng(derive_seed(config_.seed, config_.name + stream));
    const double bound = 1 / std::sqrt(static_cast<double>(fan_in));
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>((2 * rng.uniform() - 1) * bound);
  };
  w_router_ = Tensor::empty({D, E});
  fill(w_router_.f32(), D * E, ".router.weight", D);
  w1_ = Tensor::empty({El, D, F});
  w2_ = Tensor::empty({El, F, D});
  b1_ = Tensor::zeros({El, F});
  b2_ = Tensor::zeros({El, D});
  for (int64_t le = 0; le < El; ++le) {
    const std::string expert = fmt::format(".experts.{}", first_local_expert() + le);
    fill(w1_.f32() + le * D * F, D * F, expert + ".w1", D);
    fill(w2_.f32() + le * F * D, F * D, expert + ".w2", F);
  }
  dw_router_ = Tensor::zeros({D, E});
  dw1_ = Tensor::zeros({El, D, F});
  db1_ = Tensor::zeros({El, F});
  dw2_ = Tensor::zeros({El, F, D});
  db2_ = Tensor::zeros({El, D});
}

void MoeLayer::register_params(ParamRegistry& registry) {
  const std::string& n = config_.name;
  registry.add(n + ".router.weight", w_router_, dw_router_, ParamSharing::kReplicated);
  registry.add(n + ".experts.w1", w1_, dw1_, ParamSharing::kLocal);
  registry.add(n + ".experts.b1", b1_, db1_, ParamSharing::kLocal);
  registry.add(n + ".experts.w2", w2_, dw2_, ParamSharing::kLocal);
  registry.add(n + ".experts.b2", b2_, db2_, ParamSharing::kLocal);
}

uint64_t MoeLayer::gate_noise_key() const { return derive_seed(config_.seed, config_.name + ".gate_noise"); }

void MoeLayer::zero_grad() {
  for (Tensor* g : {&dw_router_, &dw1_, &db1_, &dw2_, &db2_}) std::fill_n(g->f32(), g->numel(), 0.0f);
}

Tensor MoeLayer::forward(const Tensor& x, const MoeForwardOptions& options) {
  const int64_t D = config_.hidden;
  check_cpu_f32(x, "x", -1, D);
  tokens_ = x.dim(0);
  if (!options.dataset_ids.empty() && static_cast<int64_t>(options.dataset_ids.size()) != tokens_)
    throw Error(fmt::format("MoE layer: {} dataset ids for {} tokens", options.dataset_ids.size(), tokens_));
  const int datasets = static_cast<int>(config_.damex_expert_of_dataset.size());
  dataset_of_token_.assign(static_cast<size_t>(tokens_), -1);
  for (size_t t = 0; t < options.dataset_ids.size(); ++t) {
    const int32_t d = options.dataset_ids[t];
    if (d < -1 || d >= datasets)
      throw Error(fmt::format("MoE layer: dataset id {} of token {} is neither -1 nor one of the {} datasets "
                              "in damex_expert_of_dataset",
                              d, t, datasets));
    dataset_of_token_[t] = d;
  }
  x_ = x;
  fwd_times_ = {};
  have_forward_ = false;

  auto t0 = Clock::now();
  gate_forward(options);
  route();
  aux_forward();
  fwd_times_.gate_s = seconds_since(t0);

  // Dispatch: this rank's kept assignments, grouped by expert, to the experts' ranks.
  t0 = Clock::now();
  const float* xp = x_.f32();
  send_buf_.resize(static_cast<size_t>(send_rows_ * D));
  const int k = config_.top_k;
  for (int64_t a = 0; a < tokens_ * k; ++a)
    if (slot_[a] >= 0) std::memcpy(send_buf_.data() + slot_[a] * D, xp + (a / k) * D, sizeof(float) * D);
  if (comm_ != nullptr) {
    expert_in_.resize(static_cast<size_t>(expert_rows_ * D));
    exchange(send_buf_.data(), expert_in_.data(), true);
  }
  fwd_times_.dispatch_s = seconds_since(t0);

  t0 = Clock::now();
  experts_forward();
  fwd_times_.experts_s = seconds_since(t0);

  // Combine: outputs back to the tokens' ranks, y = sum over kept choices of w * output.
  t0 = Clock::now();
  const float* ret = expert_out_.data();
  if (comm_ != nullptr) {
    returned_.resize(static_cast<size_t>(send_rows_ * D));
    exchange(expert_out_.data(), returned_.data(), false);
    ret = returned_.data();
  }
  Tensor y = Tensor::zeros({tokens_, D});
  float* yp = y.f32();
  for (int64_t a = 0; a < tokens_ * k; ++a) {
    if (slot_[a] < 0) continue;
    const float w = gate_w_[a];
    const float* o = ret + slot_[a] * D;
    float* yt = yp + (a / k) * D;
    for (int64_t d = 0; d < D; ++d) yt[d] += w * o[d];
  }
  fwd_times_.combine_s = seconds_since(t0);
  have_forward_ = true;
  return y;
}

void MoeLayer::gate_forward(const MoeForwardOptions& options) {
  const int64_t D = config_.hidden, T = tokens_;
  const int E = config_.num_experts, k = config_.top_k;
  // Tokens per rank: the group's T (capacity) and this rank's offset (noise, fill order).
  tokens_of_rank_.assign(static_cast<size_t>(ep_size_), T);
  if (comm_ != nullptr) {
    std::vector<float> counts(static_cast<size_t>(ep_size_));
    const float mine = static_cast<float>(T);
    comm_->all_gather(&mine, counts.data(), 1);
    for (int r = 0; r < ep_size_; ++r) tokens_of_rank_[r] = static_cast<int64_t>(counts[r]);
  }
  token_offset_ = std::accumulate(tokens_of_rank_.begin(), tokens_of_rank_.begin() + ep_rank_, int64_t{0});
  group_tokens_ = std::accumulate(tokens_of_rank_.begin(), tokens_of_rank_.end(), int64_t{0});

  logits_.resize(static_cast<size_t>(T * E));
  probs_.resize(static_cast<size_t>(T * E));
  if (T > 0) backend_.gemm(false, false, T, E, D, 1.0f, x_.f32(), w_router_.f32(), 0.0f, logits_.data());
  noisy_ = options.training && config_.gate_noise_std > 0;
  const float sigma = static_cast<float>(config_.gate_noise_std / E);
  const float* z = logits_.data();
  if (noisy_) {
    const uint64_t key = gate_noise_key();
    noisy_logits_.resize(static_cast<size_t>(T * E));
    for (int64_t t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e)
        noisy_logits_[t * E + e] =
            logits_[t * E + e] + sigma * gate_noise_sample(key, options.step, token_offset_ + t, e);
    z = noisy_logits_.data();
  }
  if (T > 0) backend_.softmax_rows(z, probs_.data(), T, E);

  choice_.resize(static_cast<size_t>(T * k));
  gate_w_.resize(static_cast<size_t>(T * k));
  top_prob_.resize(static_cast<size_t>(T));
  eta_.assign(noisy_ ? static_cast<size_t>(T) : 0, 0.0f);
  top_k_rows(probs_.data(), T, E, k, choice_.data());
  for (int64_t t = 0; t < T; ++t) {
    const float* p = probs_.data() + t * E;
    const int32_t* c = choice_.data() + t * k;
    top_prob_[t] = p[c[0]];
    float sum = 0;
    for (int j = 0; j < k; ++j) sum += p[c[j]];
    for (int j = 0; j < k; ++j) gate_w_[t * k + j] = config_.renormalize_gates ? p[c[j]] / sum : p[c[j]];
    if (noisy_) eta_[t] = z[t * E + c[k - 1]];
  }
}

void MoeLayer::route() {
  const int E = config_.num_experts, k = config_.top_k, El = local_experts_;
  const int64_t T = group_tokens_;
  MOESIM_ASSERT(static_cast<double>(T) * k < 16777216.0,
                "{} assignments per step: expert ids and counts travel as fp32 (exact below 2^24)", T * k);

  // The group's routing metadata, in global token order.
  std::vector<int32_t> experts_all;
  std::vector<float> prio_all;
  std::span<const int32_t> experts_g = choice_;
  std::span<const float> prio_g = top_prob_;
  if (comm_ != nullptr) {
    const int64_t tmax = *std::max_element(tokens_of_rank_.begin(), tokens_of_rank_.end());
    const int64_t per_rank = tmax * (1 + k);
    std::vector<float> mine(static_cast<size_t>(per_rank), 0.0f), all(static_cast<size_t>(per_rank * ep_size_));
    for (int64_t t = 0; t < tokens_; ++t) {
      mine[t * (1 + k)] = top_prob_[t];
      for (int j = 0; j < k; ++j) mine[t * (1 + k) + 1 + j] = static_cast<float>(choice_[t * k + j]);
    }
    comm_->all_gather(mine.data(), all.data(), per_rank);
    experts_all.reserve(static_cast<size_t>(T * k));
    prio_all.reserve(static_cast<size_t>(T));
    for (int r = 0; r < ep_size_; ++r)
      for (int64_t t = 0; t < tokens_of_rank_[r]; ++t) {
        const float* m = all.data() + r * per_rank + t * (1 + k);
        prio_all.push_back(m[0]);
        for (int j = 0; j < k; ++j) experts_all.push_back(static_cast<int32_t>(m[1 + j]));
      }
    experts_g = experts_all;
    prio_g = prio_all;
  }

  const int64_t capacity = config_.routing == RoutingPolicy::kNoDrop
                               ? 0
                               : cost::expert_capacity(T, E, k, config_.capacity_factor);
  const std::vector<uint8_t> keep_all = assign_capacity(config_.routing, capacity, E, k, T, experts_g, prio_g);

  // Per (rank, expert) counts: every rank derives the whole exchange pattern from the metadata.
  kept_by_rank_.assign(static_cast<size_t>(ep_size_ * E), 0);
  assigned_.assign(static_cast<size_t>(E), 0);
  int64_t a = 0;
  for (int r = 0; r < ep_size_; ++r)
    for (int64_t t = 0; t < tokens_of_rank_[r]; ++t)
      for (int j = 0; j < k; ++j, ++a) {
        const int e = experts_g[a];
        ++assigned_[e];
        kept_by_rank_[r * E + e] += keep_all[a];
      }
  keep_.assign(keep_all.begin() + token_offset_ * k, keep_all.begin() + (token_offset_ + tokens_) * k);

  stats_.tokens = T;
  stats_.assigned_per_expert = assigned_;
  stats_.kept_per_expert.assign(static_cast<size_t>(E), 0);
  for (int r = 0; r < ep_size_; ++r)
    for (int e = 0; e < E; ++e) stats_.kept_per_expert[e] += kept_by_rank_[r * E + e];
  stats_.expert_capacity = config_.routing == RoutingPolicy::kNoDrop
                               ? (E > 0 ? *std::max_element(assigned_.begin(), assigned_.end()) : 0)
                               : capacity;
  stats_.dropped_assignments = T * k - std::accumulate(stats_.kept_per_expert.begin(), stats_.kept_per_expert.end(),
                                                       int64_t{0});

  // Send layout: this rank's kept assignments grouped by expert (so by destination rank, the
  // experts being contiguous over ranks), in token order within an expert.
  const int64_t* mine = kept_by_rank_.data() + ep_rank_ * E;
  std::vector<int64_t> next(static_cast<size_t>(E), 0);
  for (int e = 1; e < E; ++e) next[e] = next[e - 1] + mine[e - 1];
  send_rows_ = next[E - 1] + mine[E - 1];
  slot_.assign(static_cast<size_t>(tokens_ * k), -1);
  for (int64_t b = 0; b < tokens_ * k; ++b)
    if (keep_[b]) slot_[b] = next[choice_[b]]++;

  // Expert layout: this rank's experts' rows, by local expert, then by source rank.
  expert_row_begin_.assign(static_cast<size_t>(El + 1), 0);
  for (int le = 0; le < El; ++le) {
    int64_t rows = 0;
    for (int r = 0; r < ep_size_; ++r) rows += kept_by_rank_[r * E + first_local_expert() + le];
    expert_row_begin_[le + 1] = expert_row_begin_[le] + rows;
  }
  expert_rows_ = expert_row_begin_[El];
}

void MoeLayer::aux_forward() {
  const int E = config_.num_experts, k = config_.top_k;
  const int64_t T = tokens_;
  const double sigma = config_.gate_noise_std / E;
  // Local sums: I_i, L_i, DAMEX's sum of -log p and its labelled tokens.
  std::vector<double> sums(static_cast<size_t>(2 * E + 2), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const float* p = probs_.data() + t * E;
    for (int e = 0; e < E; ++e) sums[e] += p[e];
    if (noisy_)
      for (int e = 0; e < E; ++e) sums[E + e] += normal_cdf((logits_[t * E + e] - eta_[t]) / sigma);
    const int d = dataset_of_token_[t];
    if (d >= 0) {
      // -log p_h from the logits (log-sum-exp), stable when p_h underflows.
      const float* z = (noisy_ ? noisy_logits_.data() : logits_.data()) + t * E;
      const double zmax = *std::max_element(z, z + E);
      double s = 0;
      for (int e = 0; e < E; ++e) s += std::exp(z[e] - zmax);
      sums[2 * E] += zmax + std::log(s) - z[config_.damex_expert_of_dataset[d]];
      sums[2 * E + 1] += 1;
    }
  }
  if (comm_ != nullptr) {
    std::vector<float> f(sums.begin(), sums.end());
    comm_->all_reduce_sum(f.data(), static_cast<int64_t>(f.size()));
    std::copy(f.begin(), f.end(), sums.begin());
  }
  importance_.assign(sums.begin(), sums.begin() + E);
  load_.assign(sums.begin() + E, sums.begin() + 2 * E);
  damex_tokens_ = sums[2 * E + 1];

  aux_ = {};
  const double Tg = static_cast<double>(group_tokens_);
  if (Tg > 0)
    for (int e = 0; e < E; ++e)
      aux_.switch_loss += E * (static_cast<double>(assigned_[e]) / (k * Tg)) * (importance_[e] / Tg);
  aux_.importance_loss = cv2(importance_);
  aux_.load_loss = noisy_ ? cv2(load_) : 0;
  aux_.damex_loss = damex_tokens_ > 0 ? sums[2 * E] / damex_tokens_ : 0;
  aux_.weighted_total = config_.switch_loss_weight * aux_.switch_loss +
                        config_.importance_loss_weight * aux_.importance_loss +
                        config_.load_loss_weight * aux_.load_loss + config_.damex_loss_weight * aux_.damex_loss;
}

void MoeLayer::exchange(const float* from, float* to, bool to_experts) {
  std::vector<float>& scratch = scratch_;
  const int64_t D = config_.hidden;
  const int E = config_.num_experts, El = local_experts_, first = first_local_expert();
  // Rows this rank sends to rank q (its kept assignments to q's experts) and receives from rank r
  // (r's kept assignments to this rank's experts).
  std::vector<int64_t> to_rank(static_cast<size_t>(ep_size_), 0), from_rank(static_cast<size_t>(ep_size_), 0);
  for (int q = 0; q < ep_size_; ++q)
    for (int le = 0; le < El; ++le) {
      to_rank[q] += D * kept_by_rank_[ep_rank_ * E + q * El + le];
      from_rank[q] += D * kept_by_rank_[q * E + first + le];
    }
  // Received (or to be sent) rows from/to the experts' side come by source rank, then local
  // expert; the expert layout is by local expert, then source rank.
  scratch.resize(static_cast<size_t>(expert_rows_ * D));
  auto regroup = [&](bool source_major_to_expert_major) {
    std::vector<int64_t> expert_next(expert_row_begin_.begin(), expert_row_begin_.end() - 1);
    int64_t src_row = 0;
    for (int r = 0; r < ep_size_; ++r)
      for (int le = 0; le < El; ++le) {
        const int64_t rows = kept_by_rank_[r * E + first + le];
        float* s = scratch.data() + src_row * D;
        float* x = to + expert_next[le] * D;
        const float* xs = from + expert_next[le] * D;
        if (source_major_to_expert_major)
          std::memcpy(x, s, sizeof(float) * rows * D);
        else
          std::memcpy(s, xs, sizeof(float) * rows * D);
        src_row += rows;
        expert_next[le] += rows;
      }
  };
  if (to_experts) {
    comm_->all_to_all_v(from, to_rank, scratch.data(), from_rank);
    regroup(true);
  } else {
    regroup(false);
    comm_->all_to_all_v(scratch.data(), from_rank, to, to_rank);
  }
}

void MoeLayer::experts_forward() {
  const int64_t D = config_.hidden, F = config_.ffn_hidden;
  const bool gelu = config_.activation == ExpertActivation::kGelu;
  const float* xin = comm_ != nullptr ? expert_in_.data() : send_buf_.data();
  hidden_pre_.resize(static_cast<size_t>(expert_rows_ * F));
  if (gelu) hidden_act_.resize(static_cast<size_t>(expert_rows_ * F));
  expert_out_.resize(static_cast<size_t>(expert_rows_ * D));
  for (int le = 0; le < local_experts_; ++le) {
    const int64_t begin = expert_row_begin_[le], n = expert_row_begin_[le + 1] - begin;
    if (n == 0) continue;
    const float* x = xin + begin * D;
    float* h = hidden_pre_.data() + begin * F;
    float* act = gelu ? hidden_act_.data() + begin * F : h;
    float* o = expert_out_.data() + begin * D;
    const float* b1 = b1_.f32() + le * F;
    const float* b2 = b2_.f32() + le * D;
    for (int64_t i = 0; i < n; ++i) std::memcpy(h + i * F, b1, sizeof(float) * F);
    timed_gemm(fwd_times_, false, false, n, F, D, x, w1_.f32() + le * D * F, 1.0f, h);
    if (gelu) backend_.gelu(h, act, n * F);
    for (int64_t i = 0; i < n; ++i) std::memcpy(o + i * D, b2, sizeof(float) * D);
    timed_gemm(fwd_times_, false, false, n, D, F, act, w2_.f32() + le * F * D, 1.0f, o);
  }
}

void MoeLayer::timed_gemm(MoePartTimes& times, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t kk,
                          const float* a, const float* b, float beta, float* c) {
  const auto t0 = Clock::now();
  backend_.gemm(trans_a, trans_b, m, n, kk, 1.0f, a, b, beta, c);
  times.expert_gemm_s += seconds_since(t0);
  times.expert_gemm_flops += 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(kk);
}

void MoeLayer::experts_backward(const float* grad_out, float* grad_in) {
  const int64_t D = config_.hidden, F = config_.ffn_hidden;
  const bool gelu = config_.activation == ExpertActivation::kGelu;
  const float* xin = comm_ != nullptr ? expert_in_.data() : send_buf_.data();
  grad_hidden_.resize(static_cast<size_t>(expert_rows_ * F));
  for (int le = 0; le < local_experts_; ++le) {
    const int64_t begin = expert_row_begin_[le], n = expert_row_begin_[le + 1] - begin;
    if (n == 0) continue;
    const float* x = xin + begin * D;
    const float* h = hidden_pre_.data() + begin * F;
    const float* act = gelu ? hidden_act_.data() + begin * F : h;
    const float* dout = grad_out + begin * D;
    float* dact = grad_hidden_.data() + begin * F;
    // dW2 += act^T dout, db2 += column sums of dout, dact = dout W2^T.
    timed_gemm(bwd_times_, true, false, F, D, n, act, dout, 1.0f, dw2_.f32() + le * F * D);
    float* db2 = db2_.f32() + le * D;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t d = 0; d < D; ++d) db2[d] += dout[i * D + d];
    timed_gemm(bwd_times_, false, true, n, F, D, dout, w2_.f32() + le * F * D, 0.0f, dact);
    // dh = gelu'(h) * dact, written over the activations (no longer needed).
    float* dh = dact;
    if (gelu) {
      dh = hidden_act_.data() + begin * F;
      backend_.gelu_backward(h, dact, dh, n * F);
    }
    // dW1 += x^T dh, db1 += column sums of dh, dx = dh W1^T.
    timed_gemm(bwd_times_, true, false, D, F, n, x, dh, 1.0f, dw1_.f32() + le * D * F);
    float* db1 = db1_.f32() + le * F;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f) db1[f] += dh[i * F + f];
    float* dx = grad_in + begin * D;
    timed_gemm(bwd_times_, false, true, n, D, F, dh, w1_.f32() + le * D * F, 0.0f, dx);
  }
}

Tensor MoeLayer::backward(const Tensor& dy) {
  if (!have_forward_)
    throw Error("MoE layer: backward() needs a forward() first (and runs once per forward: it reuses its buffers)");
  const int64_t D = config_.hidden, T = tokens_;
  const int E = config_.num_experts, k = config_.top_k;
  check_cpu_f32(dy, "dy", T, D);
  have_forward_ = false;
  bwd_times_ = {};
  const float* dyp = dy.f32();

  // Combine backward: d(gate weight) = dy . output, d(output) = w dy, sent to the experts' ranks.
  auto t0 = Clock::now();
  const float* ret = comm_ != nullptr ? returned_.data() : expert_out_.data();
  std::vector<float> dgate(static_cast<size_t>(T * k), 0.0f);
  grad_send_.resize(static_cast<size_t>(send_rows_ * D));
  for (int64_t a = 0; a < T * k; ++a) {
    if (slot_[a] < 0) continue;
    const float* o = ret + slot_[a] * D;
    const float* g = dyp + (a / k) * D;
    float* dout = grad_send_.data() + slot_[a] * D;
    const float w = gate_w_[a];
    double dot = 0;
    for (int64_t d = 0; d < D; ++d) {
      dot += static_cast<double>(g[d]) * o[d];
      dout[d] = w * g[d];
    }
    dgate[a] = static_cast<float>(dot);
  }
  const float* grad_out = grad_send_.data();
  if (comm_ != nullptr) {
    grad_expert_out_.resize(static_cast<size_t>(expert_rows_ * D));
    exchange(grad_send_.data(), grad_expert_out_.data(), true);
    grad_out = grad_expert_out_.data();
  }
  bwd_times_.combine_s = seconds_since(t0);

  t0 = Clock::now();
  grad_expert_in_.resize(static_cast<size_t>(expert_rows_ * D));
  experts_backward(grad_out, grad_expert_in_.data());
  bwd_times_.experts_s = seconds_since(t0);

  // Dispatch backward: input gradients back to the tokens' ranks, summed over a token's choices.
  t0 = Clock::now();
  const float* grad_rows = grad_expert_in_.data();
  if (comm_ != nullptr) {
    grad_send_.resize(static_cast<size_t>(send_rows_ * D));
    exchange(grad_expert_in_.data(), grad_send_.data(), false);
    grad_rows = grad_send_.data();
  }
  Tensor dx = Tensor::zeros({T, D});
  float* dxp = dx.f32();
  for (int64_t a = 0; a < T * k; ++a) {
    if (slot_[a] < 0) continue;
    const float* g = grad_rows + slot_[a] * D;
    float* dxt = dxp + (a / k) * D;
    for (int64_t d = 0; d < D; ++d) dxt[d] += g[d];
  }
  bwd_times_.dispatch_s = seconds_since(t0);

  // Gate backward: gate weights and aux losses -> dp -> softmax -> d(logits) (+ DAMEX and load
  // terms on the logits) -> dW_r, dx.
  t0 = Clock::now();
  const double Tg = static_cast<double>(group_tokens_);
  std::vector<double> dp_const(static_cast<size_t>(E), 0.0);  // d(aux)/dp_i, the same for every token
  if (config_.switch_loss_weight > 0 && Tg > 0)
    for (int e = 0; e < E; ++e)
      dp_const[e] += config_.switch_loss_weight * E * (static_cast<double>(assigned_[e]) / (k * Tg)) / Tg;
  if (config_.importance_loss_weight > 0) {
    const std::vector<double> g = cv2_grad(importance_);
    for (int e = 0; e < E; ++e) dp_const[e] += config_.importance_loss_weight * g[e];
  }
  const bool load_grad = noisy_ && config_.load_loss_weight > 0;
  std::vector<double> load_coef(static_cast<size_t>(E), 0.0);
  if (load_grad) {
    const std::vector<double> g = cv2_grad(load_);
    for (int e = 0; e < E; ++e) load_coef[e] = config_.load_loss_weight * g[e];
  }
  const double sigma = config_.gate_noise_std / E;
  const double damex_coef = damex_tokens_ > 0 ? config_.damex_loss_weight / damex_tokens_ : 0.0;
  std::vector<float> dlogits(static_cast<size_t>(T * E));
  std::vector<double> dp(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* p = probs_.data() + t * E;
    const int32_t* c = choice_.data() + t * k;
    const float* dg = dgate.data() + t * k;
    std::copy(dp_const.begin(), dp_const.end(), dp.begin());
    if (config_.renormalize_gates) {
      double sum = 0, dot = 0;
      for (int j = 0; j < k; ++j) {
        sum += p[c[j]];
        dot += static_cast<double>(dg[j]) * gate_w_[t * k + j];
      }
      for (int j = 0; j < k; ++j) dp[c[j]] += (dg[j] - dot) / sum;
    } else {
      for (int j = 0; j < k; ++j) dp[c[j]] += dg[j];
    }
    double pdp = 0;
    for (int e = 0; e < E; ++e) pdp += p[e] * dp[e];
    float* dz = dlogits.data() + t * E;
    for (int e = 0; e < E; ++e) dz[e] = static_cast<float>(p[e] * (dp[e] - pdp));
    const int d = dataset_of_token_[t];
    if (d >= 0 && damex_coef > 0) {
      const int h = config_.damex_expert_of_dataset[d];
      for (int e = 0; e < E; ++e) dz[e] += static_cast<float>(damex_coef * (p[e] - (e == h ? 1.0 : 0.0)));
    }
    if (load_grad) {
      double to_eta = 0;
      for (int e = 0; e < E; ++e) {
        const double v = load_coef[e] * normal_pdf((logits_[t * E + e] - eta_[t]) / sigma) / sigma;
        dz[e] += static_cast<float>(v);
        to_eta += v;
      }
      dz[c[k - 1]] -= static_cast<float>(to_eta);
    }
  }
  if (T > 0) {
    backend_.gemm(true, false, D, E, T, 1.0f, x_.f32(), dlogits.data(), 1.0f, dw_router_.f32());
    backend_.gemm(false, true, T, D, E, 1.0f, dlogits.data(), w_router_.f32(), 1.0f, dxp);
  }
  bwd_times_.gate_s = seconds_since(t0);
  return dx;
}

// ---------------------------------------------------------------------------------------------

BenchLayerResult bench_layer(const BenchLayerOptions& options, Comm* comm, Backend& backend) {
  const int ep = comm != nullptr ? comm->size() : 1;
  const int rank = comm != nullptr ? comm->rank() : 0;
  if (options.tokens <= 0 || options.tokens % ep != 0)
    throw Error(fmt::format("bench_layer: {} tokens do not split evenly over {} ranks", options.tokens, ep));
  if (options.iterations < 1 || options.warmup_iterations < 0)
    throw Error(fmt::format("bench_layer: needs iterations >= 1 and warmup >= 0, got {} and {}", options.iterations,
                            options.warmup_iterations));
  MoeLayer layer(options.layer, backend, comm);
  const int64_t D = options.layer.hidden, F = options.layer.ffn_hidden, T = options.tokens / ep;
  // Inputs and output gradients indexed by global token, so every EP split sees the same batch.
  Tensor x = Tensor::empty({T, D}), dy = Tensor::empty({T, D});
  const uint64_t data_key = hash2(options.data_seed, kDataStream);
  const uint64_t xkey = hash2(data_key, 1), gkey = hash2(data_key, 2);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      const uint64_t i = static_cast<uint64_t>((rank * T + t) * D + d);
      x.f32()[t * D + d] = static_cast<float>(2 * unit_open(hash2(xkey, i)) - 1);
      dy.f32()[t * D + d] = static_cast<float>((2 * unit_open(hash2(gkey, i)) - 1) * 1e-2);
    }

  // cblas_sgemm over the same shapes, transposes and beta as the layer's expert GEMMs.
  const int64_t rows_max = T * options.layer.top_k * ep;  // an expert's rows never exceed the group's assignments
  const int64_t big = std::max({rows_max * std::max(D, F), D * F});
  std::vector<float> ba(static_cast<size_t>(big), 0.01f), bb(static_cast<size_t>(big), 0.01f),
      bc(static_cast<size_t>(big), 0.0f);
  auto blas_s = [&](const std::vector<int64_t>& rows) {
    struct Shape {
      bool ta, tb;
      int64_t m, n, k;
      float beta;
    };
    double s = 0;
    for (int64_t n : rows) {
      if (n == 0) continue;
      const Shape shapes[] = {{false, false, n, F, D, 1}, {false, false, n, D, F, 1}, {true, false, F, D, n, 1},
                              {false, true, n, F, D, 0},  {true, false, D, F, n, 1},  {false, true, n, D, F, 0}};
      for (const Shape& sh : shapes) {
        const auto t0 = Clock::now();
        cblas_sgemm(CblasRowMajor, sh.ta ? CblasTrans : CblasNoTrans, sh.tb ? CblasTrans : CblasNoTrans,
                    static_cast<int>(sh.m), static_cast<int>(sh.n), static_cast<int>(sh.k), 1.0f, ba.data(),
                    static_cast<int>(sh.ta ? sh.m : sh.k), bb.data(), static_cast<int>(sh.tb ? sh.k : sh.n), sh.beta,
                    bc.data(), static_cast<int>(sh.n));
        s += seconds_since(t0);
      }
    }
    return s;
  };

  BenchLayerResult r;
  r.ep_size = ep;
  r.tokens = options.tokens;
  double layer_gemm_s = 0, layer_gemm_flops = 0, blas_total_s = 0;
  for (int it = 0; it < options.warmup_iterations + options.iterations; ++it) {
    layer.zero_grad();
    if (comm != nullptr) comm->barrier();
    const auto t0 = Clock::now();
    MoeForwardOptions fo;
    fo.step = static_cast<uint64_t>(it);
    layer.forward(x, fo);
    layer.backward(dy);
    const double step_s = seconds_since(t0);
    std::vector<int64_t> rows;
    for (int le = 0; le < layer.local_experts(); ++le)
      rows.push_back(layer.routing_stats().kept_per_expert[layer.first_local_expert() + le]);
    const double blas = blas_s(rows);
    if (it < options.warmup_iterations) continue;
    const MoePartTimes& f = layer.forward_times();
    const MoePartTimes& b = layer.backward_times();
    r.step_s += step_s;
    r.gate_s += f.gate_s + b.gate_s;
    r.dispatch_s += f.dispatch_s + b.dispatch_s;
    r.experts_s += f.experts_s + b.experts_s;
    r.combine_s += f.combine_s + b.combine_s;
    layer_gemm_s += f.expert_gemm_s + b.expert_gemm_s;
    layer_gemm_flops += f.expert_gemm_flops + b.expert_gemm_flops;
    blas_total_s += blas;
  }
  const double n = options.iterations;
  r.step_s /= n;
  r.gate_s /= n;
  r.dispatch_s /= n;
  r.experts_s /= n;
  r.combine_s /= n;
  r.expert_gemm_s = layer_gemm_s / n;
  r.tokens_per_s = r.step_s > 0 ? static_cast<double>(options.tokens) / r.step_s : 0;
  r.expert_gemm_flops_per_s = layer_gemm_s > 0 ? layer_gemm_flops / layer_gemm_s : 0;
  r.blas_gemm_flops_per_s = blas_total_s > 0 ? layer_gemm_flops / blas_total_s : 0;
  r.gemm_efficiency_vs_blas = layer_gemm_s > 0 ? blas_total_s / layer_gemm_s : 0;
  r.routing = layer.routing_stats();
  return r;
}

}  // namespace moesim::exec
