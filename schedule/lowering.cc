// The lowering (schedule/lowering.h): the rules are written there; this file follows them.
#include "schedule/lowering.h"

#include "common/error.h"
#include "costmodel/memory.h"
#include "costmodel/routing_model.h"
#include "traces/validation.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <optional>
#include <unordered_map>

namespace moesim::schedule {
namespace {

using cost::Layer;
using cost::LayerKind;
using trace::OpKind;

constexpr double kGradientBucketElements = 40e6;  // Megatron-LM's default bucket
constexpr double kDefaultPcie_Bps = 32e9;         // PCIe Gen4 x16 per direction, when the cluster does not say

// Streams: compute 0; comm 0 carries the layers' TP and EP collectives, comm 1 the data-parallel
// gradients and ZeRO gathers, comm 2 + 4 c + {0, 1, 2, 3} the pipeline's point-to-point channels
// of local chunk c (activations in, activations out, gradients in, gradients out), so that every
// channel is used in micro-batch order on both of its ends; copy 0 carries offload prefetches.
constexpr int kLayerComm = 0, kDataParallelComm = 1, kFirstP2pComm = 2;

bool mixed(workload::Precision p) { return p == workload::BF16 || p == workload::FP16 || p == workload::FP8; }

uint64_t mix(uint64_t h, uint64_t v) {  // splitmix64-style combination for derived seeds
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h ^= h >> 31;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  return h;
}

// Which part of a layer a kernel belongs to, from its name ("L3.attn.qkv" -> kAttn); its
// backward's part where `backward`. An MoE layer's residual add runs in the combine, and its
// gradient's sum into the stream's in the gate's backward (the combine's backward passes the
// gradient through), as the executor runs them.
enum class Part { kAttn, kMlp, kGate, kPermute, kShared, kExperts, kCombine, kWhole };

Part part_of(const Layer& layer, const std::string& op_name, bool backward = false) {
  if (layer.kind != LayerKind::kTransformer) return Part::kWhole;
  const std::string rest = op_name.substr(std::min(op_name.size(), layer.name.size() + 1));
  auto starts = [&](const char* p) { return rest.rfind(p, 0) == 0; };
  if (starts("attn") || starts("cross")) return Part::kAttn;
  if (starts("moe.norm") || starts("moe.router") || starts("moe.topk")) return Part::kGate;
  if (starts("moe.dispatch")) return Part::kPermute;
  if (starts("moe.shared")) return Part::kShared;
  if (starts("moe.experts")) return Part::kExperts;
  if (starts("residual")) return !layer.moe ? Part::kMlp : backward ? Part::kGate : Part::kCombine;
  if (starts("moe.combine")) return Part::kCombine;
  return Part::kMlp;
}

struct Times {
  double fwd = 0, bwd = 0, recompute = 0, flops_fwd = 0, flops_bwd = 0;
  Times& operator+=(const Times& o) {
    fwd += o.fwd;
    bwd += o.bwd;
    recompute += o.recompute;
    flops_fwd += o.flops_fwd;
    flops_bwd += o.flops_bwd;
    return *this;
  }
};

// One EP group's routing of one MoE layer for one routing draw.
struct Routing {
  int matrix = 0;                   // 1-based index into Schedule.matrices
  std::vector<double> rank_load;    // kept token->expert assignments per EP rank
  std::vector<double> expert_load;  // kept assignments per expert
  // Per EP rank: the share of its tokens' assignments that were kept, which its dispatch gathers
  // into the send buffer and its combine gathers back (a dropped one moves nothing).
  std::vector<double> kept_share;
};

class Lowering {
 public:
  Lowering(const cost::Setup& s, const LoweringOptions& o) : s_(s), l_(s.layout), st_(*s.strategy), o_(o) {
    const workload::Workload& wk = *s.workload;
    training_ = wk.has_training();
    precision_ = training_ ? wk.training().precision() : wk.inference().precision();
    dtype_ = compute_dtype(wk);
    recompute_ = training_ ? wk.training().recompute() : workload::NONE;
    seq_ = training_ ? l_.sequence : wk.inference().prompt_tokens();
    tokens_ = static_cast<double>(l_.micro_batch) * seq_;
    act_bytes_ = cost::activation_bytes(wk);
    cost::ModelOptions mo;
    mo.sequence = seq_;
    mo.tokens = tokens_;
    mo.act_elem_bytes = act_bytes_;
    mc_ = cost::analyze(*s.model, mo);
    chunks_ = l_.pp * l_.virtual_stages;
    chunk_layers_ = split_layers(chunks_);
    // Routing draws depend on the run's seed and the workload's routing seed.
    o_.seed = mix(o.seed, wk.has_routing() ? wk.routing().seed() : 1);
    fold_ = l_.dp > 1 && (o.fold == Fold::kDataParallel || (o.fold == Fold::kAuto && l_.devices > kFoldAboveDevices));
    memory_ = cost::estimate_memory(s);
    grad_bytes_ = mixed(precision_) ? 2 : 4;
    bucket_bytes_ = o.bucket_bytes > 0 ? o.bucket_bytes : kGradientBucketElements * grad_bytes_;
    for (const Layer& layer : mc_.layers)
      if (layer.moe) {
        experts_ = layer.experts;
        break;
      }
    if (experts_ > 0) {
      const workload::RoutingDistribution routing = wk.has_routing() ? wk.routing() : workload::RoutingDistribution();
      probabilities_ = cost::expert_probabilities(routing, experts_);
      placement_ = cost::place_experts(experts_, l_.ep, st_.has_placement() ? &st_.placement() : nullptr, probabilities_);
    }
  }

  Schedule run() {
    out_.set_name(fmt::format("{} / {} / {} / {}", s_.cluster->name(), s_.model->name(), s_.workload->name(), st_.name()));
    out_.set_devices(l_.devices);
    out_.set_per_token(mc_.per_token);
    out_.set_folded(fold_);
    for (int p = 0; p < l_.pp; ++p)
      for (int d = 0; d < (fold_ ? 1 : l_.dp); ++d)
        for (int t = 0; t < l_.tp; ++t) lower_rank(p, d, t);
    std::sort(out_.mutable_ranks()->begin(), out_.mutable_ranks()->end(),
              [](const RankSchedule& a, const RankSchedule& b) { return a.rank() < b.rank(); });
    const double steps_tokens = training_ ? static_cast<double>(l_.global_batch) * seq_
                                          : static_cast<double>(l_.global_batch) *
                                                (seq_ + s_.workload->inference().generated_tokens());
    out_.set_tokens(steps_tokens);
    // The model's FLOPs are per token, or per sample (image) for vision and CNN models.
    const double flops_per_unit = training_ ? mc_.flops_fwd + mc_.flops_bwd : mc_.flops_fwd;
    out_.set_model_flops(flops_per_unit * (mc_.per_token ? steps_tokens : static_cast<double>(l_.global_batch)));
    for (const auto& [key, load] : expert_load_) {
      trace::ExpertLoad* e = out_.add_expert_load();
      e->set_layer(key.first);
      e->set_rank(key.second);
      for (double v : load) e->add_tokens_per_expert(std::llround(v));
    }
    if (routing_draws_ > 0) {
      out_.set_expert_imbalance(imbalance_sum_ / routing_draws_);
      out_.set_max_expert_imbalance(imbalance_max_);
      out_.set_dropped_fraction(dropped_sum_ / routing_draws_);
    }
    return std::move(out_);
  }

 private:
  int rank_of(int p, int d, int t) const { return l_.rank(p, d, t); }

  // Layer indices of each of `n` chunks: setup.h's stage rule applied to n pieces.
  std::vector<std::vector<int>> split_layers(int n) const {
    if (n == l_.pp) return l_.stage_layers;
    int blocks = 0;
    for (const Layer& layer : mc_.layers)
      blocks += layer.kind == LayerKind::kTransformer || layer.kind == LayerKind::kResBlock;
    std::vector<std::vector<int>> out(n);
    auto start = [&](int c) { return c * (blocks / n) + std::min(c, blocks % n); };
    int seen = 0, c = 0;
    for (int i = 0; i < static_cast<int>(mc_.layers.size()); ++i) {
      const Layer& layer = mc_.layers[i];
      if (layer.kind == LayerKind::kTransformer || layer.kind == LayerKind::kResBlock) {
        while (c + 1 < n && seen >= start(c + 1)) ++c;
        ++seen;
      }
      out[c].push_back(i);
    }
    return out;
  }

  const cost::DeviceProfile& profile(int rank) {
    if (o_.profile) return *o_.profile;
    const int type = s_.cluster->device(rank).type;
    auto it = profiles_.find(type);
    if (it == profiles_.end()) it = profiles_.emplace(type, cost::default_profile(s_.cluster->device_type(rank))).first;
    return it->second;
  }

  // The kernel as `rank` of its EP group runs it (cost::on_ep_rank), its host terms and forward row
  // gathers and lookups' backwards at the rank's working set (DeviceProfile::host_time_factor,
  // gather_footprint_factor, scatter_add_factor), its row gathers at their own share of the host.
  cost::Op on_ep_rank(const cost::Op& op, int rank) {
    cost::Op o = cost::on_ep_rank(op, l_.ep, st_.drop_policy() == strategy::BATCH_PRIORITY);
    o.host_time_factor = host_factor(rank);
    o.gather_share_factor = gather_share_factor(rank);
    o.gather_footprint_factor = gather_factor(rank);
    o.scatter_add_factor = scatter_add_factor(rank);
    return o;
  }

  // The rank's working set (cost::working_set_bytes), which the profile's footprint factors read.
  double working_set(int rank) const { return cost::working_set_bytes(memory_.ranks[static_cast<size_t>(rank)]); }
  double host_factor(int rank) { return profile(rank).host_time_factor(working_set(rank)); }
  double gather_factor(int rank) { return profile(rank).gather_footprint_factor(working_set(rank)); }
  double scatter_add_factor(int rank) { return profile(rank).scatter_add_factor(working_set(rank)); }

  // The kernel split over tensor parallelism.
  cost::Op tp_split(cost::Op op) const {
    const bool split = op.kind == cost::OpKind::kGemm || op.kind == cost::OpKind::kGroupedGemm ||
                       op.kind == cost::OpKind::kAttention || st_.sequence_parallel();
    if (split && l_.tp > 1) cost::scale_work(op, 1.0 / l_.tp);
    return op;
  }

  // `op`'s forward and (or) its backward kernels into `t`.
  void add_times(Times* t, const cost::DeviceProfile& prof, const cost::Op& op, bool recomputed, bool forward = true,
                 bool backward = true) {
    if (forward) {
      const double fwd = cost::op_time(prof, op, dtype_).time_s;
      t->fwd += fwd;
      t->flops_fwd += op.flops;
      if (recomputed) t->recompute += fwd;
    }
    if (!backward) return;
    for (const cost::Op& b : cost::backward_ops(op)) {
      t->bwd += cost::op_time(prof, b, dtype_).time_s;
      t->flops_bwd += b.flops;
    }
  }

  // Times of one part of a layer (not the routed experts), cached per (device type, layer, part,
  // host factors, gather factors, kept share). `kept_share` scales the MoE gathers' rows (the
  // dispatch's and the combine's): the share of the rank's assignments its experts' buffers kept.
  const Times& part_times(int rank, int layer_index, Part part, double kept_share = 1) {
    const int type = s_.cluster->device(rank).type;
    const auto key =
        std::make_tuple(type, layer_index, static_cast<int>(part), host_factor(rank), gather_share_factor(rank),
                        gather_factor(rank), scatter_add_factor(rank), kept_share);
    auto it = times_.find(key);
    if (it != times_.end()) return it->second;
    Times t;
    const Layer& layer = mc_.layers[layer_index];
    const cost::DeviceProfile& prof = profile(rank);
    for (const cost::Op& op : layer.ops) {
      const bool forward = part_of(layer, op.name) == part, backward = part_of(layer, op.name, true) == part;
      if (!forward && !backward) continue;
      cost::Op o = on_ep_rank(tp_split(op), rank);
      if (layer.moe && o.kind == cost::OpKind::kEmbedding) cost::scale_work(o, kept_share);
      add_times(&t, prof, o, recompute_ == workload::SELECTIVE && cost::recomputed_selectively(op), forward, backward);
    }
    return times_.emplace(key, t).first->second;
  }

  // The routed experts' kernels of one rank sized for `load` kept assignments on its share of the
  // experts (the model's kernels are sized for a balanced T k over all experts on one device).
  Times expert_times(const Layer& layer, double load, double tokens) {
    Times t;
    const cost::DeviceProfile& prof = profile(rank_);
    const double balanced = tokens * layer.routed_per_token;
    const double local_experts = static_cast<double>(layer.experts) / l_.ep;
    for (const cost::Op& op : layer.ops) {
      if (part_of(layer, op.name) != Part::kExperts) continue;
      cost::Op e = op;
      if (op.kind == cost::OpKind::kGroupedGemm) {
        const double rows = load / local_experts;
        const double weight_bytes = op.n * op.k * op.groups * act_bytes_;
        const double groups = std::max(1.0, std::round(local_experts));
        e.m = rows;
        e.groups = static_cast<int64_t>(groups);
        e.flops = 2 * rows * op.n * op.k * groups;
        e.bytes = (rows * op.k + rows * op.n) * groups * act_bytes_ + weight_bytes / l_.ep;
      } else {
        const double share = balanced > 0 ? load / balanced : 0;
        cost::scale_work(e, share);
      }
      add_times(&t, prof, tp_split(e), recompute_ == workload::SELECTIVE && cost::recomputed_selectively(op));
    }
    return t;
  }

  // Activation bytes a layer stores per micro-batch on a rank, as costmodel/memory.h counts them.
  int64_t stored_activations(const Layer& layer, double tokens) const {
    const double act_scale = (precision_ == workload::FP32 || precision_ == workload::TF32) ? 2.0 : 1.0;
    const double expert_scale = st_.drop_policy() == strategy::NO_DROP ? 1.0 : st_.capacity_factor();
    auto per_token = [&](const cost::ActivationBytes& a) {
      return a.sharded / l_.tp + a.replicated / (st_.sequence_parallel() ? l_.tp : 1) + a.expert * expert_scale / l_.tp;
    };
    double b = 0;
    if (recompute_ == workload::FULL) b = layer.act_full / (st_.sequence_parallel() ? l_.tp : 1);
    else if (recompute_ == workload::SELECTIVE) b = per_token(layer.act_selective);
    else b = per_token(layer.act_none);
    return static_cast<int64_t>(tokens * act_scale * b * layer.sample_share);
  }
  int64_t full_activations(const Layer& layer, double tokens) const {
    const double act_scale = (precision_ == workload::FP32 || precision_ == workload::TF32) ? 2.0 : 1.0;
    const cost::ActivationBytes& a = layer.act_none;
    return static_cast<int64_t>(tokens * act_scale * layer.sample_share *
                                (a.sharded / l_.tp + a.replicated / (st_.sequence_parallel() ? l_.tp : 1) +
                                 a.expert * st_.capacity_factor() / l_.tp));
  }

  // ---- collectives -------------------------------------------------------------------------
  int collective(const std::string& key, Collective::Op op, const char* algorithm, std::vector<int> ranks, double bytes,
                 int matrix = 0, bool transpose = false) {
    auto [it, fresh] = collective_index_.try_emplace(key, out_.collectives_size() + 1);
    if (fresh) {
      Collective* c = out_.add_collectives();
      c->set_op(op);
      c->set_algorithm(algorithm);
      for (int r : ranks) c->add_ranks(r);
      c->set_bytes(bytes);
      c->set_matrix(matrix);
      c->set_transpose(transpose);
      double factor = 0;
      for (int r : ranks) factor = std::max(factor, transfer_factor(r));
      if (factor != 1) c->set_transfer_factor(factor);
    }
    return it->second;
  }

  double transfer_factor(int rank) { return profile(rank).transfer_time_factor(working_set(rank)); }

  std::vector<int> tp_group(int p, int d) const {
    std::vector<int> g;
    for (int t = 0; t < l_.tp; ++t) g.push_back(rank_of(p, d, t));
    return g;
  }
  std::vector<int> dp_group(int p, int t) const {
    std::vector<int> g;
    for (int d = 0; d < l_.dp; ++d) g.push_back(rank_of(p, d, t));
    return g;
  }
  std::vector<int> ep_group(int p, int d, int t) const {
    std::vector<int> g;
    const int first = d / l_.ep * l_.ep;
    for (int j = 0; j < l_.ep; ++j) g.push_back(rank_of(p, first + j, t));
    return g;
  }
  std::vector<int> expert_dp_group(int p, int d, int t) const {
    std::vector<int> g;
    for (int j = d % l_.ep; j < l_.dp; j += l_.ep) g.push_back(rank_of(p, j, t));
    return g;
  }

  const char* a2a_algorithm() const { return st_.all_to_all() == strategy::HIERARCHICAL ? "hierarchical" : "direct"; }

  // The routing of MoE layer li in micro-batch mb (decode iteration, for inference) for the EP
  // group starting at data-parallel index g. With routing_samples = N > 0 there is a pool of N
  // draws per (experts, top-k, tokens) shape, and every (layer, micro-batch, group) picks one by a
  // seeded hash: layers and groups do not share their stragglers, and the cost is N draws, not
  // one per layer, micro-batch and group. With 0, every (layer, micro-batch, group) draws afresh.
  const Routing& routing(int li, int mb, int g, double tokens_per_rank, uint64_t salt) {
    const Layer& layer = mc_.layers[li];
    const bool pooled = o_.routing_samples > 0;
    const int64_t draw =
        pooled ? static_cast<int64_t>(mix(mix(mix(mix(o_.seed, salt), static_cast<uint64_t>(li)), static_cast<uint64_t>(mb)),
                                          static_cast<uint64_t>(g)) %
                                      static_cast<uint64_t>(o_.routing_samples))
               : mb;
    const auto key = std::make_tuple(pooled ? -1 : li, draw, layer.experts * 1024 + layer.top_k, pooled ? 0 : g,
                                     static_cast<int64_t>(tokens_per_rank), salt);
    auto it = routings_.find(key);
    if (it != routings_.end()) return it->second;
    cost::RoutingProblem prob;
    prob.tokens = std::max<int64_t>(1, static_cast<int64_t>(std::llround(tokens_per_rank * l_.ep)));
    prob.sources = l_.ep;
    prob.experts = layer.experts;
    prob.top_k = std::max(1, std::min(layer.top_k, layer.experts));
    prob.capacity_factor = st_.capacity_factor();
    prob.drop_policy = st_.drop_policy();
    prob.probabilities = probabilities_;
    auto inc = inclusion_.find(prob.top_k);
    if (inc == inclusion_.end()) inc = inclusion_.emplace(prob.top_k, cost::inclusion_probabilities(probabilities_, prob.top_k)).first;
    prob.inclusion = inc->second;
    prob.seed = mix(mix(mix(mix(mix(o_.seed, static_cast<uint64_t>(std::get<0>(key) + 1)), static_cast<uint64_t>(draw)),
                            static_cast<uint64_t>(std::get<2>(key))),
                        static_cast<uint64_t>(std::get<3>(key))),
                    salt);
    const cost::RoutingLoads loads = cost::routing_loads(prob);
    std::vector<double> kept(loads.sampled_load.size());
    for (size_t e = 0; e < kept.size(); ++e)
      kept[e] = static_cast<double>(std::min(loads.sampled_load[e], loads.capacity));
    Routing r;
    r.rank_load = cost::rank_loads(placement_, kept);
    r.expert_load = kept;
    const std::vector<int64_t> tokens_of = cost::tokens_per_source(prob.tokens, l_.ep);
    for (int i = 0; i < l_.ep; ++i) {
      const double assignments = static_cast<double>(tokens_of[i]) * layer.routed_per_token;
      const double rows = std::accumulate(loads.kept_by_source[i].begin(), loads.kept_by_source[i].end(), 0.0);
      r.kept_share.push_back(assignments > 0 ? std::min(1.0, rows / assignments) : 1.0);
    }
    // Source i sends rank j the assignments of its tokens that j's experts kept (a replicated
    // expert's split evenly over its copies, as rank_loads does): the capacity is the group's, so
    // under VANILLA the first ranks' tokens take the buffers first.
    ByteMatrix* m = out_.add_matrices();
    m->set_n(l_.ep);
    const double per_token = s_.cost.hidden * act_bytes_ / l_.tp;
    for (int i = 0; i < l_.ep; ++i)
      for (double rows : cost::rank_loads(placement_, loads.kept_by_source[i])) m->add_bytes(rows * per_token);
    r.matrix = out_.matrices_size();
    imbalance_sum_ += loads.imbalance;
    imbalance_max_ = std::max(imbalance_max_, loads.imbalance);
    dropped_sum_ += loads.dropped_fraction;
    ++routing_draws_;
    return routings_.emplace(key, std::move(r)).first->second;
  }

  // ---- one rank ------------------------------------------------------------------------------
  struct Emit {
    std::string id, name;
    OpKind kind = trace::OTHER;
    trace::StreamKind stream = trace::COMPUTE;
    int stream_index = 0;
    double duration_s = 0, flops = 0, bytes = 0;
    std::vector<int> deps;
    int collective = 0;
    int64_t alloc = 0, free = 0;
    int micro_batch = -1, layer = -1;
    bool backward = false;
  };

  int emit(const Emit& e) {
    const int index = rs_->ops_size();
    Op* op = rs_->add_ops();
    op->set_id(e.id);
    op->set_name(e.name);
    op->set_kind(e.kind);
    op->mutable_stream()->set_kind(e.stream);
    op->mutable_stream()->set_index(e.stream_index);
    op->set_duration_s(e.duration_s);
    if (e.stream == trace::COMPUTE && e.collective == 0 && e.duration_s > 0)
      op->set_gap_s((profile(rank_).step_spread_factor(ranks_on_host(rank_)) - 1) * e.duration_s);
    op->set_flops(e.flops);
    for (int d : e.deps)
      if (d >= 0) op->add_deps(d);
    // Deps gathered by dep_after (a received activation, gathered weights) go onto the next
    // compute op.
    if (e.stream == trace::COMPUTE) {
      for (int d : pending_deps_)
        if (d < index) op->add_deps(d);
      pending_deps_.clear();
    }
    op->set_collective(e.collective);
    op->set_alloc_bytes(e.alloc);
    op->set_free_bytes(e.free);
    op->set_micro_batch(e.micro_batch);
    op->set_layer(e.layer);
    op->set_backward(e.backward);
    op->set_bytes(e.bytes);
    return rs_->ops_size() - 1;
  }

  // The profile's factor for `rank` sharing its node with the plan's ranks there (itself included),
  // for every op and (second) for its row gathers; counted once per rank, and only for profiles
  // calibrated with several ranks per host.
  std::pair<double, double> host_shares(int rank) {
    const cost::DeviceProfile& prof = profile(rank);
    if (prof.spec().ranks_per_host() <= 1) return {1.0, 1.0};
    auto [it, fresh] = host_share_.try_emplace(rank, 1.0, 1.0);
    if (fresh) {
      const int here = ranks_on_host(rank);
      it->second = {prof.host_share_factor(here), prof.host_share_factor(here, true)};
    }
    return it->second;
  }
  // The plan's ranks on `rank`'s host, itself included.
  int ranks_on_host(int rank) {
    auto [it, fresh] = ranks_on_host_.try_emplace(rank, 0);
    if (fresh)
      for (int r = 0; r < l_.devices; ++r) it->second += s_.cluster->device(r).node == s_.cluster->device(rank).node;
    return it->second;
  }
  double host_share_factor(int rank) { return host_shares(rank).first; }
  // The row gathers' on top of it (cost::Op gather_share_factor).
  double gather_share_factor(int rank) {
    const auto [all, gathers] = host_shares(rank);
    return gathers / all;
  }

  int compute(std::string id, std::string name, double duration, double flops, std::vector<int> deps, int mb, int layer,
              bool bwd, OpKind kind = trace::GEMM, int64_t alloc = 0, int64_t free = 0) {
    Emit e;
    e.id = std::move(id);
    e.name = std::move(name);
    e.kind = kind;
    // The op's kernels at its kind's factor, plus what the host spends around them (profile
    // op_kind, op_overhead_s), at the pace of a rank sharing its host with as many of the plan's
    // ranks as it does.
    if (duration > 0) {
      const cost::DeviceProfile& p = profile(rank_);
      const double kind = p.spec().op_kind().empty() ? 1.0 : p.op_kind_factor(trace::op_kind_label(e.name), bwd);
      duration = (duration * kind + p.op_overhead_s()) * host_share_factor(rank_);
    }
    e.duration_s = duration;
    e.flops = flops;
    e.deps = std::move(deps);
    e.micro_batch = mb;
    e.layer = layer;
    e.backward = bwd;
    e.alloc = alloc;
    e.free = free;
    return emit(e);
  }

  int comm(std::string id, std::string name, OpKind kind, int stream_index, int coll, std::vector<int> deps, int mb,
           int layer, bool bwd) {
    Emit e;
    e.id = std::move(id);
    e.name = std::move(name);
    e.kind = kind;
    e.stream = trace::COMM;
    e.stream_index = stream_index;
    e.collective = coll;
    e.bytes = out_.collectives(coll - 1).bytes();
    if (out_.collectives(coll - 1).op() == Collective::ALL_TO_ALL_V) {
      const ByteMatrix& m = out_.matrices(out_.collectives(coll - 1).matrix() - 1);
      double sum = 0;
      for (double b : m.bytes()) sum += b;
      e.bytes = sum / m.n();  // nccl-tests' size: the mean send buffer
    }
    e.deps = std::move(deps);
    e.micro_batch = mb;
    e.layer = layer;
    e.backward = bwd;
    return emit(e);
  }

  static std::string op_id(const std::string& what, int mb, const char* phase) {
    return mb >= 0 ? fmt::format("{} mb{} {}", what, mb, phase) : fmt::format("{} {}", what, phase);
  }

  // TP collective(s) after a part; returns the op the next compute waits for.
  int tp_sync(const std::string& what, int after, int mb, int layer, bool bwd, const char* phase) {
    if (l_.tp == 1) return after;
    const double bytes = tokens_ * s_.cost.hidden * act_bytes_ * mc_.layers[layer].sample_share;
    const std::vector<int> g = tp_group(p_, d_);
    const std::string base = op_id(what, mb, phase);
    const std::string key = fmt::format("{}@{}", base, g[0]);
    if (!st_.sequence_parallel()) {
      int c = collective(key, Collective::ALL_REDUCE, "ring", g, bytes);
      return comm(base, "tp_allreduce", trace::ALL_REDUCE, kLayerComm, c, {after}, mb, layer, bwd);
    }
    int c1 = collective(key + ".rs", Collective::REDUCE_SCATTER, "ring", g, bytes);
    int rs = comm(op_id(what + ".rs", mb, phase), "tp_reduce_scatter", trace::REDUCE_SCATTER, kLayerComm, c1, {after}, mb,
                  layer, bwd);
    int c2 = collective(key + ".ag", Collective::ALL_GATHER, "ring", g, bytes);
    return comm(op_id(what + ".ag", mb, phase), "tp_all_gather", trace::ALL_GATHER, kLayerComm, c2, {rs}, mb, layer, bwd);
  }

  // The MoE block of a layer in one direction; returns the op that ends it.
  int moe_block(int li, int mb, int before, const char* phase, bool bwd, double tokens, uint64_t salt) {
    const Layer& layer = mc_.layers[li];
    const std::string& n = layer.name;
    const int chunks = std::max(1, st_.overlap_chunks());
    const std::vector<int> group = ep_group(p_, d_, t_);
    const Routing& r = routing(li, mb, d_ / l_.ep * l_.ep, tokens, salt);
    double load = r.rank_load[d_ % l_.ep];
    if (fold_) load = *std::max_element(r.rank_load.begin(), r.rank_load.end());  // the group's straggler
    const double kept_share =
        fold_ ? *std::max_element(r.kept_share.begin(), r.kept_share.end()) : r.kept_share[d_ % l_.ep];
    if (!bwd && std::string(phase) == "fwd" && d_ % l_.ep == 0 && t_ == 0) count_expert_load(li, group[0], r.expert_load);
    const Times ex = expert_times(layer, load / chunks, tokens / chunks);
    // With EP > 1 the forward's routing decision waits for the group's routing metadata, and the
    // permutation into the send layout follows it; else the gate op holds the permutation.
    const bool routed = !bwd && l_.ep > 1;
    const Times& permute = part_times(rank_, li, Part::kPermute, kept_share);
    Times gate = part_times(rank_, li, Part::kGate);
    if (!routed) gate += permute;
    const Times& shared = part_times(rank_, li, Part::kShared);
    const Times& combine = part_times(rank_, li, Part::kCombine, kept_share);
    auto dur = [&](const Times& t, double k = 1) { return (bwd ? t.bwd : t.fwd) * k; };
    auto fl = [&](const Times& t, double k = 1) { return (bwd ? t.flops_bwd : t.flops_fwd) * k; };

    // Forward: gate -> dispatch -> experts -> combine a2a -> combine. Backward: combine ->
    // combine a2a (dispatch direction) -> experts -> dispatch a2a (combine direction) -> gate.
    int first = compute(op_id(n + (bwd ? ".moe.combine" : ".moe.gate"), mb, phase), bwd ? "moe.combine" : "moe.gate",
                        bwd ? dur(combine) : dur(gate), bwd ? fl(combine) : fl(gate), {before}, mb, li, bwd,
                        bwd ? trace::COMBINE : trace::GATE);
    if (routed) {
      // The group's routing metadata (cost::route_bytes_per_rank); the output's size.
      const double bytes =
          cost::route_bytes_per_rank(tokens, layer.routed_per_token, layer.experts) * static_cast<double>(group.size());
      const std::string id = op_id(n + ".moe.route", mb, phase);
      const int coll = collective(fmt::format("{}@{}", id, group[0]), Collective::ALL_GATHER, "ring", group, bytes);
      const int route = comm(id, "moe.route", trace::ALL_GATHER, kLayerComm, coll, {first}, mb, li, bwd);
      first = compute(op_id(n + ".moe.permute", mb, phase), "moe.permute", dur(permute), fl(permute), {route}, mb, li,
                      bwd, trace::ELEMENTWISE);
    }
    int last_compute = first;
    if (shared.fwd > 0)
      last_compute = compute(op_id(n + ".moe.shared", mb, phase), "moe.shared", dur(shared), fl(shared), {}, mb, li, bwd);
    std::vector<int> in(chunks), experts(chunks), out(chunks);
    const char* in_name = bwd ? "moe.combine_a2a" : "moe.dispatch_a2a";
    const char* out_name = bwd ? "moe.dispatch_a2a" : "moe.combine_a2a";
    for (int c = 0; c < chunks; ++c) {
      if (l_.ep == 1) {
        in[c] = first;
        continue;
      }
      const std::string what = fmt::format("{}.{}{}", n, in_name, chunks > 1 ? fmt::format(".c{}", c) : "");
      const std::string id = op_id(what, mb, phase);
      const int coll = a2a(id, group, r.matrix, /*transpose=*/false, chunks);
      in[c] = comm(id, in_name, trace::ALL_TO_ALL, kLayerComm, coll, {first}, mb, li, bwd);
    }
    const int fetched = prefetch(li, mb, phase, bwd);
    for (int c = 0; c < chunks; ++c) {
      const std::string sfx = chunks > 1 ? fmt::format(".c{}", c) : "";
      experts[c] = compute(op_id(n + ".moe.experts" + sfx, mb, phase), "moe.experts", dur(ex), fl(ex), {in[c], fetched}, mb, li,
                           bwd, trace::GROUPED_GEMM);
      last_compute = experts[c];
      if (l_.ep == 1) {
        out[c] = experts[c];
        continue;
      }
      const std::string what = fmt::format("{}.{}{}", n, out_name, sfx);
      const std::string id = op_id(what, mb, phase);
      const int coll = a2a(id, group, r.matrix, /*transpose=*/true, chunks);
      out[c] = comm(id, out_name, trace::ALL_TO_ALL, kLayerComm, coll, {experts[c]}, mb, li, bwd);
    }
    recent_experts_.push_back(experts.back());
    std::vector<int> deps = out;
    deps.push_back(last_compute);
    const int end = compute(op_id(n + (bwd ? ".moe.gate" : ".moe.combine"), mb, phase), bwd ? "moe.gate" : "moe.combine",
                            bwd ? dur(gate) : dur(combine), bwd ? fl(gate) : fl(combine), deps, mb, li, bwd,
                            bwd ? trace::GATE : trace::COMBINE);
    return tp_sync(n + ".moe.tp_allreduce", end, mb, li, bwd, phase);
  }

  // The step's expert histogram: kept tokens per expert, per MoE layer and EP group.
  void count_expert_load(int li, int group_rank, const std::vector<double>& load) {
    std::vector<double>& sum = expert_load_[{li, group_rank}];
    sum.resize(load.size(), 0);
    for (size_t e = 0; e < load.size(); ++e) sum[e] += load[e];
  }

  // Expert offload: the layer's offloaded expert weights copied in over PCIe on the copy stream,
  // once the buffer of the MoE layer prefetch_layers uses back is free. -1 without offload.
  int prefetch(int li, int mb, const char* phase, bool bwd) {
    if (!st_.has_offload() || st_.offload().expert_fraction() <= 0) return -1;
    const Layer& layer = mc_.layers[li];
    const double weight_bytes = mixed(precision_) ? 2 : 4;
    const double bytes = layer.expert_params / l_.ep / l_.tp * weight_bytes * st_.offload().expert_fraction();
    const double pcie = s_.cluster->spec().has_node() && s_.cluster->spec().node().pcie().device_bandwidth_bps() > 0
                            ? s_.cluster->spec().node().pcie().device_bandwidth_bps()
                            : kDefaultPcie_Bps;
    Emit e;
    e.id = op_id(layer.name + ".moe.prefetch", mb, phase);
    e.name = "moe.prefetch";
    e.kind = trace::MEMCPY;
    e.stream = trace::COPY;
    e.duration_s = bytes / pcie;
    e.bytes = bytes;
    const size_t ahead = static_cast<size_t>(std::max(1, st_.offload().prefetch_layers()));
    if (recent_experts_.size() >= ahead) e.deps.push_back(recent_experts_[recent_experts_.size() - ahead]);
    e.micro_batch = mb;
    e.layer = li;
    e.backward = bwd;
    return emit(e);
  }

  // An all-to-all-v of one overlap chunk (1/chunks of the matrix).
  int a2a(const std::string& id, const std::vector<int>& group, int matrix, bool transpose, int chunks) {
    int m = matrix;
    if (chunks > 1) {
      auto it = chunk_matrix_.find(matrix);
      if (it == chunk_matrix_.end()) {
        ByteMatrix* cm = out_.add_matrices();
        *cm = out_.matrices(matrix - 1);
        for (double& b : *cm->mutable_bytes()) b /= chunks;
        it = chunk_matrix_.emplace(matrix, out_.matrices_size()).first;
      }
      m = it->second;
    }
    return collective(fmt::format("{}@{}", id, group[0]), Collective::ALL_TO_ALL_V, a2a_algorithm(), group, 0, m, transpose);
  }

  // One layer, forward ("fwd" / "recompute") or backward; returns the last op.
  int layer_ops(int li, int mb, int before, bool bwd, const char* phase, double tokens, uint64_t salt) {
    const Layer& layer = mc_.layers[li];
    const std::string& n = layer.name;
    const bool recompute_pass = std::string(phase) == "recompute";
    const int64_t stored = (training_ && !recompute_pass) ? stored_activations(layer, tokens) : 0;
    auto dur = [&](const Times& t) { return bwd ? t.bwd : t.fwd; };
    auto fl = [&](const Times& t) { return bwd ? t.flops_bwd : t.flops_fwd; };
    if (layer.kind != LayerKind::kTransformer) {
      const Times& t = part_times(rank_, li, Part::kWhole);
      OpKind kind = layer.kind == LayerKind::kEmbedding ? trace::ELEMENTWISE : trace::GEMM;
      if (!bwd && !recompute_pass) stored_[{li, mb}] = stored;
      return compute(op_id(n, mb, phase), n, dur(t), fl(t), {before}, mb, li, bwd, kind, bwd ? 0 : stored,
                     bwd ? stored_of(li, mb) : 0);
    }
    const Times& attn = part_times(rank_, li, Part::kAttn);
    if (!bwd) {
      int a = compute(op_id(n + ".attn", mb, phase), "attn", dur(attn), fl(attn), {before}, mb, li, false, trace::ATTENTION,
                      stored);
      if (!recompute_pass) stored_[{li, mb}] = stored;
      a = tp_sync(n + ".attn.tp_allreduce", a, mb, li, false, phase);
      if (layer.moe) return moe_block(li, mb, a, phase, false, tokens, salt);
      const Times& mlp = part_times(rank_, li, Part::kMlp);
      int m = compute(op_id(n + ".mlp", mb, phase), "mlp", dur(mlp), fl(mlp), {a}, mb, li, false);
      return tp_sync(n + ".mlp.tp_allreduce", m, mb, li, false, phase);
    }
    int x = before;
    if (layer.moe) {
      x = moe_block(li, mb, x, phase, true, tokens, salt);
    } else {
      const Times& mlp = part_times(rank_, li, Part::kMlp);
      x = compute(op_id(n + ".mlp", mb, phase), "mlp", dur(mlp), fl(mlp), {x}, mb, li, true);
      x = tp_sync(n + ".mlp.tp_allreduce", x, mb, li, true, phase);
    }
    x = compute(op_id(n + ".attn", mb, phase), "attn", dur(attn), fl(attn), {x}, mb, li, true, trace::ATTENTION, 0,
                stored_of(li, mb));
    return tp_sync(n + ".attn.tp_allreduce", x, mb, li, true, phase);
  }

  int64_t stored_of(int li, int mb) {
    auto it = stored_.find({li, mb});
    if (it == stored_.end()) return 0;
    const int64_t b = it->second;
    stored_.erase(it);
    return b;
  }

  // Recompute before a layer's backward: selective kernels, or the whole forward.
  int recompute(int li, int mb, int before, double tokens, uint64_t salt) {
    const Layer& layer = mc_.layers[li];
    if (recompute_ == workload::SELECTIVE) {
      double t = 0;
      for (Part part : {Part::kAttn, Part::kMlp, Part::kGate, Part::kPermute, Part::kShared, Part::kCombine, Part::kWhole})
        t += part_times(rank_, li, part).recompute;
      if (layer.moe) {
        // The routed experts' down projections for the rank's tokens.
        const Routing& r = routing(li, mb, d_ / l_.ep * l_.ep, tokens, salt);
        const double load = fold_ ? *std::max_element(r.rank_load.begin(), r.rank_load.end()) : r.rank_load[d_ % l_.ep];
        t += expert_times(layer, load, tokens).recompute;
      }
      if (t <= 0) return before;
      return compute(op_id(layer.name + ".recompute", mb, "bwd"), "recompute", t, 0, {before}, mb, li, true);
    }
    if (recompute_ == workload::FULL) {
      const int64_t working = full_activations(layer, tokens);
      const int first = rs_->ops_size();
      int x = layer_ops(li, mb, before, false, "recompute", tokens, salt);
      rs_->mutable_ops(first)->set_alloc_bytes(rs_->ops(first).alloc_bytes() + working);
      pending_free_ = working;
      return x;
    }
    return before;
  }

  // Gradient buckets: layer li's gradients are final (its last micro-batch's backward ended at op
  // `done`); add them and flush full buckets.
  void add_gradients(int li, int done, bool flush_all) {
    const Layer& layer = mc_.layers[li];
    dense_bucket_ += layer.dense_params / l_.tp * grad_bytes_;
    if (layer.dense_params > 0) dense_bucket_layers_.push_back(li);
    if (layer.moe) {
      expert_bucket_ += layer.expert_params / l_.ep / l_.tp * grad_bytes_;
      expert_bucket_layers_.push_back(li);
    }
    bucket_dep_ = done;
    if (dense_bucket_ >= bucket_bytes_ || flush_all) flush(false);
    if (expert_bucket_ >= bucket_bytes_ || flush_all) flush(true);
  }

  void flush(bool experts) {
    double& bytes = experts ? expert_bucket_ : dense_bucket_;
    std::vector<int>& layers = experts ? expert_bucket_layers_ : dense_bucket_layers_;
    if (bytes <= 0) return;
    const std::vector<int> group = experts ? expert_dp_group(p_, d_, t_) : dp_group(p_, t_);
    if (group.size() > 1) {
      const int k = experts ? expert_buckets_++ : dense_buckets_++;
      const std::string what = fmt::format("{}grad_bucket{}", experts ? "expert_" : "", k);
      const bool rs = st_.zero_stage() >= 1;
      const int c = collective(fmt::format("{}@{}", what, group[0]), rs ? Collective::REDUCE_SCATTER : Collective::ALL_REDUCE,
                               "ring", group, bytes);
      grad_ops_.push_back(comm(what, rs ? "grad_reduce_scatter" : "grad_allreduce", rs ? trace::REDUCE_SCATTER : trace::ALL_REDUCE,
                               kDataParallelComm, c, {bucket_dep_}, -1, -1, true));
      for (int li : layers) rs_->mutable_ops(grad_ops_.back())->add_grad_layers(li);
      if (st_.zero_stage() == 1 || st_.zero_stage() == 2) gathers_.push_back({what, bytes, experts});
    }
    bytes = 0;
    layers.clear();
  }

  void optimizer_step(int last) {
    const cost::RankMemory& m = memory_.ranks[rank_];
    const double bytes = 2 * (m.weights_bytes + m.gradients_bytes + m.optimizer_bytes);
    cost::Op op;
    op.name = "optimizer";
    op.kind = cost::OpKind::kOptimizer;
    op.bytes = bytes;
    // The parameters this rank updates: those whose gradients it holds.
    op.flops = m.gradients_bytes / grad_bytes_ *
               (s_.workload->training().optimizer() == workload::SGD ? cost::kSgdFlopsPerParameter
                                                                      : cost::kAdamFlopsPerParameter);
    const double t = cost::op_time(profile(rank_), op, dtype_).time_s;
    std::vector<int> deps = grad_ops_;
    deps.push_back(last);
    const int opt = compute("optimizer", "optimizer", t, 0, deps, -1, -1, false, trace::OPTIMIZER);
    for (const auto& g : gathers_) {
      const std::vector<int> group = g.experts ? expert_dp_group(p_, d_, t_) : dp_group(p_, t_);
      const std::string what = g.what + ".param_allgather";
      const int c = collective(fmt::format("{}@{}", what, group[0]), Collective::ALL_GATHER, "ring", group, g.bytes);
      comm(what, "param_allgather", trace::ALL_GATHER, kDataParallelComm, c, {opt}, -1, -1, false);
    }
  }

  // ZeRO-3: the layer's weights gathered before it runs.
  int zero3_gather(int li, int mb, const char* phase) {
    if (st_.zero_stage() < 3 || l_.dp == 1) return -1;
    const Layer& layer = mc_.layers[li];
    const double bytes = layer.dense_params / l_.tp * grad_bytes_;
    if (bytes <= 0) return -1;
    const std::vector<int> group = dp_group(p_, t_);
    const std::string id = op_id(layer.name + ".zero3_allgather", mb, phase);
    const int c = collective(fmt::format("{}@{}", id, group[0]), Collective::ALL_GATHER, "ring", group, bytes);
    return comm(id, "zero3_allgather", trace::ALL_GATHER, kDataParallelComm, c, {}, mb, li, std::string(phase) == "bwd");
  }

  // Pipeline point-to-point between global chunks `from` and `to` for micro-batch mb.
  int p2p(bool send, bool grads, int chunk, int peer_chunk, int mb, int dep) {
    const int here = rank_;
    const int peer_stage = peer_chunk % l_.pp;
    const int peer = rank_of(peer_stage, d_, t_);
    const int src = send ? here : peer, dst = send ? peer : here;
    const double bytes = s_.cost.hidden > 0 ? tokens_now_ * s_.cost.hidden * act_bytes_ / (st_.sequence_parallel() ? l_.tp : 1)
                                            : tokens_now_ * activation_bytes_at(std::min(chunk, peer_chunk));
    const std::string what = fmt::format("{}{}", grads ? "grad" : "act", send ? "_send" : "_recv");
    const std::string id = fmt::format("pp.{} c{}->c{} mb{}", grads ? "grad" : "act", send ? chunk : peer_chunk,
                                       send ? peer_chunk : chunk, mb);
    const int c = collective(fmt::format("{} {}->{}", id, src, dst), Collective::SEND_RECV, "direct", {src, dst}, bytes);
    const int local_chunk = chunk / l_.pp;
    const int channel = kFirstP2pComm + 4 * local_chunk + (grads ? 2 : 0) + (send ? 1 : 0);
    return comm(id + (send ? " send" : " recv"), what, send ? trace::SEND : trace::RECV, channel, c,
                dep >= 0 ? std::vector<int>{dep} : std::vector<int>{}, mb, -1, grads);
  }

  // Bytes per token (sample) leaving the last layer of chunk c (CNNs: that layer's activations).
  double activation_bytes_at(int c) const {
    const Layer& layer = mc_.layers[chunk_layers_[c].back()];
    return layer.act_none.total() / std::max(1.0, static_cast<double>(l_.tp));
  }

  // Forward or backward micro-step of one global chunk.
  int micro_step(bool bwd, int chunk, int mb, int before, bool last_backward_of_chunk) {
    const std::vector<int>& layers = chunk_layers_[chunk];
    tokens_now_ = tokens_;
    int x = before;
    const char* phase = bwd ? "bwd" : "fwd";
    if (!bwd && chunk > 0) x = dep_after(p2p(false, false, chunk, chunk - 1, mb, -1), x);
    if (bwd && chunk + 1 < chunks_) x = dep_after(p2p(false, true, chunk, chunk + 1, mb, -1), x);
    if (!bwd) {
      for (int li : layers) {
        const int g = zero3_gather(li, mb, phase);
        x = layer_ops(li, mb, dep_after(g, x), false, phase, tokens_, 0);
      }
      if (chunk + 1 < chunks_) p2p(true, false, chunk, chunk + 1, mb, x);
      return x;
    }
    for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
      const int li = *it;
      const int g = zero3_gather(li, mb, phase);
      x = dep_after(g, x);
      pending_free_ = 0;
      x = recompute(li, mb, x, tokens_, 0);
      const int64_t working = pending_free_;
      x = layer_ops(li, mb, x, true, phase, tokens_, 0);
      if (working > 0) rs_->mutable_ops(x)->set_free_bytes(rs_->ops(x).free_bytes() + working);
      if (last_backward_of_chunk && training_) add_gradients(li, x, false);
    }
    if (chunk > 0) p2p(true, true, chunk, chunk - 1, mb, x);
    return x;
  }

  // The op to depend on next: `x`, with `extra` (when there is one) added to the deps of the next
  // compute op emitted.
  int dep_after(int extra, int x) {
    if (extra < 0) return x;
    if (x < 0) return extra;
    pending_deps_.push_back(extra);
    return x;
  }

  void lower_rank(int p, int d, int t) {
    p_ = p;
    d_ = d;
    t_ = t;
    rank_ = rank_of(p, d, t);
    rs_ = out_.add_ranks();
    rs_->set_rank(rank_);
    rs_->set_represents(fold_ ? l_.dp : 1);
    rs_->set_stage(p);
    const cost::RankMemory& m = memory_.ranks[rank_];
    const double dynamic = training_ ? m.activations_bytes : 0;
    rs_->set_static_bytes(static_cast<int64_t>(m.total_bytes - dynamic));
    rs_->set_capacity_bytes(static_cast<int64_t>(m.capacity_bytes));
    stored_.clear();
    grad_ops_.clear();
    recent_experts_.clear();
    gathers_.clear();
    dense_bucket_ = expert_bucket_ = 0;
    dense_bucket_layers_.clear();
    expert_bucket_layers_.clear();
    dense_buckets_ = expert_buckets_ = 0;
    if (training_) train_steps();
    else inference_steps();
  }

  // The micro-step order of this stage: (backward, local chunk, micro-batch).
  struct Step {
    bool bwd;
    int local_chunk;
    int mb;
  };
  std::vector<Step> pipeline_order() const {
    const int m = static_cast<int>(l_.micro_batches), v = l_.virtual_stages, pp = l_.pp;
    std::vector<Step> fwd, bwd;
    for (int k = 0; k < m * v; ++k) {
      const int group = k / (pp * v), r = k % (pp * v);
      const int size = std::min(pp, m - group * pp);
      const int chunk = v == 1 ? 0 : r / size, mb = v == 1 ? k : group * pp + r % size;
      fwd.push_back({false, chunk, mb});
      bwd.push_back({true, v - 1 - chunk, mb});
    }
    std::vector<Step> order;
    if (st_.schedule() == strategy::GPIPE || !training_) {
      order = fwd;
      if (training_) order.insert(order.end(), bwd.begin(), bwd.end());
      return order;
    }
    int warmup = v == 1 ? std::min(pp - p_ - 1, m) : std::min((pp - p_ - 1) * 2 + (v - 1) * pp, m * v);
    size_t f = 0, b = 0;
    for (int i = 0; i < warmup; ++i) order.push_back(fwd[f++]);
    while (f < fwd.size()) {
      order.push_back(fwd[f++]);
      order.push_back(bwd[b++]);
    }
    while (b < bwd.size()) order.push_back(bwd[b++]);
    return order;
  }

  void train_steps() {
    const std::vector<Step> order = pipeline_order();
    // The last backward micro-step of each local chunk: where its gradients become final.
    std::map<int, size_t> last_bwd;
    for (size_t i = 0; i < order.size(); ++i)
      if (order[i].bwd) last_bwd[order[i].local_chunk] = i;
    int x = -1;
    for (size_t i = 0; i < order.size(); ++i) {
      const Step& s = order[i];
      const int chunk = s.local_chunk * l_.pp + p_;
      x = micro_step(s.bwd, chunk, s.mb, x, last_bwd[s.local_chunk] == i);
    }
    // Flush what is left in the buckets, then the optimizer.
    if (dense_bucket_ > 0) flush(false);
    if (expert_bucket_ > 0) flush(true);
    optimizer_step(x);
  }

  void inference_steps() {
    // Prefill: forward micro-steps of every chunk in pipeline order.
    int x = -1;
    for (const Step& s : pipeline_order()) {
      x = micro_step(false, s.local_chunk * l_.pp + p_, s.mb, x, false);
    }
    const workload::Inference& inf = s_.workload->inference();
    const int generated = inf.generated_tokens();
    if (generated <= 0 || !mc_.per_token) return;
    // Decode: one token per sequence per iteration, the batch in one pass per chunk.
    const double batch = static_cast<double>(l_.micro_batch) * l_.micro_batches;
    cost::ModelOptions mo;
    mo.sequence = seq_;
    mo.tokens = batch;
    mo.act_elem_bytes = act_bytes_;
    const cost::ModelCost decode = cost::analyze(*s_.model, mo);
    for (int i = 0; i < generated; ++i) {
      const double ctx = seq_ + i;
      for (int lc = 0; lc < l_.virtual_stages; ++lc) {
        const int chunk = lc * l_.pp + p_;
        tokens_now_ = batch;
        const std::string step = fmt::format("decode{}", i);
        if (chunk > 0) x = dep_after(p2p(false, false, chunk, chunk - 1, -1 - i, -1), x);
        for (int li : chunk_layers_[chunk]) x = decode_layer(decode, li, i, ctx, batch, x, step);
        if (chunk + 1 < chunks_) p2p(true, false, chunk, chunk + 1, -1 - i, x);
      }
    }
  }

  int decode_layer(const cost::ModelCost& decode, int li, int iter, double ctx, double batch, int before,
                   const std::string& phase) {
    const Layer& layer = decode.layers[li];
    const cost::DeviceProfile& prof = profile(rank_);
    double t = 0, flops = 0;
    for (const cost::Op& op : layer.ops) {
      if (part_of(layer, op.name) == Part::kExperts) continue;
      cost::Op o = op;
      if (op.kind == cost::OpKind::kAttention) {
        // One query per sequence against ctx cached keys: FLOPs at the prefill kernel's cost per
        // (query, key, head), bytes = the KV cache read.
        const cost::Op* pre = nullptr;
        for (const cost::Op& q : mc_.layers[li].ops)
          if (q.kind == cost::OpKind::kAttention && !pre) pre = &q;
        if (pre && pre->m > 0 && pre->n > 0) {
          const double heads = static_cast<double>(pre->groups) / l_.micro_batch;
          o.m = 1;
          o.n = ctx;
          o.k = pre->k;
          o.groups = std::max<int64_t>(1, std::llround(heads * batch));
          o.flops = pre->flops / (pre->m * pre->n * static_cast<double>(pre->groups)) * ctx * heads * batch;
        }
        o.bytes = batch * ctx * mc_.layers[li].kv_cache_bytes;
      }
      const cost::Op split = on_ep_rank(tp_split(o), rank_);
      t += cost::op_time(prof, split, dtype_).time_s;
      flops += split.flops;
    }
    const int mb = -1;
    int x = compute(fmt::format("{} {}", layer.name, phase), layer.name, t, flops, {before}, mb, li, false,
                    layer.kind == LayerKind::kTransformer ? trace::ATTENTION : trace::GEMM);
    if (layer.moe && l_.ep > 1) {
      // Each sequence's token goes to its experts: a small all-to-all-v, its experts, and back.
      const Routing& r = routing(li, iter, d_ / l_.ep * l_.ep,
                                 batch, 0x6465636f6465ULL);
      const std::vector<int> group = ep_group(p_, d_, t_);
      const std::string in_id = fmt::format("{}.moe.dispatch_a2a {}", layer.name, phase);
      int a = comm(in_id, "moe.dispatch_a2a", trace::ALL_TO_ALL, kLayerComm, a2a(in_id, group, r.matrix, false, 1), {x}, mb, li,
                   false);
      double load = fold_ ? *std::max_element(r.rank_load.begin(), r.rank_load.end()) : r.rank_load[d_ % l_.ep];
      const Times ex = expert_times(layer, load, batch);
      int e = compute(fmt::format("{}.moe.experts {}", layer.name, phase), "moe.experts", ex.fwd, ex.flops_fwd, {a}, mb, li,
                      false, trace::GROUPED_GEMM);
      const std::string out_id = fmt::format("{}.moe.combine_a2a {}", layer.name, phase);
      x = comm(out_id, "moe.combine_a2a", trace::ALL_TO_ALL, kLayerComm, a2a(out_id, group, r.matrix, true, 1), {e}, mb, li,
               false);
      x = compute(fmt::format("{}.moe.combine {}", layer.name, phase), "moe.combine", 0, 0, {x}, mb, li, false, trace::COMBINE);
    } else if (layer.moe) {
      const Times ex = expert_times(layer, batch * layer.routed_per_token, batch);
      x = compute(fmt::format("{}.moe.experts {}", layer.name, phase), "moe.experts", ex.fwd, ex.flops_fwd, {x}, mb, li, false,
                  trace::GROUPED_GEMM);
    }
    return tp_sync(layer.name + ".tp_allreduce", x, mb, li, false, phase.c_str());
  }

  const cost::Setup& s_;
  const cost::Layout& l_;
  const strategy::Strategy& st_;
  LoweringOptions o_;
  bool training_ = true;
  workload::Precision precision_ = workload::BF16;
  cost::DType dtype_ = cost::DType::kBf16;
  workload::Recompute recompute_ = workload::NONE;
  int seq_ = 0;
  double tokens_ = 0, tokens_now_ = 0;
  cost::ModelCost mc_;
  int chunks_ = 1;
  std::vector<std::vector<int>> chunk_layers_;
  bool fold_ = false;
  cost::MemoryReport memory_;
  double grad_bytes_ = 2, bucket_bytes_ = 0;
  double act_bytes_ = 2;  // activations and a2a payloads (cost::activation_bytes)
  int experts_ = 0;
  std::vector<double> probabilities_;
  std::map<int, std::vector<double>> inclusion_;  // by top_k
  cost::ExpertPlacementMap placement_;

  Schedule out_;
  std::map<int, cost::DeviceProfile> profiles_;
  std::map<int, std::pair<double, double>> host_share_;  // rank -> host_shares
  std::map<int, int> ranks_on_host_;                     // rank -> ranks_on_host
  std::map<std::tuple<int, int, int, double, double, double, double, double>, Times> times_;
  std::unordered_map<std::string, int> collective_index_;
  std::map<std::tuple<int, int64_t, int, int, int64_t, uint64_t>, Routing> routings_;
  std::map<int, int> chunk_matrix_;
  std::map<std::pair<int, int>, std::vector<double>> expert_load_;  // (layer, group's first rank)
  double imbalance_sum_ = 0, imbalance_max_ = 0, dropped_sum_ = 0;
  int routing_draws_ = 0;

  // The rank being lowered.
  RankSchedule* rs_ = nullptr;
  int p_ = 0, d_ = 0, t_ = 0, rank_ = 0;
  std::map<std::pair<int, int>, int64_t> stored_;  // (layer, mb) -> activation bytes held
  std::vector<int> grad_ops_, pending_deps_, recent_experts_;
  std::vector<int> dense_bucket_layers_, expert_bucket_layers_;  // layers whose gradients the open buckets hold
  struct Gather {
    std::string what;
    double bytes;
    bool experts;
  };
  std::vector<Gather> gathers_;
  double dense_bucket_ = 0, expert_bucket_ = 0;
  int dense_buckets_ = 0, expert_buckets_ = 0, bucket_dep_ = -1;
  int64_t pending_free_ = 0;
};

}  // namespace

cost::DType compute_dtype(const workload::Workload& w) {
  switch (w.has_training() ? w.training().precision() : w.inference().precision()) {
    case workload::FP32: return cost::DType::kFp32;
    case workload::TF32: return cost::DType::kTf32;
    case workload::FP16: return cost::DType::kFp16;
    case workload::FP8: return cost::DType::kFp8;
    default: return cost::DType::kBf16;
  }
}

Schedule lower(const cost::Setup& setup, const LoweringOptions& options) { return Lowering(setup, options).run(); }

}  // namespace moesim::schedule
