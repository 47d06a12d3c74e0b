// `moesim plan`: the best strategies for a cluster, model and workload (planner/planner.h).
#include "cli/cli.pb.h"
#include "cli/commands.h"
#include "common/files.h"
#include "common/json.h"
#include "common/progress.h"
#include "common/units.h"
#include "planner/planner.h"
#include "traces/store.h"

#include <fmt/format.h>
#include <google/protobuf/text_format.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>

namespace moesim::cli {
namespace {

namespace fs = std::filesystem;

PlanEntry entry(const planner::RankedPlan& rp) {
  const plan::Plan& p = rp.plan;
  const strategy::Strategy& s = p.strategy();
  const plan::Prediction& pr = p.predicted();
  PlanEntry e;
  e.set_rank(p.rank_in_search());
  e.set_name(s.name());
  e.set_step_time_s(rp.step_time_s);
  e.set_tokens_per_s(pr.tokens_per_s());
  e.set_samples_per_s(pr.samples_per_s());
  e.set_peak_memory_bytes(pr.peak_memory_bytes());
  e.set_peak_rank(pr.peak_rank());
  e.set_bottleneck(pr.bottleneck());
  e.set_simulated(rp.simulated);
  e.set_estimate_s(rp.estimate_s);
  e.set_dp(s.dp());
  e.set_tp(s.tp());
  e.set_pp(s.pp());
  e.set_ep(s.ep());
  e.set_zero_stage(s.zero_stage());
  e.set_micro_batch(p.micro_batch());
  e.set_micro_batches(s.micro_batches());
  e.set_schedule(strategy::PipelineSchedule_Name(s.schedule()));
  e.set_virtual_stages(s.virtual_stages());
  e.set_recompute(p.has_recompute() ? workload::Recompute_Name(p.recompute()) : "");
  e.set_all_to_all(strategy::AllToAllAlgorithm_Name(s.all_to_all()));
  e.set_overlap_chunks(s.overlap_chunks());
  e.set_capacity_factor(s.capacity_factor());
  for (const auto& [k, v] : pr.breakdown()) (*e.mutable_breakdown())[k] = v;
  e.set_nodes(rp.nodes);
  e.set_cost_per_million_tokens(pr.cost_per_million_tokens());
  return e;
}

// `path` as seen from the folder of `from_file` (absolute when that is not possible).
std::string relative_to(const std::string& path, const std::string& from_file) {
  const fs::path base = fs::absolute(fs::path(from_file)).parent_path();
  const fs::path rel = fs::absolute(path).lexically_relative(base);
  return rel.empty() ? fs::absolute(path).string() : rel.string();
}

void write_plan(const planner::RankedPlan& rp, const std::string& out, const std::string& cluster, const std::string& model,
                const std::string& workload, const std::string& profile) {
  plan::Plan p = rp.plan;
  p.set_name(p.strategy().name());
  p.set_cluster(relative_to(cluster, out));
  p.set_model(relative_to(model, out));
  p.set_workload(relative_to(workload, out));
  if (!profile.empty()) p.set_device_profile(relative_to(profile, out));
  std::string text;
  google::protobuf::TextFormat::PrintToString(p, &text);
  const std::string why = write_file_atomically(
      out, fmt::format("# Written by `moesim plan`: replay with `moesim simulate --plan {}`.\n{}",
                       fs::path(out).filename().string(), text));
  if (!why.empty()) throw UsageError(fmt::format("--out {}: cannot write: {}", out, why));
}

int plan_command(const Args& a) {
  if (!a.positional().empty()) throw UsageError("plan takes no positional arguments: use --cluster, --model, --workload");
  for (const char* o : {"--cluster", "--model", "--workload"})
    if (!a.has(o)) throw UsageError(fmt::format("missing {} FILE", o));
  const bool json = a.flag("--json");
  planner::SearchOptions o;
  o.top = a.get_int("--top", 10, 1, 1000);
  o.simulate_top = a.get_int("--simulate-top", 20, 0, 10000);
  o.max_tp = a.get_int("--max-tp", 0, 0, 1 << 20);
  o.max_pp = a.get_int("--max-pp", 0, 0, 1 << 20);
  o.seed = static_cast<uint64_t>(a.get_int("--seed", 1, 0, INT32_MAX));
  o.vary_capacity_factor = a.flag("--vary-capacity-factor");
  o.vary_recompute = !a.flag("--keep-recompute");
  o.target_tokens_per_s = a.get_double("--target-tokens-per-s", 0, 0, 1e18);
  const std::string objective = a.has("--objective") ? a.get("--objective") : "step-time";
  if (objective == "step-time") o.objective = planner::Objective::kStepTime;
  else if (objective == "cost") o.objective = planner::Objective::kCostPerToken;
  else if (objective == "fewest-devices") o.objective = planner::Objective::kFewestDevices;
  else throw UsageError(fmt::format("--objective: expected step-time, cost or fewest-devices, got '{}'", objective));
  if (a.has("--pin")) {
    const std::string pin = a.get("--pin");
    std::string text = pin;
    if (fs::is_regular_file(pin)) {
      std::ifstream in(pin);
      text.assign(std::istreambuf_iterator<char>(in), {});
    }
    if (!google::protobuf::TextFormat::ParseFromString(text, &o.pinned))
      throw UsageError(fmt::format("--pin: not a strategy (a file, or fields such as \"tp: 8 pp: 4\"): {}", pin));
  }
  if (a.flag("--executable")) {
    // What the executor runs (`moesim run`, `validate --plan`): DP x EP training in fp32, without
    // ZeRO, recompute, overlap chunks, offload, tensor or pipeline parallelism.
    const strategy::Strategy& pin = o.pinned;
    if ((pin.has_tp() && pin.tp() != 1) || (pin.has_pp() && pin.pp() != 1) || (pin.has_zero_stage() && pin.zero_stage() != 0) ||
        (pin.has_overlap_chunks() && pin.overlap_chunks() != 1) || (pin.has_offload() && pin.offload().expert_fraction() > 0))
      throw UsageError("--executable: the executor runs tp 1, pp 1, zero_stage 0, overlap_chunks 1 and no offload; "
                       "--pin asks for another");
    try {
      const cost::Loaded<workload::Workload> w = cost::load_workload(a.get("--workload"));
      if (!w->has_training() || w->training().precision() != workload::FP32)
        throw UsageError(fmt::format("--executable: the executor trains in fp32; {} is {}", a.get("--workload"),
                                     w->has_training() ? workload::Precision_Name(w->training().precision())
                                                       : std::string("an inference workload")));
    } catch (const ConfigError& e) {
      return report_config_error(e, a.get("--workload"), json);
    }
    o.pinned.set_tp(1);
    o.pinned.set_pp(1);
    o.pinned.set_zero_stage(0);
    o.pinned.set_overlap_chunks(1);
    o.pinned.mutable_offload()->set_expert_fraction(0);
    o.recompute = workload::NONE;
  }
  if (a.has("--out")) {
    const fs::path out(a.get("--out"));
    const fs::path dir = out.has_parent_path() ? out.parent_path() : fs::path(".");
    if (fs::is_directory(out) || !fs::is_directory(dir)) throw UsageError(fmt::format("--out {}: not a writable file path", out.string()));
  }
  // The devices' profile: --profile, else a calibration's beside the cluster (`moesim calibrate`
  // writes <cluster>.profile.textproto), else the device types' priors.
  const std::string profile_file = profile_for(a, a.get("--cluster"));
  std::optional<cost::DeviceProfile> profile;
  if (!profile_file.empty()) {
    try {
      profile.emplace(cost::load_device_profile(profile_file));
    } catch (const ConfigError& e) {
      return report_config_error(e, profile_file, json);
    }
    o.profile = &*profile;
  }
  std::optional<Store> store;
  if (a.has("--db")) store.emplace(Store::open(a.get("--db")));

  Progress progress("plan", 1);
  o.progress = [&](size_t done, size_t total) {
    static size_t shown = 0;
    progress.set_total(total);
    if (done > shown) progress.advance(done - shown), shown = done;
  };
  std::optional<planner::SearchResult> r;
  try {
    r.emplace(planner::search({a.get("--cluster"), std::nullopt}, {a.get("--model"), std::nullopt},
                              {a.get("--workload"), std::nullopt}, o));
  } catch (const ConfigError& e) {
    return report_config_error(e, a.get("--workload"), json);
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }

  PlanResult out;
  out.set_cluster(a.get("--cluster"));
  out.set_model(a.get("--model"));
  out.set_workload(a.get("--workload"));
  out.set_device_profile(profile_file);
  for (const planner::RankedPlan& rp : r->plans) *out.add_plans() = entry(rp);
  out.set_layouts_considered(r->layouts_considered);
  out.set_candidates(r->candidates);
  out.set_pruned_divisibility(r->pruned_divisibility);
  out.set_pruned_memory(r->pruned_memory);
  out.set_simulated(r->simulated);
  out.set_search_wall_s(r->search_wall_s);
  out.set_no_plan_reason(r->no_plan_reason);
  if (a.has("--out") && !r->plans.empty()) {
    write_plan(r->plans.front(), a.get("--out"), a.get("--cluster"), a.get("--model"), a.get("--workload"), profile_file);
    out.set_out_file(a.get("--out"));
  }
  if (store && !r->plans.empty()) {
    RunRecord rec;
    rec.kind = RunKind::kPlan;
    rec.cluster = a.get("--cluster");
    rec.model = a.get("--model");
    rec.workload = a.get("--workload");
    rec.strategy = r->plans.front().plan.strategy().name();
    rec.seed = o.seed;
    rec.step_time_s = out.plans(0).step_time_s();
    if (out.plans(0).tokens_per_s() > 0) rec.tokens_per_s = out.plans(0).tokens_per_s();
    rec.peak_memory_bytes = out.plans(0).peak_memory_bytes();
    rec.fits = true;
    rec.result_json = to_json(out);
    rec.version = MOESIM_VERSION;
    out.set_run_id(store->insert_run(rec, {{"layouts_considered", double(out.layouts_considered())},
                                           {"candidates", double(out.candidates())},
                                           {"simulated", double(out.simulated())},
                                           {"search_wall_s", out.search_wall_s()}}));
  }
  if (json) {
    std::cout << to_json(out);
    return kExitOk;
  }
  std::cout << fmt::format("{} layouts, {} candidates: {} do not divide, {} do not fit, {} simulated, in {}; priced with {}\n\n",
                           out.layouts_considered(), out.candidates(), out.pruned_divisibility(), out.pruned_memory(),
                           out.simulated(), format_seconds(out.search_wall_s()),
                           profile_file.empty() ? "the device types' priors" : "profile " + profile_file);
  if (out.plans_size() > 0) {
    const bool nodes = o.objective != planner::Objective::kStepTime;
    std::cout << fmt::format("{:>4}  {:<48} {:>10} {:>14} {:>10}{}  {}\n", "rank", "strategy", "step", "tokens/s", "memory",
                             nodes ? fmt::format(" {:>6} {:>12}", "nodes", "cost/Mtok") : "", "bottleneck");
    for (const PlanEntry& e : out.plans())
      std::cout << fmt::format("{:>4}  {:<48} {:>10} {:>14.0f} {:>10}{}  {}{}\n", e.rank(), e.name(), format_seconds(e.step_time_s()),
                               e.tokens_per_s(), format_bytes(e.peak_memory_bytes()),
                               nodes ? fmt::format(" {:>6} {:>12.4g}", e.nodes(), e.cost_per_million_tokens()) : "", e.bottleneck(),
                               e.simulated() ? "" : " (estimate)");
  }
  if (!out.no_plan_reason().empty()) std::cout << "\n" << out.no_plan_reason() << "\n";
  if (!out.out_file().empty()) std::cout << fmt::format("\nthe winner: {}\n", out.out_file());
  if (!out.run_id().empty()) std::cout << fmt::format("stored as {}\n", out.run_id());
  return kExitOk;
}

}  // namespace

std::vector<Command> plan_commands() {
  return {
      {"plan", "search parallel strategies: the best for a cluster, model and workload",
       "usage: moesim plan --cluster C --model M --workload W [options]\n\n"
       "  --top N                 plans to list (default 10)\n"
       "  --simulate-top N        candidates simulated with the event simulator (default 20); the rest\n"
       "                          are ranked by the analytic estimate (planner/estimate.h)\n"
       "  --pin STRATEGY          fix knobs: a strategy file or text such as \"tp: 8 zero_stage: 1\"\n"
       "  --max-tp N, --max-pp N  bounds (default: TP within a node, PP up to the layers)\n"
       "  --vary-capacity-factor  also try capacity factors 1.0, 1.25, 1.5\n"
       "  --keep-recompute        keep the workload's recompute mode (default: try none, selective, full)\n"
       "  --executable            only plans the executor runs (`moesim run`, `validate --plan`): tp 1,\n"
       "                          pp 1, ZeRO 0, no recompute, overlap chunks or offload; an fp32 workload\n"
       "  --target-tokens-per-s X say so when the best plan does not reach X, naming the closest\n"
       "  --objective O           step-time (default: all devices, shortest step), cost (cheapest per token\n"
       "                          over 1, 2, 4, ... nodes: needs price_per_device_hour in the cluster), or\n"
       "                          fewest-devices (the fewest nodes whose best plan reaches the target)\n"
       "  --seed N                routing draws of the simulations\n"
       "  --profile F             price every device with this device profile (default: a calibration's\n"
       "                          <cluster>.profile.textproto beside the cluster, as `moesim calibrate`\n"
       "                          writes it; else the device types' priors); the plan file records it\n"
       "  --out FILE              write the winner as a plan (replay: moesim simulate --plan FILE)\n"
       "  --db FILE               add a row to the SQLite results store\n"
       "  --json                  plans (step_time_s, tokens_per_s, peak_memory_bytes, the knobs, bottleneck),\n"
       "                          layouts_considered, simulated, search_wall_s\n\n"
       "The space: every dp x tp x pp x ep layout of the cluster's devices, ZeRO stage, micro-batch size,\n"
       "pipeline schedule, recompute, all-to-all algorithm, overlap chunks; pruned by divisibility and\n"
       "by memory (costmodel/memory.h), ranked by the analytic estimate, the best simulated.\n",
       {{"--vary-capacity-factor", "--keep-recompute", "--executable"},
        {"--cluster", "--model", "--workload", "--top", "--simulate-top", "--pin", "--max-tp", "--max-pp", "--target-tokens-per-s",
         "--objective", "--seed", "--out", "--db", "--profile"}},
       plan_command},
  };
}

}  // namespace moesim::cli
