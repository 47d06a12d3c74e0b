#include "planner/estimate.h"

#include "costmodel/memory.h"
#include "costmodel/routing_model.h"
#include "schedule/lowering.h"

#include <algorithm>
#include <cmath>

namespace moesim::planner {
namespace {



}  // namespace

MemorySummary summarize(const cost::MemoryReport& report) {
  MemorySummary m;
  m.fits = report.fits;
  m.peak_rank = report.peak_rank;
  const cost::RankMemory& r = report.ranks[report.peak_rank];
  m.peak_bytes = r.total_bytes;
  m.capacity_bytes = r.capacity_bytes;
  m.state_bytes = r.weights_bytes + r.gradients_bytes + r.optimizer_bytes;
  for (const cost::RankMemory& x : report.ranks) {
    m.max_weights = std::max(m.max_weights, x.weights_bytes);
    m.working_set_bytes = std::max(m.working_set_bytes, cost::working_set_bytes(x));
  }
  return m;
}

Estimator::Estimator(const topo::Cluster& cluster, const cost::DeviceProfile* profile)
    : cluster_(cluster),
      profile_(profile ? *profile : cost::default_profile(cluster.device_type(0))),
      collectives_(cluster) {}

Estimator::~Estimator() = default;

// A layer's kernels for `tokens` tokens (the model's are sized for one sequence), split over tp.
const Estimator::LayerTimes& Estimator::layer_times(const cost::Setup& s, int li, double tokens) {
  const workload::Workload& wk = *s.workload;
  const cost::DType dtype = schedule::compute_dtype(wk);
  const workload::Recompute rc = wk.has_training() ? wk.training().recompute() : workload::NONE;
  const bool sp = s.strategy->sequence_parallel();
  const bool batch_priority = s.strategy->drop_policy() == strategy::BATCH_PRIORITY;
  const auto key = std::make_tuple(static_cast<const void*>(&s.cost.layers[li]), li, s.layout.tp, s.layout.ep, sp,
                                   batch_priority, tokens, static_cast<int>(rc), static_cast<int>(dtype), host_factor_,
                                   gather_factor_, scatter_add_factor_);
  auto it = layer_cache_.find(key);
  if (it != layer_cache_.end()) return it->second;
  const cost::Layer& layer = s.cost.layers[li];
  const double scale = s.cost.tokens > 0 ? tokens / s.cost.tokens : 1;
  LayerTimes t;
  for (const cost::Op& model_op : layer.ops) {
    cost::Op op = cost::on_ep_rank(model_op, s.layout.ep, batch_priority);
    op.host_time_factor = host_factor_;
    op.gather_footprint_factor = gather_factor_;
    op.scatter_add_factor = scatter_add_factor_;
    cost::scale_work(op, scale);
    op.m *= scale;
    op.routing_choices *= scale;
    op.dispatch_choices *= scale;
    op.priority_sort_tokens *= scale;
    const bool split = op.kind == cost::OpKind::kGemm || op.kind == cost::OpKind::kGroupedGemm ||
                       op.kind == cost::OpKind::kAttention || sp;
    if (split && s.layout.tp > 1) cost::scale_work(op, 1.0 / s.layout.tp);
    const bool experts = op.name.find("experts") != std::string::npos;
    if (experts && s.layout.ep > 1) {  // each EP rank runs its share of the experts' tokens
      cost::scale_work(op, 1.0 / s.layout.ep);
      op.groups = std::max<int64_t>(1, op.groups / s.layout.ep);
    }
    const double fwd = cost::op_time(profile_, op, dtype).time_s;
    t.fwd += fwd;
    if (experts) t.experts_fwd += fwd;
    for (const cost::Op& b : cost::backward_ops(op)) t.bwd += cost::op_time(profile_, b, dtype).time_s;
    if (rc == workload::FULL || (rc == workload::SELECTIVE && cost::recomputed_selectively(op))) t.recompute += fwd;
  }
  return layer_cache_.emplace(key, t).first->second;
}

double Estimator::collective_s(cost::CollectiveOp op, cost::CollectiveAlgo algo, const std::vector<int>& ranks, double bytes) {
  if (ranks.size() < 2 || bytes <= 0) return 0;
  const auto key = std::make_tuple(static_cast<int>(op), static_cast<int>(algo), ranks, bytes, transfer_factor_);
  auto it = collective_cache_.find(key);
  if (it != collective_cache_.end()) return it->second;
  cost::CollectiveCost c;
  try {
    c = collectives_.cost(op, algo, ranks, bytes);
  } catch (const cost::CollectiveError&) {  // e.g. hierarchical on ranks not spread evenly: direct
    c = collectives_.cost(op, cost::default_algo(op), ranks, bytes);
  }
  return collective_cache_.emplace(key, c.latency_s + c.transfer_s * transfer_factor_).first->second;
}

// The busiest EP rank's expert load over the mean, from one routing draw (seeded).
double Estimator::imbalance(const cost::Setup& s, const cost::Layer& layer, double tokens) {
  const strategy::Strategy& st = *s.strategy;
  const auto key = std::make_tuple(s.layout.ep, layer.experts, tokens, static_cast<int>(st.drop_policy()), st.capacity_factor());
  auto it = imbalance_cache_.find(key);
  if (it != imbalance_cache_.end()) return it->second;
  const workload::RoutingDistribution routing = s.workload->has_routing() ? s.workload->routing() : workload::RoutingDistribution();
  cost::RoutingProblem p;
  p.tokens = std::max<int64_t>(1, std::llround(tokens * s.layout.ep));
  p.experts = layer.experts;
  p.top_k = std::max(1, std::min(layer.top_k, layer.experts));
  p.capacity_factor = st.capacity_factor();
  p.drop_policy = st.drop_policy();
  p.probabilities = cost::expert_probabilities(routing, layer.experts);
  const cost::RoutingLoads loads = cost::routing_loads(p);
  const cost::ExpertPlacementMap map =
      cost::place_experts(layer.experts, s.layout.ep, st.has_placement() ? &st.placement() : nullptr, p.probabilities);
  std::vector<double> kept(loads.sampled_load.size());
  for (size_t e = 0; e < kept.size(); ++e) kept[e] = static_cast<double>(std::min(loads.sampled_load[e], loads.capacity));
  const std::vector<double> ranks = cost::rank_loads(map, kept);
  double sum = 0, max = 0;
  for (double r : ranks) sum += r, max = std::max(max, r);
  const double f = sum > 0 ? max / (sum / static_cast<double>(ranks.size())) : 1;
  return imbalance_cache_.emplace(key, f).first->second;
}

Estimate Estimator::estimate(const cost::Setup& s, const MemorySummary& mem) {
  const cost::Layout& l = s.layout;
  const strategy::Strategy& st = *s.strategy;
  const bool training = s.workload->has_training();
  const int seq = training ? l.sequence : s.workload->inference().prompt_tokens();
  const double tokens = static_cast<double>(l.micro_batch) * seq;
  const double act_bytes = tokens * s.cost.hidden * 2;
  const int chunks = std::max(1, st.overlap_chunks());
  const cost::CollectiveAlgo a2a_algo =
      st.all_to_all() == strategy::HIERARCHICAL ? cost::CollectiveAlgo::kHierarchical : cost::CollectiveAlgo::kDirect;
  // The busiest working set, as the lowering's slowest rank of a collective sets its factor.
  transfer_factor_ = profile_.transfer_time_factor(mem.working_set_bytes);
  host_factor_ = profile_.host_time_factor(mem.working_set_bytes);
  gather_factor_ = profile_.gather_footprint_factor(mem.working_set_bytes);
  scatter_add_factor_ = profile_.scatter_add_factor(mem.working_set_bytes);

  Estimate e;
  double worst_stage = 0, worst_compute = 0, worst_a2a = 0, worst_tp = 0, last_bwd = 0;
  for (int p = 0; p < l.pp; ++p) {
    std::vector<int> tp_group, ep_group;
    for (int t = 0; t < l.tp; ++t) tp_group.push_back(l.rank(p, 0, t));
    for (int d = 0; d < l.ep; ++d) ep_group.push_back(l.rank(p, d, 0));
    double compute = 0, a2a = 0, tpc = 0, bwd = 0;
    for (int li : l.stage_layers[p]) {
      const cost::Layer& layer = s.cost.layers[li];
      const LayerTimes& lt = layer_times(s, li, tokens);
      double stretch = 0;
      if (layer.moe && l.ep > 1) {
        const double f = imbalance(s, layer, tokens);
        stretch = lt.experts_fwd * (f - 1) * 3;  // forward + backward (2x) of the straggler's extra tokens
        const double bytes = tokens * layer.routed_per_token * s.cost.hidden * 2 / l.tp;
        const double one = collective_s(cost::CollectiveOp::kAllToAll, a2a_algo, ep_group, bytes);
        const double experts = lt.experts_fwd * std::max(1.0, f);
        const double exposed = one / chunks + std::max(0.0, one - experts) * (chunks - 1) / chunks;
        a2a += (training ? 4 : 2) * exposed;
        // The route before the dispatch: the group's routing metadata, forward only.
        a2a += collective_s(cost::CollectiveOp::kAllGather, cost::CollectiveAlgo::kRing, ep_group,
                            cost::route_bytes_per_rank(tokens, layer.routed_per_token, layer.experts) *
                                static_cast<double>(ep_group.size()));
      }
      compute += lt.fwd + (training ? lt.bwd + lt.recompute : 0) + stretch;
      bwd += lt.bwd;
      if (l.tp > 1 && layer.kind == cost::LayerKind::kTransformer)
        tpc += (training ? 4 : 2) * collective_s(cost::CollectiveOp::kAllReduce, cost::CollectiveAlgo::kRing, tp_group, act_bytes);
    }
    const double stage = compute + a2a + tpc;
    if (stage > worst_stage) {
      worst_stage = stage;
      worst_compute = compute;
      worst_a2a = a2a;
      worst_tp = tpc;
    }
    if (p == 0) last_bwd = bwd;
  }
  const double m = training ? static_cast<double>(l.micro_batches) : 1;
  const double v = st.schedule() == strategy::INTERLEAVED_1F1B ? l.virtual_stages : 1;
  const double fill = (l.pp - 1) / v;
  e.compute_s = m * worst_compute;
  e.a2a_s = m * worst_a2a;
  e.tp_s = m * worst_tp;
  e.bubble_s = fill * worst_stage;
  double step = (m + fill) * worst_stage;

  if (training && l.dp > 1) {
    // Gradient sync of stage 0's parameters over its data-parallel group.
    std::vector<int> dp_group;
    for (int d = 0; d < l.dp; ++d) dp_group.push_back(l.rank(0, d, 0));
    double dense = 0, experts = 0;
    for (int li : l.stage_layers[0]) {
      dense += s.cost.layers[li].dense_params / l.tp;
      experts += s.cost.layers[li].expert_params / l.ep / l.tp;
    }
    const double grad = 2;  // bytes per gradient (16-bit)
    const int zero = st.zero_stage();
    const cost::CollectiveOp sync_op = zero >= 1 ? cost::CollectiveOp::kReduceScatter : cost::CollectiveOp::kAllReduce;
    double sync = collective_s(sync_op, cost::CollectiveAlgo::kRing, dp_group, dense * grad);
    if (l.expert_dp > 1 && experts > 0) {
      std::vector<int> edp;
      for (int d = 0; d < l.dp; d += l.ep) edp.push_back(l.rank(0, d, 0));
      sync += collective_s(sync_op, cost::CollectiveAlgo::kRing, edp, experts * grad);
    }
    e.dp_s = std::max(0.0, sync - last_bwd);
    if (zero == 1 || zero == 2)
      e.dp_s += collective_s(cost::CollectiveOp::kAllGather, cost::CollectiveAlgo::kRing, dp_group, dense * grad);
    if (zero == 3) {
      const double gather = collective_s(cost::CollectiveOp::kAllGather, cost::CollectiveAlgo::kRing, dp_group, dense * grad);
      e.dp_s += std::max(0.0, 2 * m * gather - e.compute_s);
    }
    step += e.dp_s;
  }
  const double bandwidth = profile_.memory_bandwidth_Bps() * profile_.memory_bandwidth_efficiency();
  if (training) step += 2 * mem.state_bytes / bandwidth;  // the optimizer's pass over the states
  else step += s.workload->inference().generated_tokens() * l.pp * mem.max_weights / bandwidth;  // decode passes
  e.step_s = step;
  const std::pair<double, const char*> parts[] = {
      {e.a2a_s, "all_to_all"}, {e.tp_s, "tp_all_reduce"}, {e.dp_s, "gradient_sync"}, {e.bubble_s, "pipeline_bubble"}};
  e.bottleneck = "compute";
  double most = 0;
  for (const auto& [t, name] : parts)
    if (t > most && t > 0.1 * e.compute_s) most = t, e.bottleneck = name;
  return e;
}

}  // namespace moesim::planner
