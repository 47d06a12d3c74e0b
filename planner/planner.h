// The planner: every valid strategy for a (cluster, model, workload), pruned by memory, ranked by
// an analytic estimate, the best simulated with the event simulator, returned best first.
//
//   planner::SearchOptions o;
//   planner::SearchResult r = planner::search(cluster, model, workload, o);
//   r.plans[0].strategy;   // the winner
//
// Strategy space (planner/space.cc): dp x tp x pp = devices, tp within a node by default and
// dividing the heads, pp at most the layers, ep dividing dp and the experts, ZeRO stage, micro-batch
// size (hence count), pipeline schedule (1F1B; interleaved with 2 chunks), recompute, all-to-all
// algorithm (hierarchical only across nodes), MoE overlap chunks, capacity factor (only when
// allowed), expert offload (half or all of the expert weights in host memory, tried only when
// nothing fits without it). Expert replication and placement are not varied: pin them. A pinned
// knob (any field set in SearchOptions::pinned) is not varied; bounds limit the others.
#pragma once

#include "costmodel/setup.h"
#include "planner/plan.pb.h"
#include "schedule/lowering.h"

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace moesim::planner {

enum class Objective {
  kStepTime,       // shortest step on all of the cluster's devices
  kCostPerToken,   // cheapest per token over 1, 2, 4, ... of the cluster's nodes: needs price_per_device_hour
  kFewestDevices,  // the fewest nodes (1, 2, 4, ...) whose best plan reaches target_tokens_per_s
};

struct SearchOptions {
  Objective objective = Objective::kStepTime;
  strategy::Strategy pinned;          // fields set here are fixed (name/description ignored)
  int max_tp = 0;                     // 0: the node's device count (TP within a node)
  int max_pp = 0;                     // 0: the layers
  bool vary_capacity_factor = false;  // else the pinned or default capacity factor
  bool vary_recompute = true;         // also try the recompute modes (the workload's is the default)
  std::optional<workload::Recompute> recompute;  // every candidate with this recompute mode (training)
  double target_tokens_per_s = 0;     // > 0: report when the best plan does not reach it (kFewestDevices: required)
  int top = 10;                       // plans returned
  int simulate_top = 20;              // candidates simulated with the event simulator
  uint64_t seed = 1;
  int routing_samples = schedule::kDefaultRoutingSamples;  // for the simulations (as `moesim simulate`)
  // Every device's profile (a calibration's: `moesim calibrate`) for the estimate and the
  // simulations; null: each device type's priors (cost::default_profile).
  const cost::DeviceProfile* profile = nullptr;
  std::function<void(size_t done, size_t total)> progress;
};

struct RankedPlan {
  plan::Plan plan;                    // strategy (and predicted figures) filled in
  double estimate_s = 0;              // analytic step-time estimate
  bool simulated = false;
  double step_time_s = 0;             // simulated when simulated, else the estimate
  int nodes = 0;                      // the nodes it uses (kCostPerToken, kFewestDevices); 0 = all
};

struct SearchResult {
  std::vector<RankedPlan> plans;      // best first, at most `top`
  int64_t layouts_considered = 0;     // (dp, tp, pp, ep) layouts
  int64_t candidates = 0;             // layouts x every other knob
  int64_t pruned_divisibility = 0;
  int64_t pruned_memory = 0;
  int64_t simulated = 0;
  double search_wall_s = 0;
  // When nothing fits or the target is not reached: the closest plan and the constraint that binds.
  std::string no_plan_reason;
  cost::Setup base;                   // the loaded cluster, model and workload (for callers to reuse)
};

// Searches the space, best first by the objective. `cluster`, `model`, `workload` are sources
// (cost::ConfigSource: path or inline text); throws ConfigError for bad inputs.
// Throws std::invalid_argument for an objective the inputs cannot serve (cost without a price,
// fewest devices without a target, a cluster that is not nodes x a node template).
SearchResult search(const cost::ConfigSource& cluster, const cost::ConfigSource& model, const cost::ConfigSource& workload,
                    const SearchOptions& options);

}  // namespace moesim::planner
