// The MoE layer (executor/moe_layer.h). Backward passes are checked against central finite
// differences of an fp64 re-implementation of the forward with the layer's routing held fixed (so
// a difference never crosses a top-k switch or a capacity decision), with tolerances
// tol + |ref| * eps and the max abs/rel error printed per check (llm.c style). Dispatch and combine
// are checked bit for bit with small-integer inputs and identity-like experts; capacity overflow
// with hand-built logits; the aux losses against hand-computed values.
//
// Test cases tagged [.ep2] are hidden from the plain run: CTest runs them under
// `mpirun -np 2 executor_moe_test "[ep2]"` and compares EP=1 (one rank, all experts, the whole
// batch) with EP=2 (two ranks, half the experts and half the tokens each).
#include "costmodel/routing_model.h"
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/error.h"
#include "executor/moe_layer.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numbers>
#include <numeric>
#include <string>
#include <vector>

using namespace moesim::exec;
using Catch::Matchers::Contains;

namespace {

// A layer with capacity drops, top-2 and every auxiliary loss and the noisy gate on: the
// configuration the cross-checks (EP=2 vs EP=1, CUDA vs CPU) run under each routing policy.
MoeLayerConfig every_loss_config(int hidden, int ffn_hidden, int experts, RoutingPolicy routing, uint64_t seed) {
  MoeLayerConfig c;
  c.hidden = hidden;
  c.ffn_hidden = ffn_hidden;
  c.num_experts = experts;
  c.top_k = 2;
  c.capacity_factor = 0.75;
  c.routing = routing;
  c.renormalize_gates = routing == RoutingPolicy::kBatchPriority;
  c.switch_loss_weight = 0.1;
  c.importance_loss_weight = 0.2;
  c.load_loss_weight = 0.3;
  c.damex_loss_weight = 0.4;
  c.gate_noise_std = 1;
  c.damex_expert_of_dataset = {3, 1};
  c.seed = seed;
  return c;
}

Backend& cpu() {
  static std::unique_ptr<Backend> b = make_cpu_backend(1);
  return *b;
}

// Test data from splitmix64: the same on every platform and rank.
struct TestRng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) { return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1.0p-53; }
  int small_int(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<uint64_t>(hi - lo + 1)); }
};

void fill(Tensor& t, TestRng& rng, double lo, double hi) {
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = static_cast<float>(rng.uniform(lo, hi));
}

std::vector<double> to_double(const Tensor& t) {
  const float* p = t.f32();
  return std::vector<double>(p, p + t.numel());
}

// Compares `got` with `ref` elementwise: |got - ref| <= tol + |ref| * eps. Prints the max errors.
bool close(const std::string& what, const float* got, const std::vector<double>& ref, double tol, double eps) {
  double max_abs = 0, max_rel = 0;
  int64_t bad = 0, first_bad = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(got[i] - ref[i]);
    max_abs = std::max(max_abs, err);
    if (std::fabs(ref[i]) > 1e-12) max_rel = std::max(max_rel, err / std::fabs(ref[i]));
    if (!(err <= tol + std::fabs(ref[i]) * eps)) {
      if (first_bad < 0) first_bad = static_cast<int64_t>(i);
      ++bad;
    }
  }
  std::printf("  %-44s n=%-5zu max abs err %.3e  max rel err %.3e%s\n", what.c_str(), ref.size(), max_abs, max_rel,
              bad ? "  FAIL" : "");
  if (bad) {
    UNSCOPED_INFO(what << ": " << bad << " of " << ref.size() << " outside tolerance; first [" << first_bad
                       << "] got " << got[first_bad] << " want " << ref[static_cast<size_t>(first_bad)]);
  }
  return bad == 0;
}
bool close(const std::string& what, const Tensor& got, const std::vector<double>& ref, double tol, double eps) {
  REQUIRE(got.numel() == static_cast<int64_t>(ref.size()));
  return close(what, got.f32(), ref, tol, eps);
}

// ---------------------------------------------------------------------------------------------
// fp64 reference of the layer's forward (all experts on one rank) with a fixed routing.

struct RefSpec {
  int64_t D = 0, F = 0;
  int E = 0, k = 0;
  bool renorm = false;
  bool gelu = true;
  double sigma = 0;  // gate noise scale (gate_noise_std / E); 0: no noise, no load loss
  double w_switch = 0, w_importance = 0, w_load = 0, w_damex = 0;
  std::vector<int> damex_map;
};

struct RefParams {  // x and every parameter, all experts
  std::vector<double> x, wr, w1, b1, w2, b2;
  std::vector<double>* field(int i) {
    std::vector<double>* f[] = {&x, &wr, &w1, &b1, &w2, &b2};
    return f[i];
  }
};
const char* kFieldNames[] = {"dx", "dW_r", "dW1", "db1", "dW2", "db2"};

struct RefFixed {  // what finite differences hold fixed
  int64_t T = 0;
  std::vector<int32_t> experts;  // [T k]
  std::vector<uint8_t> keep;     // [T k]
  std::vector<double> eps;       // [T E] standard normal noise
  std::vector<int32_t> dataset;  // [T], -1 none (may be empty)
  std::vector<double> dy;        // [T D]
};

struct RefOut {
  std::vector<double> y;
  double switch_loss = 0, importance_loss = 0, load_loss = 0, damex_loss = 0;
  double objective = 0;  // sum(dy * y) + weighted aux losses
  std::vector<int32_t> topk;  // the reference's own top-k of p (descending, ties to lower index)
};

double gelu_ref(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
}
double cv2_ref(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size()), m = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double var = 0;
  for (double a : v) var += (a - m) * (a - m);
  return m > 0 ? var / n / (m * m) : 0;
}

RefOut ref_forward(const RefSpec& s, const RefParams& p, const RefFixed& f) {
  const int64_t T = f.T, D = s.D, F = s.F;
  const int E = s.E, k = s.k;
  RefOut out;
  out.y.assign(static_cast<size_t>(T * D), 0.0);
  std::vector<double> importance(E, 0.0), load(E, 0.0), count(E, 0.0);
  double damex_sum = 0, damex_n = 0;
  std::vector<double> g(E), z(E), prob(E), h(static_cast<size_t>(F)), o(static_cast<size_t>(D));
  for (int64_t t = 0; t < T; ++t) {
    const double* x = p.x.data() + t * D;
    for (int e = 0; e < E; ++e) {
      g[e] = 0;
      for (int64_t d = 0; d < D; ++d) g[e] += x[d] * p.wr[d * E + e];
      z[e] = g[e] + (s.sigma > 0 ? s.sigma * f.eps[t * E + e] : 0.0);
    }
    const double zmax = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += (prob[e] = std::exp(z[e] - zmax));
    for (int e = 0; e < E; ++e) prob[e] /= sum;
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int i = 0; i < j; ++i) taken |= out.topk[t * k + i] == e;
        if (!taken && (best < 0 || prob[e] > prob[best])) best = e;
      }
      out.topk.push_back(best);
    }
    const int32_t* c = f.experts.data() + t * k;
    double chosen = 0;
    for (int j = 0; j < k; ++j) chosen += prob[c[j]];
    for (int j = 0; j < k; ++j) {
      count[c[j]] += 1;
      if (!f.keep[t * k + j]) continue;
      const double w = s.renorm ? prob[c[j]] / chosen : prob[c[j]];
      const int e = c[j];
      for (int64_t q = 0; q < F; ++q) {
        double a = p.b1[e * F + q];
        for (int64_t d = 0; d < D; ++d) a += x[d] * p.w1[(e * D + d) * F + q];
        h[q] = s.gelu ? gelu_ref(a) : a;
      }
      for (int64_t d = 0; d < D; ++d) {
        double a = p.b2[e * D + d];
        for (int64_t q = 0; q < F; ++q) a += h[q] * p.w2[(e * F + q) * D + d];
        out.y[t * D + d] += w * a;
      }
    }
    for (int e = 0; e < E; ++e) importance[e] += prob[e];
    if (s.sigma > 0) {
      const double eta = z[c[k - 1]];
      for (int e = 0; e < E; ++e) load[e] += 0.5 * std::erfc(-((g[e] - eta) / s.sigma) / std::sqrt(2.0));
    }
    if (!f.dataset.empty() && f.dataset[t] >= 0) {
      damex_sum += -std::log(prob[s.damex_map[f.dataset[t]]]);
      damex_n += 1;
    }
  }
  const double Td = static_cast<double>(T);
  for (int e = 0; e < E; ++e) out.switch_loss += E * (count[e] / (k * Td)) * (importance[e] / Td);
  out.importance_loss = cv2_ref(importance);
  out.load_loss = s.sigma > 0 ? cv2_ref(load) : 0;
  out.damex_loss = damex_n > 0 ? damex_sum / damex_n : 0;
  for (size_t i = 0; i < out.y.size(); ++i) out.objective += f.dy[i] * out.y[i];
  out.objective += s.w_switch * out.switch_loss + s.w_importance * out.importance_loss + s.w_load * out.load_loss +
                   s.w_damex * out.damex_loss;
  return out;
}

// Central differences of the reference objective with respect to x and every parameter.
std::vector<std::vector<double>> finite_differences(const RefSpec& s, RefParams p, const RefFixed& f) {
  constexpr double h = 1e-5;
  std::vector<std::vector<double>> grads;
  for (int i = 0; i < 6; ++i) {
    std::vector<double>& v = *p.field(i);
    std::vector<double> g(v.size());
    for (size_t j = 0; j < v.size(); ++j) {
      const double keep = v[j];
      v[j] = keep + h;
      const double up = ref_forward(s, p, f).objective;
      v[j] = keep - h;
      const double down = ref_forward(s, p, f).objective;
      v[j] = keep;
      g[j] = (up - down) / (2 * h);
    }
    grads.push_back(std::move(g));
  }
  return grads;
}

RefSpec spec_of(const MoeLayerConfig& c, bool training) {
  RefSpec s;
  s.D = c.hidden;
  s.F = c.ffn_hidden;
  s.E = c.num_experts;
  s.k = c.top_k;
  s.renorm = c.renormalize_gates;
  s.gelu = c.activation == ExpertActivation::kGelu;
  s.sigma = training ? c.gate_noise_std / c.num_experts : 0;
  s.w_switch = c.switch_loss_weight;
  s.w_importance = c.importance_loss_weight;
  s.w_load = c.load_loss_weight;
  s.w_damex = c.damex_loss_weight;
  s.damex_map = c.damex_expert_of_dataset;
  return s;
}

MoeLayerConfig small_config() {
  MoeLayerConfig c;
  c.hidden = 6;
  c.ffn_hidden = 10;
  c.num_experts = 4;
  c.top_k = 2;
  c.capacity_factor = 0.75;  // C = ceil(0.75 * 2 * 12 / 4) = 5 < 6 = the mean load: some drops
  c.seed = 11;
  return c;
}

// Runs one forward and backward of a single-rank layer on random data and checks every gradient
// (and y and the aux losses) against the fp64 reference.
void check_against_reference(const MoeLayerConfig& config, bool with_dy, bool with_datasets) {
  constexpr int64_t T = 12;
  MoeLayer layer(config, cpu());
  TestRng rng{config.seed * 1000 + 17};
  // Larger router weights spread the gate probabilities; random biases so db and b matter.
  fill(layer.router_weight(), rng, -1.5, 1.5);
  fill(layer.b1(), rng, -0.5, 0.5);
  fill(layer.b2(), rng, -0.5, 0.5);
  Tensor x = Tensor::empty({T, config.hidden}), dy = Tensor::zeros({T, config.hidden});
  fill(x, rng, -1, 1);
  if (with_dy) fill(dy, rng, -1, 1);
  std::vector<int32_t> datasets(T, -1);
  if (with_datasets)
    for (int64_t t = 0; t < T; ++t)
      datasets[t] = t % 3 == 2 ? -1 : static_cast<int32_t>(t % config.damex_expert_of_dataset.size());

  MoeForwardOptions fo;
  fo.step = 3;
  if (with_datasets) fo.dataset_ids = datasets;
  Tensor y = layer.forward(x, fo);
  Tensor dx = layer.backward(dy);

  RefSpec spec = spec_of(config, true);
  RefParams p{to_double(x), to_double(layer.router_weight()), to_double(layer.w1()), to_double(layer.b1()),
              to_double(layer.w2()), to_double(layer.b2())};
  RefFixed f;
  f.T = T;
  f.experts.assign(layer.chosen_experts().begin(), layer.chosen_experts().end());
  f.keep.assign(layer.kept().begin(), layer.kept().end());
  f.dy = to_double(dy);
  if (with_datasets) f.dataset = datasets;
  f.eps.resize(static_cast<size_t>(T * config.num_experts));
  for (int64_t t = 0; t < T; ++t)
    for (int e = 0; e < config.num_experts; ++e)
      f.eps[t * config.num_experts + e] = gate_noise_sample(layer.gate_noise_key(), 3, t, e);

  const RefOut ref = ref_forward(spec, p, f);
  // The fixed routing is the reference's own at this point (no near-tie in the test data).
  REQUIRE(ref.topk == f.experts);
  // C = 5 slots x 4 experts < 24 assignments: the capacity decision is exercised.
  const int64_t dropped = layer.routing_stats().dropped_assignments;
  if (config.routing != RoutingPolicy::kNoDrop) CHECK(dropped >= 4);
  CHECK(close("y", y, ref.y, 1e-5, 1e-5));
  CHECK(layer.aux_losses().switch_loss == Approx(ref.switch_loss).epsilon(1e-5));
  CHECK(layer.aux_losses().importance_loss == Approx(ref.importance_loss).epsilon(1e-4).margin(1e-8));
  CHECK(layer.aux_losses().load_loss == Approx(ref.load_loss).epsilon(1e-4).margin(1e-8));
  CHECK(layer.aux_losses().damex_loss == Approx(ref.damex_loss).epsilon(1e-5));

  const std::vector<std::vector<double>> fd = finite_differences(spec, p, f);
  const Tensor* got[] = {&dx, &layer.router_weight_grad(), &layer.w1_grad(), &layer.b1_grad(), &layer.w2_grad(),
                         &layer.b2_grad()};
  for (int i = 0; i < 6; ++i) CHECK(close(kFieldNames[i], *got[i], fd[i], 2e-6, 2e-4));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST_CASE("Capacity: ceil(capacity_factor k T / E), snapped within the precision policy", "[moe]") {
  CHECK(moesim::cost::expert_capacity(6, 2, 1, 1.0) == 3);
  CHECK(moesim::cost::expert_capacity(8, 3, 2, 0.5) == 3);       // 2.67 -> 3
  CHECK(moesim::cost::expert_capacity(100, 10, 1, 1.1) == 11);   // 11.000000000000002 is 11
  CHECK(moesim::cost::expert_capacity(12, 4, 2, 0.75) == 5);     // 4.5 -> 5
  CHECK(moesim::cost::expert_capacity(4096, 8, 2, 1.25) == 1280);
  CHECK(moesim::cost::expert_capacity(0, 8, 2, 1.25) == 0);
}

TEST_CASE("top_k_rows: the k largest probabilities, descending, ties to the lower index", "[moe]") {
  const std::vector<float> p = {0.1f, 0.4f, 0.1f, 0.4f,   //
                                0.25f, 0.25f, 0.25f, 0.25f,  //
                                0.05f, 0.15f, 0.7f, 0.1f};
  std::vector<int32_t> got(6);
  top_k_rows(p.data(), 3, 4, 2, got.data());
  CHECK(got == std::vector<int32_t>{1, 3, 0, 1, 2, 1});
  std::vector<int32_t> all(4);
  top_k_rows(p.data() + 8, 1, 4, 4, all.data());
  CHECK(all == std::vector<int32_t>{2, 1, 3, 0});
}

TEST_CASE("assign_capacity: vanilla fills in token order, BPR by top probability, first choices first", "[moe]") {
  // E = 3, T = 4, k = 2, C = 2. Token: choices (top probability)
  //   t0: 0, 1 (.5)   t1: 0, 2 (.9)   t2: 0, 1 (.7)   t3: 1, 0 (.6)
  const std::vector<int32_t> experts = {0, 1, 0, 2, 0, 1, 1, 0};
  const std::vector<float> top = {0.5f, 0.9f, 0.7f, 0.6f};
  // Vanilla: t0 takes e0 e1; t1 e0 e2; t2: e0 is full, e1 (2nd); t3: e1 full, e0 full.
  CHECK(assign_capacity(RoutingPolicy::kVanilla, 2, 3, 2, 4, experts, top) ==
        std::vector<uint8_t>{1, 1, 1, 1, 0, 1, 0, 0});
  // BPR, order t1 t2 t3 t0. 1st choices: t1 e0, t2 e0, t3 e1 kept; t0 e0 full.
  // 2nd choices: t1 e2 kept, t2 e1 kept (e1: 2), t3 e0 full, t0 e1 full.
  CHECK(assign_capacity(RoutingPolicy::kBatchPriority, 2, 3, 2, 4, experts, top) ==
        std::vector<uint8_t>{0, 0, 1, 1, 1, 1, 1, 0});
  CHECK(assign_capacity(RoutingPolicy::kNoDrop, 0, 3, 2, 4, experts, top) == std::vector<uint8_t>(8, 1));
  // Equal priorities go in token order.
  const std::vector<int32_t> one = {0, 0, 0};
  const std::vector<float> tied = {0.5f, 0.8f, 0.5f};
  CHECK(assign_capacity(RoutingPolicy::kBatchPriority, 2, 1, 1, 3, one, tied) == std::vector<uint8_t>{1, 1, 0});
}

TEST_CASE("The layer drops exactly the overflowing tokens: vanilla in token order, BPR by top probability",
          "[moe]") {
  // D = E = 2 with W_r = I: the logits are the tokens themselves. C = ceil(1 * 1 * 6 / 2) = 3.
  // Expert 0 is chosen by t0 (logit 1), t1 (0.5), t3 (2), t4 (3), t5 (4); expert 1 by t2 alone.
  const std::vector<float> logits = {1, 0, 0.5f, 0, 0, 2, 2, 0, 3, 0, 4, 0};
  const auto policy = GENERATE(RoutingPolicy::kVanilla, RoutingPolicy::kBatchPriority);
  MoeLayerConfig c;
  c.hidden = 2;
  c.ffn_hidden = 3;
  c.num_experts = 2;
  c.top_k = 1;
  c.capacity_factor = 1.0;
  c.routing = policy;
  MoeLayer layer(c, cpu());
  const float eye[] = {1, 0, 0, 1};
  std::memcpy(layer.router_weight().f32(), eye, sizeof eye);
  std::fill_n(layer.b2().f32(), layer.b2().numel(), 1.0f);  // every kept token gets a non-zero output
  Tensor y = layer.forward(Tensor::from({6, 2}, logits));
  INFO(routing_policy_name(policy));
  const std::vector<uint8_t> want = policy == RoutingPolicy::kVanilla ? std::vector<uint8_t>{1, 1, 1, 1, 0, 0}
                                                                      : std::vector<uint8_t>{0, 0, 1, 1, 1, 1};
  CHECK(std::vector<uint8_t>(layer.kept().begin(), layer.kept().end()) == want);
  CHECK(layer.routing_stats().expert_capacity == 3);
  CHECK(layer.routing_stats().assigned_per_expert == std::vector<int64_t>{5, 1});
  CHECK(layer.routing_stats().kept_per_expert == std::vector<int64_t>{3, 1});
  CHECK(layer.routing_stats().dropped_assignments == 2);
  for (int64_t t = 0; t < 6; ++t) {
    INFO("token " << t);
    const bool zero = y.f32()[t * 2] == 0.0f && y.f32()[t * 2 + 1] == 0.0f;
    CHECK(zero == !want[t]);  // a dropped token's output is exactly 0 (the residual carries it)
  }

  SECTION("no_drop keeps everything and reports the busiest expert's load as capacity") {
    MoeLayerConfig nd = c;
    nd.routing = RoutingPolicy::kNoDrop;
    MoeLayer l2(nd, cpu());
    std::memcpy(l2.router_weight().f32(), eye, sizeof eye);
    l2.forward(Tensor::from({6, 2}, logits));
    CHECK(l2.routing_stats().dropped_assignments == 0);
    CHECK(l2.routing_stats().expert_capacity == 5);
    CHECK(l2.routing_stats().kept_per_expert == std::vector<int64_t>{5, 1});
  }
}

TEST_CASE("Aux losses: hand-computed values on two tokens and two experts", "[moe][aux]") {
  // W_r = I: token 0 has logits (ln 3, 0) -> p = (3/4, 1/4); token 1 (0, 0) -> p = (1/2, 1/2), top-1
  // goes to expert 0 (tie to the lower index). Both tokens choose expert 0: f = (1, 0).
  MoeLayerConfig c;
  c.hidden = 2;
  c.ffn_hidden = 2;
  c.num_experts = 2;
  c.top_k = 1;
  c.routing = RoutingPolicy::kNoDrop;
  c.switch_loss_weight = 0.5;
  c.importance_loss_weight = 2;
  c.damex_loss_weight = 3;
  c.damex_expert_of_dataset = {1, 0};  // dataset 0 -> expert 1, dataset 1 -> expert 0
  MoeLayer layer(c, cpu());
  const float eye[] = {1, 0, 0, 1};
  std::memcpy(layer.router_weight().f32(), eye, sizeof eye);
  const std::vector<int32_t> ids = {0, 1};
  MoeForwardOptions fo;
  fo.dataset_ids = ids;
  layer.forward(Tensor::from({2, 2}, {static_cast<float>(std::log(3.0)), 0, 0, 0}), fo);
  const MoeAuxLosses& a = layer.aux_losses();
  // P = (5/8, 3/8): Switch = 2 (1 * 5/8 + 0 * 3/8) = 1.25.
  CHECK(a.switch_loss == Approx(1.25).epsilon(1e-6));
  // I = (5/4, 3/4), mean 1, variance 1/16.
  CHECK(a.importance_loss == Approx(0.0625).epsilon(1e-5));
  // DAMEX: token 0 -> expert 1: -ln(1/4); token 1 -> expert 0: -ln(1/2); mean 1.5 ln 2.
  CHECK(a.damex_loss == Approx(1.5 * std::log(2.0)).epsilon(1e-6));
  CHECK(a.load_loss == 0);  // no noisy gate
  CHECK(a.weighted_total == Approx(0.5 * 1.25 + 2 * 0.0625 + 3 * 1.5 * std::log(2.0)).epsilon(1e-6));

  SECTION("the load loss from the V-MoE formula with the layer's noise draws") {
    MoeLayerConfig n = c;
    n.gate_noise_std = 1;  // sigma = 1 / E = 0.5
    n.load_loss_weight = 1;
    MoeLayer noisy(n, cpu());
    std::memcpy(noisy.router_weight().f32(), eye, sizeof eye);
    MoeForwardOptions o2;
    o2.step = 5;
    const double g[2][2] = {{std::log(3.0), 0}, {0, 0}};
    noisy.forward(Tensor::from({2, 2}, {static_cast<float>(g[0][0]), 0, 0, 0}), o2);
    double load[2] = {0, 0};
    for (int t = 0; t < 2; ++t) {
      double z[2];
      for (int e = 0; e < 2; ++e) z[e] = g[t][e] + 0.5 * gate_noise_sample(noisy.gate_noise_key(), 5, t, e);
      const int top = z[1] > z[0] ? 1 : 0;
      CHECK(noisy.chosen_experts()[t] == top);
      for (int e = 0; e < 2; ++e) load[e] += 0.5 * std::erfc(-((g[t][e] - z[top]) / 0.5) / std::sqrt(2.0));
    }
    const double m = (load[0] + load[1]) / 2, var = ((load[0] - m) * (load[0] - m) + (load[1] - m) * (load[1] - m)) / 2;
    CHECK(noisy.aux_losses().load_loss == Approx(var / (m * m)).epsilon(1e-5));
    MoeForwardOptions eval;
    eval.training = false;
    noisy.forward(Tensor::from({2, 2}, {static_cast<float>(g[0][0]), 0, 0, 0}), eval);
    CHECK(noisy.aux_losses().load_loss == 0);  // evaluation: no noise, no load loss
  }
}

TEST_CASE("Expert FFN, combine and gate backward match finite differences", "[moe][grad]") {
  MoeLayerConfig c = small_config();
  c.renormalize_gates = GENERATE(false, true);
  c.routing = GENERATE(RoutingPolicy::kVanilla, RoutingPolicy::kBatchPriority);
  std::printf("expert FFN / combine / gate, renormalize=%d, %s\n", c.renormalize_gates ? 1 : 0,
              routing_policy_name(c.routing));
  check_against_reference(c, /*with_dy=*/true, /*with_datasets=*/false);
}

TEST_CASE("Identity experts backward matches finite differences", "[moe][grad]") {
  MoeLayerConfig c = small_config();
  c.activation = ExpertActivation::kIdentity;
  std::printf("identity experts\n");
  check_against_reference(c, true, false);
}

TEST_CASE("Each aux loss's backward matches finite differences", "[moe][grad][aux]") {
  MoeLayerConfig c = small_config();
  c.damex_expert_of_dataset = {2, 0, 3};
  const std::string which = GENERATE(as<std::string>{}, "switch", "importance", "load", "damex", "all + dy");
  if (which == "switch") c.switch_loss_weight = 1;
  if (which == "importance") c.importance_loss_weight = 1;
  if (which == "load") c.load_loss_weight = 1;
  if (which == "damex") c.damex_loss_weight = 1;
  if (which == "load" || which == "all + dy") c.gate_noise_std = 1;
  if (which == "all + dy") {
    c.switch_loss_weight = 0.3;
    c.importance_loss_weight = 0.7;
    c.load_loss_weight = 0.5;
    c.damex_loss_weight = 0.2;
    c.renormalize_gates = true;
    c.routing = RoutingPolicy::kBatchPriority;
  }
  std::printf("aux loss: %s\n", which.c_str());
  INFO(which);
  check_against_reference(c, which == "all + dy", which == "damex" || which == "all + dy");
}

TEST_CASE("Dispatch and combine are exact with small integers and identity-like experts", "[moe][exact]") {
  // D = 6, E = 4, k = 2, renormalised gates. W_r's first E rows are 4 I and the rest zero; token t's
  // first E features are 1 on its two experts' positions, so its two logits are equal (4) and each
  // gate weight is exactly 1/2. Experts: W1 = I (D x F), b1 small integers, identity activation,
  // W2 = (e + 1) I (F x D), b2 = e: expert e maps x to (e + 1)(x + b1) + e, exact in fp32.
  constexpr int64_t T = 10, D = 6, F = 8;
  constexpr int E = 4, k = 2;
  MoeLayerConfig c;
  c.hidden = D;
  c.ffn_hidden = F;
  c.num_experts = E;
  c.top_k = k;
  c.renormalize_gates = true;
  c.activation = ExpertActivation::kIdentity;
  // (BPR is left to the capacity tests: equal logits at different positions sum their softmax
  // terms in different orders, so the top probabilities, BPR's priorities, differ in the last bit.)
  c.routing = GENERATE(RoutingPolicy::kNoDrop, RoutingPolicy::kVanilla);
  c.capacity_factor = 0.75;  // C = ceil(0.75 * 2 * 10 / 4) = 4 for vanilla
  MoeLayer layer(c, cpu());
  std::fill_n(layer.router_weight().f32(), D * E, 0.0f);
  for (int e = 0; e < E; ++e) layer.router_weight().f32()[e * E + e] = 4;
  std::fill_n(layer.w1().f32(), layer.w1().numel(), 0.0f);
  std::fill_n(layer.w2().f32(), layer.w2().numel(), 0.0f);
  TestRng rng{99};
  std::vector<int> b1(E * F);
  for (int e = 0; e < E; ++e) {
    for (int64_t d = 0; d < D; ++d) {
      layer.w1().f32()[(e * D + d) * F + d] = 1;
      layer.w2().f32()[(e * F + d) * D + d] = static_cast<float>(e + 1);
      layer.b2().f32()[e * D + d] = static_cast<float>(e);
    }
    for (int64_t f = 0; f < F; ++f) {
      b1[e * F + f] = rng.small_int(-3, 3);
      layer.b1().f32()[e * F + f] = static_cast<float>(b1[e * F + f]);
    }
  }
  const int pairs[][2] = {{0, 1}, {0, 2}, {1, 3}, {0, 1}, {2, 3}, {0, 3}, {1, 2}, {0, 1}, {0, 2}, {2, 3}};
  Tensor x = Tensor::zeros({T, D}), dy = Tensor::empty({T, D});
  for (int64_t t = 0; t < T; ++t) {
    x.f32()[t * D + pairs[t][0]] = 1;
    x.f32()[t * D + pairs[t][1]] = 1;
    for (int64_t d = E; d < D; ++d) x.f32()[t * D + d] = static_cast<float>(rng.small_int(-4, 4));
    for (int64_t d = 0; d < D; ++d) dy.f32()[t * D + d] = static_cast<float>(rng.small_int(-3, 3));
  }
  Tensor y = layer.forward(x);
  layer.backward(dy);
  INFO(routing_policy_name(c.routing));

  std::vector<int32_t> experts;
  for (const auto& pr : pairs) experts.insert(experts.end(), {pr[0], pr[1]});
  const std::vector<float> prio(T, 0.5f);
  const std::vector<uint8_t> keep = assign_capacity(c.routing, 4, E, k, T, experts, prio);
  CHECK(std::vector<int32_t>(layer.chosen_experts().begin(), layer.chosen_experts().end()) == experts);
  CHECK(std::vector<uint8_t>(layer.kept().begin(), layer.kept().end()) == keep);
  for (float w : layer.gate_weights()) CHECK(w == 0.5f);

  std::vector<float> want_y(T * D, 0.0f), want_dw1(E * D * F, 0.0f), want_db1(E * F, 0.0f), want_dw2(E * F * D, 0.0f),
      want_db2(E * D, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      if (!keep[t * k + j]) continue;
      const int e = experts[t * k + j];
      for (int64_t d = 0; d < D; ++d) {
        const double xin = x.f32()[t * D + d];
        const double g = 0.5 * dy.f32()[t * D + d];  // d(output) = w dy
        want_y[t * D + d] += static_cast<float>(0.5 * ((e + 1) * (xin + b1[e * F + d]) + e));
        want_db2[e * D + d] += static_cast<float>(g);
        want_db1[e * F + d] += static_cast<float>((e + 1) * g);  // dh = W2 g = (e + 1) g
        for (int64_t q = 0; q < F; ++q) {  // dW2[q][d] += h_q g_d, h = x + b1 (zero-padded x)
          const double h = (q < D ? x.f32()[t * D + q] : 0.0) + b1[e * F + q];
          want_dw2[(e * F + q) * D + d] += static_cast<float>(h * g);
        }
        for (int64_t dd = 0; dd < D; ++dd)  // dW1[dd][d] += x_dd dh_d
          want_dw1[(e * D + dd) * F + d] += static_cast<float>(x.f32()[t * D + dd] * (e + 1) * g);
      }
    }
  CHECK(y.to_vector() == want_y);
  CHECK(layer.b2_grad().to_vector() == want_db2);
  CHECK(layer.b1_grad().to_vector() == want_db1);
  CHECK(layer.w2_grad().to_vector() == want_dw2);
  CHECK(layer.w1_grad().to_vector() == want_dw1);
}

TEST_CASE("Parameters: seeded, expert e's weights do not depend on the EP layout", "[moe][init]") {
  // A stand-in for rank 1 of a 2-rank EP group: construction never communicates.
  class FakeComm final : public Comm {
   public:
    int rank() const override { return 1; }
    int size() const override { return 2; }
    std::string name() const override { return "fake"; }
    void all_to_all_v(const float*, const std::vector<int64_t>&, float*, const std::vector<int64_t>&) override {
      fail();
    }
    void all_reduce_sum(float*, int64_t) override { fail(); }
    void all_gather(const float*, float*, int64_t) override { fail(); }
    void reduce_scatter_sum(const float*, float*, int64_t) override { fail(); }
    void send(const float*, int64_t, int, int) override { fail(); }
    void recv(float*, int64_t, int, int) override { fail(); }
    void all_to_all_counts(const std::vector<int64_t>&, std::vector<int64_t>&) override { fail(); }
    void barrier() override { fail(); }
    std::unique_ptr<Comm> split(int, int) const override { fail(); }

   private:
    [[noreturn]] static void fail() { throw Error("FakeComm does not communicate"); }
  };
  MoeLayerConfig c = small_config();
  MoeLayer whole(c, cpu());
  FakeComm fake;
  MoeLayer half(c, cpu(), &fake);
  REQUIRE(half.local_experts() == 2);
  REQUIRE(half.first_local_expert() == 2);
  const std::vector<float> w1 = whole.w1().to_vector(), w2 = whole.w2().to_vector();
  const int64_t per1 = c.hidden * c.ffn_hidden;
  CHECK(half.w1().to_vector() == std::vector<float>(w1.begin() + 2 * per1, w1.end()));
  CHECK(half.w2().to_vector() == std::vector<float>(w2.begin() + 2 * per1, w2.end()));
  CHECK(half.router_weight().to_vector() == whole.router_weight().to_vector());
  MoeLayer again(c, cpu());
  CHECK(again.w1().to_vector() == w1);
  MoeLayerConfig other = c;
  other.seed = 12;
  CHECK(MoeLayer(other, cpu()).w1().to_vector() != w1);
  // Bound: uniform in +-1/sqrt(fan_in).
  for (float v : w1) CHECK(std::fabs(v) <= 1 / std::sqrt(static_cast<float>(c.hidden)));

  ParamRegistry reg;
  half.register_params(reg);
  REQUIRE(reg.size() == 5);
  CHECK(reg.find("moe.router.weight")->sharing == ParamSharing::kReplicated);
  CHECK(reg.find("moe.experts.w1")->sharing == ParamSharing::kLocal);
  CHECK(reg.find("moe.experts.w1")->value.numel() == 2 * per1);
}

TEST_CASE("Gate noise: a pure function of (key, step, token, expert), standard normal", "[moe]") {
  CHECK(gate_noise_sample(1, 2, 3, 4) == gate_noise_sample(1, 2, 3, 4));
  CHECK(gate_noise_sample(1, 2, 3, 4) != gate_noise_sample(1, 2, 3, 5));
  CHECK(gate_noise_sample(1, 2, 3, 4) != gate_noise_sample(1, 3, 3, 4));
  double sum = 0, sq = 0;
  constexpr int n = 20000;
  for (int i = 0; i < n; ++i) {
    const double v = gate_noise_sample(7, 0, i / 8, i % 8);
    sum += v;
    sq += v * v;
  }
  CHECK(std::fabs(sum / n) < 0.03);  // 4 standard errors
  CHECK(std::fabs(sq / n - 1) < 0.05);
}

TEST_CASE("Config errors list every problem, and bad inputs throw exec::Error", "[moe][errors]") {
  MoeLayerConfig c;
  c.hidden = 0;
  c.ffn_hidden = 4;
  c.num_experts = 6;
  c.top_k = 7;
  c.load_loss_weight = 1;
  c.damex_expert_of_dataset = {9};
  const std::vector<std::string> bad = validate(c, 4);
  CHECK(bad.size() == 5);  // hidden, top_k, 6 % 4, load without noise, damex map
  try {
    MoeLayer layer(c, cpu());
    FAIL("no exception");
  } catch (const Error& e) {
    CHECK_THAT(e.what(), Contains("hidden must be > 0") && Contains("top_k") && Contains("gate_noise_std > 0") &&
                             Contains("damex_expert_of_dataset[0] = 9"));
  }
  MoeLayer layer(small_config(), cpu());
  CHECK_THROWS_AS(layer.forward(Tensor::zeros({4, 5})), Error);
  CHECK_THROWS_AS(layer.backward(Tensor::zeros({4, 6})), Error);  // no forward yet
  const std::vector<int32_t> ids = {0, 0, 0, 0};
  MoeForwardOptions fo;
  fo.dataset_ids = ids;  // no DAMEX datasets configured
  CHECK_THROWS_AS(layer.forward(Tensor::zeros({4, 6}), fo), Error);
  MoeForwardOptions counted;
  counted.tokens_per_rank = 3;  // this rank has 4
  CHECK_THROWS_WITH(layer.forward(Tensor::zeros({4, 6}), counted), Contains("tokens_per_rank 3 but this rank has 4"));
  layer.forward(Tensor::zeros({4, 6}));
  CHECK_THROWS_AS(layer.backward(Tensor::zeros({3, 6})), Error);
  CHECK_NOTHROW(layer.backward(Tensor::zeros({4, 6})));  // a bad dy does not consume the forward
  CHECK_THROWS_AS(layer.backward(Tensor::zeros({4, 6})), Error);  // one backward per forward

  for (RoutingPolicy p : {RoutingPolicy::kVanilla, RoutingPolicy::kBatchPriority, RoutingPolicy::kNoDrop})
    CHECK(routing_policy_from_name(routing_policy_name(p)) == p);
  CHECK(routing_policy_from_name("BATCH_PRIORITY") == RoutingPolicy::kBatchPriority);
  CHECK_FALSE(routing_policy_from_name("bpr").has_value());
}

TEST_CASE("Timings and the routing histogram are filled", "[moe]") {
  MoeLayerConfig c = small_config();
  MoeLayer layer(c, cpu());
  TestRng rng{5};
  Tensor x = Tensor::empty({12, 6}), dy = Tensor::empty({12, 6});
  fill(x, rng, -1, 1);
  fill(dy, rng, -1, 1);
  // Untimed (a step's): no GEMM time or FLOPs counted.
  layer.forward(x);
  layer.backward(dy);
  CHECK(layer.forward_times().expert_gemm_s == 0);
  CHECK(layer.backward_times().expert_gemm_flops == 0);
  layer.zero_grad();
  layer.time_expert_gemms(true);
  layer.forward(x);
  layer.backward(dy);
  const MoeRoutingStats& s = layer.routing_stats();
  CHECK(s.tokens == 12);
  CHECK(std::accumulate(s.assigned_per_expert.begin(), s.assigned_per_expert.end(), int64_t{0}) == 24);
  const int64_t kept = std::accumulate(s.kept_per_expert.begin(), s.kept_per_expert.end(), int64_t{0});
  CHECK(kept + s.dropped_assignments == 24);
  for (int e = 0; e < 4; ++e) CHECK(s.kept_per_expert[e] == std::min<int64_t>(s.assigned_per_expert[e], 5));
  for (const MoePartTimes* t : {&layer.forward_times(), &layer.backward_times()}) {
    CHECK(t->gate_s > 0);
    CHECK(t->experts_s > 0);
    CHECK(t->expert_gemm_s > 0);
    CHECK(t->expert_gemm_s <= t->experts_s);
  }
  // Forward: 2 GEMMs per kept row of 2 D F flops each.
  CHECK(layer.forward_times().expert_gemm_flops == Approx(2.0 * 2 * 6 * 10 * kept));
  CHECK(layer.backward_times().expert_gemm_flops == Approx(4.0 * 2 * 6 * 10 * kept));
}

// ---------------------------------------------------------------------------------------------
// EP=2 over 2 MPI ranks (hidden: run under mpirun -np 2 with "[ep2]").

namespace {

struct EpRun {
  std::vector<float> y, dx, dwr, dw1, db1, dw2, db2;
  std::vector<uint8_t> keep;
  MoeAuxLosses aux;
  MoeRoutingStats stats;
};

// Runs forward + backward on tokens [begin, end) of the batch; gradients of local experts only.
// tokens_per_rank: MoeForwardOptions's (0: the ranks exchange their token counts).
EpRun run_layer(MoeLayer& layer, const Tensor& x_all, const Tensor& dy_all, const std::vector<int32_t>& ids_all,
                int64_t begin, int64_t end, int64_t tokens_per_rank = 0) {
  const int64_t D = x_all.dim(1), T = end - begin;
  const std::vector<float> xs(x_all.f32() + begin * D, x_all.f32() + end * D);
  const std::vector<float> gs(dy_all.f32() + begin * D, dy_all.f32() + end * D);
  const std::vector<int32_t> ids(ids_all.begin() + begin, ids_all.begin() + end);
  MoeForwardOptions fo;
  fo.step = 9;
  fo.tokens_per_rank = tokens_per_rank;
  if (!layer.config().damex_expert_of_dataset.empty()) fo.dataset_ids = ids;
  EpRun r;
  r.y = layer.forward(Tensor::from({T, D}, xs), fo).to_vector();
  r.dx = layer.backward(Tensor::from({T, D}, gs)).to_vector();
  r.dwr = layer.router_weight_grad().to_vector();
  r.dw1 = layer.w1_grad().to_vector();
  r.db1 = layer.b1_grad().to_vector();
  r.dw2 = layer.w2_grad().to_vector();
  r.db2 = layer.b2_grad().to_vector();
  r.keep.assign(layer.kept().begin(), layer.kept().end());
  r.aux = layer.aux_losses();
  r.stats = layer.routing_stats();
  return r;
}

std::vector<double> slice(const std::vector<float>& v, size_t begin, size_t n) {
  return std::vector<double>(v.begin() + static_cast<std::ptrdiff_t>(begin),
                             v.begin() + static_cast<std::ptrdiff_t>(begin + n));
}

void compare_ep(const MoeLayerConfig& c, const Tensor& x, const Tensor& dy, const std::vector<int32_t>& ids,
                bool bit_exact, const std::function<void(MoeLayer&)>& set_params) {
  std::unique_ptr<Comm> world = make_mpi_comm(60);
  REQUIRE(world->size() == 2);
  const int me = world->rank();
  const int64_t T = x.dim(0), half = T / 2, D = c.hidden, F = c.ffn_hidden;
  MoeLayer one(c, cpu());
  MoeLayer two(c, cpu(), world.get());
  set_params(one);
  set_params(two);
  REQUIRE(two.local_experts() == c.num_experts / 2);
  const EpRun a = run_layer(one, x, dy, ids, 0, T);
  const EpRun b = run_layer(two, x, dy, ids, me * half, (me + 1) * half);
  std::vector<float> dwr = b.dwr;  // W_r's gradient: the caller's all-reduce over the group
  world->all_reduce_sum(dwr.data(), static_cast<int64_t>(dwr.size()));

  INFO("rank " << me << (bit_exact ? ", bit-exact" : ", within fp32 round-off"));
  CHECK(std::vector<uint8_t>(a.keep.begin() + me * half * c.top_k, a.keep.begin() + (me + 1) * half * c.top_k) ==
        b.keep);
  CHECK(a.stats.assigned_per_expert == b.stats.assigned_per_expert);
  CHECK(a.stats.kept_per_expert == b.stats.kept_per_expert);
  CHECK(a.stats.expert_capacity == b.stats.expert_capacity);
  CHECK(b.stats.tokens == T);
  const int El = two.local_experts(), e0 = two.first_local_expert();
  const double tol = bit_exact ? 0 : 2e-6, eps = bit_exact ? 0 : 2e-5;
  // W_r's gradient sums over tokens in a different grouping (two GEMMs and an all-reduce vs one
  // GEMM): bit-exact only when every term is exact (top-1 with renormalised gates: all zero).
  const bool router_exact = bit_exact && c.top_k == 1;
  const std::string r = " (rank " + std::to_string(me) + ")";
  CHECK(close("EP2 vs EP1: y" + r, b.y.data(), slice(a.y, me * half * D, half * D), tol, eps));
  CHECK(close("EP2 vs EP1: dx" + r, b.dx.data(), slice(a.dx, me * half * D, half * D), tol, eps));
  CHECK(close("EP2 vs EP1: dW1" + r, b.dw1.data(), slice(a.dw1, e0 * D * F, El * D * F), tol, eps));
  CHECK(close("EP2 vs EP1: db1" + r, b.db1.data(), slice(a.db1, e0 * F, El * F), tol, eps));
  CHECK(close("EP2 vs EP1: dW2" + r, b.dw2.data(), slice(a.dw2, e0 * F * D, El * F * D), tol, eps));
  CHECK(close("EP2 vs EP1: db2" + r, b.db2.data(), slice(a.db2, e0 * D, El * D), tol, eps));
  CHECK(close("EP2 vs EP1: dW_r (summed)" + r, dwr.data(), slice(a.dwr, 0, a.dwr.size()), router_exact ? 0 : 2e-6,
              router_exact ? 0 : 2e-5));
  {
    CHECK(b.aux.switch_loss == Approx(a.aux.switch_loss).epsilon(1e-5));
    CHECK(b.aux.importance_loss == Approx(a.aux.importance_loss).epsilon(1e-4).margin(1e-9));
    CHECK(b.aux.load_loss == Approx(a.aux.load_loss).epsilon(1e-4).margin(1e-9));
    CHECK(b.aux.damex_loss == Approx(a.aux.damex_loss).epsilon(1e-5));
  }
  // Token counts given by the caller (as the trainer does) instead of exchanged: the same layer.
  MoeLayer given(c, cpu(), world.get());
  set_params(given);
  const EpRun g = run_layer(given, x, dy, ids, me * half, (me + 1) * half, half);
  CHECK(g.y == b.y);
  CHECK(g.dx == b.dx);
  CHECK(g.dw1 == b.dw1);
  CHECK(g.keep == b.keep);
  CHECK(g.aux.weighted_total == b.aux.weighted_total);
  world->barrier();
}

}  // namespace

TEST_CASE("EP=2 over 2 ranks matches EP=1: random inputs, every loss, noisy gate", "[.ep2]") {
  const MoeLayerConfig c =
      every_loss_config(8, 16, 4, GENERATE(RoutingPolicy::kVanilla, RoutingPolicy::kBatchPriority, RoutingPolicy::kNoDrop), 21);
  constexpr int64_t T = 40;
  TestRng rng{1234};
  Tensor x = Tensor::empty({T, c.hidden}), dy = Tensor::empty({T, c.hidden});
  fill(x, rng, -1, 1);
  fill(dy, rng, -1, 1);
  std::vector<int32_t> ids(T);
  for (int64_t t = 0; t < T; ++t) ids[t] = static_cast<int32_t>(t % 3) - 1;
  std::printf("EP=2 vs EP=1, %s\n", routing_policy_name(c.routing));
  compare_ep(c, x, dy, ids, false, [](MoeLayer& l) {
    TestRng prng{77};
    fill(l.router_weight(), prng, -1, 1);
  });
}

TEST_CASE("EP=2 over 2 ranks matches EP=1 bit for bit with small integers", "[.ep2]") {
  MoeLayerConfig c;
  c.hidden = 6;
  c.ffn_hidden = 8;
  c.num_experts = 4;
  // Top-1 with renormalised gates: every gate weight is exactly 1, so all of the arithmetic is
  // exact. Top-2: the gate weights are not, but EP=1 and EP=2 run the same operations on the same
  // values (every expert sees its rows in the same global order), so the results are still equal.
  c.top_k = GENERATE(1, 2);
  c.capacity_factor = 0.75;
  c.routing = GENERATE(RoutingPolicy::kVanilla, RoutingPolicy::kBatchPriority);
  c.renormalize_gates = true;
  c.activation = ExpertActivation::kIdentity;
  constexpr int64_t T = 16;
  TestRng rng{4321};
  Tensor x = Tensor::empty({T, c.hidden}), dy = Tensor::empty({T, c.hidden});
  for (int64_t i = 0; i < x.numel(); ++i) {
    x.f32()[i] = static_cast<float>(rng.small_int(-3, 3));
    dy.f32()[i] = static_cast<float>(rng.small_int(-3, 3));
  }
  std::printf("EP=2 vs EP=1 bit-exact, top-%d, %s\n", c.top_k, routing_policy_name(c.routing));
  compare_ep(c, x, dy, std::vector<int32_t>(T, -1), true, [](MoeLayer& l) {
    // Small-integer router (exact logits) and experts; W1, W2 of expert e from (e, position) so
    // both layouts hold the same values.
    TestRng prng{55};
    for (int64_t i = 0; i < l.router_weight().numel(); ++i)
      l.router_weight().f32()[i] = static_cast<float>(prng.small_int(-2, 2));
    const int64_t D = l.config().hidden, F = l.config().ffn_hidden;
    for (int le = 0; le < l.local_experts(); ++le) {
      const int e = l.first_local_expert() + le;
      for (int64_t i = 0; i < D * F; ++i) {
        l.w1().f32()[le * D * F + i] = static_cast<float>((e * 7 + i * 3) % 5 - 2);
        l.w2().f32()[le * F * D + i] = static_cast<float>((e * 5 + i * 11) % 3 - 1);
      }
      for (int64_t f = 0; f < F; ++f) l.b1().f32()[le * F + f] = static_cast<float>((e + f) % 3 - 1);
      for (int64_t d = 0; d < D; ++d) l.b2().f32()[le * D + d] = static_cast<float>(e - d % 2);
    }
  });
}

// The same layer on the CUDA back end (tensors on the GPU, routing decisions on the host over a copy
// of the probabilities) matches the CPU back end: outputs, input and parameter gradients and aux
// losses within fp32 round-off, and the same routing. Skips with a visible message without a device.
TEST_CASE("The MoE layer on the CUDA back end matches the CPU back end", "[moe][cuda]") {
  if (!cuda_available()) {
    WARN("CUDA half skipped: no CUDA device (or a build without CUDA)");
    return;
  }
  auto gpu = make_cuda_backend(0);
  const MoeLayerConfig c =
      every_loss_config(24, 40, 6, GENERATE(RoutingPolicy::kVanilla, RoutingPolicy::kBatchPriority, RoutingPolicy::kNoDrop), 5);
  constexpr int64_t T = 96;
  TestRng rng{99};
  Tensor x = Tensor::empty({T, c.hidden}), dy = Tensor::empty({T, c.hidden});
  fill(x, rng, -2, 2);
  fill(dy, rng, -1, 1);
  std::vector<int32_t> ids(T);
  for (int64_t t = 0; t < T; ++t) ids[t] = static_cast<int32_t>(t % 3) - 1;
  MoeForwardOptions fo;
  fo.dataset_ids = ids;
  fo.step = 2;

  MoeLayer on_cpu(c, cpu());
  MoeLayer on_gpu(c, *gpu);
  const Tensor y_cpu = on_cpu.forward(x, fo);
  const Tensor y_gpu = on_gpu.forward(x.to(Device::kCuda), fo);
  const Tensor dx_cpu = on_cpu.backward(dy);
  const Tensor dx_gpu = on_gpu.backward(dy.to(Device::kCuda));
  gpu->synchronize();
  CHECK(y_gpu.device() == Device::kCuda);
  CHECK(std::vector<int32_t>(on_gpu.chosen_experts().begin(), on_gpu.chosen_experts().end()) ==
        std::vector<int32_t>(on_cpu.chosen_experts().begin(), on_cpu.chosen_experts().end()));
  CHECK(std::vector<uint8_t>(on_gpu.kept().begin(), on_gpu.kept().end()) ==
        std::vector<uint8_t>(on_cpu.kept().begin(), on_cpu.kept().end()));
  std::printf("MoE layer, CUDA vs CPU, %s\n", routing_policy_name(c.routing));
  auto same = [](const std::string& what, const Tensor& gpu_t, const Tensor& cpu_t) {
    const Tensor host = gpu_t.to(Device::kCpu);
    CHECK(close(what, host.f32(), to_double(cpu_t), 1e-5, 1e-4));
  };
  same("y", y_gpu, y_cpu);
  same("dx", dx_gpu, dx_cpu);
  same("dW_router", on_gpu.router_weight_grad(), on_cpu.router_weight_grad());
  same("dW1", on_gpu.w1_grad(), on_cpu.w1_grad());
  same("db1", on_gpu.b1_grad(), on_cpu.b1_grad());
  same("dW2", on_gpu.w2_grad(), on_cpu.w2_grad());
  same("db2", on_gpu.b2_grad(), on_cpu.b2_grad());
  CHECK(on_gpu.aux_losses().weighted_total == Approx(on_cpu.aux_losses().weighted_total).epsilon(1e-5));
  CHECK(on_gpu.routing_stats().dropped_assignments == on_cpu.routing_stats().dropped_assignments);
}
