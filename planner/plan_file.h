// Reading a plan file (planner/plan.proto) back as a scenario, for `moesim simulate --plan` and the
// executor: the plan's cluster, model and workload files (relative to the plan's folder), the
// workload's micro-batch size and recompute as the plan chose them, the plan's strategy, and the
// device profile it was priced with (if any).
#pragma once

#include "sim/scenario.h"

#include <string>

namespace moesim::planner {

// Throws ConfigError naming the plan file's lines: a missing input, a strategy that does not fit
// the inputs, a placement other than rank order (not supported yet).
sim::Scenario load_plan(const std::string& path);

}  // namespace moesim::planner
