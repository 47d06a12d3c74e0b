// The predicted-vs-measured join (traces/validation.h) on synthetic trace pairs whose errors are
// known by construction.
#include "traces/validation.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace moesim::trace {
namespace {

Span span(const std::string& id, const std::string& name, OpKind kind, int rank, int step, int64_t start_ns,
          int64_t end_ns) {
  Span s;
  s.set_op_id(id);
  s.set_name(name);
  s.set_kind(kind);
  s.set_rank(rank);
  s.set_step(step);
  s.set_start_ns(start_ns);
  s.set_end_ns(end_ns);
  return s;
}

// Two ranks, three ops each: attention 100 us, an all-to-all 50 us, experts 200 us (predicted).
Trace predicted() {
  Trace t;
  for (int r = 0; r < 2; ++r) {
    *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, r, 0, 0, 100'000);
    *t.add_spans() = span("L0.moe.dispatch_a2a mb0 fwd", "moe.dispatch_a2a", ALL_TO_ALL, r, 0, 100'000, 150'000);
    *t.add_spans() = span("L0.moe.experts mb0 fwd", "moe.experts", GROUPED_GEMM, r, 0, 150'000, 350'000);
  }
  return t;
}

// Measured: attention takes 80 us (the prediction is 25% slow), experts 250 us (20% fast); rank 1
// reaches the all-to-all 30 us late, so rank 0's span is 30 us longer but the exchange itself
// (from the last arrival) takes 40 us on both (25% slow). Step s starts at s ms; step 0 is
// warm-up and twice as slow everywhere.
Trace measured(int steps) {
  Trace t;
  for (int s = 0; s < steps; ++s) {
    const int64_t base = s * 1'000'000, k = s == 0 ? 2 : 1;
    for (int r = 0; r < 2; ++r) {
      const int64_t late = r == 1 ? 30'000 * k : 0;
      const int64_t attn_end = base + 80'000 * k + late;
      const int64_t a2a_end = base + (80'000 + 30'000 + 40'000) * k;
      *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, r, s, base + late, attn_end);
      *t.add_spans() = span("L0.moe.dispatch_a2a mb0 fwd", "moe.dispatch_a2a", ALL_TO_ALL, r, s, attn_end, a2a_end);
      *t.add_spans() = span("L0.moe.experts mb0 fwd", "moe.experts", GROUPED_GEMM, r, s, a2a_end, a2a_end + 250'000 * k);
    }
  }
  return t;
}

TEST_CASE("A collective is its last arrival's span: another rank's clock offset does not move it") {
  // Rank 1's trace clock starts 60 us late (ranks start recording at their own exit from a
  // barrier): read across ranks, rank 1 would seem to arrive after rank 0 had finished.
  Trace t = measured(4);
  for (Span& s : *t.mutable_spans())
    if (s.rank() == 1) {
      s.set_start_ns(s.start_ns() + 60'000);
      s.set_end_ns(s.end_ns() + 60'000);
    }
  const Comparison c = compare(predicted(), t, {.predicted_step_s = 360e-6, .skip_steps = 1});
  for (const OpError& e : c.ops)
    if (e.kind == "dispatch_a2a") CHECK(e.measured_s == Approx(40e-6));
}

TEST_CASE("The join recovers known per-op and per-kind errors, collectives from the last arrival") {
  const Comparison c = compare(predicted(), measured(4), {.predicted_step_s = 360e-6, .skip_steps = 1});
  REQUIRE(c.ops.size() == 6);
  CHECK(c.compared_steps == 3);
  for (const OpError& e : c.ops) {
    INFO(e.op_id << " rank " << e.rank);
    if (e.kind == "attention") CHECK(e.error_pct == Approx(25));
    if (e.kind == "dispatch_a2a") CHECK(e.measured_s == Approx(40e-6));
    if (e.kind == "dispatch_a2a") CHECK(e.error_pct == Approx(25));
    if (e.kind == "experts") CHECK(e.error_pct == Approx(-20));
  }
  CHECK(c.per_kind.at("attention").median_abs_pct == Approx(25));
  CHECK(c.per_kind.at("experts").mean_pct == Approx(-20));
  // Shares of the measured op time, 80 + 40 + 250 us per rank.
  CHECK(c.kind_share_pct.at("attention") == Approx(80.0 / 370 * 100));
  CHECK(c.kind_share_pct.at("dispatch_a2a") == Approx(40.0 / 370 * 100));
  CHECK(c.kind_share_pct.at("experts") == Approx(250.0 / 370 * 100));
  // A measured step: 80 + 30 + 40 + 250 = 400 us; predicted 360 us: -10% in each compared step.
  CHECK(c.measured_step_quiet_s == Approx(400e-6));
  CHECK(c.step_error_pct == Approx(-10));
  CHECK(c.step.count == 3);
  CHECK(c.step.median_abs_pct == Approx(10));
  CHECK(c.step.mean_pct == Approx(-10));
  CHECK(c.worst(1).at(0).kind != "experts");  // 25% beats 20%
  // With the warm-up kept (skip 0), the slow step 0 widens the spread: max 55% (400 -> 800 us).
  const Comparison all = compare(predicted(), measured(4), {.predicted_step_s = 360e-6, .skip_steps = 0});
  CHECK(all.step.count == 4);
  CHECK(all.step.max_abs_pct == Approx(55));
}

TEST_CASE("Measured times are medians over the quiet half of the steps: slowed stretches do not move them") {
  // Steps 1..8 compared; steps 5..8 run 1.5x slow everywhere (a co-tenant's stretch), so a mean
  // over every step would sit between the two regimes while the quiet half is the undisturbed one.
  Trace t;
  for (int s = 0; s < 9; ++s) {
    const int64_t base = s * 1'000'000, k10 = s == 0 ? 20 : s >= 5 ? 15 : 10;
    for (int r = 0; r < 2; ++r) {
      *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, r, s, base, base + 8'000 * k10);
      *t.add_spans() = span("L0.moe.dispatch_a2a mb0 fwd", "moe.dispatch_a2a", ALL_TO_ALL, r, s, base + 8'000 * k10,
                            base + 12'000 * k10);
      *t.add_spans() = span("L0.moe.experts mb0 fwd", "moe.experts", GROUPED_GEMM, r, s, base + 12'000 * k10,
                            base + 37'000 * k10);
    }
  }
  const Comparison quiet = compare(predicted(), t, {.predicted_step_s = 360e-6});
  for (const OpError& e : quiet.ops)
    if (e.kind == "attention") CHECK(e.measured_s == Approx(80e-6));
  CHECK(quiet.measured_step_quiet_s == Approx(370e-6));
  CHECK(quiet.step_error_pct == Approx((360.0 - 370.0) / 370.0 * 100));
  double ops = 0;
  for (const OpError& e : quiet.ops)
    if (e.rank == 0) ops += e.measured_s;
  CHECK(ops == Approx(quiet.measured_step_quiet_s));  // steady ops' medians add up to the step
  // Every step (an option) lands between the regimes: 80 and 120 us -> 100 us.
  const Comparison all = compare(predicted(), t, {.predicted_step_s = 360e-6, .quiet_share = 1.0});
  for (const OpError& e : all.ops)
    if (e.kind == "attention") CHECK(e.measured_s == Approx(100e-6));
  CHECK(quiet_steps({{1, 3.0}, {2, 1.0}, {3, 2.0}, {4, 1.0}}, 0.5) == std::set<int>{2, 4});
  CHECK(quiet_steps({{1, 3.0}}, 0.1) == std::set<int>{1});
}

TEST_CASE("An op's hiccup in one step does not move its measured time: the median over the steps") {
  // Five steps of 100 us; in step 3 the exchange meets a 60 us hiccup on both ranks (a rank
  // descheduled) and the attention a 20 us one on rank 1 alone. A mean would put the exchange
  // at 28 us and rank 1's attention at 54.
  Trace t;
  for (int s = 1; s <= 5; ++s) {
    const int64_t base = s * 1'000'000;
    for (int r = 0; r < 2; ++r) {
      const int64_t attn_end = base + 50'000 + (s == 3 && r == 1 ? 20'000 : 0);
      *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, r, s, base, attn_end);
      // Rank 0 arrives 5 us before rank 1: a collective is its last arrival's span.
      const int64_t arrive = attn_end + (r == 0 ? 0 : 5'000), end = attn_end + 18'000 + (s == 3 ? 60'000 : 0);
      *t.add_spans() = span("L0.moe.dispatch_a2a mb0 fwd", "moe.dispatch_a2a", ALL_TO_ALL, r, s, arrive, end);
    }
  }
  const auto times = median_op_times(t, {1, 2, 3, 4, 5});
  CHECK(times.at({"L0.attn mb0 fwd", 0}) == Approx(50e-6));
  CHECK(times.at({"L0.attn mb0 fwd", 1}) == Approx(50e-6));
  CHECK(times.at({"L0.moe.dispatch_a2a mb0 fwd", 0}) == Approx(13e-6));  // 18 - 5, rank 1's span
  CHECK(times.at({"L0.moe.dispatch_a2a mb0 fwd", 1}) == Approx(13e-6));
  // Two spans of one op id in a step count as one time: their sum.
  *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, 0, 2, 2'500'000, 2'510'000);
  *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, 0, 4, 4'500'000, 4'510'000);
  *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, 0, 5, 5'500'000, 5'510'000);
  CHECK(median_op_times(t, {1, 2, 3, 4, 5}).at({"L0.attn mb0 fwd", 0}) == Approx(60e-6));
  CHECK(median_op_times(t, {1, 3}).at({"L0.attn mb0 fwd", 0}) == Approx(50e-6));  // only the given steps
}

TEST_CASE("Host routing seconds are medians over the given steps, per op and rank") {
  Trace t;
  for (int step = 0; step < 4; ++step) {
    Span gate = span("L0.moe.gate mb0 fwd", "moe.gate", ELEMENTWISE, 1, step, 0, 100'000);
    gate.set_routing_host_s(step == 3 ? 300e-6 : 10e-6 * (step + 1));  // step 3: a hiccup
    gate.set_dispatch_host_s(step == 2 ? 4e-6 : 0);
    *t.add_spans() = gate;
    *t.add_spans() = span("L0.attn mb0 fwd", "attn", ATTENTION, 1, step, 100'000, 200'000);
  }
  const auto h = median_host_routing(t, {1, 2});
  REQUIRE(h.size() == 1);  // the attention has none
  const HostRouting& g = h.at({"L0.moe.gate mb0 fwd", 1});
  CHECK(g.routing_s == Approx(25e-6));
  CHECK(g.dispatch_s == Approx(2e-6));
  CHECK(median_host_routing(t, {1, 2, 3}).at({"L0.moe.gate mb0 fwd", 1}).routing_s == Approx(30e-6));  // not 110
}

TEST_CASE("Traces of different schedules are refused with the first missing op") {
  Trace other = measured(2);
  other.mutable_spans(1)->set_op_id("L0.moe.combine_a2a mb0 fwd");  // rank 0, step 0 (skipped)
  other.mutable_spans(7)->set_op_id("L0.moe.combine_a2a mb0 fwd");  // rank 0, step 1
  CHECK_THROWS_WITH(compare(predicted(), other, {.predicted_step_s = 1e-4}),
                    Catch::Contains("'L0.moe.dispatch_a2a mb0 fwd' on rank 0") && Catch::Contains("missing"));
  Trace extra = measured(2);
  *extra.add_spans() = span("optimizer", "optimizer", OPTIMIZER, 0, 1, 900'000, 950'000);
  CHECK_THROWS_WITH(compare(predicted(), extra, {.predicted_step_s = 1e-4}),
                    Catch::Contains("measured op 'optimizer' on rank 0") && Catch::Contains("not in the prediction"));
  CHECK_THROWS_AS(compare(predicted(), Trace(), {}), std::invalid_argument);
}

TEST_CASE("Repeated runs: each op's error is its median over the runs, then per kind, with the runs' spread") {
  // Three runs of one plan. The all-reduce's errors per run are +40, -10 and +5 (median +5); the
  // two all-to-alls (ops a and b, on two ranks) have medians -20 and +10 and +30 (rank 1 of op b
  // misses the last run: the median of the other two); one run's NaN is left out.
  auto op = [](const char* id, const char* kind, int rank, double error_pct) {
    return OpError{id, kind, rank, 1.0, 1.0, error_pct};
  };
  const std::vector<std::vector<OpError>> runs = {
      {op("ar", "all_reduce", 0, 40), op("a", "dispatch_a2a", 0, -20), op("b", "dispatch_a2a", 1, 20),
       op("b", "dispatch_a2a", 0, 10)},
      {op("ar", "all_reduce", 0, -10), op("a", "dispatch_a2a", 0, -30), op("b", "dispatch_a2a", 1, 40),
       op("b", "dispatch_a2a", 0, 10)},
      {op("ar", "all_reduce", 0, 5), op("a", "dispatch_a2a", 0, -10), op("b", "dispatch_a2a", 0, std::nan(""))},
  };
  const std::map<std::string, KindOverRuns> k = per_kind_over_runs(runs);
  REQUIRE(k.size() == 2);
  const ErrorStats& all_reduce = k.at("all_reduce").errors;
  CHECK(all_reduce.count == 1);
  CHECK(all_reduce.median_abs_pct == Approx(5));
  CHECK(k.at("all_reduce").spread_pct == Approx(25));  // (40 - -10) / 2
  // dispatch: op a rank 0 median -20, op b rank 0 median 10, op b rank 1 median 30.
  const ErrorStats& dispatch = k.at("dispatch_a2a").errors;
  CHECK(dispatch.count == 3);
  CHECK(dispatch.median_abs_pct == Approx(20));
  CHECK(dispatch.max_abs_pct == Approx(30));
  CHECK(dispatch.mean_pct == Approx(20.0 / 3));
  // Half ranges 10, 0 and 10.
  CHECK(k.at("dispatch_a2a").spread_pct == Approx(10));
  // One run is that run's own figures, with no spread.
  const KindOverRuns one = per_kind_over_runs({runs[0]}).at("all_reduce");
  CHECK(one.errors.median_abs_pct == Approx(40));
  CHECK(one.spread_pct == 0);
}

TEST_CASE("Quantiles interpolate, Kendall's tau counts concordant pairs") {
  CHECK(quantile({3, 1, 2}, 0.5) == 2);
  CHECK(quantile({1, 2, 3, 4}, 0.5) == Approx(2.5));
  CHECK(quantile({0, 10}, 0.9) == Approx(9));
  CHECK(quantile({}, 0.5) == 0);
  CHECK(kendall_tau({1, 2, 3, 4}, {10, 20, 30, 40}) == 1);
  CHECK(kendall_tau({1, 2, 3, 4}, {40, 30, 20, 10}) == -1);
  // One swapped pair of 6: (6 - 1 - 1) / 6 concordant-minus-discordant over pairs.
  CHECK(kendall_tau({1, 2, 3, 4}, {1, 3, 2, 4}) == Approx(4.0 / 6));
  CHECK(op_kind_label("moe.gate") == "gate");
  CHECK(op_kind_label("attn") == "attention");
  CHECK(op_kind_label("grad_allreduce") == "all_reduce");
}

}  // namespace
}  // namespace moesim::trace
