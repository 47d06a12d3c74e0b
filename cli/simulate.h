// One simulated step of a loaded scenario, as `moesim simulate` reports and stores it; shared by
// `moesim simulate` and `moesim sweep` (each sweep point), so that both give the same figures, the
// same JSON and the same store row.
#pragma once

#include "cli/args.h"
#include "cli/cli.pb.h"
#include "schedule/lowering.h"
#include "sim/engine.h"
#include "sim/scenario.h"
#include "traces/store.h"
#include "traces/trace.pb.h"

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace moesim::cli {

struct SimulateOptions {
  std::optional<sim::NetworkMode> network;  // nullopt: flows, unless the schedule is folded (analytic)
  schedule::Fold fold = schedule::Fold::kAuto;
  bool record_trace = false;                // keep the predicted trace's spans (--trace, --db)
  std::function<void(double fraction)> progress;  // the engine's progress, 0..1
};

struct SimulateOutput {
  SimulateResult result;           // what `simulate --json` prints (trace_file and run_id not set)
  RunRecord record;                // kind simulate, id empty; result_json = to_json(result)
  std::vector<RunMetric> metrics;  // breakdown.<category>, samples_per_s, events, sim_wall_s, expert_imbalance, dropped_fraction
  trace::Trace trace;              // the predicted trace (spans only with record_trace)
};

// Lowers and simulates `scenario` (schedule::lower, sim::simulate). Throws ConfigError when the
// lowering refuses the setup.
SimulateOutput simulate_scenario(const sim::Scenario& scenario, const SimulateOptions& options);

// FNV-1a over the four configs as loaded, the device profile, the seed and the routing draws.
std::string inputs_hash(const sim::Scenario& scenario);

// The scenario a command is given as `simulate` takes it: a scenario file (the one positional
// argument), --plan FILE (planner::load_plan), or --cluster/--model/--workload/--strategy; `input`
// names the file diagnostics point into. Throws UsageError for none or a mix, ConfigError from the
// loaders.
sim::Scenario scenario_of_args(const Args& a, std::string* input);

}  // namespace moesim::cli
