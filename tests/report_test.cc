// End to end: `moesim report` (cli/report_command.cc running reports/report.py) on a fixture store
// built here: two real `moesim simulate --db` runs (ReID, V-MoE with its expert load), two
// hand-made sweeps (stored as planner/sweep.h writes them), a plan and an executor run without
// results. Every expected figure must come out as a valid PNG and SVG, linked from report.md, the
// same store must give byte-identical files, missing data must be reported as skipped figures, and
// bad input must exit 2 leaving files untouched.
//
// The figure cases need /usr/bin/python3 with matplotlib (scripts/install-deps installs Debian's
// python3-matplotlib); without it they pass with a visible warning.
#include "sqlite_helpers.h"
#include "cli/cli.pb.h"
#include "tests/cli_helpers.h"
#include "traces/store.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <sqlite3.h>

#include <array>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <vector>

using namespace moesim;
using namespace moesim::testing;

namespace {

namespace fs = std::filesystem;
namespace pb = google::protobuf;

// The figures of the fixture store, by file name without extension.
const std::vector<std::string> kFigures = {"breakdown",        "sweep-domain",   "sweep-line",
                                           "memory",           "expert-load",    "links",
                                           "validation-steps", "validation-ops", "validation-kinds",
                                           "calibration-history"};

bool have_matplotlib() { return std::system("/usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1") == 0; }

#define SKIP_WITHOUT_MATPLOTLIB()                                                                   \
  if (!have_matplotlib()) {                                                                         \
    WARN("skipped: /usr/bin/python3 has no matplotlib (scripts/install-deps installs python3-matplotlib)"); \
    SUCCEED();                                                                                      \
    return;                                                                                         \
  }

// A temp file or folder removed at the end of the scope (with SQLite's -wal/-shm companions).
struct Temp {
  std::string path;
  explicit Temp(const std::string& name) : path(temp_path(name)) { remove_all(); }
  ~Temp() { remove_all(); }
  Temp(const Temp&) = delete;
  Temp& operator=(const Temp&) = delete;
  void remove_all() const {
    std::error_code ec;
    for (const char* suffix : {"", "-wal", "-shm", "-journal"}) fs::remove_all(path + suffix, ec);
  }
};

std::string to_json(const pb::Message& m) {
  std::string out;
  pb::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  REQUIRE(pb::util::MessageToJsonString(m, &out, o).ok());
  return out;
}

// A sweep point as `moesim sweep` stores it: id sweep:NAME:INDEX, metrics axis.<field> in the sweep
// file's order, then point; an ok point has the SimulateResult JSON, an invalid one no step time.
void put_point(Store& store, const std::string& sweep, int index, const std::vector<std::pair<std::string, double>>& axes,
               std::optional<double> step_time_s, bool tokens) {
  RunRecord rec;
  rec.id = fmt::format("sweep:{}:{}", sweep, index);
  rec.kind = RunKind::kSweep;
  rec.cluster = "configs/hardware/h100-64.textproto";
  rec.model = "configs/models/mixtral-8x7b.textproto";
  rec.workload = "configs/workloads/mixtral-8x7b-train.textproto";
  rec.strategy = "configs/strategies/mixtral-8x7b-megatron.textproto";
  if (step_time_s) {
    cli::SimulateResult r;
    r.set_scenario("mixtral-8x7b-h100");
    r.set_step_time_s(*step_time_s);
    r.set_samples_per_s(256 / *step_time_s);
    if (tokens) r.set_tokens_per_s(256 * 4096 / *step_time_s);
    const double comm = *step_time_s - 1.0;
    (*r.mutable_breakdown())["compute"] = 1.0;
    (*r.mutable_breakdown())["all_to_all"] = comm;
    (*r.mutable_bottleneck_breakdown())["compute"] = 1.0;
    (*r.mutable_bottleneck_breakdown())["all_to_all"] = comm / 2;
    (*r.mutable_bottleneck_breakdown())["pipeline_bubble"] = comm / 2;
    rec.step_time_s = *step_time_s;
    if (tokens) rec.tokens_per_s = r.tokens_per_s();
    rec.mfu = 0.3 / *step_time_s;
    rec.fits = true;
    rec.result_json = to_json(r);
  } else {
    rec.status = "invalid";
    rec.result_json = R"({"file": "configs/sweeps/x.textproto", "ok": false})";
  }
  std::vector<RunMetric> metrics;
  for (const auto& [field, value] : axes) metrics.push_back({"axis." + field, value});
  metrics.push_back({"point", static_cast<double>(index)});
  store.insert_run(rec, metrics);
}

// The fixture store: simulate-1 (ReID), simulate-2 (V-MoE, with expert load), sweep "domain"
// (devices per node x oversubscription, with the node count moving along; point 4 invalid),
// sweep "line" (capacity factor, samples/s only), a plan and a run with no result.
void build_fixture(const std::string& db) {
  for (const char* scenario : {"configs/scenarios/reid-resnet50-a100.textproto", "configs/scenarios/vmoe-b16-a100.textproto"}) {
    Run r = moesim_run(fmt::format("simulate {} --db '{}'", scenario, db));
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
  }
  Store store = Store::open(db);
  const double devices[] = {4, 8, 16}, nodes[] = {4, 2, 1}, oversub[] = {1, 2};
  int point = 0;
  for (int d = 0; d < 3; ++d)
    for (int o = 0; o < 2; ++o, ++point)
      put_point(store, "domain", point,
                {{"cluster.node.devices_per_node", devices[d]}, {"cluster.nodes", nodes[d]},
                 {"cluster.fabric.fat_tree.oversubscription", oversub[o]}},
                point == 4 ? std::nullopt : std::optional<double>(1.0 + 0.1 * oversub[o] * 16 / devices[d]), true);
  const double factors[] = {1.0, 1.25, 1.5, 2.0};
  for (int i = 0; i < 4; ++i) put_point(store, "line", i, {{"strategy.capacity_factor", factors[i]}}, 1.2 + 0.1 * i, false);
  RunRecord plan;
  plan.kind = RunKind::kPlan;
  plan.cluster = "configs/hardware/h100-64.textproto";
  plan.step_time_s = 1.5;
  store.insert_run(plan);
  RunRecord run;
  run.kind = RunKind::kRun;
  run.model = "configs/models/moe-tiny.textproto";
  run.tokens_per_s = 12345;
  store.insert_run(run);
  RunRecord validate;  // what `moesim validate --db` stores: both step times and every op's
  validate.kind = RunKind::kValidate;
  validate.step_time_s = 0.02;
  validate.result_json = R"({"name": "tiny-ep2", "predicted_step_s": 0.015, "measured_step_s": 0.02, "ops": [
      {"op_id": "L0.attn mb0 fwd", "kind": "attention", "rank": 0, "predicted_s": 0.001, "measured_s": 0.0012},
      {"op_id": "L0.moe.experts mb0 fwd", "kind": "experts", "rank": 0, "predicted_s": 0.002, "measured_s": 0.0025}]})";
  store.insert_run(validate);
  // Two calibrations of one machine (what `moesim calibrate --db` stores), the link at 10 and 20
  // GB/s, the kernels' in-step factor at 1 and 1.1, the peak the same; the other fits 0, not drawn.
  for (const auto& [link_Bps, in_situ] : {std::pair{10e9, 1.0}, std::pair{20e9, 1.1}}) {
    cli::CalibrateResult c;
    c.set_machine("vm (AMD EPYC, test)");
    c.set_peak_flops(100e9);
    c.set_link_bandwidth_bps(link_Bps);
    c.set_in_situ_factor(in_situ);
    RunRecord calibrate;
    calibrate.kind = RunKind::kCalibrate;
    calibrate.cluster = c.machine();
    calibrate.result_json = to_json(c);
    store.insert_run(calibrate);
  }
}

// A PNG's width and height from its IHDR chunk; {0, 0} when the file is not a PNG.
std::pair<uint32_t, uint32_t> png_size(const std::string& bytes) {
  if (bytes.size() < 24 || bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0 || bytes.compare(12, 4, "IHDR") != 0) return {0, 0};
  auto be32 = [&](size_t at) {
    uint32_t v = 0;
    for (size_t i = 0; i < 4; ++i) v = (v << 8) | static_cast<unsigned char>(bytes[at + i]);
    return v;
  };
  return {be32(16), be32(20)};
}

void check_svg(const std::string& path) {
  const std::string text = read_file(path);
  INFO(path);
  CHECK((text.rfind("<?xml", 0) == 0 || text.rfind("<svg", 0) == 0));
  CHECK(text.find("<svg") != std::string::npos);
  CHECK(text.find("</svg>") != std::string::npos);
}

pb::Struct parse_struct(const std::string& json) {
  pb::Struct s;
  INFO(json.substr(0, 500));
  REQUIRE(pb::util::JsonStringToMessage(json, &s).ok());
  return s;
}

std::set<std::string> strings_of(const pb::Value& list) {
  std::set<std::string> out;
  for (const pb::Value& v : list.list_value().values()) out.insert(v.string_value());
  return out;
}

TEST_CASE("report draws every figure of a fixture store as PNG and SVG, linked from report.md") {
  SKIP_WITHOUT_MATPLOTLIB();
  Temp db("report_fixture.db"), out("report_out"), again("report_out_again");
  build_fixture(db.path);

  Run r = moesim_run(fmt::format("report --db '{}' --out '{}' --json", db.path, out.path));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const pb::Struct result = parse_struct(r.out);
  std::set<std::string> expected = {out.path + "/report.md"};
  for (const std::string& f : kFigures)
    for (const char* ext : {".png", ".svg"}) expected.insert(fmt::format("{}/{}{}", out.path, f, ext));
  CHECK(strings_of(result.fields().at("files")) == expected);
  CHECK(result.fields().at("skipped").list_value().values_size() == 0);
  CHECK(result.fields().at("runs").number_value() == 2 + 6 + 4 + 2 + 1 + 2);

  const std::string md = read_file(out.path + "/report.md");
  for (const std::string& f : kFigures) {
    INFO(f);
    const auto [width, height] = png_size(read_file(fmt::format("{}/{}.png", out.path, f)));
    CHECK(width > 0);
    CHECK(height > 0);
    check_svg(fmt::format("{}/{}.svg", out.path, f));
    CHECK(md.find(fmt::format("]({}.png)", f)) != std::string::npos);
    CHECK(md.find(fmt::format("]({}.svg)", f)) != std::string::npos);
  }
  // The run table lists every run; the invalid sweep point is left out of the curve.
  for (const char* id : {"| simulate-1 |", "| simulate-2 |", "| sweep:domain:4 |", "| sweep:line:3 |", "| plan-", "| run-",
                         "| validate-"})
    CHECK(md.find(id) != std::string::npos);
  CHECK(md.find("5 of the sweep's 6 stored points") != std::string::npos);
  // The validate run's kinds, attention (1 ms predicted, 1.2 measured) 16.7% off and the experts
  // (2 against 2.5) 20%; the calibrations' widest spreads, each parameter over its median.
  CHECK(md.find("Median |error|: attention 16.7%, experts 20.0%.") != std::string::npos);
  CHECK(md.find("2 calibrations of vm (AMD EPYC, test)") != std::string::npos);
  CHECK(md.find("The widest: link bandwidth 0.67-1.33x, kernels in a step 0.95-1.05x, GEMM peak 1.00-1.00x.") !=
        std::string::npos);
  CHECK(md.find("Skipped") == std::string::npos);

  // Re-plotting the same store gives the same bytes (fixed sizes, no dates, salted SVG ids).
  Run second = moesim_run(fmt::format("report --db '{}' --out '{}'", db.path, again.path));
  INFO(second.err);
  REQUIRE(second.exit_code == 0);
  CHECK(second.out.find("report.md") != std::string::npos);
  for (const std::string& f : kFigures)
    for (const char* ext : {".png", ".svg"}) {
      INFO(f << ext);
      CHECK(read_file(fmt::format("{}/{}{}", out.path, f, ext)) == read_file(fmt::format("{}/{}{}", again.path, f, ext)));
    }
  CHECK(read_file(out.path + "/report.md") == read_file(again.path + "/report.md"));
}

TEST_CASE("report says which figures it skipped and why when the store lacks their data") {
  SKIP_WITHOUT_MATPLOTLIB();
  Temp db("report_sparse.db"), out("report_sparse_out");
  {
    Store store = Store::open(db.path);
    RunRecord plan;  // a plan row whose result_json is not there
    plan.kind = RunKind::kPlan;
    store.insert_run(plan);
    put_point(store, "broken", 0, {{"model.experts", 8}}, std::nullopt, true);
    put_point(store, "broken", 1, {{"model.experts", 16}}, std::nullopt, true);
  }
  Run r = moesim_run(fmt::format("report --db '{}' --out '{}' --json", db.path, out.path));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  const pb::Struct result = parse_struct(r.out);
  CHECK(strings_of(result.fields().at("files")) == std::set<std::string>{out.path + "/report.md"});
  std::set<std::string> skipped;
  for (const pb::Value& v : result.fields().at("skipped").list_value().values()) {
    skipped.insert(v.struct_value().fields().at("figure").string_value());
    CHECK_FALSE(v.struct_value().fields().at("reason").string_value().empty());
  }
  CHECK(skipped == std::set<std::string>{"breakdown", "sweep", "memory", "expert_load", "links", "validation-steps",
                                         "validation-ops", "validation-kinds", "calibration-history"});
  const std::string md = read_file(out.path + "/report.md");
  CHECK(md.find("## Skipped figures") != std::string::npos);
  CHECK(md.find("0 of its 2 points ran") != std::string::npos);
  CHECK(md.find(".png") == std::string::npos);
}

// Runs a raw SQL statement on a store file behind the Store's back (to fake a newer schema).
TEST_CASE("report refuses a missing store, a file that is not one, a newer one and an --out that is a file") {
  Temp out("report_bad_out"), missing("report_missing.db"), text("report_not_a_db.db"), empty("report_empty.db"),
      newer("report_newer.db"), file_out("report_out_is_a_file");
  Run r = moesim_run(fmt::format("report --db '{}' --out '{}'", missing.path, out.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find(missing.path + ": no such file") != std::string::npos);
  CHECK_FALSE(fs::exists(missing.path));  // not created
  CHECK_FALSE(fs::exists(out.path));

  write_temp("report_not_a_db.db", "these are not the runs you are looking for\n");
  r = moesim_run(fmt::format("report --db '{}' --out '{}'", text.path, out.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("not a SQLite database") != std::string::npos);
  CHECK(read_file(text.path) == "these are not the runs you are looking for\n");

  write_temp("report_empty.db", "");
  r = moesim_run(fmt::format("report --db '{}' --out '{}'", empty.path, out.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("is empty") != std::string::npos);
  CHECK(fs::file_size(empty.path) == 0);

  Store::open(newer.path);
  raw_sql(newer.path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'");
  const std::string before = read_file(newer.path);
  r = moesim_run(fmt::format("report --db '{}' --out '{}'", newer.path, out.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("newer moesim") != std::string::npos);
  CHECK(read_file(newer.path) == before);

  Store::open(missing.path);  // a good store, now
  write_temp("report_out_is_a_file", "keep me\n");
  r = moesim_run(fmt::format("report --db '{}' --out '{}'", missing.path, file_out.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("--out " + file_out.path + ": is a file, not a folder") != std::string::npos);
  CHECK(read_file(file_out.path) == "keep me\n");

  r = moesim_run(fmt::format("report --db '{}'", missing.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("missing --out") != std::string::npos);
  r = moesim_run(fmt::format("report --out '{}'", out.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("missing --db") != std::string::npos);
  CHECK_FALSE(fs::exists(out.path));

  r = moesim_run("report --help");
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("usage: moesim report --db FILE --out FOLDER") != std::string::npos);
}

TEST_CASE("report without python3 or without matplotlib exits 2 saying what to install") {
  Temp db("report_nopython.db"), out("report_nopython_out"), wrapper("report_python_without_site");
  Store::open(db.path);
  Run r = moesim_run(fmt::format("report --db '{}' --out '{}'", db.path, out.path), "MOESIM_PYTHON=/nonexistent/python3");
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("/nonexistent/python3 not found") != std::string::npos);
  CHECK(r.err.find("python3-matplotlib") != std::string::npos);
  CHECK_FALSE(fs::exists(out.path));

  if (::access("/usr/bin/python3", X_OK) != 0) {
    WARN("skipped the case without matplotlib: no /usr/bin/python3");
    return;
  }
  // python3 -S leaves out site-packages, where Debian's matplotlib lives.
  write_temp("report_python_without_site", "#!/bin/sh\nexec /usr/bin/python3 -S \"$@\"\n");
  fs::permissions(wrapper.path, fs::perms::owner_all);
  r = moesim_run(fmt::format("report --db '{}' --out '{}'", db.path, out.path), "MOESIM_PYTHON=" + wrapper.path);
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("matplotlib is not installed") != std::string::npos);
  CHECK(r.err.find("python3-matplotlib") != std::string::npos);
  CHECK_FALSE(fs::exists(out.path));  // nothing written
}

}  // namespace

TEST_CASE("report gives each op kind of a validate run its own colour and marker") {
  SKIP_WITHOUT_MATPLOTLIB();
  // The 13 op kinds of the validation suite's runs, sorted as validation-ops sorts them: the
  // breakdown's fixed colours had all_reduce and head both green. Printed: how many distinct
  // (colour, marker) pairs they get.
  const std::string cmd = fmt::format(
      "cd '{}/reports' && /usr/bin/python3 -c 'import plot; k = sorted(\"all_reduce attention combine combine_a2a "
      "dispatch_a2a embed experts gate head mlp optimizer permute route\".split()); "
      "print(len(k), len({{plot.series_style(x, k) for x in k}}))' 2>&1",
      MOESIM_SOURCE_DIR);
  FILE* pipe = ::popen(cmd.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string out;
  std::array<char, 256> buf;
  for (size_t n; (n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0;) out.append(buf.data(), n);
  REQUIRE(::pclose(pipe) == 0);
  CHECK(out == "13 13\n");
}
