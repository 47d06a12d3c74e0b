// Calibration fits (costmodel/calibration.h) on synthetic measurements made by the cost model
// itself from known parameters: the fits must recover those parameters (within 2%, the issue's
// bar), and the fitted profile must reproduce the measurements through costmodel/compute.h.
#include "costmodel/calibration.h"
#include "costmodel/collectives.h"
#include "costmodel/compute.h"
#include "test_clusters.h"
#include "topologies/cluster.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <google/protobuf/text_format.h>

#include <cmath>
#include <random>

namespace moesim::cost {
namespace {

// A synthetic calibration step of twelve ops of 0.02-2 ms (c) beyond 0.5 us launches (b), timed
// (t) by `truth` with the host terms' counts `terms`.
struct SyntheticStep {
  std::vector<double> c, b, t;
};
SyntheticStep synthetic_step(const InSituFit& truth, const InSituTerms& terms) {
  SyntheticStep s;
  for (size_t j = 0; j < 12; ++j) {
    s.c.push_back(2e-5 * std::pow(1.5, static_cast<double>(j)));
    s.b.push_back(5e-7);
    s.t.push_back(truth.time_s(s.c.back(), s.b.back(), terms, j));
  }
  return s;
}

// The same step whose ops hold `terms`' gathers too (their seconds part of the fixed times b),
// timed by `truth`.
SyntheticStep gathering_step(const InSituFit& truth, const InSituTerms& terms) {
  SyntheticStep s = synthetic_step(truth, {});
  for (size_t j = 0; j < s.c.size(); ++j) {
    s.b[j] += at_or_zero(terms.gather, j) + at_or_zero(terms.gather_backward, j);
    s.t[j] = truth.time_s(s.c[j], s.b[j], terms, j);
  }
  return s;
}

// Twelve counts, `a` at op i and `b` at op k, 0 elsewhere.
std::vector<double> counts_at(size_t i, double a, size_t k, double b) {
  std::vector<double> v(12, 0.0);
  v[i] = a;
  v[k] = b;
  return v;
}

// A known profile: peak 80 GFLOP/s, launch 2 us, GEMM efficiency 0.2 at 1e5 FLOPs rising to 0.8
// at 1e8, memory 20 GB/s.
DeviceProfile known() {
  return load_device_profile_text(R"pb(
    device { name: "cpu-rank" peak_flops_per_s { fp32: 80e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9
             kernel_launch_overhead_s: 2e-6 }
    memory_bandwidth_efficiency: 1
    compute { op: GEMM dtype: FP32 point { flops: 1e5 efficiency: 0.2 } point { flops: 1e6 efficiency: 0.45 }
              point { flops: 1e8 efficiency: 0.8 } })pb",
                                  "known.textproto");
}

Op gemm(double m, double n, double k) {
  Op op;
  op.name = "g";
  op.kind = OpKind::kGemm;
  op.m = m;
  op.n = n;
  op.k = k;
  op.flops = 2 * m * n * k;
  op.bytes = 0;  // compute-bound by construction
  return op;
}

TEST_CASE("Efficiency curves, peak and bandwidth are recovered from the model's own times") {
  const DeviceProfile p = known();
  std::vector<KernelSample> samples;
  // Samples at the curve's knots (a few shapes each) and between them, plus one at the top.
  for (double flops : {1e5, 1e6, 1e8})
    for (double m : {10.0, 40.0}) {
      const double nk = flops / (2 * m);
      const Op op = gemm(m, std::sqrt(nk), std::sqrt(nk));
      samples.push_back({op.flops, 0, op_time(p, op, DType::kFp32).time_s});
    }
  const double launch = 2e-6;
  // The fastest sample runs at 0.8 of the peak: the fit's peak is 0.8 x 80 GFLOP/s, and every
  // efficiency comes out relative to that (x 1 / 0.8).
  const double peak = fit_peak_flops(samples, launch);
  CHECK(peak == Approx(0.8 * 80e9).epsilon(0.02));
  const profile::EfficiencyCurve c = fit_efficiency_curve(profile::GEMM, profile::FP32, samples, 80e9, launch);
  REQUIRE(c.point_size() == 3);
  const double expected[][2] = {{1e5, 0.2}, {1e6, 0.45}, {1e8, 0.8}};
  for (int i = 0; i < 3; ++i) {
    CHECK(c.point(i).flops() == Approx(expected[i][0]).epsilon(0.02));
    CHECK(c.point(i).efficiency() == Approx(expected[i][1]).epsilon(0.02));
  }
  // Memory-bound kernels: 20 GB/s recovered from launch + bytes / bandwidth.
  std::vector<KernelSample> mem;
  for (double bytes : {1e4, 1e6, 3e7}) mem.push_back({0, bytes, launch + bytes / 20e9});
  CHECK(fit_memory_bandwidth(mem, launch) == Approx(20e9).epsilon(0.02));
}

TEST_CASE("A GPU's time per BLAS call is recovered beside its curves, and 0 where there is none") {
  // A GPU-like truth: 40 TFLOP/s, a 10 us launch, 9 us per BLAS call, efficiency 0.002 at 1e5
  // FLOPs rising to 0.17 at 1e9 (every GEMM below 1e7 FLOPs 19-21 us, nearly flat).
  auto truth = [](double call_s) {
    return load_device_profile_text(fmt::format(R"pb(
      device {{ name: "gpu-rank" peak_flops_per_s {{ fp32: 40e12 }} memory_bytes: 8e9 memory_bandwidth_Bps: 3e12
               kernel_launch_overhead_s: 10e-6 }}
      blas_call_s: {}
      compute {{ op: GEMM dtype: FP32 point {{ flops: 1e5 efficiency: 0.002 }} point {{ flops: 1e6 efficiency: 0.006 }}
                point {{ flops: 1e7 efficiency: 0.018 }} point {{ flops: 1e8 efficiency: 0.055 }}
                point {{ flops: 1e9 efficiency: 0.17 }} }}
      compute {{ op: GROUPED_GEMM dtype: FP32 point {{ flops: 1e5 efficiency: 0.002 }} point {{ flops: 1e6 efficiency: 0.006 }}
                point {{ flops: 1e7 efficiency: 0.018 }} point {{ flops: 1e8 efficiency: 0.055 }}
                point {{ flops: 1e9 efficiency: 0.17 }} }})pb",
                                                call_s),
                                    "gpu.textproto");
  };
  for (const double call_s : {9e-6, 0.0}) {
    CAPTURE(call_s);
    const DeviceProfile p = truth(call_s);
    // GEMMs 3x apart; grouped GEMMs of 1 and 4 groups whose FLOPs meet (8 rows in 4 groups, 32 in 1):
    // the pairs that tell the calls' time from the curve's.
    std::vector<KernelSample> gemms, grouped;
    for (double f = 1e5; f < 1e9; f *= 3) {
      Op op = gemm(1, 1, 1);
      op.flops = f;
      gemms.push_back({f, 0, op_time(p, op, DType::kFp32).time_s, 0, 1});
    }
    for (double g : {1.0, 4.0})
      for (double rows : {8.0, 32.0, 128.0, 512.0}) {
        Op op = gemm(rows, 64, 128 * g);
        op.kind = OpKind::kGroupedGemm;
        op.groups = static_cast<int64_t>(g);
        grouped.push_back({op.flops, 0, op_time(p, op, DType::kFp32).time_s, 0, g});
      }
    const double fitted = fit_blas_call_s(gemms, grouped, 10e-6);
    CHECK(fitted == Approx(call_s).margin(0.02 * 9e-6));
    // Through the fitted call time, the peak and curves reproduce every sample.
    std::vector<KernelSample> all = gemms;
    all.insert(all.end(), grouped.begin(), grouped.end());
    const double peak = fit_peak_flops(all, 10e-6, fitted);
    const std::vector<KernelSample> g = without_blas_calls(gemms, fitted), gg = without_blas_calls(grouped, fitted);
    // The fastest sample's rate: the biggest GEMM's.
    CHECK(peak == Approx(40e12 * p.compute_efficiency(OpKind::kGemm, DType::kFp32, gemms.back().flops)).epsilon(0.02));
    profile::DeviceProfile spec = p.spec();
    spec.mutable_device()->mutable_peak_flops_per_s()->set_fp32(peak);
    spec.set_blas_call_s(fitted);
    spec.clear_compute();
    *spec.add_compute() = fit_efficiency_curve(profile::GEMM, profile::FP32, g, peak, 10e-6);
    *spec.add_compute() = fit_efficiency_curve(profile::GROUPED_GEMM, profile::FP32, gg, peak, 10e-6);
    const DeviceProfile fit = DeviceProfile::from_spec(spec);
    for (auto [kind, samples] : {std::pair{OpKind::kGemm, &gemms}, std::pair{OpKind::kGroupedGemm, &grouped}})
      for (const KernelSample& s : *samples) {
        Op op = gemm(1, 1, 1);
        op.kind = kind;
        op.flops = s.flops;
        op.groups = static_cast<int64_t>(s.groups);
        CHECK(op_time(fit, op, DType::kFp32).time_s == Approx(s.seconds).epsilon(0.02));
      }
  }
}

TEST_CASE("A too-steep or noisy curve is clamped to compute.h's rule and to at most 1") {
  // Efficiency 0.1 at 1e4 then 1.0 at 2e4 would make the bigger kernel faster: clamped.
  std::vector<KernelSample> s = {{1e4, 0, 1e4 / (0.1 * 1e9)}, {2e4, 0, 2e4 / (1.0 * 1e9)}, {4e4, 0, 4e4 / (3.0 * 1e9)}};
  const profile::EfficiencyCurve c = fit_efficiency_curve(profile::GEMM, profile::FP32, s, 1e9, 0, 1.5);
  REQUIRE(c.point_size() == 3);
  for (int i = 1; i < 3; ++i) {
    CHECK(c.point(i).efficiency() <= c.point(i - 1).efficiency() * (1 + std::log(c.point(i).flops() / c.point(i - 1).flops())) + 1e-12);
    CHECK(c.point(i).efficiency() <= 1);
  }
  // The curve loads as a profile: compute.h accepts it.
  profile::DeviceProfile spec;
  google::protobuf::TextFormat::ParseFromString(
      R"pb(device { name: "x" peak_flops_per_s { fp32: 1e9 } memory_bytes: 1e9 memory_bandwidth_Bps: 1e9 })pb", &spec);
  *spec.add_compute() = c;
  CHECK_NOTHROW(DeviceProfile::from_spec(spec));
}

TEST_CASE("The in-situ factor and the per-op overhead are recovered, and the ops' sum is kept") {
  // Ten ops of 0.1-1 ms scaled 1.6x beyond 1 us launches, each with 5 us around its kernels.
  std::vector<double> c, b, t;
  for (int j = 0; j < 10; ++j) {
    c.push_back(1e-4 * (1 + j));
    b.push_back(1e-6);
    t.push_back(1e-6 + 1.6 * c.back() + 5e-6);
  }
  InSituFit fit = fit_in_situ(c, b, t);
  CHECK(fit.factor == Approx(1.6).epsilon(0.02));
  CHECK(fit.op_overhead_s == Approx(5e-6).epsilon(0.02));
  // Two ops 3x slower still: the fit keeps the measured sum of the ops (equal weights).
  for (int j : {3, 7}) t[static_cast<size_t>(j)] = 1e-6 + 3 * 1.6 * c[static_cast<size_t>(j)] + 5e-6;
  fit = fit_in_situ(c, b, t);
  double predicted = 0, measured = 0;
  for (size_t j = 0; j < c.size(); ++j) {
    predicted += b[j] + fit.factor * c[j] + fit.op_overhead_s;
    measured += t[j];
  }
  CHECK(predicted == Approx(measured).epsilon(1e-9));
  // Ops faster than their scaled kernels by a constant: no negative overhead, the time-weighted
  // factor alone.
  for (size_t j = 0; j < c.size(); ++j) t[j] = 1e-6 + 1.6 * c[j] - 3e-6;
  fit = fit_in_situ(c, b, t);
  CHECK(fit.op_overhead_s == 0);
  CHECK(fit.factor == Approx((1.6 * 55e-4 - 10 * 3e-6) / 55e-4).epsilon(1e-9));
  CHECK(fit_in_situ({}, {}, {}).factor == 1);
  CHECK(fit_in_situ({}, {}, {}).op_overhead_s == 0);
  CHECK(fit_in_situ({1e-4}, {0}, {1e-1}).factor == 10);  // clamped
}

// The host seconds a step's ops measured inside them for each of `terms` at its rate in `truth`.
InSituHost host_of(const InSituFit& truth, const InSituTerms& terms) {
  InSituHost h;
  for (size_t j = 0; j < 12; ++j) {
    h.routing_s.push_back(truth.routing_choice_s * at_or_zero(terms.gate, j) +
                          truth.routing_backward_choice_s * at_or_zero(terms.gate_backward, j));
    h.dispatch_s.push_back(truth.dispatch_choice_s * at_or_zero(terms.dispatch, j));
  }
  return h;
}

TEST_CASE("The host terms' times per choice come from the seconds measured in their ops") {
  // Twelve ops of 0.02-2 ms scaled 1.3x, 4 us around each; two gates routing 256 and 512
  // token-choices at 90 ns each, two dispatches deciding 1024 and 2048 group choices at 6 ns, two
  // gate backwards at 25 ns.
  const InSituTerms terms{.gate = counts_at(2, 256, 7, 512), .dispatch = counts_at(3, 1024, 8, 2048),
                          .gate_backward = counts_at(4, 256, 9, 512)};
  const InSituFit truth{.factor = 1.3, .op_overhead_s = 4e-6, .routing_choice_s = 90e-9, .dispatch_choice_s = 6e-9,
                        .routing_backward_choice_s = 25e-9};
  const auto [c, b, t] = synthetic_step(truth, terms);
  const InSituFit fit = fit_in_situ(c, b, t, terms, host_of(truth, terms));
  CHECK(fit.factor == Approx(1.3).epsilon(0.02));
  CHECK(fit.op_overhead_s == Approx(4e-6).epsilon(0.02));
  CHECK(fit.routing_choice_s == Approx(90e-9).epsilon(1e-9));
  CHECK(fit.dispatch_choice_s == Approx(6e-9).epsilon(1e-9));
  CHECK(fit.routing_backward_choice_s == Approx(25e-9).epsilon(1e-9));
  for (size_t j = 0; j < c.size(); ++j) CHECK(fit.time_s(c[j], b[j], terms, j) == Approx(t[j]).epsilon(0.02));
  // A gate's kernels slower in the step than modelled (its router GEMM 40 us over): the excess
  // stays out of the time per choice, which is measured.
  std::vector<double> slow = t;
  slow[2] += 40e-6;
  CHECK(fit_in_situ(c, b, slow, terms, host_of(truth, terms)).routing_choice_s == Approx(90e-9).epsilon(1e-9));
  // Without the measurements the host time goes into the overhead and the factor.
  const InSituFit blind = fit_in_situ(c, b, t, terms);
  CHECK(blind.routing_choice_s == 0);
  CHECK(blind.dispatch_choice_s == 0);
  CHECK(blind.op_overhead_s > 4.1e-6);
}

TEST_CASE("The host rates over rounds are each their median and the rest of the fit is kept") {
  // Five rounds of one step: the fourth slowed in its dispatch decisions alone (15 ns a choice
  // against 7-8), the second in its gates.
  std::vector<InSituFit> rounds;
  const double gate[] = {90e-9, 200e-9, 92e-9, 88e-9, 91e-9}, dispatch[] = {7e-9, 7.5e-9, 8e-9, 15e-9, 7.2e-9},
               backward[] = {25e-9, 26e-9, 24e-9, 25.5e-9, 27e-9};
  for (int i = 0; i < 5; ++i)
    rounds.push_back({.factor = 1.0 + 0.01 * i, .routing_choice_s = gate[i], .dispatch_choice_s = dispatch[i],
                      .routing_backward_choice_s = backward[i]});
  InSituFit fit = rounds[3];
  fit.op_overhead_s = 1e-6;
  fit.gather_factor = 0.2;
  median_host_rates(rounds, &fit);
  CHECK(fit.routing_choice_s == Approx(91e-9));
  CHECK(fit.dispatch_choice_s == Approx(7.5e-9));
  CHECK(fit.routing_backward_choice_s == Approx(25.5e-9));
  CHECK(fit.factor == Approx(1.03));
  CHECK(fit.op_overhead_s == 1e-6);
  CHECK(fit.gather_factor == 0.2);
  // An even count takes the middle pair's mean; no rounds leave the fit as it was.
  rounds.pop_back();
  median_host_rates(rounds, &fit);
  CHECK(fit.dispatch_choice_s == Approx((7.5e-9 + 8e-9) / 2));
  const InSituFit before = fit;
  median_host_rates({}, &fit);
  CHECK(fit.dispatch_choice_s == before.dispatch_choice_s);
}

TEST_CASE("Gathers get their own factor, fitted on the ops that hold them") {
  // The twelve ops of synthetic_step, 1.3x and 4 us around each; three hold gathers of 10, 20 and
  // 40 us at the profile's rate (in their fixed part) that run at half that in the step, one of
  // them a gather alone (nothing the factor scales, as a permutation).
  InSituTerms terms;
  terms.gather = counts_at(1, 10e-6, 4, 20e-6);
  terms.gather[6] = 40e-6;
  const InSituFit truth{.factor = 1.3, .op_overhead_s = 4e-6, .gather_factor = 0.5};
  auto [c, b, t] = synthetic_step(truth, {});
  for (size_t j = 0; j < c.size(); ++j) {
    if (j == 4) c[j] = 0;
    b[j] += terms.gather[j];
    t[j] = truth.time_s(c[j], b[j], terms, j);
  }
  const InSituFit fit = fit_in_situ(c, b, t, terms);
  CHECK(fit.gather_factor == Approx(0.5).epsilon(0.02));
  CHECK(fit.factor == Approx(1.3).epsilon(0.02));
  CHECK(fit.op_overhead_s == Approx(4e-6).epsilon(0.02));
  for (size_t j = 0; j < c.size(); ++j) CHECK(fit.time_s(c[j], b[j], terms, j) == Approx(t[j]).epsilon(0.02));
  // Not told which ops hold gathers: factor 1 for them, the others' fit absorbs the difference.
  CHECK(fit_in_situ(c, b, t).gather_factor == 1);
}

TEST_CASE("Forward and backward gathers get a factor each") {
  // The twelve ops, 1.3x and 4 us around each; forward gathers of 10 and 40 us at the profile's
  // rate run at 0.4 of it, backward ones of 20 and 30 us at 0.8, one op holding both.
  InSituTerms terms;
  terms.gather = counts_at(1, 10e-6, 6, 40e-6);
  terms.gather_backward = counts_at(4, 20e-6, 6, 30e-6);
  const InSituFit truth{.factor = 1.3, .op_overhead_s = 4e-6, .gather_factor = 0.4, .gather_backward_factor = 0.8};
  const auto [c, b, t] = gathering_step(truth, terms);
  const InSituFit fit = fit_in_situ(c, b, t, terms);
  CHECK(fit.gather_factor == Approx(0.4).epsilon(0.02));
  CHECK(fit.gather_backward_factor == Approx(0.8).epsilon(0.02));
  CHECK(fit.factor == Approx(1.3).epsilon(0.02));
  CHECK(fit.op_overhead_s == Approx(4e-6).epsilon(0.02));
  // Without backward gathers in the step its factor stays 1.
  InSituTerms forward_only = terms;
  forward_only.gather_backward.clear();
  CHECK(fit_in_situ(c, b, t, forward_only).gather_backward_factor == 1);
}

TEST_CASE("A lookup's backward gets its own factor, out of the other backward gathers' fit") {
  // As above, with op 9 a lookup's backward: its 12 us scatter-add at 1.6x the profile's rate where
  // the other backward gathers run at 0.8 (a cold table's gradient in a step whose combine's
  // backward finds its rows warm).
  InSituTerms terms;
  terms.gather = counts_at(1, 10e-6, 6, 40e-6);
  terms.gather_backward = counts_at(4, 20e-6, 9, 12e-6);
  terms.scatter_add = counts_at(9, 12e-6, 9, 12e-6);
  const InSituFit truth{.factor = 1.3,
                        .op_overhead_s = 4e-6,
                        .gather_factor = 0.4,
                        .gather_backward_factor = 0.8,
                        .scatter_add_factor = 1.6};
  const auto [c, b, t] = gathering_step(truth, terms);
  const InSituFit fit = fit_in_situ(c, b, t, terms);
  CHECK(fit.scatter_add_factor == Approx(1.6).epsilon(0.02));
  CHECK(fit.gather_backward_factor == Approx(0.8).epsilon(0.02));
  CHECK(fit.gather_factor == Approx(0.4).epsilon(0.02));
  CHECK(fit.factor == Approx(1.3).epsilon(0.02));
  CHECK(fit.op_overhead_s == Approx(4e-6).epsilon(0.02));
  for (size_t j = 0; j < c.size(); ++j) CHECK(fit.time_s(c[j], b[j], terms, j) == Approx(t[j]).epsilon(1e-6));
  // Not told which backward gather is a lookup's: its factor stays 1.
  InSituTerms pooled = terms;
  pooled.scatter_add.clear();
  CHECK(fit_in_situ(c, b, t, pooled).scatter_add_factor == 1);
}

TEST_CASE("A cap on the overhead holds it there, the factors fitted around it and the sum kept") {
  // The twelve ops at 1.3x with 4 us around each, capped at 1 us (another step's smaller ops put
  // it lower): h is 1 us, and the factor keeps the measured sum with it.
  const InSituFit truth{.factor = 1.3, .op_overhead_s = 4e-6};
  const auto [c, b, t] = synthetic_step(truth, {});
  const InSituFit free = fit_in_situ(c, b, t);
  CHECK(free.op_overhead_s == Approx(4e-6).epsilon(0.02));
  const InSituFit capped = fit_in_situ(c, b, t, {}, {}, 1e-6);
  CHECK(capped.op_overhead_s == Approx(1e-6));
  double predicted = 0, measured = 0;
  for (size_t j = 0; j < c.size(); ++j) {
    predicted += capped.time_s(c[j], b[j], {}, j);
    measured += t[j];
  }
  CHECK(predicted == Approx(measured).epsilon(1e-9));
  CHECK(capped.factor > free.factor);
  // A cap above the fitted overhead changes nothing.
  CHECK(fit_in_situ(c, b, t, {}, {}, 1e-5).op_overhead_s == Approx(free.op_overhead_s));
}

TEST_CASE("The per-op overhead is the ops' time at no tokens, the median over them") {
  // Ops of 0.8 us plus a time per token each, at 48 and 192 tokens (the calibration's layer at
  // one and four sequences): every line meets 0.8 us at 0 tokens.
  std::vector<std::pair<double, double>> times;
  for (double per_token : {2e-8, 5e-8, 9e-8, 3e-7}) times.emplace_back(0.8e-6 + 48 * per_token, 0.8e-6 + 192 * per_token);
  CHECK(op_overhead_intercept(times, 1, 4) == Approx(0.8e-6).epsilon(0.02));
  // One op that slows per token with its size (out of cache at four times the tokens) reads
  // below 0 alone; the median is the others'.
  times.emplace_back(0.8e-6 + 48 * 1e-7, 0.8e-6 + 192 * 3e-7);
  CHECK(op_overhead_intercept(times, 1, 4) == Approx(0.8e-6).epsilon(0.02));
  // Every op through the origin or below it: no overhead, not a negative one.
  CHECK(op_overhead_intercept({{1e-6, 4e-6}, {1e-6, 5e-6}}, 1, 4) == 0);
  // Nothing to bound it with: no bound.
  CHECK(std::isinf(op_overhead_intercept({}, 1, 4)));
  CHECK(std::isinf(op_overhead_intercept(times, 4, 4)));
}

TEST_CASE("A kind measured at two sizes that disagree takes what both say: the factor nearer 1, or 1") {
  // Both over 1 (the lookup's forward on the third host: 1.27 in the step, 1.36 at half the
  // tokens): the smaller; both under: the larger; either side of 1 (the optimizer's 1.25 and
  // 1.05 would be the same side; 1.25 and 0.95 are not): 1. The order does not matter.
  CHECK(sized_kind_factor(1.27, 1.36) == 1.27);
  CHECK(sized_kind_factor(1.36, 1.27) == 1.27);
  CHECK(sized_kind_factor(0.7, 0.85) == 0.85);
  CHECK(sized_kind_factor(1.25, 1.05) == 1.05);
  CHECK(sized_kind_factor(1.25, 0.95) == 1);
  CHECK(sized_kind_factor(0.8, 1.3) == 1);
}

TEST_CASE("Each kind of op's factor is its ops' measured time beyond the overhead over their modelled") {
  // Gates forward run 1.25x their model beyond a 1 us overhead, their backwards 0.9x; two
  // attention ops 0.9x and 1.1x of theirs (equal sizes): 1 over both. An op modelled at the
  // overhead alone tells nothing.
  const double h = 1e-6;
  auto at = [&](double model, double factor) { return h + factor * (model - h); };
  const std::vector<std::string> kinds = {"gate", "gate", "gate", "attention", "attention", "embed"};
  const std::vector<bool> backward = {false, false, true, false, false, false};
  const std::vector<double> model = {40e-6, 60e-6, 50e-6, 500e-6, 500e-6, h};
  const std::vector<double> measured = {at(40e-6, 1.25), at(60e-6, 1.25), at(50e-6, 0.9), at(500e-6, 0.9),
                                        at(500e-6, 1.1), 3e-6};
  const auto f = fit_op_kind_factors(kinds, backward, measured, model, h);
  REQUIRE(f.size() == 3);
  CHECK(f.at({"gate", false}) == Approx(1.25));
  CHECK(f.at({"gate", true}) == Approx(0.9));
  CHECK(f.at({"attention", false}) == Approx(1.0));
  CHECK(f.count({"embed", false}) == 0);
  // Clamped to [0.1, 10].
  CHECK(fit_op_kind_factors({"head"}, {false}, {1e-3}, {2e-6}, h).at({"head", false}) == 10);
}

TEST_CASE("A memory-bound kind's factors by bytes are each size's time over the kind's bandwidth") {
  // Times of a kernel streaming at 100 GB/s up to 1 MB and 25 GB/s at 8 MB, 2 us launch, with a
  // kind bandwidth of 50 GB/s: factors 0.5 and 2; a size measured three times takes its median.
  const double launch = 2e-6;
  const std::vector<KernelSample> samples = {{0, 1e5, launch + 1e5 / 100e9},
                                             {0, 1e6, launch + 1e6 / 100e9},
                                             {0, 1e6, launch + 1e6 / 10e9},
                                             {0, 1e6, launch + 1e6 / 100e9},
                                             {0, 8e6, launch + 8e6 / 25e9},
                                             {0, 0, 1e-6}};  // moves no bytes: left out
  const auto factors = memory_time_factors(samples, launch, 50e9);
  REQUIRE(factors.size() == 3);
  CHECK(factors[0].first == 1e5);
  CHECK(factors[0].second == Approx(0.5));
  CHECK(factors[1].second == Approx(0.5));
  CHECK(factors[2].first == 8e6);
  CHECK(factors[2].second == Approx(2));
  CHECK(memory_time_factors(samples, launch, 0).empty());
}

TEST_CASE("Gathers' factor is fitted with the overhead held at 0 when it would come out negative") {
  // As above without overhead, every op 2 us faster than the model can say (a negative h): the
  // unconstrained fit puts h at -2 us and the gathers at 0.5, which with h floored at 0 prices the
  // gather-only op 2 us (25%) over. Fitted with h held at 0, the gathers' factor takes it.
  InSituTerms terms;
  terms.gather = counts_at(1, 10e-6, 4, 20e-6);
  terms.gather[6] = 40e-6;
  const InSituFit truth{.factor = 1.3, .op_overhead_s = 0, .gather_factor = 0.5};
  auto [c, b, t] = synthetic_step(truth, {});
  for (size_t j = 0; j < c.size(); ++j) {
    if (j == 4) c[j] = 0;
    b[j] += terms.gather[j];
    t[j] = truth.time_s(c[j], b[j], terms, j) - 2e-6;
  }
  const InSituFit fit = fit_in_situ(c, b, t, terms);
  CHECK(fit.op_overhead_s == 0);
  CHECK(fit.gather_factor < 0.5);
  // The gather-only op (8 us measured) within 10%, where 0.5 with no overhead gives 10 us.
  CHECK(fit.time_s(c[4], b[4], terms, 4) == Approx(t[4]).epsilon(0.1));
  InSituFit old = fit;
  old.gather_factor = 0.5;
  CHECK(std::fabs(fit.time_s(c[4], b[4], terms, 4) - t[4]) < std::fabs(old.time_s(c[4], b[4], terms, 4) - t[4]));
}

TEST_CASE("A gate holding its dispatch has both measured apart") {
  // EP = 1: each gate holds its dispatch's decision, 256 and 512 choices of each, at 80 and 12 ns
  // per choice, measured apart inside the op.
  const std::vector<double> r = counts_at(2, 256, 7, 512);
  const InSituTerms terms{.gate = r, .dispatch = r};
  const InSituFit truth{.factor = 1.3, .op_overhead_s = 4e-6, .routing_choice_s = 80e-9, .dispatch_choice_s = 12e-9};
  const auto [c, b, t] = synthetic_step(truth, terms);
  const InSituFit fit = fit_in_situ(c, b, t, terms, host_of(truth, terms));
  CHECK(fit.routing_choice_s == Approx(80e-9).epsilon(1e-9));
  CHECK(fit.dispatch_choice_s == Approx(12e-9).epsilon(1e-9));
  CHECK(fit.factor == Approx(1.3).epsilon(0.02));
}

TEST_CASE("An op with nothing the factor scales still counts") {
  // Two permutations whose gathers' kind has no in-situ factor (c = 0): their decision's time per
  // choice and the overhead come out all the same.
  const InSituTerms terms{.gate = counts_at(2, 256, 7, 512), .dispatch = counts_at(3, 1024, 8, 2048)};
  const InSituFit truth{.factor = 1.3, .op_overhead_s = 4e-6, .routing_choice_s = 90e-9, .dispatch_choice_s = 6e-9};
  auto [c, b, t] = synthetic_step(truth, terms);
  for (size_t j : {size_t{3}, size_t{8}}) {
    b[j] += 1.3 * c[j];
    c[j] = 0;
  }
  const InSituFit fit = fit_in_situ(c, b, t, terms, host_of(truth, terms));
  CHECK(fit.dispatch_choice_s == Approx(6e-9).epsilon(1e-9));
  CHECK(fit.op_overhead_s == Approx(4e-6).epsilon(0.02));
  CHECK(fit.factor == Approx(1.3).epsilon(0.02));
}

TEST_CASE("The batch-priority sort's time per n log2 n is what it adds to the vanilla decision") {
  // Decisions at 20 ns per assignment plus 0.5 us, 8 experts top-2; batch priority sorts too, at
  // 5 ns per n log2 n, with a +-3% scatter on the extra.
  std::vector<SortSample> samples;
  int i = 0;
  for (double n : {256.0, 1024.0, 4096.0, 16384.0}) {
    const double vanilla = 0.5e-6 + 20e-9 * 2 * n;
    const double scatter = (i++ % 2 == 0 ? 1.03 : 0.97);
    samples.push_back({n, vanilla, vanilla + scatter * 5e-9 * n * std::log2(n)});
  }
  CHECK(fit_priority_sort(samples) == Approx(5e-9).epsilon(0.02));
  // A sort faster than noise (batch priority no slower): 0, never negative.
  for (SortSample& s : samples) s.batch_priority_s = 0.9 * s.vanilla_s;
  CHECK(fit_priority_sort(samples) == 0);
  CHECK_THROWS_AS(fit_priority_sort({}), std::invalid_argument);
  CHECK_THROWS_AS(fit_priority_sort({{1, 1e-6, 2e-6}}), std::invalid_argument);
  CHECK_THROWS_AS(fit_priority_sort({{256, 0, 2e-6}}), std::invalid_argument);
}

TEST_CASE("The softmax's time per score and the time per group are told from the matmuls'") {
  // Attention cores timed by a known profile (constant efficiency 0.25 of 80 GFLOP/s, 9.5 ns per
  // score, 2 us per group): 4 h FLOPs per score element, head dims 16 and 32, 1-32 sequences of
  // 32 and 64.
  const DeviceProfile p = load_device_profile_text(R"pb(
    device { name: "cpu-rank" peak_flops_per_s { fp32: 80e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9
             kernel_launch_overhead_s: 2e-6 }
    softmax_score_s: 9.5e-9
    attention_group_s: 2e-6
    compute { op: ATTENTION dtype: FP32 point { flops: 1e5 efficiency: 0.25 } })pb",
                                                   "known.textproto");
  std::vector<KernelSample> samples;
  for (double head_dim : {16.0, 32.0})
    for (double seqs : {1.0, 4.0, 32.0})
      for (double seq : {32.0, 64.0}) {
        Op op;
        op.name = "core";
        op.kind = OpKind::kAttention;
        op.m = op.n = seq;
        op.k = head_dim;
        op.groups = static_cast<int64_t>(seqs * 64 / head_dim);
        op.softmax_elements = static_cast<double>(op.groups) * seq * seq;
        op.flops = op.softmax_elements * 4 * head_dim;
        samples.push_back({op.flops, 0, op_time(p, op, DType::kFp32).time_s, op.softmax_elements,
                           static_cast<double>(op.groups)});
      }
  const AttentionCoreFit fit = fit_attention_core(samples, 2e-6);
  CHECK(fit.softmax_score_s == Approx(9.5e-9).epsilon(0.02));
  CHECK(fit.group_s == Approx(2e-6).epsilon(0.02));
  // One head dim: FLOPs and scores in a fixed ratio, so the terms cannot be separated.
  samples.resize(6);
  CHECK_THROWS_AS(fit_attention_core(samples, 2e-6), std::invalid_argument);
}

// Two devices on one switch, `bw` and `lat` apart (PCIe slower, so routes take the switch, as in
// the clusters `moesim calibrate` writes), with `extra` text (a rendezvous).
topo::Cluster link_cluster(double bw, double lat, const std::string& extra = "") {
  return topo::load_cluster_text(fmt::format(R"pb(name: "c" nodes: 1
      node {{ device {{ name: "r" peak_flops_per_s {{ fp32: 1e11 }} memory_bytes: 1e10 memory_bandwidth_Bps: 1e10 }}
              devices_per_node: 2 intra_fabric: NVSWITCH scaleup_bandwidth_Bps: {} scaleup_latency_s: {}
              pcie {{ device_bandwidth_Bps: 1e8 latency_s: 1e-5 }} }})pb",
                                             bw, lat) +
                                     extra,
                                 "c.textproto");
}

TEST_CASE("Link latency and bandwidth are recovered from the collective model's own times") {
  // 5 GB/s and 3 us: all-to-alls and all-reduces from 1 KB to 16 MB timed by the model, then
  // fitted back through a reference cluster of other parameters.
  auto cluster_with = [](double bw, double lat) { return link_cluster(bw, lat); };
  const topo::Cluster truth = cluster_with(5e9, 3e-6), ref = cluster_with(1e9, 1e-6);
  const CollectiveModel measured(truth), model(ref);
  std::vector<LinkSample> samples;
  for (double bytes = 1e3; bytes <= 16e6; bytes *= 4)
    for (CollectiveOp op : {CollectiveOp::kAllToAll, CollectiveOp::kAllReduce}) {
      const CollectiveCost m = model.cost(op, {0, 1}, bytes);
      samples.push_back({double(m.steps), m.transfer_s * 1e9, measured.cost(op, {0, 1}, bytes).time_s});
    }
  const LinkFit fit = fit_link(samples, kDefaultStepOverhead_s);
  CHECK(fit.bandwidth_Bps == Approx(5e9).epsilon(0.02));
  CHECK(fit.latency_s == Approx(3e-6).epsilon(0.02));
  CHECK(fit.max_abs_residual_pct < 0.1);
  // The bandwidth alone, latency given: recovered from two samples of one size each.
  const LinkFit bw = fit_link_bandwidth({samples[6], samples[7]}, kDefaultStepOverhead_s, 3e-6);
  CHECK(bw.bandwidth_Bps == Approx(5e9).epsilon(0.02));
  CHECK(bw.latency_s == Approx(3e-6));
  // One size only cannot tell latency from bandwidth.
  CHECK_THROWS_AS(fit_link({samples[0], samples[0]}, kDefaultStepOverhead_s), std::invalid_argument);
}

TEST_CASE("The bandwidth alone takes the pace most of the samples ran at") {
  // A training step's exchanges on a shared VM come at two paces 1.5x apart over a calibration
  // (docs/VALIDATION.md): the fit is the usual pace's, not a mean of the two.
  auto samples = [](int quick, int slow) {
    std::vector<LinkSample> out;
    for (int i = 0; i < quick + slow; ++i) {
      const double c = 150e3 * (1 + 0.01 * i);  // bytes at the reference cluster's 1 B/ns
      const double beta = (i < quick ? 1 : 1.5) / 10e9;
      out.push_back({1, c, kDefaultStepOverhead_s + c * beta});
    }
    return out;
  };
  auto median_Bps = [](const std::vector<LinkSample>& x) {
    return fit_link_bandwidth(x, kDefaultStepOverhead_s, 0, {}, Pooling::kMedian).bandwidth_Bps;
  };
  CHECK(median_Bps(samples(6, 4)) == Approx(10e9).epsilon(0.01));
  CHECK(median_Bps(samples(3, 6)) == Approx(10e9 / 1.5).epsilon(0.01));
  // Least squares lands between the two paces.
  const double mean_Bps = fit_link_bandwidth(samples(6, 4), kDefaultStepOverhead_s, 0).bandwidth_Bps;
  CHECK(mean_Bps < 0.95 * 10e9);
  CHECK(mean_Bps > 1.05 * 10e9 / 1.5);
  CHECK_THROWS_AS(fit_link_bandwidth({{1, 0, 1e-6}}, kDefaultStepOverhead_s, 0), std::invalid_argument);
}

TEST_CASE("Over microbenchmark sizes least squares stays near the large transfers' bandwidth, the median does not") {
  // 1 KB - 4 MB (most of them small), on a link of 5 GB/s whose per-step time is 1.2 us, under the
  // model's o of 2 us (the latency floored at 0, as on CPU ranks): the small samples' own
  // bandwidths come out negative or far too high. Least squares on relative errors gives them
  // little weight (a first version took the median for the microbenchmarks' all-reduce too: its
  // residuals went from 16-20% to 46-52%).
  std::vector<LinkSample> samples;
  for (double S = 1024; S <= 4.2e6; S *= S < 65536 ? std::pow(2.0, 0.25) : 4)
    samples.push_back({1, S / 2, 1.2e-6 + S / 2 / 5e9, S / 2});
  const double least_squares = fit_link_bandwidth(samples, kDefaultStepOverhead_s, 0).bandwidth_Bps;
  const double median = fit_link_bandwidth(samples, kDefaultStepOverhead_s, 0, {}, Pooling::kMedian).bandwidth_Bps;
  CHECK(least_squares == Approx(5e9).epsilon(0.6));
  CHECK(median > 3 * 5e9);
}

// All-to-alls on 2 ranks from 1 KB to 64 KB by 2^(1/4), then to 4 MB by 4x (as the executor's
// microbenchmarks), timed on `truth` with relative noise up to `noise` (seeded), in the linear
// form of a reference cluster.
std::vector<LinkSample> all_to_all_samples(const topo::Cluster& truth, double noise) {
  const topo::Cluster ref = link_cluster(1e9, 1e-6);
  const CollectiveModel measured(truth), model(ref);
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> jitter(-noise, noise);
  std::vector<LinkSample> samples;
  for (double S = 1024; S <= 4.2e6; S *= S < 65536 ? std::pow(2.0, 0.25) : 4) {
    const CollectiveCost m = model.cost(CollectiveOp::kAllToAll, {0, 1}, S);
    const double t = measured.cost(CollectiveOp::kAllToAll, {0, 1}, S).time_s * (1 + jitter(rng));
    samples.push_back({double(m.steps), m.transfer_s * 1e9, t, S / 2});
  }
  return samples;
}

TEST_CASE("A rendezvous step in latency is found between the two message sizes around it") {
  // Open MPI's shared memory on the development VM: eager up to 4 KB, then 1.8 us more a message.
  const topo::Cluster truth =
      link_cluster(5e9, 3e-6, "rendezvous { eager_limit_bytes: 4096 latency_s: 1.8e-6 }");
  for (double noise : {0.0, 0.03}) {
    INFO("noise " << noise);
    const std::vector<LinkSample> samples = all_to_all_samples(truth, noise);
    const LinkFit fit = fit_link(samples, kDefaultStepOverhead_s);
    const double eps = noise > 0 ? 0.1 : 0.02;
    CHECK(fit.bandwidth_Bps == Approx(5e9).epsilon(eps));
    CHECK(fit.latency_s == Approx(3e-6).epsilon(eps));
    CHECK(fit.rendezvous.latency_s == Approx(1.8e-6).epsilon(noise > 0 ? 0.25 : 0.02));
    // Between the largest message at most 4096 bytes and the next (4096 x 2^(1/4) = 4871).
    CHECK(fit.rendezvous.eager_limit_bytes > 4096 / std::pow(2.0, 0.25));
    CHECK(fit.rendezvous.eager_limit_bytes < 4096 * std::pow(2.0, 0.25));
    if (noise == 0) CHECK(fit.max_abs_residual_pct < 0.1);
    // The bandwidth alone, the rest given, from the samples over the limit.
    const std::vector<LinkSample> large(samples.end() - 3, samples.end());
    const LinkFit bw = fit_link_bandwidth(large, kDefaultStepOverhead_s, fit.latency_s, fit.rendezvous);
    CHECK(bw.bandwidth_Bps == Approx(fit.bandwidth_Bps).epsilon(0.1));
    CHECK(bw.rendezvous.eager_limit_bytes == fit.rendezvous.eager_limit_bytes);
  }
  // Without a step, none is found, noise or not.
  for (double noise : {0.0, 0.03}) {
    const LinkFit none = fit_link(all_to_all_samples(link_cluster(5e9, 3e-6), noise), kDefaultStepOverhead_s);
    CHECK(none.rendezvous.eager_limit_bytes == 0);
    CHECK(none.bandwidth_Bps == Approx(5e9).epsilon(0.1));
  }
}

}  // namespace
}  // namespace moesim::cost
