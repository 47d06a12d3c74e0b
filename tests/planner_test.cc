// The planner: the strategy space counted by hand on one 8-GPU node, pruning that keeps every plan
// that fits, the winner against brute-force simulation of every candidate, answers when nothing
// fits or reaches a target, and `moesim plan` / `simulate --plan` end to end.
#include "cli/cli.pb.h"
#include "cli_helpers.h"
#include "costmodel/memory.h"
#include "planner/estimate.h"
#include "planner/planner.h"
#include "planner/space.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <google/protobuf/text_format.h>

#include <filesystem>
#include <fstream>
#include <set>

using namespace moesim;
using namespace moesim::testing;

namespace {

std::string src(const std::string& rel) { return std::string(MOESIM_SOURCE_DIR) + "/" + rel; }

// moe-tiny with 8 experts: 2 blocks, 4 heads, 8 experts.
constexpr const char* kModel = R"(name: "moe-tiny8"
transformer { layers: 2 hidden: 64 heads: 4 ffn_hidden: 128 activation: GELU norm: LAYER_NORM bias: true vocab: 64
  max_sequence: 32 learned_positions: true moe { experts: 8 top_k: 2 } })";
constexpr const char* kWorkload = R"(name: "tiny-train"
training { global_batch: 16 micro_batch: 1 sequence: 32 precision: BF16 optimizer: ADAMW recompute: NONE }
routing { zipf { exponent: 1.0 } })";

cost::ConfigSource dgx() { return {src("configs/hardware/dgx-h100.textproto"), std::nullopt}; }
cost::ConfigSource tiny_model() { return {"moe-tiny8.textproto", kModel}; }
cost::ConfigSource tiny_work() { return {"tiny-train.textproto", kWorkload}; }

planner::SearchOptions pinned(const std::string& pins) {
  planner::SearchOptions o;
  REQUIRE(google::protobuf::TextFormat::ParseFromString(pins, &o.pinned));
  o.vary_recompute = false;
  return o;
}

}  // namespace

TEST_CASE("the strategy space on one 8-GPU node, counted by hand", "[planner]") {
  const cost::Setup base = [] {
    cost::Setup s = cost::load_setup_without_strategy(dgx(), tiny_model(), tiny_work());
    s.layout.global_batch = 16;
    return s;
  }();
  // Layouts (dp, tp, pp, ep) with tp | 8 (a node), pp | 8/tp and pp <= 2 blocks, ep | dp and ep | 8:
  //   tp1: pp1 dp8 ep{1,2,4,8} = 4, pp2 dp4 ep{1,2,4} = 3;   tp2: pp1 dp4 = 3, pp2 dp2 = 2;
  //   tp4: pp1 dp2 = 2, pp2 dp1 = 1;                         tp8: pp1 dp1 = 1.   Total 16.
  // With every other knob pinned, candidates = layouts x micro-batch sizes in {1, 2, 4, 8} with
  // 16 % (dp mb) == 0: dp8 {1,2}, dp4 {1,2,4}, dp2 and dp1 {1,2,4,8}:
  //   4 x 2 + (3 + 3) x 3 + (2 + 2) x 4 + (1 + 1) x 4 = 8 + 18 + 16 + 8 = 50.
  const planner::Space space = planner::enumerate(base, pinned("zero_stage: 0 schedule: ONE_F_ONE_B all_to_all: DIRECT overlap_chunks: 1"));
  CHECK(space.layouts == 16);
  CHECK(space.candidates.size() == 50);
  // Unpinned, 1-node EP never tries hierarchical all-to-all; ZeRO varies only with dp > 1, the
  // interleaved schedule only with pp > 1 and micro-batches divisible by pp.
  const planner::Space all = planner::enumerate(base, planner::SearchOptions{});
  for (const planner::Candidate& c : all.candidates) {
    CHECK(c.strategy.all_to_all() == strategy::DIRECT);
    if (c.strategy.dp() == 1) CHECK(c.strategy.zero_stage() == 0);
    if (c.strategy.schedule() == strategy::INTERLEAVED_1F1B) {
      CHECK(c.strategy.pp() > 1);
      CHECK(c.strategy.micro_batches() % c.strategy.pp() == 0);
    }
    CHECK(c.strategy.dp() * c.strategy.tp() * c.strategy.pp() == 8);
  }
  CHECK(all.candidates.size() > space.candidates.size());
  CHECK(planner::divisors(12) == std::vector<int>{1, 2, 3, 4, 6, 12});
}

TEST_CASE("pruning by memory drops exactly the candidates that do not fit", "[planner]") {
  // Devices of 0.3 GB: some layouts fit, others do not.
  std::ifstream in(src("configs/hardware/dgx-h100.textproto"));
  std::string text((std::istreambuf_iterator<char>(in)), {});
  text.replace(text.find("device { preset: \"h100-sxm5\" }"), std::string("device { preset: \"h100-sxm5\" }").size(),
               "device { preset: \"h100-sxm5\" memory_bytes: 3.1e8 }");
  const cost::ConfigSource small{"small-dgx.textproto", text};
  planner::SearchOptions o = pinned("schedule: ONE_F_ONE_B all_to_all: DIRECT overlap_chunks: 1");
  o.simulate_top = 3;
  const planner::SearchResult r = planner::search(small, tiny_model(), tiny_work(), o);
  // Recount independently: every candidate that divides, its memory estimated here.
  cost::Setup base = cost::load_setup_without_strategy(small, tiny_model(), tiny_work());
  base.layout.global_batch = 16;
  int64_t fit = 0, no_fit = 0, bad = 0;
  for (const planner::Candidate& c : planner::enumerate(base, o).candidates) {
    workload::Workload w = *base.workload;
    w.mutable_training()->set_micro_batch(c.micro_batch);
    std::string wt, st;
    google::protobuf::TextFormat::PrintToString(w, &wt);
    google::protobuf::TextFormat::PrintToString(c.strategy, &st);
    try {
      const cost::Setup s = cost::load_setup(small, tiny_model(), {"w", wt}, {"s", st});
      (cost::estimate_memory(s).fits ? fit : no_fit)++;
    } catch (const ConfigError&) {
      ++bad;
    }
  }
  REQUIRE(fit > 0);
  REQUIRE(no_fit > 0);
  CHECK(r.pruned_memory == no_fit);
  CHECK(r.candidates == fit + no_fit + bad);
  // Every plan returned fits, by the estimate and in the simulated timeline.
  REQUIRE_FALSE(r.plans.empty());
  for (const planner::RankedPlan& p : r.plans) CHECK(p.plan.predicted().peak_memory_bytes() <= 3.1e8);
}

TEST_CASE("the winner equals the best of simulating every candidate", "[planner]") {
  planner::SearchOptions o = pinned("zero_stage: 1 schedule: ONE_F_ONE_B all_to_all: DIRECT overlap_chunks: 1");
  o.simulate_top = 1000;  // brute force: every candidate simulated
  o.top = 1000;
  const planner::SearchResult all = planner::search(dgx(), tiny_model(), tiny_work(), o);
  REQUIRE(all.simulated == static_cast<int64_t>(all.plans.size()));
  o.simulate_top = 5;     // the planner: the analytic estimate picks which to simulate
  o.top = 3;
  const planner::SearchResult best = planner::search(dgx(), tiny_model(), tiny_work(), o);
  REQUIRE_FALSE(best.plans.empty());
  CHECK(best.plans[0].plan.strategy().name() == all.plans[0].plan.strategy().name());
  CHECK(best.plans[0].step_time_s == Approx(all.plans[0].step_time_s).epsilon(1e-12));
  for (size_t i = 1; i < all.plans.size(); ++i) CHECK(all.plans[i - 1].step_time_s <= all.plans[i].step_time_s);
}

TEST_CASE("no plan: nothing fits, or the target is out of reach, answered with the closest", "[planner]") {
  std::ifstream in(src("configs/hardware/dgx-h100.textproto"));
  std::string text((std::istreambuf_iterator<char>(in)), {});
  text.replace(text.find("device { preset: \"h100-sxm5\" }"), std::string("device { preset: \"h100-sxm5\" }").size(),
               "device { preset: \"h100-sxm5\" memory_bytes: 1e6 }");
  const planner::SearchResult none = planner::search({"tiny-dgx.textproto", text}, tiny_model(), tiny_work(), pinned("zero_stage: 3"));
  CHECK(none.plans.empty());
  CHECK(none.no_plan_reason.find("no strategy fits") != std::string::npos);
  CHECK(none.no_plan_reason.find("closest") != std::string::npos);

  planner::SearchOptions o = pinned("zero_stage: 1 schedule: ONE_F_ONE_B overlap_chunks: 1");
  o.target_tokens_per_s = 1e15;
  o.simulate_top = 2;
  const planner::SearchResult far = planner::search(dgx(), tiny_model(), tiny_work(), o);
  REQUIRE_FALSE(far.plans.empty());
  CHECK(far.no_plan_reason.find("no plan reaches") != std::string::npos);
  CHECK(far.no_plan_reason.find(far.plans[0].plan.strategy().name()) != std::string::npos);
}

TEST_CASE("moesim plan --json and --out, then simulate --plan replays the winner", "[planner][cli]") {
  const std::string dir = (std::filesystem::temp_directory_path() / fmt::format("planner_test_{}", ::getpid())).string();
  std::filesystem::create_directories(dir);
  const std::string model_path = dir + "/moe-tiny8.textproto", work_path = dir + "/tiny-train.textproto";
  std::ofstream(model_path) << kModel;
  std::ofstream(work_path) << kWorkload;
  const std::string args = fmt::format("plan --cluster configs/hardware/dgx-h100.textproto --model {} --workload {} --simulate-top 4 "
                                       "--top 3 --pin 'zero_stage: 1 overlap_chunks: 1' --out {}/best.plan.textproto --json",
                                       model_path, work_path, dir);
  const Run r = moesim_run(args);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const cli::PlanResult pr = parse_json<cli::PlanResult>(r.out);
  REQUIRE(pr.plans_size() == 3);
  CHECK(pr.layouts_considered() == 16);
  CHECK(pr.simulated() == 4);
  CHECK(pr.search_wall_s() > 0);
  CHECK(pr.plans(0).simulated());
  CHECK(pr.plans(0).dp() * pr.plans(0).tp() * pr.plans(0).pp() == 8);
  CHECK(pr.plans(0).zero_stage() == 1);
  CHECK(!pr.plans(0).bottleneck().empty());
  CHECK(pr.plans(0).step_time_s() <= pr.plans(1).step_time_s());
  CHECK(pr.out_file() == dir + "/best.plan.textproto");

  const Run replay = moesim_run(fmt::format("simulate --plan {}/best.plan.textproto --json", dir));
  INFO(replay.err);
  REQUIRE(replay.exit_code == 0);
  const cli::SimulateResult sr = parse_json<cli::SimulateResult>(replay.out);
  CHECK(sr.step_time_s() == Approx(pr.plans(0).step_time_s()).epsilon(1e-9));

  // Bad input: a pin that is not a strategy, a missing file, a plan naming a missing input.
  CHECK(moesim_run("plan --cluster configs/hardware/dgx-h100.textproto --model " + model_path + " --workload " + work_path +
                   " --pin 'nonsense: 1'")
            .exit_code == 2);
  const Run no_price = moesim_run("plan --cluster configs/hardware/dgx-h100.textproto --model " + model_path + " --workload " +
                                  work_path + " --objective cost");
  CHECK(no_price.exit_code == 2);
  CHECK(no_price.err.find("price_per_device_hour") != std::string::npos);
  CHECK(moesim_run("plan --cluster configs/hardware/dgx-h100.textproto --model " + model_path + " --workload " + work_path +
                   " --objective fastest")
            .exit_code == 2);
  const Run missing = moesim_run("plan --cluster configs/hardware/nope.textproto --model " + model_path + " --workload " + work_path);
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("nope.textproto") != std::string::npos);
  std::ofstream(dir + "/bad.plan.textproto") << "cluster: \"missing.textproto\"\nmodel: \"moe-tiny8.textproto\"\n";
  const Run bad = moesim_run(fmt::format("simulate --plan {}/bad.plan.textproto", dir));
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.find("bad.plan.textproto:1: cluster") != std::string::npos);
  CHECK(bad.err.find("workload") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("moesim plan prices with a calibration's profile, beside the cluster or given, and its plan replays with it",
          "[planner][cli]") {
  const TempFile dir_file("plan_profile");
  const std::string dir = dir_file.path;
  std::filesystem::create_directories(dir);
  const std::string model_path = dir + "/moe-tiny8.textproto", work_path = dir + "/tiny-train.textproto";
  std::ofstream(model_path) << kModel;
  std::ofstream(work_path) << kWorkload;
  // A calibration's cluster and profile side by side: the H100s with a kernel launch of 40 us (a
  // tiny model's step is its launches).
  std::filesystem::copy_file(src("configs/hardware/dgx-h100.textproto"), dir + "/local.textproto");
  std::ofstream(dir + "/local.profile.textproto") << "device { preset: \"h100-sxm5\" }\n"
                                                     "kernel_launch_overhead_s: 4e-5\n";
  auto plan = [&](const std::string& cluster, const std::string& extra) {
    const Run r = moesim_run(fmt::format("plan --cluster {} --model {} --workload {} --simulate-top 2 --top 2 "
                                         "--pin 'zero_stage: 1 overlap_chunks: 1 tp: 1 pp: 1' --json {}",
                                         cluster, model_path, work_path, extra));
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    return parse_json<cli::PlanResult>(r.out);
  };
  const cli::PlanResult priors = plan("configs/hardware/dgx-h100.textproto", "");
  CHECK(priors.device_profile().empty());
  const cli::PlanResult beside = plan(dir + "/local.textproto", fmt::format("--out {}/best.plan.textproto", dir));
  CHECK(beside.device_profile() == dir + "/local.profile.textproto");
  REQUIRE(beside.plans_size() > 0);
  CHECK(beside.plans(0).step_time_s() > 1.2 * priors.plans(0).step_time_s());
  // Given explicitly, on the bundled cluster: the same figures.
  const cli::PlanResult given =
      plan("configs/hardware/dgx-h100.textproto", fmt::format("--profile {}/local.profile.textproto", dir));
  CHECK(given.plans(0).step_time_s() == Approx(beside.plans(0).step_time_s()).epsilon(1e-9));
  // The plan file names the profile (relative to its folder), and a replay prices with it.
  CHECK(read_file(dir + "/best.plan.textproto").find("device_profile: \"local.profile.textproto\"") != std::string::npos);
  const Run replay = moesim_run(fmt::format("simulate --plan {}/best.plan.textproto --json", dir));
  INFO(replay.err);
  REQUIRE(replay.exit_code == 0);
  CHECK(parse_json<cli::SimulateResult>(replay.out).step_time_s() == Approx(beside.plans(0).step_time_s()).epsilon(1e-9));
  // Bad input: a missing profile, a bad one (file, line and field), a plan naming a missing one.
  const std::string args = fmt::format("plan --cluster configs/hardware/dgx-h100.textproto --model {} --workload {}",
                                       model_path, work_path);
  const Run missing = moesim_run(args + " --profile " + dir + "/nope.profile.textproto");
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("nope.profile.textproto") != std::string::npos);
  std::ofstream(dir + "/bad.profile.textproto") << "device { preset: \"h100-sxm5\" }\nop_overhead_s: -1\n";
  const Run bad = moesim_run(args + " --profile " + dir + "/bad.profile.textproto");
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.find("bad.profile.textproto:2: op_overhead_s") != std::string::npos);
  std::ofstream(dir + "/gone.plan.textproto")
      << read_file(dir + "/best.plan.textproto") << "device_profile: \"gone.profile.textproto\"\n";
  const Run gone = moesim_run(fmt::format("simulate --plan {}/gone.plan.textproto", dir));
  CHECK(gone.exit_code == 2);
  CHECK(gone.err.find("device_profile") != std::string::npos);
}

TEST_CASE("moesim plan --executable lists only plans the executor runs, and refuses what it cannot", "[planner][cli]") {
  const TempFile dir_file("plan_executable");
  const std::string dir = dir_file.path;
  std::filesystem::create_directories(dir);
  const std::string model_path = dir + "/moe-tiny8.textproto", bf16_path = dir + "/bf16.textproto",
                    fp32_path = dir + "/fp32.textproto";
  std::ofstream(model_path) << kModel;
  std::ofstream(bf16_path) << kWorkload;
  std::ofstream(fp32_path) << "name: \"fp32\" training { global_batch: 16 micro_batch: 1 sequence: 32 precision: FP32 "
                              "optimizer: ADAM recompute: FULL }";
  const std::string args = fmt::format("plan --cluster configs/hardware/dgx-h100.textproto --model {} --simulate-top 2 --top 50",
                                       model_path);
  const Run r = moesim_run(args + " --workload " + fp32_path + " --executable --json");
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const cli::PlanResult pr = parse_json<cli::PlanResult>(r.out);
  REQUIRE(pr.plans_size() > 1);
  for (const cli::PlanEntry& e : pr.plans()) {
    INFO(e.name());
    CHECK(e.tp() == 1);
    CHECK(e.pp() == 1);
    CHECK(e.zero_stage() == 0);
    CHECK(e.overlap_chunks() == 1);
    CHECK(e.recompute() == "NONE");  // the workload's FULL is not run by the executor
    CHECK(e.dp() == 8);
  }
  // Without the switch the space holds what the executor cannot run.
  const cli::PlanResult all = parse_json<cli::PlanResult>(moesim_run(args + " --workload " + fp32_path + " --json").out);
  CHECK(std::any_of(all.plans().begin(), all.plans().end(),
                    [](const cli::PlanEntry& e) { return e.tp() > 1 || e.pp() > 1 || e.zero_stage() > 0; }));
  // Bad input: a bf16 workload, a pin the executor cannot run.
  const Run bf16 = moesim_run(args + " --workload " + bf16_path + " --executable");
  CHECK(bf16.exit_code == 2);
  CHECK(bf16.err.find("fp32") != std::string::npos);
  const Run pinned = moesim_run(args + " --workload " + fp32_path + " --executable --pin 'zero_stage: 1'");
  CHECK(pinned.exit_code == 2);
  CHECK(pinned.err.find("--executable") != std::string::npos);
}

TEST_CASE("objectives over node counts: cheapest per token, fewest devices for a target", "[planner]") {
  std::ifstream in(src("configs/hardware/h100-64.textproto"));
  std::string text((std::istreambuf_iterator<char>(in)), {});
  const cost::ConfigSource plain{"h100-64.textproto", text};
  const cost::ConfigSource priced{"h100-64-priced.textproto", text + "\nprice_per_device_hour: 2.5\n"};
  planner::SearchOptions o = pinned("tp: 1 zero_stage: 1 schedule: ONE_F_ONE_B overlap_chunks: 1 all_to_all: DIRECT");
  o.simulate_top = 2;
  o.top = 50;

  // Cost per token needs a price; fewest devices needs a target.
  o.objective = planner::Objective::kCostPerToken;
  CHECK_THROWS_WITH(planner::search(plain, tiny_model(), tiny_work(), o), Catch::Contains("price_per_device_hour"));
  o.objective = planner::Objective::kFewestDevices;
  CHECK_THROWS_WITH(planner::search(plain, tiny_model(), tiny_work(), o), Catch::Contains("target"));

  o.objective = planner::Objective::kCostPerToken;
  const planner::SearchResult cheap = planner::search(priced, tiny_model(), tiny_work(), o);
  REQUIRE_FALSE(cheap.plans.empty());
  std::set<int> counts;
  for (size_t i = 0; i < cheap.plans.size(); ++i) {
    const planner::RankedPlan& p = cheap.plans[i];
    counts.insert(p.nodes);
    // cost = price x devices x step time / 3600 / tokens, per million tokens (16 x 32 tokens a step)
    const int devices = p.nodes * 8;
    CHECK(p.plan.predicted().cost_per_million_tokens() == Approx(2.5 * devices * p.step_time_s / 3600 / (16.0 * 32) * 1e6));
    CHECK(p.plan.strategy().dp() * p.plan.strategy().tp() * p.plan.strategy().pp() == devices);
    if (i > 0) CHECK(cheap.plans[i - 1].plan.predicted().cost_per_million_tokens() <= p.plan.predicted().cost_per_million_tokens());
  }
  CHECK(counts.size() > 1);  // several node counts compete

  // Fewest devices: a target half the best throughput any node count reached.
  double best = 0;
  int best_nodes = 0;
  for (const planner::RankedPlan& p : cheap.plans)
    if (p.plan.predicted().tokens_per_s() > best) best = p.plan.predicted().tokens_per_s(), best_nodes = p.nodes;
  o.objective = planner::Objective::kFewestDevices;
  o.target_tokens_per_s = best / 2;
  const planner::SearchResult few = planner::search(plain, tiny_model(), tiny_work(), o);
  REQUIRE_FALSE(few.plans.empty());
  CHECK(few.plans[0].plan.predicted().tokens_per_s() >= o.target_tokens_per_s);
  CHECK(few.plans[0].nodes <= best_nodes);
  CHECK(few.plans[0].plan.nodes() == few.plans[0].nodes);
  o.target_tokens_per_s = 1e15;
  const planner::SearchResult none = planner::search(plain, tiny_model(), tiny_work(), o);
  CHECK(none.plans.empty());
  CHECK(none.no_plan_reason.find("no node count reaches") != std::string::npos);
  CHECK(none.no_plan_reason.find("closest") != std::string::npos);
}

TEST_CASE("when nothing fits, expert offload is tried before giving up", "[planner]") {
  // One layout pinned; its memory with and without the experts' weights in host memory decides a
  // device size that only the offloaded candidates fit.
  const std::string pins = "dp: 8 tp: 1 pp: 1 ep: 8 zero_stage: 0 schedule: ONE_F_ONE_B all_to_all: DIRECT overlap_chunks: 1";
  // A global batch of 8 on dp 8 leaves one micro-batch size: one candidate (and its offloaded twins).
  std::string w = kWorkload;
  w.replace(w.find("global_batch: 16"), 16, "global_batch: 8");
  const cost::ConfigSource work8{"tiny-train8.textproto", w};
  auto peak = [&](const std::string& extra) {
    const cost::Setup s = cost::load_setup(dgx(), tiny_model(), work8, {"s", "name: \"s\" " + pins + " " + extra});
    const cost::MemoryReport m = cost::estimate_memory(s);
    return m.ranks[m.peak_rank].total_bytes;
  };
  const double plain = peak("");
  const double offloaded = peak("offload { expert_fraction: 1 prefetch_layers: 1 }");
  REQUIRE(offloaded < plain);
  std::ifstream in(src("configs/hardware/dgx-h100.textproto"));
  std::string text((std::istreambuf_iterator<char>(in)), {});
  text.replace(text.find("device { preset: \"h100-sxm5\" }"), std::string("device { preset: \"h100-sxm5\" }").size(),
               fmt::format("device {{ preset: \"h100-sxm5\" memory_bytes: {:.0f} }}", (plain + offloaded) / 2));
  planner::SearchOptions o = pinned(pins);
  o.simulate_top = 1;
  const planner::SearchResult r = planner::search({"offload-dgx.textproto", text}, tiny_model(), work8, o);
  REQUIRE_FALSE(r.plans.empty());
  CHECK(r.plans[0].plan.strategy().offload().expert_fraction() > 0);
  CHECK(r.plans[0].plan.strategy().name().find("offload") != std::string::npos);
  CHECK(r.pruned_memory >= 1);  // the candidate without offload
}

TEST_CASE("the estimate prices a dispatch's capacity decision over its EP group", "[planner]") {
  // Every rank of an EP group decides the group's routing: 8x the choices of a rank with EP = 1
  // (whose gate decides its own), so 8x the time the profile's dispatch_choice_s adds.
  const topo::Cluster cluster = topo::load_cluster(src("configs/hardware/dgx-h100.textproto"));
  const cost::DeviceProfile plain = cost::default_profile(cluster.device_type(0));
  profile::DeviceProfile spec = plain.spec();
  spec.set_dispatch_choice_s(1e-8);
  const cost::DeviceProfile priced = cost::DeviceProfile::from_spec(spec);
  auto added = [&](int ep) {
    const cost::Setup s = cost::load_setup(dgx(), tiny_model(), tiny_work(),
                                           {"s", fmt::format("name: \"s\" dp: 8 ep: {} drop_policy: NO_DROP", ep)});
    const planner::MemorySummary m = planner::summarize(cost::estimate_memory(s));
    planner::Estimator a(cluster, &plain), b(cluster, &priced);
    return b.estimate(s, m).compute_s - a.estimate(s, m).compute_s;
  };
  const double one = added(1);
  CHECK(one > 0);
  CHECK(added(8) == Approx(8 * one).epsilon(1e-6));
}

TEST_CASE("the estimate prices a batch-priority dispatch's sort, apart from a vanilla plan's", "[planner]") {
  const topo::Cluster cluster = topo::load_cluster(src("configs/hardware/dgx-h100.textproto"));
  profile::DeviceProfile spec = cost::default_profile(cluster.device_type(0)).spec();
  spec.set_priority_sort_s(1e-8);
  const cost::DeviceProfile priced = cost::DeviceProfile::from_spec(spec);
  planner::Estimator e(cluster, &priced);  // one estimator: its cached layer times must tell the policies apart
  auto compute_s = [&](const char* policy) {
    const cost::Setup s = cost::load_setup(
        dgx(), tiny_model(), tiny_work(),
        {"s", fmt::format("name: \"s\" dp: 8 ep: 8 drop_policy: {} capacity_factor: 1.25", policy)});
    return e.estimate(s, planner::summarize(cost::estimate_memory(s))).compute_s;
  };
  const double vanilla = compute_s("VANILLA");
  CHECK(compute_s("BATCH_PRIORITY") > vanilla);
  CHECK(compute_s("VANILLA") == vanilla);
}

TEST_CASE("the estimate slows collectives by the profile's footprint factor at the plan's working set", "[planner]") {
  const topo::Cluster cluster = topo::load_cluster(src("configs/hardware/dgx-h100.textproto"));
  const cost::Setup s = cost::load_setup(dgx(), tiny_model(), tiny_work(), {"s", "name: \"s\" dp: 8 ep: 8"});
  const planner::MemorySummary mem = planner::summarize(cost::estimate_memory(s));
  REQUIRE(mem.working_set_bytes > 0);
  auto estimate = [&](double below, double above) {  // factors just below and above the working set
    profile::DeviceProfile spec = cost::default_profile(cluster.device_type(0)).spec();
    for (auto [bytes, factor] : {std::pair{mem.working_set_bytes / 2, below}, std::pair{mem.working_set_bytes * 2, above}}) {
      profile::BytesFactor* f = spec.add_transfer_footprint();
      f->set_bytes(bytes);
      f->set_time_factor(factor);
    }
    const cost::DeviceProfile p = cost::DeviceProfile::from_spec(spec);
    return planner::Estimator(cluster, &p).estimate(s, mem);
  };
  const planner::Estimate one = estimate(1, 1), slow = estimate(1, 3), fast = estimate(0.5, 0.5);
  CHECK(slow.a2a_s > one.a2a_s);
  CHECK(slow.dp_s >= one.dp_s);
  CHECK(fast.a2a_s < one.a2a_s);
  CHECK(slow.compute_s == one.compute_s);  // kernels are not transfers
}

TEST_CASE("the estimate slows the routing's host work by the profile's host footprint", "[planner]") {
  const topo::Cluster cluster = topo::load_cluster(src("configs/hardware/dgx-h100.textproto"));
  const cost::Setup s = cost::load_setup(dgx(), tiny_model(), tiny_work(), {"s", "name: \"s\" dp: 8 ep: 8"});
  const planner::MemorySummary mem = planner::summarize(cost::estimate_memory(s));
  auto compute_s = [&](double rate, double factor) {
    profile::DeviceProfile spec = cost::default_profile(cluster.device_type(0)).spec();
    spec.set_dispatch_choice_s(rate);
    profile::BytesFactor* h = spec.add_host_footprint();
    h->set_bytes(mem.working_set_bytes);
    h->set_time_factor(factor);
    const cost::DeviceProfile p = cost::DeviceProfile::from_spec(spec);
    return planner::Estimator(cluster, &p).estimate(s, mem).compute_s;
  };
  const double kernels = compute_s(0, 1), host = compute_s(1e-8, 1) - kernels;
  CHECK(host > 0);
  CHECK(compute_s(1e-8, 3) - kernels == Approx(3 * host).epsilon(1e-6));
}

TEST_CASE("the estimate prices forward row gathers by the profile's gather footprint, as the lowering does",
          "[planner]") {
  const topo::Cluster cluster = topo::load_cluster(src("configs/hardware/dgx-h100.textproto"));
  const cost::Setup s = cost::load_setup(dgx(), tiny_model(), tiny_work(), {"s", "name: \"s\" dp: 8 ep: 8"});
  const planner::MemorySummary mem = planner::summarize(cost::estimate_memory(s));
  // One point at the plan's working set (footprint) or at any bytes (the curve by bytes): a flat
  // factor either way, which must price the plan alike; the footprint wins where both are given.
  auto compute_s = [&](double footprint, double by_bytes) {
    profile::DeviceProfile spec = cost::default_profile(cluster.device_type(0)).spec();
    auto add = [](google::protobuf::RepeatedPtrField<profile::BytesFactor>* curve, double bytes, double factor) {
      profile::BytesFactor* f = curve->Add();
      f->set_bytes(bytes);
      f->set_time_factor(factor);
    };
    if (footprint > 0) add(spec.mutable_gather_footprint(), mem.working_set_bytes, footprint);
    if (by_bytes > 0) add(spec.mutable_gather_in_situ(), 1e3, by_bytes);
    const cost::DeviceProfile p = cost::DeviceProfile::from_spec(spec);
    return planner::Estimator(cluster, &p).estimate(s, mem).compute_s;
  };
  CHECK(compute_s(3, 0) == Approx(compute_s(0, 3)).epsilon(1e-12));
  CHECK(compute_s(3, 0.5) == Approx(compute_s(0, 3)).epsilon(1e-12));
  CHECK(compute_s(3, 0) > compute_s(0, 0.5));
}
