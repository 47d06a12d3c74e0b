// The event engine: times a Schedule (schedule/schedule.proto) on a cluster.
//
//   sim::SimResult r = sim::simulate(schedule, cluster, {.network = sim::NetworkMode::kFlows});
//   r.step_time_s;  r.breakdown;  r.peak_rank;  r.trace;
//
// ## Events
// One queue of events keyed by (time in integer nanoseconds, sequence number): two events at the
// same nanosecond run in the order they were queued, so a run is deterministic. Each op has a
// count of unfinished predecessors (the previous op on its (rank, stream) and its deps); when it
// reaches zero the op is ready:
//   - a compute or copy op starts then and finishes duration_s later (rounded up to whole
//     nanoseconds; a time within 1e-6 ns (+ 1e-12 relative) of a whole one is that one);
//   - a collective op waits until every simulated participant is ready, then the collective runs:
//       kFlows:    its phases (sim/flows.h) on the shared FlowNetwork, so concurrent collectives
//                  contend for links; each phase's delay, then its flows, then the next phase;
//                  the network's completions are rounded up to whole nanoseconds;
//       kAnalytic: cost::CollectiveModel's time for it, as if alone on the network;
//     and every participating op starts when the collective starts and finishes when it ends
//     (the time an op spent ready, waiting at the rendezvous, is not part of its span).
// Ops that finish at the same nanosecond release their successors in the order their end events
// were queued; successors of one op are released in schedule order.
// The step ends when the last op of every rank has finished. SimResult::events counts the events
// handled (op ends, collective ends, phase starts, network completions; superseded network
// wake-ups are not counted).
//
// ## Memory timeline
// Per rank: static_bytes, plus alloc_bytes taken at each op's start and free_bytes given back at
// its end (a collective op's start is the collective's). The peak and the op that reached it are
// kept; the first op whose allocation takes the rank past its capacity is reported as the
// overflow (the run goes on: a result, not an error); "static_bytes" when the static bytes alone
// exceed it. The capacity is the schedule's capacity_bytes, else the device type's memory_bytes,
// else unknown (RankResult::capacity_bytes 0: always fits).
//
// ## Breakdown (per rank, seconds, summing to the rank's end time)
// The compute streams' busy time (the union of their ops' intervals) is "compute". Each gap before
// a compute op is charged to what the op waited for: the predecessor that finished last; the tail
// after the last compute op to the rank's end is charged to the rank's last op to finish. A
// collective predecessor charges its kind ("all_to_all" for all-to-all and all-to-all-v,
// "all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p" for send/recv), including the
// time it waited at the rendezvous for slower ranks; a send/recv (pipeline activations) charges
// "pipeline_bubble" for the part of the gap before the transfer started and "p2p" for the rest; a
// copy-stream or MEMCPY op charges "offload_stall"; a non-collective comm op charges its kind;
// anything else (no predecessor, another compute op) is "other". "compute" is always present,
// the other categories only when they have time. The result's breakdown is that of the rank that
// finished last (the first such rank in schedule order).
//
// ## Trace (SimOptions::record_trace)
// One span per op in trace::span_order, source PREDICTED: op id, name, kind, device rank and the
// device's vertex name, stream, start and end. bytes is the op's `bytes`, or for a collective op
// without it the collective's S (all-to-all-v: the mean send buffer, sum of the matrix / n);
// collective spans carry CollectiveStats: n, trace::bus_factor(kind, n), alg_bw = bytes / span
// duration, bus_bw = alg_bw x factor, and the algorithm. peak_memory has one entry per simulated
// rank, ascending rank.
#pragma once

#include "schedule/schedule.pb.h"
#include "sim/network.h"
#include "topologies/cluster.h"
#include "traces/trace.pb.h"

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace moesim::sim {

enum class NetworkMode {
  kFlows,     // max-min fair flows over the routed links (sim/network.h)
  kAnalytic,  // each collective alone, costmodel/collectives.h
};

struct SimOptions {
  NetworkMode network = NetworkMode::kFlows;
  bool record_trace = true;
  int busiest_links = 10;
  // Called now and then with the fraction of ops finished (progress bars); may be empty.
  std::function<void(double)> progress;
};

struct RankResult {
  int rank = 0;
  int represents = 1;
  double end_s = 0;
  double peak_bytes = 0;
  double capacity_bytes = 0;
  bool fits = true;
  std::string peak_op;        // the op at whose start the peak was reached
  std::string overflow_op;    // the first op that took the rank past its capacity; empty if none
  std::map<std::string, double> breakdown;
};

struct SimResult {
  double step_time_s = 0;
  int critical_rank = 0;                      // the rank that finished last
  std::map<std::string, double> breakdown;    // the critical rank's
  std::vector<RankResult> ranks;              // the simulated ranks, in schedule order
  int peak_rank = 0;                          // the simulated rank with the least margin (first)
  double peak_memory_bytes = 0;               // peak_rank's peak
  bool fits = true;
  std::vector<LinkUse> busiest_links;         // kFlows only
  int64_t events = 0;
  int64_t collectives_run = 0;
  double sim_wall_s = 0;
  trace::Trace trace;                         // predicted spans (when record_trace)
};

// The rank that waits least for other pipeline stages: the largest end time minus its
// "pipeline_bubble". In 1F1B the critical rank (stage 0) mostly waits; this one sets the pace.
// `result` must have ranks.
const RankResult& bottleneck_rank(const SimResult& result);

// Times `schedule` on `cluster`. Throws std::invalid_argument, naming the rank and op id (or the
// collective's 1-based index), for a schedule that is not well-formed: a dep out of range or not
// earlier in the list; a collective index out of range; a collective whose simulated participants
// disagree on it (an op on a rank the collective does not list, two ops of one rank in it, a
// simulated rank it lists without an op for it); a rank outside the cluster or listed twice (in
// the schedule or in a collective); a collective of fewer than 2 ranks, an unknown op or
// algorithm, a size that is not positive and finite, a missing or misshapen matrix; a duration
// or alloc/free that is negative or not finite; and (kFlows: when the collective first runs) what
// the cost model refuses. Throws std::runtime_error naming a few stuck ops (rank, op index and id,
// and what each waits for) when the schedule deadlocks: ops left that can never become ready, e.g.
// two ranks entering two collectives in opposite orders.
SimResult simulate(const schedule::Schedule& schedule, const topo::Cluster& cluster, const SimOptions& options = {});

}  // namespace moesim::sim
