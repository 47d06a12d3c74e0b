// `moesim sweep`: a what-if grid over a base scenario (planner/sweep.h), every point simulated as
// `moesim simulate` would and stored as it finishes.
#include "cli/cli.pb.h"
#include "cli/commands.h"
#include "cli/simulate.h"
#include "common/json.h"
#include "common/progress.h"
#include "common/units.h"
#include "planner/sweep.h"
#include "traces/store.h"

#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <unistd.h>

namespace moesim::cli {
namespace {

// One point: simulated like `moesim simulate SCENARIO --db` (default network and folding, no
// trace), or, when its configs are not a valid setup, its problems as a CheckResult.
planner::PointOutcome evaluate(const planner::Sweep& s, size_t index) {
  planner::PointOutcome o;
  try {
    const sim::Scenario sc = planner::build_point(s, index);
    SimulateOutput r = simulate_scenario(sc, SimulateOptions{});
    o.record = std::move(r.record);
    o.metrics = std::move(r.metrics);
  } catch (const ConfigError& e) {
    o.record.status = "invalid";
    o.record.cluster = s.base.cluster;
    o.record.model = s.base.model;
    o.record.workload = s.base.workload;
    o.record.strategy = s.base.strategy;
    o.record.seed = s.base.seed;
    o.record.result_json = to_json(check_result(e, s.path));
    o.record.version = MOESIM_VERSION;
  }
  return o;
}

template <typename Msg>
std::optional<Msg> from_json(const std::string& text) {
  Msg m;
  google::protobuf::util::JsonParseOptions o;
  o.ignore_unknown_fields = true;
  if (!google::protobuf::util::JsonStringToMessage(text, &m, o).ok()) return std::nullopt;
  return m;
}

sweep::SweepSummary summarize(const planner::Sweep& s, const planner::SweepRun& run, const std::string& db, int jobs) {
  sweep::SweepSummary out;
  out.set_sweep(s.name);
  out.set_file(s.path);
  out.set_db(db);
  out.set_points(static_cast<int>(run.points.size()));
  out.set_ok(run.ok);
  out.set_invalid(run.invalid);
  out.set_skipped(run.skipped);
  out.set_errors(run.errors);
  out.set_jobs(jobs);
  out.set_wall_s(run.wall_s);
  for (const planner::PointRun& p : run.points) {
    sweep::PointSummary* ps = out.add_results();
    ps->set_index(static_cast<int>(p.index));
    ps->set_id(s.point_id(p.index));
    const std::vector<size_t> at = s.point_values(p.index);
    for (size_t a = 0; a < s.axes.size(); ++a) {
      const planner::SweepAxis& axis = s.axes[a];
      const planner::FieldValue& v = axis.values[at[a]];
      if (v.number) (*ps->mutable_axis())[axis.field] = *v.number;
      else {
        (*ps->mutable_axis_text())[axis.field] = v.text;
        (*ps->mutable_axis())[axis.field] = axis.metric_values[at[a]];
      }
    }
    ps->set_status(p.status);
    ps->set_skipped(p.skipped);
    if (p.status == "error") ps->set_problem(p.error);
    if (!p.record) continue;
    ps->set_strategy(p.record->strategy);
    if (p.status == "ok") {
      if (p.record->step_time_s) ps->set_step_time_s(*p.record->step_time_s);
      if (p.record->tokens_per_s) ps->set_tokens_per_s(*p.record->tokens_per_s);
      if (p.record->fits) ps->set_fits(*p.record->fits);
      if (auto r = from_json<SimulateResult>(p.record->result_json)) ps->set_samples_per_s(r->samples_per_s());
    } else if (auto c = from_json<CheckResult>(p.record->result_json); c && c->errors_size() > 0) {
      const Problem& e = c->errors(0);
      ps->set_problem(Diagnostic{e.file(), e.line(), e.column(), e.field(), e.message()}.to_string());
    }
  }
  return out;
}

void print_summary(const planner::Sweep& s, const sweep::SweepSummary& r, std::ostream& out) {
  out << fmt::format("sweep {}: {} over {} point{} of {}\n", s.name, s.base.name, r.points(), r.points() == 1 ? "" : "s", s.path);
  std::vector<std::string> head = {"point"};
  for (const planner::SweepAxis& a : s.axes) head.push_back(a.field);
  if (s.replan) head.push_back("planned strategy");
  for (const char* h : {"step time", "throughput", "memory", "status"}) head.push_back(h);
  std::vector<std::vector<std::string>> rows;
  for (const sweep::PointSummary& p : r.results()) {
    std::vector<std::string> row = {std::to_string(p.index())};
    const std::vector<size_t> at = s.point_values(static_cast<size_t>(p.index()));
    for (size_t a = 0; a < s.axes.size(); ++a) row.push_back(s.axes[a].values[at[a]].to_string());
    const bool ok = p.status() == "ok";
    if (s.replan) row.push_back(ok && p.strategy().rfind("planned: ", 0) == 0 ? p.strategy().substr(9) : "-");
    row.push_back(ok ? format_seconds(p.step_time_s()) : "-");
    row.push_back(!ok ? "-"
                  : p.tokens_per_s() > 0 ? fmt::format("{:.0f} tokens/s", p.tokens_per_s())
                                         : fmt::format("{:.1f} samples/s", p.samples_per_s()));
    row.push_back(!ok ? "-" : p.fits() ? "fits" : "DOES NOT FIT");
    row.push_back(p.skipped() ? p.status() + " (stored before)" : p.status());
    rows.push_back(std::move(row));
  }
  std::vector<size_t> width(head.size());
  for (size_t c = 0; c < head.size(); ++c) {
    width[c] = head[c].size();
    for (const auto& row : rows) width[c] = std::max(width[c], row[c].size());
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (size_t c = 0; c < cells.size(); ++c) {
      const bool left = head[c] == "status" || head[c] == "planned strategy";  // texts left, numbers right
      l += c ? "  " : "";
      l += left ? cells[c] : fmt::format("{:>{}}", cells[c], width[c]);
    }
    out << l << '\n';
  };
  line(head);
  for (const auto& row : rows) line(row);
  int shown = 0;
  for (const sweep::PointSummary& p : r.results()) {
    if (p.problem().empty()) continue;
    if (shown++ == 10) {
      out << "  ... (every point's problems are in the store's result_json)\n";
      break;
    }
    out << fmt::format("{}point {} {}: {}\n", shown == 1 ? "\n" : "", p.index(), p.status(), p.problem());
  }
  out << fmt::format("\n{} ok, {} invalid{}; {} already in the store (skipped); {} with {} job{}; stored in {}\n", r.ok(), r.invalid(),
                     r.errors() ? fmt::format(", {} failed (not stored: rerun to retry)", r.errors()) : "", r.skipped(),
                     format_seconds(r.wall_s()), r.jobs(), r.jobs() == 1 ? "" : "s", r.db());
}

int sweep(const Args& a) {
  const bool json = a.flag("--json");
  if (a.positional().size() != 1) throw UsageError("expected one sweep file (configs/sweeps/*.textproto)");
  if (!a.has("--db")) throw UsageError("missing --db FILE: the results store that keeps every point (and lets a sweep resume)");
  const int jobs = a.get_int("--jobs", 1, 1, 256);
  const std::string path = a.positional()[0];
  const std::string db = a.get("--db");

  std::optional<planner::Sweep> s;
  try {
    s.emplace(planner::load_sweep(path));
  } catch (const ConfigError& e) {
    return report_config_error(e, path, json);
  }
  // Opened (and checked: not moesim's, newer schema, ...) before any work; refused files are left untouched.
  Store store = Store::open(db);

  std::optional<Progress> progress(std::in_place, fmt::format("sweep {}", s->name), 0);
  // Test hook: MOESIM_SWEEP_CRASH_AFTER=N ends the process abruptly (_exit, status 137 as if killed)
  // once N points were stored by this run, to check that a rerun resumes with nothing lost.
  const char* crash_env = std::getenv("MOESIM_SWEEP_CRASH_AFTER");
  const long crash_after = crash_env != nullptr ? std::atol(crash_env) : 0;
  std::atomic<long> stored{0};

  planner::SweepOptions o;
  o.jobs = jobs;
  o.evaluate = evaluate;
  o.on_start = [&](size_t n) { progress->set_total(n); };
  o.on_done = [&](size_t) {
    progress->advance();
    if (crash_after > 0 && ++stored == crash_after) ::_exit(137);
  };
  std::optional<planner::SweepRun> run;
  try {
    run.emplace(planner::run_sweep(*s, store, o));
  } catch (const ConfigError& e) {
    return report_config_error(e, path, json);
  }
  progress.reset();  // clears the bar's line before the summary
  const sweep::SweepSummary summary = summarize(*s, *run, db, jobs);
  if (json) std::cout << to_json(summary);
  else print_summary(*s, summary, std::cout);
  if (run->errors > 0) {
    for (const planner::PointRun& p : run->points)
      if (p.status == "error") std::cerr << fmt::format("moesim: sweep {}: point {} failed: {}\n", s->name, p.index, p.error);
    return kExitInternal;
  }
  return kExitOk;
}

}  // namespace

std::vector<Command> sweep_commands() {
  return {
      {"sweep", "what-if grid over a scenario's fields: every point simulated, stored, resumable",
       "usage: moesim sweep SWEEP_FILE --db FILE [--jobs N] [--json]\n\n"
       "  SWEEP_FILE   a sweep (planner/sweep.proto; configs/sweeps/*.textproto): a base scenario and\n"
       "               axes, each a field path (cluster.node.scaleup_bandwidth_Bps, strategy.capacity_factor,\n"
       "               ...) with its values; the grid is every combination\n"
       "  --db FILE    the SQLite results store: one run per point (kind sweep, id sweep:NAME:POINT),\n"
       "               each committed as it finishes; points already there are skipped, so an\n"
       "               interrupted sweep resumes where it stopped\n"
       "  --jobs N     points simulated at once, one thread each (default 1)\n"
       "  --json       points, ok, invalid, skipped, errors, wall_s and every point's axis values,\n"
       "               status, step_time_s, tokens_per_s\n\n"
       "A point whose configs are not a valid setup is stored with status invalid and its problems;\n"
       "the others go on (exit 0). A bad sweep file exits 2 naming the file, line and field, before\n"
       "any work; so does a results store that is not moesim's or was written by a newer moesim.\n",
       {{"--json"}, {"--db", "--jobs"}},
       sweep},
  };
}

}  // namespace moesim::cli
