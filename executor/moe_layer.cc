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

// Counter-based random numbers (kernels.h): every value is a hash of (stream key, index).
using kernels::hash2;
using kernels::unit_open;

constexpr uint64_t kDataStream = 4;

double normal_cdf(double u) { return 0.5 * std::erfc(-u / std::sqrt(2.0)); }

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

void check_input(const Tensor& t, Device device, const char* what, int64_t rows, int64_t cols) {
  if (t.device() != device || t.dtype() != DType::kF32 || t.rank() != 2 || (rows >= 0 && t.dim(0) != rows) ||
      t.dim(1) != cols)
    throw Error(fmt::format("MoE layer: {} must be f32[{}, {}] on the {} (the back end's device), got {}", what,
                            rows >= 0 ? std::to_string(rows) : "T", cols, device == Device::kCpu ? "CPU" : "GPU",
                            t.describe()));
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
  return kernels::gate_noise_sample(key, step, token, expert);
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
  if (comm_ != nullptr && comm_->buffer_device() != backend_.device())
    throw Error(fmt::format("the MoE layer on {} needs a Comm over buffers of the same device, got {}", backend_.name(),
                            comm_->name()));
  local_experts_ = config_.num_experts / ep_size_;
  init_parameters();
}

Tensor MoeLayer::device_tensor(std::vector<int64_t> shape) const {
  return Tensor::empty(std::move(shape), DType::kF32, backend_.device());
}

double MoeLayer::elapsed_s(Clock::time_point t0) {
  backend_.synchronize();
  return seconds_since(t0);
}

void MoeLayer::init_parameters() {
  const int64_t D = config_.hidden, F = config_.ffn_hidden, E = config_.num_experts, El = local_experts_;
  auto fill = [&](float* p, int64_t n, const std::string& stream, int64_t fan_in) {
    Rng rng(derive_seed(config_.seed, config_.name + stream));
    const double bound = 1 / std::sqrt(static_cast<double>(fan_in));
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>((2 * rng.uniform() - 1) * bound);
  };
  // Drawn on the host, then copied to the back end's device.
  Tensor w_router = Tensor::empty({D, E});
  fill(w_router.f32(), D * E, ".router.weight", D);
  Tensor w1 = Tensor::empty({El, D, F});
  Tensor w2 = Tensor::empty({El, F, D});
  for (int64_t le = 0; le < El; ++le) {
    const std::string expert = fmt::format(".experts.{}", first_local_expert() + le);
    fill(w1.f32() + le * D * F, D * F, expert + ".w1", D);
    fill(w2.f32() + le * F * D, F * D, expert + ".w2", F);
  }
  const Device dev = backend_.device();
  w_router_ = w_router.to(dev);
  w1_ = w1.to(dev);
  w2_ = w2.to(dev);
  b1_ = Tensor::zeros({El, F}, DType::kF32, dev);
  b2_ = Tensor::zeros({El, D}, DType::kF32, dev);
  dw_router_ = Tensor::zeros({D, E}, DType::kF32, dev);
  dw1_ = Tensor::zeros({El, D, F}, DType::kF32, dev);
  db1_ = Tensor::zeros({El, F}, DType::kF32, dev);
  dw2_ = Tensor::zeros({El, F, D}, DType::kF32, dev);
  db2_ = Tensor::zeros({El, D}, DType::kF32, dev);
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
  for (Tensor* g : {&dw_router_, &dw1_, &db1_, &dw2_, &db2_}) g->fill_zero();
}

Tensor MoeLayer::forward(const Tensor& x, const MoeForwardOptions& options) {
  fwd_times_ = {};
  auto t0 = Clock::now();
  forward_gate(x, options);
  forward_route();
  forward_permute();
  fwd_times_.gate_s = elapsed_s(t0);
  t0 = Clock::now();
  forward_dispatch();
  fwd_times_.dispatch_s = elapsed_s(t0);
  t0 = Clock::now();
  forward_experts();
  fwd_times_.experts_s = elapsed_s(t0);
  t0 = Clock::now();
  forward_combine_exchange();
  Tensor y = forward_combine();
  fwd_times_.combine_s = elapsed_s(t0);
  return y;
}

void MoeLayer::expect_part(Part part, const char* name) {
  // With EP = 1 the route, the permutation and the exchanges are not parts of their own (the gate
  // routes and permutes; nothing moves): a schedule without them skips them.
  auto ep_only = [](Part p) {
    return p == Part::kForwardRoute || p == Part::kForwardPermute || p == Part::kForwardDispatch ||
           p == Part::kForwardCombineExchange || p == Part::kBackwardCombineExchange || p == Part::kBackwardDispatch;
  };
  while (comm_ == nullptr && next_part_ != part && ep_only(next_part_))
    next_part_ = static_cast<Part>(static_cast<int>(next_part_) + 1);
  if (next_part_ != part)
    throw Error(fmt::format("MoE layer {}: {} out of order (the parts run gate, route, permute, dispatch, experts, "
                            "combine exchange, combine, then backwards combine, combine exchange, experts, dispatch, "
                            "gate)",
                            config_.name, name));
  next_part_ = static_cast<Part>(static_cast<int>(part) + 1);
  if (next_part_ == Part::kEnd) next_part_ = Part::kForwardGate;
}

void MoeLayer::forward_gate(const Tensor& x, const MoeForwardOptions& options) {
  const int64_t D = config_.hidden;
  check_input(x, backend_.device(), "x", -1, D);
  // A new forward may start over at any point (a forward without its backward: evaluation).
  next_part_ = Part::kForwardGate;
  expect_part(Part::kForwardGate, "forward_gate");
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
  gate_forward(options);
  if (comm_ == nullptr) {
    decide();
    permute();
  }
}

void MoeLayer::decide() {
  const auto t0 = Clock::now();
  route();
  aux_forward();
  host_times_.dispatch_s += seconds_since(t0);
}

void MoeLayer::forward_route() {
  expect_part(Part::kForwardRoute, "forward_route");
  if (comm_ != nullptr) gather_routing();
}

void MoeLayer::forward_permute() {
  expect_part(Part::kForwardPermute, "forward_permute");
  if (comm_ == nullptr) return;
  decide();
  permute();
}

MoeLayer::RoutingLayout MoeLayer::routing_layout() const {
  const int64_t tmax = *std::max_element(tokens_of_rank_.begin(), tokens_of_rank_.end());
  const int64_t sums_at = tmax * (1 + config_.top_k);
  return {sums_at, sums_at + static_cast<int64_t>(aux_sums_.size())};
}

// The group's routing metadata (routing_layout); one all-gather carries the choices and the sums.
void MoeLayer::gather_routing() {
  const int k = config_.top_k;
  const RoutingLayout layout = routing_layout();
  std::vector<float> mine(static_cast<size_t>(layout.per_rank), 0.0f);
  routing_all_.resize(static_cast<size_t>(layout.per_rank * ep_size_));
  for (int64_t t = 0; t < tokens_; ++t) {
    mine[t * (1 + k)] = top_prob_[t];
    for (int j = 0; j < k; ++j) mine[t * (1 + k) + 1 + j] = static_cast<float>(choice_[t * k + j]);
  }
  std::copy(aux_sums_.begin(), aux_sums_.end(), mine.begin() + layout.sums_at);
  all_gather_host(*comm_, mine.data(), routing_all_.data(), layout.per_rank);
  route_bytes_ = static_cast<double>(routing_all_.size() * sizeof(float));
}

// The permutation: this rank's kept assignments, grouped by expert (so by destination rank).
void MoeLayer::permute() {
  const int64_t D = config_.hidden;
  const int k = config_.top_k;
  std::vector<int32_t> token_of_slot(static_cast<size_t>(send_rows_));
  for (int64_t a = 0; a < tokens_ * k; ++a)
    if (slot_[a] >= 0) token_of_slot[static_cast<size_t>(slot_[a])] = static_cast<int32_t>(a / k);
  const Tensor token_of_slot_dev =
      Tensor::from_i32({send_rows_}, token_of_slot.data(), token_of_slot.size(), backend_.device());
  send_buf_ = device_tensor({send_rows_, D});
  backend_.gather_rows(x_.device_f32(), token_of_slot_dev.device_i32(), send_buf_.device_f32(), send_rows_, D);
}

void MoeLayer::forward_dispatch() {
  expect_part(Part::kForwardDispatch, "forward_dispatch");
  if (comm_ == nullptr) return;
  expert_in_ = device_tensor({expert_rows_, config_.hidden});
  exchange(send_buf_.device_f32(), expert_in_.device_f32(), true);
}

void MoeLayer::forward_experts() {
  expect_part(Part::kForwardExperts, "forward_experts");
  experts_forward();
}

void MoeLayer::forward_combine_exchange() {
  expect_part(Part::kForwardCombineExchange, "forward_combine_exchange");
  if (comm_ == nullptr) return;
  returned_ = device_tensor({send_rows_, config_.hidden});
  exchange(expert_out_.device_f32(), returned_.device_f32(), false);
}

Tensor MoeLayer::forward_combine() {
  expect_part(Part::kForwardCombine, "forward_combine");
  // y = sum over kept choices of w * output.
  const float* ret = comm_ != nullptr ? returned_.device_f32() : expert_out_.device_f32();
  Tensor y = device_tensor({tokens_, config_.hidden});
  backend_.gather_sum_rows(ret, slot_dev_.device_i32(), gate_w_dev_.device_f32(), y.device_f32(), tokens_,
                           config_.top_k, config_.hidden);
  return y;
}

void MoeLayer::gate_forward(const MoeForwardOptions& options) {
  const int64_t D = config_.hidden, T = tokens_;
  const int E = config_.num_experts, k = config_.top_k;
  // Tokens per rank: the group's T (capacity) and this rank's offset (noise, fill order).
  tokens_of_rank_.assign(static_cast<size_t>(ep_size_), T);
  if (options.tokens_per_rank > 0 && options.tokens_per_rank != T)
    throw Error(fmt::format("MoE layer {}: tokens_per_rank {} but this rank has {} tokens", config_.name,
                            options.tokens_per_rank, T));
  if (comm_ != nullptr && options.tokens_per_rank == 0) {
    std::vector<float> counts(static_cast<size_t>(ep_size_));
    const float mine = static_cast<float>(T);
    all_gather_host(*comm_, &mine, counts.data(), 1);
    for (int r = 0; r < ep_size_; ++r) tokens_of_rank_[r] = static_cast<int64_t>(counts[r]);
  }
  token_offset_ = std::accumulate(tokens_of_rank_.begin(), tokens_of_rank_.begin() + ep_rank_, int64_t{0});
  group_tokens_ = std::accumulate(tokens_of_rank_.begin(), tokens_of_rank_.end(), int64_t{0});

  logits_ = device_tensor({T, E});
  probs_ = device_tensor({T, E});
  backend_.gemm(false, false, T, E, D, 1.0f, x_.device_f32(), w_router_.device_f32(), 0.0f, logits_.device_f32());
  noisy_ = options.training && config_.gate_noise_std > 0;
  const float sigma = static_cast<float>(config_.gate_noise_std / E);
  const Tensor* z = &logits_;
  if (noisy_) {
    noisy_logits_ = device_tensor({T, E});
    backend_.gate_noise(logits_.device_f32(), noisy_logits_.device_f32(), T, E, gate_noise_key(), options.step,
                        token_offset_, sigma);
    z = &noisy_logits_;
  } else {
    noisy_logits_ = Tensor();
  }
  backend_.softmax_rows(z->device_f32(), probs_.device_f32(), T, E);

  // The routing decisions run on the host over a copy of the probabilities (and of the logits the
  // load and DAMEX losses read).
  backend_.synchronize();  // the host's share starts once the device's is done
  const auto host_t0 = Clock::now();
  host_probs_ = probs_.to_vector();
  const bool damex_labels =
      std::any_of(dataset_of_token_.begin(), dataset_of_token_.end(), [](int32_t d) { return d >= 0; });
  host_z_ = noisy_ || damex_labels ? z->to_vector() : std::vector<float>();
  host_logits_ = noisy_ ? logits_.to_vector() : std::vector<float>();
  choice_.resize(static_cast<size_t>(T * k));
  gate_w_.resize(static_cast<size_t>(T * k));
  top_prob_.resize(static_cast<size_t>(T));
  eta_.assign(noisy_ ? static_cast<size_t>(T) : 0, 0.0f);
  top_k_rows(host_probs_.data(), T, E, k, choice_.data());
  for (int64_t t = 0; t < T; ++t) {
    const float* p = host_probs_.data() + t * E;
    const int32_t* c = choice_.data() + t * k;
    top_prob_[t] = p[c[0]];
    float sum = 0;
    for (int j = 0; j < k; ++j) sum += p[c[j]];
    for (int j = 0; j < k; ++j) gate_w_[t * k + j] = config_.renormalize_gates ? p[c[j]] / sum : p[c[j]];
    if (noisy_) eta_[t] = host_z_[t * E + c[k - 1]];
  }
  gate_w_dev_ = Tensor::from({T * k}, gate_w_, backend_.device());
  local_aux_sums();
  host_times_.routing_s += seconds_since(host_t0);
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
    // The metadata gather_routing gathered.
    const RoutingLayout layout = routing_layout();
    const std::vector<float>& all = routing_all_;
    experts_all.reserve(static_cast<size_t>(T * k));
    prio_all.reserve(static_cast<size_t>(T));
    std::fill(aux_sums_.begin(), aux_sums_.end(), 0.0);
    for (int r = 0; r < ep_size_; ++r) {
      for (int64_t t = 0; t < tokens_of_rank_[r]; ++t) {
        const float* m = all.data() + r * layout.per_rank + t * (1 + k);
        prio_all.push_back(m[0]);
        for (int j = 0; j < k; ++j) experts_all.push_back(static_cast<int32_t>(m[1 + j]));
      }
      const float* rank_sums = all.data() + r * layout.per_rank + layout.sums_at;
      for (size_t i = 0; i < aux_sums_.size(); ++i) aux_sums_[i] += rank_sums[i];  // in rank order: the same on every rank
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
  const std::vector<int32_t> slot32(slot_.begin(), slot_.end());
  slot_dev_ = Tensor::from_i32({tokens_ * k}, slot32.data(), slot32.size(), backend_.device());

  // Expert layout: this rank's experts' rows, by local expert, then by source rank.
  expert_row_begin_.assign(static_cast<size_t>(El + 1), 0);
  for (int le = 0; le < El; ++le) {
    int64_t rows = 0;
    for (int r = 0; r < ep_size_; ++r) rows += kept_by_rank_[r * E + first_local_expert() + le];
    expert_row_begin_[le + 1] = expert_row_begin_[le] + rows;
  }
  expert_rows_ = expert_row_begin_[El];
}

// This rank's sums of the aux losses (aux_sums_), from the host copies gate_forward made.
void MoeLayer::local_aux_sums() {
  const int E = config_.num_experts;
  const int64_t T = tokens_;
  const double sigma = config_.gate_noise_std / E;
  // Local sums: I_i, L_i, DAMEX's sum of -log p and its labelled tokens.
  std::vector<double>& sums = aux_sums_;
  sums.assign(static_cast<size_t>(2 * E + 2), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const float* p = host_probs_.data() + t * E;
    for (int e = 0; e < E; ++e) sums[e] += p[e];
    if (noisy_)
      for (int e = 0; e < E; ++e) sums[E + e] += normal_cdf((host_logits_[t * E + e] - eta_[t]) / sigma);
    const int d = dataset_of_token_[t];
    if (d >= 0) {
      // -log p_h from the logits (log-sum-exp), stable when p_h underflows.
      const float* z = host_z_.data() + t * E;
      const double zmax = *std::max_element(z, z + E);
      double s = 0;
      for (int e = 0; e < E; ++e) s += std::exp(z[e] - zmax);
      sums[2 * E] += zmax + std::log(s) - z[config_.damex_expert_of_dataset[d]];
      sums[2 * E + 1] += 1;
    }
  }
}

void MoeLayer::aux_forward() {
  const int E = config_.num_experts, k = config_.top_k;
  const std::vector<double>& sums = aux_sums_;
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
  // expert; the expert layout is by local expert, then source rank. Blocks move by device copies.
  Tensor scratch_tensor = device_tensor({expert_rows_ * D});
  float* scratch = scratch_tensor.device_f32();
  auto regroup = [&](bool source_major_to_expert_major) {
    std::vector<int64_t> expert_next(expert_row_begin_.begin(), expert_row_begin_.end() - 1);
    int64_t src_row = 0;
    for (int r = 0; r < ep_size_; ++r)
      for (int le = 0; le < El; ++le) {
        const int64_t rows = kept_by_rank_[r * E + first + le];
        const size_t bytes = sizeof(float) * static_cast<size_t>(rows * D);
        if (source_major_to_expert_major)
          backend_.copy(scratch + src_row * D, to + expert_next[le] * D, bytes);
        else
          backend_.copy(from + expert_next[le] * D, scratch + src_row * D, bytes);
        src_row += rows;
        expert_next[le] += rows;
      }
  };
  if (to_experts) {
    comm_->all_to_all_v(from, to_rank, scratch, from_rank);
    regroup(true);
  } else {
    regroup(false);
    comm_->all_to_all_v(scratch, from_rank, to, to_rank);
  }
}

void MoeLayer::experts_forward() {
  const int64_t D = config_.hidden, F = config_.ffn_hidden;
  const bool gelu = config_.activation == ExpertActivation::kGelu;
  const float* xin = comm_ != nullptr ? expert_in_.device_f32() : send_buf_.device_f32();
  hidden_pre_ = device_tensor({expert_rows_, F});
  hidden_act_ = gelu ? device_tensor({expert_rows_, F}) : Tensor();
  expert_out_ = device_tensor({expert_rows_, D});
  // Every expert's up projection onto its bias, one activation over all their rows, then every
  // expert's down projection onto its bias: the biases and the activation one kernel launch each
  // over all the experts' rows, not one per expert.
  backend_.repeat_row_grouped(b1_.device_f32(), hidden_pre_.device_f32(), expert_row_begin_.data(), local_experts_, F);
  backend_.repeat_row_grouped(b2_.device_f32(), expert_out_.device_f32(), expert_row_begin_.data(), local_experts_, D);
  for (int le = 0; le < local_experts_; ++le) {
    const int64_t begin = expert_row_begin_[le], n = expert_row_begin_[le + 1] - begin;
    if (n == 0) continue;
    timed_gemm(fwd_times_, false, false, n, F, D, xin + begin * D, w1_.device_f32() + le * D * F, 1.0f,
               hidden_pre_.device_f32() + begin * F);
  }
  const int64_t first = expert_row_begin_[0], rows = expert_row_begin_[local_experts_] - first;
  if (gelu && rows > 0) backend_.gelu(hidden_pre_.device_f32() + first * F, hidden_act_.device_f32() + first * F, rows * F);
  for (int le = 0; le < local_experts_; ++le) {
    const int64_t begin = expert_row_begin_[le], n = expert_row_begin_[le + 1] - begin;
    if (n == 0) continue;
    const float* act = (gelu ? hidden_act_ : hidden_pre_).device_f32() + begin * F;
    timed_gemm(fwd_times_, false, false, n, D, F, act, w2_.device_f32() + le * F * D, 1.0f,
               expert_out_.device_f32() + begin * D);
  }
}

void MoeLayer::timed_gemm(MoePartTimes& times, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t kk,
                          const float* a, const float* b, float beta, float* c) {
  if (!time_gemms_) {
    backend_.gemm(trans_a, trans_b, m, n, kk, 1.0f, a, b, beta, c);
    return;
  }
  backend_.synchronize();
  const auto t0 = Clock::now();
  backend_.gemm(trans_a, trans_b, m, n, kk, 1.0f, a, b, beta, c);
  backend_.synchronize();
  times.expert_gemm_s += elapsed_s(t0);
  times.expert_gemm_flops += 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(kk);
}

void MoeLayer::experts_backward(const float* grad_out, float* grad_in) {
  const int64_t D = config_.hidden, F = config_.ffn_hidden;
  const bool gelu = config_.activation == ExpertActivation::kGelu;
  const float* xin = comm_ != nullptr ? expert_in_.device_f32() : send_buf_.device_f32();
  grad_hidden_ = device_tensor({expert_rows_, F});
  // Every expert's down projection's gradients, the activation's over all their rows at once,
  // then every expert's up projection's; the biases' gradients (column sums of each expert's rows)
  // one launch each over all the experts.
  backend_.column_sums_add_grouped(grad_out, db2_.device_f32(), expert_row_begin_.data(), local_experts_, D);
  for (int le = 0; le < local_experts_; ++le) {
    const int64_t begin = expert_row_begin_[le], n = expert_row_begin_[le + 1] - begin;
    if (n == 0) continue;
    const float* act = (gelu ? hidden_act_ : hidden_pre_).device_f32() + begin * F;
    const float* dout = grad_out + begin * D;
    // dW2 += act^T dout, dact = dout W2^T.
    timed_gemm(bwd_times_, true, false, F, D, n, act, dout, 1.0f, dw2_.device_f32() + le * F * D);
    timed_gemm(bwd_times_, false, true, n, F, D, dout, w2_.device_f32() + le * F * D, 0.0f,
               grad_hidden_.device_f32() + begin * F);
  }
  // dh = gelu'(h) * dact, written over the activations (no longer needed).
  const int64_t first = expert_row_begin_[0], rows = expert_row_begin_[local_experts_] - first;
  const Tensor& dh_all = gelu ? hidden_act_ : grad_hidden_;
  if (gelu && rows > 0)
    backend_.gelu_backward(hidden_pre_.device_f32() + first * F, grad_hidden_.device_f32() + first * F,
                           hidden_act_.device_f32() + first * F, rows * F);
  backend_.column_sums_add_grouped(dh_all.device_f32(), db1_.device_f32(), expert_row_begin_.data(), local_experts_, F);
  for (int le = 0; le < local_experts_; ++le) {
    const int64_t begin = expert_row_begin_[le], n = expert_row_begin_[le + 1] - begin;
    if (n == 0) continue;
    const float* dh = dh_all.device_f32() + begin * F;
    // dW1 += x^T dh, dx = dh W1^T.
    timed_gemm(bwd_times_, true, false, D, F, n, xin + begin * D, dh, 1.0f, dw1_.device_f32() + le * D * F);
    timed_gemm(bwd_times_, false, true, n, D, F, dh, w1_.device_f32() + le * D * F, 0.0f, grad_in + begin * D);
  }
}

Tensor MoeLayer::backward(const Tensor& dy) {
  bwd_times_ = {};
  auto t0 = Clock::now();
  backward_combine(dy);
  backward_combine_exchange();
  bwd_times_.combine_s = elapsed_s(t0);
  t0 = Clock::now();
  backward_experts();
  bwd_times_.experts_s = elapsed_s(t0);
  t0 = Clock::now();
  backward_dispatch();
  bwd_times_.dispatch_s = elapsed_s(t0);
  t0 = Clock::now();
  Tensor dx = backward_gate();
  bwd_times_.gate_s = elapsed_s(t0);
  return dx;
}

void MoeLayer::backward_combine(const Tensor& dy) {
  if (next_part_ != Part::kBackwardCombine)
    throw Error("MoE layer: backward() needs a forward() first (and runs once per forward: it reuses its buffers)");
  const int64_t D = config_.hidden, T = tokens_;
  check_input(dy, backend_.device(), "dy", T, D);  // a bad dy does not consume the forward
  expect_part(Part::kBackwardCombine, "backward_combine");
  // d(gate weight) = dy . output, d(output) = w dy.
  const float* ret = comm_ != nullptr ? returned_.device_f32() : expert_out_.device_f32();
  dgate_ = device_tensor({T * config_.top_k});
  grad_send_ = device_tensor({send_rows_, D});
  backend_.gather_sum_rows_backward(dy.device_f32(), ret, slot_dev_.device_i32(), gate_w_dev_.device_f32(),
                                    grad_send_.device_f32(), dgate_.device_f32(), T, config_.top_k, D);
}

void MoeLayer::backward_combine_exchange() {
  expect_part(Part::kBackwardCombineExchange, "backward_combine_exchange");
  if (comm_ == nullptr) return;  // d(output) to the experts' ranks, along the dispatch direction
  grad_expert_out_ = device_tensor({expert_rows_, config_.hidden});
  exchange(grad_send_.device_f32(), grad_expert_out_.device_f32(), true);
}

void MoeLayer::backward_experts() {
  expect_part(Part::kBackwardExperts, "backward_experts");
  grad_expert_in_ = device_tensor({expert_rows_, config_.hidden});
  experts_backward(comm_ != nullptr ? grad_expert_out_.device_f32() : grad_send_.device_f32(),
                   grad_expert_in_.device_f32());
}

void MoeLayer::backward_dispatch() {
  expect_part(Part::kBackwardDispatch, "backward_dispatch");
  if (comm_ == nullptr) return;  // input gradients back to the tokens' ranks
  grad_send_ = device_tensor({send_rows_, config_.hidden});
  exchange(grad_expert_in_.device_f32(), grad_send_.device_f32(), false);
}

Tensor MoeLayer::backward_gate() {
  expect_part(Part::kBackwardGate, "backward_gate");
  const int64_t D = config_.hidden, T = tokens_;
  const int E = config_.num_experts, k = config_.top_k;
  const Device dev = backend_.device();
  // dx from the experts: summed over each token's choices.
  const float* grad_rows = comm_ != nullptr ? grad_send_.device_f32() : grad_expert_in_.device_f32();
  Tensor dx = device_tensor({T, D});
  backend_.gather_sum_rows(grad_rows, slot_dev_.device_i32(), nullptr, dx.device_f32(), T, k, D);
  const Tensor dgate = dgate_;
  backend_.synchronize();
  const auto host_t0 = Clock::now();

  // Gate backward: gate weights and aux losses -> dp -> softmax -> d(logits) (+ DAMEX and load
  // terms on the logits) -> dW_r, dx. The per-expert coefficients are batch statistics from the
  // host; the per-token math runs on the device (kernels::router_backward_token).
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
  const double damex_coef = damex_tokens_ > 0 ? config_.damex_loss_weight / damex_tokens_ : 0.0;
  const std::vector<int32_t> damex_expert(config_.damex_expert_of_dataset.begin(),
                                          config_.damex_expert_of_dataset.end());
  const Tensor dp_const_dev = Tensor::from_f64({E}, dp_const.data(), dp_const.size(), dev);
  const Tensor load_coef_dev = load_grad ? Tensor::from_f64({E}, load_coef.data(), load_coef.size(), dev) : Tensor();
  const Tensor eta_dev = load_grad ? Tensor::from({T}, eta_, dev) : Tensor();
  const Tensor choice_dev = Tensor::from_i32({T * k}, choice_.data(), choice_.size(), dev);
  const bool damex_grad = damex_coef > 0;
  const Tensor dataset_dev =
      damex_grad ? Tensor::from_i32({T}, dataset_of_token_.data(), dataset_of_token_.size(), dev) : Tensor();
  const Tensor damex_expert_dev =
      damex_grad ? Tensor::from_i32({static_cast<int64_t>(damex_expert.size())}, damex_expert.data(),
                                    damex_expert.size(), dev)
                 : Tensor();
  Tensor dlogits = device_tensor({T, E});
  kernels::RouterBackward args;
  args.probs = probs_.device_f32();
  args.choice = choice_dev.device_i32();
  args.dgate = dgate.device_f32();
  args.gate_w = gate_w_dev_.device_f32();
  args.dp_const = dp_const_dev.device_f64();
  args.renormalize = config_.renormalize_gates;
  args.dataset = damex_grad ? dataset_dev.device_i32() : nullptr;
  args.damex_expert = damex_grad ? damex_expert_dev.device_i32() : nullptr;
  args.damex_coef = damex_coef;
  args.load_coef = load_grad ? load_coef_dev.device_f64() : nullptr;
  args.logits = logits_.device_f32();
  args.eta = load_grad ? eta_dev.device_f32() : nullptr;
  args.sigma = config_.gate_noise_std / E;
  args.dlogits = dlogits.device_f32();
  args.tokens = T;
  args.experts = E;
  args.k = k;
  backend_.router_backward(args);
  backend_.synchronize();
  host_times_.routing_s += seconds_since(host_t0);
  if (T > 0) {
    backend_.gemm(true, false, D, E, T, 1.0f, x_.device_f32(), dlogits.device_f32(), 1.0f, dw_router_.device_f32());
    backend_.gemm(false, true, T, D, E, 1.0f, dlogits.device_f32(), w_router_.device_f32(), 1.0f, dx.device_f32());
  }
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
  layer.time_expert_gemms(true);
  const int64_t D = options.layer.hidden, F = options.layer.ffn_hidden, T = options.tokens / ep;
  // Inputs and output gradients indexed by global token, so every EP split sees the same batch.
  Tensor x_host = Tensor::empty({T, D}), dy_host = Tensor::empty({T, D});
  const uint64_t data_key = hash2(options.data_seed, kDataStream);
  const uint64_t xkey = hash2(data_key, 1), gkey = hash2(data_key, 2);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      const uint64_t i = static_cast<uint64_t>((rank * T + t) * D + d);
      x_host.f32()[t * D + d] = static_cast<float>(2 * unit_open(hash2(xkey, i)) - 1);
      dy_host.f32()[t * D + d] = static_cast<float>((2 * unit_open(hash2(gkey, i)) - 1) * 1e-2);
    }
  const Tensor x = x_host.to(backend.device()), dy = dy_host.to(backend.device());

  // The vendor BLAS over the same shapes, transposes and beta as the layer's expert GEMMs: CPU
  // cblas_sgemm; CUDA cublasSgemm (the back end's gemm, synchronised around each call).
  const int64_t rows_max = T * options.layer.top_k * ep;  // an expert's rows never exceed the group's assignments
  const int64_t big = std::max({rows_max * std::max(D, F), D * F});
  const bool on_cpu = backend.device() == Device::kCpu;
  const size_t host_big = on_cpu ? static_cast<size_t>(big) : 0;
  std::vector<float> ba(host_big, 0.01f), bb(host_big, 0.01f), bc(host_big, 0.0f);
  Tensor da, db, dc;
  if (!on_cpu) {
    da = Tensor::from({big}, std::vector<float>(static_cast<size_t>(big), 0.01f), backend.device());
    db = da.clone();
    dc = Tensor::zeros({big}, DType::kF32, backend.device());
  }
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
        if (!on_cpu) {
          backend.synchronize();
          const auto t0 = Clock::now();
          backend.gemm(sh.ta, sh.tb, sh.m, sh.n, sh.k, 1.0f, da.device_f32(), db.device_f32(), sh.beta,
                       dc.device_f32());
          backend.synchronize();
          s += seconds_since(t0);
          continue;
        }
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
    backend.synchronize();
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
