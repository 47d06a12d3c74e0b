// The token routing model: distributions, inclusion probabilities, sampled loads and drops under
// each policy, expert placement and the dispatch all-to-all byte matrix.
#include "costmodel/routing_model.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <set>
#include <string>

using namespace moesim;
using cost::RoutingProblem;

namespace {

workload::RoutingDistribution parse_routing(const std::string& text) {
  workload::Workload w;
  ConfigDocument::parse_text("routing { " + text + " }", "routing.textproto", &w);
  return w.routing();
}

std::vector<Diagnostic> validate(const std::string& workload_text, int experts) {
  workload::Workload w;
  ConfigDocument doc = ConfigDocument::parse_text(workload_text, "routing.textproto", &w);
  Diagnostics diags;
  cost::validate_routing(doc.root(&diags).child("routing"), experts);
  return diags.items();
}

// 1-based line of the first line of `text` containing `marker`.
int line_of(const std::string& text, const std::string& marker) {
  const size_t at = text.find(marker);
  REQUIRE(at != std::string::npos);
  return 1 + static_cast<int>(std::count(text.begin(), text.begin() + static_cast<long>(at), '\n'));
}

// Exact Plackett-Luce inclusion probabilities by enumerating every ordered draw of k experts.
std::vector<double> enumerate_inclusion(const std::vector<double>& p, int k) {
  std::vector<double> pi(p.size(), 0.0);
  std::vector<int> chosen;
  std::function<void(double, double)> draw = [&](double prob, double left) {
    if (static_cast<int>(chosen.size()) == k) {
      for (int e : chosen) pi[e] += prob;
      return;
    }
    for (int e = 0; e < static_cast<int>(p.size()); ++e) {
      if (p[e] == 0 || std::find(chosen.begin(), chosen.end(), e) != chosen.end()) continue;
      chosen.push_back(e);
      draw(prob * p[e] / left, left - p[e]);
      chosen.pop_back();
    }
  };
  draw(1.0, 1.0);
  return pi;
}

std::vector<double> zipf(int experts, double s) {
  return cost::expert_probabilities(parse_routing(fmt::format("zipf {{ exponent: {} }}", s)), experts);
}

RoutingProblem problem(int64_t tokens, int experts, int top_k, double capacity_factor, strategy::DropPolicy policy,
                       std::vector<double> p, uint64_t seed = 1) {
  return RoutingProblem{tokens, experts, top_k, capacity_factor, policy, std::move(p), seed, {}};
}

int64_t overflow(const cost::RoutingLoads& l) {
  int64_t out = 0;
  for (int64_t x : l.sampled_load) out += std::max<int64_t>(0, x - l.capacity);
  return out;
}

double row_sum(const std::vector<double>& row) { return std::accumulate(row.begin(), row.end(), 0.0); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Distributions

TEST_CASE("routing distributions are registered under the names of the oneof cases") {
  const auto& reg = cost::routing_distributions();
  CHECK(reg.names() == "uniform, zipf, dataset_mixture, histogram");
  for (const auto& e : reg.entries()) CHECK_FALSE(e.description.empty());
  CHECK(cost::routing_distribution_name(workload::RoutingDistribution()) == "uniform");
  CHECK(cost::routing_distribution_name(parse_routing("zipf { exponent: 1 }")) == "zipf");
  CHECK(cost::routing_distribution_name(parse_routing("histogram { weight: 1 }")) == "histogram");
  CHECK(cost::routing_distribution_name(parse_routing("dataset_mixture { }")) == "dataset_mixture");
}

TEST_CASE("uniform and histogram probabilities are normalised weights") {
  std::vector<double> u = cost::expert_probabilities(workload::RoutingDistribution(), 4);
  CHECK(u == std::vector<double>(4, 0.25));
  std::vector<double> h = cost::expert_probabilities(parse_routing("histogram { weight: [1, 3, 0, 4] }"), 4);
  REQUIRE(h.size() == 4);
  CHECK(h[0] == Approx(1.0 / 8));
  CHECK(h[1] == Approx(3.0 / 8));
  CHECK(h[2] == 0);
  CHECK(h[3] == Approx(4.0 / 8));
}

TEST_CASE("zipf weights fall as rank^-s in expert index order") {
  for (double s : {0.0, 0.5, 1.0, 2.0}) {
    std::vector<double> p = zipf(16, s);
    CHECK(std::accumulate(p.begin(), p.end(), 0.0) == Approx(1.0));
    CHECK(p[0] / p[1] == Approx(std::pow(2.0, s)));
    CHECK(p[0] / p[3] == Approx(std::pow(4.0, s)));
    // Normaliser: the generalised harmonic number H_{16,s}.
    double h = 0;
    for (int r = 1; r <= 16; ++r) h += std::pow(r, -s);
    CHECK(p[0] == Approx(1 / h));
  }
}

TEST_CASE("dataset mixture follows the DAMEX formula") {
  // p_e = sum_d f_d (a [e in S_d] / |S_d| + (1 - a) / E), E = 4, a = 0.8:
  //   A (f = 0.75, S = {0}), B (f = 0.25, S = {2, 3}); uniform part (1 - a) / E = 0.05.
  //   p0 = 0.75 * 0.8 + 0.05 = 0.65;  p1 = 0.05;  p2 = p3 = 0.25 * 0.8 / 2 + 0.05 = 0.15.
  std::vector<double> p = cost::expert_probabilities(parse_routing(R"(dataset_mixture {
      affinity: 0.8
      dataset { name: "A" fraction: 0.75 experts: 0 }
      dataset { name: "B" fraction: 0.25 experts: [2, 3] } })"),
                                                     4);
  REQUIRE(p.size() == 4);
  CHECK(p[0] == Approx(0.65));
  CHECK(p[1] == Approx(0.05));
  CHECK(p[2] == Approx(0.15));
  CHECK(p[3] == Approx(0.15));
  // Default affinity 0.9 and affinity 0: the latter is uniform.
  std::vector<double> flat = cost::expert_probabilities(
      parse_routing("dataset_mixture { affinity: 0 dataset { fraction: 1 experts: 1 } }"), 4);
  for (double x : flat) CHECK(x == Approx(0.25));
  std::vector<double> def =
      cost::expert_probabilities(parse_routing("dataset_mixture { dataset { fraction: 1 experts: 1 } }"), 4);
  CHECK(def[1] == Approx(0.9 + 0.1 / 4));
}

// ---------------------------------------------------------------------------------------------
// Validation

TEST_CASE("each bad routing distribution is reported at its field and line") {
  struct Case {
    std::string text;
    int experts;
    std::string field_path;
    std::string marker;  // the line the diagnostic must point at
  };
  const std::vector<Case> cases = {
      {"routing {\n  zipf {\n    exponent: -1\n  }\n}\n", 8, "routing.zipf.exponent", "exponent"},
      {"routing {\n  zipf {\n    exponent: 10.5\n  }\n}\n", 8, "routing.zipf.exponent", "exponent"},
      {"routing {\n  zipf {\n  }\n}\n", 8, "routing.zipf.exponent", "zipf"},
      {"routing {\n  histogram {\n    weight: 1\n    weight: 2\n  }\n}\n", 4, "routing.histogram.weight", "weight: 1"},
      {"routing {\n  histogram {\n    weight: 1\n    weight: -2\n  }\n}\n", 2, "routing.histogram.weight[1]",
       "weight: -2"},
      {"routing {\n  histogram {\n    weight: 0\n    weight: 0\n  }\n}\n", 2, "routing.histogram.weight", "weight: 0"},
      {"routing {\n  histogram {\n  }\n}\n", 2, "routing.histogram.weight", "histogram"},
      {"routing {\n  dataset_mixture {\n    dataset {\n      fraction: 1\n      experts: 3\n      experts: 9\n"
       "    }\n  }\n}\n",
       8, "routing.dataset_mixture.dataset[0].experts[1]", "experts: 9"},
      {"routing {\n  dataset_mixture {\n    dataset {\n      fraction: 1\n      experts: 3\n      experts:  3\n"
       "    }\n  }\n}\n",
       8, "routing.dataset_mixture.dataset[0].experts[1]", "experts:  3"},
      {"routing {\n  dataset_mixture {\n    dataset {\n      fraction: 0.5\n      experts: 1\n    }\n"
       "    dataset {  # no experts\n      fraction: 0.5\n    }\n  }\n}\n",
       8, "routing.dataset_mixture.dataset[1].experts", "# no experts"},
      {"routing {\n  dataset_mixture {\n    dataset {\n      fraction: 0\n      experts: 1\n    }\n  }\n}\n", 8,
       "routing.dataset_mixture.dataset[0].fraction", "fraction"},
      {"routing {\n  dataset_mixture {\n    dataset {\n      fraction: 0.6\n      experts: 1\n    }\n"
       "    dataset {\n      fraction: 0.3\n      experts: 2\n    }\n  }\n}\n",
       8, "routing.dataset_mixture.dataset", "dataset {"},
      {"routing {\n  dataset_mixture {\n    affinity: 1.5\n    dataset {\n      fraction: 1\n      experts: 1\n"
       "    }\n  }\n}\n",
       8, "routing.dataset_mixture.affinity", "affinity"},
      {"routing {\n  dataset_mixture {\n  }\n}\n", 8, "routing.dataset_mixture.dataset", "dataset_mixture"},
      {"routing {\n  uniform: false\n}\n", 8, "routing.uniform", "uniform"},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    std::vector<Diagnostic> d = validate(c.text, c.experts);
    REQUIRE(d.size() == 1);
    CHECK(d[0].file == "routing.textproto");
    CHECK(d[0].field_path == c.field_path);
    CHECK(d[0].line == line_of(c.text, c.marker));
    CHECK_FALSE(d[0].message.empty());
  }
}

TEST_CASE("every problem is reported, not just the first") {
  const std::string text =
      "routing {\n  dataset_mixture {\n    affinity: -0.1\n    dataset {\n      fraction: 2\n      experts: -1\n"
      "    }\n  }\n}\n";
  std::vector<Diagnostic> d = validate(text, 8);
  std::vector<std::string> paths;
  for (const Diagnostic& x : d) paths.push_back(x.field_path);
  CHECK_THAT(paths, Catch::Matchers::UnorderedEquals(std::vector<std::string>{
                        "routing.dataset_mixture.affinity", "routing.dataset_mixture.dataset[0].fraction",
                        "routing.dataset_mixture.dataset[0].experts[0]"}));
}

TEST_CASE("valid routing distributions pass validation") {
  for (const char* text : {"", "routing { uniform: true }", "routing { zipf { exponent: 0 } }",
                           "routing { zipf { exponent: 10 } }", "routing { histogram { weight: [0, 1, 2, 3] } }",
                           "routing { dataset_mixture { affinity: 1 dataset { fraction: 0.5 experts: [0, 1] }"
                           " dataset { fraction: 0.5 experts: 3 } } }",
                           "routing { dataset_mixture { dataset { fraction: 0.3333 experts: 0 }"
                           " dataset { fraction: 0.6667 experts: 1 } } }"}) {
    INFO(text);
    CHECK(validate(text, 4).empty());
  }
}

TEST_CASE("a model without experts ignores the checks that need the expert count") {
  // Histogram length and expert indices cannot be judged; the rest still can.
  CHECK(validate("routing { histogram { weight: [1, 2, 3] } }", 0).empty());
  CHECK(validate("routing { dataset_mixture { dataset { fraction: 1 experts: 99 } } }", 0).empty());
  CHECK(validate("routing { histogram { weight: [1, 2, 3] } }", 4).size() == 1);
  std::vector<Diagnostic> d = validate("routing { zipf { exponent: -1 } }", 0);
  REQUIRE(d.size() == 1);
  CHECK(d[0].field_path == "routing.zipf.exponent");
}

// ---------------------------------------------------------------------------------------------
// Inclusion probabilities and sampled routes

TEST_CASE("inclusion probabilities match the enumeration of ordered top-k draws") {
  // By hand for p = (1/2, 1/4, 1/4), k = 2: expert 0 is in unless both others go first,
  // pi_0 = 1 - 2 * (1/4)(1/4 / (3/4)) = 5/6; pi_1 = pi_2 = (2 - 5/6) / 2 = 7/12.
  std::vector<double> pi = cost::inclusion_probabilities({0.5, 0.25, 0.25}, 2);
  CHECK(pi[0] == Approx(5.0 / 6).epsilon(1e-10));
  CHECK(pi[1] == Approx(7.0 / 12).epsilon(1e-10));
  const std::vector<std::vector<double>> cases = {
      zipf(7, 1.2), zipf(8, 3.0), {0.1, 0.2, 0.3, 0.0, 0.4, 0.05, 0.02}, {0.9, 1e-3, 1e-3, 1e-3, 1e-3, 0.096},
      std::vector<double>(9, 1.0 / 9)};
  for (const auto& p : cases) {
    const double total = std::accumulate(p.begin(), p.end(), 0.0);
    std::vector<double> norm(p);
    for (double& x : norm) x /= total;
    for (int k = 1; k <= 4; ++k) {
      INFO("k = " << k << ", p[0] = " << p[0]);
      std::vector<double> want = enumerate_inclusion(norm, k);
      std::vector<double> got = cost::inclusion_probabilities(p, k);
      for (size_t e = 0; e < p.size(); ++e) CHECK(got[e] == Approx(want[e]).margin(1e-9));
    }
  }
  // Fewer positive experts than k: every one of them is always chosen.
  CHECK(cost::inclusion_probabilities({0.5, 0.0, 0.5}, 2) == std::vector<double>{1.0, 0.0, 1.0});
}

TEST_CASE("sampled token routes follow the router model") {
  SECTION("choice frequencies are the inclusion probabilities") {
    const int64_t T = 200000;
    cost::TokenRoutes r = cost::sample_token_routes({0.5, 0.25, 0.25}, T, 2, 7);
    REQUIRE(r.top_k == 2);
    REQUIRE(r.expert.size() == static_cast<size_t>(T) * 2);
    int64_t first_is_0 = 0, has_0 = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int a = r.expert[t * 2], b = r.expert[t * 2 + 1];
      REQUIRE(a != b);
      REQUIRE(r.gate[t * 2] >= r.gate[t * 2 + 1]);  // choices in descending score order
      REQUIRE(r.gate[t * 2] + r.gate[t * 2 + 1] < 1.0);
      first_is_0 += a == 0;
      has_0 += a == 0 || b == 0;
    }
    // Binomial counts; 5 standard deviations.
    auto near = [&](int64_t count, double prob) {
      const double sd = std::sqrt(T * prob * (1 - prob));
      CHECK(std::fabs(static_cast<double>(count) - T * prob) < 5 * sd);
    };
    near(first_is_0, 0.5);  // the top choice is a draw from p
    near(has_0, 5.0 / 6);
  }
  SECTION("gates are the softmax of log p + Gumbel noise") {
    // Two equally likely experts: the top gate is max(U, 1 - U) with U = E_1 / (E_1 + E_2) uniform
    // on (0, 1) for i.i.d. exponentials, so it is uniform on (1/2, 1): mean 3/4, P(> 0.9) = 0.2.
    const int64_t T = 200000;
    cost::TokenRoutes r = cost::sample_token_routes({1, 1}, T, 1, 3);
    double sum = 0;
    int64_t above = 0;
    for (double g : r.gate) {
      REQUIRE(g >= 0.5);
      REQUIRE(g <= 1.0);
      sum += g;
      above += g > 0.9;
    }
    CHECK(sum / T == Approx(0.75).margin(5 * std::sqrt(1.0 / 48 / T)));
    CHECK(static_cast<double>(above) / T == Approx(0.2).margin(5 * std::sqrt(0.2 * 0.8 / T)));
  }
  SECTION("experts with zero probability are never chosen") {
    cost::TokenRoutes r = cost::sample_token_routes({0, 1, 0, 1}, 1000, 3, 1);
    CHECK(r.top_k == 2);
    for (int e : r.expert) CHECK((e == 1 || e == 3));
  }
  SECTION("a token's routes do not depend on how many tokens follow it") {
    cost::TokenRoutes a = cost::sample_token_routes(zipf(16, 1), 100, 4, 9);
    cost::TokenRoutes b = cost::sample_token_routes(zipf(16, 1), 300, 4, 9);
    CHECK(std::equal(a.expert.begin(), a.expert.end(), b.expert.begin()));
    CHECK(std::equal(a.gate.begin(), a.gate.end(), b.gate.begin()));
  }
}

// ---------------------------------------------------------------------------------------------
// Loads and drops

TEST_CASE("expert capacity is ceil(capacity_factor k T / E)") {
  CHECK(cost::expert_capacity(64, 8, 1, 1.0) == 8);
  CHECK(cost::expert_capacity(64, 8, 1, 1.25) == 10);
  CHECK(cost::expert_capacity(64, 8, 2, 1.0) == 16);
  CHECK(cost::expert_capacity(10, 3, 1, 1.0) == 4);     // 3.33 -> 4
  CHECK(cost::expert_capacity(100, 1, 1, 1.1) == 110);  // 110.00000000000001 is 110
  CHECK(cost::expert_capacity(0, 8, 1, 1.0) == 0);
}

TEST_CASE("loads sum to T k, sampled or expected, on both sampling paths") {
  // 4096 x 16 draws: per token; 2^17 x 64 = 2^23 > kPerTokenDrawBudget: multinomial.
  for (auto [T, E] : {std::pair<int64_t, int>{4096, 16}, {int64_t{1} << 17, 64}}) {
    for (int k : {1, 2, 4}) {
      INFO("T " << T << " E " << E << " k " << k);
      cost::RoutingLoads l = cost::routing_loads(problem(T, E, k, 1.0, strategy::VANILLA, zipf(E, 1.0)));
      CHECK(std::accumulate(l.sampled_load.begin(), l.sampled_load.end(), int64_t{0}) == T * k);
      CHECK(std::accumulate(l.expected_load.begin(), l.expected_load.end(), 0.0) == Approx(T * k));
      CHECK(l.max_load == *std::max_element(l.sampled_load.begin(), l.sampled_load.end()));
      CHECK(l.imbalance == Approx(l.max_load / (static_cast<double>(T) * k / E)));
      CHECK(l.imbalance > 1);
      CHECK((l.simulated_tokens == T) == (T * E <= cost::kPerTokenDrawBudget));
    }
  }
}

TEST_CASE("edge cases: an empty batch, and top-k over every expert") {
  cost::RoutingLoads empty = cost::routing_loads(problem(0, 8, 2, 1.0, strategy::BATCH_PRIORITY, zipf(8, 1)));
  CHECK(empty.sampled_load == std::vector<int64_t>(8, 0));
  CHECK(empty.capacity == 0);
  CHECK(empty.dropped_fraction == 0);
  CHECK(empty.dropped_gate_mass_fraction == 0);
  CHECK(empty.imbalance == 0);
  // k = E: every token takes every expert, so each load is T, and capacity factor 1 drops nothing.
  cost::RoutingLoads all = cost::routing_loads(problem(100, 4, 4, 1.0, strategy::VANILLA, zipf(4, 2)));
  CHECK(all.sampled_load == std::vector<int64_t>(4, 100));
  CHECK(all.expected_load == std::vector<double>(4, 100.0));
  CHECK(all.capacity == 100);
  CHECK(all.dropped_fraction == 0);
  CHECK(all.imbalance == 1);
}

TEST_CASE("the same seed gives the same loads, another seed different ones") {
  for (int64_t T : {int64_t{2000}, int64_t{1} << 17}) {
    RoutingProblem a = problem(T, 64, 2, 1.0, strategy::BATCH_PRIORITY, zipf(64, 0.8), 42);
    cost::RoutingLoads x = cost::routing_loads(a), y = cost::routing_loads(a);
    CHECK(x.sampled_load == y.sampled_load);
    CHECK(x.dropped_gate_mass_fraction == y.dropped_gate_mass_fraction);
    CHECK(x.primary_dropped_fraction == y.primary_dropped_fraction);
    a.seed = 43;
    CHECK(cost::routing_loads(a).sampled_load != x.sampled_load);
  }
}

TEST_CASE("sampled loads have the expected mean and variance") {
  // Per token, load_e is a sum of T i.i.d. indicators: variance T pi_e (1 - pi_e). The multinomial
  // over T k draws with probabilities pi_e / k has variance T pi_e (1 - pi_e / k): three times as
  // large for the hot expert here (pi_0 ~ 0.8, k = 2). Over n = 200 seeds the mean is within 5
  // standard errors, and the sample variance over the true one is chi^2_199 / 199 (sd 0.1), so
  // within [0.6, 1.5]. T = 2^23 reaches the binomial sampler's normal branch (sd > 1000).
  const int E = 8, k = 2, n = 200;
  for (int64_t T : {int64_t{2000}, int64_t{1} << 20, int64_t{1} << 23}) {
    const bool per_token = T * E <= cost::kPerTokenDrawBudget;
    REQUIRE(per_token == (T == 2000));
    std::vector<double> sum(E, 0.0), squares(E, 0.0);
    cost::RoutingLoads l;
    for (int s = 0; s < n; ++s) {
      l = cost::routing_loads(problem(T, E, k, 1.0, strategy::NO_DROP, zipf(E, 1.5), 1000 + s));
      for (int e = 0; e < E; ++e) {
        const double x = static_cast<double>(l.sampled_load[e]) - l.expected_load[e];
        sum[e] += x;
        squares[e] += x * x;
      }
    }
    for (int e = 0; e < E; ++e) {
      INFO("T " << T << " expert " << e);
      const double pi = l.expected_load[e] / static_cast<double>(T);
      const double var = static_cast<double>(T) * pi * (1 - (per_token ? pi : pi / k));
      const double mean_offset = sum[e] / n;
      CHECK(std::fabs(mean_offset) < 5 * std::sqrt(var / n));
      const double sample_var = (squares[e] - n * mean_offset * mean_offset) / (n - 1);
      CHECK(sample_var / var > 0.6);
      CHECK(sample_var / var < 1.5);
    }
  }
}

TEST_CASE("capacity drops shrink as the capacity factor grows and vanish without drops") {
  // Uniform, T k / E = 512 per expert: loads ~ Binomial, sd ~ 21; C = 512 drops about
  // E[max(0, L - C)] ~ 0.4 sd per expert, ~1.6% of assignments; C = 1024 is ~24 sd away.
  auto at = [](double cf, strategy::DropPolicy policy) {
    return cost::routing_loads(problem(4096, 16, 2, cf, policy, std::vector<double>(16, 1.0 / 16)));
  };
  cost::RoutingLoads tight = at(1.0, strategy::VANILLA), loose = at(2.0, strategy::VANILLA);
  CHECK(tight.capacity == 512);
  CHECK(tight.dropped_fraction > 0);
  CHECK(tight.dropped_fraction < 0.05);
  CHECK(loose.capacity == 1024);
  CHECK(loose.dropped_fraction < tight.dropped_fraction);
  CHECK(loose.dropped_fraction == 0);
  cost::RoutingLoads none = at(1.0, strategy::NO_DROP);
  CHECK(none.sampled_load == tight.sampled_load);
  CHECK(none.dropped_fraction == 0);
  CHECK(none.dropped_gate_mass_fraction == 0);
  CHECK(none.capacity == none.max_load);  // dropless: the buffer grows to the busiest expert
}

TEST_CASE("dropped assignments are the overflow of the sampled loads") {
  for (auto policy : {strategy::VANILLA, strategy::BATCH_PRIORITY}) {
    for (int k : {1, 2}) {
      cost::RoutingLoads l = cost::routing_loads(problem(3000, 12, k, 1.0, policy, zipf(12, 1.0)));
      const int64_t dropped = std::llround(l.dropped_fraction * 3000.0 * k);
      CHECK(dropped == overflow(l));
      CHECK(dropped > 0);
      CHECK(l.tokens_fully_dropped_fraction <= l.primary_dropped_fraction);
      if (k == 1) CHECK(l.primary_dropped_fraction == Approx(l.dropped_fraction));
    }
  }
}

TEST_CASE("batch-priority routing drops fewer primary assignments and less gate mass than vanilla") {
  // Same seed, same loads: the policies drop the same number of assignments, BPR chooses which.
  for (int64_t T : {int64_t{8192}, int64_t{1} << 18}) {  // per token; multinomial + subsample
    REQUIRE((T * 32 <= cost::kPerTokenDrawBudget) == (T == 8192));
    for (int k : {1, 2}) {
      INFO("T " << T << " k " << k);
      RoutingProblem pr = problem(T, 32, k, 1.0, strategy::VANILLA, zipf(32, 1.2), 5);
      cost::RoutingLoads vanilla = cost::routing_loads(pr);
      pr.drop_policy = strategy::BATCH_PRIORITY;
      cost::RoutingLoads bpr = cost::routing_loads(pr);
      CHECK(bpr.sampled_load == vanilla.sampled_load);
      CHECK(bpr.dropped_fraction == vanilla.dropped_fraction);
      REQUIRE(vanilla.dropped_fraction > 0.05);
      CHECK(bpr.dropped_gate_mass_fraction < 0.9 * vanilla.dropped_gate_mass_fraction);
      if (k > 1) CHECK(bpr.primary_dropped_fraction < vanilla.primary_dropped_fraction);
    }
  }
}

TEST_CASE("the multinomial path reproduces the full batch's drops in its subsample") {
  // Per-expert drop shares are carried into the subsample, so its own dropped share of
  // assignments matches the full sample's: check through the primary share at k = 1, where every
  // assignment is primary.
  RoutingProblem pr = problem(int64_t{1} << 18, 64, 1, 1.0, strategy::VANILLA, zipf(64, 1.0), 11);
  cost::RoutingLoads l = cost::routing_loads(pr);
  REQUIRE(l.simulated_tokens == cost::kPerTokenDrawBudget / 64);
  CHECK(l.primary_dropped_fraction == Approx(l.dropped_fraction).epsilon(0.03));
}

TEST_CASE("kept assignments by source rank: the group's capacity goes to the first ranks under vanilla") {
  // Two ranks' 256 tokens each, k = 2 over 4 even experts, capacity ceil(0.5 * 2 * 512 / 4) = 128:
  // about what rank 0's tokens alone bring each expert. VANILLA fills in token order (rank 0's
  // first), as the executor's MoE layer does over the gathered routing; BPR by gate priority,
  // which does not care which rank a token came from.
  for (int64_t T : {int64_t{512}, int64_t{1} << 20}) {  // per token; multinomial + subsample
    for (auto policy : {strategy::VANILLA, strategy::BATCH_PRIORITY, strategy::NO_DROP}) {
      INFO("T " << T << " policy " << policy);
      RoutingProblem pr = problem(T, 4, 2, 0.5, policy, {1, 1, 1, 1}, 3);
      pr.sources = 2;
      const cost::RoutingLoads l = cost::routing_loads(pr);
      REQUIRE(l.kept_by_source.size() == 2);
      double first = 0, all = 0;
      for (int e = 0; e < 4; ++e) {
        const double kept = static_cast<double>(std::min(l.sampled_load[e], l.capacity));
        CHECK(l.kept_by_source[0][e] + l.kept_by_source[1][e] == Approx(kept));
        first += l.kept_by_source[0][e];
        all += kept;
      }
      if (policy == strategy::VANILLA) CHECK(first / all > 0.85);
      else CHECK(first / all == Approx(0.5).margin(0.06));
    }
  }
  // One source keeps everything kept.
  const cost::RoutingLoads one = cost::routing_loads(problem(512, 4, 2, 0.5, strategy::VANILLA, {1, 1, 1, 1}, 3));
  REQUIRE(one.kept_by_source.size() == 1);
  CHECK(row_sum(one.kept_by_source[0]) == Approx(512));
}

// ---------------------------------------------------------------------------------------------
// Placement

TEST_CASE("experts are placed in contiguous blocks or where the strategy says") {
  cost::ExpertPlacementMap m = cost::place_experts(8, 4, nullptr, {});
  CHECK(m.ranks == 4);
  CHECK(m.expert_ranks == std::vector<std::vector<int>>{{0}, {0}, {1}, {1}, {2}, {2}, {3}, {3}});
  strategy::ExpertPlacement explicit_placement;
  for (int r : {3, 2, 1, 0, 0, 1, 2, 3}) explicit_placement.add_expert_rank(r);
  m = cost::place_experts(8, 4, &explicit_placement, {});
  CHECK(m.expert_ranks == std::vector<std::vector<int>>{{3}, {2}, {1}, {0}, {0}, {1}, {2}, {3}});
}

TEST_CASE("rank loads split a replicated expert's load evenly over its copies") {
  cost::ExpertPlacementMap m{3, {{0}, {1, 2}, {2}}};
  CHECK(cost::rank_loads(m, std::vector<double>{1, 4, 2}) == std::vector<double>{1, 2, 4});
  CHECK(cost::rank_loads(m, std::vector<int64_t>{1, 4, 2}) == std::vector<double>{1, 2, 4});
  CHECK(cost::max_rank_load(m, std::vector<int64_t>{6, 4, 0}) == 6);
}

TEST_CASE("replicas go to the hottest experts, on the least-loaded ranks") {
  // Zipf s = 1 over 8 experts on 4 ranks: rank loads (p0+p1, p2+p3, p4+p5, p6+p7) fall with the
  // rank, so expert 0's first copy goes to rank 3.
  std::vector<double> p = zipf(8, 1.0);
  const double before = cost::max_rank_load(cost::place_experts(8, 4, nullptr, p), p);
  CHECK(before == Approx(p[0] + p[1]));
  strategy::ExpertPlacement one;
  one.set_replicas(1);
  cost::ExpertPlacementMap m = cost::place_experts(8, 4, &one, p);
  CHECK(m.expert_ranks[0] == std::vector<int>{0, 3});
  for (int e = 1; e < 8; ++e) CHECK(m.expert_ranks[e].size() == 1);
  CHECK(cost::max_rank_load(m, p) < before);
  // Conservation: copies split loads, they do not add any.
  std::vector<double> l = cost::rank_loads(m, p);
  CHECK(std::accumulate(l.begin(), l.end(), 0.0) == Approx(1.0));

  // More replicas: each copy is the best single copy, so on this instance (hot experts stacked
  // on rank 0, room on the others) the busiest rank never gets busier as copies are added.
  double last = before;
  for (int n = 1; n <= 6; ++n) {
    strategy::ExpertPlacement more;
    more.set_replicas(n);
    m = cost::place_experts(8, 4, &more, p);
    int copies = 0;
    for (const auto& at : m.expert_ranks) {
      copies += static_cast<int>(at.size());
      CHECK(std::set<int>(at.begin(), at.end()).size() == at.size());  // never twice on one rank
    }
    CHECK(copies == 8 + n);
    CHECK(m.expert_ranks[0].size() > 1);  // the hottest expert is always among the copied
    const double now = cost::max_rank_load(m, p);
    CHECK(now <= last + 1e-12);
    last = now;
  }
  CHECK(last < cost::max_rank_load(cost::place_experts(8, 4, &one, p), p));
}

TEST_CASE("replication stops once every expert is on every rank") {
  strategy::ExpertPlacement many;
  many.set_replicas(100);
  cost::ExpertPlacementMap m = cost::place_experts(4, 2, &many, {0.4, 0.3, 0.2, 0.1});
  for (const auto& at : m.expert_ranks) CHECK(at.size() == 2);
}

// ---------------------------------------------------------------------------------------------
// Dispatch all-to-all

TEST_CASE("dispatch rows carry each rank's tokens times k, the diagonal the local part") {
  const int E = 8, R = 4, k = 2;
  const int64_t T = 1003;  // 251, 251, 251, 250 tokens per rank
  const double b = 7168 * 2.0;
  RoutingProblem pr = problem(T, E, k, 1.0, strategy::VANILLA, zipf(E, 1.0), 3);
  cost::ExpertPlacementMap m = cost::place_experts(E, R, nullptr, {});
  auto bytes = cost::dispatch_bytes(m, pr, b, false);
  // Recount from the same routes: token t lives on rank t < 753 ? t / 251 : 3.
  cost::TokenRoutes routes = cost::sample_token_routes(pr.probabilities, T, k, pr.seed);
  std::vector<std::vector<double>> want(R, std::vector<double>(R, 0.0));
  for (int64_t t = 0; t < T; ++t) {
    const int src = t < 753 ? static_cast<int>(t / 251) : 3;
    for (int j = 0; j < k; ++j) want[src][routes.expert[t * k + j] / 2] += b;
  }
  CHECK(bytes == want);
  for (int s = 0; s < R; ++s) CHECK(row_sum(bytes[s]) == Approx((s < 3 ? 251 : 250) * k * b));
  // Expert 0 and 1 are the hottest and live on rank 0: rank 0 keeps the largest local share.
  CHECK(bytes[0][0] / row_sum(bytes[0]) > bytes[1][1] / row_sum(bytes[1]));
}

TEST_CASE("per-rank dedup sends a token once to each rank it needs") {
  const int E = 8, R = 2;
  const int64_t T = 1000;
  const double b = 100;
  cost::ExpertPlacementMap m = cost::place_experts(E, R, nullptr, {});
  SECTION("top-1: nothing to deduplicate") {
    RoutingProblem pr = problem(T, E, 1, 1.0, strategy::VANILLA, zipf(E, 1.0));
    CHECK(cost::dispatch_bytes(m, pr, b, true) == cost::dispatch_bytes(m, pr, b, false));
  }
  SECTION("top-4: fewer bytes, between one and min(k, R) copies per token") {
    RoutingProblem pr = problem(T, E, 4, 1.0, strategy::VANILLA, std::vector<double>(E, 1.0 / E));
    auto dedup = cost::dispatch_bytes(m, pr, b, true);
    auto plain = cost::dispatch_bytes(m, pr, b, false);
    // Recount: distinct destination ranks of each token.
    cost::TokenRoutes routes = cost::sample_token_routes(pr.probabilities, T, 4, pr.seed);
    std::vector<std::vector<double>> want(R, std::vector<double>(R, 0.0));
    for (int64_t t = 0; t < T; ++t) {
      bool hit[2] = {false, false};
      for (int j = 0; j < 4; ++j) hit[routes.expert[t * 4 + j] / 4] = true;
      for (int d = 0; d < R; ++d) want[t / 500][d] += hit[d] ? b : 0;
    }
    CHECK(dedup == want);
    for (int s = 0; s < R; ++s) {
      CHECK(row_sum(dedup[s]) < row_sum(plain[s]));
      CHECK(row_sum(dedup[s]) >= 500 * b);
      CHECK(row_sum(dedup[s]) <= 500 * 2 * b);
    }
  }
}

TEST_CASE("large problems use expected dispatch bytes") {
  // Uniform over 8 experts, 4 per rank on 2 ranks, top-2, T = 2^20 (past the per-token budget).
  // Without dedup each cell is n_s k b / 2. With dedup a token reaches a rank unless both its
  // choices are on the other one: 1 - (4/8)(3/7) = 11/14.
  const int E = 8, R = 2;
  const int64_t T = int64_t{1} << 20;
  const double b = 2;
  REQUIRE(T * E > cost::kPerTokenDrawBudget);
  RoutingProblem pr = problem(T, E, 2, 1.0, strategy::VANILLA, std::vector<double>(E, 1.0 / E));
  cost::ExpertPlacementMap m = cost::place_experts(E, R, nullptr, {});
  auto plain = cost::dispatch_bytes(m, pr, b, false);
  auto dedup = cost::dispatch_bytes(m, pr, b, true);
  const double n = static_cast<double>(T / 2);
  for (int s = 0; s < R; ++s)
    for (int d = 0; d < R; ++d) {
      CHECK(plain[s][d] == Approx(n * 2 * b / 2));
      CHECK(dedup[s][d] == Approx(n * b * 11.0 / 14).epsilon(1e-9));
    }
}

TEST_CASE("a replicated expert is served locally where a copy exists, else in turn") {
  // All traffic goes to expert 0, copied onto rank 0 (home) and one more rank.
  const int E = 4, R = 4;
  const int64_t T = 400;
  strategy::ExpertPlacement one;
  one.set_replicas(1);
  const std::vector<double> p{1, 0, 0, 0};
  cost::ExpertPlacementMap m = cost::place_experts(E, R, &one, p);
  REQUIRE(m.expert_ranks[0] == std::vector<int>{0, 1});  // ranks 1..3 are empty; the lowest wins
  auto bytes = cost::dispatch_bytes(m, problem(T, E, 1, 1.0, strategy::VANILLA, p), 1.0, false);
  CHECK(bytes[0] == std::vector<double>{100, 0, 0, 0});
  CHECK(bytes[1] == std::vector<double>{0, 100, 0, 0});
  for (int s : {2, 3}) CHECK(bytes[s] == std::vector<double>{50, 50, 0, 0});
  // Expected-value path (past the per-token budget): the same split in expectation.
  const int64_t big = cost::kPerTokenDrawBudget + 4;  // one positive expert: per token up to the budget
  auto expected = cost::dispatch_bytes(m, problem(big, E, 1, 1.0, strategy::VANILLA, p), 1.0, true);
  const double n = static_cast<double>(big / R);
  CHECK(expected[0][0] == Approx(n));
  CHECK(expected[1][1] == Approx(n));
  CHECK(expected[3][0] == Approx(n / 2));
  CHECK(expected[3][1] == Approx(n / 2));
}
