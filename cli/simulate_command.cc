// `moesim simulate`: one training or inference step, op by op (schedule/lowering.h, sim/engine.h).
#include "cli/cli.pb.h"
#include "cli/commands.h"
#include "planner/plan_file.h"
#include "cli/simulate.h"
#include "common/json.h"
#include "common/progress.h"
#include "common/units.h"
#include "schedule/lowering.h"
#include "sim/engine.h"
#include "sim/scenario.h"
#include "traces/chrome_trace.h"
#include "traces/recorder.h"
#include "traces/store.h"

#include <fmt/format.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <unistd.h>

namespace moesim::cli {
namespace {

namespace fs = std::filesystem;

// Fails before any work when `path` cannot be written: a folder, a missing or read-only folder.
void check_writable(const std::string& flag, const std::string& path) {
  const fs::path p(path);
  if (fs::is_directory(p)) throw UsageError(fmt::format("{} {}: is a folder", flag, path));
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir)) throw UsageError(fmt::format("{} {}: no such folder {}", flag, path, dir.string()));
  if (access(dir.c_str(), W_OK) != 0 || (fs::exists(p) && access(p.c_str(), W_OK) != 0))
    throw UsageError(fmt::format("{} {}: not writable", flag, path));
}

double total_peak_flops(const cost::Setup& s, const std::optional<cost::DeviceProfile>& profile, cost::DType dtype) {
  double sum = 0;
  std::map<int, double> per_type;
  for (int r = 0; r < s.cluster->device_count(); ++r) {
    const int type = s.cluster->device(r).type;
    auto it = per_type.find(type);
    if (it == per_type.end())
      it = per_type.emplace(type, (profile ? *profile : cost::default_profile(s.cluster->device_type(r))).peak_flops_per_s(dtype)).first;
    sum += it->second;
  }
  return sum;
}

void print_result(const SimulateResult& r, std::ostream& out) {
  out << fmt::format("{}: {} devices, {}{}\n", r.scenario(), r.devices(), r.network() == "flows" ? "max-min flows" : "analytic collectives",
                     r.folded() ? fmt::format(", folded to {} simulated ranks", r.simulated_ranks()) : "");
  out << fmt::format("step time      {}\n", format_seconds(r.step_time_s()));
  if (r.tokens_per_s() > 0) out << fmt::format("throughput     {:.0f} tokens/s ({:.2f} sequences/s)\n", r.tokens_per_s(), r.samples_per_s());
  else out << fmt::format("throughput     {:.1f} samples/s\n", r.samples_per_s());
  out << fmt::format("MFU            {:.1f}%\n", 100 * r.mfu());
  out << fmt::format("memory         peak {} on rank {} ({})", format_bytes(r.peak_memory_bytes()), r.peak_rank(),
                     r.fits() ? "fits" : "DOES NOT FIT");
  if (!r.overflow_op().empty()) out << fmt::format(", overflows at {}", r.overflow_op());
  auto print_breakdown = [&](const std::string& title, const google::protobuf::Map<std::string, double>& b) {
    out << "\n" << title << ":\n";
    std::vector<std::pair<std::string, double>> parts(b.begin(), b.end());
    std::sort(parts.begin(), parts.end(), [](const auto& x, const auto& y) { return x.second > y.second; });
    for (const auto& [name, s] : parts)
      if (s > 0)
        out << fmt::format("  {:<18} {:>12} {:>6.1f}%\n", name, format_seconds(s), r.step_time_s() > 0 ? 100 * s / r.step_time_s() : 0);
  };
  out << "\n";
  print_breakdown(fmt::format("breakdown of the critical rank {} (the last to finish)", r.critical_rank()), r.breakdown());
  if (r.bottleneck_rank() != r.critical_rank())
    print_breakdown(fmt::format("breakdown of rank {} (stage {}: the one that waits least for other stages)", r.bottleneck_rank(),
                                [&] {
                                  for (const RankPeak& p : r.ranks())
                                    if (p.rank() == r.bottleneck_rank()) return p.stage();
                                  return 0;
                                }()),
                    r.bottleneck_breakdown());
  if (r.expert_imbalance() > 0)
    out << fmt::format("\nexperts: load imbalance {:.2f} mean, {:.2f} worst (busiest / mean); {:.2f}% of assignments dropped\n",
                       r.expert_imbalance(), r.max_expert_imbalance(), 100 * r.dropped_fraction());
  if (r.busiest_links_size() > 0) {
    out << "\nbusiest links:\n";
    for (const LinkUtilisation& l : r.busiest_links())
      out << fmt::format("  {:<22} -> {:<22} {:>10} {:>6.1f}%\n", l.from(), l.to(), format_bytes(l.bytes()), 100 * l.utilisation());
  }
  out << fmt::format("\nsimulated {} ops, {} events in {}", r.ops(), r.events(), format_seconds(r.sim_wall_s()));
  if (!r.trace_file().empty()) out << fmt::format("; trace {}", r.trace_file());
  if (!r.run_id().empty()) out << fmt::format("; stored as {}", r.run_id());
  out << '\n';
}

}  // namespace

std::string inputs_hash(const sim::Scenario& sc) {
  uint64_t h = 0xcbf29ce484222325ULL;
  auto add = [&h](const std::string& bytes) {
    for (unsigned char c : bytes) h = (h ^ c) * 0x100000001b3ULL;
    h = (h ^ 0xff) * 0x100000001b3ULL;  // separator
  };
  std::string bytes;
  auto add_msg = [&](const google::protobuf::Message& m) {
    bytes.clear();
    google::protobuf::io::StringOutputStream out(&bytes);
    google::protobuf::io::CodedOutputStream coded(&out);
    coded.SetSerializationDeterministic(true);
    m.SerializeToCodedStream(&coded);
    coded.Trim();
    add(bytes);
  };
  add_msg(sc.setup.cluster->spec());
  add_msg(*sc.setup.model);
  add_msg(*sc.setup.workload);
  add_msg(*sc.setup.strategy);
  if (sc.profile) add_msg(sc.profile->spec());
  add(fmt::format("seed {} routing_samples {}", sc.seed, sc.routing_samples));
  return fmt::format("fnv1a64:{:016x}", h);
}

SimulateOutput simulate_scenario(const sim::Scenario& scenario, const SimulateOptions& options) {
  const sim::Scenario* sc = &scenario;
  const auto t0 = std::chrono::steady_clock::now();
  schedule::LoweringOptions lo;
  lo.seed = sc->seed;
  lo.routing_samples = sc->routing_samples;
  lo.fold = options.fold;
  if (sc->profile) lo.profile = &*sc->profile;
  const schedule::Schedule sch = schedule::lower(sc->setup, lo);
  const double lowering_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  sim::SimOptions so;
  so.network = options.network ? *options.network : (sch.folded() ? sim::NetworkMode::kAnalytic : sim::NetworkMode::kFlows);
  so.record_trace = options.record_trace;
  so.progress = options.progress;
  const sim::SimResult r = sim::simulate(sch, *sc->setup.cluster, so);

  SimulateOutput result;
  SimulateResult& out = result.result;
  out.set_scenario(sc->name);
  out.set_cluster(sc->cluster);
  out.set_model(sc->model);
  out.set_workload(sc->workload);
  out.set_strategy(sc->strategy);
  out.set_seed(sc->seed);
  out.set_step_time_s(r.step_time_s);
  const double sequences = static_cast<double>(sc->setup.layout.global_batch);
  if (r.step_time_s > 0) {
    out.set_samples_per_s(sequences / r.step_time_s);
    if (sch.per_token()) out.set_tokens_per_s(sch.tokens() / r.step_time_s);
    out.set_mfu(sch.model_flops() / (r.step_time_s * total_peak_flops(sc->setup, sc->profile, schedule::compute_dtype(*sc->setup.workload))));
  }
  for (const auto& [k, v] : r.breakdown) (*out.mutable_breakdown())[k] = v;
  out.set_critical_rank(r.critical_rank);
  if (!r.ranks.empty()) {
    const sim::RankResult& bottleneck = sim::bottleneck_rank(r);
    out.set_bottleneck_rank(bottleneck.rank);
    for (const auto& [k, v] : bottleneck.breakdown) (*out.mutable_bottleneck_breakdown())[k] = v;
  }
  out.set_peak_memory_bytes(r.peak_memory_bytes);
  out.set_peak_rank(r.peak_rank);
  out.set_fits(r.fits);
  int64_t ops = 0;
  for (const schedule::RankSchedule& rs : sch.ranks()) ops += rs.ops_size();
  for (size_t i = 0; i < r.ranks.size(); ++i) {
    const sim::RankResult& rr = r.ranks[i];
    RankPeak* p = out.add_ranks();
    p->set_rank(rr.rank);
    p->set_stage(sch.ranks(static_cast<int>(i)).stage());
    p->set_represents(rr.represents);
    p->set_end_s(rr.end_s);
    p->set_peak_bytes(rr.peak_bytes);
    p->set_capacity_bytes(rr.capacity_bytes);
    p->set_fits(rr.fits);
    p->set_peak_op(rr.peak_op);
    p->set_overflow_op(rr.overflow_op);
    if (rr.rank == r.peak_rank && !rr.fits) out.set_overflow_op(rr.overflow_op);
  }
  for (const sim::LinkUse& l : r.busiest_links) {
    LinkUtilisation* u = out.add_busiest_links();
    u->set_from(l.from);
    u->set_to(l.to);
    u->set_bytes(l.bytes);
    u->set_capacity_bps(l.capacity_Bps);
    u->set_utilisation(l.utilisation);
  }
  {
    std::map<int, std::vector<double>> by_layer;
    for (const trace::ExpertLoad& e : sch.expert_load()) {
      std::vector<double>& sum = by_layer[e.layer()];
      sum.resize(e.tokens_per_expert_size(), 0);
      for (int i = 0; i < e.tokens_per_expert_size(); ++i) sum[i] += static_cast<double>(e.tokens_per_expert(i));
    }
    for (const auto& [layer, load] : by_layer) {
      LayerExpertLoad* l = out.add_expert_load();
      l->set_layer(layer);
      l->set_name(sc->setup.cost.layers[layer].name);
      for (double v : load) l->add_tokens_per_expert(v);
    }
  }
  out.set_expert_imbalance(sch.expert_imbalance());
  out.set_max_expert_imbalance(sch.max_expert_imbalance());
  out.set_dropped_fraction(sch.dropped_fraction());
  out.set_sim_wall_s(r.sim_wall_s);
  out.set_lowering_wall_s(lowering_s);
  out.set_events(r.events);
  out.set_ops(ops);
  out.set_simulated_ranks(sch.ranks_size());
  out.set_devices(sch.devices());
  out.set_folded(sch.folded());
  out.set_network(so.network == sim::NetworkMode::kFlows ? "flows" : "analytic");

  trace::Trace& tr = result.trace;
  tr = r.trace;
  tr.mutable_run()->set_cluster(sc->cluster);
  tr.mutable_run()->set_model(sc->model);
  tr.mutable_run()->set_workload(sc->workload);
  tr.mutable_run()->set_strategy(sc->strategy);
  tr.mutable_run()->set_seed(sc->seed);
  tr.mutable_run()->set_source(trace::PREDICTED);
  *tr.mutable_expert_load() = sch.expert_load();

  RunRecord& rec = result.record;
  rec.kind = RunKind::kSimulate;
  rec.cluster = sc->cluster;
  rec.model = sc->model;
  rec.workload = sc->workload;
  rec.strategy = sc->strategy;
  rec.seed = sc->seed;
  rec.step_time_s = out.step_time_s();
  if (out.tokens_per_s() > 0) rec.tokens_per_s = out.tokens_per_s();
  rec.mfu = out.mfu();
  rec.peak_memory_bytes = out.peak_memory_bytes();
  rec.fits = out.fits();
  rec.result_json = to_json(out);
  rec.inputs_hash = inputs_hash(*sc);
  rec.version = MOESIM_VERSION;
  std::vector<RunMetric>& metrics = result.metrics;
  for (const auto& [k, v] : r.breakdown) metrics.push_back({"breakdown." + k, v});
  metrics.push_back({"samples_per_s", out.samples_per_s()});
  metrics.push_back({"events", static_cast<double>(r.events)});
  metrics.push_back({"sim_wall_s", r.sim_wall_s});
  metrics.push_back({"expert_imbalance", out.expert_imbalance()});
  metrics.push_back({"dropped_fraction", out.dropped_fraction()});
  return result;
}

sim::Scenario scenario_of_args(const Args& a, std::string* input) {
  const bool by_files = a.has("--cluster") || a.has("--model") || a.has("--workload") || a.has("--strategy");
  const bool by_plan = a.has("--plan");
  if (int(by_files) + int(by_plan) + int(!a.positional().empty()) > 1)
    throw UsageError("give one of: a scenario file, --plan FILE, or --cluster/--model/--workload/--strategy");
  if (!by_files && !by_plan && a.positional().size() != 1) throw UsageError("expected one scenario file (configs/scenarios/*.textproto)");
  if (by_files)
    for (const char* o : {"--cluster", "--model", "--workload", "--strategy"})
      if (!a.has(o)) throw UsageError(fmt::format("missing {} FILE", o));
  *input = by_files ? a.get("--strategy") : by_plan ? a.get("--plan") : a.positional()[0];
  return by_files  ? sim::scenario_from_files(a.get("--cluster"), a.get("--model"), a.get("--workload"), a.get("--strategy"))
         : by_plan ? planner::load_plan(*input)
                   : sim::load_scenario(*input);
}

namespace {

int simulate(const Args& a) {
  const bool json = a.flag("--json");
  const std::string network = a.has("--network") ? a.get("--network") : "auto";
  if (network != "auto" && network != "flows" && network != "analytic")
    throw UsageError(fmt::format("--network: expected auto, flows or analytic, got '{}'", network));
  const std::string fold = a.has("--fold") ? a.get("--fold") : "auto";
  if (fold != "auto" && fold != "never" && fold != "dp") throw UsageError(fmt::format("--fold: expected auto, never or dp, got '{}'", fold));
  if (a.has("--trace")) check_writable("--trace", a.get("--trace"));

  std::optional<sim::Scenario> sc;
  std::string input;
  try {
    sc.emplace(scenario_of_args(a, &input));
  } catch (const ConfigError& e) {
    return report_config_error(e, input, json);
  }
  if (a.has("--seed")) sc->seed = static_cast<uint64_t>(a.get_int("--seed", 1, 0, INT32_MAX));
  if (a.has("--routing-samples")) sc->routing_samples = a.get_int("--routing-samples", 0, 0, 1 << 20);

  // The store is opened (and checked) before the work, so a bad database fails fast.
  std::optional<Store> store;
  if (a.has("--db")) store.emplace(Store::open(a.get("--db")));

  SimulateOptions so;
  if (network == "flows") so.network = sim::NetworkMode::kFlows;
  if (network == "analytic") so.network = sim::NetworkMode::kAnalytic;
  so.fold = fold == "never" ? schedule::Fold::kNever : fold == "dp" ? schedule::Fold::kDataParallel : schedule::Fold::kAuto;
  so.record_trace = a.has("--trace") || store.has_value();
  Progress progress("simulate", 1000);
  size_t shown = 0;
  so.progress = [&](double f) {
    const size_t now = static_cast<size_t>(f * 1000);
    if (now > shown) progress.advance(now - shown), shown = now;
  };
  SimulateOutput result = simulate_scenario(*sc, so);
  SimulateResult& out = result.result;
  if (a.has("--trace")) {
    trace::write_chrome_trace(result.trace, a.get("--trace"));
    out.set_trace_file(a.get("--trace"));
  }
  if (store) {
    result.record.result_json = to_json(out);
    out.set_run_id(store->insert_run(result.record, result.metrics, {result.trace}));
  }
  if (json) std::cout << to_json(out);
  else print_result(out, std::cout);
  return kExitOk;
}

}  // namespace

std::vector<Command> simulate_commands() {
  return {
      {"simulate", "simulate one training or inference step op by op: time, breakdown, memory, links",
       "usage: moesim simulate SCENARIO [options]\n"
       "       moesim simulate --cluster C --model M --workload W --strategy S [options]\n"
       "       moesim simulate --plan best.plan.textproto [options]    (a plan from `moesim plan --out`)\n\n"
       "  SCENARIO            a scenario file (configs/scenarios/*.textproto) naming the four configs\n"
       "  --seed N            routing draws (default: the scenario's seed, else 1)\n"
       "  --network MODE      flows (max-min fair flows over the routed links, concurrent collectives\n"
       "                      contend), analytic (each collective's alpha-beta time alone), or auto\n"
       "                      (default: flows unless the schedule is folded)\n"
       "  --fold MODE         auto (default: fold data-parallel replicas above 256 devices), never, dp\n"
       "  --routing-samples N routing draws in the pool that MoE layers and micro-batches pick from\n"
       "                      by a seeded hash (default 64; 0: a fresh draw for every layer and\n"
       "                      micro-batch)\n"
       "  --trace FILE        Chrome-trace/Perfetto JSON timeline (one process per device, one thread\n"
       "                      per stream, microseconds)\n"
       "  --db FILE           add a row to the SQLite results store (created on first use)\n"
       "  --json              step_time_s, tokens_per_s, samples_per_s, mfu, breakdown, peak_memory_bytes,\n"
       "                      peak_rank, fits, busiest_links, sim_wall_s, events, ...\n\n"
       "A setup that does not fit in memory is a result (fits: false, with the op that overflowed),\n"
       "not an error: the exit code is 0. Bad configs exit 2 naming file, line and field.\n",
       {{}, {"--cluster", "--model", "--workload", "--strategy", "--plan", "--seed", "--network", "--fold", "--routing-samples", "--trace",
             "--db"}},
       simulate},
  };
}

}  // namespace moesim::cli
