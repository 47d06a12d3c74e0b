// The flow-level network: flows between devices over the cluster's directed links, sharing link
// bandwidth max-min fairly, rates recomputed whenever a flow starts or finishes.
//
//   sim::FlowNetwork net(cluster);
//   auto a = net.add_flow(0, 9, 64e6, /*tag=*/1);
//   double t = net.next_completion_s();   // when the first flow would finish at today's rates
//   net.advance(t);                        // drain bytes up to t
//   for (const sim::FinishedFlow& f : net.take_finished()) ...
//
// ## Model
// A flow from device s to device d follows the route topo::Router picks; when the route has
// several equal-cost paths (ECMP), the flow is spread evenly over up to `max_ecmp_paths` of them:
// edge e carries the fraction w(f, e) = (paths of f through e) / (paths of f) of the flow's rate.
// Rates are the max-min fair allocation under sum_f w(f, e) r_f <= capacity(e) for every directed
// link e, found by progressive filling (water-filling): raise every unfrozen flow's rate together
// until a link saturates, freeze the flows crossing it, repeat. A flow to itself, or of 0 bytes
// (up to kFinishedBytes), finishes at once.
// Where consecutive vertices of a path are joined by parallel edges, the path's share is split
// evenly over those of the lowest route cost (topologies/routing.h: the ones the router counts as
// separate ECMP paths, listing the vertex path once for each, so the weights follow its counts).
// The split is fixed: a flow whose ECMP paths are unequally loaded is held back by the busiest.
// Routes are computed on a pair's first flow (topo::Router::route, one Dijkstra) and cached as
// (edge, weight) lists. Rates are recomputed lazily, on the first query after flows start or end;
// a recompute costs O(H log E) for the H (flow, edge) pairs of the active flows over E edges.
//
// Latency is not charged here: the collective decomposition (sim/flows.h) puts each phase's
// alpha (software overhead + route latency) before its flows start, as the analytic model does.
//
// Time is in seconds (double), non-decreasing across calls. A flow is finished when its
// remaining bytes fall to kFinishedBytes or below.
#pragma once

#include "topologies/cluster.h"

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace moesim::sim {

inline constexpr double kFinishedBytes = 1e-3;

struct FinishedFlow {
  int64_t id = 0;
  uint64_t tag = 0;     // the caller's tag (the engine: collective run id)
  double start_s = 0;
  double end_s = 0;
  double bytes = 0;
};

// One directed link's use over the simulated time.
struct LinkUse {
  int edge = 0;                 // index into the cluster graph's edges
  std::string from, to;         // vertex names
  double bytes = 0;             // carried in total
  double capacity_Bps = 0;
  double busy_s = 0;            // time with at least one flow on it
  double utilisation = 0;       // bytes / (capacity * elapsed), given the elapsed time asked for
};

class FlowNetwork {
 public:
  // Keeps a reference to `cluster`, which must outlive the network. Routes lazily.
  explicit FlowNetwork(const topo::Cluster& cluster, int max_ecmp_paths = 16);
  ~FlowNetwork();
  FlowNetwork(const FlowNetwork&) = delete;
  FlowNetwork& operator=(const FlowNetwork&) = delete;

  // Starts a flow at the current time (the last advance()). Throws std::invalid_argument for a
  // rank out of range, negative or non-finite bytes, or devices with no route between them.
  int64_t add_flow(int src, int dst, double bytes, uint64_t tag);

  // The earliest time an active flow finishes at the current rates; +inf when none is active.
  // Flows that are already finished (self flows, 0 bytes) make it now().
  double next_completion_s();
  // Drains every active flow at its rate up to `t_s` (finite, now() <= t_s; else
  // std::invalid_argument). A t_s past the next completion is exact too: the network steps from
  // completion to completion on the way, recomputing the rates, and each flow's end_s is the time
  // it finished; now() is t_s afterwards. A flow is done at its computed finish time, or when its
  // remaining bytes fall to max(kFinishedBytes, kRelEps x its bytes) (common/precision.h).
  void advance(double t_s);
  // Removes and returns the flows finished by now, in id order.
  std::vector<FinishedFlow> take_finished();

  double now() const;
  int active_flows() const;
  // The current max-min rate of an active flow (bytes/s); 0 for unknown ids.
  double rate(int64_t id);
  // Rate recomputations so far (for tests and benchmarks).
  int64_t recomputations() const;

  // The k busiest directed links by bytes carried (ties by edge index), utilisation over
  // `elapsed_s` (0 when it is 0). Links that carried nothing are left out. Throws
  // std::invalid_argument for k < 0 or an elapsed time that is negative or not finite.
  std::vector<LinkUse> busiest_links(int k, double elapsed_s) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moesim::sim
