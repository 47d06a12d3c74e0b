#include "sim/flows.h"

#include "sim/network.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <unordered_map>

namespace moesim::sim {
namespace {

using cost::CollectiveAlgo;
using cost::CollectiveOp;

int floor_log2(int n) {
  int d = 0;
  while (n >>= 1) ++d;
  return d;
}

int heap_parent(int p) { return (p - 1) / 2; }

// The flows of one phase over positions in the rank list, with what alpha(F) and k need: the
// largest message latency (route and rendezvous) and the most messages any rank sends or
// receives. Like the analytic model, a flow to itself or of no bytes is left out.
class PhaseBuilder {
 public:
  PhaseBuilder(const cost::CollectiveModel& m, const std::vector<int>& ranks)
      : m_(m), ranks_(ranks), sent_(ranks.size(), 0), received_(ranks.size(), 0) {}

  void add(int i, int j, double bytes) {
    if (i == j || bytes <= 0) return;
    const int s = ranks_[i], t = ranks_[j];
    latency_s_ = std::max(latency_s_, m_.message_latency_s(s, t, bytes));
    flows_.push_back({s, t, bytes});
    max_messages_ = std::max({max_messages_, ++sent_[i], ++received_[j]});
  }

  bool empty() const { return flows_.empty(); }
  int max_messages() const { return max_messages_; }
  // o + the largest message latency; 0 when nothing moves.
  double alpha_s() const { return flows_.empty() ? 0 : m_.params().step_overhead_s + latency_s_; }
  std::vector<FlowSpec> take() { return std::move(flows_); }

 private:
  const cost::CollectiveModel& m_;
  const std::vector<int>& ranks_;
  std::vector<FlowSpec> flows_;
  std::vector<int> sent_, received_;
  double latency_s_ = 0;
  int max_messages_ = 0;
};

void push_phase(std::vector<Phase>& out, double delay_s, int repeat, PhaseBuilder& p) {
  if (p.empty()) return;
  out.push_back({delay_s, repeat, p.take()});
}

PhaseBuilder ring(const cost::CollectiveModel& m, const std::vector<int>& ranks, double chunk) {
  const int n = static_cast<int>(ranks.size());
  PhaseBuilder p(m, ranks);
  for (int i = 0; i < n; ++i) p.add(i, (i + 1) % n, chunk);
  return p;
}

// Tree 1 (heap layout over positions) and, for the double tree, tree 2 over positions rotated by one.
PhaseBuilder tree(const cost::CollectiveModel& m, const std::vector<int>& ranks, double chunk, bool both) {
  const int n = static_cast<int>(ranks.size());
  PhaseBuilder p(m, ranks);
  for (int c = 1; c < n; ++c) p.add(heap_parent(c), c, chunk);
  if (both)
    for (int c = 1; c < n; ++c) p.add((heap_parent(c) + 1) % n, (c + 1) % n, chunk);
  return p;
}

// Shared by the uniform and the -v all-to-all; `flow(i, j)` gives the bytes from position i to j.
// Ranks were checked by the model (including the even spread over nodes for hierarchical).
template <typename FlowBytes>
std::vector<Phase> all_to_all(const cost::CollectiveModel& m, const std::vector<int>& ranks, CollectiveAlgo algo,
                              FlowBytes flow) {
  const int n = static_cast<int>(ranks.size());
  std::vector<Phase> out;
  if (algo == CollectiveAlgo::kDirect) {
    PhaseBuilder p(m, ranks);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) p.add(i, j, flow(i, j));
    push_phase(out, p.max_messages() * p.alpha_s(), 1, p);
    return out;
  }
  // at[a][j]: the position of node a's j-th rank in the list (nodes in order of first appearance;
  // a device outside any node is a node of its own, as in the model).
  std::vector<std::vector<int>> at;
  std::unordered_map<int64_t, int> group;
  for (int i = 0; i < n; ++i) {
    const int node = m.cluster().device(ranks[i]).node;
    const int64_t key = node >= 0 ? node : -1 - static_cast<int64_t>(ranks[i]);
    auto [it, fresh] = group.emplace(key, static_cast<int>(at.size()));
    if (fresh) at.emplace_back();
    at[it->second].push_back(i);
  }
  const int nodes = static_cast<int>(at.size()), g = static_cast<int>(at[0].size());
  PhaseBuilder gather(m, ranks);  // phase 1: (a,j) -> (a,j') what goes to local index j' anywhere
  for (int a = 0; a < nodes; ++a)
    for (int j = 0; j < g; ++j)
      for (int k = 0; k < g; ++k) {
        if (k == j) continue;
        double sum = 0;
        for (int b = 0; b < nodes; ++b) sum += flow(at[a][j], at[b][k]);
        gather.add(at[a][j], at[a][k], sum);
      }
  PhaseBuilder exchange(m, ranks);  // phase 2: (a,j) -> (b,j) what node a has for (b,j)
  for (int a = 0; a < nodes; ++a)
    for (int b = 0; b < nodes; ++b) {
      if (b == a) continue;
      for (int j = 0; j < g; ++j) {
        double sum = 0;
        for (int k = 0; k < g; ++k) sum += flow(at[a][k], at[b][j]);
        exchange.add(at[a][j], at[b][j], sum);
      }
    }
  push_phase(out, gather.max_messages() * gather.alpha_s(), 1, gather);
  push_phase(out, exchange.max_messages() * exchange.alpha_s(), 1, exchange);
  return out;
}

// The library's fixed time per call of `op` (hardware.proto CollectiveEfficiency latency_s): a
// phase of no flows before the others.
std::vector<Phase> with_call_latency(const cost::CollectiveModel& model, CollectiveOp op, std::vector<Phase> phases) {
  const double latency_s = model.cluster().collective_latency_s(cost::op_name(op));
  if (latency_s > 0) phases.insert(phases.begin(), Phase{latency_s, 1, {}});
  return phases;
}

}  // namespace

std::vector<Phase> decompose(const cost::CollectiveModel& model, CollectiveOp op, CollectiveAlgo algo,
                             const std::vector<int>& ranks, double bytes) {
  (void)model.cost(op, algo, ranks, bytes);  // the model's checks, with its errors
  // A collective library below the links' rate moves its bytes as if there were more of them.
  bytes /= model.cluster().collective_efficiency(cost::op_name(op));
  const int n = static_cast<int>(ranks.size());
  std::vector<Phase> out;
  switch (op) {
    case CollectiveOp::kAllReduce:
      if (algo == CollectiveAlgo::kRing) {
        PhaseBuilder r = ring(model, ranks, bytes / n);
        push_phase(out, r.alpha_s(), 2 * (n - 1), r);
      } else {
        const double alpha_s = tree(model, ranks, bytes, true).alpha_s();
        PhaseBuilder r = ring(model, ranks, 2.0 * (n - 1) / n * bytes);
        push_phase(out, 2 * floor_log2(n) * alpha_s, 1, r);
      }
      break;
    case CollectiveOp::kAllGather:
    case CollectiveOp::kReduceScatter: {
      PhaseBuilder r = ring(model, ranks, bytes / n);
      push_phase(out, r.alpha_s(), n - 1, r);
      break;
    }
    case CollectiveOp::kAllToAll:
      return with_call_latency(model, op, all_to_all(model, ranks, algo, [&](int, int) { return bytes / n; }));
    case CollectiveOp::kSendRecv: {
      PhaseBuilder p(model, ranks);
      for (int i = 0; i + 1 < n; ++i) p.add(i, i + 1, bytes);
      push_phase(out, p.alpha_s(), 1, p);
      break;
    }
    case CollectiveOp::kBroadcast: {
      PhaseBuilder t = tree(model, ranks, bytes, false);
      push_phase(out, floor_log2(n) * t.alpha_s(), 1, t);
      break;
    }
  }
  return with_call_latency(model, op, std::move(out));
}

std::vector<Phase> decompose_all_to_all_v(const cost::CollectiveModel& model, const std::vector<int>& ranks,
                                          const std::vector<std::vector<double>>& bytes, CollectiveAlgo algo) {
  (void)model.all_to_all_v(ranks, bytes, algo);  // the model's checks, with its errors
  const double efficiency = model.cluster().collective_efficiency(cost::op_name(CollectiveOp::kAllToAll));
  return with_call_latency(model, CollectiveOp::kAllToAll,
                           all_to_all(model, ranks, algo, [&](int i, int j) { return bytes[i][j] / efficiency; }));
}

double idle_time_s(const topo::Cluster& cluster, const std::vector<Phase>& phases) {
  // One network for all phases: it is idle again when a phase ends, so each phase sees an idle
  // network while the routes stay cached.
  FlowNetwork net(cluster);
  double total_s = 0;
  for (size_t p = 0; p < phases.size(); ++p) {
    const Phase& phase = phases[p];
    if (!std::isfinite(phase.delay_s) || phase.delay_s < 0)
      throw std::invalid_argument(
          fmt::format("phase {}: delay must be a finite number of seconds >= 0, got {}", p, phase.delay_s));
    if (phase.repeat < 1) throw std::invalid_argument(fmt::format("phase {}: repeat must be >= 1, got {}", p, phase.repeat));
    const double start_s = net.now();
    for (const FlowSpec& f : phase.flows) net.add_flow(f.src, f.dst, f.bytes, p);
    for (double t = net.next_completion_s(); std::isfinite(t); t = net.next_completion_s()) {
      net.advance(t);
      net.take_finished();
    }
    total_s += phase.repeat * (phase.delay_s + (net.now() - start_s));
  }
  return total_s;
}

}  // namespace moesim::sim
