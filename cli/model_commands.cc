// `moesim model show` and `moesim memory`.
#include "cli/commands.h"
#include "cli/simulate.h"
#include "common/json.h"
#include "common/units.h"
#include "costmodel/cost_report.pb.h"
#include "costmodel/compute.h"
#include "costmodel/memory.h"
#include "costmodel/model.h"
#include "costmodel/setup.h"

#include <fmt/format.h>

#include <cctype>
#include <iostream>
#include <optional>
#include <map>

namespace moesim::cli {
namespace {

report::ModelReport model_report(const cost::ModelCost& c, const std::string& file) {
  report::ModelReport r;
  r.set_name(c.name);
  r.set_file(file);
  r.set_counted_per(c.per_token ? "token" : "sample");
  r.set_sequence(c.sequence);
  r.set_total_params(c.total_params);
  r.set_active_params(c.active_params);
  r.set_embedding_params(c.embedding_params);
  r.set_active_params_without_embedding(c.active_params - c.embedding_params);
  r.set_expert_params(c.expert_params);
  r.set_moe_layers(c.moe_layers);
  if (c.per_token) {
    r.set_flops_per_token_fwd(c.flops_fwd);
    r.set_flops_per_token_bwd(c.flops_bwd);
  } else {
    r.set_flops_per_sample_fwd(c.flops_fwd);
    r.set_flops_per_sample_bwd(c.flops_bwd);
  }
  for (const cost::Layer& l : c.layers) {
    report::LayerReport* lr = r.add_layers();
    lr->set_name(l.name);
    lr->set_kind(cost::layer_kind_name(l.kind));
    lr->set_moe(l.moe);
    lr->set_params(l.params());
    lr->set_active_params(l.active_params);
    lr->set_flops_fwd(l.flops_fwd);
    lr->set_flops_bwd(l.flops_bwd);
    lr->set_activation_bytes(l.act_none.total());
    lr->set_experts(l.experts);
    lr->set_top_k(l.top_k);
    lr->set_sample_share(l.sample_share);
  }
  return r;
}

// Consecutive identical layers print as one row ("L3-L60 x58").
void print_model(const report::ModelReport& r, std::ostream& out) {
  const std::string per = r.counted_per();
  out << fmt::format("{} ({}): FLOPs and activation bytes per {}\n\n", r.name(), r.file(), per);
  const bool timed = r.has_fwd_time_s();
  if (timed)
    out << fmt::format("times: {} rows ({}s) on {} in {}, forward and backward kernels back to back\n\n", r.tokens(), per,
                       r.device(), r.dtype());
  out << fmt::format("{:<24} {:<12} {:>9} {:>9} {:>9} {:>9} {:>10}", "layer", "kind", "params", "active", "fwd FLOP",
                     "bwd FLOP", "act bytes");
  out << (timed ? fmt::format(" {:>9} {:>9}\n", "fwd time", "bwd time") : "\n");
  auto same = [](const report::LayerReport& a, const report::LayerReport& b) {
    return a.kind() == b.kind() && a.moe() == b.moe() && a.params() == b.params() && a.flops_fwd() == b.flops_fwd() &&
           a.activation_bytes() == b.activation_bytes() && a.sample_share() == b.sample_share() &&
           a.fwd_time_s() == b.fwd_time_s();
  };
  for (int i = 0; i < r.layers_size();) {
    int j = i + 1;
    while (j < r.layers_size() && same(r.layers(i), r.layers(j))) ++j;
    const report::LayerReport& l = r.layers(i);
    std::string name = l.name();
    if (j - i > 1) {  // "L3-60 x58", "main.stage3.block1-5 x5"
      const std::string& last = r.layers(j - 1).name();
      size_t common = 0;
      while (common < name.size() && common < last.size() && name[common] == last[common]) ++common;
      while (common > 0 && std::isdigit(static_cast<unsigned char>(name[common - 1]))) --common;
      name = fmt::format("{}-{} x{}", name, last.substr(common), j - i);
    }
    std::string kind = l.moe() ? fmt::format("moe {}/{}", l.top_k(), l.experts()) : l.kind();
    out << fmt::format("{:<24} {:<12} {:>9} {:>9} {:>9} {:>9} {:>10}", name, kind, format_count(l.params()),
                       format_count(l.active_params()), format_count(l.flops_fwd()), format_count(l.flops_bwd()),
                       format_bytes(l.activation_bytes()));
    out << (timed ? fmt::format(" {:>9} {:>9}\n", format_seconds(l.fwd_time_s()), format_seconds(l.bwd_time_s())) : "\n");
    i = j;
  }
  const double fwd = per == "token" ? r.flops_per_token_fwd() : r.flops_per_sample_fwd();
  const double bwd = per == "token" ? r.flops_per_token_bwd() : r.flops_per_sample_bwd();
  out << fmt::format("\ntotal parameters     {} ({:.4g})\n", format_count(r.total_params()), r.total_params());
  out << fmt::format("active per token     {} ({:.4g}); {} without the input embeddings ({})\n",
                     format_count(r.active_params()), r.active_params(),
                     format_count(r.active_params_without_embedding()), format_count(r.embedding_params()));
  if (r.moe_layers() > 0)
    out << fmt::format("routed experts       {} in {} MoE layers\n", format_count(r.expert_params()), r.moe_layers());
  out << fmt::format("FLOPs per {:<10} {} forward, {} backward{}\n", per, format_count(fwd), format_count(bwd),
                     per == "token" ? fmt::format(" (sequence {})", r.sequence()) : "");
  if (timed)
    out << fmt::format("time for {} {}s     {} forward, {} backward on one {}\n", r.tokens(), per,
                       format_seconds(r.fwd_time_s()), format_seconds(r.bwd_time_s()), r.device());
}

cost::DType parse_dtype(const std::string& name) {
  static const std::pair<const char*, cost::DType> kNames[] = {{"fp32", cost::DType::kFp32}, {"tf32", cost::DType::kTf32},
                                                              {"bf16", cost::DType::kBf16}, {"fp16", cost::DType::kFp16},
                                                              {"fp8", cost::DType::kFp8}};
  for (const auto& [n, d] : kNames)
    if (name == n) return d;
  throw UsageError(fmt::format("--dtype: unknown data type '{}': fp32, tf32, bf16, fp16 or fp8", name));
}

// Times every layer's kernels on the profile's device, forward and backward.
void add_times(const cost::ModelCost& c, const cost::DeviceProfile& p, cost::DType dtype, const std::string& dtype_name,
               report::ModelReport* r) {
  r->set_device(p.name());
  r->set_dtype(dtype_name);
  r->set_tokens(c.tokens);
  double fwd_total = 0, bwd_total = 0;
  for (int i = 0; i < r->layers_size(); ++i) {
    const cost::Layer& l = c.layers[i];
    std::vector<cost::Op> bwd;
    for (const cost::Op& op : l.ops)
      for (cost::Op& b : cost::backward_ops(op)) bwd.push_back(std::move(b));
    const double fwd_s = cost::ops_time(p, l.ops, dtype).time_s;
    const double bwd_s = cost::ops_time(p, bwd, dtype).time_s;
    r->mutable_layers(i)->set_fwd_time_s(fwd_s);
    r->mutable_layers(i)->set_bwd_time_s(bwd_s);
    fwd_total += fwd_s * l.sample_share;
    bwd_total += bwd_s * l.sample_share;
  }
  r->set_fwd_time_s(fwd_total);
  r->set_bwd_time_s(bwd_total);
}

int model_show(const Args& a) {
  if (a.positional().size() != 1) throw UsageError(a.positional().empty() ? "missing FILE" : "give exactly one FILE");
  const std::string& file = a.positional()[0];
  const int sequence = a.get_int("--sequence", 0, 1, 1 << 24);
  const int tokens = a.get_int("--tokens", 0, 1, 1 << 30);
  const std::string dtype_name = a.get("--dtype", "bf16");
  const cost::DType dtype = parse_dtype(dtype_name);
  if (!a.has("--device") && (a.has("--tokens") || a.has("--dtype"))) throw UsageError("--tokens and --dtype need --device");
  model::Model m;
  std::optional<cost::DeviceProfile> profile;
  try {
    m = cost::load_model(file);
    if (a.has("--device")) profile.emplace(cost::load_device_profile(a.get("--device")));
  } catch (const ConfigError& e) {
    return report_config_error(e, file, a.flag("--json"));
  }
  cost::ModelOptions o;
  o.sequence = sequence;
  o.tokens = tokens;
  const cost::ModelCost c = cost::analyze(m, o);
  report::ModelReport r = model_report(c, file);
  if (profile) add_times(c, *profile, dtype, dtype_name, &r);
  if (a.flag("--json")) std::cout << to_json(r);
  else print_model(r, std::cout);
  return kExitOk;
}

report::MemoryReport memory_report(const cost::Setup& s, const cost::MemoryReport& m) {
  report::MemoryReport r;
  r.set_cluster(s.cluster->name());
  r.set_model(s.model->name());
  r.set_workload(s.workload->name());
  r.set_strategy(s.strategy->name());
  r.set_dp(s.layout.dp);
  r.set_tp(s.layout.tp);
  r.set_pp(s.layout.pp);
  r.set_ep(s.layout.ep);
  r.set_micro_batches(s.layout.micro_batches);
  r.set_fits(m.fits);
  r.set_peak_rank(m.peak_rank);
  r.set_peak_total_bytes(m.ranks[m.peak_rank].total_bytes);
  r.set_peak_margin_bytes(m.ranks[m.peak_rank].margin_bytes());
  r.set_host_offload_bytes_per_node(m.host_offload_bytes_per_node);
  r.set_host_memory_bytes_per_node(m.host_memory_bytes_per_node);
  r.set_rank_count(static_cast<int>(m.ranks.size()));
  // Ranks whose figures agree to the byte share one group.
  std::map<std::vector<int64_t>, int> groups;
  for (const cost::RankMemory& x : m.ranks) {
    const std::vector<int64_t> key = {x.stage,
                                      std::llround(x.weights_bytes),
                                      std::llround(x.gradients_bytes),
                                      std::llround(x.optimizer_bytes),
                                      std::llround(x.activations_bytes),
                                      std::llround(x.moe_buffers_bytes),
                                      std::llround(x.comm_buffers_bytes),
                                      std::llround(x.kv_cache_bytes),
                                      std::llround(x.offloaded_bytes),
                                      std::llround(x.capacity_bytes)};
    auto [it, added] = groups.emplace(key, r.ranks_size());
    if (!added) {
      r.mutable_ranks(it->second)->add_rank_list(x.rank);
      continue;
    }
    report::RankMemoryReport* o = r.add_ranks();
    o->set_rank(x.rank);
    o->add_rank_list(x.rank);
    o->set_device(s.cluster->graph()[s.cluster->device(x.rank).vertex].name);
    o->set_stage(x.stage);
    o->set_params(x.params);
    o->set_weights_bytes(x.weights_bytes);
    o->set_gradients_bytes(x.gradients_bytes);
    o->set_optimizer_bytes(x.optimizer_bytes);
    o->set_activations_bytes(x.activations_bytes);
    o->set_moe_buffers_bytes(x.moe_buffers_bytes);
    o->set_comm_buffers_bytes(x.comm_buffers_bytes);
    o->set_kv_cache_bytes(x.kv_cache_bytes);
    o->set_offloaded_bytes(x.offloaded_bytes);
    o->set_in_flight_micro_batches(x.in_flight_micro_batches);
    o->set_total_bytes(x.total_bytes);
    o->set_capacity_bytes(x.capacity_bytes);
    o->set_margin_bytes(x.margin_bytes());
    o->set_fits(x.fits());
  }
  return r;
}

// "0-127", "128-255,384-511": ascending ranks as ranges, cut short with "..." past `width`.
std::string rank_ranges(const google::protobuf::RepeatedField<int32_t>& ranks, size_t width) {
  std::string out;
  for (int i = 0; i < ranks.size();) {
    int j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += i == j ? fmt::format("{}", ranks[i]) : fmt::format("{}-{}", ranks[i], ranks[j]);
    i = j + 1;
  }
  if (out.size() > width) {
    out.resize(width - 3);
    out += "...";
  }
  return out;
}

void print_memory(const report::MemoryReport& r, std::ostream& out) {
  out << fmt::format("{} on {} ({}), strategy {}: dp {} tp {} pp {} ep {}, {} micro-batches per step\n\n", r.model(),
                     r.cluster(), r.workload(), r.strategy(), r.dp(), r.tp(), r.pp(), r.ep(), r.micro_batches());
  const char* row = "{:<18} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  {}\n";
  out << fmt::format(fmt::runtime(row), "ranks", "count", "stage", "weights", "grads", "optim", "activ", "moe buf", "comm",
                     "kv cache", "offload", "total", "margin", "");
  for (const report::RankMemoryReport& x : r.ranks())
    out << fmt::format(fmt::runtime(row), rank_ranges(x.rank_list(), 18), x.rank_list_size(), x.stage(),
                       format_bytes(x.weights_bytes()), format_bytes(x.gradients_bytes()), format_bytes(x.optimizer_bytes()),
                       format_bytes(x.activations_bytes()), format_bytes(x.moe_buffers_bytes()),
                       format_bytes(x.comm_buffers_bytes()), format_bytes(x.kv_cache_bytes()),
                       format_bytes(x.offloaded_bytes()), format_bytes(x.total_bytes()), format_bytes(x.margin_bytes()),
                       x.fits() ? "fits" : "DOES NOT FIT");
  const report::RankMemoryReport* peak = nullptr;
  for (const report::RankMemoryReport& x : r.ranks())
    if (std::find(x.rank_list().begin(), x.rank_list().end(), r.peak_rank()) != x.rank_list().end()) peak = &x;
  out << fmt::format("\n{}: peak rank {} ({} ranks like it) uses {} of {}, margin {}\n", r.fits() ? "fits" : "does not fit",
                     r.peak_rank(), peak->rank_list_size(), format_bytes(peak->total_bytes()),
                     format_bytes(peak->capacity_bytes()), format_bytes(peak->margin_bytes()));
  if (r.host_offload_bytes_per_node() > 0)
    out << fmt::format("host memory: {} offloaded per node (of {})\n", format_bytes(r.host_offload_bytes_per_node()),
                       r.host_memory_bytes_per_node() > 0 ? format_bytes(r.host_memory_bytes_per_node()) : "unknown");
}

int memory(const Args& a) {
  std::optional<sim::Scenario> s;
  std::string input;
  try {
    s.emplace(scenario_of_args(a, &input));
  } catch (const ConfigError& e) {
    return report_config_error(e, input, a.flag("--json"));
  }
  const report::MemoryReport r = memory_report(s->setup, cost::estimate_memory(s->setup));
  if (a.flag("--json")) std::cout << to_json(r);
  else print_memory(r, std::cout);
  return kExitOk;
}

}  // namespace

std::vector<Command> model_commands() {
  return {
      {"model show", "a model's layers: parameters, FLOPs and activation bytes; totals",
       "usage: moesim model show FILE [--sequence N] [--device PROFILE [--tokens N] [--dtype T]] [--json]\n\n"
       "  FILE          a model description (configs/models/*.textproto)\n"
       "  --sequence N  tokens per sequence for attention FLOPs (default: the model's max_sequence)\n"
       "  --device P    also time every layer's kernels on a device profile (configs/devices/*.textproto):\n"
       "                roofline with the profile's efficiencies plus launch overhead (costmodel/compute.h)\n"
       "  --tokens N    rows the kernels work on (tokens; images for vision and CNN models; default one\n"
       "                sequence or one image)\n"
       "  --dtype T     fp32, tf32, bf16 (default), fp16 or fp8\n"
       "  --json        total_params, active_params, flops_per_token_fwd (flops_per_sample_fwd for\n"
       "                vision and CNN models) and a `layers` list\n\n"
       "Counting rules (costmodel/model.h): a d_in x d_out layer has d_in*d_out weights and costs\n"
       "2*d_in*d_out FLOPs per token; backward is twice forward; active parameters leave out the\n"
       "routed experts a token does not use.\n",
       {{}, {"--sequence", "--device", "--tokens", "--dtype"}}, model_show},
      {"memory", "device memory per rank for a model, workload and strategy on a cluster: does it fit?",
       "usage: moesim memory --cluster C --model M --workload W --strategy S [--json]\n"
       "       moesim memory SCENARIO | --plan FILE [--json]   (as `moesim simulate` takes them)\n\n"
       "Per rank: weights, gradients, optimizer states (by ZeRO stage and precision), activations\n"
       "(by recompute mode and pipeline schedule), MoE dispatch buffers, communication buffers, KV\n"
       "cache (inference) and bytes offloaded to host memory; whether every rank fits and the margin\n"
       "of the fullest. Formulas: costmodel/memory.h. Exit 0 whether or not it fits (see `fits`);\n"
       "2 on bad input.\n\n"
       "--json: fits, peak_rank, peak_total_bytes, peak_margin_bytes and `ranks`: groups of ranks with\n"
       "identical figures (rank_list), each with total_bytes and its parts.\n",
       {{}, {"--cluster", "--model", "--workload", "--strategy", "--plan"}}, memory},
  };
}

}  // namespace moesim::cli
