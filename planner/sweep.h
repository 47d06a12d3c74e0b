// What-if sweeps (docs/PLANNER.md, "Sweeps"): a base scenario and a grid over fields of its four
// configs (planner/sweep.proto), every point simulated and stored as it finishes.
//
//   planner::Sweep s = planner::load_sweep("configs/sweeps/nvlink-domain.textproto");
//   s.point_count();                              // the product of the axes' lengths
//   sim::Scenario p = planner::build_point(s, 7);   // ConfigError: point 7 is not a valid setup
//   planner::SweepRun r = planner::run_sweep(s, store, options);
//
// Grid order: point i's value on axis a is values[(i / stride_a) % len_a], where stride_a is the
// product of the lengths of the axes after a: the first axis varies slowest, the last fastest
// (nested loops written in the file's order). Fields given under an axis's `together` move with it.
//
// A point is built from the base scenario's configs as written (before presets and defaults are
// filled in): each axis sets its field on a copy (planner/field_path.h), the changed configs are
// printed back to text and everything goes through cost::load_setup, so a point is validated exactly
// like a config file. An invalid point's diagnostics point at the sweep file's axis line when they
// are about a swept field, and at the base config (line 0: the printed text has no lines of its own)
// otherwise; every message ends with "(point N)".
//
// Store conventions (reports/ reads them): one run per point, kind "sweep", id
// "sweep:<name>:<index>", status "ok" or "invalid", metrics "point" = index and "axis.<field>" = the
// point's value on every axis (a number; an enum: its number; a string field: the value's position
// in the axis's list). What else a row holds comes from the evaluator (`moesim sweep`: the
// SimulateResult JSON and the metrics of `moesim simulate --db`; for an invalid point the
// CheckResult JSON of its problems and no step time).
//
// Resuming: a point whose id is already in the store is not run again. Each point is committed in
// its own transaction as it finishes, so a sweep killed at any moment (kill -9 included) leaves
// whole rows only, and a rerun completes it with no duplicate and no missing row. A stored point
// whose axis values differ from this sweep's (the file changed under the same name) is refused
// before any work.
#pragma once

#include "costmodel/model.pb.h"
#include "costmodel/strategy.pb.h"
#include "costmodel/workload.pb.h"
#include "planner/field_path.h"
#include "planner/sweep.pb.h"
#include "sim/scenario.h"
#include "topologies/hardware.pb.h"
#include "traces/store.h"

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace moesim::planner {

// Which config an axis's field belongs to (its path's first component).
enum class SweepTarget { kCluster, kModel, kWorkload, kStrategy, kSeed };

// One swept field. A field written under another axis's `together` follows that axis (`follows`:
// its index in Sweep::axes) instead of adding a dimension to the grid.
struct SweepAxis {
  std::string field;    // as written: "cluster.node.scaleup_bandwidth_Bps"
  SweepTarget target = SweepTarget::kCluster;
  std::string subpath;  // the path inside the config: "node.scaleup_bandwidth_Bps" (empty for seed)
  int line = 0;         // the axis's `field` line in the sweep file
  std::vector<FieldValue> values;
  std::vector<double> metric_values;  // the store's "axis.<field>" for each value (see above)
  bool is_text = false;               // given as `strings`
  int follows = -1;                   // -1: a dimension of the grid
};

struct Sweep {
  std::string path;  // the sweep file
  std::string name;
  int name_line = 0;  // where `name` is written
  std::string description;
  bool replan = false;
  int replan_line = 0;
  std::vector<SweepAxis> axes;  // in the file's order, each `together` field right after its axis
  sim::Scenario base;  // the base scenario, loaded and validated
  // The base's four configs as written, and whether each came from a file (else inline).
  hw::Cluster cluster;
  model::Model model;
  workload::Workload workload;
  strategy::Strategy strategy;
  bool from_file[4] = {true, true, true, true};  // by SweepTarget (cluster, model, workload, strategy)

  size_t point_count() const;
  // Point `index`'s value index on each axis (see the grid order above; a `together` field takes
  // its axis's).
  std::vector<size_t> point_values(size_t index) const;
  std::string point_id(size_t index) const;  // "sweep:<name>:<index>"
  // "cluster.node.scaleup_bandwidth_Bps=4.5e+11 strategy.capacity_factor=1.25"
  std::string point_label(size_t index) const;
};

// Most points a sweep may have.
inline constexpr size_t kMaxSweepPoints = 1000000;

// Loads and validates a sweep file and its base scenario: every problem at once (ConfigError), the
// sweep's own naming the file, the line and the field (a field path that does not exist: the axis's
// line, the path, and the valid field names where it failed). Every axis value is tried on the base
// configs here, so a bad path, type or range is reported before any work.
Sweep load_sweep(const std::string& path);

// The scenario of point `index`, validated. Throws ConfigError when the point is not a valid setup.
//
// With `replan`, the strategy is chosen by the planner (planner::search, shortest step) for the
// point's cluster, model and workload: the knobs it searches (dp, tp, pp, ep, virtual stages, ZeRO
// stage, micro-batches, schedule, all-to-all algorithm, overlap chunks; the workload's micro-batch
// size and recompute) are free unless an axis sets them, and the base strategy's other fields
// (capacity factor, drop policy, offload, ...) stay. The scenario's `strategy` label is then
// "planned: <the plan's name>". No plan (nothing fits) makes the point invalid, at the `replan`
// line. Placement is the identity (rank r on device r).
sim::Scenario build_point(const Sweep& sweep, size_t index);

// What an evaluator made of one point, ready to store: `record`'s id, kind, status defaults and
// the axis metrics are filled in by run_sweep.
struct PointOutcome {
  RunRecord record;  // status "ok" or "invalid"
  std::vector<RunMetric> metrics;
};

struct SweepOptions {
  int jobs = 1;  // points evaluated at once, each on its own thread
  // Evaluates point `index` (build_point, then simulate). An exception other than ConfigError
  // makes the point an "error": not stored (so a rerun tries it again); the others go on.
  std::function<PointOutcome(const Sweep&, size_t index)> evaluate;
  // Called once before the first point with how many will run (not stored yet).
  std::function<void(size_t to_run)> on_start;
  // Called after each point is committed (or failed), from the thread that ran it.
  std::function<void(size_t index)> on_done;
};

struct PointRun {
  size_t index = 0;
  bool skipped = false;  // was in the store already
  std::string status;    // "ok", "invalid" (stored) or "error" (not stored)
  std::optional<RunRecord> record;  // as stored (or as found in the store)
  std::string error;     // status "error": what went wrong
};

struct SweepRun {
  std::vector<PointRun> points;  // grid order
  int ok = 0, invalid = 0, skipped = 0, errors = 0;
  double wall_s = 0;
};

// Runs every point not yet in `store`. Throws ConfigError (before any work) when the store holds
// points of a sweep of this name with other axis values.
SweepRun run_sweep(const Sweep& sweep, Store& store, const SweepOptions& options);

}  // namespace moesim::planner
