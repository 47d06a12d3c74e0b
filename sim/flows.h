// Collectives as flows: the phases of each algorithm, as sim::FlowNetwork runs them.
//
//   std::vector<sim::Phase> p = sim::decompose(model, cost::CollectiveOp::kAllReduce,
//                                              cost::CollectiveAlgo::kRing, ranks, 256e6);
//
// Each phase waits `delay_s` (its alpha: steps x (software overhead + the phase's largest message
// latency, route and rendezvous)) and then starts its flows; the next phase starts when every
// flow of this one has finished; `repeat` runs the same phase that many times in a row. The
// decomposition is the one costmodel/collectives.h writes down for its analytic times, so on an
// idle network a collective takes the analytic time (within the difference between port sums and
// max-min rates), and contention with other traffic can only add:
//   ring all-reduce:      2(n-1) x { alpha(F_ring), F_ring(S/n) }
//   tree all-reduce:      { 2D alpha(F_tree), F_ring(2(n-1)S/n) }
//   ring all-gather / reduce-scatter: (n-1) x { alpha(F_ring), F_ring(S/n) }
//   direct all-to-all(-v): { (n-1) alpha(F) (k alpha for -v: k = most messages per rank), F }
//   hierarchical all-to-all(-v): { (g-1) alpha(F1), F1 }, { (m-1) alpha(F2), F2 }
//   send/recv:            { alpha(F), F }
//   tree broadcast:       { D alpha(F_tree1), F_tree1(S) }
// Flows to the rank itself and of no bytes are left out, and so are phases left with no flows
// (hierarchical all-to-all on one rank per node has no phase 1; an all-to-all-v whose bytes stay
// on the diagonal has no phases at all), as the analytic model charges them nothing. alpha and
// k count only the flows that remain, exactly as CollectiveModel does (so hierarchical -v
// charges each phase's own k: the most messages any rank sends or receives in it).
//
// ## Where the idle flow time and the analytic time differ
// The alphas are the same numbers. The transfer of a phase is the same when every flow of the
// busiest port (or route) runs at its share of that port from start to end: every uniform phase
// above on the bundled configs (measured equal to 1e-6 on dgx-h100 and h100-64 with 8..64 ranks),
// and all-to-all-v matrices mild enough that the busiest port stays saturated. Two cases differ:
//   - Skewed all-to-all-v: flows take longer. The analytic beta is the busiest port's bytes over
//     its capacity, as if the port were kept busy until its last byte; max-min fairness does not
//     schedule for the makespan, and a port idles while its flows are held back at their senders.
//     By hand, on one NVSwitch node (every port c = 450 GB/s, u = c x 1 ms): rank 0 sends 3u to
//     rank 2 and 0.1u to ranks 3 and 4, rank 1 sends 3u to 2 and 0.1u to 5 and 6. Port bound:
//     rank 2's in-port, 6u = 6 ms. Max-min: each sender splits its port three ways (c/3 per
//     flow), so rank 2's in-port runs at 2c/3 until the small flows end at 0.3 ms; then 2 x 2.9u
//     at c: 0.3 + 5.8 = 6.1 ms. Random log-normal matrices measured +0..11% on dgx-h100 and
//     h100-64. Never below: every byte of the busiest port crosses it (tests check >=).
//   - ECMP faster than one path: the analytic per-flow term uses the route's bottleneck B (the
//     best single path's narrowest link), while a flow here is spread over its ECMP paths and can
//     run above B (a 2:1 oversubscribed fat-tree: two 5 GB/s uplinks carry a 10 GB/s NIC's
//     flow). Flows are then faster than the analytic time. Not so on the bundled 1:1 fabrics.
#pragma once

#include "costmodel/collectives.h"

#include <vector>

namespace moesim::sim {

struct FlowSpec {
  int src = 0, dst = 0;  // device ranks
  double bytes = 0;
};

struct Phase {
  double delay_s = 0;
  int repeat = 1;
  std::vector<FlowSpec> flows;
};

// Throws cost::CollectiveError for the inputs CollectiveModel::cost refuses.
std::vector<Phase> decompose(const cost::CollectiveModel& model, cost::CollectiveOp op, cost::CollectiveAlgo algo,
                             const std::vector<int>& ranks, double bytes);
// All-to-all-v: bytes[i][j] from ranks[i] to ranks[j]; kDirect or kHierarchical.
std::vector<Phase> decompose_all_to_all_v(const cost::CollectiveModel& model, const std::vector<int>& ranks,
                                          const std::vector<std::vector<double>>& bytes, cost::CollectiveAlgo algo);

// The time the phases take on an otherwise idle network: sum over phases of
// repeat x (delay_s + the time its flows take alone on a FlowNetwork) (for tests and for
// comparing against CollectiveModel::cost). Throws std::invalid_argument for a negative or
// non-finite delay, a repeat below 1, or a flow FlowNetwork::add_flow refuses.
double idle_time_s(const topo::Cluster& cluster, const std::vector<Phase>& phases);

}  // namespace moesim::sim
