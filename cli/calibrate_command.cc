// `moesim calibrate`: measure this machine's ranks through the executor (executor/microbench.h),
// fit a device profile and link parameters (costmodel/calibration.h), and write a cluster that
// describes the ranks as devices plus its profile beside it.
//
// Nothing is written until every measurement and fit has succeeded: both files go to temporary
// names first and are renamed at the end (profile, then cluster), so an interrupted calibration
// leaves the previous files as they were. The store row, when asked for, is one transaction.
#include "cli/calibration_step.h"
#include "cli/cli.pb.h"
#include "cli/commands.h"
#include "cli/executor_runs.h"
#include "cli/launch.h"
#include "common/json.h"
#include "common/progress.h"
#include "common/units.h"
#include "costmodel/calibration.h"
#include "costmodel/collectives.h"
#include "costmodel/compute.h"
#include "costmodel/memory.h"
#include "costmodel/setup.h"
#include "schedule/lowering.h"
#include "executor/microbench.h"
#include "topologies/cluster.h"
#include "traces/recorder.h"
#include "traces/store.h"
#include "traces/validation.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/text_format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iostream>
#include <limits>
#include <map>
#include <set>
#include <thread>

namespace moesim::cli {
namespace {

namespace fs = std::filesystem;

// "host (CPU model)": what several machines' profiles in one store are told apart by.
std::string machine_description(const std::string& device) {
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  std::string model;
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  return fmt::format("{} ({}{}{})", host, model.empty() ? "unknown CPU" : model, device.empty() ? "" : ", ", device);
}

double host_memory_bytes() {
  return static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
}

// Several nodes: `nodes` of ranks / nodes devices, a NIC per device on one switch, the network's
// bandwidth per rank and its latency between two ranks (half on each NIC).
struct Network {
  int nodes = 1;
  double Bps = 0, latency_s = 0;
  cost::LinkRendezvous rendezvous;
};

// A cluster's rendezvous field (hardware.proto Rendezvous), empty without a step.
std::string rendezvous_text(const char* field, const cost::LinkRendezvous& r) {
  if (!(r.eager_limit_bytes > 0)) return "";
  return fmt::format("{} {{ eager_limit_bytes: {:.6g} latency_s: {:.6g} }}  # messages over the limit wait for a "
                     "handshake\n",
                     field, r.eager_limit_bytes, r.latency_s);
}

// The cluster text: one node of `ranks` devices joined by a switch (processes on one host exchange
// through shared memory, whose copies share one bandwidth both ways: `half_duplex`; on GPUs,
// NVLink or PCIe as NCCL finds it), PCIe slower than the switch so that routes between ranks take
// the switch; or, with a `network`, its nodes of ranks / nodes devices each.
struct ClusterText {
  std::string name, device;
  bool half_duplex = false;
  std::string operator()(const std::string& description, int ranks, double link_Bps, double link_latency_s,
                         double all_reduce_efficiency = 1, const Network& network = {},
                         const cost::LinkRendezvous& rendezvous = {}, double all_gather_latency_s = 0) const;
};

std::string ClusterText::operator()(const std::string& description, int ranks, double link_Bps, double link_latency_s,
                                    double all_reduce_efficiency, const Network& network,
                                    const cost::LinkRendezvous& rendezvous, double all_gather_latency_s) const {
  const int per_node = ranks / std::max(1, network.nodes);
  // Between nodes a rank's traffic takes PCIe to its NIC: PCIe carries the NIC's bandwidth four
  // times over, but at most 1.5x the switch's, so that routes within a node take the switch (two
  // links) rather than PCIe (four, through the root complex: topologies/routing.h's cost).
  const double pcie_Bps = network.nodes > 1 ? (per_node > 1 ? std::min(4 * network.Bps, 1.5 * link_Bps) : 4 * network.Bps)
                                            : link_Bps / 10;
  const std::string nic =
      network.nodes > 1 ? fmt::format("  nic {{ count: {} bandwidth_Bps: {:.6g} latency_s: {:.6g} }}  # the network, "
                                      "per rank\n",
                                      per_node, network.Bps, network.latency_s / 2)
                        : "";
  const std::string pcie =
      network.nodes > 1
          ? fmt::format("  pcie {{ device_bandwidth_Bps: {:.6g} latency_s: 0 }}  # to the NICs, under the switch\n", pcie_Bps)
          : fmt::format("  pcie {{ device_bandwidth_Bps: {:.6g} latency_s: 1e-4 }}  # not a path between ranks: kept "
                        "slower\n",
                        pcie_Bps);
  const std::string fabric = network.nodes > 1 ? "fabric { single_switch { link_latency_s: 0 } }\n" : "";
  std::string efficiency;
  if (all_reduce_efficiency != 1)
    efficiency += fmt::format("collective_efficiency {{ op: \"all_reduce\" bandwidth_efficiency: {:.6g} }}  # against "
                              "the all-to-all's link bandwidth\n",
                              all_reduce_efficiency);
  if (all_gather_latency_s > 0)
    efficiency += fmt::format("collective_efficiency {{ op: \"all_gather\" bandwidth_efficiency: 1 latency_s: {:.6g} "
                              "}}  # a call's fixed cost below the eager limit, over the link's\n",
                              all_gather_latency_s);
  return efficiency + rendezvous_text("rendezvous", rendezvous) +
         rendezvous_text("network_rendezvous", network.nodes > 1 ? network.rendezvous : cost::LinkRendezvous{}) +
         fmt::format(
      "name: \"{}\"\n"
      "description: \"{}\"\n"
      "nodes: {}\n"
      "node {{\n"
      "  name: \"{}-node\"\n"
      "  device {{ {} }}\n"
      "  devices_per_node: {}\n"
      "  intra_fabric: NVSWITCH  # ranks exchange through shared memory (CPU) or NVLink/PCIe (GPU): one switch\n"
      "  scaleup_bandwidth_Bps: {:.6g}\n"
      "  scaleup_latency_s: {:.6g}\n{}{}{}"
      "}}\n{}",
      name, description, std::max(1, network.nodes), name, device, per_node, link_Bps, link_latency_s,
      half_duplex ? "  scaleup_half_duplex: true  # one copy bandwidth for both directions\n" : "", pcie, nic, fabric);
}

std::string device_text(const std::string& name, double peak, double memory_bytes, double bandwidth, double launch_s) {
  return fmt::format(
      "name: \"{}\" peak_flops_per_s {{ fp32: {:.6g} }} memory_bytes: {:.6g} memory_bandwidth_Bps: {:.6g} "
      "kernel_launch_overhead_s: {:.6g}",
      name, peak, memory_bytes, bandwidth, launch_s);
}

// Median and max of |model - measured| / measured over the samples.
FitResiduals residuals_of(const std::vector<double>& pct) {
  const trace::ErrorStats e = trace::error_stats(pct);
  FitResiduals r;
  r.set_samples(e.count);
  r.set_median_abs_pct(e.median_abs_pct);
  r.set_max_abs_pct(e.max_abs_pct);
  return r;
}

// |model - measured| / measured through the written profile, per sample; each sample also as a
// CSV line (family, flops, bytes, measured, model) when `csv` is given.
std::vector<double> kernel_residuals(const cost::DeviceProfile& p, cost::OpKind kind, const char* family,
                                     const std::vector<cost::KernelSample>& samples, std::string* csv,
                                     bool backward = false) {
  std::vector<double> out;
  for (const cost::KernelSample& s : samples) {
    cost::Op op;
    op.name = "sample";
    op.kind = kind;
    op.flops = s.flops;
    op.bytes = s.bytes;
    op.backward = backward;
    op.groups = static_cast<int64_t>(std::max(1.0, s.groups));
    const double t = cost::op_time(p, op, cost::DType::kFp32).time_s;
    out.push_back(std::fabs(t - s.seconds) / s.seconds * 100);
    if (csv) *csv += fmt::format("{},{:.6g},{:.6g},{:.6g},{:.6g}\n", family, s.flops, s.bytes, s.seconds, t);
  }
  return out;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  f.close();
  if (!f) throw UsageError(fmt::format("{}: cannot write", path));
}

// The cost model's times for an attention sublayer as the executor runs it (LayerNorm, QKV
// projection, causal core, output projection: costmodel/model.cc's attention block).
struct SublayerTimes {
  double core_flops = 0, core_scores = 0, core_groups = 0;
  double other_fwd_s = 0, other_bwd_s = 0;  // everything but the core
  double fwd_s = 0, bwd_s = 0;              // with the core
};

SublayerTimes attention_sublayer(const cost::DeviceProfile& p, const exec::AttentionSample& a) {
  // The cost model's own kernels for the sublayer: a one-layer transformer of the sample's shape.
  model::Model m;
  model::Transformer* t = m.mutable_transformer();
  t->set_layers(1);
  t->set_hidden(static_cast<int>(a.d_model));
  t->set_heads(static_cast<int>(a.heads));
  t->set_ffn_hidden(static_cast<int>(4 * a.d_model));
  t->set_activation(model::GELU);
  t->set_norm(model::LAYER_NORM);
  t->set_bias(true);
  t->set_vocab(2);
  t->set_max_sequence(static_cast<int>(a.sequence));
  cost::ModelOptions mo;
  mo.tokens = static_cast<double>(a.batch * a.sequence);
  mo.act_elem_bytes = 4;
  const cost::ModelCost mc = cost::analyze(m, mo);
  SublayerTimes out;
  for (const cost::Layer& layer : mc.layers)
    for (const cost::Op& op : layer.ops) {
      if (op.name.rfind("L0.attn.", 0) != 0) continue;
      const bool core = op.kind == cost::OpKind::kAttention;
      if (core) {
        out.core_flops = op.flops;
        out.core_scores = op.softmax_elements;
        out.core_groups = static_cast<double>(op.groups);
      }
      double fwd = cost::op_time(p, op, cost::DType::kFp32).time_s, bwd = 0;
      for (const cost::Op& b : cost::backward_ops(op)) bwd += cost::op_time(p, b, cost::DType::kFp32).time_s;
      out.fwd_s += fwd;
      out.bwd_s += bwd;
      if (!core) {
        out.other_fwd_s += fwd;
        out.other_bwd_s += bwd;
      }
    }
  return out;
}

// Kernel kinds with an in-situ factor, as the cost model and the profile name them.
constexpr std::pair<cost::OpKind, profile::OpKind> kInSituKinds[] = {
    {cost::OpKind::kGemm, profile::GEMM},
    {cost::OpKind::kGroupedGemm, profile::GROUPED_GEMM},
    {cost::OpKind::kAttention, profile::ATTENTION},
    {cost::OpKind::kNorm, profile::NORM},
    {cost::OpKind::kElementwise, profile::ELEMENTWISE},
    {cost::OpKind::kOptimizer, profile::OPTIMIZER}};

// `spec`'s in-situ factors replaced: kernels(kind) for every kind of kInSituKinds, `gathers` for
// the row gathers (EMBEDDING).
void set_in_situ(profile::DeviceProfile& spec, const std::function<double(cost::OpKind)>& kernels, double gathers) {
  spec.clear_in_situ();
  auto add = [&](profile::OpKind op, double factor) {
    profile::InSituFactor* f = spec.add_in_situ();
    f->set_op(op);
    f->set_time_factor(factor);
  };
  for (const auto& [kind, pkind] : kInSituKinds) add(pkind, kernels(kind));
  add(profile::EMBEDDING, gathers);
}

// Points (bytes, factor) appended to a profile's curve by bytes: those measured (a factor > 0),
// sorted by bytes, the first of equal bytes (the curve's bytes must increase).
void add_bytes_factors(google::protobuf::RepeatedPtrField<profile::BytesFactor>* curve,
                       std::vector<std::pair<double, double>> points) {
  std::sort(points.begin(), points.end());
  for (auto [bytes, factor] : points) {
    bytes = std::max(bytes, 1.0);
    if (!(factor > 0) || (!curve->empty() && !(bytes > curve->rbegin()->bytes()))) continue;
    profile::BytesFactor* p = curve->Add();
    p->set_bytes(bytes);
    p->set_time_factor(factor);
  }
}

// A collective as measured: all-to-all (direct) or all-reduce (ring) of nccl-tests' size S.
struct CollectiveSample {
  cost::CollectiveOp op = cost::CollectiveOp::kAllToAll;
  double bytes = 0;
  double seconds = 0;
};

struct InSitu {
  cost::InSituFit fit;  // the factor for every kind of kInSituKinds, the per-op overhead, the host terms
  // The fitted compute ops of the slowest rank: their ids, measured times and times through the fit.
  std::vector<std::string> op_ids;
  std::vector<std::string> kinds;  // each op's kind as validation names it (trace::op_kind_label)
  std::vector<bool> backward;
  std::vector<double> measured_s, model_s;
  // The fit's inputs (cost::fit_in_situ), so that it can be fitted again.
  std::vector<double> scaled, fixed;
  cost::InSituTerms terms;
  cost::InSituHost host;
  double step_s = 0;               // the mean quiet step
  // The step over its ops' usual times: step_s over the largest sum, over the ranks, of a rank's
  // ops' medians (as validation measures them; a collective's the last arrival's).
  double spread = 1;
  double measured_sum_s = 0, predicted_sum_s = 0;  // over the fitted compute ops
  // The step's collectives: per op, as validation measures it (trace::median_op_times); its
  // routes' all-gathers apart (compared with the fitted link, not fitted to).
  std::vector<CollectiveSample> collectives, routes;
  double working_set_bytes = 0;  // the largest rank's (cost::working_set_bytes)
  double gather_bytes = 0;       // the median bytes of its forward row gathers (EMBEDDING kernels)

  // The fit and each op's time through it, the per-op overhead at most `max_op_overhead_s`.
  void refit(double max_op_overhead_s = std::numeric_limits<double>::infinity()) {
    fit = cost::fit_in_situ(scaled, fixed, measured_s, terms, host, max_op_overhead_s);
    reprice();
  }
  // Each op's time through `fit` as it stands.
  void reprice() {
    model_s.clear();
    for (size_t j = 0; j < measured_s.size(); ++j) model_s.push_back(fit.time_s(scaled[j], fixed[j], terms, j));
  }
  // Whether op j is mostly row gathers: at least half its predicted time (before the fit).
  bool mostly_gathers(size_t j) const {
    const double base = fixed[j] + scaled[j];
    const double gathers = cost::at_or_zero(terms.gather, j) + cost::at_or_zero(terms.gather_backward, j);
    return base > 0 && gathers >= 0.5 * base;
  }
  // Measured over predicted (before the fit) for the ops that are mostly row gathers, as
  // measured_sum_s / predicted_sum_s for all of them; 0 without such ops.
  double gather_ratio() const {
    double measured = 0, predicted = 0;
    for (size_t j = 0; j < measured_s.size(); ++j) {
      if (!mostly_gathers(j)) continue;
      measured += measured_s[j];
      predicted += fixed[j] + scaled[j];
    }
    return predicted > 0 ? measured / predicted : 0;
  }
};

// The per-op overhead bound from one step at two token counts (cost::op_overhead_intercept) over
// the ops `big` holds mostly row gathers of (their time is linear in the tokens) and `small` holds
// too; infinity without such ops.
double overhead_intercept(const InSitu& small, int small_sequences, const InSitu& big, int big_sequences) {
  std::map<std::string, double> small_s;
  for (size_t j = 0; j < small.op_ids.size(); ++j) small_s[small.op_ids[j]] = small.measured_s[j];
  std::vector<std::pair<double, double>> times;
  for (size_t j = 0; j < big.op_ids.size(); ++j) {
    auto it = small_s.find(big.op_ids[j]);
    if (big.mostly_gathers(j) && it != small_s.end()) times.emplace_back(it->second, big.measured_s[j]);
  }
  return cost::op_overhead_intercept(times, small_sequences, big_sequences);
}

// The median bytes of a setup's forward row gathers, sized for its micro-batch as the lowering
// sizes them (the point at which a step's gather factor is read: profile gather_in_situ).
double median_gather_bytes(const cost::Setup& setup) {
  cost::ModelOptions mo;
  mo.sequence = setup.layout.sequence;
  mo.tokens = static_cast<double>(setup.layout.micro_batch) * setup.layout.sequence;
  mo.act_elem_bytes = cost::activation_bytes(*setup.workload);
  std::vector<double> bytes;
  for (const cost::Layer& layer : cost::analyze(*setup.model, mo).layers)
    for (const cost::Op& op : layer.ops)
      if (op.kind == cost::OpKind::kEmbedding && op.bytes > 0) bytes.push_back(op.bytes);
  return bytes.empty() ? 0 : trace::quantile(bytes, 0.5);
}

// The calibration step (cli/calibration_step.h; `layers` and `sequences` per rank: the step 3 and
// 8, its MoE layer alone 1) trained for 48 steps on every rank with the Schedule lowered under
// `spec`; on
// rank 0, each compute op's measured time (median over the quiet half of steps 10..47, as validation)
// against its predicted time split per kernel kind (each kind's share found by lowering again with
// that kind's factor at 2), then one factor for all kinds by cost::fit_in_situ_factor (see below).
// Collective on `world`.
InSitu fit_in_situ(const profile::DeviceProfile& spec, const std::string& cluster, int ranks, exec::Comm* world,
                   exec::Comm* host_world, exec::Backend& backend, int layers = 3, int sequences = 8) {
  const cost::Setup setup =
      cost::load_setup(cost::ConfigSource{"calibration-cluster", cluster},
                       cost::ConfigSource{"calibration-model", calibration_model_text(ranks, layers)},
                       cost::ConfigSource{"calibration-workload", calibration_workload_text(ranks, sequences)},
                       cost::ConfigSource{"calibration-strategy", calibration_strategy_text(ranks)});
  auto lower_with = [&](const profile::DeviceProfile& sp) {
    const cost::DeviceProfile p = cost::DeviceProfile::from_spec(sp, "calibration profile");
    schedule::LoweringOptions lo;
    lo.fold = schedule::Fold::kNever;
    lo.profile = &p;
    return schedule::lower(setup, lo);
  };
  const schedule::Schedule base = lower_with(spec);
  exec::TrainOptions o;
  o.model = *setup.model;
  apply_strategy(*setup.strategy, "calibration", ranks, o);
  o.batch = sequences * ranks;
  o.sequence = 48;
  o.steps = 48;
  o.schedule = std::make_shared<schedule::Schedule>(base);
  const exec::TrainResult run = exec::train(o, world, backend);
  const trace::Trace measured = gather_traces(run.trace, host_world);
  InSitu out;
  if (world && world->rank() != 0) return out;
  for (const cost::RankMemory& m : cost::estimate_memory(setup).ranks)
    out.working_set_bytes = std::max(out.working_set_bytes, cost::working_set_bytes(m));
  out.gather_bytes = median_gather_bytes(setup);
  // Measured as validation measures (traces/validation.h): medians over the quiet half of the steps
  // after the warm-up (kWarmupSteps), a collective by its last arrival's span.
  const std::map<int, double> step_time = trace::step_times(measured, trace::kWarmupSteps);
  const std::set<int> quiet = trace::quiet_steps(step_time, trace::kQuietShare);
  for (int step : quiet) out.step_s += step_time.at(step) / static_cast<double>(quiet.size());
  const std::map<std::pair<std::string, int>, double> times = trace::median_op_times(measured, quiet);
  std::map<int, double> rank_sum_s;
  for (const auto& [key, seconds] : times) rank_sum_s[key.second] += seconds;
  double ops_s = 0;
  for (const auto& [rank, seconds] : rank_sum_s) ops_s = std::max(ops_s, seconds);
  if (ops_s > 0) out.spread = out.step_s / ops_s;
  const std::map<std::pair<std::string, int>, trace::HostRouting> host_times = trace::median_host_routing(measured, quiet);
  // The kernels' factors (every kind of kInSituKinds, then the gathers') times these: an op's
  // time grows by exactly the part a doubled factor scales.
  const cost::DeviceProfile given = cost::DeviceProfile::from_spec(spec, "calibration profile");
  auto with_factors = [&](double kernels, double gathers) {
    profile::DeviceProfile s = spec;
    set_in_situ(s, [&](cost::OpKind kind) { return kernels * given.in_situ_time_factor(kind); },
                gathers * given.in_situ_time_factor(cost::OpKind::kEmbedding));
    return lower_with(s);
  };
  const schedule::Schedule doubled = with_factors(2, 1), gathers_doubled = with_factors(1, 2);
  // And the backward gathers' part of that: their backward factor doubled.
  profile::DeviceProfile backward_gathers_spec = spec;
  profile::BackwardFactor* gather_backward = nullptr;
  for (profile::BackwardFactor& f : *backward_gathers_spec.mutable_backward())
    if (f.op() == profile::EMBEDDING) gather_backward = &f;
  if (!gather_backward) {
    gather_backward = backward_gathers_spec.add_backward();
    gather_backward->set_op(profile::EMBEDDING);
    gather_backward->set_time_factor(1);
  }
  gather_backward->set_time_factor(2 * gather_backward->time_factor());
  const schedule::Schedule backward_gathers_doubled = lower_with(backward_gathers_spec);
  // And the lookups' backwards among those: their own factor (scatter_add_footprint, flat) at 1
  // and at 2.
  auto with_scatter_add = [&](double factor) {
    profile::DeviceProfile s = spec;
    s.clear_scatter_add_footprint();
    profile::BytesFactor* p = s.add_scatter_add_footprint();
    p->set_bytes(1);
    p->set_time_factor(factor);
    return lower_with(s);
  };
  const schedule::Schedule scatter_added = with_scatter_add(1), scatter_add_doubled = with_scatter_add(2);
  // Each op's token-choices per host term: its time grows by them times a probe added to the
  // term's time per choice.
  constexpr double kProbe_s = 1e-6;
  profile::DeviceProfile routed_spec = spec, dispatched_spec = spec, backward_spec = spec;
  routed_spec.set_routing_choice_s(spec.routing_choice_s() + kProbe_s);
  dispatched_spec.set_dispatch_choice_s(spec.dispatch_choice_s() + kProbe_s);
  backward_spec.set_routing_backward_choice_s(spec.routing_backward_choice_s() + kProbe_s);
  const schedule::Schedule routed = lower_with(routed_spec), dispatched = lower_with(dispatched_spec),
                           routed_backward = lower_with(backward_spec);
  // The slowest rank, as the microbenchmarks take it: the most measured time against predicted
  // over its compute ops.
  int slowest = 0;
  double worst = 0;
  for (int r = 0; r < base.ranks_size(); ++r) {
    double m = 0, p = 0;
    for (const schedule::Op& op : base.ranks(r).ops()) {
      auto it = times.find({op.id(), base.ranks(r).rank()});
      if (op.collective() != 0 || op.duration_s() <= 0 || it == times.end()) continue;
      m += it->second;
      p += op.duration_s();
    }
    if (p > 0 && m / p > worst) {
      worst = m / p;
      slowest = r;
    }
  }
  // Per compute op of that rank: the part the factor scales (its kernels' roofline time), the
  // fixed part (launches), its token-choices per host term and the measured time.
  std::vector<double> scaled, fixed, measured_s;
  cost::InSituTerms terms;
  cost::InSituHost host;
  for (int i = 0; i < base.ranks(slowest).ops_size(); ++i) {
    const schedule::Op& op = base.ranks(slowest).ops(i);
    auto it = times.find({op.id(), base.ranks(slowest).rank()});
    if (op.collective() != 0 || op.duration_s() <= 0 || it == times.end()) continue;
    scaled.push_back(doubled.ranks(slowest).ops(i).duration_s() - op.duration_s());
    fixed.push_back(std::max(op.duration_s() - scaled.back(), 0.0));
    auto probed = [&](const schedule::Schedule& s) {
      return std::max(s.ranks(slowest).ops(i).duration_s() - op.duration_s(), 0.0) / kProbe_s;
    };
    terms.gate.push_back(probed(routed));
    terms.dispatch.push_back(probed(dispatched));
    terms.gate_backward.push_back(probed(routed_backward));
    const double gathers = std::max(gathers_doubled.ranks(slowest).ops(i).duration_s() - op.duration_s(), 0.0);
    terms.gather_backward.push_back(
        std::min(std::max(backward_gathers_doubled.ranks(slowest).ops(i).duration_s() - op.duration_s(), 0.0), gathers));
    terms.gather.push_back(gathers - terms.gather_backward.back());
    const double scatter_add =
        scatter_add_doubled.ranks(slowest).ops(i).duration_s() - scatter_added.ranks(slowest).ops(i).duration_s();
    terms.scatter_add.push_back(std::min(std::max(scatter_add, 0.0), terms.gather_backward.back()));
    const auto h = host_times.find({op.id(), base.ranks(slowest).rank()});
    host.routing_s.push_back(h == host_times.end() ? 0 : h->second.routing_s);
    host.dispatch_s.push_back(h == host_times.end() ? 0 : h->second.dispatch_s);
    measured_s.push_back(it->second);
    out.op_ids.push_back(op.id());
    out.kinds.push_back(trace::op_kind_label(op.name()));
    out.backward.push_back(op.backward());
    out.measured_sum_s += it->second;
    out.predicted_sum_s += op.duration_s();
  }
  for (const schedule::Op& op : base.ranks(0).ops()) {
    auto it = times.find({op.id(), base.ranks(0).rank()});
    if (op.collective() == 0 || it == times.end()) continue;
    const schedule::Collective& c = base.collectives(op.collective() - 1);
    if (c.op() == schedule::Collective::ALL_GATHER) {
      out.routes.push_back({cost::CollectiveOp::kAllGather, op.bytes(), it->second});
      continue;
    }
    const bool a2a = c.op() == schedule::Collective::ALL_TO_ALL || c.op() == schedule::Collective::ALL_TO_ALL_V;
    if (!a2a && c.op() != schedule::Collective::ALL_REDUCE) continue;
    out.collectives.push_back({a2a ? cost::CollectiveOp::kAllToAll : cost::CollectiveOp::kAllReduce, op.bytes(), it->second});
  }
  // One factor for every kernel kind: the ops mix kinds in fixed proportions (an expert FFN is
  // always its GEMMs and its activation; attention always its norm and projections), so per-kind
  // factors would trade off against each other and follow the noise (each kind of op gets its own
  // factor on top, from its own ops: cost::fit_op_kind_factors). The per-op overhead is told apart
  // by the ops' sizes (an embedding lookup against an attention sublayer); the routing's host
  // terms are measured inside their ops (gates forward and backward, permutations; with one rank
  // the gate holds the dispatch's decision, measured apart all the same).
  out.measured_s = std::move(measured_s);
  out.scaled = std::move(scaled);
  out.fixed = std::move(fixed);
  out.terms = std::move(terms);
  out.host = std::move(host);
  out.refit();
  return out;
}

// A step's routing host seconds (gates, their backwards, dispatch decisions) at `fit`'s rates per
// token-choice, over `terms`' choices.
double routing_host_s(const cost::InSituFit& fit, const cost::InSituTerms& terms) {
  double s = 0;
  for (double n : terms.gate) s += n * fit.routing_choice_s;
  for (double n : terms.gate_backward) s += n * fit.routing_backward_choice_s;
  for (double n : terms.dispatch) s += n * fit.dispatch_choice_s;
  return s;
}

struct InSituRounds {
  InSitu busy;              // the round whose measured-to-predicted ratio is the median
  double alone_factor = 0;  // a rank alone against all busy, the median over the rounds; 0: not measured
  double alone_spread = 0;  // the step's spread (InSitu::spread) run alone, the median; 0: not measured
  double alone_gather_factor = 0;  // the same for the ops that are mostly row gathers
  // The step's MoE layer alone (calibration_model_text with 1 layer), every round's collectives:
  // the same exchanges in a smaller working set. Several ranks only.
  std::vector<CollectiveSample> layer_collectives;
  double layer_working_set_bytes = 0;
  // Each round's median all-to-all in that layer alone, in round order: how far the machine's pace
  // for exchanges moved over the calibration (docs/VALIDATION.md, "The machine's paces").
  std::vector<double> layer_exchange_s;
  // Every round's routes (all-gathers) of the step and of both MoE layers alone.
  std::vector<CollectiveSample> routes;
  // Its routing's host time at its own per-choice rates against the step's (the same round's), the
  // median over the rounds: the host terms' factor at its working set. 0: not measured.
  double layer_host_factor = 0;
  // That layer at half the tokens: its gathers' factor (the median over the rounds) at their
  // bytes, and every round's collectives (an even smaller working set; several ranks only). The
  // per-op overhead of every fit is at most what its gathers and the same layer's at a quarter of
  // its tokens give at no tokens (overhead_intercept; the step's final fit: the median over the
  // rounds): a step's fit alone put it at 1-3 us one round in five on the development VM, and at
  // 9-11 us on the third host, and every small op of the suite was priced that much over.
  double half_gather_factor = 0, half_gather_bytes = 0;
  std::vector<CollectiveSample> half_collectives;
  double half_working_set_bytes = 0;
  double layer_gather_factor = 0;  // the MoE layer alone's gathers' factor (median over the rounds)
  // The lookups' backwards' factor (cost::InSituFit::scatter_add_factor) of the layer at half the
  // tokens and of the layer (several ranks), each the median over the rounds.
  double half_scatter_add_factor = 0, layer_scatter_add_factor = 0;
  // Each kind of op's factor (cost::fit_op_kind_factors) in that layer at half the tokens, the
  // median over the rounds: a kind whose factor there is not the step's follows its size.
  std::map<std::pair<std::string, bool>, double> half_kind_factors;
};

// A kind of op's factor in the MoE layer at half the tokens further than this from the step's
// (relative) follows the op's size: not written (cost::fit_op_kind_factors).
constexpr double kSameKindPace = 0.1;

// Rounds' exchanges further apart than this (the upper over the lower quartile of the rounds'
// medians) are reported as the machine's pace moving during the calibration (this VM's levels
// are 1.5x apart).
constexpr double kSteadyRounds = 1.25;

// The calibration step in `rounds` rounds, each begun `period_s` after the one before: the VM's
// pace for memory-bound ops and exchanges moves between levels 1.5x apart that last 5-60 s (the
// calibration step's all-to-alls, run every 1.5 s for two and a half minutes: 24-50 us, quartiles
// 30 and 36; docs/VALIDATION.md), so the rounds span about a minute to draw on several of them;
// the fit is the round whose measured-to-predicted ratio is the median. With several CPU
// ranks each round then runs the step on rank 0 alone, while the other ranks sleep through it (an
// MPI wait would spin a core), and the alone factor is the median over the rounds of the alone
// ratio against the same round's busy one: pairs a few seconds apart, so that the VM's drift over
// the calibration cancels (with three rounds, one slowed busy run and one quick alone run in
// another round once gave 0.83 against the usual 0.96-0.99); the alone gather factor the same over
// the ops that are mostly row gathers (InSitu::gather_ratio). The collectives are every round's.
// Each round also runs the step's MoE layer at half the tokens and (several ranks) at the step's
// tokens: InSituRounds. Collective like fit_in_situ; on other ranks than 0 an empty result.
InSituRounds in_situ_rounds(const profile::DeviceProfile& spec, const std::string& cluster,
                            const std::string& alone_cluster, int ranks, exec::Comm* world, exec::Comm* host_world,
                            exec::Backend& backend, int rounds, double period_s) {
  auto ratio = [](const InSitu& r) { return r.predicted_sum_s > 0 ? r.measured_sum_s / r.predicted_sum_s : 0.0; };
  const bool root = world == nullptr || world->rank() == 0;
  InSituRounds out;
  std::vector<InSitu> busy;
  std::vector<double> half_gathers, overheads, layer_hosts, layer_gathers, half_scatters, layer_scatters;
  std::map<std::pair<std::string, bool>, std::vector<double>> half_kinds;
  std::vector<double> alone, alone_gathers, alone_spreads;
  // Rank 0's seconds on every rank: each waits as long (the ranks' clocks start apart).
  exec::Comm* host = host_world ? host_world : world;
  auto root_s = [&](double seconds) {
    float s = root ? static_cast<float>(seconds) : 0.0f;
    if (host) exec::all_reduce_sum_host(*host, &s, 1);
    return static_cast<double>(s);
  };
  auto next = std::chrono::steady_clock::now();
  for (int i = 0; i < rounds; ++i) {
    if (i > 0) {
      const double left_s = std::chrono::duration<double>(next - std::chrono::steady_clock::now()).count();
      std::this_thread::sleep_for(std::chrono::duration<double>(std::max(root_s(left_s), 1.0)));
    }
    next = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                  std::chrono::duration<double>(period_s));
    busy.push_back(fit_in_situ(spec, cluster, ranks, world, host_world, backend));
    InSitu half = fit_in_situ(spec, cluster, ranks, world, host_world, backend, 1, 4);
    // The per-op overhead: at most what the layer's gathers take at no tokens (its ops at a
    // quarter of those tokens again), in every fit of the round, whose gathers' factors take the rest.
    const double overhead =
        overhead_intercept(fit_in_situ(spec, cluster, ranks, world, host_world, backend, 1, 1), 1, half, 4);
    overheads.push_back(overhead);
    busy.back().refit(overhead);
    half.refit(overhead);
    half_gathers.push_back(half.fit.gather_factor);
    half_scatters.push_back(half.fit.scatter_add_factor);
    for (const auto& [key, factor] : cost::fit_op_kind_factors(half.kinds, half.backward, half.measured_s,
                                                                half.model_s, half.fit.op_overhead_s))
      half_kinds[key].push_back(factor);
    out.half_gather_bytes = half.gather_bytes;
    out.half_working_set_bytes = half.working_set_bytes;
    if (ranks == 1) continue;
    out.half_collectives.insert(out.half_collectives.end(), half.collectives.begin(), half.collectives.end());
    InSitu layer = fit_in_situ(spec, cluster, ranks, world, host_world, backend, 1);
    layer.refit(overhead);
    out.layer_collectives.insert(out.layer_collectives.end(), layer.collectives.begin(), layer.collectives.end());
    std::vector<double> exchanges;
    for (const CollectiveSample& c : layer.collectives)
      if (c.op == cost::CollectiveOp::kAllToAll) exchanges.push_back(c.seconds);
    if (!exchanges.empty()) out.layer_exchange_s.push_back(trace::quantile(exchanges, 0.5));
    for (const InSitu* r : std::initializer_list<const InSitu*>{&busy.back(), &half, &layer})
      out.routes.insert(out.routes.end(), r->routes.begin(), r->routes.end());
    out.layer_working_set_bytes = layer.working_set_bytes;
    layer_gathers.push_back(layer.fit.gather_factor);
    layer_scatters.push_back(layer.fit.scatter_add_factor);
    const double at_step_rates = routing_host_s(busy.back().fit, layer.terms);
    if (root && at_step_rates > 0) layer_hosts.push_back(routing_host_s(layer.fit, layer.terms) / at_step_rates);
    if (backend.device() != exec::Device::kCpu) continue;
    const double wait_s = root_s(1.0 + 1.5 * 48 * busy.back().step_s);
    if (root) {
      const InSitu a = fit_in_situ(spec, alone_cluster, 1, nullptr, nullptr, backend);
      if (ratio(a) > 0 && ratio(busy.back()) > 0) alone.push_back(ratio(a) / ratio(busy.back()));
      alone_spreads.push_back(a.spread);
      const double alone_g = a.gather_ratio(), busy_g = busy.back().gather_ratio();
      if (alone_g > 0 && busy_g > 0) alone_gathers.push_back(alone_g / busy_g);
    } else {
      std::this_thread::sleep_for(std::chrono::duration<double>(wait_s));
    }
    host->barrier();
  }
  std::sort(busy.begin(), busy.end(), [&](const InSitu& x, const InSitu& y) { return ratio(x) < ratio(y); });
  out.busy = busy[busy.size() / 2];
  // The exchanges of every round (a step's all-to-alls scatter by 30% from round to round here:
  // one round's would set the link by its moment; fit_link_bandwidth takes their median).
  out.busy.collectives.clear();
  for (const InSitu& b : busy)
    out.busy.collectives.insert(out.busy.collectives.end(), b.collectives.begin(), b.collectives.end());
  if (!alone.empty()) out.alone_factor = trace::quantile(alone, 0.5);
  if (!alone_spreads.empty()) out.alone_spread = trace::quantile(alone_spreads, 0.5);
  if (!alone_gathers.empty()) out.alone_gather_factor = std::clamp(trace::quantile(alone_gathers, 0.5), 0.1, 10.0);
  if (root) {
    out.half_gather_factor = trace::quantile(half_gathers, 0.5);
    if (!layer_hosts.empty()) out.layer_host_factor = trace::quantile(layer_hosts, 0.5);
    if (!layer_gathers.empty()) out.layer_gather_factor = trace::quantile(layer_gathers, 0.5);
    out.half_scatter_add_factor = trace::quantile(half_scatters, 0.5);
    for (const auto& [key, factors] : half_kinds) out.half_kind_factors[key] = trace::quantile(factors, 0.5);
    if (!layer_scatters.empty()) out.layer_scatter_add_factor = trace::quantile(layer_scatters, 0.5);
    out.busy.refit(trace::quantile(overheads, 0.5));
    // The routing's host rates, each the median over the rounds (cost::median_host_rates).
    std::vector<cost::InSituFit> fits;
    for (const InSitu& b : busy) fits.push_back(b.fit);
    cost::median_host_rates(fits, &out.busy.fit);
    out.busy.reprice();
  }
  return out;
}

// "gate fwd" for the gates' forward ops: CalibrateResult.op_kind_factors' keys.
std::string op_kind_key(const std::pair<std::string, bool>& kind) {
  return fmt::format("{} {}", kind.first, kind.second ? "bwd" : "fwd");
}

// "sum" for GATHER_SUM: CalibrateResult.gather_kernel_factors' keys.
std::string gather_kernel_label(profile::GatherKernel k) {
  std::string name = profile::GatherKernel_Name(k).substr(std::string("GATHER_").size());
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  return name;
}

// Each measurement of exec::GatherKernels as the cost model sees it: the bytes cost::gather_op
// gives each of the uses the executor runs the kernels in (a dispatch, a combine, a lookup and
// their backwards), with the dispatch's copy's seconds per byte on its shape.
struct GatherKernelPoint {
  cost::GatherKernel kernel;
  double bytes = 0, seconds = 0, copy_s_per_byte = 0;
  double ratio() const { return seconds / bytes / copy_s_per_byte; }
};
std::vector<GatherKernelPoint> gather_kernel_points(const std::vector<exec::GatherKernels>& samples) {
  using cost::GatherKernel;
  std::vector<GatherKernelPoint> points;
  for (const exec::GatherKernels& g : samples) {
    constexpr double e = 4, k = 2;  // fp32, top-2
    const double T = static_cast<double>(g.tokens), h = static_cast<double>(g.cols), V = static_cast<double>(g.table_rows);
    const cost::Op dispatch = cost::gather_op("dispatch", T * h * e, T * k * h * e, GatherKernel::kCopy, GatherKernel::kSumBackward),
                   combine = cost::gather_op("combine", T * k * h * e, T * h * e, GatherKernel::kSum, GatherKernel::kCombineBackward),
                   lookup = cost::gather_op("lookup", V * h * e, T * h * e, GatherKernel::kLookup, GatherKernel::kScatterAdd);
    auto backward_bytes = [](const cost::Op& op) { return cost::backward_ops(op).front().bytes; };
    const double copy = g.copy_s / dispatch.bytes;
    points.push_back({GatherKernel::kSum, combine.bytes, g.sum_s, copy});
    points.push_back({GatherKernel::kLookup, lookup.bytes, g.lookup_s, copy});
    points.push_back({GatherKernel::kSumBackward, backward_bytes(dispatch), g.sum_backward_s, copy});
    points.push_back({GatherKernel::kCombineBackward, backward_bytes(combine), g.combine_backward_s, copy});
    points.push_back({GatherKernel::kScatterAdd, backward_bytes(lookup), g.scatter_add_s, copy});
  }
  return points;
}

// Each kernel's time per byte against the copy: the median ratio over the shapes, clamped to [0.1, 10].
std::map<cost::GatherKernel, double> gather_kernel_factors(const std::vector<GatherKernelPoint>& points) {
  std::map<cost::GatherKernel, std::vector<double>> ratios;
  for (const GatherKernelPoint& p : points) ratios[p.kernel].push_back(p.ratio());
  std::map<cost::GatherKernel, double> out;
  for (const auto& [kernel, v] : ratios) out[kernel] = std::clamp(trace::quantile(v, 0.5), 0.1, 10.0);
  return out;
}

int calibrate(const Args& a) {
  if (!a.positional().empty()) throw UsageError("calibrate takes no positional arguments");
  if (!a.has("--out")) throw UsageError("give --out FILE: the cluster to write (its profile goes beside it)");
  const bool json = a.flag("--json");
  const std::string out = a.get("--out");
  const fs::path out_dir = fs::absolute(out).parent_path();
  if (!fs::is_directory(out_dir)) throw UsageError(fmt::format("--out {}: folder {} does not exist", out, out_dir.string()));
  const std::string profile_out = profile_beside(out);
  const int ranks = a.get_int("--ranks", 2, 1, 4096);
  const exec::Device device = check_device(a, ranks);
  const std::string name = a.get("--name", fs::path(out).stem().string());
  const double timeout_s = a.get_double("--timeout", 120, 0.1, 86400);
  const Launch launch = launch_ranks(ranks);
  if (launch.relaunched) return launch.exit_code;

  const int threads = threads_per_rank(a, ranks);
  return on_ranks(ranks, threads, timeout_s, device, [&](exec::Comm* world, exec::Comm* host_world, exec::Backend& backend) {
    const auto t0 = std::chrono::steady_clock::now();
    const bool root = !world || world->rank() == 0;
    // The ranks' nodes: with several, the links within a node and the network between nodes are
    // measured apart (below: one link fitted to both classes would describe neither).
    const RankNodes nodes = rank_nodes(host_world);
    const int node_count = static_cast<int>(nodes.ranks_of_node.size());
    const int per_node = ranks / node_count;
    if (std::any_of(nodes.ranks_of_node.begin(), nodes.ranks_of_node.end(), [&](int n) { return n != per_node; })) {
      if (!root) return kExitBadInput;
      throw UsageError(fmt::format("these {} ranks run on {} nodes with {} ranks (rank 0 on {}): calibrate needs as many "
                                   "ranks on every node",
                                   ranks, node_count, fmt::join(nodes.ranks_of_node, " + "), nodes.mine));
    }
    exec::MicrobenchOptions mo;
    mo.quick = a.flag("--quick");
    mo.rounds = mo.quick ? 1 : 6;
    Progress bar("calibrating", 100, root && !json && ::isatty(STDOUT_FILENO) && ::isatty(STDERR_FILENO));
    size_t shown = 0;
    auto progress_to = [&](double f) {
      const size_t now = static_cast<size_t>(f * 100);
      if (now > shown) bar.advance(now - shown);
      shown = std::max(shown, now);
    };
    mo.progress = [&](double f) { progress_to(0.6 * f); };  // the kernels; the in-situ step to 0.85
    // Every rank has the same (the slowest rank's) figures and fits the same profile: all of them
    // run the in-situ calibration step below with it. The kernels first, then that step, then the
    // collectives (below): the gigabytes the collectives' microbenchmarks move through MPI warm
    // its state, and a step's exchanges after them ran 10-15% faster than in the fresh processes
    // of `run` and `validate` (in one process, the step's all-to-alls took 43 and 40.5 us before
    // them and 38 after; `validate`'s 42-48).
    mo.collectives = false;
    const exec::Microbenchmarks m = exec::run_microbenchmarks(backend, world, mo);
    // The calibration step below runs as `moesim run` and `validate` do, in a heap like a fresh
    // process's: on the microbenchmarks' (hundreds of MB of cached blocks) its gates' host work
    // took 1.6x as long (31 us against 19 on the development VM).
    exec::release_cached_cpu_blocks();

    // Kernels.
    const double launch_s = m.launch_s;
    // A GPU's BLAS calls each cost the host a fixed time (costmodel/calibration.h); a CPU's are
    // part of its curves' efficiency.
    const double blas_call_s =
        backend.device() == exec::Device::kCuda ? cost::fit_blas_call_s(m.gemm, m.grouped_gemm, launch_s) : 0;
    std::vector<cost::KernelSample> all_gemms = m.gemm;
    all_gemms.insert(all_gemms.end(), m.grouped_gemm.begin(), m.grouped_gemm.end());
    const double peak = cost::fit_peak_flops(all_gemms, launch_s, blas_call_s);
    const std::vector<cost::KernelSample> gemms = cost::without_blas_calls(m.gemm, blas_call_s),
                                          grouped_gemms = cost::without_blas_calls(m.grouped_gemm, blas_call_s);
    // The device's bandwidth: the fastest streaming kernel; each memory-bound kind its share of it.
    double bandwidth = 0;
    for (const auto* v : {&m.norm, &m.elementwise})
      for (const cost::KernelSample& s : *v) bandwidth = std::max(bandwidth, cost::fit_memory_bandwidth({s}, launch_s));
    const double norm_eff = std::min(1.0, cost::fit_memory_bandwidth(m.norm, launch_s) / bandwidth);
    const double elementwise_eff = std::min(1.0, cost::fit_memory_bandwidth(m.elementwise, launch_s) / bandwidth);
    // Row gathers (the cost model's EMBEDDING kind: lookups, an MoE layer's dispatch and combine),
    // measured out of cache.
    const double gather_eff =
        m.gather.empty() ? elementwise_eff : std::min(1.0, cost::fit_memory_bandwidth(m.gather, launch_s) / bandwidth);
    const std::string device_name = backend.device() == exec::Device::kCpu ? "cpu-rank" : "gpu-rank";
    const double memory = backend.device() == exec::Device::kCpu ? host_memory_bytes() / per_node : host_memory_bytes();
    const ClusterText cluster_text{name, device_text(device_name, peak, memory, bandwidth, launch_s),
                                   backend.device() == exec::Device::kCpu};
    const std::string machine = machine_description(backend.name());
    profile::DeviceProfile spec;
    google::protobuf::TextFormat::ParseFromString(fmt::format("device {{ {} }}", cluster_text.device), &spec);
    spec.set_source(fmt::format("calibrated on {} {}", machine, trace::utc_now_iso8601()));
    spec.set_memory_bandwidth_efficiency(1.0);
    spec.set_kernel_launch_overhead_s(launch_s);
    if (blas_call_s > 0) spec.set_blas_call_s(blas_call_s);
    if (backend.device() == exec::Device::kCpu) spec.set_threads_per_rank(threads);
    for (auto [kind, eff] : {std::pair{profile::NORM, norm_eff}, std::pair{profile::ELEMENTWISE, elementwise_eff},
                             std::pair{profile::EMBEDDING, gather_eff}, std::pair{profile::OPTIMIZER, elementwise_eff}}) {
      profile::MemoryEfficiency* me = spec.add_memory();
      me->set_op(kind);
      me->set_efficiency(eff);
      // Streaming kernels by their size (a step's residual adds are small and find their data in
      // the nearer caches); the optimizer's kernels are few and big: its efficiency is theirs.
      if (kind == profile::ELEMENTWISE)
        add_bytes_factors(me->mutable_by_bytes(), cost::memory_time_factors(m.elementwise, launch_s, bandwidth * eff));
    }
    *spec.add_compute() = cost::fit_efficiency_curve(profile::GEMM, profile::FP32, gemms, peak, launch_s);
    *spec.add_compute() = cost::fit_efficiency_curve(profile::GROUPED_GEMM, profile::FP32, grouped_gemms, peak, launch_s);
    *spec.add_compute() = cost::fit_efficiency_curve(profile::ELEMENTWISE, profile::FP32, m.activation, peak, launch_s);
    *spec.add_compute() = cost::fit_efficiency_curve(profile::OPTIMIZER, profile::FP32, m.optimizer, peak, launch_s);
    auto add_backward = [&](profile::OpKind kind, double factor) {
      profile::BackwardFactor* bf = spec.add_backward();
      bf->set_op(kind);
      bf->set_time_factor(factor);
    };
    {
      const cost::DeviceProfile forward_only = cost::DeviceProfile::from_spec(spec, profile_out);
      add_backward(profile::NORM, cost::fit_backward_factor(forward_only, cost::OpKind::kNorm, m.norm_backward));
      add_backward(profile::ELEMENTWISE,
                   cost::fit_backward_factor(forward_only, cost::OpKind::kElementwise, m.activation_backward));
    }
    // The attention core: each sublayer's time less the model's time for its norm and projections.
    // The forwards give the softmax's time per score and the time per group (two head dims and
    // two sequence lengths tell them from the matmuls), then the curve through what is left; the
    // backwards give the backward factor.
    const cost::DeviceProfile without_core = cost::DeviceProfile::from_spec(spec, profile_out);
    std::vector<cost::KernelSample> core_fwd;
    for (const exec::AttentionSample& a : m.attention) {
      const SublayerTimes t = attention_sublayer(without_core, a);
      core_fwd.push_back(
          {t.core_flops, 0, std::max(a.forward_s - t.other_fwd_s, 0.1 * a.forward_s), t.core_scores, t.core_groups});
    }
    const cost::AttentionCoreFit core = cost::fit_attention_core(core_fwd, launch_s);
    spec.set_softmax_score_s(core.softmax_score_s);
    spec.set_attention_group_s(core.group_s);
    for (cost::KernelSample& s : core_fwd)
      s.seconds =
          std::max(s.seconds - s.softmax_elements * core.softmax_score_s - s.groups * core.group_s, 0.1 * s.seconds);
    *spec.add_compute() = cost::fit_efficiency_curve(profile::ATTENTION, profile::FP32, core_fwd, peak, launch_s);
    const cost::DeviceProfile with_core = cost::DeviceProfile::from_spec(spec, profile_out);
    std::vector<cost::KernelSample> core_bwd;
    for (const exec::AttentionSample& a : m.attention) {
      const SublayerTimes t = attention_sublayer(with_core, a);
      core_bwd.push_back(
          {2.5 * t.core_flops, 0, std::max(a.backward_s - t.other_bwd_s, 0.1 * a.backward_s), t.core_scores,
           t.core_groups});
    }
    add_backward(profile::ATTENTION, cost::fit_backward_factor(with_core, cost::OpKind::kAttention, core_bwd));
    // Each row gather's kernel against the dispatch's copy, per byte (the in-situ fits below then
    // take one factor for the forward gathers and one for the backward ones).
    const std::vector<GatherKernelPoint> kernel_points = gather_kernel_points(m.gather_kernels);
    for (const auto& [kernel, factor] : gather_kernel_factors(kernel_points)) {
      profile::GatherKernelFactor* g = spec.add_gather_kernel();
      g->set_kernel(cost::to_proto(kernel));
      g->set_time_factor(factor);
    }
    // The batch-priority sort: host work, as measured (the in-situ step drops vanilla).
    spec.set_priority_sort_s(cost::fit_priority_sort(m.capacity));
    const cost::DeviceProfile fitted = cost::DeviceProfile::from_spec(spec, profile_out);

    CalibrateResult r;
    r.set_cluster_file(out);
    r.set_profile_file(profile_out);
    r.set_machine(machine);
    r.set_device(backend.name());
    r.set_ranks(ranks);
    r.set_peak_flops(peak);
    r.set_memory_bandwidth_bps(bandwidth);
    r.set_kernel_launch_overhead_s(launch_s);
    r.set_blas_call_s(blas_call_s);
    auto& res = *r.mutable_residuals();
    std::string csv = "family,flops,bytes,measured_s,model_s\n";
    std::string* rows = a.has("--samples") ? &csv : nullptr;
    res["gemm"] = residuals_of(kernel_residuals(fitted, cost::OpKind::kGemm, "gemm", m.gemm, rows));
    res["grouped_gemm"] =
        residuals_of(kernel_residuals(fitted, cost::OpKind::kGroupedGemm, "grouped_gemm", m.grouped_gemm, rows));
    std::vector<double> attention_residuals;
    for (const exec::AttentionSample& a : m.attention) {
      const SublayerTimes t = attention_sublayer(fitted, a);
      attention_residuals.push_back(std::fabs(t.fwd_s - a.forward_s) / a.forward_s * 100);
      attention_residuals.push_back(std::fabs(t.bwd_s - a.backward_s) / a.backward_s * 100);
      if (rows) {
        *rows += fmt::format("attention,{:.6g},0,{:.6g},{:.6g}\n", t.core_flops, a.forward_s, t.fwd_s);
        *rows += fmt::format("attention,{:.6g},0,{:.6g},{:.6g}\n", 2.5 * t.core_flops, a.backward_s, t.bwd_s);
      }
    }
    res["attention"] = residuals_of(attention_residuals);
    std::vector<double> act = kernel_residuals(fitted, cost::OpKind::kElementwise, "activation", m.activation, rows);
    for (double r : kernel_residuals(fitted, cost::OpKind::kElementwise, "activation_backward", m.activation_backward, rows, true))
      act.push_back(r);
    res["activation"] = residuals_of(act);
    std::vector<double> norm = kernel_residuals(fitted, cost::OpKind::kNorm, "norm", m.norm, rows);
    for (double r : kernel_residuals(fitted, cost::OpKind::kNorm, "norm_backward", m.norm_backward, rows, true))
      norm.push_back(r);
    res["norm"] = residuals_of(norm);
    res["optimizer"] = residuals_of(kernel_residuals(fitted, cost::OpKind::kOptimizer, "optimizer", m.optimizer, rows));
    res["elementwise"] =
        residuals_of(kernel_residuals(fitted, cost::OpKind::kElementwise, "elementwise", m.elementwise, rows));
    res["gather"] = residuals_of(kernel_residuals(fitted, cost::OpKind::kEmbedding, "gather", m.gather, rows));
    r.set_priority_sort_s(spec.priority_sort_s());
    for (const profile::GatherKernelFactor& g : spec.gather_kernel())
      (*r.mutable_gather_kernel_factors())[gather_kernel_label(g.kernel())] = g.time_factor();
    std::vector<double> gather_kernel_residuals;
    for (const GatherKernelPoint& p : kernel_points) {
      const double model_s = fitted.gather_kernel_factor(p.kernel) * p.copy_s_per_byte * p.bytes;
      gather_kernel_residuals.push_back(std::fabs(model_s - p.seconds) / p.seconds * 100);
      if (rows)
        *rows += fmt::format("gather_kernel.{},0,{:.6g},{:.6g},{:.6g}\n", gather_kernel_label(cost::to_proto(p.kernel)),
                             p.bytes, p.seconds, model_s);
    }
    res["gather_kernels"] = residuals_of(gather_kernel_residuals);
    std::vector<double> sort_residuals;
    for (const cost::SortSample& c : m.capacity) {
      const double extra = c.batch_priority_s - c.vanilla_s,
                   model = cost::priority_sort_work(c.tokens) * spec.priority_sort_s();
      sort_residuals.push_back(std::fabs(model - extra) / std::max(extra, 1e-12) * 100);
      if (rows)  // the sort's work (n log2 n) in the FLOPs column
        *rows += fmt::format("priority_sort,{:.6g},0,{:.6g},{:.6g}\n", cost::priority_sort_work(c.tokens), extra, model);
    }
    res["priority_sort"] = residuals_of(sort_residuals);

    // Links: the collective model's steps and transfer on a reference cluster of these ranks, then
    // least-squares fits: the link's latency, bandwidth and rendezvous (the step in latency over
    // the library's eager limit) to the all-to-alls, and the all-reduce's
    // bandwidth efficiency against that link (MPI reduces on the host: one link bandwidth cannot
    // fit both); first to the microbenchmarks, then (below) to the calibration step's own
    // collectives.
    double link_Bps = bandwidth, link_latency_s = 1e-6, all_reduce_efficiency = 1, all_gather_latency_s = 0;
    cost::LinkRendezvous link_rendezvous;
    // The samples in the model's linear form: steps and transfer on a reference cluster of
    // `group_size` ranks at 1 GB/s (a network's links are full duplex: `duplex`).
    auto linear = [&](const std::vector<CollectiveSample>& measured, int group_size, bool duplex) {
      ClusterText reference = cluster_text;
      reference.half_duplex = reference.half_duplex && !duplex;
      const topo::Cluster ref = topo::load_cluster_text(reference("", group_size, 1e9, 1e-6), "reference");
      const cost::CollectiveModel model(ref);
      std::vector<cost::LinkSample> samples;
      for (const CollectiveSample& s : measured) {
        const cost::CollectiveCost c = model.cost(s.op, cost::first_ranks(group_size), s.bytes);
        // Each step's messages: S / n (the all-to-all's to each peer, the ring's chunks).
        samples.push_back({static_cast<double>(c.steps), c.transfer_s * 1e9, s.seconds, s.bytes / group_size});
      }
      return samples;
    };
    // A sample's time on the link as fitted, its transfer at `efficiency` of the link's bandwidth.
    // `transfer_factor`: the transfer's in-situ factor at the sample's working set.
    auto link_model_s = [&](const cost::LinkSample& x, double efficiency = 1, double transfer_factor = 1) {
      return x.steps * (cost::kDefaultStepOverhead_s + link_latency_s) +
             link_rendezvous.steps(x) * link_rendezvous.latency_s +
             x.transfer_c * transfer_factor / (link_Bps * efficiency);
    };
    // The samples of a `family` (`measured` in the linear form: `samples`) against the link as it
    // stands: --samples rows and residuals. The all-reduces at their efficiency.
    auto link_rows = [&](const std::vector<CollectiveSample>& measured, const std::vector<cost::LinkSample>& samples,
                         const char* family, double transfer_factor = 1) {
      std::vector<double> residuals;
      for (size_t i = 0; i < samples.size(); ++i) {
        const cost::CollectiveOp op = measured[i].op;
        const double model_s =
            link_model_s(samples[i], op == cost::CollectiveOp::kAllReduce ? all_reduce_efficiency : 1, transfer_factor) +
            (op == cost::CollectiveOp::kAllGather ? all_gather_latency_s : 0);
        residuals.push_back((model_s - samples[i].seconds) / samples[i].seconds * 100);
        csv += fmt::format("{}.{},0,{:.6g},{:.6g},{:.6g}\n", family, cost::op_name(op), measured[i].bytes,
                           samples[i].seconds, model_s);
      }
      res[family] = residuals_of(residuals);
    };
    // `latency_s` < 0: latency and bandwidth; else the bandwidth alone with that latency, fitted to
    // `measured` in its linear form (`samples`). With a `family`, its rows against the fit.
    auto fit_links = [&](const std::vector<CollectiveSample>& measured, const std::vector<cost::LinkSample>& samples,
                         const char* family, double latency_s) {
      std::vector<cost::LinkSample> a2a, all_reduce;
      for (size_t i = 0; i < samples.size(); ++i)
        (measured[i].op == cost::CollectiveOp::kAllToAll ? a2a : all_reduce).push_back(samples[i]);
      // In a step (latency given): one size a run, drawn over the rounds: their median.
      const cost::Pooling pooling = latency_s < 0 ? cost::Pooling::kLeastSquares : cost::Pooling::kMedian;
      if (!a2a.empty()) {
        const cost::LinkFit fit =
            latency_s < 0
                ? cost::fit_link(a2a, cost::kDefaultStepOverhead_s, link_Bps)
                : cost::fit_link_bandwidth(a2a, cost::kDefaultStepOverhead_s, latency_s, link_rendezvous, pooling);
        link_Bps = fit.bandwidth_Bps;
        link_latency_s = fit.latency_s;
        link_rendezvous = fit.rendezvous;
      }
      if (!all_reduce.empty())
        // Within what a cluster's collective_efficiency allows (a --quick calibration's few exchanges
        // once put it at 12.9).
        all_reduce_efficiency = std::clamp(
            cost::fit_link_bandwidth(all_reduce, cost::kDefaultStepOverhead_s, link_latency_s, link_rendezvous, pooling)
                    .bandwidth_Bps /
                link_Bps,
            0.01, 10.0);
      if (family) link_rows(measured, samples, family);
    };
    // In situ: a calibration step of a small MoE transformer (not a model the validation suite
    // runs) through the executor, its compute ops against the profile's predictions, one time
    // factor per kernel kind. Its cluster's links are placeholders (the links are fitted below, and
    // the in-situ fit reads the compute ops alone).
    const InSituRounds rounds = in_situ_rounds(spec, cluster_text("calibration", ranks, link_Bps, link_latency_s),
                                               cluster_text("calibration", 1, link_Bps, link_latency_s), ranks, world,
                                               host_world, backend, mo.quick ? 5 : 9, mo.quick ? 0 : 6);
    progress_to(0.85);
    // The collectives' microbenchmarks, and the links fitted to them: with several nodes, first
    // across the nodes (every local index's group at once, as a step's exchanges load every NIC),
    // then within them (every node's group at once).
    Network network;
    if (ranks > 1) {
      auto measure = [&](exec::Comm* group, const char* family, bool duplex, double from, double to) {
        exec::MicrobenchOptions co = mo;
        co.kernels = false;
        co.collectives = true;
        co.progress = [&](double f) { progress_to(from + (to - from) * f); };
        const exec::Microbenchmarks c = exec::run_microbenchmarks(backend, group, co);
        std::vector<CollectiveSample> measured;
        for (const exec::CommSample& s : c.all_to_all) measured.push_back({cost::CollectiveOp::kAllToAll, s.bytes, s.seconds});
        for (const exec::CommSample& s : c.all_reduce) measured.push_back({cost::CollectiveOp::kAllReduce, s.bytes, s.seconds});
        fit_links(measured, linear(measured, group->size(), duplex), family, -1);
      };
      if (node_count == 1) {
        measure(world, "collectives", false, 0.85, 1.0);
      } else {  // groups of the ranks of one local index across the nodes, then of each node's ranks
        const int rank = world->rank(), node = nodes.node_of_rank[static_cast<size_t>(rank)];
        const int local = static_cast<int>(std::count(nodes.node_of_rank.begin(), nodes.node_of_rank.begin() + rank, node));
        measure(world->split(local, node).get(), "collectives_network", true, 0.85, per_node > 1 ? 0.92 : 1.0);
        network = {node_count, link_Bps, link_latency_s, link_rendezvous};
        link_rendezvous = {};
        if (per_node > 1) measure(world->split(node, rank).get(), "collectives", false, 0.92, 1.0);
      }
    }
    const bool links_within = per_node > 1;  // between ranks of one node
    r.set_link_bandwidth_bps(links_within ? link_Bps : 0);
    r.set_link_latency_s(links_within ? link_latency_s : 0);
    if (links_within) {
      r.set_link_eager_limit_bytes(link_rendezvous.eager_limit_bytes);
      r.set_link_rendezvous_s(link_rendezvous.latency_s);
    }
    r.set_network_eager_limit_bytes(network.rendezvous.eager_limit_bytes);
    r.set_network_rendezvous_s(network.rendezvous.latency_s);
    if (ranks > 1) r.set_all_reduce_efficiency(all_reduce_efficiency);
    r.set_nodes(node_count);
    r.set_network_bandwidth_bps(network.Bps);
    r.set_network_latency_s(network.latency_s);
    const InSitu& in_situ = rounds.busy;
    // The backward gathers' factor is the EMBEDDING kind's; the forward gathers' goes by the rank's
    // working set in a lowered step (gather_footprint: every gather of a step at the factor its
    // fit found for them all, the step's MoE layer alone at half the tokens, the layer, the step),
    // and by their size elsewhere (gather_in_situ: the step's, and the half-token layer's).
    set_in_situ(spec, [&](cost::OpKind) { return in_situ.fit.factor; }, in_situ.fit.gather_backward_factor);
    const bool gather_sizes = rounds.half_gather_bytes > 0 && rounds.half_gather_bytes < in_situ.gather_bytes;
    add_bytes_factors(spec.mutable_gather_in_situ(), {{rounds.half_gather_bytes, rounds.half_gather_factor},
                                                      {in_situ.gather_bytes, in_situ.fit.gather_factor}});
    add_bytes_factors(spec.mutable_gather_footprint(), {{rounds.half_working_set_bytes, rounds.half_gather_factor},
                                                        {rounds.layer_working_set_bytes, rounds.layer_gather_factor},
                                                        {in_situ.working_set_bytes, in_situ.fit.gather_factor}});
    add_bytes_factors(spec.mutable_scatter_add_footprint(),
                      {{rounds.half_working_set_bytes, rounds.half_scatter_add_factor},
                       {rounds.layer_working_set_bytes, rounds.layer_scatter_add_factor},
                       {in_situ.working_set_bytes, in_situ.fit.scatter_add_factor}});
    spec.set_op_overhead_s(in_situ.fit.op_overhead_s);
    spec.set_routing_choice_s(in_situ.fit.routing_choice_s);
    spec.set_dispatch_choice_s(in_situ.fit.dispatch_choice_s);
    spec.set_routing_backward_choice_s(in_situ.fit.routing_backward_choice_s);
    spec.set_calibration_step_s(in_situ.step_s);
    // The step against its ops' usual times, as measured (the median round's).
    r.set_step_spread_factor(std::clamp(in_situ.spread, 1.0, 10.0));
    spec.set_step_spread_factor(r.step_spread_factor());
    if (rounds.alone_spread > 0) {  // a rank alone on its host: no other rank to wait for
      r.set_alone_step_spread_factor(std::clamp(rounds.alone_spread, 1.0, 10.0));
      spec.set_alone_step_spread_factor(r.alone_step_spread_factor());
    }
    // Each kind of op at its own pace beyond the fit, the step's ops through it as written; a kind
    // whose factor the MoE layer at half the tokens does not share within kSameKindPace follows its
    // size, and the step's would misprice other sizes (on the third host the optimizer's 1.26-1.30,
    // over 2.3x moe-tiny's parameters, put moe-tiny's 30% over): it takes what both sizes agree on
    // (cost::sized_kind_factor), 1 where they lie either side of it.
    std::map<std::pair<std::string, bool>, double> op_kinds;
    for (auto [key, factor] : cost::fit_op_kind_factors(in_situ.kinds, in_situ.backward, in_situ.measured_s,
                                                        in_situ.model_s, in_situ.fit.op_overhead_s)) {
      auto half = rounds.half_kind_factors.find(key);
      if (half != rounds.half_kind_factors.end() && std::fabs(half->second / factor - 1) > kSameKindPace) {
        (*r.mutable_op_kind_sized())[op_kind_key(key)] = half->second / factor;
        factor = cost::sized_kind_factor(factor, half->second);
      }
      if (factor != 1 && cost::is_op_kind(key.first)) op_kinds[key] = factor;
    }
    for (const auto& [key, factor] : op_kinds) {
      profile::OpKindFactor* k = spec.add_op_kind();
      k->set_op(key.first);
      k->set_backward(key.second);
      k->set_time_factor(factor);
      (*r.mutable_op_kind_factors())[op_kind_key(key)] = factor;
    }
    std::vector<double> model_s = in_situ.model_s;
    for (size_t j = 0; j < model_s.size(); ++j) {
      auto k = op_kinds.find({in_situ.kinds[j], in_situ.backward[j]});
      if (k != op_kinds.end())
        model_s[j] = (model_s[j] - in_situ.fit.op_overhead_s) * k->second + in_situ.fit.op_overhead_s;
    }
    if (rounds.alone_factor > 0) {
      spec.set_alone_time_factor(rounds.alone_factor);
      spec.set_ranks_per_host(per_node);
      if (rounds.alone_gather_factor > 0) spec.set_alone_gather_time_factor(rounds.alone_gather_factor);
    }
    if (!root) return kExitOk;
    if (spec.has_alone_time_factor()) r.set_alone_time_factor(spec.alone_time_factor());
    if (spec.has_alone_gather_time_factor()) r.set_alone_gather_time_factor(spec.alone_gather_time_factor());
    r.set_in_situ_factor(in_situ.fit.factor);
    r.set_in_situ_gather_factor(in_situ.fit.gather_factor);
    r.set_in_situ_gather_backward_factor(in_situ.fit.gather_backward_factor);
    if (gather_sizes) {
      r.set_gather_bytes(in_situ.gather_bytes);
      r.set_half_gather_factor(rounds.half_gather_factor);
      r.set_half_gather_bytes(rounds.half_gather_bytes);
    }
    for (const profile::BytesFactor& p : spec.gather_footprint()) {
      r.add_gather_footprint_bytes(p.bytes());
      r.add_gather_footprint_factors(p.time_factor());
    }
    for (const profile::BytesFactor& p : spec.scatter_add_footprint()) {
      r.add_scatter_add_footprint_bytes(p.bytes());
      r.add_scatter_add_footprint_factors(p.time_factor());
    }
    r.set_op_overhead_s(in_situ.fit.op_overhead_s);
    r.set_routing_choice_s(in_situ.fit.routing_choice_s);
    r.set_dispatch_choice_s(in_situ.fit.dispatch_choice_s);
    r.set_routing_backward_choice_s(in_situ.fit.routing_backward_choice_s);
    r.set_softmax_score_s(core.softmax_score_s);
    r.set_attention_group_s(core.group_s);
    std::vector<double> in_situ_errors;
    for (size_t j = 0; j < in_situ.op_ids.size(); ++j) {
      in_situ_errors.push_back((model_s[j] - in_situ.measured_s[j]) / in_situ.measured_s[j] * 100);
      if (rows)
        *rows += fmt::format("in_situ.{},0,0,{:.6g},{:.6g}\n", in_situ.op_ids[j], in_situ.measured_s[j], model_s[j]);
    }
    res["in_situ_ops"] = residuals_of(in_situ_errors);
    // Exchanges inside a step cost what they cost there (on this VM, transfers between processes
    // in the middle of a step run far below what a microbenchmark on warm buffers sees): the
    // bandwidth is refitted to the calibration step's collectives, keeping the microbenchmarks'
    // latency (the step's exchanges come in too few sizes to separate the two).
    // And they cost more in a bigger step (its other data pushes their buffers out of the caches):
    // the link is the MoE layer alone's, and the exchanges of the step and of the layer at half
    // the tokens against it give the factors at their working sets (device_profile.proto
    // transfer_footprint).
    if (node_count == 1 && ranks > 1 && !in_situ.collectives.empty()) {
      // The step's routes (all-gathers of a few KB, on either side of Open MPI's eager limit) against
      // the link as fitted: residuals only (their rendezvous in a step runs 2-4 us over what it
      // takes after a barrier, but taking its height from them put the exchanges' footprint
      // factors off: docs/VALIDATION.md).
      // Each run's collectives (on all `ranks`) in the model's linear form, once.
      const std::vector<cost::LinkSample> routes = linear(rounds.routes, ranks, false),
                                          layer = linear(rounds.layer_collectives, ranks, false),
                                          half = linear(rounds.half_collectives, ranks, false),
                                          step = linear(in_situ.collectives, ranks, false);
      // A run's link bandwidth (fit_links leaves it, with the all-reduce's efficiency, in place).
      auto bandwidth = [&](const std::vector<CollectiveSample>& measured, const std::vector<cost::LinkSample>& samples) {
        fit_links(measured, samples, nullptr, link_latency_s);
        return link_Bps;
      };
      const bool two_depths = !layer.empty() && rounds.layer_working_set_bytes < in_situ.working_set_bytes;
      const bool half_point = two_depths && !half.empty() && rounds.half_working_set_bytes < rounds.layer_working_set_bytes;
      const double layer_Bps = two_depths ? bandwidth(rounds.layer_collectives, layer) : 0;
      const double layer_all_reduce = all_reduce_efficiency;
      const double half_Bps = half_point ? bandwidth(rounds.half_collectives, half) : 0;
      const double step_Bps = bandwidth(in_situ.collectives, step);
      double factor_at_step = 1;
      if (two_depths) {
        auto factor = [&](double Bps) { return std::clamp(layer_Bps / Bps, 0.1, 10.0); };
        factor_at_step = factor(step_Bps);
        link_Bps = layer_Bps;
        all_reduce_efficiency = layer_all_reduce;
        std::vector<std::pair<double, double>> points = {{rounds.layer_working_set_bytes, 1.0},
                                                         {in_situ.working_set_bytes, factor_at_step}};
        if (half_point) {
          points.insert(points.begin(), {rounds.half_working_set_bytes, factor(half_Bps)});
          r.set_transfer_half_factor(factor(half_Bps));
          r.set_transfer_half_bytes(rounds.half_working_set_bytes);
        }
        add_bytes_factors(spec.mutable_transfer_footprint(), points);
        // The routing's host work the same way, the step's rates at 1.
        if (rounds.layer_host_factor > 0) {
          const double host = std::clamp(rounds.layer_host_factor, 0.1, 10.0);
          add_bytes_factors(spec.mutable_host_footprint(),
                            {{rounds.layer_working_set_bytes, host}, {in_situ.working_set_bytes, 1.0}});
          r.set_host_footprint_factor(host);
        }
        r.set_transfer_footprint_factor(factor_at_step);
        r.set_transfer_footprint_bytes(in_situ.working_set_bytes);
        r.set_transfer_base_bytes(rounds.layer_working_set_bytes);
        if (rounds.layer_exchange_s.size() >= 2) {  // the middle half: one slowed round is the median's to drop
          r.set_exchange_round_low_s(trace::quantile(rounds.layer_exchange_s, 0.25));
          r.set_exchange_round_high_s(trace::quantile(rounds.layer_exchange_s, 0.75));
        }
      }
      r.set_link_bandwidth_bps(link_Bps);
      r.set_link_latency_s(link_latency_s);
      r.set_all_reduce_efficiency(all_reduce_efficiency);
      // Each run's exchanges through what is written: the link and the all-reduce's efficiency the
      // layer's, the transfers at each working set's factor.
      if (two_depths) link_rows(rounds.layer_collectives, layer, "collectives_in_situ_layer");
      if (half_point) link_rows(rounds.half_collectives, half, "collectives_in_situ_half", r.transfer_half_factor());
      link_rows(in_situ.collectives, step, "collectives_in_situ", factor_at_step);
      // The routes (all-gathers of a few KB) against the link as fitted: below the eager limit each
      // pays a fixed cost the all-to-alls do not (Open MPI's nonblocking all-gather progresses its
      // rounds as a schedule: 10 us a call on the third host, docs/VALIDATION.md), their median
      // time over the link's; over it their rendezvous in a step runs 2-4 us over what it takes
      // after a barrier (taking its height from them put the exchanges' footprint factors off).
      std::vector<double> over;
      for (const cost::LinkSample& x : routes)
        if (link_rendezvous.eager_limit_bytes <= 0 || x.message_bytes <= link_rendezvous.eager_limit_bytes)
          over.push_back(x.seconds - link_model_s(x));
      if (!over.empty()) all_gather_latency_s = std::clamp(trace::quantile(over, 0.5), 0.0, 1.0);
      r.set_all_gather_latency_s(all_gather_latency_s);
      if (!routes.empty()) link_rows(rounds.routes, routes, "routes_in_situ");
    }

    const std::string description =
        fmt::format("this machine as {} rank(s): {}, calibrated {}", ranks, machine, trace::utc_now_iso8601());
    const std::string cluster =
        cluster_text(description, ranks, link_Bps, link_latency_s, all_reduce_efficiency, network,
                     links_within ? link_rendezvous : cost::LinkRendezvous{}, all_gather_latency_s);

    // The files: both written to temporary names, checked, then renamed.
    const std::string ctext = fmt::format(
        "# Written by `moesim calibrate --ranks {}`: this machine's ranks as devices, with the device\n"
        "# profile beside it ({}). Links: latency, bandwidth and rendezvous fitted to all-to-all times,\n"
        "# and the all-reduce's bandwidth efficiency against them{}.\n{}",
        ranks, fs::path(profile_out).filename().string(),
        ranks == 1          ? " (one rank: not measured, placeholders)"
        : node_count == 1   ? ""
        : links_within      ? "; the network between the nodes fitted apart, to collectives of one rank per node"
                            : " (one rank per node: the node's link a placeholder; the network fitted)",
        cluster);
    std::string ptext;
    google::protobuf::TextFormat::PrintToString(spec, &ptext);
    ptext = "# Written by `moesim calibrate`: efficiency curves fitted to the executor's kernels on this machine.\n" + ptext;
    const std::string ctmp = out + fmt::format(".tmp{}", ::getpid()), ptmp = profile_out + fmt::format(".tmp{}", ::getpid());
    try {
      write_file(ctmp, ctext);
      write_file(ptmp, ptext);
      topo::load_cluster(ctmp);  // what was written loads back (ConfigError otherwise)
      cost::load_device_profile(ptmp);
    } catch (...) {
      std::error_code ec;
      fs::remove(ctmp, ec);
      fs::remove(ptmp, ec);
      throw;
    }
    r.set_wall_s(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (a.has("--db")) {
      Store store = Store::open(a.get("--db"));
      RunRecord rec;
      rec.kind = RunKind::kCalibrate;
      rec.cluster = machine;
      rec.model = "";
      rec.strategy = fmt::format("{} ranks", ranks);
      rec.result_json = to_json(r);
      rec.version = MOESIM_VERSION;
      std::vector<RunMetric> metrics = {{"peak_flops", peak},
                                        {"memory_bandwidth_Bps", bandwidth},
                                        {"kernel_launch_overhead_s", launch_s},
                                        {"blas_call_s", blas_call_s},
                                        {"link_bandwidth_Bps", r.link_bandwidth_bps()},
                                        {"link_latency_s", r.link_latency_s()},
                                        {"link_rendezvous_s", r.link_rendezvous_s()},
                                        {"link_eager_limit_bytes", r.link_eager_limit_bytes()}};
      for (const auto& [family, f] : r.residuals()) metrics.push_back({"residual." + family, f.median_abs_pct()});
      r.set_run_id(store.insert_run(rec, metrics));
    }
    if (a.has("--samples")) write_file(a.get("--samples"), csv);
    fs::rename(ptmp, profile_out);
    fs::rename(ctmp, out);
    if (json) {
      std::cout << to_json(r);
      return kExitOk;
    }
    std::cout << fmt::format("{} rank(s) on {}\n", ranks, machine);
    std::cout << fmt::format("peak (fp32 GEMM)     {:.1f} GFLOP/s\n", peak / 1e9);
    std::cout << fmt::format("memory bandwidth     {}/s\n", format_bytes(bandwidth));
    std::cout << fmt::format("kernel launch        {}{}\n", format_seconds(launch_s),
                             blas_call_s > 0 ? fmt::format(", a BLAS call {} more", format_seconds(blas_call_s)) : "");
    std::cout << fmt::format("attention core       {} per score, {} per group (sequence x head)\n",
                             format_seconds(r.softmax_score_s()), format_seconds(r.attention_group_s()));
    std::cout << fmt::format("batch-priority sort  {} per token x log2(tokens)\n", format_seconds(r.priority_sort_s()));
    std::string kernels;
    for (const profile::GatherKernelFactor& g : spec.gather_kernel())
      kernels += fmt::format("{}{} x {:.2f}", kernels.empty() ? "" : ", ", gather_kernel_label(g.kernel()), g.time_factor());
    if (!kernels.empty()) std::cout << fmt::format("row gathers per byte {} (against a copy)\n", kernels);
    auto by_working_set = [](const auto& bytes, const auto& factors) {
      std::vector<std::string> points;
      for (int i = 0; i < bytes.size() && i < factors.size(); ++i)
        points.push_back(fmt::format("x {:.3f} at {}", factors[i], format_bytes(bytes[i])));
      return fmt::format("{}", fmt::join(points, ", "));
    };
    const std::string gathers = fmt::format(
        "gathers by working set {} (backward x {:.3f}; lookups' backward {})",
        by_working_set(r.gather_footprint_bytes(), r.gather_footprint_factors()), r.in_situ_gather_backward_factor(),
        by_working_set(r.scatter_add_footprint_bytes(), r.scatter_add_footprint_factors()));
    std::cout << fmt::format("in a training step   kernels x {:.3f}, {}, {} per op around them; per "
                             "token-choice {} in a gate, {} in its backward, {} in a dispatch{}; the step x {:.3f} "
                             "its ops' usual times{}\n",
                             r.in_situ_factor(), gathers, format_seconds(r.op_overhead_s()),
                             format_seconds(r.routing_choice_s()),
                             format_seconds(r.routing_backward_choice_s()), format_seconds(r.dispatch_choice_s()),
                             spec.has_alone_time_factor()
                                 ? fmt::format("; a rank alone x {:.3f}{}", r.alone_time_factor(),
                                               r.alone_gather_time_factor() > 0
                                                   ? fmt::format(" (its gathers x {:.3f})", r.alone_gather_time_factor())
                                                   : std::string())
                                 : std::string(),
                             r.step_spread_factor(),
                             r.alone_step_spread_factor() > 0
                                 ? fmt::format(" (x {:.3f} alone)", r.alone_step_spread_factor())
                                 : std::string());
    auto by_kind = [](const google::protobuf::Map<std::string, double>& factors) {
      std::vector<std::string> parts;
      for (const auto& [kind, x] : std::map<std::string, double>(factors.begin(), factors.end()))
        parts.push_back(fmt::format("{} x {:.3f}", kind, x));
      return fmt::format("{}", fmt::join(parts, ", "));
    };
    if (!r.op_kind_factors().empty()) std::cout << "by kind of op        " << by_kind(r.op_kind_factors()) << "\n";
    if (!r.op_kind_sized().empty())
      std::cout << "  its pace follows its size (at half the tokens, against the step; what both agree on, or 1) "
                << by_kind(r.op_kind_sized()) << "\n";
    auto rendezvous_line = [](const cost::LinkRendezvous& r) {
      return r.eager_limit_bytes > 0 ? fmt::format(", {} more over {} a message (rendezvous)", format_seconds(r.latency_s),
                                                   format_bytes(r.eager_limit_bytes))
                                     : std::string();
    };
    if (links_within)
      std::cout << fmt::format("link between ranks   {}/s, {} latency{}; all-reduce at {:.2f} of it{}\n",
                               format_bytes(link_Bps), format_seconds(link_latency_s), rendezvous_line(link_rendezvous),
                               r.all_reduce_efficiency(),
                               r.all_gather_latency_s() > 0
                                   ? fmt::format("; an all-gather {} more a call", format_seconds(r.all_gather_latency_s()))
                                   : std::string());
    if (node_count > 1)
      std::cout << fmt::format("network              {} nodes of {} rank(s): {}/s a rank, {} latency{}\n", node_count,
                               per_node, format_bytes(network.Bps), format_seconds(network.latency_s),
                               rendezvous_line(network.rendezvous));
    if (r.transfer_footprint_factor() > 0)
      std::cout << fmt::format("exchanges in a step  {}x 1 at a {} working set (that link), x {:.3f} at {}{}\n",
                               r.transfer_half_factor() > 0 ? fmt::format("x {:.3f} at {}, ", r.transfer_half_factor(),
                                                                          format_bytes(r.transfer_half_bytes()))
                                                            : std::string(),
                               format_bytes(r.transfer_base_bytes()), r.transfer_footprint_factor(),
                               format_bytes(r.transfer_footprint_bytes()),
                               r.host_footprint_factor() > 0
                                   ? fmt::format("; routing's host work x {:.3f} at {}", r.host_footprint_factor(),
                                                 format_bytes(r.transfer_base_bytes()))
                                   : std::string());
    if (r.exchange_round_low_s() > 0) {
      const double apart = r.exchange_round_high_s() / r.exchange_round_low_s();
      std::cout << fmt::format(
          "exchanges by round   the layer's all-to-alls {} to {} (the rounds' quartiles, {:.2f}x apart){}\n",
          format_seconds(r.exchange_round_low_s()), format_seconds(r.exchange_round_high_s()), apart,
          apart > kSteadyRounds ? ": this machine's pace for exchanges moved during the calibration, and "
                                  "predictions of exchanges can be off by as much"
                                : "");
    }
    std::cout << "\nfit residuals (|model - measured|, median / max):\n";
    for (const auto& [family, f] : r.residuals())
      std::cout << fmt::format("  {:<25} {:>3} samples  {:5.1f}% / {:5.1f}%\n", family, f.samples(), f.median_abs_pct(),
                               f.max_abs_pct());
    std::cout << fmt::format("\nwrote {} and {} in {:.0f} s", out, profile_out, r.wall_s());
    if (!r.run_id().empty()) std::cout << fmt::format("; stored as {}", r.run_id());
    std::cout << '\n';
    return kExitOk;
  });
}

}  // namespace

std::vector<Command> calibrate_commands() {
  return {
      {"calibrate", "measure this machine's ranks and write a cluster + device profile that describe them",
       "usage: moesim calibrate --out configs/hardware/local.textproto [--ranks N] [--device cpu|cuda]\n"
       "                        [--name NAME] [--threads T] [--quick] [--samples S.csv] [--db results.db] [--json]\n\n"
       "Runs microbenchmarks through the executor on N ranks at once (default 2; launched under mpirun\n"
       "as `moesim run` does): GEMMs over transformer shapes in their forward, dX and dW forms, expert\n"
       "GEMM groups, the attention core forward and backward, LayerNorm/GELU/residual bandwidth, row\n"
       "gathers out of cache, the row gathers' kernels side by side (the MoE dispatch's copy, the\n"
       "combine's sum, an embedding lookup and their backwards: each one's time per byte against the\n"
       "copy, the profile's gather_kernel), kernel launch overhead, the MoE capacity decision under\n"
       "vanilla and batch-priority dropping; after the calibration step below, all-to-all-v /\n"
       "all-reduce between the ranks from 1 KB to 4 MB, 2^(1/4) apart under 16 KB a message (their\n"
       "gigabytes warm MPI's state, which would speed the step's exchanges past what a fresh process\n"
       "sees).\n"
       "Fits (costmodel/calibration.h): the peak, efficiency curves per kernel kind, the memory\n"
       "bandwidth, the attention core's time per score and per group, the batch-priority sort's time\n"
       "per token x log2(tokens), and the link latency and bandwidth, the library's rendezvous (the\n"
       "step in latency over its eager limit, searched between the all-to-alls' sizes) and the\n"
       "all-reduce's efficiency in the collective model's own terms; figures are the slowest rank's.\n"
       "The calibration step (a small MoE transformer the validation suite does not run), nine\n"
       "times, six seconds apart (a shared machine's pace moves over seconds; five times a second\n"
       "apart with --quick): the in-situ time factors (the kernels', the row gathers') and per-op\n"
       "overhead of its slowest rank, and the MoE routing's host time per token-choice (gate, gate\n"
       "backward, dispatch) measured inside its ops; with several ranks, the same step on rank 0\n"
       "alone gives the factors for a rank alone on its host (its ops', its row gathers' apart), and\n"
       "the step's MoE layer alone (the same exchanges in half the working set) sets the link (the\n"
       "median of its exchanges' bandwidths); the step's exchanges and the layer's at half the\n"
       "tokens against it give the factors by which the working set slows them (the profile's\n"
       "transfer_footprint), and the forward row gathers' factors of the three runs the same\n"
       "(gather_footprint; backward gathers have one factor of their own).\n"
       "Prints each fit's residuals through the written profile, and how far the rounds' exchanges\n"
       "moved (the quartiles of the layer's all-to-all over them: a shared machine's pace for exchanges\n"
       "moves, which no profile can follow; past 1.25x apart it says so).\n\n"
       "Writes --out (a cluster: one node of N devices joined by a switch; ranks on several nodes, by\n"
       "host name or MOESIM_NODE_NAME, as many on each: that many nodes joined by a network, a NIC per\n"
       "rank on one switch, fitted to the collectives of one rank per node) and <out>.profile.textproto\n"
       "beside it (the device profile; scenarios name it as device_profile, `moesim validate --suite`\n"
       "finds it beside the cluster). Both are written only once everything succeeded: an interrupted\n"
       "calibration leaves the previous files intact. --db adds a calibrate row with the machine's\n"
       "description (host, CPU) so several machines' profiles live side by side. --quick measures fewer\n"
       "shapes (for tests); --samples writes every measurement with the fitted model's time as CSV.\n"
       "CPU ranks run --threads OpenBLAS threads each (default: this machine's cores / N); the profile\n"
       "records it and `moesim validate` runs its ranks with as many. With --device cuda the ranks are\n"
       "GPUs and the links are NCCL's. Nodes with unequal ranks are refused (exit 2).\n",
       {{"--quick"}, {"--out", "--ranks", "--device", "--name", "--db", "--timeout", "--samples", "--threads"}},
       calibrate},
  };
}

}  // namespace moesim::cli
