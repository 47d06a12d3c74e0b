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
//   - a compute or copy op finishes duration_s later (rounded up to whole nanoseconds);
//   - a collective op waits until every simulated participant is ready, then the collective runs:
//       kFlows:    its phases (sim/flows.h) on the shared FlowNetwork, so concurrent collectives
//                  contend for links; each phase's delay, then its flows, then the next phase;
//       kAnalytic: cost::CollectiveModel's time for it, as if alone on the network;
//     and every participating op finishes when it does.
// The step ends when the last op of every rank has finished.
//
// ## Memory timeline
// Per rank: static_bytes, plus alloc_bytes taken at each op's start and free_bytes given back at
// its end. The peak and the op that reached it are kept; the first op whose allocation takes the
// rank past capacity_bytes is reported as the overflow (the run goes on: a result, not an error).
//
// ## Breakdown (per rank, seconds, summing to the rank's end time)
// The compute stream's busy time is "compute". Each gap before a compute op (and the tail after
// the last one) is charged to what the op waited for: the predecessor that finished last. A
// collective predecessor charges its kind ("all_to_all", "all_reduce", "all_gather",
// "reduce_scatter", "p2p" for send/recv); a RECV/SEND of pipeline activations that waited for
// another stage charges "pipeline_bubble" for the time before the transfer started; a copy-stream
// op charges "offload_stall". The result's breakdown is that of the rank that finished last.
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
  double peak_memory_bytes = 0;
  bool fits = true;
  std::vector<LinkUse> busiest_links;         // kFlows only
  int64_t events = 0;
  int64_t collectives_run = 0;
  double sim_wall_s = 0;
  trace::Trace trace;                         // predicted spans (when record_trace)
};

// Times `schedule` on `cluster`. Throws std::invalid_argument for a schedule that is not
// well-formed (a dep out of range or not earlier in the list, a collective index out of range, a
// collective whose simulated participants disagree on it, a rank outside the cluster) and
// std::runtime_error naming the stuck ops when the schedule deadlocks (ops left that can never
// become ready).
SimResult simulate(const schedule::Schedule& schedule, const topo::Cluster& cluster, const SimOptions& options = {});

}  // namespace moesim::sim
