// The planner's analytic step-time estimate: fast enough to rank tens of thousands of candidates,
// close enough that the event simulator's top candidates are among its top (docs/PLANNER.md).
//
// Per pipeline stage and micro-batch of T = micro_batch x sequence tokens:
//   t_stage = sum over its layers of forward + backward (+ recompute) kernel time (cost model
//             roofline, kernels scaled to T tokens and split over tp)
//           + per MoE layer: 4 all-to-alls (dispatch and combine, forward and backward), each
//             CollectiveModel's time for T k hidden 2 / tp bytes per rank over the EP group, exposed
//             as a2a / c + max(0, a2a - experts) (c - 1) / c with c overlap chunks, and the experts'
//             kernels stretched by the routing model's busiest-rank / mean load (stragglers)
//           + per layer with tp > 1: 4 TP all-reduces of T hidden 2 bytes
//   step    = (m + (pp - 1) / v) t_max                     (1F1B, interleaved with v chunks; GPipe v = 1)
//           + gradient sync not hidden behind the last micro-batch's backward (all-reduce, or
//             reduce-scatter + the weights' all-gather after the optimizer for ZeRO 1-2; ZeRO 3 adds
//             per-layer all-gathers not hidden behind compute) + the optimizer's memory-bound pass.
// Inference: the prefill's forward passes through the pipeline plus one decode pass per generated
// token (each layer's weights read once per pass, memory-bound).
#pragma once

#include "costmodel/collectives.h"
#include "costmodel/compute.h"
#include "costmodel/memory.h"
#include "costmodel/setup.h"

#include <map>
#include <memory>
#include <string>
#include <tuple>

namespace moesim::planner {

struct Estimate {
  double step_s = 0;
  double compute_s = 0;   // the slowest stage's kernels per step
  double a2a_s = 0;       // exposed all-to-all per step, with the MoE layers' routes (their metadata all-gathers)
  double tp_s = 0;        // TP collectives per step
  double dp_s = 0;        // exposed gradient sync and ZeRO gathers
  double bubble_s = 0;    // pipeline fill and drain
  std::string bottleneck; // the largest of the non-compute parts, or "compute"
};

// What the estimate and the search need of cost::estimate_memory's report.
struct MemorySummary {
  bool fits = true;
  double peak_bytes = 0;
  int peak_rank = 0;
  double capacity_bytes = 0;
  double state_bytes = 0;    // the peak rank's weights + gradients + optimizer states
  double max_weights = 0;    // the largest weights_bytes of any rank
  double working_set_bytes = 0;  // the largest cost::working_set_bytes of any rank
};
MemorySummary summarize(const cost::MemoryReport& report);

class Estimator {
 public:
  // `profile`: the device profile for every device, or null for each device type's priors.
  Estimator(const topo::Cluster& cluster, const cost::DeviceProfile* profile = nullptr);
  ~Estimator();

  // `memory`: from cost::estimate_memory(setup), which the caller has for pruning anyway.
  Estimate estimate(const cost::Setup& setup, const MemorySummary& memory);

 private:
  struct LayerTimes {
    double fwd = 0, bwd = 0, recompute = 0, experts_fwd = 0;
  };
  const LayerTimes& layer_times(const cost::Setup& s, int layer, double tokens);
  double collective_s(cost::CollectiveOp op, cost::CollectiveAlgo algo, const std::vector<int>& ranks, double bytes);
  double imbalance(const cost::Setup& s, const cost::Layer& layer, double tokens);

  const topo::Cluster& cluster_;
  cost::DeviceProfile profile_;
  cost::CollectiveModel collectives_;
  std::map<std::tuple<const void*, int, int, int, bool, bool, double, int, int, double, double, double>, LayerTimes>
      layer_cache_;
  // (op, algorithm, ranks, bytes, transfer factor) -> seconds.
  std::map<std::tuple<int, int, std::vector<int>, double, double>, double> collective_cache_;
  double transfer_factor_ = 1;  // the estimate's (DeviceProfile::transfer_time_factor)
  double host_factor_ = 1;      // the estimate's (DeviceProfile::host_time_factor)
  double gather_factor_ = 0;    // the estimate's (DeviceProfile::gather_footprint_factor; 0: by bytes)
  double scatter_add_factor_ = 0;  // the estimate's (DeviceProfile::scatter_add_factor; 0: none)
  std::map<std::tuple<int, int, double, int, double>, double> imbalance_cache_;
};

}  // namespace moesim::planner
