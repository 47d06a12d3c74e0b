// `moesim validate`: the executor and the simulator on the same Schedule, joined op by op
// (traces/validation.h), and the validation suite.
//
//   moesim validate --plan P | --scenario S [--profile F] [--steps K] [--feedback] ...
//       every rank runs the lowered Schedule for real; rank 0 simulates the same Schedule on the
//       scenario's cluster and compares;
//   moesim validate --suite [--cluster C] [--profile F] ...
//       the bundled plans (moe-tiny and dense-tiny on 1 and 2 ranks), each validated by a child
//       `moesim validate --scenario` (which launches its own ranks), then the summary;
//   moesim validate --predicted A --measured B
//       two trace files (moesim simulate/run --trace-pb) joined without running anything.
#include "cli/calibration_step.h"
#include "cli/cli.pb.h"
#include "cli/commands.h"
#include "cli/executor_runs.h"
#include "cli/launch.h"
#include "common/files.h"
#include "common/json.h"
#include "common/units.h"
#include "costmodel/compute.h"
#include "costmodel/setup.h"
#include "executor/train.h"
#include "planner/plan_file.h"
#include "schedule/lowering.h"
#include "sim/engine.h"
#include "sim/scenario.h"
#include "traces/chrome_trace.h"
#include "traces/recorder.h"
#include "traces/store.h"
#include "traces/validation.h"
#include "topologies/hardware.pb.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/text_format.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace moesim::cli {
namespace {

namespace fs = std::filesystem;

constexpr int kWorstOps = 8;

void fill(const trace::ErrorStats& s, KindErrors* k) {
  k->set_ops(s.count);
  k->set_median_abs_pct(s.median_abs_pct);
  k->set_p90_abs_pct(s.p90_abs_pct);
  k->set_max_abs_pct(s.max_abs_pct);
  k->set_mean_pct(s.mean_pct);
}

// The comparison's figures into `out` (step errors, per kind, worst ops, op-order tau).
void fill(const trace::Comparison& c, ValidateResult* out) {
  out->set_compared_steps(c.compared_steps);
  out->set_predicted_step_s(c.predicted_step_s);
  out->set_measured_step_s(c.measured_step_quiet_s);
  out->set_step_error_pct(c.step_error_pct);
  out->set_median_abs_pct_error(c.step.median_abs_pct);
  out->set_p90_abs_pct_error(c.step.p90_abs_pct);
  out->set_max_abs_pct_error(c.step.max_abs_pct);
  out->set_step_bias_pct(c.step.mean_pct);
  for (const auto& [kind, stats] : c.per_kind) {
    (*out->mutable_per_kind())[kind] = stats.median_abs_pct;
    KindErrors* k = &(*out->mutable_per_kind_detail())[kind];
    fill(stats, k);
    k->set_share_pct(c.kind_share_pct.count(kind) ? c.kind_share_pct.at(kind) : 0);
  }
  std::vector<double> predicted, measured;
  for (const trace::OpError& e : c.ops) {
    predicted.push_back(e.predicted_s);
    measured.push_back(e.measured_s);
  }
  out->set_kendall_tau(trace::kendall_tau(predicted, measured));
  out->set_matched_ops(static_cast<int>(c.ops.size()));
  out->set_unmatched_ops(0);
  auto entry = [](const trace::OpError& e, OpErrorEntry* w) {
    w->set_op_id(e.op_id);
    w->set_kind(e.kind);
    w->set_rank(e.rank);
    w->set_predicted_s(e.predicted_s);
    w->set_measured_s(e.measured_s);
    w->set_error_pct(e.error_pct);
  };
  for (const trace::OpError& e : c.worst(kWorstOps)) entry(e, out->add_worst_ops());
  for (const trace::OpError& e : c.ops) entry(e, out->add_ops());
}

std::string signed_pct(double v) { return fmt::format("{:+.1f}%", v); }

void print_result(const ValidateResult& r) {
  std::cout << fmt::format("{}: {} on {} rank(s), {} compared step(s), profile {}\n", r.name(), r.model(), r.ranks(),
                           r.compared_steps(), r.device_profile().empty() ? "(device priors)" : r.device_profile());
  std::cout << fmt::format("step time      predicted {}  measured {} (lower quartile)  error {}; per step: median "
                           "|error| {:.1f}%, p90 {:.1f}%, bias {}\n",
                           format_seconds(r.predicted_step_s()), format_seconds(r.measured_step_s()),
                           signed_pct(r.step_error_pct()), r.median_abs_pct_error(), r.p90_abs_pct_error(),
                           signed_pct(r.step_bias_pct()));
  std::cout << fmt::format("ops matched    {} (unmatched {}); op-order Kendall tau {:.2f}\n\n", r.matched_ops(),
                           r.unmatched_ops(), r.kendall_tau());
  std::cout << fmt::format("{:<14} {:>5} {:>14} {:>10} {:>14}\n", "op kind", "ops", "median |err|", "bias",
                           "share of time");
  std::vector<std::pair<std::string, KindErrors>> kinds(r.per_kind_detail().begin(), r.per_kind_detail().end());
  std::sort(kinds.begin(), kinds.end(),
            [](const auto& x, const auto& y) { return x.second.median_abs_pct() < y.second.median_abs_pct(); });
  for (const auto& [kind, k] : kinds)
    std::cout << fmt::format("{:<14} {:>5} {:>13.1f}% {:>10} {:>13.1f}%\n", kind, k.ops(), k.median_abs_pct(),
                             signed_pct(k.mean_pct()), k.share_pct());
  std::cout << "\nworst ops:\n";
  for (const OpErrorEntry& w : r.worst_ops())
    std::cout << fmt::format("  {:<34} rank {}  predicted {:>10}  measured {:>10}  {}\n", w.op_id(), w.rank(),
                             format_seconds(w.predicted_s()), format_seconds(w.measured_s()), signed_pct(w.error_pct()));
  if (r.routing_feedback()) std::cout << "\nthe prediction used the measured expert loads (--feedback)\n";
  if (!r.routing_out().empty()) std::cout << fmt::format("measured routing written to {}\n", r.routing_out());
  if (!r.run_id().empty()) std::cout << fmt::format("stored as {}\n", r.run_id());
}

// Tokens per expert over MoE layers, ranks and the compared steps.
std::vector<double> measured_histogram(const trace::Trace& measured, int first_step) {
  std::vector<double> h;
  for (const trace::ExpertLoad& l : measured.expert_load()) {
    if (l.step() < first_step) continue;
    h.resize(std::max<size_t>(h.size(), static_cast<size_t>(l.tokens_per_expert_size())), 0.0);
    for (int e = 0; e < l.tokens_per_expert_size(); ++e) h[static_cast<size_t>(e)] += static_cast<double>(l.tokens_per_expert(e));
  }
  return h;
}

// The workload with the measured histogram as its routing distribution.
workload::Workload with_routing(const workload::Workload& w, const std::vector<double>& histogram) {
  workload::Workload out = w;
  workload::RoutingDistribution* r = out.mutable_routing();
  const uint64_t seed = r->seed();
  r->Clear();
  r->set_seed(seed);
  for (double x : histogram) r->mutable_histogram()->add_weight(std::max(x, 1.0));  // a never-chosen expert keeps a sliver
  return out;
}

struct Input {
  sim::Scenario scenario;
  exec::TrainOptions options;
  std::optional<cost::DeviceProfile> profile;
  std::string profile_file;
};

int validate_one(const Args& a) {
  const bool json = a.flag("--json");
  const std::string file = a.has("--plan") ? a.get("--plan") : a.get("--scenario");
  Input in;
  try {
    in.scenario = a.has("--plan") ? planner::load_plan(file) : sim::load_scenario(file);
    if (a.has("--profile")) {
      in.profile = cost::load_device_profile(a.get("--profile"));
      in.profile_file = a.get("--profile");
    } else if (in.scenario.profile) {
      in.profile = in.scenario.profile;
      in.profile_file = in.scenario.profile->source();
    }
  } catch (const ConfigError& e) {
    return report_config_error(e, file, json);
  }
  const cost::Setup& setup = in.scenario.setup;
  const int ranks = setup.layout.devices;
  if (a.has("--ranks") && a.get_int("--ranks", ranks, 1, 4096) != ranks)
    throw UsageError(fmt::format("{}: its strategy runs on {} ranks, not --ranks {}", file, ranks, a.get("--ranks")));
  if (!setup.workload->has_training())
    throw UsageError(fmt::format("{}: the executor runs training steps; this workload is inference", file));
  if (setup.workload->training().precision() != workload::FP32)
    throw UsageError(fmt::format("{}: the executor computes in fp32; give the workload precision: FP32 so that the "
                                 "prediction times the same arithmetic",
                                 file));
  const exec::Device device = check_device(a, ranks);
  exec::TrainOptions& o = in.options;
  o.model = *setup.model;
  apply_strategy(*setup.strategy, file, ranks, o);
  o.batch = setup.layout.global_batch;
  o.sequence = setup.layout.sequence;
  o.seed = in.scenario.seed;
  o.optimizer = setup.workload->training().optimizer() == workload::SGD ? exec::OptimizerKind::kSgd
                                                                         : exec::OptimizerKind::kAdam;
  // The first steps of a fresh model route unevenly (the aux loss has not balanced the experts
  // yet: moe-tiny's first five steps on two ranks run up to 2x the later ones) and a fresh
  // process's exchanges settle (trace::kWarmupSteps), so a quarter of the steps, and at least 10
  // of 20 or more, are left out by default.
  o.steps = a.get_int("--steps", 20, 2, 100000);
  const int warmup = a.get_int("--warmup", std::max(o.steps / 4, std::min(trace::kWarmupSteps, o.steps / 2)), 0, o.steps - 1);
  schedule::LoweringOptions lo;
  lo.seed = in.scenario.seed;
  lo.fold = schedule::Fold::kNever;
  lo.routing_samples = in.scenario.routing_samples;
  lo.profile = in.profile ? &*in.profile : nullptr;
  auto lowered = std::make_shared<schedule::Schedule>(schedule::lower(setup, lo));
  o.schedule = lowered;
  refuse_if_any(fmt::format("{} cannot run on {} rank(s):", file, ranks), exec::validate(o, ranks));
  const double timeout_s = a.get_double("--timeout", 60, 0.1, 86400);
  const Launch launch = launch_ranks(ranks);
  if (launch.relaunched) return launch.exit_code;

  return on_ranks(ranks, threads_per_rank(a, ranks, in.profile ? in.profile->spec().threads_per_rank() : 0), timeout_s, device, [&](exec::Comm* world, exec::Comm* host_world, exec::Backend& backend) {
    const exec::TrainResult run = exec::train(o, world, backend);
    const trace::Trace measured = gather_traces(run.trace, host_world);
    if (world && world->rank() != 0) return kExitOk;

    ValidateResult out;
    out.set_name(in.scenario.name.empty() ? fs::path(file).stem().string() : in.scenario.name);
    out.set_scenario(file);
    out.set_cluster(in.scenario.cluster);
    out.set_model(setup.model->name());
    out.set_strategy(setup.strategy->name());
    out.set_device_profile(in.profile_file);
    out.set_ranks(ranks);
    out.set_steps(o.steps);
    const int first_step = o.steps > warmup ? warmup : 0;
    const std::vector<double> histogram = measured_histogram(measured, first_step);
    for (double x : histogram) out.add_measured_expert_load(x);

    // The prediction: the same Schedule, or with --feedback the same ops lowered with the measured
    // expert loads as the routing distribution (op ids do not depend on routing).
    std::shared_ptr<const schedule::Schedule> predicted_schedule = lowered;
    if (a.flag("--feedback") && !histogram.empty()) {
      cost::Setup fed = setup;
      fed.workload.msg = std::make_shared<workload::Workload>(with_routing(*setup.workload, histogram));
      predicted_schedule = std::make_shared<schedule::Schedule>(schedule::lower(fed, lo));
      out.set_routing_feedback(true);
    }
    sim::SimOptions so;
    so.network = sim::NetworkMode::kFlows;
    const sim::SimResult sim = sim::simulate(*predicted_schedule, *setup.cluster, so);
    trace::Comparison c;
    try {
      c = trace::compare(sim.trace, measured, {.predicted_step_s = sim.step_time_s, .skip_steps = warmup});
    } catch (const trace::TraceMismatch& e) {
      std::cerr << "moesim: " << e.what() << '\n';
      return kExitBadInput;
    }
    fill(c, &out);
    if (a.has("--routing-out") && !histogram.empty()) {
      std::string text;
      google::protobuf::TextFormat::PrintToString(with_routing(*setup.workload, histogram), &text);
      const std::string why = write_file_atomically(
          a.get("--routing-out"), fmt::format("# {}'s workload with the expert loads measured by `moesim validate` as "
                                              "its routing distribution.\n{}",
                                              file, text));
      if (!why.empty()) {
        std::cerr << fmt::format("moesim: --routing-out {}: cannot write: {}\n", a.get("--routing-out"), why);
        return kExitBadInput;
      }
      out.set_routing_out(a.get("--routing-out"));
    }
    if (a.has("--trace")) {
      const std::string prefix = a.get("--trace");
      trace::Trace predicted = sim.trace;
      predicted.mutable_run()->set_source(trace::PREDICTED);
      trace::write_chrome_trace(predicted, prefix + ".predicted.json");
      trace::write_chrome_trace(measured, prefix + ".measured.json");
      out.set_predicted_trace(prefix + ".predicted.json");
      out.set_measured_trace(prefix + ".measured.json");
    }
    if (a.has("--db")) {
      Store store = Store::open(a.get("--db"));
      RunRecord rec;
      rec.kind = RunKind::kValidate;
      rec.cluster = in.scenario.cluster;
      rec.model = setup.model->name();
      rec.workload = in.scenario.workload;
      rec.strategy = setup.strategy->name();
      rec.seed = in.scenario.seed;
      rec.step_time_s = c.measured_step_quiet_s;
      rec.result_json = to_json(out);
      rec.version = MOESIM_VERSION;
      trace::Trace predicted = sim.trace;
      predicted.mutable_run()->set_source(trace::PREDICTED);
      std::vector<RunMetric> metrics = {{"predicted_step_s", c.predicted_step_s},
                                        {"measured_step_s", c.measured_step_quiet_s},
                                        {"median_abs_pct_error", c.step.median_abs_pct},
                                        {"p90_abs_pct_error", c.step.p90_abs_pct},
                                        {"step_bias_pct", c.step.mean_pct}};
      for (const auto& [kind, stats] : c.per_kind) metrics.push_back({"kind." + kind, stats.median_abs_pct});
      out.set_run_id(store.insert_run(rec, metrics, {predicted, measured}));
    }
    if (json) std::cout << to_json(out);
    else print_result(out);
    return kExitOk;
  });
}

// Two trace files joined without running anything.
int validate_files(const Args& a) {
  const bool json = a.flag("--json");
  trace::Trace predicted, measured;
  for (const char* flag : {"--predicted", "--measured"}) {
    try {
      (flag[2] == 'p' ? predicted : measured) = trace::read_trace(a.get(flag));
    } catch (const ConfigError& e) {
      return report_config_error(e, a.get(flag), json);
    }
  }
  int64_t first = INT64_MAX, last = 0;
  for (const trace::Span& s : predicted.spans()) {
    first = std::min(first, s.start_ns());
    last = std::max(last, s.end_ns());
  }
  const double predicted_step_s = predicted.spans_size() > 0 ? static_cast<double>(last - first) * 1e-9 : 0;
  trace::Comparison c;
  try {
    c = trace::compare(predicted, measured,
                       {.predicted_step_s = predicted_step_s, .skip_steps = a.get_int("--warmup", 1, 0, 1000)});
  } catch (const std::exception& e) {  // TraceMismatch, or a measured trace without spans
    std::cerr << fmt::format("moesim: {} vs {}: {}\n", a.get("--predicted"), a.get("--measured"), e.what());
    return kExitBadInput;
  }
  ValidateResult out;
  out.set_name(fs::path(a.get("--measured")).stem().string());
  out.set_scenario(a.get("--predicted"));
  out.set_model(measured.run().model());
  fill(c, &out);
  if (json) std::cout << to_json(out);
  else print_result(out);
  return kExitOk;
}

// ---- the suite ---------------------------------------------------------------------------------

struct SuitePlan {
  const char* name;
  const char* model;  // under configs/models
  int ranks, batch, micro_batch, ep;
  double capacity_factor;
  const char* drop_policy;
};

// moe-tiny and dense-tiny on 1 and 2 ranks: EP and DP, micro-batches, capacity factors (drops at
// 0.5 and 0.75, with both drop policies), batch sizes.
constexpr SuitePlan kSuite[] = {
    {"moe-1r", "moe-tiny", 1, 8, 8, 1, 1.25, "VANILLA"},
    {"moe-1r-2mb", "moe-tiny", 1, 16, 8, 1, 1.25, "VANILLA"},
    {"moe-2r-ep2", "moe-tiny", 2, 16, 8, 2, 1.25, "VANILLA"},
    {"moe-2r-ep1", "moe-tiny", 2, 16, 8, 1, 1.25, "VANILLA"},
    {"moe-2r-ep2-cf2", "moe-tiny", 2, 16, 8, 2, 2.0, "VANILLA"},
    {"moe-2r-ep2-cf0.5", "moe-tiny", 2, 16, 8, 2, 0.5, "VANILLA"},
    {"moe-2r-ep2-bpr", "moe-tiny", 2, 16, 8, 2, 0.75, "BATCH_PRIORITY"},
    {"moe-2r-ep2-b32", "moe-tiny", 2, 32, 16, 2, 1.25, "VANILLA"},
    {"dense-1r", "dense-tiny", 1, 8, 8, 1, 1.25, "VANILLA"},
    {"dense-2r", "dense-tiny", 2, 16, 8, 1, 1.25, "VANILLA"},
};

std::string quoted(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

// Runs `command` through the shell; its stdout, and its exit status in `status`.
std::string capture(const std::string& command, int& status) {
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) throw UsageError(fmt::format("cannot run {}", command));
  std::string text;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) text.append(buf, n);
  status = ::pclose(pipe);
  return text;
}

int validate_suite(const Args& a) {
  const bool json = a.flag("--json");
  const std::string configs = MOESIM_CONFIGS_DIR;
  const std::string cluster = fs::absolute(a.get("--cluster", configs + "/hardware/local.textproto")).string();
  if (!fs::exists(cluster))
    throw UsageError(fmt::format("{}: no such cluster; describe this machine first: moesim calibrate --out {}", cluster,
                                 cluster));
  std::string profile = profile_for(a, cluster);
  if (!profile.empty()) profile = fs::absolute(profile).string();
  const int steps = a.get_int("--steps", 30, 2, 100000);
  const int passes = a.get_int("--passes", 5, 1, 100);
  const double pass_gap_s = a.get_double("--pass-gap", 5, 0, 3600);
  // On GPUs every rank needs its own (NCCL refuses two ranks on one device): the plans with more
  // ranks than this machine has GPUs are skipped, named in the result.
  const bool cuda = check_device(a, 1) == exec::Device::kCuda;
  const int gpus = cuda ? exec::cuda_device_count() : 0;
  const std::string device_arg = cuda ? " --device cuda" : "";
  auto runs_here = [&](int ranks) { return !cuda || ranks <= gpus; };
  // Absolute: the scenarios written there name their cluster by this path.
  const fs::path dir =
      fs::absolute(a.get("--out", (fs::temp_directory_path() / fmt::format("moesim-suite-{}", ::getpid())).string()));
  fs::create_directories(dir);
  const std::string self = fs::canonical("/proc/self/exe").string();
  const bool progress = ::isatty(STDERR_FILENO) && !json;
  const auto t0 = std::chrono::steady_clock::now();

  // The cluster with as many devices as each plan has ranks (the calibrated node, resized).
  hw::Cluster node;
  {
    std::ifstream f(cluster);
    std::stringstream text;
    text << f.rdbuf();
    if (!google::protobuf::TextFormat::ParseFromString(text.str(), &node) || !node.has_node())
      throw UsageError(fmt::format("{}: not a one-node cluster as `moesim calibrate` writes", cluster));
  }
  std::map<int, std::string> clusters;  // by ranks, written once
  auto cluster_of = [&](int ranks) {
    const std::string path = (dir / fmt::format("cluster-{}.textproto", ranks)).string();
    if (!clusters.emplace(ranks, path).second) return path;
    hw::Cluster c = node;
    c.set_nodes(1);
    c.mutable_node()->set_devices_per_node(ranks);
    std::string text;
    google::protobuf::TextFormat::PrintToString(c, &text);
    std::ofstream(path) << fmt::format("# {} resized to {} device(s) for the validation suite\n{}", cluster, ranks, text);
    return path;
  };

  ValidateSuiteResult suite;
  suite.set_cluster(cluster);
  suite.set_device_profile(profile);
  // Every plan once per pass, the passes one after another and --pass-gap apart: a plan whose run
  // fell in a stretch slowed by other tenants (seconds long on a shared VM) is then not the one
  // compared, and its ops' medians draw on the machine's paces over the better part of a minute
  // (memory-bound ops and exchanges move between levels 1.5x apart lasting 5-60 s here, as
  // calibration's rounds span a minute for: docs/VALIDATION.md). Per plan, the pass with the
  // median measured step time (calibration takes the median of its rounds).
  std::vector<std::string> scenarios;
  for (const SuitePlan& p : kSuite) {
    scenarios.push_back((dir / fmt::format("{}.scenario.textproto", p.name)).string());
    std::ofstream(scenarios.back()) << fmt::format(
        "# moesim validate --suite: plan {} ({} on {} rank(s))\n"
        "name: \"{}\"\ncluster: \"{}\"\nmodel: \"{}/models/{}.textproto\"\n{}"
        "workload_inline {{ name: \"suite\" training {{ global_batch: {} micro_batch: {} sequence: 32 precision: FP32 "
        "optimizer: ADAM }} }}\n"
        "strategy_inline {{ name: \"dp{}-ep{}-cf{}-{}\" dp: {} ep: {} capacity_factor: {} drop_policy: {} }}\n",
        p.name, p.model, p.ranks, p.name, cluster_of(p.ranks), configs, p.model,
        profile.empty() ? "" : fmt::format("device_profile: \"{}\"\n", profile), p.batch, p.micro_batch, p.ranks, p.ep,
        p.capacity_factor, p.drop_policy, p.ranks, p.ep, p.capacity_factor, p.drop_policy);
  }
  // The machine's pace against its calibration: the calibration step (cli/calibration_step.h) on
  // the calibrated ranks, once per pass, against the profile's calibration_step_s.
  std::string reference;
  double calibration_step_s = 0;
  if (!profile.empty()) {
    const cost::DeviceProfile loaded = cost::load_device_profile(profile);
    const profile::DeviceProfile& spec = loaded.spec();
    calibration_step_s = spec.calibration_step_s();
    const int ranks = std::max(1, node.node().devices_per_node());  // the calibrated ranks
    // A calibration across nodes ran its step on all of them, which the suite (on one node) cannot.
    if (calibration_step_s > 0 && node.nodes() <= 1 && runs_here(ranks)) {
      reference = (dir / "calibration-step.scenario.textproto").string();
      std::ofstream(reference) << fmt::format(
          "# moesim validate --suite: the calibration step, for the machine's pace against its calibration\n"
          "name: \"calibration-step\"\ncluster: \"{}\"\ndevice_profile: \"{}\"\nmodel_inline {{ {} }}\n"
          "workload_inline {{ {} }}\nstrategy_inline {{ {} }}\n",
          cluster_of(ranks), profile, calibration_model_text(ranks), calibration_workload_text(ranks),
          calibration_strategy_text(ranks));
    }
  }
  // One child `moesim validate --scenario`; false (after saying why) when it failed.
  auto run_child = [&](const std::string& name, const std::string& scenario, const std::string& extra,
                       ValidateResult* r) {
    std::string cmd = fmt::format("{} validate --scenario {} --json --steps {}{}{}", quoted(self), quoted(scenario),
                                  steps, device_arg, extra);
    if (a.has("--timeout")) cmd += " --timeout " + quoted(a.get("--timeout"));
    if (a.has("--threads")) cmd += " --threads " + quoted(a.get("--threads"));
    int status = 0;
    const std::string text = capture(cmd, status);
    if (status == 0 && google::protobuf::util::JsonStringToMessage(text, r).ok()) return true;
    if (progress) std::cerr << '\n';
    std::cerr << fmt::format("moesim: suite plan {} failed (scenario {}): {}\n", name, scenario, text);
    return false;
  };
  std::vector<size_t> selected;  // the plans run here, indices into kSuite
  for (size_t i = 0; i < std::size(kSuite); ++i) {
    if (runs_here(kSuite[i].ranks)) selected.push_back(i);
    else suite.add_skipped_plans(kSuite[i].name);
  }
  std::vector<std::vector<ValidateResult>> runs(selected.size());
  std::vector<double> pace, exchange_pace, gather_pace;
  for (int pass = 0; pass < passes; ++pass) {
    if (pass > 0) std::this_thread::sleep_for(std::chrono::duration<double>(pass_gap_s));
    if (!reference.empty()) {
      ValidateResult r;
      if (!run_child("calibration-step", reference, "", &r)) return kExitInternal;
      pace.push_back(r.measured_step_s() / calibration_step_s);  // both the mean of the quiet steps
      std::vector<double> exchanges, gathers;
      for (const OpErrorEntry& op : r.ops()) {
        if (!(op.predicted_s() > 0)) continue;
        const double ratio = op.measured_s() / op.predicted_s();
        if (op.kind() == "dispatch_a2a" || op.kind() == "combine_a2a") exchanges.push_back(ratio);
        if (op.kind() == "embed" || op.kind() == "permute" || op.kind() == "combine") gathers.push_back(ratio);
      }
      if (!exchanges.empty()) exchange_pace.push_back(trace::quantile(exchanges, 0.5));
      if (!gathers.empty()) gather_pace.push_back(trace::quantile(gathers, 0.5));
    }
    for (size_t i = 0; i < selected.size(); ++i) {
      const SuitePlan& p = kSuite[selected[i]];
      if (progress)
        std::cerr << fmt::format("\r[pass {}/{}, {}/{}] {:<24}", pass + 1, passes, i + 1, selected.size(), p.name)
                  << std::flush;
      std::string extra = " --feedback";
      if (a.has("--db")) extra += " --db " + quoted(a.get("--db"));  // every pass is a stored run
      if (a.has("--trace"))
        extra += " --trace " + quoted(a.get("--trace") + "." + p.name + (passes > 1 ? fmt::format(".{}", pass) : ""));
      ValidateResult r;
      if (!run_child(p.name, scenarios[selected[i]], extra, &r)) return kExitInternal;
      runs[i].push_back(std::move(r));
    }
  }
  if (!pace.empty()) suite.set_pace_vs_calibration_pct((trace::quantile(pace, 0.5) - 1) * 100);
  if (!exchange_pace.empty())
    suite.set_exchange_pace_vs_calibration_pct((trace::quantile(exchange_pace, 0.5) - 1) * 100);
  if (!gather_pace.empty()) suite.set_gather_pace_vs_calibration_pct((trace::quantile(gather_pace, 0.5) - 1) * 100);
  std::vector<double> step_errors, predicted, measured;
  for (std::vector<ValidateResult>& plan_runs : runs) {
    std::sort(plan_runs.begin(), plan_runs.end(), [](const ValidateResult& x, const ValidateResult& y) {
      return x.measured_step_s() < y.measured_step_s();
    });
    ValidateResult* r = suite.add_plans();
    *r = plan_runs[(plan_runs.size() - 1) / 2];
    step_errors.push_back(r->step_error_pct());
    predicted.push_back(r->predicted_step_s());
    measured.push_back(r->measured_step_s());
    suite.set_unmatched_ops(suite.unmatched_ops() + r->unmatched_ops());
  }
  if (progress) std::cerr << '\r' << std::string(40, ' ') << '\r';
  // Per kind over every plan: each plan's median for a kind stands for its ops of that kind. Each
  // op's error is its median over the passes (one fresh process's op is one draw of a wide spread
  // on a shared machine); `plans` carry the compared passes' own figures.
  std::map<std::string, std::vector<double>> pooled, spreads, shares;
  for (size_t i = 0; i < runs.size(); ++i) {
    std::vector<std::vector<trace::OpError>> pass_ops;
    for (const ValidateResult& r : runs[i]) {
      std::vector<trace::OpError>& ops = pass_ops.emplace_back();
      for (const OpErrorEntry& e : r.ops())
        ops.push_back({e.op_id(), e.kind(), e.rank(), e.predicted_s(), e.measured_s(), e.error_pct()});
    }
    for (const auto& [kind, k] : trace::per_kind_over_runs(pass_ops)) {
      pooled[kind].insert(pooled[kind].end(), static_cast<size_t>(k.errors.count), k.errors.median_abs_pct);
      spreads[kind].insert(spreads[kind].end(), static_cast<size_t>(k.errors.count), k.spread_pct);
    }
    for (const auto& [kind, k] : suite.plans(static_cast<int>(i)).per_kind_detail()) shares[kind].push_back(k.share_pct());
  }
  for (const auto& [kind, v] : pooled) (*suite.mutable_per_kind())[kind] = trace::quantile(v, 0.5);
  for (const auto& [kind, v] : spreads) (*suite.mutable_per_kind_spread_pct())[kind] = trace::quantile(v, 0.5);
  for (const auto& [kind, v] : shares) (*suite.mutable_per_kind_share_pct())[kind] = trace::quantile(v, 0.5);
  const trace::ErrorStats s = trace::error_stats(step_errors);
  suite.set_median_abs_pct_error(s.median_abs_pct);
  suite.set_p90_abs_pct_error(s.p90_abs_pct);
  suite.set_max_abs_pct_error(s.max_abs_pct);
  suite.set_kendall_tau(trace::kendall_tau(predicted, measured));
  suite.set_wall_s(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  if (json) {
    std::cout << to_json(suite);
    return kExitOk;
  }
  std::cout << fmt::format("validation suite on {} (profile {}), {} plans, {} steps each\n\n", cluster,
                           profile.empty() ? "(device priors)" : profile, suite.plans_size(), steps);
  std::cout << fmt::format("{:<18} {:>5} {:>11} {:>11} {:>8} {:>9}\n", "plan", "ranks", "predicted", "measured", "error",
                           "op tau");
  for (const ValidateResult& r : suite.plans())
    std::cout << fmt::format("{:<18} {:>5} {:>11} {:>11} {:>8} {:>9.2f}\n", r.name(), r.ranks(),
                             format_seconds(r.predicted_step_s()), format_seconds(r.measured_step_s()),
                             signed_pct(r.step_error_pct()), r.kendall_tau());
  std::cout << fmt::format("\nstep time: median |error| {:.1f}%, p90 {:.1f}%, max {:.1f}%; plan ranking Kendall tau {:.2f}\n",
                           suite.median_abs_pct_error(), suite.p90_abs_pct_error(), suite.max_abs_pct_error(),
                           suite.kendall_tau());
  std::cout << fmt::format("per op kind (median |error|{}; in brackets its median share of a plan's measured op "
                           "time):",
                           passes > 1 ? fmt::format(", each op's over the {} passes, +- how far they spread", passes) : "");
  std::vector<std::pair<std::string, double>> kinds(suite.per_kind().begin(), suite.per_kind().end());
  std::sort(kinds.begin(), kinds.end(), [](const auto& x, const auto& y) { return x.second < y.second; });
  for (const auto& [kind, v] : kinds)
    std::cout << fmt::format(" {} {:.1f}%{} ({:.1f}%)", kind, v,
                             passes > 1 ? fmt::format(" +-{:.1f}", suite.per_kind_spread_pct().at(kind)) : "",
                             suite.per_kind_share_pct().at(kind));
  if (suite.has_pace_vs_calibration_pct())
    std::cout << fmt::format("\nmachine pace: the calibration step runs {:+.1f}% against when it was calibrated (every "
                             "plan's error moves with it; recalibrate when it is large)",
                             suite.pace_vs_calibration_pct());
  if (suite.has_exchange_pace_vs_calibration_pct())
    std::cout << fmt::format("; its all-to-alls {:+.1f}% against their calibrated prediction",
                             suite.exchange_pace_vs_calibration_pct());
  if (suite.has_gather_pace_vs_calibration_pct())
    std::cout << fmt::format(", its gathers (embedding, permutation, combine) {:+.1f}%",
                             suite.gather_pace_vs_calibration_pct());
  if (suite.skipped_plans_size() > 0)
    std::cout << fmt::format("\nskipped (one GPU per rank, and this machine has {}): {}", gpus,
                             fmt::join(suite.skipped_plans(), ", "));
  std::cout << fmt::format("\nscenarios in {}; {:.0f} s\n", dir.string(), suite.wall_s());
  return kExitOk;
}

int validate(const Args& a) {
  if (!a.positional().empty()) throw UsageError("validate takes no positional arguments");
  const int modes = a.has("--plan") + a.has("--scenario") + a.flag("--suite") + (a.has("--predicted") || a.has("--measured"));
  if (modes != 1) throw UsageError("give one of --plan P, --scenario S, --suite, or --predicted A --measured B");
  if (a.has("--predicted") != a.has("--measured")) throw UsageError("--predicted and --measured go together");
  if (a.has("--predicted")) return validate_files(a);
  if (a.flag("--suite")) return validate_suite(a);
  return validate_one(a);
}

}  // namespace

std::vector<Command> validate_commands() {
  return {
      {"validate", "run a plan for real and simulate it: predicted vs measured, op by op",
       "usage: moesim validate --plan P | --scenario S [--profile F] [--steps K] [--warmup W] [--feedback]\n"
       "                       [--routing-out W.textproto] [--trace PREFIX] [--db results.db] [--json]\n"
       "       moesim validate --suite [--cluster C] [--profile F] [--steps K] [--passes P] [--out DIR] [--db results.db]\n"
       "                       [--device cpu|cuda] [--json]\n"
       "       moesim validate --predicted A.pb --measured B.pb [--warmup W] [--json]\n\n"
       "The plan's (or scenario's) step is lowered once (schedule/lowering.h, every rank); its ranks\n"
       "run it for real (launched under mpirun as `moesim run` does) and rank 0 simulates the same\n"
       "Schedule on the plan's cluster, then joins the traces by (op id, rank) (traces/validation.h):\n"
       "step-time error over the steps after the warm-up, median |error| per op kind, the worst ops\n"
       "with both times, and Kendall's tau of the op durations. Traces that do not match are refused\n"
       "naming the first missing op (exit 2).\n\n"
       "  --profile F       the device profile for the prediction (moesim calibrate writes one);\n"
       "                    default the scenario's device_profile, else the device's priors\n"
       "  --steps K         steps run (default 20, the suite's 30); --warmup W of them left out of the\n"
       "                    statistics (default a quarter of them, at least 10 of 20 or more: a fresh\n"
       "                    router balances its experts over the first steps, and a fresh process's\n"
       "                    exchanges settle; 1 for two trace files)\n"
       "  --device D        cpu (default) or cuda: one GPU per rank, NCCL between them\n"
       "  --threads N       OpenBLAS threads per CPU rank (default: as many as the profile was calibrated\n"
       "                    with, else this machine's cores / its ranks)\n"
       "  --feedback        predict with the measured expert loads as the routing distribution\n"
       "  --routing-out W   write the workload with the measured loads as its routing histogram\n"
       "  --trace PREFIX    PREFIX.predicted.json and PREFIX.measured.json (Chrome traces)\n"
       "  --db FILE         a validate row with both traces and the error metrics\n"
       "  --suite           the bundled plans (moe-tiny, dense-tiny on 1 and 2 ranks: EP, DP, micro-batches,\n"
       "                    capacity factors, drop policies) on --cluster (default\n"
       "                    configs/hardware/local.textproto, from `moesim calibrate`) with its profile\n"
       "                    (--profile, else <cluster>.profile.textproto beside it), each with --feedback;\n"
       "                    a summary table, step-time median/p90 error and the plans' Kendall tau, and\n"
       "                    the machine's pace against its calibration (the calibration step run again:\n"
       "                    its step time, and its all-to-alls and its gathers against their calibrated\n"
       "                    prediction); with --device cuda, the plans with more ranks than this machine\n"
       "                    has GPUs are skipped (named: skipped_plans)\n"
       "  --passes P        the suite's plans run P times, one pass after another (default 5); per plan\n"
       "                    the pass with the median measured step time is compared (every pass is stored);\n"
       "                    per kind, each op's error is its median over the passes\n"
       "  --pass-gap S      seconds between passes (default 5): a shared machine's pace moves over seconds,\n"
       "                    and the passes' medians then draw on the better part of a minute\n"
       "  --predicted/--measured  join two trace files (.pb/.textproto) without running anything\n\n"
       "--json carries median_abs_pct_error, p90_abs_pct_error, per_kind, kendall_tau, unmatched_ops\n"
       "(the suite also pace_vs_calibration_pct, exchange_pace_vs_calibration_pct,\n"
       "gather_pace_vs_calibration_pct, per_kind_share_pct:\n"
       "each kind's median share of a plan's measured op time; per_kind_spread_pct: how far the passes\n"
       "spread, per op half the range of its errors, the median over the kind's ops).\n"
       "The executor computes in fp32: the workload's precision must be FP32. Exit 2 on bad input.\n",
       {{"--feedback", "--suite"},
        {"--plan", "--scenario", "--profile", "--ranks", "--steps", "--warmup", "--routing-out", "--trace", "--db",
         "--timeout", "--device", "--cluster", "--out", "--predicted", "--measured", "--threads", "--passes",
         "--pass-gap"}},
       validate},
  };
}

}  // namespace moesim::cli
