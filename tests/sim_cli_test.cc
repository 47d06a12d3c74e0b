// End to end: `moesim simulate` as a user runs it (cli/simulate_command.cc): the --json figures
// and how they agree, same inputs giving the same outputs, --trace and --db, bad input of every
// kind exiting 2 with FILE:LINE and field, and every bundled scenario loading.
//
// Runs stay small (the 8-GPU bundled scenarios, or moe-tiny / a small-batch Mixtral written to
// temp files): every case takes well under a second or two.
#include "sqlite_helpers.h"
#include "cli/cli.pb.h"
#include "common/error.h"
#include "sim/scenario.h"
#include "tests/cli_helpers.h"
#include "traces/store.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <sqlite3.h>

#include <algorithm>
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
namespace pb = google::protobuf;

constexpr const char* kReid = "configs/scenarios/reid-resnet50-a100.textproto";  // ResNet-50, DP8 on 8 A100s
constexpr const char* kVmoe = "configs/scenarios/vmoe-b16-a100.textproto";      // V-MoE-B/16, DP8 EP8

std::string src(const std::string& rel) { return fmt::format("{}/{}", MOESIM_SOURCE_DIR, rel); }

// The first lines of a scenario on dgx-h100 (8 H100s) with `model`; the caller adds the rest.
std::string head(const std::string& model = "moe-tiny") {
  return fmt::format("name: \"tiny\"\ncluster: \"{}\"\nmodel: \"{}\"\n", src("configs/hardware/dgx-h100.textproto"),
                     src(fmt::format("configs/models/{}.textproto", model)));
}

// moe-tiny (4 experts top-2, sequences of 32 tokens) on 8 H100s, DP8 EP4, 64 sequences per step,
// Zipf-skewed routing with no drops, so that routing draws show in the expert loads and the step
// time. Lines 1-3 head(), 4-8 the workload, 9-14 the strategy.
const std::string kTinySkewed = head() +
                                "workload_inline {\n"
                                "  name: \"w\"\n"
                                "  training { global_batch: 64 micro_batch: 8 }\n"
                                "  routing { zipf { exponent: 1.5 } }\n"
                                "}\n"
                                "strategy_inline {\n"
                                "  name: \"s\"\n"
                                "  dp: 8\n"
                                "  ep: 4\n"
                                "  drop_policy: NO_DROP\n"
                                "}\n";


cli::SimulateResult simulate_json(const std::string& args) {
  Run r = moesim_run(fmt::format("simulate {} --json", args));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  return parse_json<cli::SimulateResult>(r.out);
}

const cli::RankPeak& rank_entry(const cli::SimulateResult& r, int rank) {
  auto it = std::find_if(r.ranks().begin(), r.ranks().end(), [&](const cli::RankPeak& p) { return p.rank() == rank; });
  REQUIRE(it != r.ranks().end());
  return *it;
}

// The JSON text without the lines of wall-clock fields (sim_wall_s, lowering_wall_s).
std::string without_wall_clock(const std::string& json) {
  std::istringstream in(json);
  std::string out;
  for (std::string line; std::getline(in, line);)
    if (line.find("_wall_s\"") == std::string::npos) out += line + '\n';
  return out;
}

// Runs a raw SQL statement on a store file behind the Store's back (to fake a newer schema).
// The checks every successful result passes, whatever the scenario. `tokens_per_step`: 0 for
// models without tokens (CNNs); nullopt: not checked.
void check_consistent(const cli::SimulateResult& r, double global_batch, std::optional<double> tokens_per_step) {
  REQUIRE(r.step_time_s() > 0);
  // Throughput is the global batch over the step time.
  CHECK(r.samples_per_s() * r.step_time_s() == Approx(global_batch).epsilon(1e-9));
  if (tokens_per_step) CHECK(r.tokens_per_s() * r.step_time_s() == Approx(*tokens_per_step).epsilon(1e-9));
  CHECK(r.mfu() > 0);
  CHECK(r.mfu() < 1);

  // Every simulated rank reported; the critical one ends at the step time, and its breakdown
  // covers that time exactly.
  REQUIRE(r.ranks_size() == r.simulated_ranks());
  const cli::RankPeak& critical = rank_entry(r, r.critical_rank());
  CHECK(critical.end_s() == Approx(r.step_time_s()).epsilon(1e-12));
  double latest = 0;
  for (const cli::RankPeak& p : r.ranks()) latest = std::max(latest, p.end_s());
  CHECK(latest == Approx(r.step_time_s()).epsilon(1e-12));
  REQUIRE(r.breakdown_size() > 0);
  double sum = 0;
  for (const auto& [category, s] : r.breakdown()) {
    INFO(category);
    CHECK(s >= 0);
    sum += s;
  }
  CHECK(sum == Approx(critical.end_s()).epsilon(1e-6));
  CHECK(r.breakdown().count("compute") == 1);

  // Memory: the peak is the largest rank peak, on the rank named.
  CHECK(r.peak_memory_bytes() > 0);
  double largest = 0;
  for (const cli::RankPeak& p : r.ranks()) largest = std::max(largest, p.peak_bytes());
  CHECK(r.peak_memory_bytes() == largest);
  CHECK(rank_entry(r, r.peak_rank()).peak_bytes() == r.peak_memory_bytes());

  CHECK(r.sim_wall_s() > 0);
  CHECK(r.lowering_wall_s() > 0);
  CHECK(r.events() > 0);
  CHECK(r.ops() > 0);
  for (const cli::LinkUtilisation& l : r.busiest_links()) {
    CHECK(l.bytes() > 0);
    CHECK(l.utilisation() > 0);
    CHECK(l.utilisation() <= 1 + 1e-9);
  }
}

}  // namespace

TEST_CASE("simulate --json: step time, throughput, MFU, breakdown and memory agree with each other") {
  SECTION("a CNN (ReID, DP8 on 8 A100s): samples/s, no tokens") {
    cli::SimulateResult r = simulate_json(kReid);
    CHECK(r.scenario() == "reid-resnet50-a100");
    CHECK(r.devices() == 8);
    CHECK(r.simulated_ranks() == 8);
    CHECK_FALSE(r.folded());
    CHECK(r.network() == "flows");
    CHECK(r.seed() == 1);
    check_consistent(r, 128, 0);  // 64 virtual + 64 real images per iteration
    CHECK(r.fits());
    CHECK(r.overflow_op().empty());
    CHECK(r.peak_memory_bytes() < 80e9);
    CHECK(r.breakdown().count("all_reduce") == 1);  // data parallel: the gradients are all-reduced
    CHECK(r.expert_imbalance() == 0);               // no experts
    CHECK(r.busiest_links_size() > 0);
    CHECK(r.trace_file().empty());
    CHECK(r.run_id().empty());
  }
  SECTION("a MoE vision transformer (V-MoE-B/16, DP8 EP8 on 8 A100s): images/s, skewed experts, drops") {
    cli::SimulateResult r = simulate_json(kVmoe);
    CHECK(r.scenario() == "vmoe-b16-a100");
    check_consistent(r, 4096, 0);  // 4,096 images per step
    CHECK(r.fits());
    CHECK(r.breakdown().count("all_to_all") == 1);
    CHECK(r.expert_imbalance() > 2);  // Zipf s = 1 over 32 experts
    CHECK(r.dropped_fraction() > 0);  // batch-priority routing at capacity 1.05 drops the overflow
    CHECK(r.dropped_fraction() < 1);
  }
  SECTION("a MoE transformer (moe-tiny, DP8 EP4 on 8 H100s): tokens/s, all-to-all, expert imbalance") {
    TempFile sc("sim_cli_tiny.textproto", kTinySkewed);
    cli::SimulateResult r = simulate_json(fmt::format("'{}'", sc.path));
    CHECK(r.scenario() == "tiny");
    check_consistent(r, 64, 64 * 32);  // 64 sequences of moe-tiny's 32 tokens
    CHECK(r.fits());
    CHECK(r.breakdown().count("all_to_all") == 1);
    CHECK(r.expert_imbalance() > 1);  // Zipf 1.5 over 4 experts: the busiest well above the mean
    CHECK(r.max_expert_imbalance() >= r.expert_imbalance());
    CHECK(r.dropped_fraction() == 0);  // NO_DROP
    CHECK(r.strategy() == sc.path + "#strategy_inline");
  }
  SECTION("inference (moe-tiny serving 8 requests): a batch per step, tokens/s") {
    TempFile sc("sim_cli_serve.textproto",
                head() + "workload_inline { name: \"w\" inference { batch: 8 prompt_tokens: 16 generated_tokens: 8 } }\n"
                         "strategy_inline { name: \"s\" dp: 8 ep: 4 }\n");
    cli::SimulateResult r = simulate_json(fmt::format("'{}'", sc.path));
    check_consistent(r, 8, std::nullopt);
    CHECK(r.tokens_per_s() > r.samples_per_s());
    CHECK(r.fits());
  }
  SECTION("the table for people says the same") {
    Run r = moesim_run(fmt::format("simulate {}", kReid));
    REQUIRE(r.exit_code == 0);
    CHECK(r.out.find("reid-resnet50-a100: 8 devices, max-min flows") != std::string::npos);
    CHECK(r.out.find("step time") != std::string::npos);
    CHECK(r.out.find("breakdown of the critical rank") != std::string::npos);
    CHECK(r.out.find("(fits)") != std::string::npos);
  }
}

TEST_CASE("simulate: the same inputs give the same outputs, another seed gives other routing") {
  TempFile sc("sim_cli_seed.textproto", kTinySkewed);
  TempFile trace("sim_cli_seed_trace.json");
  auto run = [&](const std::string& extra) {
    Run r = moesim_run(fmt::format("simulate '{}' --json --trace '{}' {}", sc.path, trace.path, extra));
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    return std::pair(r.out, read_file(trace.path));
  };
  const auto [json1, trace1] = run("");
  const auto [json2, trace2] = run("");
  const auto [json3, trace3] = run("--seed 2");
  // Byte for byte, apart from the wall-clock fields (map fields included: they print sorted).
  CHECK(without_wall_clock(json1) == without_wall_clock(json2));
  CHECK(without_wall_clock(json1) != json1);  // the wall-clock lines were there to remove
  REQUIRE_FALSE(trace1.empty());
  CHECK(trace1 == trace2);

  cli::SimulateResult a = parse_json<cli::SimulateResult>(json1);
  cli::SimulateResult b = parse_json<cli::SimulateResult>(json2);
  for (cli::SimulateResult* r : {&a, &b}) r->clear_sim_wall_s(), r->clear_lowering_wall_s();
  CHECK(pb::util::MessageDifferencer::Equals(a, b));

  cli::SimulateResult c = parse_json<cli::SimulateResult>(json3);
  CHECK(a.seed() == 1);
  CHECK(c.seed() == 2);
  CHECK(c.expert_imbalance() != a.expert_imbalance());
  CHECK(c.step_time_s() != a.step_time_s());  // dropless: the busiest expert sets the time
  CHECK(trace3 != trace1);

  // The scenario's own seed is the default, and --seed overrides it.
  std::string seeded = kTinySkewed + "seed: 2\n";
  TempFile sc2("sim_cli_seed2.textproto", seeded);
  cli::SimulateResult d = simulate_json(fmt::format("'{}'", sc2.path));
  CHECK(d.seed() == 2);
  CHECK(d.step_time_s() == c.step_time_s());
  CHECK(d.expert_imbalance() == c.expert_imbalance());
  CHECK(simulate_json(fmt::format("'{}' --seed 1", sc2.path)).step_time_s() == a.step_time_s());
}

TEST_CASE("simulate --trace writes Chrome-trace JSON: one process per rank, microseconds") {
  TempFile trace("sim_cli_trace.json");
  cli::SimulateResult r = simulate_json(fmt::format("{} --trace '{}'", kReid, trace.path));
  CHECK(r.trace_file() == trace.path);

  pb::Struct doc;
  const std::string text = read_file(trace.path);
  REQUIRE(pb::util::JsonStringToMessage(text, &doc).ok());
  REQUIRE(doc.fields().count("traceEvents") == 1);
  const pb::ListValue& events = doc.fields().at("traceEvents").list_value();
  REQUIRE(events.values_size() > 0);

  int64_t spans = 0;
  double last_end_us = 0;
  std::set<int> span_pids, named_pids;
  for (const pb::Value& v : events.values()) {
    const auto& e = v.struct_value().fields();
    REQUIRE(e.count("ph") == 1);
    const std::string ph = e.at("ph").string_value();
    const int pid = static_cast<int>(e.at("pid").number_value());
    if (ph == "X") {
      ++spans;
      const double ts = e.at("ts").number_value(), dur = e.at("dur").number_value();
      CHECK(ts >= 0);
      CHECK(dur >= 0);
      last_end_us = std::max(last_end_us, ts + dur);
      span_pids.insert(pid);
      CHECK_FALSE(e.at("name").string_value().empty());
    } else if (ph == "M" && e.at("name").string_value() == "process_name") {
      CHECK(named_pids.insert(pid).second);  // one name per process
      CHECK(e.at("args").struct_value().fields().at("name").string_value().find("rank") == 0);
    }
  }
  CHECK(spans == r.ops());  // one span per op
  CHECK(static_cast<int>(named_pids.size()) == r.simulated_ranks());
  CHECK(span_pids == named_pids);
  CHECK(*named_pids.begin() == 0);
  CHECK(*named_pids.rbegin() == r.simulated_ranks() - 1);
  // Timestamps in microseconds: the last span ends at the step time.
  CHECK(last_end_us == Approx(r.step_time_s() * 1e6).epsilon(1e-6));
}

TEST_CASE("simulate --db: a row per run with its predicted trace, a bad or newer database is refused untouched") {
  TempFile db("sim_cli_results.db");
  TempFile sc("sim_cli_db.textproto", kTinySkewed);
  cli::SimulateResult first = simulate_json(fmt::format("'{}' --db '{}'", sc.path, db.path));
  REQUIRE_FALSE(first.run_id().empty());
  {
    Store store = Store::open(db.path);
    const std::vector<RunRecord> runs = store.list_runs(RunKind::kSimulate);
    REQUIRE(runs.size() == 1);
    const RunRecord& row = runs[0];
    CHECK(row.id == first.run_id());
    CHECK(row.kind == RunKind::kSimulate);
    REQUIRE(row.step_time_s.has_value());
    CHECK(*row.step_time_s == first.step_time_s());
    CHECK(row.tokens_per_s == first.tokens_per_s());
    CHECK(row.mfu == first.mfu());
    CHECK(row.peak_memory_bytes == first.peak_memory_bytes());
    CHECK(row.fits == true);
    CHECK(row.seed == 1);
    CHECK(row.cluster == first.cluster());
    CHECK(row.strategy == first.strategy());
    CHECK(parse_json<cli::SimulateResult>(row.result_json).step_time_s() == first.step_time_s());
    const std::map<std::string, double> metrics = store.metrics(row.id);
    CHECK(metrics.at("samples_per_s") == first.samples_per_s());
    CHECK(metrics.at("breakdown.compute") == first.breakdown().at("compute"));

    const std::optional<trace::Trace> predicted = store.find_trace(row.id, trace::PREDICTED);
    REQUIRE(predicted.has_value());
    CHECK(predicted->spans_size() == first.ops());
    CHECK(predicted->run().source() == trace::PREDICTED);
    int64_t last_end_ns = 0;
    for (const trace::Span& s : predicted->spans()) last_end_ns = std::max(last_end_ns, s.end_ns());
    CHECK(last_end_ns * 1e-9 == Approx(first.step_time_s()).epsilon(1e-6));
    CHECK_FALSE(store.find_trace(row.id, trace::MEASURED).has_value());
  }
  cli::SimulateResult second = simulate_json(fmt::format("'{}' --db '{}' --seed 3", sc.path, db.path));
  CHECK(second.run_id() != first.run_id());
  {
    const std::vector<RunRecord> runs = Store::open(db.path).list_runs();
    REQUIRE(runs.size() == 2);
    CHECK(runs[0].id == first.run_id());
    CHECK(runs[1].id == second.run_id());
    CHECK(runs[1].seed == 3);
  }

  SECTION("a file that is not SQLite") {
    const std::string bytes = "these are my notes, not a database\n";
    TempFile notes("sim_cli_notes.db", bytes);
    Run r = moesim_run(fmt::format("simulate {} --db '{}'", kReid, notes.path));
    CHECK(r.exit_code == 2);
    CHECK(r.out.empty());
    CHECK(r.err.find(notes.path + ": is not a SQLite database") != std::string::npos);
    CHECK(read_file(notes.path) == bytes);
    CHECK_FALSE(fs::exists(notes.path + "-wal"));
  }
  SECTION("a store written by a newer moesim") {
    raw_sql(db.path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'");
    const std::string bytes = read_file(db.path);
    REQUIRE_FALSE(bytes.empty());
    Run r = moesim_run(fmt::format("simulate {} --db '{}' --json", kReid, db.path));
    CHECK(r.exit_code == 2);
    CHECK(r.out.empty());
    CHECK(r.err.find(db.path) != std::string::npos);
    CHECK(r.err.find("newer moesim (schema version 99") != std::string::npos);
    CHECK(read_file(db.path) == bytes);
  }
}

TEST_CASE("simulate: a trace path that cannot be written fails before any work, and stores nothing") {
  TempFile db("sim_cli_notrace.db");
  TempFile folder("sim_cli_trace_folder");
  fs::create_directory(folder.path);
  const std::string in_missing_folder = folder.path + "/no/such/folder/trace.json";
  for (const std::string& bad : {folder.path, in_missing_folder}) {
    INFO(bad);
    Run r = moesim_run(fmt::format("simulate {} --trace '{}' --db '{}' --json", kReid, bad, db.path));
    CHECK(r.exit_code == 2);
    CHECK(r.out.empty());
    CHECK(r.err.find("--trace " + bad + ":") != std::string::npos);
    CHECK_FALSE(fs::exists(db.path));  // not even created
  }
  // Checked before the scenario is read: the trace path is the one problem reported.
  Run r = moesim_run(fmt::format("simulate /no/such/scenario.textproto --trace '{}'", folder.path));
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("is a folder") != std::string::npos);
  CHECK(r.err.find("/no/such/scenario.textproto") == std::string::npos);
}

TEST_CASE("simulate: bad scenarios exit 2 naming the scenario file, the line and the field") {
  const std::string tiny_workload = "workload_inline { name: \"w\" training { global_batch: 16 micro_batch: 2 } }\n";
  auto expect = [](const std::string& name, const std::string& text, const std::vector<std::string>& wanted) {
    TempFile sc(name, text);
    Run r = moesim_run(fmt::format("simulate '{}'", sc.path));
    INFO(text);
    INFO(r.err);
    CHECK(r.exit_code == 2);
    CHECK(r.out.empty());
    for (const std::string& w : wanted) CHECK(r.err.find(sc.path + w) != std::string::npos);
    return r.err;
  };

  SECTION("no cluster") {
    expect("sim_cli_nocluster.textproto",
           fmt::format("name: \"x\"\nmodel: \"{}\"\n", src("configs/models/moe-tiny.textproto")) + tiny_workload +
               "strategy_inline { name: \"s\" dp: 8 }\n",
           {":1: cluster: missing: give `cluster: \"PATH\"` or `cluster_inline { ... }`"});
  }
  SECTION("a path that does not exist, at the scenario's line") {
    const std::string err = expect("sim_cli_nomodel.textproto",
                                   fmt::format("name: \"x\"\ncluster: \"{}\"\nmodel: \"no/such/model.textproto\"\n",
                                               src("configs/hardware/dgx-h100.textproto")) +
                                       tiny_workload + "strategy_inline { name: \"s\" dp: 8 }\n",
                                   {":3: model: no such file: "});
    CHECK(err.find("no/such/model.textproto") != std::string::npos);
  }
  SECTION("an unknown field") {
    const std::string err = expect("sim_cli_unknown.textproto",
                                   head() + tiny_workload + "bogus_field: 3\nstrategy_inline { name: \"s\" dp: 8 }\n", {":5:1: "});
    CHECK(err.find("bogus_field") != std::string::npos);
  }
  SECTION("an inline strategy with an invalid value and no name: each at its own line in the scenario") {
    const std::string err = expect("sim_cli_dp0.textproto",
                                   head() + tiny_workload +
                                       "strategy_inline {\n"  // line 5
                                       "  ep: 4\n"
                                       "  dp: 0\n"  // line 7
                                       "}\n",
                                   {":5: strategy_inline.name: missing required value",
                                    ":7: strategy_inline.dp: must be between 1"});
    // Nothing points at the top of the file, where the scenario's own name is.
    CHECK(err.find(":1:") == std::string::npos);
  }
  SECTION("an inline dp that does not match the cluster (dp x tp x pp != devices)") {
    expect("sim_cli_layout.textproto",
           head() + tiny_workload +
               "strategy_inline {\n"
               "  name: \"s\"\n"
               "  dp: 2\n"  // line 7
               "  tp: 2\n"
               "}\n",
           {":7: strategy_inline.dp: dp x tp x pp = 2 x 2 x 1 = 4 ranks, but the cluster has 8 devices"});
  }
  SECTION("--json: the same problems as data") {
    TempFile sc("sim_cli_json_bad.textproto", head() + tiny_workload + "strategy_inline {\n  name: \"s\"\n  dp: 0\n}\n");
    Run r = moesim_run(fmt::format("simulate '{}' --json", sc.path));
    CHECK(r.exit_code == 2);
    auto check = parse_json<cli::CheckResult>(r.out);
    CHECK_FALSE(check.ok());
    REQUIRE(check.errors_size() == 1);
    CHECK(check.errors(0).file() == sc.path);
    CHECK(check.errors(0).line() == 7);
    CHECK(check.errors(0).field() == "strategy_inline.dp");
  }
  SECTION("a scenario file that does not exist") {
    Run r = moesim_run("simulate /no/such/scenario.textproto");
    CHECK(r.exit_code == 2);
    CHECK(r.err.find("/no/such/scenario.textproto: cannot open file") != std::string::npos);
  }
}

TEST_CASE("simulate: a strategy that does not fit in memory is a result, not an error") {
  // Mixtral 8x7B plainly data parallel (no EP, no ZeRO): ~47B parameters with their Adam states on
  // every 80 GB H100 is far too much. A short step (8 sequences of 512 tokens) keeps it quick.
  TempFile sc("sim_cli_nofit.textproto",
              head("mixtral-8x7b") + "workload_inline { name: \"w\" training { global_batch: 8 micro_batch: 1 sequence: 512 } }\n"
                                     "strategy_inline { name: \"s\" dp: 8 }\n");
  cli::SimulateResult r = simulate_json(fmt::format("'{}'", sc.path));
  check_consistent(r, 8, 8 * 512);
  CHECK_FALSE(r.fits());
  CHECK_FALSE(r.overflow_op().empty());
  const cli::RankPeak& peak = rank_entry(r, r.peak_rank());
  CHECK(peak.capacity_bytes() == Approx(80e9));
  CHECK(r.peak_memory_bytes() > peak.capacity_bytes());
  CHECK_FALSE(peak.fits());
  CHECK(peak.overflow_op() == r.overflow_op());

  Run text = moesim_run(fmt::format("simulate '{}'", sc.path));
  CHECK(text.exit_code == 0);
  CHECK(text.out.find("(DOES NOT FIT), overflows at " + r.overflow_op()) != std::string::npos);
}

TEST_CASE("simulate: four files or a scenario, network modes, usage errors and --help") {
  SECTION("--cluster --model --workload --strategy gives the scenario's step time") {
    cli::SimulateResult files = simulate_json(
        "--cluster configs/hardware/dgx-a100.textproto --model configs/models/resnet50-reid.textproto "
        "--workload configs/workloads/reid-train.textproto --strategy configs/strategies/reid-dp8.textproto");
    cli::SimulateResult scenario = simulate_json(kReid);
    CHECK(files.step_time_s() == scenario.step_time_s());
    CHECK(files.peak_memory_bytes() == scenario.peak_memory_bytes());
    CHECK(files.events() == scenario.events());
    CHECK(files.strategy() == "configs/strategies/reid-dp8.textproto");
  }
  SECTION("a scenario and --cluster together, or a missing one of the four, is a usage error") {
    Run both = moesim_run(fmt::format("simulate {} --cluster configs/hardware/dgx-a100.textproto", kReid));
    CHECK(both.exit_code == 2);
    CHECK(both.out.empty());
    CHECK(both.err.find("give one of") != std::string::npos);
    Run three = moesim_run(
        "simulate --cluster configs/hardware/dgx-a100.textproto --model configs/models/resnet50-reid.textproto "
        "--strategy configs/strategies/reid-dp8.textproto");
    CHECK(three.exit_code == 2);
    CHECK(three.err.find("missing --workload FILE") != std::string::npos);
    CHECK(moesim_run("simulate").exit_code == 2);
    CHECK(moesim_run(fmt::format("simulate {} {}", kReid, kVmoe)).exit_code == 2);
    Run network = moesim_run(fmt::format("simulate {} --network fluid", kReid));
    CHECK(network.exit_code == 2);
    CHECK(network.err.find("--network: expected auto, flows or analytic, got 'fluid'") != std::string::npos);
  }
  SECTION("--network flows and analytic both run and say which they were") {
    TempFile sc("sim_cli_network.textproto", kTinySkewed);
    for (const std::string mode : {"flows", "analytic"}) {
      INFO(mode);
      cli::SimulateResult r = simulate_json(fmt::format("'{}' --network {}", sc.path, mode));
      CHECK(r.network() == mode);
      check_consistent(r, 64, 64 * 32);
      CHECK(r.breakdown().count("all_to_all") == 1);
    }
  }
  SECTION("--help") {
    Run r = moesim_run("simulate --help");
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("--trace FILE") != std::string::npos);
    CHECK(r.out.find("--db FILE") != std::string::npos);
    CHECK(r.out.find("--seed") != std::string::npos);
  }
}

TEST_CASE("every bundled scenario (configs/scenarios, examples included) loads and validates") {
  const std::vector<fs::path> files = textprotos_under(src("configs/scenarios"));
  REQUIRE(files.size() >= 4);
  for (const fs::path& f : files) {
    INFO(f.string());
    sim::Scenario s;
    try {
      s = sim::load_scenario(f.string());
    } catch (const ConfigError& e) {
      FAIL(e.what());
    }
    CHECK(s.name == f.stem().string());
    CHECK(s.path == f.string());
    // Each of the four is a file that exists, or inline in the scenario.
    for (const std::string* used : {&s.cluster, &s.model, &s.workload, &s.strategy})
      CHECK((fs::is_regular_file(*used) || used->rfind(s.path + "#", 0) == 0));
    const cost::Layout& l = s.setup.layout;
    CHECK(l.dp * l.tp * l.pp == s.setup.cluster->device_count());
    CHECK(l.global_batch > 0);
    CHECK(s.seed >= 1);
  }
}

TEST_CASE("load_scenario: an inline config's problems carry the scenario's file, the field's line and path") {
  TempFile sc("sim_cli_inline.textproto", head() +
                                              "workload_inline {\n"                              // 4
                                              "  name: \"w\"\n"                                  // 5
                                              "  training { global_batch: 16 micro_batch: 0 }\n"  // 6
                                              "}\n"
                                              "strategy_inline { dp: 8 }\n");                    // 8
  try {
    sim::load_scenario(sc.path);
    FAIL("no ConfigError");
  } catch (const ConfigError& e) {
    std::vector<std::string> got;
    for (const Diagnostic& d : e.diagnostics())
      got.push_back(fmt::format("{}:{} {}", d.file == sc.path ? "SC" : d.file, d.line, d.field_path));
    INFO(e.what());
    CHECK(std::find(got.begin(), got.end(), "SC:6 workload_inline.training.micro_batch") != got.end());
    CHECK(std::find(got.begin(), got.end(), "SC:8 strategy_inline.name") != got.end());
    for (const Diagnostic& d : e.diagnostics()) CHECK(d.file == sc.path);
  }
}
