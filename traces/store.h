// The results store: every run, plan, sweep point and validation, with its traces and figures, in
// one embedded SQLite file (reports/ reads it too).
//
// Schema (version Store::kSchemaVersion; the `meta` table holds schema_version):
//   runs        id TEXT PRIMARY KEY, kind (simulate, run, plan, sweep, validate), created (UTC ISO
//               8601), cluster, model, workload, strategy, seed, step_time_s, tokens_per_s, mfu,
//               peak_memory_bytes, fits (NULL when unknown), result_json (the full result), status,
//               inputs_hash, version (schema 2)
//   traces      run_id -> runs.id, source ("predicted", "measured"), span_count, duration_ns,
//               trace (the serialized moesim.trace.Trace); one per (run_id, source)
//   run_metrics run_id -> runs.id, name, value: any further figure, without a migration
// Migrations are a table of SQL steps, applied in order, each in the same transaction that bumps
// schema_version; the file's SQLite application_id marks it as moesim's.
//
// Safety: every write is one transaction (all of a run, its metrics and traces, or nothing); the
// file is in WAL mode with a busy timeout, so several processes may write at once. A path that is
// a folder, cannot be written, is not a SQLite file, is a SQLite file of another schema, or was
// written by a newer moesim gives a StoreError naming the file, and such a file is left untouched.
// Every SQLite call is checked; failures carry the source file:line and sqlite3_errmsg.
//
// A Store is safe to use from several threads (calls are serialised); a process may also open the
// same file several times.
#pragma once

#include "traces/trace.pb.h"

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moesim {

class StoreError : public std::runtime_error {
 public:
  // what(): "PATH: message".
  StoreError(std::string path, std::string message);
  const std::string& path() const { return path_; }
  const std::string& message() const { return message_; }

 private:
  std::string path_;
  std::string message_;
};

enum class RunKind { kSimulate, kRun, kPlan, kSweep, kValidate, kCalibrate };
std::string_view run_kind_name(RunKind kind);  // "simulate", "run", "plan", "sweep", "validate", "calibrate"
std::optional<RunKind> parse_run_kind(std::string_view name);

struct RunRecord {
  std::string id;       // empty on insert: the store assigns "<kind>-<n>" (n = 1, 2, ... per file)
  RunKind kind = RunKind::kSimulate;
  std::string created;  // empty on insert: now, UTC ISO 8601
  std::string cluster;
  std::string model;
  std::string workload;
  std::string strategy;
  uint64_t seed = 0;    // stored as SQLite's signed 64-bit integer, bit for bit
  std::optional<double> step_time_s;
  std::optional<double> tokens_per_s;
  std::optional<double> mfu;
  std::optional<double> peak_memory_bytes;
  std::optional<bool> fits;
  std::string result_json;
  std::string status = "ok";
  std::string inputs_hash;  // a digest of the inputs' contents (the simulator: the four configs and the seed)
  std::string version;      // moesim's version that computed it

  bool operator==(const RunRecord&) const = default;
};

struct RunMetric {
  std::string name;
  double value = 0;  // NaN is stored as NULL and reads back as NaN
};

struct TraceSummary {
  trace::Source source = trace::SOURCE_UNSPECIFIED;
  int64_t span_count = 0;
  int64_t duration_ns = 0;  // last span end - first span start; 0 without spans
};

class Store {
 public:
  static constexpr int kSchemaVersion = 2;

  // Opens `path`, creating the file on first use (its folder must exist) and migrating an older
  // schema. Throws StoreError (see above).
  static Store open(const std::string& path);

  Store(Store&&) noexcept;
  Store& operator=(Store&&) noexcept;
  ~Store();

  // One transaction: the run, its metrics and its traces (each with its run.source set), all or
  // nothing. Returns the run's id. A duplicate id or trace source throws StoreError and writes
  // nothing.
  std::string insert_run(const RunRecord& run, const std::vector<RunMetric>& metrics = {},
                         const std::vector<trace::Trace>& traces = {});
  // Adds a trace (its run.source says which) to an existing run.
  void add_trace(const std::string& run_id, const trace::Trace& trace);
  // Sets metrics of an existing run, replacing values of the same names; one transaction.
  void put_metrics(const std::string& run_id, const std::vector<RunMetric>& metrics);
  void set_status(const std::string& run_id, const std::string& status);

  std::optional<RunRecord> find_run(const std::string& id) const;
  // Runs in insertion order, optionally of one kind.
  std::vector<RunRecord> list_runs(std::optional<RunKind> kind = std::nullopt) const;
  std::optional<trace::Trace> find_trace(const std::string& run_id, trace::Source source) const;
  std::vector<TraceSummary> trace_summaries(const std::string& run_id) const;
  std::map<std::string, double> metrics(const std::string& run_id) const;

  int schema_version() const;
  const std::string& path() const;

 private:
  struct Impl;
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moesim
