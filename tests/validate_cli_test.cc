// `moesim validate` and `moesim calibrate` end to end, as a user runs them: a tiny plan on 2 ranks
// validated op by op (every op matched), trace files of different plans refused with the first
// missing op, bad inputs refused before any rank starts (exit 2), and a calibration that writes a
// cluster and profile that load back, leaves the previous ones intact when killed, and stores a
// row. Accuracy figures belong to the benchmark (docs/VALIDATION.md), not to these tests.
#include "cli/calibration_step.h"
#include "cli/cli.pb.h"
#include "cli_helpers.h"
#include "costmodel/collectives.h"
#include "costmodel/compute.h"
#include "schedule/lowering.h"
#include "sim/scenario.h"
#include "topologies/cluster.h"
#include "traces/store.h"
#include "traces/validation.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <csignal>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <thread>

namespace moesim::testing {
namespace {

// Two CPU ranks on one switch: what `moesim calibrate --ranks 2` writes, with round numbers.
constexpr const char* kTwoRanks = R"pb(name: "two-ranks" nodes: 1
node {
  device { name: "cpu-rank" peak_flops_per_s { fp32: 50e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9 kernel_launch_overhead_s: 1e-7 }
  devices_per_node: 2
  intra_fabric: NVSWITCH
  scaleup_bandwidth_Bps: 5e9
  scaleup_latency_s: 2e-6
  pcie { device_bandwidth_Bps: 5e8 latency_s: 1e-4 }
})pb";

std::string scenario_text(const std::string& cluster, const std::string& precision = "FP32",
                          const std::string& strategy = "dp: 2 ep: 2") {
  return fmt::format(R"pb(name: "tiny-ep2"
cluster: "{}"
model: "{}/configs/models/moe-tiny.textproto"
workload_inline {{ name: "w" training {{ global_batch: 16 micro_batch: 8 sequence: 32 precision: {} optimizer: ADAM }} }}
strategy_inline {{ name: "s" {} }}
)pb",
                     cluster, MOESIM_SOURCE_DIR, precision, strategy);
}

TEST_CASE("validate leaves a fresh process's first steps out: a quarter, at least 10 of 20 or more") {
  TempFile cluster("validate_warmup_cluster.textproto", kTwoRanks);
  TempFile scenario("validate_warmup_scenario.textproto", scenario_text(cluster.path));
  for (auto [steps, compared] : {std::pair{8, 4}, std::pair{20, 10}, std::pair{48, 36}}) {
    const Run r = moesim_run(fmt::format("validate --scenario '{}' --steps {} --json", scenario.path, steps));
    INFO(steps << " steps: " << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(parse_json<cli::ValidateResult>(r.out).compared_steps() == compared);
  }
}

TEST_CASE("validate runs a tiny plan on 2 ranks and matches every op of both ranks") {
  TempFile cluster("validate_cluster.textproto", kTwoRanks);
  TempFile scenario("validate_scenario.textproto", scenario_text(cluster.path));
  TempFile db("validate.db");
  const Run r = moesim_run(fmt::format("validate --scenario '{}' --steps 3 --warmup 1 --json --db '{}'", scenario.path, db.path));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const cli::ValidateResult v = parse_json<cli::ValidateResult>(r.out);
  // Every op the lowering gives the two ranks was measured and joined.
  const sim::Scenario sc = sim::load_scenario(scenario.path);
  schedule::LoweringOptions lo;
  lo.fold = schedule::Fold::kNever;
  const schedule::Schedule s = schedule::lower(sc.setup, lo);
  int ops = 0;
  for (const schedule::RankSchedule& rs : s.ranks()) ops += rs.ops_size();
  CHECK(v.matched_ops() == ops);
  CHECK(v.unmatched_ops() == 0);
  CHECK(v.ops_size() == ops);
  CHECK(v.ranks() == 2);
  CHECK(v.compared_steps() == 2);
  CHECK(v.predicted_step_s() > 0);
  CHECK(v.measured_step_s() > 0);
  CHECK(v.p90_abs_pct_error() >= v.median_abs_pct_error());
  for (const char* kind : {"embed", "attention", "gate", "dispatch_a2a", "experts", "combine_a2a", "combine", "head",
                           "all_reduce", "optimizer"})
    CHECK(v.per_kind().count(kind) == 1);
  double shares = 0;
  for (const auto& [kind, k] : v.per_kind_detail()) {
    CHECK(k.share_pct() > 0);
    shares += k.share_pct();
  }
  CHECK(shares == Approx(100));
  std::set<int> ranks;
  for (const cli::OpErrorEntry& e : v.ops()) {
    ranks.insert(e.rank());
    INFO(e.op_id() << " on rank " << e.rank());
    CHECK(e.measured_s() > 0);
  }
  CHECK(ranks == std::set<int>{0, 1});
  CHECK(v.worst_ops_size() > 0);
  CHECK(v.measured_expert_load_size() == 4);  // moe-tiny's experts
  // The store row carries both traces.
  const Store store = Store::open(db.path);
  const std::vector<RunRecord> runs = store.list_runs(RunKind::kValidate);
  REQUIRE(runs.size() == 1);
  CHECK(runs[0].id == v.run_id());
  CHECK(store.trace_summaries(v.run_id()).size() == 2);  // predicted and measured
}

TEST_CASE("validate refuses traces of different plans, naming the first missing op") {
  auto trace = [](const std::string& second) {
    return fmt::format(R"pb(run {{ source: MEASURED }}
spans {{ op_id: "L0.attn mb0 fwd" name: "attn" kind: ATTENTION rank: 0 start_ns: 0 end_ns: 100 step: 1 }}
spans {{ op_id: "{}" name: "moe.experts" kind: GROUPED_GEMM rank: 0 start_ns: 100 end_ns: 300 step: 1 }}
)pb",
                       second);
  };
  TempFile predicted("validate_pred.textproto", trace("L0.moe.experts mb0 fwd"));
  TempFile same("validate_same.textproto", trace("L0.moe.experts mb0 fwd"));
  TempFile other("validate_other.textproto", trace("L0.mlp mb0 fwd"));
  const Run ok = moesim_run(fmt::format("validate --predicted '{}' --measured '{}' --warmup 0 --json", predicted.path, same.path));
  REQUIRE(ok.exit_code == 0);
  CHECK(parse_json<cli::ValidateResult>(ok.out).median_abs_pct_error() == 0);
  const Run bad = moesim_run(fmt::format("validate --predicted '{}' --measured '{}' --warmup 0", predicted.path, other.path));
  CHECK(bad.exit_code == 2);
  CHECK_THAT(bad.err, Catch::Contains("'L0.moe.experts mb0 fwd' on rank 0") && Catch::Contains("missing"));
}

TEST_CASE("validate refuses what the executor cannot run before any rank starts") {
  TempFile cluster("validate_bad_cluster.textproto", kTwoRanks);
  TempFile bf16("validate_bf16.textproto", scenario_text(cluster.path, "BF16"));
  const Run r1 = moesim_run(fmt::format("validate --scenario '{}'", bf16.path));
  CHECK(r1.exit_code == 2);
  CHECK_THAT(r1.err, Catch::Contains("fp32"));
  TempFile tp("validate_tp.textproto", scenario_text(cluster.path, "FP32", "dp: 1 tp: 2"));
  const Run r2 = moesim_run(fmt::format("validate --scenario '{}'", tp.path));
  CHECK(r2.exit_code == 2);
  CHECK_THAT(r2.err, Catch::Contains("tp 1, pp 1"));
  TempFile recompute("validate_recompute.textproto",
                     fmt::format(R"pb(name: "r" cluster: "{}" model: "{}/configs/models/moe-tiny.textproto"
workload_inline {{ name: "w" training {{ global_batch: 16 micro_batch: 8 precision: FP32 recompute: FULL }} }}
strategy_inline {{ name: "s" dp: 2 ep: 2 }})pb",
                                 cluster.path, MOESIM_SOURCE_DIR));
  const Run r3 = moesim_run(fmt::format("validate --scenario '{}'", recompute.path));
  CHECK(r3.exit_code == 2);
  CHECK_THAT(r3.err, Catch::Contains("recompute is not supported"));
  CHECK(moesim_run("validate --plan /nonexistent/plan.textproto").exit_code == 2);
  CHECK(moesim_run("validate").exit_code == 2);
  CHECK(moesim_run("validate --suite --cluster /nonexistent/local.textproto").exit_code == 2);
}

// The suite runs the calibration step once per pass and reports the machine's pace against the
// profile's calibration_step_s: a profile calibrated at 1000 s a step finds this machine ~100%
// faster; and its exchanges' against a link of 10 KB/s, ~100% faster too (seconds predicted for
// each: with 1 MB/s, an exchange that waited out a descheduled peer on a loaded machine, 10-30 ms,
// came out only 90% faster); and its gathers' against a memory of 1 MB/s, ~100% faster as well.
// The plans themselves run as the suite always runs them (one pass of 2 steps here).
TEST_CASE("validate --suite reports the machine's pace against its calibration") {
  TempFile dir("suite_dir");
  std::filesystem::create_directories(dir.path);
  const std::string cluster = dir.path + "/two.textproto";
  std::string slow_link = kTwoRanks;
  slow_link.replace(slow_link.find("5e9"), 3, "1e4");
  slow_link.replace(slow_link.find("5e8"), 3, "1e3");  // PCIe slower still: the ranks' route stays the link
  std::ofstream(cluster) << slow_link;
  std::ofstream(dir.path + "/two.profile.textproto")
      << "device { name: \"cpu-rank\" peak_flops_per_s { fp32: 50e9 } memory_bytes: 8e9 memory_bandwidth_Bps: 20e9 "
         "kernel_launch_overhead_s: 1e-7 }\nthreads_per_rank: 1\nranks_per_host: 2\ncalibration_step_s: 1000\n"
         "memory { op: EMBEDDING efficiency: 5e-5 }\n";
  // --out relative to the working folder (the scenarios written there must still find their cluster).
  const std::string out = std::filesystem::relative(dir.path + "/out", MOESIM_SOURCE_DIR).string();
  // A bad gap between passes is refused before anything runs or is written.
  const Run gap = moesim_run(fmt::format("validate --suite --cluster '{}' --pass-gap -1 --out '{}'", cluster, out));
  CHECK(gap.exit_code == 2);
  CHECK_THAT(gap.err, Catch::Contains("--pass-gap"));
  CHECK_FALSE(std::filesystem::exists(dir.path + "/out"));
  const Run r = moesim_run(fmt::format("validate --suite --cluster '{}' --passes 1 --steps 2 --json --out '{}'", cluster, out));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const cli::ValidateSuiteResult s = parse_json<cli::ValidateSuiteResult>(r.out);
  CHECK(s.plans_size() == 10);
  // Every kind's median share of a plan's op time beside its error; the MLP only in the dense
  // plans, the experts only in the MoE ones.
  CHECK(s.per_kind_share_pct().size() == s.per_kind().size());
  for (const auto& [kind, share] : s.per_kind_share_pct()) {
    INFO(kind);
    CHECK(share > 0);
    CHECK(share < 100);
  }
  // One pass: each op's median over the passes is that pass's error, so per kind the same figures
  // as the compared passes' own (each plan's median standing for its ops), and no spread.
  std::map<std::string, std::vector<double>> one_pass;
  for (const cli::ValidateResult& p : s.plans())
    for (const auto& [kind, k] : p.per_kind_detail())
      one_pass[kind].insert(one_pass[kind].end(), static_cast<size_t>(k.ops()), k.median_abs_pct());
  REQUIRE(one_pass.size() == s.per_kind().size());
  for (const auto& [kind, error] : s.per_kind()) {
    INFO(kind);
    CHECK(trace::quantile(one_pass.at(kind), 0.5) == Approx(error));
    CHECK(s.per_kind_spread_pct().at(kind) == 0);
  }
  REQUIRE(s.has_pace_vs_calibration_pct());
  CHECK(s.pace_vs_calibration_pct() < -99.9);
  CHECK(s.pace_vs_calibration_pct() > -100);
  REQUIRE(s.has_exchange_pace_vs_calibration_pct());
  CHECK(s.exchange_pace_vs_calibration_pct() < -99);
  CHECK(s.exchange_pace_vs_calibration_pct() > -100);
  REQUIRE(s.has_gather_pace_vs_calibration_pct());
  CHECK(s.gather_pace_vs_calibration_pct() < -90);
  CHECK(s.gather_pace_vs_calibration_pct() > -100);
  // The step it ran: the calibration's model on the calibrated ranks.
  const sim::Scenario step = sim::load_scenario(dir.path + "/out/calibration-step.scenario.textproto");
  CHECK(step.setup.model->name() == "moesim-calibration");
  CHECK(step.setup.cluster->device_count() == 2);
}

TEST_CASE("calibrate writes a cluster and profile that load back, and a store row") {
  TempFile dir("calibrate_dir");
  std::filesystem::create_directories(dir.path);
  const std::string out = dir.path + "/here.textproto";
  const std::string db = dir.path + "/results.db";
  const std::string samples = dir.path + "/samples.csv";
  const Run r = moesim_run(
      fmt::format("calibrate --out '{}' --ranks 1 --threads 1 --quick --json --db '{}' --samples '{}'", out, db, samples));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const cli::CalibrateResult c = parse_json<cli::CalibrateResult>(r.out);
  CHECK(c.peak_flops() > 0);
  CHECK(c.memory_bandwidth_bps() > 0);
  for (const char* family :
       {"gemm", "grouped_gemm", "attention", "norm", "activation", "elementwise", "gather", "gather_kernels", "in_situ_ops"})
    CHECK(c.residuals().count(family) == 1);
  const topo::Cluster cluster = topo::load_cluster(out);
  CHECK(cluster.device_count() == 1);
  const cost::DeviceProfile p = cost::load_device_profile(dir.path + "/here.profile.textproto");
  CHECK(p.peak_flops_per_s(cost::DType::kFp32) == Approx(c.peak_flops()).epsilon(1e-5));
  CHECK_THAT(p.source(), Catch::Contains("calibrated on"));
  // The threads each rank ran with, so that validate runs its ranks with as many.
  CHECK(p.spec().threads_per_rank() == 1);
  // The calibration step's fit: the per-op overhead and the gates' routing per token-choice.
  CHECK(p.spec().has_op_overhead_s());
  CHECK(p.spec().has_routing_choice_s());
  CHECK(p.routing_choice_s() == Approx(c.routing_choice_s()));
  // One rank: its gate holds the dispatch's decision, measured apart inside it.
  CHECK(p.routing_choice_s() > 0);
  CHECK(p.dispatch_choice_s() > 0);
  CHECK(p.spec().has_routing_backward_choice_s());
  // The batch-priority sort, timed against the vanilla decision (its sort of 256-2048 tokens takes
  // microseconds on any CPU).
  CHECK(p.priority_sort_s() > 0);
  CHECK(p.priority_sort_s() == Approx(c.priority_sort_s()));
  // Each row gather kernel against the dispatch's copy, measured and written (the copy is the 1).
  CHECK(c.gather_kernel_factors().size() == 5);
  CHECK(c.gather_kernel_factors().count("copy") == 0);
  for (const auto& [name, kernel] : {std::pair{"sum", cost::GatherKernel::kSum}, {"lookup", cost::GatherKernel::kLookup},
                                     {"sum_backward", cost::GatherKernel::kSumBackward},
                                     {"combine_backward", cost::GatherKernel::kCombineBackward},
                                     {"scatter_add", cost::GatherKernel::kScatterAdd}}) {
    INFO(name);
    REQUIRE(c.gather_kernel_factors().count(name) == 1);
    CHECK(p.gather_kernel_factor(kernel) == Approx(c.gather_kernel_factors().at(name)));
    CHECK(c.gather_kernel_factors().at(name) >= 0.1);
    CHECK(c.gather_kernel_factors().at(name) <= 10);
  }
  // The gathers' own in-situ factor, fitted on the calibration step's lookups, permutations and
  // combines.
  CHECK(c.in_situ_gather_factor() >= 0.1);
  CHECK(c.in_situ_gather_factor() <= 10);
  CHECK(c.in_situ_gather_backward_factor() >= 0.1);
  CHECK(c.in_situ_gather_backward_factor() <= 10);
  CHECK(p.in_situ_time_factor(cost::OpKind::kEmbedding) == Approx(c.in_situ_gather_backward_factor()));
  // And by size: the step's MoE layer at half the tokens gathers fewer bytes, at its own factor.
  CHECK(c.half_gather_bytes() > 0);
  CHECK(c.half_gather_bytes() < c.gather_bytes());
  REQUIRE(p.spec().gather_in_situ_size() == 2);
  CHECK(p.gather_time_factor(c.half_gather_bytes()) == Approx(c.half_gather_factor()));
  CHECK(p.gather_time_factor(c.gather_bytes()) == Approx(c.in_situ_gather_factor()));
  // And by the rank's working set, which the lowering reads: the half-token layer and the step
  // (with several ranks the layer alone between them), smallest first, at their fitted factors.
  REQUIRE(c.gather_footprint_bytes_size() == 2);
  REQUIRE(p.spec().gather_footprint_size() == 2);
  CHECK(c.gather_footprint_bytes(0) < c.gather_footprint_bytes(1));
  for (int i = 0; i < 2; ++i)
    CHECK(p.gather_footprint_factor(c.gather_footprint_bytes(i)) == Approx(c.gather_footprint_factors(i)));
  CHECK(c.gather_footprint_factors(0) == Approx(c.half_gather_factor()));
  CHECK(c.gather_footprint_factors(1) == Approx(c.in_situ_gather_factor()));
  // The lookups' backwards by working set, at the same points, each the factor its fit left them.
  REQUIRE(c.scatter_add_footprint_bytes_size() == 2);
  REQUIRE(c.scatter_add_footprint_factors_size() == 2);
  for (int i = 0; i < 2; ++i) {
    CHECK(c.scatter_add_footprint_bytes(i) == Approx(c.gather_footprint_bytes(i)));
    CHECK(p.scatter_add_factor(c.scatter_add_footprint_bytes(i)) == Approx(c.scatter_add_footprint_factors(i)));
    CHECK(c.scatter_add_footprint_factors(i) >= 0.1);
    CHECK(c.scatter_add_footprint_factors(i) <= 10);
  }
  CHECK(p.in_situ_time_factor(cost::OpKind::kGemm) == Approx(c.in_situ_factor()));
  // Each kind of op's factor as reported, none for a kind left at 1 as size-dependent; the step
  // against its ops, at least 1; a residual add's memory time by its bytes, a point per size.
  CHECK_FALSE(c.op_kind_factors().empty());
  for (const auto& [key, factor] : c.op_kind_factors()) {
    INFO(key);
    const size_t space = key.find(' ');
    REQUIRE(space != std::string::npos);
    CHECK(p.op_kind_factor(key.substr(0, space), key.substr(space + 1) == "bwd") == Approx(factor));
  }
  // A kind whose pace follows its size: its factor at the step and at half the tokens (the ratio
  // apart) on one side of 1, the one nearer 1 written; else none.
  for (const auto& [key, ratio] : c.op_kind_sized()) {
    INFO(key);
    CHECK(std::fabs(ratio - 1) > 0.1);
    auto written = c.op_kind_factors().find(key);
    if (written == c.op_kind_factors().end()) continue;
    // The other factor is f x ratio (f the step's) or f / ratio (f the half's).
    const double f = written->second;
    auto beyond = [&](double other) { return (other - 1) * (f - 1) > 0 && std::fabs(other - 1) >= std::fabs(f - 1); };
    CHECK((beyond(f * ratio) || beyond(f / ratio)));
  }
  CHECK(c.step_spread_factor() >= 1);
  CHECK(p.step_spread_factor() == Approx(c.step_spread_factor()));
  for (const profile::MemoryEfficiency& m : p.spec().memory())
    CHECK(m.by_bytes_size() == (m.op() == profile::ELEMENTWISE ? 2 : 0));  // --quick: two sizes
  // Gathers are measured out of cache, the streaming kernels on warm buffers: slower per byte.
  CHECK(p.memory_bandwidth_efficiency(cost::OpKind::kEmbedding) < p.memory_bandwidth_efficiency(cost::OpKind::kElementwise));
  // --samples: every measurement beside the profile's time for it, the gather kernels' among them.
  std::ifstream csv_file(samples);
  const std::string csv((std::istreambuf_iterator<char>(csv_file)), std::istreambuf_iterator<char>());
  CHECK(csv.rfind("family,flops,bytes,measured_s,model_s\n", 0) == 0);
  for (const char* family : {"\ngemm,", "\ngather,", "\ngather_kernel.sum,", "\ngather_kernel.scatter_add,", "\nin_situ."})
    CHECK_THAT(csv, Catch::Contains(family));
  // The written profile prices the calibration step as its fit did: each in_situ row's model time
  // is the op's duration in the step lowered with the profile (its gathers at the step's working
  // set; by their bytes, the embedding's lookups had taken the half-token layer's factor).
  const cost::Setup step = cost::load_setup(
      cost::ConfigSource{out, std::nullopt}, cost::ConfigSource{"model", cli::calibration_model_text(1)},
      cost::ConfigSource{"workload", cli::calibration_workload_text(1)},
      cost::ConfigSource{"strategy", cli::calibration_strategy_text(1)});
  const schedule::Schedule lowered = schedule::lower(step, {.fold = schedule::Fold::kNever, .profile = &p});
  std::map<std::string, double> duration;
  for (const schedule::Op& op : lowered.ranks(0).ops()) duration[op.id()] = op.duration_s();
  int in_situ_rows = 0;
  std::istringstream rows(csv);
  for (std::string line; std::getline(rows, line);) {
    if (line.rfind("in_situ.", 0) != 0) continue;
    const size_t id_end = line.find(','), model_at = line.rfind(',');
    const std::string id = line.substr(8, id_end - 8);
    INFO(line);
    REQUIRE(duration.count(id) == 1);
    CHECK(duration.at(id) == Approx(std::stod(line.substr(model_at + 1))).epsilon(1e-4));
    ++in_situ_rows;
  }
  CHECK(in_situ_rows > 10);
  CHECK(Store::open(db).list_runs(RunKind::kCalibrate).size() == 1);
  // No temporary files are left beside them.
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path)) files += e.path().string().find(".tmp") == std::string::npos;
  CHECK(files == std::distance(std::filesystem::directory_iterator(dir.path), std::filesystem::directory_iterator()));
}

TEST_CASE("calibrate on 2 ranks prices exchanges by the working set: the layer's link, the step's factor") {
  TempFile dir("calibrate2_dir");
  std::filesystem::create_directories(dir.path);
  const std::string out = dir.path + "/two.textproto", samples = dir.path + "/two.csv";
  const Run r =
      moesim_run(fmt::format("calibrate --out '{}' --ranks 2 --threads 1 --quick --json --samples '{}'", out, samples));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const cli::CalibrateResult c = parse_json<cli::CalibrateResult>(r.out);
  for (const char* family :
       {"collectives", "collectives_in_situ", "collectives_in_situ_layer", "collectives_in_situ_half"})
    CHECK(c.residuals().count(family) == 1);
  // The step's MoE layer alone holds less than the step (its two other layers' weights, states and
  // activations), and at half the tokens less again (half the activations); the profile's points
  // run through the three, the layer's at 1 (the link's).
  CHECK(c.transfer_half_bytes() > 0);
  CHECK(c.transfer_base_bytes() > c.transfer_half_bytes());
  CHECK(c.transfer_footprint_bytes() > c.transfer_base_bytes());
  for (double f : {c.transfer_half_factor(), c.transfer_footprint_factor()}) {
    CHECK(f >= 0.1);
    CHECK(f <= 10);
  }
  const cost::DeviceProfile p = cost::load_device_profile(dir.path + "/two.profile.textproto");
  // The routes' all-gathers: their fixed cost per call over the link's model, in the cluster.
  CHECK(c.residuals().count("routes_in_situ") == 1);
  CHECK(c.all_gather_latency_s() >= 0);
  CHECK(c.all_gather_latency_s() < 1e-3);
  CHECK(topo::load_cluster(out).collective_latency_s("all_gather") == Approx(c.all_gather_latency_s()));
  REQUIRE(p.spec().transfer_footprint_size() == 3);
  CHECK(p.transfer_time_factor(c.transfer_half_bytes()) == Approx(c.transfer_half_factor()));
  CHECK(p.transfer_time_factor(c.transfer_base_bytes()) == 1);
  CHECK(p.transfer_time_factor(c.transfer_footprint_bytes()) == Approx(c.transfer_footprint_factor()));
  // A rank alone on the host, for every op and for its row gathers apart, and for its step's
  // spread over its ops.
  CHECK(c.alone_step_spread_factor() >= 1);
  CHECK(p.step_spread_factor(1) == Approx(c.alone_step_spread_factor()));
  CHECK(p.step_spread_factor(2) == Approx(c.step_spread_factor()));
  CHECK(c.alone_time_factor() > 0);
  CHECK(c.alone_gather_time_factor() >= 0.1);
  CHECK(c.alone_gather_time_factor() <= 10);
  CHECK(p.host_share_factor(1) == Approx(c.alone_time_factor()));
  CHECK(p.host_share_factor(1, true) == Approx(c.alone_gather_time_factor()));
  CHECK(p.host_share_factor(2, true) == 1);
  // The routing's host work by the same working sets: the layer's factor, 1 at the step's.
  REQUIRE(p.spec().host_footprint_size() == 2);
  CHECK(c.host_footprint_factor() >= 0.1);
  CHECK(c.host_footprint_factor() <= 10);
  CHECK(p.host_time_factor(c.transfer_base_bytes()) == Approx(c.host_footprint_factor()));
  CHECK(p.host_time_factor(c.transfer_footprint_bytes()) == 1);
  // The forward gathers' factor at the same three working sets (the half-token layer, the layer,
  // the step), the step's its fitted one.
  REQUIRE(c.gather_footprint_bytes_size() == 3);
  CHECK(c.gather_footprint_bytes(0) == Approx(c.transfer_half_bytes()));
  CHECK(c.gather_footprint_bytes(1) == Approx(c.transfer_base_bytes()));
  CHECK(c.gather_footprint_bytes(2) == Approx(c.transfer_footprint_bytes()));
  CHECK(c.gather_footprint_factors(2) == Approx(c.in_situ_gather_factor()));
  for (int i = 0; i < 3; ++i)
    CHECK(p.gather_footprint_factor(c.gather_footprint_bytes(i)) == Approx(c.gather_footprint_factors(i)));
  // The cluster's link is the one the factors are relative to, and its all-reduce efficiency loads.
  const topo::Cluster cluster = topo::load_cluster(out);
  CHECK(cluster.device_count() == 2);
  CHECK(c.link_bandwidth_bps() > 0);
  CHECK(cluster.collective_efficiency("all_reduce") == Approx(c.all_reduce_efficiency()).epsilon(1e-5));
  // The rendezvous the link fit found (Open MPI's shared memory has one at 4 KB, which --quick's
  // five sizes may or may not make out) is the cluster's, within the node only.
  CHECK(cluster.spec().has_rendezvous() == (c.link_eager_limit_bytes() > 0));
  CHECK(cluster.spec().rendezvous().eager_limit_bytes() == Approx(c.link_eager_limit_bytes()).epsilon(1e-5));
  CHECK(cluster.spec().rendezvous().latency_s() == Approx(c.link_rendezvous_s()).epsilon(1e-5));
  CHECK_FALSE(cluster.spec().has_network_rendezvous());
  // The calibration step's routes (an all-gather a round in the step and in each MoE layer alone)
  // against the fitted link: five rounds of the three.
  REQUIRE(c.residuals().count("routes_in_situ") == 1);
  CHECK(c.residuals().at("routes_in_situ").samples() == 15);
  // Each in-situ exchange's --samples row is its time through what was written: the cluster's
  // collective (latency, rendezvous, the all-reduce's efficiency) with the transfer at the
  // profile's factor for its run's working set.
  const cost::CollectiveModel collectives(cluster);
  const std::map<std::string, double> working_set = {{"collectives_in_situ_layer", c.transfer_base_bytes()},
                                                     {"collectives_in_situ_half", c.transfer_half_bytes()},
                                                     {"collectives_in_situ", c.transfer_footprint_bytes()}};
  std::ifstream csv_file(samples);
  int exchange_rows = 0;
  for (std::string line; std::getline(csv_file, line);) {
    const std::string family = line.substr(0, line.find('.'));
    if (!working_set.count(family)) continue;
    INFO(line);
    std::vector<std::string> f;  // family, flops, bytes, measured_s, model_s
    std::istringstream fields(line);
    for (std::string field; std::getline(fields, field, ',');) f.push_back(field);
    REQUIRE(f.size() == 5);
    const bool a2a = line.find(".all_to_all,") != std::string::npos;
    const cost::CollectiveCost m =
        collectives.cost(a2a ? cost::CollectiveOp::kAllToAll : cost::CollectiveOp::kAllReduce, {0, 1}, std::stod(f[2]));
    CHECK(std::stod(f[4]) == Approx(m.latency_s + m.transfer_s * p.transfer_time_factor(working_set.at(family))).epsilon(1e-4));
    ++exchange_rows;
  }
  CHECK(exchange_rows > 20);
  // How far the rounds' exchanges moved: the quartiles of the rounds' median all-to-all in the
  // layer alone, each round's rows in --samples between its all-reduces.
  std::vector<double> round_medians, round;
  std::ifstream layer_rows(samples);
  for (std::string line; std::getline(layer_rows, line);) {
    if (line.rfind("collectives_in_situ_layer.", 0) != 0) continue;
    if (line.find(".all_reduce,") != std::string::npos) {
      if (!round.empty()) round_medians.push_back(trace::quantile(round, 0.5));
      round.clear();
      continue;
    }
    std::vector<std::string> f;
    std::istringstream fields(line);
    for (std::string field; std::getline(fields, field, ',');) f.push_back(field);
    round.push_back(std::stod(f.at(3)));
  }
  if (!round.empty()) round_medians.push_back(trace::quantile(round, 0.5));
  REQUIRE(round_medians.size() == 5);  // --quick's five rounds
  CHECK(c.exchange_round_low_s() == Approx(trace::quantile(round_medians, 0.25)).epsilon(1e-4));
  CHECK(c.exchange_round_high_s() == Approx(trace::quantile(round_medians, 0.75)).epsilon(1e-4));
  CHECK(c.exchange_round_low_s() <= c.exchange_round_high_s());
  // CPU ranks exchange through shared memory: both directions of a rank's link share it.
  int half_duplex = 0;
  for (topo::EdgeId e : boost::make_iterator_range(boost::edges(cluster.graph())))
    half_duplex += cluster.graph()[e].kind == hw::SCALEUP && cluster.graph()[e].half_duplex;
  CHECK(half_duplex == 4);  // two ranks' links to the switch, both directions
}

TEST_CASE("calibrate refuses bad options, and a killed calibration leaves the previous files intact") {
  CHECK(moesim_run("calibrate --ranks 1").exit_code == 2);
  CHECK(moesim_run("calibrate --out /nonexistent/dir/x.textproto --ranks 1").exit_code == 2);
  const Run threads = moesim_run("run --model " MOESIM_SOURCE_DIR "/configs/models/moe-tiny.textproto --threads 0");
  CHECK(threads.exit_code == 2);
  CHECK_THAT(threads.err, Catch::Contains("--threads"));
  TempFile dir("calibrate_kill");
  std::filesystem::create_directories(dir.path);
  const std::string out = dir.path + "/local.textproto", profile = dir.path + "/local.profile.textproto";
  const std::string previous_cluster = std::string("# previous\n") + kTwoRanks;
  const std::string previous_profile = "# previous\ndevice { preset: \"h100-sxm5\" }\n";
  std::ofstream(out) << previous_cluster;
  std::ofstream(profile) << previous_profile;
  // Killed half a second in (while measuring, or on a fast machine after finishing): either way
  // each file is whole, the previous one or a new one that loads.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::execl(MOESIM_BINARY, MOESIM_BINARY, "calibrate", "--out", out.c_str(), "--ranks", "1", "--quick", "--json",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  if (read_file(out) != previous_cluster) CHECK_NOTHROW(topo::load_cluster(out));
  if (read_file(profile) != previous_profile) CHECK_NOTHROW(cost::load_device_profile(profile));
}

// Ranks on two nodes (ranks naming different nodes, as on two hosts): the network between them is
// fitted to the collectives of one rank per node and written as a NIC per rank on one switch, so
// that routes between nodes take it; with one rank per node no link within a node is measured.
// Nodes with unequal ranks are refused before anything is measured, the previous files kept.
TEST_CASE("calibrate measures the network between nodes and refuses unequal nodes") {
  TempFile dir("calibrate_nodes");
  std::filesystem::create_directories(dir.path);
  const std::string out = dir.path + "/local.textproto";
  auto args = [&](int ranks) { return fmt::format("calibrate --ranks {} --quick --json --out '{}'", ranks, out); };
  // An MPMD launch: `first` ranks naming node-a, then `second` naming node-b.
  auto launch = [&](int first, int second) {
    return fmt::format("{} --allow-run-as-root --oversubscribe -np {} -x MOESIM_NODE_NAME=node-a '{}' {} : -np {} -x "
                       "MOESIM_NODE_NAME=node-b",
                       MOESIM_MPIEXEC, first, MOESIM_BINARY, args(first + second), second);
  };
  // Both nodes calibrated with the network between them.
  auto calibrated = [&](int per_node) {
    const Run run = moesim_run(args(2 * per_node), "", launch(per_node, per_node));
    INFO(run.err);
    REQUIRE(run.exit_code == 0);
    const cli::CalibrateResult r = parse_json<cli::CalibrateResult>(run.out);
    CHECK(r.nodes() == 2);
    CHECK(r.network_bandwidth_bps() > 0);
    CHECK(r.residuals().count("collectives_network") == 1);
    return r;
  };
  const cli::CalibrateResult r = calibrated(1);
  CHECK(r.link_bandwidth_bps() == 0);  // one rank per node: nothing within a node
  CHECK(r.residuals().count("collectives") == 0);
  const topo::Cluster c = topo::load_cluster(out);
  CHECK(c.node_count() == 2);
  CHECK(c.device_count() == 2);
  REQUIRE(c.spec().node().nic_size() == 1);
  CHECK(c.spec().node().nic(0).bandwidth_bps() == Approx(r.network_bandwidth_bps()).epsilon(1e-5));
  CHECK(c.spec().fabric().has_single_switch());
  CHECK(c.spec().has_network_rendezvous() == (r.network_eager_limit_bytes() > 0));
  CHECK(c.spec().network_rendezvous().latency_s() == Approx(r.network_rendezvous_s()).epsilon(1e-5));
  CHECK_FALSE(c.spec().has_rendezvous());
  // Two nodes of two: the link within a node and the network apart; a route within a node takes
  // the node's switch (two links), one between nodes the NICs.
  const cli::CalibrateResult r4 = calibrated(2);
  CHECK(r4.link_bandwidth_bps() > 0);
  CHECK(r4.residuals().count("collectives") == 1);
  const topo::Cluster c4 = topo::load_cluster(out);
  CHECK(c4.node_count() == 2);
  CHECK(c4.spec().node().devices_per_node() == 2);
  const Run within = moesim_run(fmt::format("topo route '{}' --from 0 --to 1 --json", out));
  const Run between = moesim_run(fmt::format("topo route '{}' --from 0 --to 2 --json", out));
  REQUIRE(within.exit_code == 0);
  REQUIRE(between.exit_code == 0);
  CHECK_THAT(within.out, Catch::Contains("\"hops\": 2"));
  CHECK_THAT(between.out, Catch::Contains("\"hops\": 6"));
  // The suite runs on one node of it, without the pace: the calibration step ran on both nodes.
  const Run suite = moesim_run(
      fmt::format("validate --suite --cluster '{}' --passes 1 --steps 2 --json --out '{}'", out, dir.path + "/suite"));
  INFO(suite.err);
  REQUIRE(suite.exit_code == 0);
  const cli::ValidateSuiteResult s = parse_json<cli::ValidateSuiteResult>(suite.out);
  CHECK(s.plans_size() == 10);
  CHECK_FALSE(s.has_pace_vs_calibration_pct());
  const std::string previous = read_file(out);
  const Run unequal = moesim_run(args(3), "", launch(2, 1));
  CHECK(unequal.exit_code == 2);
  CHECK_THAT(unequal.err, Catch::Contains("these 3 ranks run on 2 nodes with 2 + 1 ranks (rank 0 on node-a)"));
  CHECK(read_file(out) == previous);
}

}  // namespace
}  // namespace moesim::testing
