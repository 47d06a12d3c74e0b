// What-if sweeps (planner/sweep.h, planner/field_path.h, cli/sweep_command.cc): setting fields by
// path, expanding the grid, building points, and `moesim sweep` end to end: one store row per point
// with its axis values, invalid points kept and the others run, resuming after a crash with nothing
// lost or doubled, --jobs 2 giving the rows of --jobs 1, and databases it must not touch.
//
// Sweeps here run on the inline example configs/scenarios/examples/tiny-moe-dgx.textproto (8 H100s,
// a 2-layer MoE: a few ms a point) so that every case stays well under a few seconds.
#include "sqlite_helpers.h"
#include "cli/cli.pb.h"
#include "common/error.h"
#include "costmodel/strategy.pb.h"
#include "costmodel/workload.pb.h"
#include "planner/field_path.h"
#include "planner/sweep.h"
#include "tests/cli_helpers.h"
#include "topologies/hardware.pb.h"
#include "traces/store.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <sqlite3.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace moesim;
using namespace moesim::testing;

namespace {

namespace fs = std::filesystem;
using planner::FieldValue;

std::string src(const std::string& rel) { return fmt::format("{}/{}", MOESIM_SOURCE_DIR, rel); }

const std::string kTinyScenario = src("configs/scenarios/examples/tiny-moe-dgx.textproto");


// A sweep over tiny-moe-dgx: `name`, then `axes` (lines 3 on).
std::string sweep_text(const std::string& name, const std::string& axes) {
  return fmt::format("name: \"{}\"\nscenario: \"{}\"\n", name, kTinyScenario) + axes;
}

// 3 x 2 = 6 points; capacity factor -1 is not a valid strategy, so points 4 and 5 are invalid.
const std::string kSixPoints =
    "axis {\n"                                       // 3
    "  field: \"strategy.capacity_factor\"\n"        // 4
    "  values: [1.0, 2.0, -1]\n"                     // 5
    "}\n"                                            // 6
    "axis { field: \"strategy.overlap_chunks\"  values: [1, 2] }\n";  // 7

// The example scenario's text with its cluster by absolute path (to be written elsewhere), and
// `from` replaced by `to` in it.
std::string tiny_scenario_with(const std::string& from, const std::string& to) {
  std::string text = read_file(kTinyScenario);
  for (const auto& [a, b] : {std::pair<std::string, std::string>{"\"../../hardware/dgx-h100.textproto\"",
                                                                  fmt::format("\"{}\"", src("configs/hardware/dgx-h100.textproto"))},
                             {from, to}}) {
    const size_t at = text.find(a);
    REQUIRE(at != std::string::npos);
    text.replace(at, a.size(), b);
  }
  return text;
}

std::string field_error(google::protobuf::Message* msg, const std::string& path, const FieldValue& v) {
  try {
    planner::set_field(msg, path, v);
  } catch (const planner::FieldPathError& e) {
    return e.what();
  }
  FAIL("no FieldPathError for " << path);
  return "";
}

// Every diagnostic of a ConfigError as "FILE:LINE field: message" ("" when nothing is thrown).
template <typename F>
std::vector<Diagnostic> config_errors(F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.diagnostics();
  }
  return {};
}

sweep::SweepSummary sweep_json(const std::string& args, const std::string& env = "") {
  Run r = moesim_run(fmt::format("sweep {} --json", args), env);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  return parse_json<sweep::SweepSummary>(r.out);
}

// The store's rows of one sweep, by id.
std::map<std::string, RunRecord> sweep_rows(const std::string& db) {
  std::map<std::string, RunRecord> rows;
  for (RunRecord& r : Store::open(db).list_runs(RunKind::kSweep)) {
    const std::string id = r.id;
    CHECK(rows.emplace(id, std::move(r)).second);
  }
  return rows;
}

// A JSON text without its wall-clock lines (sim_wall_s, lowering_wall_s).
std::string without_wall_clock(const std::string& json) {
  std::istringstream in(json);
  std::string out;
  for (std::string line; std::getline(in, line);)
    if (line.find("_wall_s\"") == std::string::npos) out += line + '\n';
  return out;
}

}  // namespace

TEST_CASE("set_field: nested messages, integers, doubles, enums by name or number, bools, strings and list elements") {
  hw::Cluster c;
  planner::set_field(&c, "node.scaleup_bandwidth_Bps", FieldValue::of(300e9));  // creates `node`
  planner::set_field(&c, "nodes", FieldValue::of(16));
  planner::set_field(&c, "fabric.rail_optimized.oversubscription", FieldValue::of(2.5));
  planner::set_field(&c, "node.nic[0].bandwidth_Bps", FieldValue::of(50e9));  // index == size appends
  planner::set_field(&c, "node.nic[0].count", FieldValue::of(8));
  planner::set_field(&c, "node.intra_fabric", FieldValue::of("NVLINK_MESH"));
  planner::set_field(&c, "name", FieldValue::of("what-if"));
  CHECK(c.node().scaleup_bandwidth_bps() == 300e9);
  CHECK(c.nodes() == 16);
  CHECK(c.fabric().rail_optimized().oversubscription() == 2.5);
  REQUIRE(c.node().nic_size() == 1);
  CHECK(c.node().nic(0).bandwidth_bps() == 50e9);
  CHECK(c.node().nic(0).count() == 8);
  CHECK(c.node().intra_fabric() == hw::NVLINK_MESH);
  CHECK(c.name() == "what-if");

  strategy::Strategy s;
  planner::set_field(&s, "all_to_all", FieldValue::of("HIERARCHICAL"));
  CHECK(s.all_to_all() == strategy::HIERARCHICAL);
  planner::set_field(&s, "all_to_all", FieldValue::of(static_cast<double>(strategy::DIRECT)));
  CHECK(s.all_to_all() == strategy::DIRECT);
  planner::set_field(&s, "sequence_parallel", FieldValue::of("true"));
  CHECK(s.sequence_parallel());
  planner::set_field(&s, "sequence_parallel", FieldValue::of(0));
  CHECK_FALSE(s.sequence_parallel());
  const auto* f = planner::set_field(&s, "capacity_factor", FieldValue::of(1.5));
  REQUIRE(f != nullptr);
  CHECK(f->name() == "capacity_factor");
  CHECK(s.capacity_factor() == 1.5);

  workload::Workload w;
  planner::set_field(&w, "training.global_batch", FieldValue::of(4096));
  CHECK(w.training().global_batch() == 4096);
  planner::set_field(&w, "routing.seed", FieldValue::of(18446744073709549568.0));  // a uint64 above 2^63
  CHECK(w.routing().seed() == 18446744073709549568ULL);
}

TEST_CASE("set_field: a path that does not exist names the level that failed and its valid fields, bad values say why") {
  hw::Cluster c;
  const std::string no_field = field_error(&c, "node.scaleup_bandwidth", FieldValue::of(1e9));
  CHECK(no_field.find("no field 'scaleup_bandwidth' in node (moesim.hw.NodeTemplate)") != std::string::npos);
  for (const char* valid : {"devices_per_node", "scaleup_bandwidth_Bps", "nic", "pcie"}) CHECK(no_field.find(valid) != std::string::npos);
  const std::string top = field_error(&c, "fabrik.fat_tree.spines", FieldValue::of(4));
  CHECK(top.find("no field 'fabrik' in moesim.hw.Cluster") != std::string::npos);
  CHECK(top.find("fabric") != std::string::npos);

  CHECK(field_error(&c, "nodes", FieldValue::of(1.5)).find("'nodes' is int32: 1.5 is not an integer") != std::string::npos);
  CHECK(field_error(&c, "nodes", FieldValue::of(3e9)).find("out of its range") != std::string::npos);
  CHECK(field_error(&c, "nodes", FieldValue::of("eight")).find("expected a number") != std::string::npos);
  CHECK(field_error(&c, "name", FieldValue::of(3)).find("is string") != std::string::npos);
  const std::string bad_enum = field_error(&c, "node.intra_fabric", FieldValue::of("INFINIBAND"));
  CHECK(bad_enum.find("not one of its values") != std::string::npos);
  CHECK(bad_enum.find("NVSWITCH") != std::string::npos);
  CHECK(field_error(&c, "node.intra_fabric", FieldValue::of(99)).find("not one of its values") != std::string::npos);
  CHECK(field_error(&c, "node.nic.count", FieldValue::of(8)).find("'node.nic' is repeated: give an index, e.g. 'node.nic[0]'") !=
        std::string::npos);
  CHECK(field_error(&c, "node.nic[3].count", FieldValue::of(8)).find("index out of range") != std::string::npos);
  CHECK(field_error(&c, "nodes.count", FieldValue::of(8)).find("not a message") != std::string::npos);
  CHECK(field_error(&c, "node", FieldValue::of(8)).find("is a message") != std::string::npos);
  CHECK(field_error(&c, "node.", FieldValue::of(8)).find("empty field name") != std::string::npos);

  // A oneof member is not entered while another is set: that would replace the fabric silently.
  planner::set_field(&c, "fabric.rail_optimized.spines", FieldValue::of(4));
  const std::string oneof = field_error(&c, "fabric.fat_tree.oversubscription", FieldValue::of(2));
  CHECK(oneof.find("has 'rail_optimized' set") != std::string::npos);
  CHECK(c.fabric().has_rail_optimized());

  // Path problems and value problems are told apart (a sweep reports them at different places).
  try {
    planner::set_field(&c, "nodes", FieldValue::of(-1.5));
  } catch (const planner::FieldPathError& e) {
    CHECK(e.kind() == planner::FieldPathError::Kind::kValue);
  }
  try {
    planner::set_field(&c, "nodez", FieldValue::of(1));
  } catch (const planner::FieldPathError& e) {
    CHECK(e.kind() == planner::FieldPathError::Kind::kPath);
  }
}

TEST_CASE("sweep grid: the product of the axes, the first slowest, `together` fields moving with their axis") {
  TempFile file("sweep_grid.textproto",
                sweep_text("grid", "axis { field: \"strategy.capacity_factor\"  values: [1.0, 1.25, 1.5] }\n"
                                   "axis {\n"
                                   "  field: \"strategy.all_to_all\"  strings: [\"DIRECT\", \"HIERARCHICAL\"]\n"
                                   "  together { field: \"strategy.overlap_chunks\"  values: [1, 2] }\n"
                                   "}\n"
                                   "axis { field: \"seed\"  values: [1, 2] }\n"));
  const planner::Sweep s = planner::load_sweep(file.path);
  REQUIRE(s.axes.size() == 4);
  CHECK(s.point_count() == 3 * 2 * 2);
  CHECK(s.axes[2].field == "strategy.overlap_chunks");
  CHECK(s.axes[2].follows == 1);
  // Nested loops in the file's order: capacity factor outermost, seed innermost.
  CHECK(s.point_values(0) == std::vector<size_t>{0, 0, 0, 0});
  CHECK(s.point_values(1) == std::vector<size_t>{0, 0, 0, 1});
  CHECK(s.point_values(2) == std::vector<size_t>{0, 1, 1, 0});
  CHECK(s.point_values(4) == std::vector<size_t>{1, 0, 0, 0});
  CHECK(s.point_values(11) == std::vector<size_t>{2, 1, 1, 1});
  CHECK(s.point_id(7) == "sweep:grid:7");
  CHECK(s.point_label(7) == "strategy.capacity_factor=1.25 strategy.all_to_all=HIERARCHICAL strategy.overlap_chunks=2 seed=2");
  // Enum axes are stored by number.
  CHECK(s.axes[1].metric_values == std::vector<double>{strategy::DIRECT, strategy::HIERARCHICAL});

  const sim::Scenario p = planner::build_point(s, 7);
  CHECK(p.setup.strategy->capacity_factor() == 1.25);
  CHECK(p.setup.strategy->all_to_all() == strategy::HIERARCHICAL);
  CHECK(p.setup.strategy->overlap_chunks() == 2);
  CHECK(p.seed == 2);
  // What the axes do not touch stays as in the base scenario.
  CHECK(p.setup.strategy->tp() == 2);
  CHECK(p.setup.strategy->zero_stage() == 1);
  CHECK(p.setup.model->transformer().moe().experts() == 8);
  CHECK(p.setup.cluster->device_count() == 8);
}

TEST_CASE("load_sweep: a field path that does not exist names the sweep file, the axis's line, the path and the valid names") {
  TempFile file("sweep_badpath.textproto",
                sweep_text("bad", "axis { field: \"strategy.capacity_factor\"  values: [1.0] }\n"  // 3
                                  "axis {\n"                                                      // 4
                                  "  field: \"cluster.node.scaleup_bandwidth\"\n"                 // 5
                                  "  values: [1e11, 2e11]\n"
                                  "}\n"
                                  "axis { field: \"strategy.dp\"  values: [2.5] }\n"             // 8
                                  "axis { field: \"modle.transformer.layers\"  values: [2] }\n"  // 9
                                  "axis { field: \"cluster.node.nic.count\"  values: [2] }\n"));  // 10
  const std::vector<Diagnostic> d = config_errors([&] { planner::load_sweep(file.path); });
  INFO(ConfigError(d).what());
  REQUIRE(d.size() == 4);
  for (const Diagnostic& x : d) CHECK(x.file == file.path);
  CHECK(d[0].line == 5);
  CHECK(d[0].field_path == "axis[1].field");
  CHECK(d[0].message.find("'cluster.node.scaleup_bandwidth': no field 'scaleup_bandwidth' in cluster.node") != std::string::npos);
  CHECK(d[0].message.find("scaleup_bandwidth_Bps") != std::string::npos);
  CHECK(d[0].message.find("devices_per_node") != std::string::npos);
  CHECK(d[1].line == 8);
  CHECK(d[1].message.find("is not an integer") != std::string::npos);
  CHECK(d[2].line == 9);
  CHECK(d[2].message.find("cluster, model, workload, strategy") != std::string::npos);
  CHECK(d[3].line == 10);
  CHECK(d[3].message.find("'cluster.node.nic' is repeated: give an index") != std::string::npos);

  SECTION("the CLI exits 2 with FILE:LINE: field: message, before creating the results store") {
    TempFile db("sweep_badpath.db");
    Run r = moesim_run(fmt::format("sweep '{}' --db '{}'", file.path, db.path));
    CHECK(r.exit_code == 2);
    CHECK(r.err.find(file.path + ":5: axis[1].field: 'cluster.node.scaleup_bandwidth': no field") != std::string::npos);
    CHECK_FALSE(fs::exists(db.path));
    Run j = moesim_run(fmt::format("sweep '{}' --db '{}' --json", file.path, db.path));
    CHECK(j.exit_code == 2);
    auto check = parse_json<cli::CheckResult>(j.out);
    REQUIRE(check.errors_size() == 4);
    CHECK(check.errors(0).line() == 5);
  }
}

TEST_CASE("load_sweep: the sweep's own problems, every one at once") {
  auto problems = [](const std::string& name, const std::string& text) {
    TempFile file(name, text);
    std::vector<std::string> got;
    for (const Diagnostic& d : config_errors([&] { planner::load_sweep(file.path); }))
      got.push_back(fmt::format("{} {}: {}", d.line, d.field_path, d.message));
    return got;
  };
  auto has = [](const std::vector<std::string>& got, const std::string& what) {
    INFO(what);
    for (const std::string& g : got) INFO(g);
    return std::any_of(got.begin(), got.end(), [&](const std::string& g) { return g.find(what) != std::string::npos; });
  };
  const auto missing = problems("sweep_missing.textproto", "description: \"nothing\"\n");
  CHECK(has(missing, "name: missing required value"));
  CHECK(has(missing, "scenario: missing required value"));
  CHECK(has(missing, "axis: no axes"));
  const auto bad = problems("sweep_bad.textproto",
                            "name: \"has space\"\nscenario: \"no/such.textproto\"\n\n"
                            "axis { field: \"strategy.dp\" values: [1] strings: [\"x\"] }\n"
                            "axis { field: \"strategy.tp\" }\n"
                            "axis { field: \"strategy.pp\" values: [1, 2] together { field: \"strategy.ep\" values: [1] } }\n"
                            "axis { field: \"strategy.pp\" values: [1] }\n");
  CHECK(has(bad, "1 name: 'has space'"));
  CHECK(has(bad, "2 scenario: no such file"));
  CHECK(has(bad, "not both"));
  CHECK(has(bad, "5 axis[1].values: no values"));
  CHECK(has(bad, "axis[2].together[0].values: 1 values, but its axis 'strategy.pp' has 2"));
  CHECK(has(bad, "7 axis[3].field: 'strategy.pp' is swept by another axis already (line 6)"));
}

TEST_CASE("build_point: an invalid point's problems point at the axis that made it invalid") {
  TempFile file("sweep_invalid.textproto", sweep_text("inv", kSixPoints));
  const planner::Sweep s = planner::load_sweep(file.path);
  REQUIRE(s.point_count() == 6);
  CHECK(planner::build_point(s, 3).setup.strategy->capacity_factor() == 2.0);
  const std::vector<Diagnostic> d = config_errors([&] { planner::build_point(s, 4); });
  REQUIRE(d.size() == 1);
  CHECK(d[0].file == file.path);
  CHECK(d[0].line == 4);
  CHECK(d[0].field_path == "strategy.capacity_factor");
  CHECK(d[0].message.find("must be greater than zero") != std::string::npos);
  CHECK(d[0].message.find("(point 4: strategy.capacity_factor = -1)") != std::string::npos);

  SECTION("a cross-check against another config points at that config, with the point") {
    TempFile f2("sweep_layout.textproto", sweep_text("lay", "axis { field: \"strategy.dp\"  values: [2, 4] }\n"));
    const planner::Sweep s2 = planner::load_sweep(f2.path);
    planner::build_point(s2, 0);
    const std::vector<Diagnostic> d2 = config_errors([&] { planner::build_point(s2, 1); });
    REQUIRE_FALSE(d2.empty());
    INFO(ConfigError(d2).what());
    CHECK(std::any_of(d2.begin(), d2.end(), [&](const Diagnostic& x) {
      return x.file == f2.path && x.line == 3 && x.message.find("the cluster has 8 devices") != std::string::npos &&
             x.message.find("(point 1: strategy.dp = 4)") != std::string::npos;
    }));
  }
}

TEST_CASE("replan: each point's strategy chosen by the planner, swept and non-searched strategy fields kept") {
  // The example with batch-priority drops at capacity 1.1: not searched by the planner, so kept.
  TempFile sc("sweep_replan_base.textproto",
              tiny_scenario_with("capacity_factor: 1.25\n  drop_policy: VANILLA", "capacity_factor: 1.1\n  drop_policy: BATCH_PRIORITY"));
  TempFile file("sweep_replan.textproto", fmt::format("name: \"replan\"\nscenario: \"{}\"\nreplan: true\n"
                                                      "axis {{ field: \"strategy.overlap_chunks\"  values: [1, 2] }}\n"
                                                      "axis {{ field: \"workload.training.global_batch\"  values: [8, 16] }}\n",
                                                      sc.path));
  const planner::Sweep s = planner::load_sweep(file.path);
  REQUIRE(s.replan);
  for (size_t i : {0, 3}) {
    INFO("point " << i);
    const sim::Scenario p = planner::build_point(s, i);
    CHECK(p.strategy.rfind("planned: ", 0) == 0);
    CHECK(p.setup.strategy->overlap_chunks() == (i == 3 ? 2 : 1));  // swept: pinned
    CHECK(p.setup.strategy->capacity_factor() == 1.1);                 // not searched: the base's
    CHECK(p.setup.strategy->drop_policy() == strategy::BATCH_PRIORITY);
    CHECK(p.setup.workload->training().global_batch() == (i == 3 ? 16 : 8));
    const cost::Layout& l = p.setup.layout;
    CHECK(l.dp * l.tp * l.pp == 8);
  }

  TempFile db("sweep_replan.db");
  const sweep::SweepSummary sum = sweep_json(fmt::format("'{}' --db '{}' --jobs 2", file.path, db.path));
  CHECK(sum.ok() == 4);
  for (const sweep::PointSummary& p : sum.results()) {
    CHECK(p.strategy().rfind("planned: ", 0) == 0);
    CHECK(p.step_time_s() > 0);
  }
  const std::map<std::string, RunRecord> rows = sweep_rows(db.path);
  REQUIRE(rows.size() == 4);
  CHECK(rows.at("sweep:replan:0").strategy == sum.results(0).strategy());
}

TEST_CASE("run_sweep: commits each point, skips stored points, keeps going past failures, refuses another grid of the same name") {
  TempFile file("sweep_runner.textproto", sweep_text("runner", kSixPoints));
  TempFile db("sweep_runner.db");
  const planner::Sweep s = planner::load_sweep(file.path);
  std::atomic<int> evaluated{0};
  planner::SweepOptions o;
  o.jobs = 2;
  // A fake evaluator: a step time made of the point's index; point 2 fails, point 4 is invalid.
  o.evaluate = [&](const planner::Sweep&, size_t i) {
    ++evaluated;
    if (i == 2) throw std::runtime_error("boom");
    planner::PointOutcome out;
    out.record.step_time_s = 1.0 + static_cast<double>(i);
    out.record.status = i == 4 ? "invalid" : "ok";
    out.metrics.push_back({"answer", 42});
    return out;
  };
  Store store = Store::open(db.path);
  const planner::SweepRun first = planner::run_sweep(s, store, o);
  CHECK(evaluated == 6);
  CHECK(first.ok == 4);
  CHECK(first.invalid == 1);
  CHECK(first.errors == 1);
  CHECK(first.skipped == 0);
  CHECK(first.points[2].status == "error");
  CHECK(first.points[2].error == "boom");
  std::map<std::string, RunRecord> rows = sweep_rows(db.path);
  CHECK(rows.size() == 5);  // the failed point is not stored: a rerun tries it again
  CHECK(rows.count("sweep:runner:2") == 0);
  const RunRecord& r3 = rows.at("sweep:runner:3");
  CHECK(r3.kind == RunKind::kSweep);
  CHECK(r3.step_time_s == 4.0);
  CHECK_FALSE(rows.at("sweep:runner:4").step_time_s.has_value());  // invalid: no step time
  const std::map<std::string, double> m = store.metrics("sweep:runner:3");
  CHECK(m.at("point") == 3);
  CHECK(m.at("axis.strategy.capacity_factor") == 2.0);
  CHECK(m.at("axis.strategy.overlap_chunks") == 2);
  CHECK(m.at("answer") == 42);

  evaluated = 0;
  const planner::SweepRun second = planner::run_sweep(s, store, o);
  CHECK(evaluated == 1);
  CHECK(second.skipped == 5);
  CHECK(second.errors == 1);
  CHECK(second.points[3].skipped);
  CHECK(second.points[3].record->step_time_s == 4.0);

  SECTION("a sweep of the same name over other values is refused before any work") {
    TempFile other("sweep_runner2.textproto",
                   sweep_text("runner", "axis { field: \"strategy.capacity_factor\"  values: [1.0, 3.0, -1] }\n"
                                        "axis { field: \"strategy.overlap_chunks\"  values: [1, 2] }\n"));
    evaluated = 0;
    const std::vector<Diagnostic> d = config_errors([&] { planner::run_sweep(planner::load_sweep(other.path), store, o); });
    REQUIRE(d.size() == 1);
    CHECK(d[0].line == 1);
    CHECK(d[0].message.find("holds another sweep named 'runner'") != std::string::npos);
    CHECK(evaluated == 0);
  }
}

TEST_CASE("sweep: one row per point with the simulate JSON and the axis metrics, invalid points reported and the others run") {
  TempFile file("sweep_cli.textproto", sweep_text("cli", kSixPoints));
  TempFile db("sweep_cli.db");
  const sweep::SweepSummary sum = sweep_json(fmt::format("'{}' --db '{}'", file.path, db.path));
  CHECK(sum.sweep() == "cli");
  CHECK(sum.points() == 6);
  CHECK(sum.ok() == 4);
  CHECK(sum.invalid() == 2);
  CHECK(sum.skipped() == 0);
  CHECK(sum.errors() == 0);
  CHECK(sum.wall_s() > 0);
  REQUIRE(sum.results_size() == 6);
  for (int i = 0; i < 6; ++i) {
    const sweep::PointSummary& p = sum.results(i);
    INFO(i);
    CHECK(p.index() == i);
    CHECK(p.id() == fmt::format("sweep:cli:{}", i));
    CHECK(p.axis().at("strategy.capacity_factor") == std::vector<double>{1, 1, 2, 2, -1, -1}[i]);
    CHECK(p.axis().at("strategy.overlap_chunks") == (i % 2 ? 2 : 1));
    CHECK(p.status() == (i < 4 ? "ok" : "invalid"));
    CHECK((p.step_time_s() > 0) == (i < 4));
    if (i >= 4) CHECK(p.problem().find("must be greater than zero") != std::string::npos);
  }

  const std::map<std::string, RunRecord> rows = sweep_rows(db.path);
  REQUIRE(rows.size() == 6);
  Store store = Store::open(db.path);
  for (int i = 0; i < 6; ++i) {
    const RunRecord& r = rows.at(fmt::format("sweep:cli:{}", i));
    INFO(r.id);
    CHECK(r.kind == RunKind::kSweep);
    const std::map<std::string, double> m = store.metrics(r.id);
    CHECK(m.at("point") == i);
    CHECK(m.at("axis.strategy.capacity_factor") == sum.results(i).axis().at("strategy.capacity_factor"));
    CHECK(m.at("axis.strategy.overlap_chunks") == sum.results(i).axis().at("strategy.overlap_chunks"));
    if (i < 4) {
      CHECK(r.status == "ok");
      REQUIRE(r.step_time_s.has_value());
      CHECK(*r.step_time_s == sum.results(i).step_time_s());
      const auto res = parse_json<cli::SimulateResult>(r.result_json);
      CHECK(res.step_time_s() == *r.step_time_s);
      CHECK(m.at("samples_per_s") == res.samples_per_s());
      CHECK(m.count("breakdown.compute") == 1);
      CHECK(m.count("dropped_fraction") == 1);
      CHECK_FALSE(r.inputs_hash.empty());
    } else {
      CHECK(r.status == "invalid");
      CHECK_FALSE(r.step_time_s.has_value());
      const auto check = parse_json<cli::CheckResult>(r.result_json);
      CHECK_FALSE(check.ok());
      REQUIRE(check.errors_size() == 1);
      CHECK(check.errors(0).file() == file.path);
      CHECK(check.errors(0).line() == 4);
      CHECK(check.errors(0).field() == "strategy.capacity_factor");
    }
  }
  // Every point's inputs differ (the axes changed them).
  std::set<std::string> hashes;
  for (int i = 0; i < 4; ++i) hashes.insert(rows.at(fmt::format("sweep:cli:{}", i)).inputs_hash);
  CHECK(hashes.size() == 4);

  SECTION("a point's row is what `moesim simulate --json` prints for the same configs") {
    // Point 3: capacity factor 2, 2 overlap chunks: the example with those two values changed.
    TempFile sc("sweep_point3.textproto", tiny_scenario_with("capacity_factor: 1.25", "capacity_factor: 2"));
    Run r = moesim_run(fmt::format("simulate '{}' --json", sc.path));
    REQUIRE(r.exit_code == 0);
    const auto direct = parse_json<cli::SimulateResult>(r.out);
    const auto stored = parse_json<cli::SimulateResult>(rows.at("sweep:cli:3").result_json);
    CHECK(stored.step_time_s() == direct.step_time_s());
    CHECK(stored.peak_memory_bytes() == direct.peak_memory_bytes());
    CHECK(stored.events() == direct.events());
    CHECK(stored.network() == direct.network());
    CHECK(stored.dropped_fraction() == direct.dropped_fraction());
  }
  SECTION("the text summary: a table with every point and the first problem of invalid ones") {
    TempFile db2("sweep_cli_text.db");
    Run r = moesim_run(fmt::format("sweep '{}' --db '{}'", file.path, db2.path));
    REQUIRE(r.exit_code == 0);
    CHECK(r.out.find("strategy.capacity_factor") != std::string::npos);
    CHECK(r.out.find("point 4 invalid: " + file.path + ":4: strategy.capacity_factor: must be greater than zero") != std::string::npos);
    CHECK(r.out.find("4 ok, 2 invalid") != std::string::npos);
    CHECK(r.err.empty());  // no progress bar outside a terminal
  }
}

TEST_CASE("sweep: resumes after a crash with no duplicate and no missing row") {
  TempFile file("sweep_crash.textproto", sweep_text("crash", "axis { field: \"strategy.capacity_factor\"  values: [1.0, 1.5, 2.0, -1] }\n"
                                                             "axis { field: \"seed\"  values: [1, 2, 3] }\n"));
  TempFile db("sweep_crash.db");
  const std::string jobs = GENERATE(as<std::string>{}, "1", "2");
  INFO("--jobs " << jobs);
  // MOESIM_SWEEP_CRASH_AFTER: the process _exit()s (status 137) right after its 5th stored point,
  // whatever its other thread is doing (mid-simulation, mid-transaction).
  Run crashed = moesim_run(fmt::format("sweep '{}' --db '{}' --jobs {}", file.path, db.path, jobs), "MOESIM_SWEEP_CRASH_AFTER=5");
  CHECK(crashed.exit_code == 137);
  const std::map<std::string, RunRecord> before = sweep_rows(db.path);
  CHECK(before.size() >= 5);
  CHECK(before.size() < 12);

  const sweep::SweepSummary resumed = sweep_json(fmt::format("'{}' --db '{}' --jobs {}", file.path, db.path, jobs));
  CHECK(resumed.points() == 12);
  CHECK(resumed.skipped() == static_cast<int>(before.size()));
  CHECK(resumed.ok() == 9);
  CHECK(resumed.invalid() == 3);
  const std::map<std::string, RunRecord> after = sweep_rows(db.path);
  REQUIRE(after.size() == 12);
  for (int i = 0; i < 12; ++i) CHECK(after.count(fmt::format("sweep:crash:{}", i)) == 1);
  // Rows stored before the crash are untouched.
  for (const auto& [id, row] : before) CHECK(after.at(id) == row);
  int skipped = 0;
  for (const sweep::PointSummary& p : resumed.results()) {
    skipped += p.skipped();
    CHECK(p.skipped() == (before.count(p.id()) == 1));
  }
  CHECK(skipped == resumed.skipped());

  // A third run has nothing left to do.
  const sweep::SweepSummary again = sweep_json(fmt::format("'{}' --db '{}'", file.path, db.path));
  CHECK(again.skipped() == 12);
  CHECK(sweep_rows(db.path).size() == 12);
}

TEST_CASE("sweep: killed with SIGKILL mid-run, then run again: every point once, every stored row whole") {
  // 4 x 50 = 200 quick points; the sweep is killed once 20 rows are in, wherever it is then.
  std::string seeds;
  for (int i = 1; i <= 50; ++i) seeds += fmt::format("{}{}", i > 1 ? ", " : "", i);
  TempFile file("sweep_kill.textproto", sweep_text("kill", "axis { field: \"strategy.capacity_factor\"  values: [1.0, 1.5, 2.0, -1] }\n"
                                                           "axis { field: \"seed\"  values: [" + seeds + "] }\n"));
  TempFile db("sweep_kill.db");
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, STDOUT_FILENO);
    ::dup2(null, STDERR_FILENO);
    ::execl(MOESIM_BINARY, MOESIM_BINARY, "sweep", file.path.c_str(), "--db", db.path.c_str(), "--jobs", "2", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Count the rows behind the writer's back (read-only; WAL lets a reader in while it writes).
  auto rows_now = [&]() -> int {
    sqlite3* h = nullptr;
    int n = -1;
    if (sqlite3_open_v2(db.path.c_str(), &h, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
      sqlite3_stmt* st = nullptr;
      if (sqlite3_prepare_v2(h, "SELECT COUNT(*) FROM runs", -1, &st, nullptr) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int(st, 0);
      sqlite3_finalize(st);
    }
    sqlite3_close(h);
    return n;
  };
  int status = 0;
  bool exited = false;
  for (int i = 0; i < 3000 && rows_now() < 20; ++i) {  // at most ~30 s
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;
      break;
    }
    ::usleep(10000);
  }
  if (!exited) {
    ::kill(pid, SIGKILL);
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFSIGNALED(status));
  }
  const std::map<std::string, RunRecord> before = sweep_rows(db.path);
  INFO(before.size() << " rows when killed");
  CHECK(before.size() >= 20);
  {
    // Every stored row came with its metrics (one transaction each).
    Store store = Store::open(db.path);
    for (const auto& [id, row] : before) CHECK(store.metrics(id).count("point") == 1);
  }
  const sweep::SweepSummary resumed = sweep_json(fmt::format("'{}' --db '{}' --jobs 2", file.path, db.path));
  CHECK(resumed.skipped() == static_cast<int>(before.size()));
  CHECK(resumed.ok() == 150);
  CHECK(resumed.invalid() == 50);
  const std::map<std::string, RunRecord> after = sweep_rows(db.path);
  REQUIRE(after.size() == 200);
  for (int i = 0; i < 200; ++i) CHECK(after.count(fmt::format("sweep:kill:{}", i)) == 1);
  for (const auto& [id, row] : before) CHECK(after.at(id) == row);
}

TEST_CASE("sweep: --jobs 2 stores the same rows as --jobs 1") {
  TempFile file("sweep_jobs.textproto", sweep_text("jobs", "axis { field: \"strategy.capacity_factor\"  values: [1.0, 2.0, -1] }\n"
                                                           "axis { field: \"workload.training.global_batch\"  values: [4, 8] }\n"
                                                           "axis { field: \"seed\"  values: [1, 5] }\n"));
  TempFile db1("sweep_jobs1.db"), db2("sweep_jobs2.db");
  const sweep::SweepSummary one = sweep_json(fmt::format("'{}' --db '{}' --jobs 1", file.path, db1.path));
  const sweep::SweepSummary two = sweep_json(fmt::format("'{}' --db '{}' --jobs 2", file.path, db2.path));
  CHECK(one.points() == 12);
  CHECK(two.jobs() == 2);
  const std::map<std::string, RunRecord> a = sweep_rows(db1.path), b = sweep_rows(db2.path);
  REQUIRE(a.size() == 12);
  REQUIRE(b.size() == 12);
  Store sa = Store::open(db1.path), sb = Store::open(db2.path);
  for (const auto& [id, x] : a) {
    INFO(id);
    const RunRecord& y = b.at(id);
    CHECK(x.status == y.status);
    CHECK(x.step_time_s == y.step_time_s);
    CHECK(x.tokens_per_s == y.tokens_per_s);
    CHECK(x.mfu == y.mfu);
    CHECK(x.peak_memory_bytes == y.peak_memory_bytes);
    CHECK(x.fits == y.fits);
    CHECK(x.seed == y.seed);
    CHECK(x.inputs_hash == y.inputs_hash);
    CHECK(without_wall_clock(x.result_json) == without_wall_clock(y.result_json));
    std::map<std::string, double> mx = sa.metrics(id), my = sb.metrics(id);
    mx.erase("sim_wall_s");
    my.erase("sim_wall_s");
    CHECK(mx == my);
  }
}

TEST_CASE("sweep: a results database that is not moesim's or was written by a newer moesim is refused, untouched") {
  TempFile file("sweep_db.textproto", sweep_text("db", kSixPoints));
  SECTION("newer schema") {
    TempFile db("sweep_newer.db");
    Store::open(db.path);  // created at the current schema
    raw_sql(db.path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'");
    const std::string bytes = read_file(db.path);
    REQUIRE_FALSE(bytes.empty());
    Run r = moesim_run(fmt::format("sweep '{}' --db '{}' --json", file.path, db.path));
    CHECK(r.exit_code == 2);
    CHECK(r.out.empty());
    CHECK(r.err.find("newer moesim (schema version 99") != std::string::npos);
    CHECK(read_file(db.path) == bytes);
  }
  SECTION("not SQLite") {
    const std::string bytes = "my notes\n";
    TempFile notes("sweep_notes.db", bytes);
    Run r = moesim_run(fmt::format("sweep '{}' --db '{}'", file.path, notes.path));
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("is not a SQLite database") != std::string::npos);
    CHECK(read_file(notes.path) == bytes);
  }
}

TEST_CASE("sweep: usage errors exit 2, --help describes it") {
  Run help = moesim_run("sweep --help");
  CHECK(help.exit_code == 0);
  CHECK(help.out.find("usage: moesim sweep") != std::string::npos);
  CHECK(moesim_run("sweep").exit_code == 2);
  CHECK(moesim_run("sweep configs/sweeps/capacity-factor.textproto").exit_code == 2);  // no --db
  Run jobs = moesim_run("sweep configs/sweeps/capacity-factor.textproto --db x.db --jobs 0");
  CHECK(jobs.exit_code == 2);
  CHECK(jobs.err.find("--jobs") != std::string::npos);
  CHECK_FALSE(fs::exists(src("x.db")));
  Run missing = moesim_run("sweep /no/such/sweep.textproto --db x.db");
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("/no/such/sweep.textproto") != std::string::npos);
  CHECK_FALSE(fs::exists(src("x.db")));
}

TEST_CASE("every bundled sweep (configs/sweeps) loads, and its first and last points are valid setups") {
  const std::vector<fs::path> files = textprotos_under(src("configs/sweeps"));
  REQUIRE(files.size() >= 2);
  for (const fs::path& f : files) {
    INFO(f.string());
    try {
      const planner::Sweep s = planner::load_sweep(f.string());
      CHECK(s.name == f.stem().string());
      CHECK(s.point_count() > 1);
      planner::build_point(s, 0);
      planner::build_point(s, s.point_count() - 1);
    } catch (const ConfigError& e) {
      FAIL(e.what());
    }
  }
  CHECK(planner::load_sweep(src("configs/sweeps/nvlink-domain.textproto")).point_count() == 100);
}
