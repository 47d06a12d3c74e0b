#include "planner/space.h"

#include <fmt/format.h>

#include <algorithm>

namespace moesim::planner {
namespace {

int blocks_of(const cost::ModelCost& cost) {
  int n = 0;
  for (const cost::Layer& l : cost.layers) n += l.kind == cost::LayerKind::kTransformer || l.kind == cost::LayerKind::kResBlock;
  return std::max(1, n);
}

int experts_of(const cost::ModelCost& cost) {
  for (const cost::Layer& l : cost.layers)
    if (l.moe) return l.experts;
  return 0;
}

// The values a knob takes: the pinned one, else `choices`.
template <typename T>
std::vector<T> knob(bool pinned, T value, std::vector<T> choices) {
  if (pinned) return {value};
  return choices;
}

}  // namespace

std::string candidate_name(const Candidate& c) {
  const strategy::Strategy& s = c.strategy;
  const char* sched = s.schedule() == strategy::GPIPE ? "gpipe" : s.schedule() == strategy::INTERLEAVED_1F1B ? "i1f1b" : "1f1b";
  const char* rc = c.recompute == workload::FULL ? "full" : c.recompute == workload::SELECTIVE ? "sel" : "none";
  return fmt::format("dp{} tp{} pp{} ep{} z{} {}{} mb{} {} {} c{}{}", s.dp(), s.tp(), s.pp(), s.ep(), s.zero_stage(), sched,
                     s.virtual_stages() > 1 ? fmt::format("x{}", s.virtual_stages()) : "", c.micro_batch, rc,
                     s.all_to_all() == strategy::HIERARCHICAL ? "hier" : "direct", s.overlap_chunks(),
                     s.has_capacity_factor() ? fmt::format(" cf{:g}", s.capacity_factor()) : "");
}

std::vector<int> divisors(int64_t n) {
  std::vector<int> out;
  for (int64_t d = 1; d * d <= n; ++d)
    if (n % d == 0) {
      out.push_back(static_cast<int>(d));
      if (d * d != n) out.push_back(static_cast<int>(n / d));
    }
  std::sort(out.begin(), out.end());
  return out;
}

Space enumerate(const cost::Setup& base, const SearchOptions& o) {
  const strategy::Strategy& pin = o.pinned;
  const topo::Cluster& cluster = *base.cluster;
  const int devices = cluster.device_count();
  const int per_node = cluster.spec().has_node() ? std::max(1, cluster.spec().node().devices_per_node()) : 1;
  const int max_tp = o.max_tp > 0 ? o.max_tp : per_node;
  const int blocks = blocks_of(base.cost);
  const int max_pp = o.max_pp > 0 ? std::min(o.max_pp, blocks) : blocks;
  const int experts = experts_of(base.cost);
  const bool training = base.workload->has_training();
  const int64_t global = base.layout.global_batch;
  const int nodes = std::max(1, cluster.node_count());

  Space space;
  const std::vector<int> all = divisors(devices);
  for (int tp : knob(pin.has_tp(), pin.tp(), all)) {
    if (tp > max_tp && !pin.has_tp()) continue;
    if (devices % tp != 0) continue;
    for (int pp : knob(pin.has_pp(), pin.pp(), divisors(devices / tp))) {
      if ((pp > max_pp && !pin.has_pp()) || (devices / tp) % pp != 0) continue;
      const int dp = devices / tp / pp;
      if (pin.has_dp() && pin.dp() != dp) continue;
      std::vector<int> eps = {1};
      if (experts > 0) {
        eps.clear();
        for (int e : divisors(dp))
          if (experts % e == 0) eps.push_back(e);
      }
      for (int ep : knob(pin.has_ep(), pin.ep(), eps)) {
        if (dp % ep != 0) continue;
        ++space.layouts;
        // Micro-batch sizes that divide the per-replica batch.
        std::vector<int64_t> mbs;
        if (training) {
          for (int64_t mb : {1, 2, 4, 8})
            if (global % (static_cast<int64_t>(dp) * mb) == 0) mbs.push_back(mb);
          if (mbs.empty()) {
            ++space.pruned_divisibility;
            continue;
          }
        } else {
          if (global % dp != 0) {
            ++space.pruned_divisibility;
            continue;
          }
          mbs.push_back(0);  // inference: the batch per replica in one micro-batch
        }
        for (int64_t mb : mbs) {
          const int64_t m = training ? global / (static_cast<int64_t>(dp) * mb) : 1;
          for (int zero : knob(pin.has_zero_stage(), pin.zero_stage(), dp > 1 && training ? std::vector<int>{0, 1, 2, 3} : std::vector<int>{0}))
            for (auto sched : knob(pin.has_schedule(), pin.schedule(),
                                   pp > 1 && training ? std::vector<strategy::PipelineSchedule>{strategy::ONE_F_ONE_B, strategy::INTERLEAVED_1F1B}
                                                      : std::vector<strategy::PipelineSchedule>{strategy::ONE_F_ONE_B})) {
              const int v = sched == strategy::INTERLEAVED_1F1B ? (pin.has_virtual_stages() ? pin.virtual_stages() : 2) : 1;
              if (sched == strategy::INTERLEAVED_1F1B && (pp * v > blocks || m % pp != 0)) {
                ++space.pruned_divisibility;
                continue;
              }
              const bool multi_node_ep = ep > 1 && ep * tp > per_node && nodes > 1;
              for (auto a2a : knob(pin.has_all_to_all(), pin.all_to_all(),
                                   multi_node_ep ? std::vector<strategy::AllToAllAlgorithm>{strategy::DIRECT, strategy::HIERARCHICAL}
                                                 : std::vector<strategy::AllToAllAlgorithm>{strategy::DIRECT}))
                for (int chunks : knob(pin.has_overlap_chunks(), pin.overlap_chunks(), ep > 1 ? std::vector<int>{1, 2} : std::vector<int>{1}))
                  for (double cf : knob(pin.has_capacity_factor() || !o.vary_capacity_factor, pin.capacity_factor(),
                                        std::vector<double>{1.0, 1.25, 1.5}))
                    for (auto rc : knob(!o.vary_recompute || !training || o.recompute.has_value(),
                                        !training          ? workload::NONE
                                        : o.recompute      ? *o.recompute
                                                           : base.workload->training().recompute(),
                                        std::vector<workload::Recompute>{workload::NONE, workload::SELECTIVE, workload::FULL})) {
                      Candidate c;
                      c.strategy = pin;
                      c.strategy.clear_name();
                      c.strategy.clear_description();
                      c.strategy.set_dp(dp);
                      c.strategy.set_tp(tp);
                      c.strategy.set_pp(pp);
                      c.strategy.set_ep(ep);
                      c.strategy.set_zero_stage(zero);
                      c.strategy.set_schedule(sched);
                      if (v > 1) c.strategy.set_virtual_stages(v);
                      else c.strategy.clear_virtual_stages();
                      if (training) c.strategy.set_micro_batches(m);
                      c.strategy.set_all_to_all(a2a);
                      c.strategy.set_overlap_chunks(chunks);
                      c.strategy.set_capacity_factor(cf);
                      c.recompute = rc;
                      c.micro_batch = mb;
                      c.strategy.set_name(candidate_name(c));
                      space.candidates.push_back(std::move(c));
                    }
            }
        }
      }
    }
  }
  return space;
}

}  // namespace moesim::planner
