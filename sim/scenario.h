// Loading a scenario file (sim/scenario.proto) into a validated setup.
//
//   sim::Scenario s = sim::load_scenario("configs/scenarios/deepseek-v3-h800.textproto");
//   s.setup.layout.dp;  s.seed;
//
// Paths are relative to the scenario file's folder (absolute paths are kept). An inline config is
// validated like a file of its own, with diagnostics pointing at its lines in the scenario file.
// Every problem of the scenario and of the four configs is reported at once (ConfigError).
#pragma once

#include "costmodel/compute.h"
#include "costmodel/setup.h"
#include "schedule/lowering.h"

#include <cstdint>
#include <optional>
#include <string>

namespace moesim::sim {

struct Scenario {
  std::string path;  // the scenario file; empty when built from four paths
  std::string name;
  cost::Setup setup;
  uint64_t seed = 1;
  int routing_samples = schedule::kDefaultRoutingSamples;
  std::optional<cost::DeviceProfile> profile;
  // What each of the four came from: a path, or "<scenario>#cluster_inline".
  std::string cluster, model, workload, strategy;
};

Scenario load_scenario(const std::string& path);

// The same from four files (`moesim simulate --cluster C --model M ...`).
Scenario scenario_from_files(const std::string& cluster, const std::string& model, const std::string& workload,
                             const std::string& strategy);

}  // namespace moesim::sim
