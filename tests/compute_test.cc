// Compute cost: the roofline with profile efficiencies (costmodel/compute.h), the dtype fallbacks,
// backward ops, the bundled device profiles and the diagnostics of bad profiles.
#include "costmodel/compute.h"
#include "costmodel/model.h"

#include "common/error.h"
#include "topologies/registry.h"

#include "test_diagnostics.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

using namespace moesim;
using cost::DType;
using cost::Op;
using cost::OpKind;

namespace {

constexpr const char* kFile = "profile.textproto";

std::string devices_dir() { return std::string(MOESIM_SOURCE_DIR) + "/configs/devices/"; }

Op gemm(double m, double n, double k, DType dtype = DType::kBf16, int64_t groups = 1) {
  Op op;
  op.name = "gemm";
  op.kind = groups > 1 ? OpKind::kGroupedGemm : OpKind::kGemm;
  op.m = m;
  op.n = n;
  op.k = k;
  op.groups = groups;
  op.flops = 2 * m * n * k * groups;
  op.bytes = (m * k + k * n + m * n) * groups * cost::dtype_bytes(dtype);
  return op;
}

// A profile with known numbers: flat GEMM BF16 efficiency 0.7, memory 0.8, launch 5 us.
cost::DeviceProfile flat_h100() {
  return cost::load_device_profile_text(R"pb(
    device { preset: "h100-sxm5" }
    memory_bandwidth_efficiency: 0.8
    kernel_launch_overhead_s: 5e-6
    compute { op: GEMM dtype: BF16 point { flops: 1e9 efficiency: 0.7 } }
  )pb", kFile);
}

// Every diagnostic loading `text` gives; fails the test when it loads.
using moesim::test::describe;

std::vector<Diagnostic> diagnostics_of(const std::string& text) {
  return moesim::test::diagnostics_of([&] { (void)cost::load_device_profile_text(text, kFile); }, text);
}

// The one diagnostic of a profile with one problem: file, line and field path exact.
void check_only(const std::string& text, int line, const std::string& field_path, const std::string& gist) {
  std::vector<Diagnostic> d = diagnostics_of(text);
  INFO(text << "gave:\n" << describe(d));
  REQUIRE(d.size() == 1);
  CHECK(d[0].file == kFile);
  CHECK(d[0].line == line);
  CHECK(d[0].field_path == field_path);
  CHECK_THAT(d[0].message, Catch::Contains(gist));
}

}  // namespace

TEST_CASE("a huge GEMM is compute-bound: flops / (peak * eff) + launch") {
  const cost::DeviceProfile p = flat_h100();
  const Op op = gemm(16384, 16384, 16384);
  const cost::OpTime t = cost::op_time(p, op, DType::kBf16);
  // NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense BF16.
  const double expected = op.flops / (989.4e12 * 0.7) + 5e-6;
  CHECK_FALSE(t.memory_bound);
  CHECK(t.efficiency == 0.7);
  CHECK(t.launch_s == 5e-6);
  CHECK(std::fabs(t.time_s - expected) <= 1e-9 * expected);
  CHECK(t.time_s == Approx(t.launch_s + t.compute_s).epsilon(1e-12));
  CHECK(t.dtype == DType::kBf16);
}

TEST_CASE("a GEMV-like GEMM (m = 1) is memory-bound: bytes / (bandwidth * eff)") {
  const cost::DeviceProfile p = flat_h100();
  const Op op = gemm(1, 8192, 8192);
  const cost::OpTime t = cost::op_time(p, op, DType::kBf16);
  // H100 SXM5: 3.35 TB/s HBM3.
  const double expected = op.bytes / (3.35e12 * 0.8) + 5e-6;
  CHECK(t.memory_bound);
  CHECK(t.memory_s > 10 * t.compute_s);
  CHECK(std::fabs(t.time_s - expected) <= 1e-9 * expected);
}

TEST_CASE("efficiency is linear in log(flops) between points and clamped at the ends") {
  const cost::DeviceProfile p = cost::load_device_profile_text(R"pb(
    device { preset: "h100-sxm5" }
    compute {
      op: GEMM dtype: BF16
      point { flops: 1e9 efficiency: 0.2 }
      point { flops: 1e11 efficiency: 0.6 }
    }
  )pb", kFile);
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kBf16, std::sqrt(1e9 * 1e11)) == Approx(0.4).epsilon(1e-12));
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kBf16, 1e9) == Approx(0.2));
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kBf16, 1e3) == Approx(0.2));
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kBf16, 1e11) == Approx(0.6));
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kBf16, 1e18) == Approx(0.6));
  // A quarter of the way in log size is a quarter of the way in efficiency, not halfway.
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kBf16, 1e9 * std::pow(100.0, 0.25)) == Approx(0.3));
  // op_time reports the same efficiency and uses it.
  Op op = gemm(1, 1, 1);
  op.flops = 1e10;
  op.bytes = 0;
  const cost::OpTime t = cost::op_time(p, op, DType::kBf16);
  CHECK(t.efficiency == Approx(0.4));
  CHECK(t.compute_s == Approx(1e10 / (989.4e12 * 0.4)));
  // A pair without a curve in the profile keeps the built-in prior.
  const cost::DeviceProfile prior = cost::default_profile(*topo::device_presets().find("h100-sxm5"));
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kFp16, 1e13) ==
        prior.compute_efficiency(OpKind::kGemm, DType::kFp16, 1e13));
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kFp16, 1e13) != 0.6);
}

TEST_CASE("fp8 on an A100 (no fp8 peak) runs as bf16: bf16 peak and curve, twice the bytes") {
  const cost::DeviceProfile p = cost::load_device_profile(devices_dir() + "a100-sxm4-80gb.textproto");
  CHECK(p.effective_dtype(DType::kFp8) == DType::kBf16);
  CHECK(p.peak_flops_per_s(DType::kFp8) == 312e12);  // A100 datasheet: 312 TFLOP/s BF16 dense

  const Op big = gemm(8192, 8192, 8192, DType::kFp8);
  const cost::OpTime fp8 = cost::op_time(p, big, DType::kFp8);
  const cost::OpTime bf16 = cost::op_time(p, gemm(8192, 8192, 8192, DType::kBf16), DType::kBf16);
  CHECK(fp8.dtype == DType::kBf16);
  CHECK(fp8.compute_s == Approx(bf16.compute_s).epsilon(1e-12));
  CHECK(fp8.efficiency == bf16.efficiency);

  const Op gemv = gemm(1, 8192, 8192, DType::kFp8);
  const cost::OpTime t = cost::op_time(p, gemv, DType::kFp8);
  CHECK(t.memory_bound);
  CHECK(t.memory_s == Approx(2 * gemv.bytes / (2.039e12 * p.memory_bandwidth_efficiency())));

  // On an H100 fp8 is native: its own peak (1978.9 TFLOP/s) and the bytes as given.
  const cost::DeviceProfile h = cost::load_device_profile(devices_dir() + "h100-sxm5.textproto");
  CHECK(h.effective_dtype(DType::kFp8) == DType::kFp8);
  CHECK(h.peak_flops_per_s(DType::kFp8) == 1978.9e12);
  CHECK(cost::op_time(h, gemv, DType::kFp8).memory_s == Approx(gemv.bytes / (3.35e12 * h.memory_bandwidth_efficiency())));
}

TEST_CASE("tf32 without a tf32 peak falls back to fp32, and a device without fp32 uses its slowest peak") {
  const cost::DeviceProfile p = cost::load_device_profile_text(R"pb(
    device { name: "vec" peak_flops_per_s { fp32: 20e12 bf16: 200e12 } memory_bandwidth_Bps: 1e12 }
  )pb", kFile);
  CHECK(p.effective_dtype(DType::kTf32) == DType::kFp32);
  CHECK(p.peak_flops_per_s(DType::kTf32) == 20e12);
  CHECK(p.effective_dtype(DType::kFp16) == DType::kBf16);
  CHECK(p.peak_flops_per_s(DType::kFp16) == 200e12);
  CHECK(p.effective_dtype(DType::kFp8) == DType::kBf16);
  // Vector ops run at the fp32 peak whatever the dtype.
  CHECK(p.peak_flops_per_s(OpKind::kElementwise, DType::kBf16) == 20e12);
  CHECK(p.peak_flops_per_s(OpKind::kGemm, DType::kBf16) == 200e12);

  const cost::DeviceProfile q = cost::load_device_profile_text(R"pb(
    device { name: "no-fp32" peak_flops_per_s { bf16: 200e12 fp8: 400e12 } memory_bandwidth_Bps: 1e12 }
  )pb", kFile);
  CHECK(q.effective_dtype(DType::kFp32) == DType::kBf16);
  CHECK(q.peak_flops_per_s(DType::kTf32) == 200e12);
  CHECK(q.peak_flops_per_s(DType::kFp8) == 400e12);
}

TEST_CASE("launch overhead and memory efficiency: profile, else device, else defaults") {
  hw::DeviceType d = *topo::device_presets().find("a100-sxm4-80gb");
  d.set_kernel_launch_overhead_s(7e-6);
  const cost::DeviceProfile p = cost::default_profile(d);
  CHECK(p.kernel_launch_overhead_s() == 7e-6);
  CHECK(p.memory_bandwidth_efficiency() == cost::kDefaultMemoryBandwidthEfficiency);
  CHECK(p.source() == "prior (built-in)");
  CHECK(p.name() == "A100-SXM4-80GB");
  d.clear_kernel_launch_overhead_s();
  CHECK(cost::default_profile(d).kernel_launch_overhead_s() == cost::kDefaultKernelLaunchOverhead_s);
  CHECK(flat_h100().kernel_launch_overhead_s() == 5e-6);

  hw::DeviceType broken;
  broken.set_name("broken");
  CHECK_THROWS_AS(cost::default_profile(broken), ConfigError);
}

TEST_CASE("backward of a GEMM: dgrad (m,k,n) and wgrad (k,n,m), twice the forward FLOPs") {
  for (int64_t groups : {1, 8}) {
    const Op fwd = gemm(64, 128, 256, DType::kBf16, groups);
    const std::vector<Op> bwd = cost::backward_ops(fwd);
    REQUIRE(bwd.size() == 2);
    CHECK(bwd[0].name == "gemm.dgrad");
    CHECK((bwd[0].m == 64 && bwd[0].n == 256 && bwd[0].k == 128));
    CHECK(bwd[1].name == "gemm.wgrad");
    CHECK((bwd[1].m == 256 && bwd[1].n == 128 && bwd[1].k == 64));
    for (const Op& op : bwd) {
      CHECK(op.kind == fwd.kind);
      CHECK(op.groups == groups);
      CHECK(op.flops == 2 * op.m * op.n * op.k * groups);  // its own shape's FLOPs
    }
    CHECK(bwd[0].flops + bwd[1].flops == 2 * fwd.flops);
    CHECK(cost::ops_time(flat_h100(), bwd, DType::kBf16).flops == 2 * fwd.flops);
  }
}

TEST_CASE("backward of attention, norm, elementwise and embedding") {
  Op attn{"attn", OpKind::kAttention, 4096, 4096, 128, 32, 4 * 4096.0 * 4096 * 128 * 32, 1e9};
  std::vector<Op> b = cost::backward_ops(attn);
  REQUIRE(b.size() == 1);
  CHECK(b[0].flops == 2.5 * attn.flops);
  CHECK(b[0].bytes == 2 * attn.bytes);
  CHECK(b[0].kind == OpKind::kAttention);
  CHECK(b[0].name == "attn.bwd");

  for (OpKind kind : {OpKind::kNorm, OpKind::kElementwise, OpKind::kEmbedding}) {
    Op op{"v", kind, 0, 0, 0, 1, kind == OpKind::kEmbedding ? 0.0 : 1e6, 4e6, false, false};
    b = cost::backward_ops(op);
    REQUIRE(b.size() == 1);
    CHECK(b[0].kind == kind);
    // A gather (no distinct source rows given, a scatter-add backward) reads its written rows'
    // gradient and reads and writes a source row for each; the vector ops read their inputs and
    // the output's gradient and write the input's.
    CHECK(b[0].bytes == (kind == OpKind::kEmbedding ? 3 : 2) * op.bytes);
    CHECK(b[0].flops == (kind == OpKind::kEmbedding ? 0.0 : 2 * op.flops));
  }
}

TEST_CASE("an attention's softmax time per score adds to its FLOPs' time, and backward kernels scale both") {
  // 40 GFLOP/s at efficiency 0.5 = 20 GFLOP/s; 10 ns per score; launch 1 us; backward factor 2.
  const cost::DeviceProfile p = cost::load_device_profile_text(R"pb(
    device { name: "cpu-rank" peak_flops_per_s { fp32: 40e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9
             kernel_launch_overhead_s: 1e-6 }
    softmax_score_s: 1e-8
    compute { op: ATTENTION dtype: FP32 point { flops: 1 efficiency: 0.5 } }
    backward { op: ATTENTION time_factor: 2 })pb",
                                                   "scores.textproto");
  Op attn{"attn", OpKind::kAttention, 32, 32, 16, 8, 2e6, 0};
  attn.softmax_elements = 8 * 32 * 32;
  const cost::OpTime t = cost::op_time(p, attn, DType::kFp32);
  CHECK(t.compute_s == Approx(2e6 / 20e9 + 8192 * 1e-8));
  CHECK(t.time_s == Approx(1e-6 + 2e6 / 20e9 + 8192 * 1e-8));
  const std::vector<Op> b = cost::backward_ops(attn);
  REQUIRE(b.size() == 1);
  CHECK(b[0].softmax_elements == attn.softmax_elements);
  CHECK(cost::op_time(p, b[0], DType::kFp32).compute_s == Approx(2 * (2.5 * 2e6 / 20e9 + 8192 * 1e-8)));
  // Without the field (every GPU prior) the score elements cost nothing.
  const cost::DeviceProfile fused = cost::load_device_profile_text(R"pb(
    device { name: "cpu-rank" peak_flops_per_s { fp32: 40e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9 }
    compute { op: ATTENTION dtype: FP32 point { flops: 1 efficiency: 0.5 } })pb",
                                                       "fused.textproto");
  CHECK(cost::op_time(fused, attn, DType::kFp32).compute_s == Approx(2e6 / 20e9));
}

TEST_CASE("a gate's routing time per token-choice adds to its top-k, unscaled, its backward's at its own rate") {
  const cost::DeviceProfile p = cost::load_device_profile_text(R"pb(
    device { name: "cpu-rank" peak_flops_per_s { fp32: 40e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9
             kernel_launch_overhead_s: 1e-6 }
    routing_choice_s: 3e-8
    routing_backward_choice_s: 1e-8
    dispatch_choice_s: 5e-9
    in_situ { op: ELEMENTWISE time_factor: 2 })pb",
                                                   "routing.textproto");
  Op topk;
  topk.name = "L0.moe.topk";
  topk.kind = OpKind::kElementwise;
  topk.bytes = 2e5;
  topk.routing_choices = 1000;
  const cost::OpTime t = cost::op_time(p, topk, DType::kFp32);
  Op plain = topk;
  plain.routing_choices = 0;
  const cost::OpTime kernel = cost::op_time(p, plain, DType::kFp32);
  CHECK(t.memory_s == Approx(kernel.memory_s));  // the kernel as without routing (in-situ factor 2)
  CHECK(t.host_s == Approx(1000 * 3e-8));        // the routing unscaled: fitted in situ already
  // On the host after the kernel: added, not hidden under a memory-bound kernel's time.
  CHECK(t.time_s == Approx(1e-6 + kernel.memory_s + 1000 * 3e-8));
  CHECK(t.time_s == Approx(kernel.time_s + 1000 * 3e-8));
  const std::vector<Op> b = cost::backward_ops(topk);
  REQUIRE(b.size() == 1);
  CHECK(cost::op_time(p, b[0], DType::kFp32).host_s == Approx(1000 * 1e-8));
  // A dispatch's capacity decision is the forward's alone.
  Op dispatch = plain;
  dispatch.kind = OpKind::kEmbedding;
  dispatch.dispatch_choices = 2000;
  CHECK(cost::op_time(p, dispatch, DType::kFp32).host_s == Approx(2000 * 5e-9));
  CHECK(cost::op_time(p, cost::backward_ops(dispatch).at(0), DType::kFp32).host_s == 0);
  // Under batch priority it also sorts its tokens by priority: n log2 n x priority_sort_s more;
  // an EP rank sorts its group's tokens, other policies none.
  profile::DeviceProfile sorted_spec = p.spec();
  sorted_spec.set_priority_sort_s(4e-9);
  const cost::DeviceProfile sorted = cost::DeviceProfile::from_spec(sorted_spec);
  dispatch.dispatch_tokens = 1000;
  CHECK(cost::op_time(sorted, dispatch, DType::kFp32).host_s == Approx(2000 * 5e-9));  // no policy: no sort
  CHECK(cost::op_time(sorted, cost::on_ep_rank(dispatch, 2, false), DType::kFp32).host_s == Approx(4000 * 5e-9));
  const Op bpr = cost::on_ep_rank(dispatch, 2, true);
  CHECK(bpr.priority_sort_tokens == 2000);
  CHECK(cost::op_time(sorted, bpr, DType::kFp32).host_s == Approx(4000 * 5e-9 + 2000 * std::log2(2000.0) * 4e-9));
  CHECK(cost::op_time(sorted, cost::backward_ops(bpr).at(0), DType::kFp32).host_s == 0);
  // The model's MoE gates carry tokens x top_k choices.
  const cost::ModelCost m = cost::analyze(
      cost::load_model(std::string(MOESIM_SOURCE_DIR) + "/configs/models/moe-tiny.textproto"), {.sequence = 32, .tokens = 256});
  double choices = 0;
  for (const cost::Layer& l : m.layers)
    for (const Op& op : l.ops) choices += op.routing_choices;
  CHECK(choices == 2 * 256 * 2);  // two MoE layers, top-2
}

TEST_CASE("ops_time sums kernels and splits compute-bound from memory-bound time") {
  const cost::DeviceProfile p = flat_h100();
  const std::vector<Op> ops = {gemm(8192, 8192, 8192), gemm(1, 8192, 8192), gemm(4096, 4096, 4096)};
  const cost::OpsTime total = cost::ops_time(p, ops, DType::kBf16);
  double sum = 0, memory = 0;
  for (const Op& op : ops) {
    const cost::OpTime t = cost::op_time(p, op, DType::kBf16);
    sum += t.time_s;
    if (t.memory_bound) memory += t.time_s - t.launch_s;
  }
  CHECK(total.kernels == 3);
  CHECK(total.time_s == Approx(sum));
  CHECK(total.launch_s == Approx(3 * 5e-6));
  CHECK(total.memory_bound_s == Approx(memory));
  CHECK(total.time_s == Approx(total.compute_bound_s + total.memory_bound_s + total.launch_s));
}

TEST_CASE("every bundled device profile loads, is a prior and keeps time non-decreasing in size") {
  int seen = 0;
  for (const auto& entry : std::filesystem::directory_iterator(devices_dir())) {
    if (entry.path().extension() != ".textproto") continue;
    INFO(entry.path());
    const cost::DeviceProfile p = cost::load_device_profile(entry.path().string());
    CHECK_THAT(p.source(), Catch::StartsWith("prior"));
    // Named after its preset: h100-sxm5.textproto describes "H100-SXM5".
    const hw::DeviceType* preset = topo::device_presets().find(entry.path().stem().string());
    REQUIRE(preset != nullptr);
    CHECK(p.name() == preset->name());
    // Public GEMM benchmarks: large bf16 GEMMs reach roughly 0.5-0.8 of dense peak.
    const double large = p.compute_efficiency(OpKind::kGemm, DType::kBf16, 1e13);
    CHECK((large >= 0.5 && large <= 0.8));
    CHECK((p.memory_bandwidth_efficiency() >= 0.7 && p.memory_bandwidth_efficiency() <= 0.95));
    for (OpKind kind : {OpKind::kGemm, OpKind::kGroupedGemm, OpKind::kAttention}) {
      for (DType dtype : {DType::kFp32, DType::kTf32, DType::kBf16, DType::kFp16, DType::kFp8}) {
        double previous = 0, first_drop = 0;
        for (double f = 1e5; f <= 1e14 && first_drop == 0; f *= 1.1) {
          Op op{"op", kind, 0, 0, 0, 1, f, 0, false, false};
          const double t = cost::op_time(p, op, dtype).compute_s;
          if (t < previous * (1 - 1e-12)) first_drop = f;
          previous = t;
        }
        INFO("op kind " << static_cast<int>(kind) << ", dtype " << static_cast<int>(dtype));
        CHECK(first_drop == 0);
      }
    }
    ++seen;
  }
  CHECK(seen >= 3);
}

// ---------------------------------------------------------------------------------------------
// Bad profiles: each names the line and field path of its one problem.

TEST_CASE("bad profile: efficiency above 1") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "compute {\n"
             "  op: GEMM dtype: BF16\n"
             "  point { flops: 1e9 efficiency: 0.5 }\n"
             "  point { flops: 1e10 efficiency: 1.5 }\n"
             "}\n",
             5, "compute[0].point[1].efficiency", "at most 1");
}

TEST_CASE("bad profile: efficiency 0") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "compute {\n"
             "  op: GEMM dtype: BF16\n"
             "  point { flops: 1e9 efficiency: 0 }\n"
             "}\n",
             4, "compute[0].point[0].efficiency", "greater than zero");
}

TEST_CASE("bad profile: threads per rank 0") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "threads_per_rank: 0\n",
             2, "threads_per_rank", "greater than zero");
}

TEST_CASE("a GEMM pays one BLAS call, a grouped GEMM one per group, other kernels none") {
  // 40 GFLOP/s at efficiency 0.5; launch 1 us; 5 us per BLAS call.
  const cost::DeviceProfile p = cost::load_device_profile_text(R"pb(
    device { name: "gpu-rank" peak_flops_per_s { fp32: 40e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9
             kernel_launch_overhead_s: 1e-6 }
    blas_call_s: 5e-6
    compute { op: GEMM dtype: FP32 point { flops: 1 efficiency: 0.5 } }
    compute { op: GROUPED_GEMM dtype: FP32 point { flops: 1 efficiency: 0.5 } })pb",
                                                   "calls.textproto");
  const Op gemm{"g", OpKind::kGemm, 32, 32, 32, 1, 2e6, 0};
  CHECK(cost::op_time(p, gemm, DType::kFp32).time_s == Approx(1e-6 + 5e-6 + 2e6 / 20e9));
  const Op experts{"e", OpKind::kGroupedGemm, 32, 32, 32, 8, 2e6, 0};
  const cost::OpTime t = cost::op_time(p, experts, DType::kFp32);
  CHECK(t.launch_s == Approx(1e-6 + 8 * 5e-6));
  CHECK(t.time_s == Approx(1e-6 + 8 * 5e-6 + 2e6 / 20e9));
  // The backward's two GEMMs (dgrad, wgrad) each pay them.
  for (const Op& b : cost::backward_ops(experts)) CHECK(cost::op_time(p, b, DType::kFp32).launch_s == Approx(41e-6));
  Op act{"act", OpKind::kElementwise, 0, 0, 0, 1, 0, 4e6};
  CHECK(cost::op_time(p, act, DType::kFp32).launch_s == Approx(1e-6));
}

TEST_CASE("bad profile: a negative time per BLAS call") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "blas_call_s: -9e-6\n",
             2, "blas_call_s", "");
}

TEST_CASE("bad profile: a negative softmax time per score") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "softmax_score_s: -1e-9\n",
             2, "softmax_score_s", "");
}

TEST_CASE("bad profile: a negative routing time per token-choice") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "routing_choice_s: -3e-8\n",
             2, "routing_choice_s", "");
}

TEST_CASE("bad profile: a negative per-op overhead") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "op_overhead_s: -2e-6\n",
             2, "op_overhead_s", "");
}

TEST_CASE("a kind of op's factor by its name and direction, 1 for the others") {
  const cost::DeviceProfile p = cost::load_device_profile_text(
      "device { preset: \"h100-sxm5\" }\n"
      "op_kind { op: \"gate\" time_factor: 1.2 }\n"
      "op_kind { op: \"gate\" backward: true time_factor: 0.9 }\n",
      "kinds.textproto");
  CHECK(p.op_kind_factor("gate", false) == Approx(1.2));
  CHECK(p.op_kind_factor("gate", true) == Approx(0.9));
  CHECK(p.op_kind_factor("attention", false) == 1);
  CHECK(cost::is_op_kind("experts"));
  CHECK_FALSE(cost::is_op_kind("moe.gate"));  // validation's label, not the span's name
}

TEST_CASE("bad profile: a kind of op that is not one, twice, or without a positive factor") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "op_kind { op: \"moe.gate\" time_factor: 1.2 }\n",
             2, "op_kind[0].op", "not a kind of compute op");
  check_only("device { preset: \"h100-sxm5\" }\n"
             "op_kind { op: \"gate\" time_factor: 1.2 }\n"
             "op_kind { op: \"gate\" time_factor: 1.1 }\n",
             3, "op_kind[1].op", "has a factor already");
  check_only("device { preset: \"h100-sxm5\" }\n"
             "op_kind { op: \"head\" time_factor: 0 }\n",
             2, "op_kind[0].time_factor", "");
}

TEST_CASE("a rank alone on its host takes the alone step spread, linear up to the calibrated ranks") {
  const auto with = [](const std::string& extra) {
    return cost::load_device_profile_text("device { preset: \"h100-sxm5\" }\n" + extra, "spread.textproto");
  };
  const cost::DeviceProfile p = with("ranks_per_host: 3\nstep_spread_factor: 1.06\nalone_step_spread_factor: 1.04\n");
  CHECK(p.step_spread_factor(1) == Approx(1.04));
  CHECK(p.step_spread_factor(2) == Approx(1.05));
  CHECK(p.step_spread_factor(3) == Approx(1.06));
  CHECK(p.step_spread_factor(8) == Approx(1.06));
  // Without an alone figure, or calibrated with one rank a host: the step's, for any share.
  CHECK(with("ranks_per_host: 3\nstep_spread_factor: 1.06\n").step_spread_factor(1) == Approx(1.06));
  CHECK(with("step_spread_factor: 1.06\nalone_step_spread_factor: 1.04\n").step_spread_factor(1) == Approx(1.06));
}

TEST_CASE("bad profile: a step spread below 1 (a step shorter than its ops)") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "step_spread_factor: 0.9\n",
             2, "step_spread_factor", "");
  check_only("device { preset: \"h100-sxm5\" }\n"
             "alone_step_spread_factor: 0.5\n",
             2, "alone_step_spread_factor", "");
  CHECK(cost::load_device_profile_text("device { preset: \"h100-sxm5\" }\n", "p.textproto").step_spread_factor() == 1);
}

TEST_CASE("a rank sharing its host with fewer ranks than calibrated runs between alone and busy") {
  const auto with = [](const std::string& extra) {
    return cost::load_device_profile_text("device { preset: \"h100-sxm5\" }\n" + extra, "share.textproto");
  };
  const cost::DeviceProfile two = with("ranks_per_host: 2\nalone_time_factor: 0.8\n");
  CHECK(two.host_share_factor(1) == Approx(0.8));
  CHECK(two.host_share_factor(2) == 1);
  CHECK(two.host_share_factor(5) == 1);
  const cost::DeviceProfile four = with("ranks_per_host: 4\nalone_time_factor: 0.7\n");
  CHECK(four.host_share_factor(2) == Approx(0.7 + 0.3 / 3));
  CHECK(with("").host_share_factor(1) == 1);  // not calibrated with several ranks: no adjustment
  // Row gathers by their own alone factor where the profile gives one, else the same.
  CHECK(two.host_share_factor(1, true) == Approx(0.8));
  const cost::DeviceProfile gathers = with("ranks_per_host: 4\nalone_time_factor: 0.9\nalone_gather_time_factor: 0.6\n");
  CHECK(gathers.host_share_factor(1) == Approx(0.9));
  CHECK(gathers.host_share_factor(1, true) == Approx(0.6));
  CHECK(gathers.host_share_factor(3, true) == Approx(0.6 + 0.4 * 2 / 3));
  CHECK(gathers.host_share_factor(4, true) == 1);
  CHECK(with("alone_gather_time_factor: 0.6\n").host_share_factor(1, true) == 1);  // no ranks_per_host
}

TEST_CASE("a transfer's footprint factor: linear in log bytes between points, flat beyond them") {
  const cost::DeviceProfile p = cost::load_device_profile_text(
      "device { preset: \"h100-sxm5\" }\n"
      "transfer_footprint { bytes: 1e6 time_factor: 1 }\n"
      "transfer_footprint { bytes: 4e6 time_factor: 1.5 }\n"
      "transfer_footprint { bytes: 16e6 time_factor: 3 }\n",
      "footprint.textproto");
  CHECK(p.transfer_time_factor(0) == 1);
  CHECK(p.transfer_time_factor(0.5e6) == 1);
  CHECK(p.transfer_time_factor(1e6) == 1);
  CHECK(p.transfer_time_factor(2e6) == Approx(1.25));  // half way in log bytes
  CHECK(p.transfer_time_factor(4e6) == Approx(1.5));
  CHECK(p.transfer_time_factor(8e6) == Approx(2.25));
  CHECK(p.transfer_time_factor(64e6) == 3);
  // Without points (GPU priors) every working set gets 1.
  CHECK(cost::load_device_profile_text("device { preset: \"h100-sxm5\" }\n", "none.textproto").transfer_time_factor(1e9) == 1);
}

TEST_CASE("row gathers take their in-situ factor by their bytes where the profile gives points") {
  const std::string base = "device { preset: \"h100-sxm5\" }\n"
                           "in_situ { op: EMBEDDING time_factor: 0.8 }\n"
                           "in_situ { op: NORM time_factor: 1.5 }\n";
  const cost::DeviceProfile flat = cost::load_device_profile_text(base, "flat.textproto");
  const cost::DeviceProfile sized = cost::load_device_profile_text(
      base + "gather_in_situ { bytes: 1e5 time_factor: 0.3 }\ngather_in_situ { bytes: 4e5 time_factor: 0.6 }\n",
      "sized.textproto");
  CHECK(flat.gather_time_factor(2e5) == Approx(0.8));  // no points: in_situ's EMBEDDING entry
  CHECK(sized.gather_time_factor(5e4) == Approx(0.3));
  CHECK(sized.gather_time_factor(2e5) == Approx(0.45));  // half way in log bytes
  CHECK(sized.gather_time_factor(1e7) == Approx(0.6));
  auto memory_s = [](const cost::DeviceProfile& p, OpKind kind) {
    Op op;
    op.name = "g";
    op.kind = kind;
    op.bytes = 2e5;
    return cost::op_time(p, op, DType::kFp32).memory_s;
  };
  CHECK(memory_s(sized, OpKind::kEmbedding) == Approx(memory_s(flat, OpKind::kEmbedding) * 0.45 / 0.8));
  CHECK(memory_s(sized, OpKind::kNorm) == Approx(memory_s(flat, OpKind::kNorm)));  // other kinds keep in_situ
  // By the rank's working set (gather_footprint), which the lowering reads into the op: it takes
  // the place of the factor by bytes, forward only.
  const cost::DeviceProfile footprint = cost::load_device_profile_text(
      base + "gather_in_situ { bytes: 1e5 time_factor: 0.3 }\n"
             "gather_footprint { bytes: 4e6 time_factor: 0.2 }\ngather_footprint { bytes: 16e6 time_factor: 0.6 }\n",
      "footprint.textproto");
  CHECK(sized.gather_footprint_factor(8e6) == 0);  // no points
  CHECK(footprint.gather_footprint_factor(1e6) == Approx(0.2));
  CHECK(footprint.gather_footprint_factor(8e6) == Approx(0.4));  // half way in log bytes
  CHECK(footprint.gather_footprint_factor(1e9) == Approx(0.6));
  Op gather;
  gather.name = "g";
  gather.kind = OpKind::kEmbedding;
  gather.bytes = 2e5;
  const double by_bytes = cost::op_time(footprint, gather, DType::kFp32).memory_s;
  gather.gather_footprint_factor = footprint.gather_footprint_factor(8e6);
  CHECK(cost::op_time(footprint, gather, DType::kFp32).memory_s == Approx(by_bytes * 0.4 / 0.3));
  const Op gather_bwd = cost::backward_ops(gather).at(0);
  Op plain_bwd = gather_bwd;
  plain_bwd.gather_footprint_factor = 0;
  CHECK(cost::op_time(footprint, gather_bwd, DType::kFp32).memory_s ==
        Approx(cost::op_time(footprint, plain_bwd, DType::kFp32).memory_s));
  // A lookup's backward (scatter-add) by the working set too (scatter_add_footprint, read into the
  // op by the lowering): in place of in_situ x backward for EMBEDDING; other backward gathers and
  // the forward keep theirs.
  const cost::DeviceProfile scatter = cost::load_device_profile_text(
      base + "backward { op: EMBEDDING time_factor: 2 }\n"
             "scatter_add_footprint { bytes: 4e6 time_factor: 0.5 }\n"
             "scatter_add_footprint { bytes: 16e6 time_factor: 1.5 }\n",
      "scatter.textproto");
  CHECK(footprint.scatter_add_factor(8e6) == 0);  // no points
  CHECK(scatter.scatter_add_factor(8e6) == Approx(1.0));  // half way in log bytes
  for (cost::GatherKernel k : {cost::GatherKernel::kScatterAdd, cost::GatherKernel::kCombineBackward}) {
    Op lookup;
    lookup.name = "lookup";
    lookup.kind = OpKind::kEmbedding;
    lookup.bytes = 2e5;
    lookup.gather_source_bytes = 2e4;
    lookup.gather_backward_kernel = k;
    const Op plain = cost::backward_ops(lookup).at(0);
    const double fwd = cost::op_time(scatter, lookup, DType::kFp32).memory_s;
    lookup.scatter_add_factor = scatter.scatter_add_factor(8e6);
    const Op bwd = cost::backward_ops(lookup).at(0);
    CHECK(cost::op_time(scatter, lookup, DType::kFp32).memory_s == Approx(fwd));
    const double ratio =
        cost::op_time(scatter, bwd, DType::kFp32).memory_s / cost::op_time(scatter, plain, DType::kFp32).memory_s;
    // The plain backward's factor: in_situ 0.8 x backward 2.
    CHECK(ratio == Approx(k == cost::GatherKernel::kScatterAdd ? 1.0 / 1.6 : 1.0));
  }
  // A gather's share of its host (set by the lowering) scales its kernels, forward and backward,
  // and no other kind's.
  for (OpKind kind : {OpKind::kEmbedding, OpKind::kNorm}) {
    Op op;
    op.name = "g";
    op.kind = kind;
    op.bytes = 2e5;
    const cost::OpTime plain = cost::op_time(flat, op, DType::kFp32);
    const Op bwd = cost::backward_ops(op).at(0);
    const double plain_bwd = cost::op_time(flat, bwd, DType::kFp32).memory_s;
    op.gather_share_factor = 0.5;
    const double f = kind == OpKind::kEmbedding ? 0.5 : 1.0;
    CHECK(cost::op_time(flat, op, DType::kFp32).memory_s == Approx(plain.memory_s * f));
    CHECK(cost::op_time(flat, op, DType::kFp32).launch_s == plain.launch_s);
    CHECK(cost::op_time(flat, cost::backward_ops(op).at(0), DType::kFp32).memory_s == Approx(plain_bwd * f));
  }
}

// A row gather's time per byte goes by its kernel (the profile's gather_kernel factors against a
// copy, 1 where not given), forward and backward: the MoE combine sums k rows into each token's,
// its backward scales and dots them; a lookup's backward adds into its table.
TEST_CASE("a row gather takes its kernel's factor forward and backward") {
  const std::string base = "device { preset: \"h100-sxm5\" }\n";
  const cost::DeviceProfile plain = cost::load_device_profile_text(base, "plain.textproto");
  const cost::DeviceProfile by_kernel = cost::load_device_profile_text(
      base + "gather_kernel { kernel: GATHER_SUM time_factor: 2.5 }\n"
             "gather_kernel { kernel: GATHER_COMBINE_BACKWARD time_factor: 4 }\n"
             "gather_kernel { kernel: GATHER_SCATTER_ADD time_factor: 0.5 }\n",
      "kernels.textproto");
  CHECK(plain.gather_kernel_factor(cost::GatherKernel::kSum) == 1);
  CHECK(by_kernel.gather_kernel_factor(cost::GatherKernel::kSum) == 2.5);
  CHECK(by_kernel.gather_kernel_factor(cost::GatherKernel::kLookup) == 1);  // not given
  const Op copy = cost::gather_op("dispatch", 1e5, 2e5, cost::GatherKernel::kCopy, cost::GatherKernel::kSumBackward);
  const Op sum = cost::gather_op("combine", 1e5, 2e5, cost::GatherKernel::kSum, cost::GatherKernel::kCombineBackward);
  CHECK(copy.bytes == 3e5);
  CHECK(copy.gather_source_bytes == 1e5);
  auto memory_s = [](const cost::DeviceProfile& p, const Op& op) { return cost::op_time(p, op, DType::kFp32).memory_s; };
  CHECK(memory_s(by_kernel, sum) == Approx(2.5 * memory_s(by_kernel, copy)));
  CHECK(memory_s(plain, sum) == Approx(memory_s(plain, copy)));
  // The backward ops carry the backward kernel: the same bytes, 4x against 0.5x.
  const std::vector<Op> sum_bwd = cost::backward_ops(sum), copy_bwd = cost::backward_ops(copy);
  REQUIRE(sum_bwd.size() == 1);
  REQUIRE(copy_bwd.size() == 1);
  CHECK(sum_bwd[0].gather_kernel == cost::GatherKernel::kCombineBackward);
  CHECK(copy_bwd[0].gather_kernel == cost::GatherKernel::kSumBackward);
  CHECK(memory_s(by_kernel, sum_bwd[0]) == Approx(4 * memory_s(by_kernel, copy_bwd[0])));
  CHECK(memory_s(plain, sum_bwd[0]) == Approx(memory_s(plain, copy_bwd[0])));
}

TEST_CASE("a lookup's scatter-add backward touches a table row per token, other gathers' backwards the distinct rows") {
  // A 64-row table of 256-byte rows looked up by 128 and by 512 tokens: the forward reads the
  // distinct rows once (64 x 256 bytes) and writes a row per token; the scatter-add reads each
  // token's gradient row and reads and writes its table row, so 4x the tokens is 4x its bytes.
  constexpr double row = 256, rows = 64;
  auto lookup = [&](double tokens) {
    return cost::gather_op("embed.lookup", std::min(tokens, rows) * row, tokens * row, cost::GatherKernel::kLookup,
                           cost::GatherKernel::kScatterAdd);
  };
  const Op small = lookup(128), large = lookup(512);
  CHECK(small.bytes == (64 + 128) * row);
  CHECK(large.bytes == (64 + 512) * row);
  const Op small_bwd = cost::backward_ops(small).at(0), large_bwd = cost::backward_ops(large).at(0);
  CHECK(small_bwd.bytes == 3 * 128 * row);
  CHECK(large_bwd.bytes == 4 * small_bwd.bytes);
  // A dispatch's backward sums each token's k = 2 slot rows: its 2 x 128 written rows read, its 128
  // distinct source rows read and written.
  const Op dispatch =
      cost::gather_op("dispatch", 128 * row, 256 * row, cost::GatherKernel::kCopy, cost::GatherKernel::kSumBackward);
  CHECK(cost::backward_ops(dispatch).at(0).bytes == (256 + 2 * 128) * row);
}

TEST_CASE("bad profile: a gather kernel twice, without a kernel, or with a factor of 0") {
  std::vector<Diagnostic> d = diagnostics_of("device { preset: \"h100-sxm5\" }\n"
                                             "gather_kernel { kernel: GATHER_SUM time_factor: 2 }\n"
                                             "gather_kernel { kernel: GATHER_SUM time_factor: 2.2 }\n"
                                             "gather_kernel { time_factor: 1.5 }\n"
                                             "gather_kernel { kernel: GATHER_LOOKUP time_factor: 0 }\n");
  INFO(describe(d));
  REQUIRE(d.size() == 3);
  CHECK((d[0].line == 3 && d[0].field_path == "gather_kernel[1].kernel"));
  CHECK((d[1].line == 4 && d[1].field_path == "gather_kernel[2].kernel"));
  CHECK((d[2].line == 5 && d[2].field_path == "gather_kernel[3].time_factor"));
}

TEST_CASE("bad profile: footprint points out of order, without bytes, or with a factor out of range") {
  std::vector<Diagnostic> d = diagnostics_of("device { preset: \"h100-sxm5\" }\n"
                                             "transfer_footprint { bytes: 4e6 time_factor: 1 }\n"
                                             "transfer_footprint { bytes: 2e6 time_factor: 1.2 }\n"
                                             "transfer_footprint { time_factor: 0 }\n"
                                             "transfer_footprint { bytes: 8e6 time_factor: 101 }\n");
  INFO(describe(d));
  REQUIRE(d.size() == 4);
  CHECK((d[0].line == 3 && d[0].field_path == "transfer_footprint[1].bytes"));
  CHECK_THAT(d[0].message, Catch::Contains("must increase"));
  CHECK((d[1].line == 4 && d[1].field_path == "transfer_footprint[2].bytes"));
  CHECK((d[2].line == 4 && d[2].field_path == "transfer_footprint[2].time_factor"));
  CHECK((d[3].line == 5 && d[3].field_path == "transfer_footprint[3].time_factor"));
}

TEST_CASE("the routing's host terms fitted in a step take the op's host time factor, the sort and kernels not") {
  const cost::DeviceProfile p = cost::load_device_profile_text(
      "device { preset: \"h100-sxm5\" }\nrouting_choice_s: 2e-8\ndispatch_choice_s: 1e-8\npriority_sort_s: 4e-9\n"
      "host_footprint { bytes: 1e6 time_factor: 0.5 }\nhost_footprint { bytes: 4e6 time_factor: 1 }\n",
      "host.textproto");
  CHECK(p.host_time_factor(2e6) == Approx(0.75));
  CHECK(p.host_time_factor(1e3) == Approx(0.5));
  Op gate;
  gate.name = "gate.topk";
  gate.kind = OpKind::kElementwise;
  gate.bytes = 1e5;
  gate.routing_choices = 1000;
  gate.dispatch_choices = 2000;
  const cost::OpTime one = cost::op_time(p, gate, DType::kFp32);
  CHECK(one.host_s == Approx(1000 * 2e-8 + 2000 * 1e-8));
  gate.host_time_factor = p.host_time_factor(2e6);
  const cost::OpTime scaled = cost::op_time(p, gate, DType::kFp32);
  CHECK(scaled.host_s == Approx(0.75 * one.host_s));
  CHECK(scaled.time_s - scaled.host_s == Approx(one.time_s - one.host_s));
  // A batch-priority sort's time (a microbenchmark's rate, not the step's) stays as it is.
  gate.priority_sort_tokens = 512;  // 512 log2 512 = 4608
  CHECK(cost::op_time(p, gate, DType::kFp32).host_s == Approx(scaled.host_s + 4608 * 4e-9));
}

TEST_CASE("a memory-bound kind's kernels take its time factor by their bytes where the profile gives points") {
  const std::string base = "device { preset: \"h100-sxm5\" }\n";
  const cost::DeviceProfile flat =
      cost::load_device_profile_text(base + "memory { op: ELEMENTWISE efficiency: 0.5 }\n", "flat.textproto");
  const cost::DeviceProfile sized = cost::load_device_profile_text(
      base + "memory { op: ELEMENTWISE efficiency: 0.5 by_bytes { bytes: 1e5 time_factor: 0.25 } "
             "by_bytes { bytes: 1e7 time_factor: 1.25 } }\n",
      "sized.textproto");
  CHECK(flat.memory_time_factor(OpKind::kElementwise, 1e6) == 1);  // no points
  CHECK(sized.memory_time_factor(OpKind::kElementwise, 1e4) == Approx(0.25));  // flat beyond the ends
  CHECK(sized.memory_time_factor(OpKind::kElementwise, 1e6) == Approx(0.75));  // half way in log bytes
  CHECK(sized.memory_time_factor(OpKind::kElementwise, 1e9) == Approx(1.25));
  CHECK(sized.memory_time_factor(OpKind::kNorm, 1e4) == 1);  // another kind, without an entry
  auto memory_s = [](const cost::DeviceProfile& p, OpKind kind, double bytes) {
    Op op;
    op.name = "e";
    op.kind = kind;
    op.bytes = bytes;
    return cost::op_time(p, op, DType::kFp32).memory_s;
  };
  for (double bytes : {1e4, 1e6, 1e9})
    CHECK(memory_s(sized, OpKind::kElementwise, bytes) ==
          Approx(memory_s(flat, OpKind::kElementwise, bytes) * sized.memory_time_factor(OpKind::kElementwise, bytes)));
  CHECK(memory_s(sized, OpKind::kNorm, 1e4) == Approx(memory_s(flat, OpKind::kNorm, 1e4)));
}

TEST_CASE("bad profile: a memory efficiency's points by bytes out of order or not positive") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "memory { op: ELEMENTWISE efficiency: 0.5\n"
             "  by_bytes { bytes: 4e5 time_factor: 0.6 }\n"
             "  by_bytes { bytes: 1e5 time_factor: 0.3 } }\n",
             4, "memory[0].by_bytes[1].bytes", "must increase");
  check_only("device { preset: \"h100-sxm5\" }\n"
             "memory { op: NORM efficiency: 0.5\n"
             "  by_bytes { bytes: 1e5 time_factor: 0 } }\n",
             3, "memory[0].by_bytes[0].time_factor", "");
}

TEST_CASE("bad profile: host footprint points out of order") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "host_footprint { bytes: 4e6 time_factor: 1 }\n"
             "host_footprint { bytes: 4e6 time_factor: 0.8 }\n",
             3, "host_footprint[1].bytes", "must increase");
}

TEST_CASE("bad profile: gather points out of order") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "gather_in_situ { bytes: 4e5 time_factor: 0.6 }\n"
             "gather_in_situ { bytes: 1e5 time_factor: 0.3 }\n",
             3, "gather_in_situ[1].bytes", "must increase");
  check_only("device { preset: \"h100-sxm5\" }\n"
             "gather_footprint { bytes: 8e6 time_factor: 0.6 }\n"
             "gather_footprint { bytes: 4e6 time_factor: 0.3 }\n",
             3, "gather_footprint[1].bytes", "must increase");
  check_only("device { preset: \"h100-sxm5\" }\n"
             "scatter_add_footprint { bytes: 8e6 time_factor: 0.6 }\n"
             "scatter_add_footprint { bytes: 16e6 time_factor: 0 }\n",
             3, "scatter_add_footprint[1].time_factor", "greater than zero");
}

TEST_CASE("bad profile: ranks per host 0 and a zero alone factor") {
  std::vector<Diagnostic> d = diagnostics_of(
      "device { preset: \"h100-sxm5\" }\nranks_per_host: 0\nalone_time_factor: 0\nalone_gather_time_factor: -1\n");
  REQUIRE(d.size() == 3);
  CHECK(d[0].field_path == "ranks_per_host");
  CHECK(d[1].field_path == "alone_time_factor");
  CHECK((d[2].line == 4 && d[2].field_path == "alone_gather_time_factor"));
}

TEST_CASE("bad profile: sizes decreasing") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "compute {\n"
             "  op: ATTENTION dtype: FP16\n"
             "  point { flops: 1e10 efficiency: 0.3 }\n"
             "  point { flops: 1e9 efficiency: 0.2 }\n"
             "}\n",
             5, "compute[0].point[1].flops", "must increase");
}

TEST_CASE("bad profile: efficiency rising so steeply that a bigger kernel runs faster") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "compute {\n"
             "  op: GEMM dtype: BF16\n"
             "  point { flops: 1e9 efficiency: 0.1 }\n"
             "  point { flops: 1e10 efficiency: 0.9 }\n"
             "}\n",
             5, "compute[0].point[1].efficiency", "too steeply");
}

TEST_CASE("bad profile: unknown preset lists the registered ones") {
  check_only("source: \"prior\"\n"
             "device { preset: \"h100-pcie\" }\n",
             2, "device.preset", "h100-sxm5, h800-sxm5, a100-sxm4-80gb");
}

TEST_CASE("bad profile: a point without efficiency") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "compute {\n"
             "  op: GEMM dtype: BF16\n"
             "  point { flops: 1e9 efficiency: 0.2 }\n"
             "  point { flops: 1e10 }\n"
             "}\n",
             5, "compute[0].point[1].efficiency", "missing required value");
}

TEST_CASE("bad profile: a curve without op, an unspecified dtype, no points") {
  const std::string text =
      "device { preset: \"h100-sxm5\" }\n"
      "compute {\n"
      "  dtype: DTYPE_UNSPECIFIED\n"
      "}\n";
  std::vector<Diagnostic> d = diagnostics_of(text);
  INFO(describe(d));
  REQUIRE(d.size() == 3);
  // A missing field points at the curve that should hold it (line 2).
  CHECK((d[0].line == 2 && d[0].field_path == "compute[0].op"));
  CHECK_THAT(d[0].message, Catch::Contains("GROUPED_GEMM"));
  CHECK((d[1].line == 2 && d[1].field_path == "compute[0].point"));
  CHECK((d[2].line == 3 && d[2].field_path == "compute[0].dtype"));
  CHECK_THAT(d[2].message, Catch::Contains("BF16"));
}

TEST_CASE("bad profile: two curves for one (op, dtype)") {
  check_only("device { preset: \"h100-sxm5\" }\n"
             "compute { op: GEMM dtype: BF16 point { flops: 1e9 efficiency: 0.2 } }\n"
             "compute { op: GEMM dtype: BF16 point { flops: 1e9 efficiency: 0.3 } }\n",
             3, "compute[1]", "first is on line 2");
}

TEST_CASE("bad profile: unknown op kind and dtype names are parse errors on their line") {
  // Text-format errors carry line and column, no field path; the message names the field.
  //                                                     123456789012345678901234567
  for (auto [line2, column, token, field] : {std::tuple{"compute { op: GEMMM dtype: BF16 }", 15, "GEMMM", "\"op\""},
                                             std::tuple{"compute { op: GEMM dtype: BF15 }", 27, "BF15", "\"dtype\""}}) {
    std::vector<Diagnostic> d = diagnostics_of(std::string("device { preset: \"h100-sxm5\" }\n") + line2 + "\n");
    INFO(describe(d));
    REQUIRE(d.size() == 1);
    CHECK(d[0].file == kFile);
    CHECK(d[0].line == 2);
    CHECK(d[0].column == column);
    CHECK(d[0].field_path.empty());
    CHECK_THAT(d[0].message,
               Catch::Contains(token) && Catch::Contains(field) && Catch::Contains("Unknown enumeration value"));
  }
}

TEST_CASE("bad profile: every problem is reported, in file order") {
  const std::string text =
      "device { name: \"x\" peak_flops_per_s { } }\n"
      "memory_bandwidth_efficiency: 1.2\n"
      "kernel_launch_overhead_s: -1\n"
      "compute { op: NORM dtype: FP32 point { flops: -5 efficiency: 0.5 } }\n";
  std::vector<Diagnostic> d = diagnostics_of(text);
  INFO(describe(d));
  REQUIRE(d.size() == 5);
  CHECK(d[0].field_path == "device.peak_flops_per_s");
  CHECK(d[1].field_path == "device.memory_bandwidth_Bps");
  CHECK((d[2].line == 2 && d[2].field_path == "memory_bandwidth_efficiency"));
  CHECK((d[3].line == 3 && d[3].field_path == "kernel_launch_overhead_s"));
  CHECK((d[4].line == 4 && d[4].field_path == "compute[0].point[0].flops"));
}

TEST_CASE("bad profile: the host terms per choice and per sort must be finite and >= 0") {
  for (const char* field : {"routing_choice_s", "dispatch_choice_s", "routing_backward_choice_s", "priority_sort_s"}) {
    std::vector<Diagnostic> d = diagnostics_of(fmt::format("device {{ preset: \"h100-sxm5\" }}\n{}: -1e-9\n", field));
    INFO(describe(d));
    REQUIRE(d.size() == 1);
    CHECK(d[0].line == 2);
    CHECK(d[0].field_path == field);
  }
  CHECK(cost::load_device_profile_text("device { preset: \"h100-sxm5\" }\npriority_sort_s: 0\n", "zero.textproto")
            .priority_sort_s() == 0);
}

TEST_CASE("from_spec validates a profile built in code") {
  profile::DeviceProfile spec;
  spec.mutable_device()->set_preset("h100-sxm5");
  profile::EfficiencyCurve* c = spec.add_compute();
  c->set_op(profile::GEMM);
  c->set_dtype(profile::BF16);
  profile::EfficiencyPoint* pt = c->add_point();
  pt->set_flops(1e9);
  pt->set_efficiency(0.6);
  const cost::DeviceProfile p = cost::DeviceProfile::from_spec(spec);
  CHECK(p.compute_efficiency(OpKind::kGemm, DType::kBf16, 1) == 0.6);
  CHECK(p.source() == "unspecified");
  CHECK(p.device().memory_bandwidth_bps() == 3.35e12);

  pt->set_efficiency(2);
  try {
    (void)cost::DeviceProfile::from_spec(spec, "code");
    FAIL("accepted an efficiency of 2");
  } catch (const ConfigError& e) {
    REQUIRE(e.diagnostics().size() == 1);
    CHECK(e.diagnostics()[0].file == "code");
    CHECK(e.diagnostics()[0].field_path == "compute[0].point[0].efficiency");
  }
}
