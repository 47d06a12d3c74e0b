// Traces: the recorder (ordering, threads, RAII spans, collectives, merge), Chrome-trace JSON
// (units, metadata, escaping, a golden file), trace files, and the SQLite results store
// (create/reopen, schema versions, refused paths left untouched, concurrent writers, atomic writes).
#include "sqlite_helpers.h"
#include "common/error.h"
#include "traces/chrome_trace.h"
#include "traces/recorder.h"
#include "traces/store.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

using namespace moesim;
using moesim::testing::raw_sql;
using namespace moesim::trace;
namespace fs = std::filesystem;
namespace pb = google::protobuf;

namespace {

// A fresh folder per test in this process (CTest runs test cases of this file in parallel
// processes), removed at the end.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() / fmt::format("moesim-traces-test-{}-{}", ::getpid(), counter++);
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

Span make_span(std::string op_id, OpKind kind, int rank, StreamId stream, int64_t start_ns, int64_t end_ns) {
  Span s;
  s.set_op_id(std::move(op_id));
  s.set_kind(kind);
  s.set_rank(rank);
  s.set_device(fmt::format("node0.gpu{}", rank));
  s.mutable_stream()->set_kind(stream.kind);
  s.mutable_stream()->set_index(stream.index);
  s.set_start_ns(start_ns);
  s.set_end_ns(end_ns);
  return s;
}

// Chrome JSON parsed into a protobuf Struct; fails the test when it is not valid JSON.
pb::Struct parse_json(const std::string& json) {
  pb::Struct doc;
  auto status = pb::util::JsonStringToMessage(json, &doc);
  INFO(json);
  REQUIRE(status.ok());
  return doc;
}

std::vector<const pb::Struct*> events(const pb::Struct& doc, const std::string& ph) {
  std::vector<const pb::Struct*> out;
  for (const pb::Value& v : doc.fields().at("traceEvents").list_value().values())
    if (v.struct_value().fields().at("ph").string_value() == ph) out.push_back(&v.struct_value());
  return out;
}

double num(const pb::Struct& s, const std::string& key) { return s.fields().at(key).number_value(); }
std::string str(const pb::Struct& s, const std::string& key) { return s.fields().at(key).string_value(); }
const pb::Struct& args(const pb::Struct& s) { return s.fields().at("args").struct_value(); }

// Runs a raw SQL statement on a store file behind the Store's back (to fake other schemas).
int64_t raw_count(const std::string& path, const std::string& table) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, fmt::format("SELECT count(*) FROM {}", table).c_str(), -1, &st, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(st) == SQLITE_ROW);
  int64_t n = sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return n;
}

// The first column of the first row of `sql`.
std::string raw_text(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK);
  std::string out;
  if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0) != nullptr)
    out = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

template <typename F>
std::string store_error_of(F&& f) {
  try {
    f();
  } catch (const StoreError& e) {
    return e.what();
  }
  FAIL("no StoreError");
  return {};
}

// The trace the golden file was made from: two ranks, compute and comm streams, a collective.
Trace small_trace() {
  Trace t;
  RunInfo* run = t.mutable_run();
  run->set_run_id("simulate-1");
  run->set_source(PREDICTED);
  run->set_cluster("dgx-h100x2");
  run->set_model("mixtral-8x7b");
  run->set_workload("train-4k");
  run->set_strategy("dp1-ep2");
  run->set_seed(42);
  run->set_created("2025-01-01T00:00:00Z");
  for (int rank = 0; rank < 2; ++rank) {
    Span gate = make_span("L0.moe.gate mb0 fwd", GATE, rank, StreamId::compute(), 0, 120'000);
    gate.set_name("gate");
    gate.set_flops(2.5e9);
    Span a2a = make_span("L0.moe.dispatch_a2a mb0 fwd", ALL_TO_ALL, rank, StreamId::comm(), 120'000, 1'620'000);
    a2a.set_name("dispatch_a2a");
    a2a.set_bytes(64e6);
    CollectiveStats* c = a2a.mutable_collective();
    c->set_ranks(2);
    c->set_bus_factor(0.5);
    c->set_alg_bw_bps(64e6 / 1.5e-3);
    c->set_bus_bw_bps(64e6 / 1.5e-3 * 0.5);
    c->set_algorithm("direct");
    Span experts = make_span("L0.moe.experts mb0 fwd", GROUPED_GEMM, rank, StreamId::compute(), 1'620'000,
                             1'620'000 + 2'345'678 + rank * 1000);
    experts.set_name("experts");
    experts.set_flops(1.2e12);
    *t.add_spans() = gate;
    *t.add_spans() = a2a;
    *t.add_spans() = experts;
    RankMemory* m = t.add_peak_memory();
    m->set_rank(rank);
    m->set_device(fmt::format("node0.gpu{}", rank));
    m->set_peak_bytes(60.5 * 1024 * 1024 * 1024);
  }
  std::stable_sort(t.mutable_spans()->begin(), t.mutable_spans()->end(), span_order);
  return t;
}

}  // namespace

// ---- recorder --------------------------------------------------------------------------------

TEST_CASE("every op kind, stream kind and source has a name that parses back") {
  const pb::EnumDescriptor* kinds = OpKind_descriptor();
  for (int i = 0; i < kinds->value_count(); ++i) {
    auto kind = static_cast<OpKind>(kinds->value(i)->number());
    if (kind == OP_KIND_UNSPECIFIED) {
      CHECK(op_kind_name(kind).empty());
      continue;
    }
    INFO(kinds->value(i)->name());
    REQUIRE_FALSE(op_kind_name(kind).empty());
    CHECK(parse_op_kind(op_kind_name(kind)) == kind);
  }
  CHECK_FALSE(parse_op_kind("GEMM").has_value());
  CHECK(stream_kind_name(COMM) == "comm");
  CHECK(parse_source("measured") == MEASURED);
  CHECK(source_name(PREDICTED) == "predicted");
}

TEST_CASE("recorder spans are ordered, non-negative and stamped with rank, device and step") {
  Recorder rec(3, "node0.gpu3");
  {
    auto a = rec.begin("L0.attn mb0 fwd", ATTENTION, StreamId::compute());
    a.flops(1e9).end();
  }
  rec.set_step(7);
  {
    auto b = rec.begin("L0.moe.dispatch_a2a mb0 fwd", ALL_TO_ALL, StreamId::comm(1));
    b.end(4096);
  }
  Trace t = rec.snapshot();
  REQUIRE(t.spans_size() == 2);
  for (const Span& s : t.spans()) {
    CHECK(s.start_ns() >= 0);
    CHECK(s.end_ns() >= s.start_ns());
    CHECK(s.rank() == 3);
    CHECK(s.device() == "node0.gpu3");
  }
  CHECK(t.spans(0).op_id() == "L0.attn mb0 fwd");
  CHECK(t.spans(0).flops() == 1e9);
  CHECK(t.spans(0).step() == 0);
  CHECK(t.spans(1).start_ns() >= t.spans(0).end_ns());
  CHECK(t.spans(1).bytes() == 4096);
  CHECK(t.spans(1).step() == 7);
  CHECK(t.spans(1).stream().kind() == COMM);
  CHECK(t.spans(1).stream().index() == 1);
}

TEST_CASE("a scoped span ends exactly once: by end(), by its destructor, not after a move") {
  Recorder rec;
  {
    auto a = rec.begin("a", GEMM);
    auto b = std::move(a);
    CHECK_FALSE(a.is_open());
    CHECK(b.is_open());
    a.end();  // moved-from: nothing happens
    CHECK(rec.span_count() == 0);
  }  // b ends here
  CHECK(rec.span_count() == 1);
  {
    auto c = rec.begin("c", GEMM);
    c.end(10);
    c.end(20);  // already ended
    c.bytes(30);
  }
  Trace t = rec.snapshot();
  REQUIRE(t.spans_size() == 2);
  CHECK(t.spans(1).op_id() == "c");
  CHECK(t.spans(1).bytes() == 10);
}

TEST_CASE("threads record concurrently on one recorder") {
  Recorder rec(0, "cpu");
  constexpr int kThreads = 4;
  constexpr int kSpans = 500;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&rec, t] {
      for (int i = 0; i < kSpans; ++i) {
        auto s = rec.begin(fmt::format("t{}.op{}", t, i), ELEMENTWISE, StreamId::compute(t));
        s.end();
      }
    });
  }
  for (std::thread& th : threads) th.join();
  Trace t = rec.snapshot();
  REQUIRE(t.spans_size() == kThreads * kSpans);
  std::set<std::string> ids;
  for (int i = 0; i < t.spans_size(); ++i) {
    const Span& s = t.spans(i);
    ids.insert(s.op_id());
    CHECK(s.start_ns() >= 0);
    CHECK(s.end_ns() >= s.start_ns());
    if (i > 0) CHECK(t.spans(i - 1).start_ns() <= s.start_ns());
  }
  CHECK(ids.size() == static_cast<size_t>(kThreads * kSpans));
  // Per stream (thread), spans come in the order the thread recorded them.
  std::vector<int> next(kThreads, 0);
  for (const Span& s : t.spans()) {
    const int th = s.stream().index();
    CHECK(s.op_id() == fmt::format("t{}.op{}", th, next[th]));
    ++next[th];
  }
}

TEST_CASE("collective spans carry algBw and busBw as nccl-tests defines them") {
  CHECK(bus_factor(ALL_REDUCE, 8) == Approx(2.0 * 7 / 8));
  CHECK(bus_factor(ALL_TO_ALL, 8) == Approx(7.0 / 8));
  CHECK(bus_factor(REDUCE_SCATTER, 4) == Approx(3.0 / 4));
  CHECK(bus_factor(SEND, 2) == 1);
  CHECK(is_collective(ALL_GATHER));
  CHECK_FALSE(is_collective(GEMM));

  Recorder rec;
  {
    auto s = rec.begin("grads all_reduce", ALL_REDUCE, StreamId::comm());
    s.collective(8, bus_factor(ALL_REDUCE, 8), "ring");
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a non-zero duration, not a timing check
    s.end(1e6);
  }
  Trace t = rec.snapshot();
  REQUIRE(t.spans_size() == 1);
  const Span& s = t.spans(0);
  REQUIRE(s.has_collective());
  const double dur_s = static_cast<double>(s.end_ns() - s.start_ns()) * 1e-9;
  REQUIRE(dur_s > 0);
  CHECK(s.collective().ranks() == 8);
  CHECK(s.collective().algorithm() == "ring");
  CHECK(s.collective().alg_bw_bps() == Approx(1e6 / dur_s));
  CHECK(s.collective().bus_bw_bps() == Approx(1e6 / dur_s * 1.75));
}

TEST_CASE("add keeps spans timed elsewhere and refuses one that ends before its start") {
  Recorder rec(0, "gpu0");
  rec.add(make_span("b", GEMM, 5, StreamId::compute(), 200, 300));
  rec.add(make_span("a", GEMM, 4, StreamId::compute(), 100, 150));
  Trace t = rec.snapshot();
  REQUIRE(t.spans_size() == 2);
  CHECK(t.spans(0).op_id() == "a");
  CHECK(t.spans(0).rank() == 4);  // kept as given, not restamped
  CHECK_THROWS_AS(rec.add(make_span("bad", GEMM, 0, StreamId::compute(), 300, 200)), InternalError);
  CHECK(rec.span_count() == 2);
}

TEST_CASE("peak memory keeps the largest value per rank") {
  Recorder rec;
  rec.note_peak_memory(1, "gpu1", 10);
  rec.note_peak_memory(0, "gpu0", 5);
  rec.note_peak_memory(1, "gpu1", 8);
  Trace t = rec.snapshot();
  REQUIRE(t.peak_memory_size() == 2);
  CHECK(t.peak_memory(0).rank() == 0);
  CHECK(t.peak_memory(1).peak_bytes() == 10);
}

TEST_CASE("merge joins the ranks of one run in span order and refuses traces of another run") {
  RunInfo run;
  run.set_run_id("run-1");
  run.set_source(MEASURED);
  Trace r0, r1;
  *r0.mutable_run() = run;
  *r1.mutable_run() = run;
  *r0.add_spans() = make_span("x", GEMM, 0, StreamId::compute(), 0, 10);
  *r0.add_spans() = make_span("y", GEMM, 0, StreamId::compute(), 20, 30);
  *r1.add_spans() = make_span("x", GEMM, 1, StreamId::compute(), 5, 12);
  r0.add_peak_memory()->set_rank(0);
  RankMemory* m1 = r1.add_peak_memory();
  m1->set_rank(1);
  m1->set_peak_bytes(7);
  ExpertLoad* load = r1.add_expert_load();
  load->set_layer(3);
  load->add_tokens_per_expert(5);

  Trace m = merge({r1, r0});
  CHECK(m.run().run_id() == "run-1");
  REQUIRE(m.spans_size() == 3);
  CHECK(m.spans(0).rank() == 0);
  CHECK(m.spans(1).rank() == 1);
  CHECK(m.spans(2).op_id() == "y");
  REQUIRE(m.peak_memory_size() == 2);
  CHECK(m.peak_memory(0).rank() == 0);
  CHECK(m.peak_memory(1).peak_bytes() == 7);
  CHECK(m.expert_load_size() == 1);

  Trace other = r1;
  other.mutable_run()->set_run_id("run-2");
  CHECK_THROWS_AS(merge({r0, other}), TraceError);
  Trace predicted = r1;
  predicted.mutable_run()->set_source(PREDICTED);
  CHECK_THROWS_AS(merge({r0, predicted}), TraceError);
  CHECK(merge({}).spans_size() == 0);
}

// ---- Chrome trace JSON -----------------------------------------------------------------------

TEST_CASE("Chrome JSON parses, with ts and dur in microseconds and named processes and threads") {
  Trace t;
  t.mutable_run()->set_run_id("r");
  *t.add_spans() = make_span("L1.mlp mb0 fwd", GEMM, 0, StreamId::compute(), 2'000'001, 3'500'001);
  Span a2a = make_span("L1.moe.dispatch_a2a mb0 fwd", ALL_TO_ALL, 1, StreamId::comm(2), 1'234, 1'234 + 999);
  a2a.set_bytes(1 << 20);
  a2a.mutable_collective()->set_ranks(2);
  *t.add_spans() = a2a;
  t.add_peak_memory()->set_rank(0);

  pb::Struct doc = parse_json(chrome_trace_json(t));
  CHECK(str(doc, "displayTimeUnit") == "ns");
  CHECK(str(doc.fields().at("otherData").struct_value(), "run_id") == "r");

  std::vector<const pb::Struct*> spans = events(doc, "X");
  REQUIRE(spans.size() == 2);
  const pb::Struct& gemm = *spans[0];
  CHECK(num(gemm, "ts") == Approx(2000.001));
  CHECK(num(gemm, "dur") == 1500);  // 1,500,000 ns
  CHECK(num(gemm, "pid") == 0);
  CHECK(num(gemm, "tid") == chrome_tid(t.spans(0).stream()));
  CHECK(str(gemm, "name") == "L1.mlp mb0 fwd");  // no display name: the op id
  CHECK(str(gemm, "cat") == "gemm");
  CHECK(str(args(gemm), "op_id") == "L1.mlp mb0 fwd");
  const pb::Struct& comm = *spans[1];
  CHECK(num(comm, "ts") == Approx(1.234));
  CHECK(num(comm, "dur") == Approx(0.999));
  CHECK(num(comm, "pid") == 1);
  CHECK(num(comm, "tid") == 2002);
  CHECK(num(args(comm), "bytes") == 1 << 20);
  CHECK(num(args(comm), "ranks") == 2);
  CHECK(args(comm).fields().count("bus_bw_Bps") == 1);

  std::map<std::pair<int, int>, std::string> names;
  for (const pb::Struct* m : events(doc, "M")) {
    if (str(*m, "name") == "process_name" || str(*m, "name") == "thread_name")
      names[{static_cast<int>(num(*m, "pid")), str(*m, "name") == "thread_name" ? static_cast<int>(num(*m, "tid")) : -1}] =
          str(args(*m), "name");
  }
  CHECK(names[{0, -1}] == "rank 0 (node0.gpu0)");
  CHECK(names[{1, -1}] == "rank 1 (node0.gpu1)");
  CHECK(names[{0, 1000}] == "compute 0");
  CHECK(names[{1, 2002}] == "comm 2");
  CHECK(names.size() == 4);
}

TEST_CASE("JSON strings are escaped and always valid UTF-8") {
  CHECK(json_quote("plain") == "\"plain\"");
  CHECK(json_quote("a\"b\\c") == R"("a\"b\\c")");
  CHECK(json_quote("tab\there\nnl") == R"("tab\there\nnl")");
  CHECK(json_quote(std::string("nul\0x", 5)) == R"("nul\u0000x")");
  CHECK(json_quote("\x01") == R"("\u0001")");
  CHECK(json_quote("\xc2\xb5s") == "\"\xc2\xb5s\"");           // µs kept
  CHECK(json_quote("bad\xff") == "\"bad\xef\xbf\xbd\"");        // invalid byte -> U+FFFD
  CHECK(json_quote("\xc0\xaf") == "\"\xef\xbf\xbd\xef\xbf\xbd\"");  // overlong '/' refused
  CHECK(json_quote("\xed\xa0\x80") == "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");  // a surrogate

  Trace t;
  Span s = make_span("odd \"op\"\t\x02 \xff", OTHER, 0, StreamId::copy(), 0, 1);
  s.set_device("dev\\0");
  *t.add_spans() = s;
  pb::Struct doc = parse_json(chrome_trace_json(t));
  CHECK(str(args(*events(doc, "X").at(0)), "op_id") == "odd \"op\"\t\x02 \xef\xbf\xbd");
}

TEST_CASE("golden trace: a small deterministic trace exports to the checked-in Chrome JSON") {
  const std::string golden = std::string(MOESIM_SOURCE_DIR) + "/tests/golden/small_trace.json";
  const std::string json = chrome_trace_json(small_trace());
  if (const char* update = std::getenv("MOESIM_UPDATE_GOLDEN"); update != nullptr && std::string(update) == "1") {
    spit(golden, json);
    WARN("rewrote " << golden);
  }
  const std::string expected = slurp(golden);
  REQUIRE_FALSE(expected.empty());
  if (json != expected) {
    std::istringstream a(json), b(expected);
    std::string la, lb;
    int line = 1;
    while (std::getline(a, la) && std::getline(b, lb) && la == lb) ++line;
    FAIL(fmt::format("differs from {} at line {}:\n  got:      {}\n  expected: {}\n"
                     "(rerun with MOESIM_UPDATE_GOLDEN=1 after an intended change)",
                     golden, line, la, lb));
  }
  parse_json(json);
}

// ---- trace files -----------------------------------------------------------------------------

TEST_CASE("trace files round-trip in binary and text form, and Chrome JSON writes to a file") {
  TempDir dir;
  const Trace t = small_trace();
  for (const std::string name : {"t.pb", "t.textproto", "t.trace"}) {
    INFO(name);
    write_trace(t, dir.file(name));
    Trace back = read_trace(dir.file(name));
    CHECK(back.SerializeAsString() == t.SerializeAsString());
  }
  CHECK(trace_format_for("x.textproto") == TraceFormat::kText);
  CHECK(trace_format_for("x.pb") == TraceFormat::kBinary);
  // Text written by hand, read through sniffing (no known extension).
  spit(dir.file("hand.trace"), "spans { op_id: \"a\" kind: GEMM start_ns: 1 end_ns: 2 }\n");
  CHECK(read_trace(dir.file("hand.trace")).spans(0).kind() == GEMM);

  write_chrome_trace(t, dir.file("t.json"));
  CHECK(slurp(dir.file("t.json")) == chrome_trace_json(t));
  CHECK_THROWS_AS(write_chrome_trace(t, dir.path().string()), TraceError);
  CHECK_THROWS_AS(write_trace(t, dir.file("no/such/folder/t.pb")), TraceError);
}

TEST_CASE("a bad trace file is refused naming file, line and field, every problem at once") {
  TempDir dir;
  const std::string path = dir.file("bad.textproto");
  spit(path,
       "run { run_id: \"r\" }\n"
       "spans { op_id: \"ok\" kind: GEMM start_ns: 0 end_ns: 5 }\n"
       "spans {\n"
       "  op_id: \"late\" kind: GEMM\n"
       "  start_ns: 10\n"
       "  end_ns: 5\n"
       "}\n"
       "spans { kind: OP_KIND_UNSPECIFIED start_ns: -1 end_ns: 0 bytes: -3 }\n"
       "spans { op_id: \"gate\" kind: ELEMENTWISE start_ns: 0 end_ns: 5 routing_host_s: -1e-6 }\n");
  try {
    read_trace(path);
    FAIL("no error");
  } catch (const ConfigError& e) {
    std::string all = e.what();
    INFO(all);
    CHECK(all.find(path + ":6: spans[1].end_ns: ends at 5 ns, before its start at 10 ns") != std::string::npos);
    CHECK(all.find("spans[2].op_id: missing op id") != std::string::npos);
    CHECK(all.find("spans[2].kind: missing op kind") != std::string::npos);
    CHECK(all.find("spans[2].start_ns") != std::string::npos);
    CHECK(all.find("spans[2].bytes") != std::string::npos);
    CHECK(all.find(path + ":9: spans[3].routing_host_s: must be a finite number >= 0") != std::string::npos);
    CHECK(e.diagnostics().size() == 6);
  }

  spit(dir.file("junk.pb"), std::string("\xff\xff\xff\xff\x0f\x01", 6));
  CHECK_THROWS_WITH(read_trace(dir.file("junk.pb")), Catch::Contains("not a binary moesim.trace.Trace"));
  CHECK_THROWS_WITH(read_trace(dir.file("missing.pb")), Catch::Contains("missing.pb: cannot read"));
  CHECK_THROWS_WITH(read_trace(dir.path().string()), Catch::Contains("is a directory"));
  spit(dir.file("typo.textproto"), "spans { op_idd: \"a\" }\n");
  CHECK_THROWS_WITH(read_trace(dir.file("typo.textproto")), Catch::Contains("typo.textproto:1:"));
}

// ---- results store ---------------------------------------------------------------------------

TEST_CASE("a store is created on first use and its runs, metrics and traces read back after reopening") {
  TempDir dir;
  const std::string path = dir.file("results.db");
  RunRecord run;
  run.kind = RunKind::kSimulate;
  run.cluster = "dgx-h100x2";
  run.model = "mixtral-8x7b";
  run.workload = "train-4k";
  run.strategy = "dp1-ep2";
  run.seed = 0xfedcba9876543210ULL;  // above 2^63: stored bit for bit
  run.step_time_s = 1.25;
  run.tokens_per_s = 3.2e4;
  run.mfu = 0.41;
  run.peak_memory_bytes = 6.5e10;
  run.fits = true;
  run.result_json = R"({"step_time_s": 1.25})";
  std::string id;
  {
    Store store = Store::open(path);
    CHECK(store.schema_version() == Store::kSchemaVersion);
    CHECK(store.path() == path);
    id = store.insert_run(run, {{"a2a_time_s", 0.3}, {"nan_metric", std::nan("")}}, {small_trace()});
    CHECK(id == "simulate-1");
    RunRecord plan;
    plan.kind = RunKind::kPlan;
    plan.id = "my-plan";
    plan.created = "2025-02-03T04:05:06Z";
    CHECK(store.insert_run(plan) == "my-plan");
    CHECK(store.insert_run(run) == "simulate-3");  // numbered by row, unique in the file
  }
  REQUIRE(fs::exists(path));

  Store store = Store::open(path);
  std::optional<RunRecord> back = store.find_run(id);
  REQUIRE(back.has_value());
  RunRecord expected = run;
  expected.id = id;
  expected.created = back->created;
  CHECK(*back == expected);
  CHECK(back->created.size() == 20);  // 2025-01-31T12:00:00Z
  CHECK(back->created.back() == 'Z');
  CHECK_FALSE(store.find_run("nope").has_value());

  std::vector<RunRecord> all = store.list_runs();
  REQUIRE(all.size() == 3);
  CHECK(all[1].id == "my-plan");
  CHECK(all[1].created == "2025-02-03T04:05:06Z");
  CHECK_FALSE(all[1].fits.has_value());
  CHECK_FALSE(all[1].step_time_s.has_value());
  CHECK(store.list_runs(RunKind::kPlan).size() == 1);
  CHECK(store.list_runs(RunKind::kSweep).empty());

  std::map<std::string, double> m = store.metrics(id);
  CHECK(m.at("a2a_time_s") == 0.3);
  CHECK(std::isnan(m.at("nan_metric")));
  store.put_metrics(id, {{"a2a_time_s", 0.25}, {"mfu_measured", 0.38}});
  CHECK(store.metrics(id).at("a2a_time_s") == 0.25);
  CHECK(store.metrics(id).size() == 3);

  std::optional<Trace> t = store.find_trace(id, PREDICTED);
  REQUIRE(t.has_value());
  CHECK(t->SerializeAsString() == small_trace().SerializeAsString());
  CHECK_FALSE(store.find_trace(id, MEASURED).has_value());
  Trace measured = small_trace();
  measured.mutable_run()->set_source(MEASURED);
  store.add_trace(id, measured);
  std::vector<TraceSummary> sums = store.trace_summaries(id);
  REQUIRE(sums.size() == 2);
  CHECK(sums[0].source == PREDICTED);
  CHECK(sums[0].span_count == 6);
  CHECK(sums[0].duration_ns == 1'620'000 + 2'345'678 + 1000);

  store.set_status(id, "validated");
  CHECK(store.find_run(id)->status == "validated");
  CHECK_THROWS_WITH(store.set_status("nope", "x"), Catch::Contains("no run 'nope'"));
  CHECK_THROWS_WITH(store.add_trace("nope", measured), Catch::Contains("no run 'nope'"));
}

TEST_CASE("schema version: the current store reopens, a newer one is refused, another schema too") {
  TempDir dir;
  const std::string path = dir.file("results.db");
  { Store::open(path).insert_run(RunRecord{}); }
  CHECK(raw_count(path, "meta") >= 1);
  CHECK(Store::open(path).list_runs().size() == 1);  // reopening migrates nothing, keeps the data

  raw_sql(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'");
  std::string err = store_error_of([&] { Store::open(path); });
  CHECK(err.find(path) != std::string::npos);
  CHECK(err.find("newer moesim (schema version 99") != std::string::npos);

  raw_sql(path, "UPDATE meta SET value = 'x' WHERE key = 'schema_version'");
  CHECK(store_error_of([&] { Store::open(path); }).find("no valid schema_version") != std::string::npos);
}

TEST_CASE("a schema 1 store is migrated to schema 2 in place: its runs keep their data, new ones record inputs and version") {
  TempDir dir;
  const std::string path = dir.file("results.db");
  RunRecord old;
  old.model = "mixtral";
  old.step_time_s = 1.5;
  { Store::open(path).insert_run(old); }
  // Turn it back into what schema 1 wrote.
  raw_sql(path, "ALTER TABLE runs DROP COLUMN inputs_hash");
  raw_sql(path, "ALTER TABLE runs DROP COLUMN version");
  raw_sql(path, "UPDATE meta SET value = '1' WHERE key = 'schema_version'");
  Store store = Store::open(path);
  CHECK(store.schema_version() == 2);
  std::vector<RunRecord> runs = store.list_runs();
  REQUIRE(runs.size() == 1);
  CHECK(runs[0].model == "mixtral");
  CHECK(runs[0].step_time_s == 1.5);
  CHECK(runs[0].inputs_hash.empty());
  RunRecord now;
  now.inputs_hash = "fnv1a64:0123456789abcdef";
  now.version = "0.1.0";
  const std::string id = store.insert_run(now);
  CHECK(store.find_run(id)->inputs_hash == now.inputs_hash);
  CHECK(store.find_run(id)->version == "0.1.0");
}

TEST_CASE("a non-SQLite file, another application's database or another schema are refused, byte for byte untouched") {
  TempDir dir;
  SECTION("a text file") {
    const std::string path = dir.file("notes.db");
    const std::string bytes = "these are my notes, not a database\n";
    spit(path, bytes);
    std::string err = store_error_of([&] { Store::open(path); });
    CHECK(err.find(path + ": is not a SQLite database") != std::string::npos);
    CHECK(slurp(path) == bytes);
  }
  SECTION("a SQLite file of another schema") {
    const std::string path = dir.file("other.db");
    raw_sql(path, "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO customers VALUES (1, 'a')");
    const std::string bytes = slurp(path);
    std::string err = store_error_of([&] { Store::open(path); });
    CHECK(err.find("another schema") != std::string::npos);
    CHECK(slurp(path) == bytes);
    CHECK_FALSE(fs::exists(path + "-wal"));
  }
  SECTION("a SQLite file of another application") {
    const std::string path = dir.file("app.db");
    raw_sql(path, "PRAGMA application_id = 1234; CREATE TABLE meta (key TEXT, value TEXT)");
    const std::string bytes = slurp(path);
    CHECK(store_error_of([&] { Store::open(path); }).find("another application") != std::string::npos);
    CHECK(slurp(path) == bytes);
  }
  SECTION("a truncated store") {
    const std::string path = dir.file("cut.db");
    spit(path, std::string("SQLite format 3\0", 16) + std::string(100, '\x07'));
    const std::string bytes = slurp(path);
    CHECK(store_error_of([&] { Store::open(path); }).find(path) == 0);
    CHECK(slurp(path) == bytes);
  }
}

TEST_CASE("a folder, a missing folder or a file in place of a folder are refused with a clear error") {
  TempDir dir;
  CHECK(store_error_of([&] { Store::open(dir.path().string()); }).find("is a directory") != std::string::npos);
  CHECK(store_error_of([&] { Store::open(dir.file("no/such/dir/results.db")); }).find("does not exist") !=
        std::string::npos);
  spit(dir.file("plain"), "x");
  CHECK(store_error_of([&] { Store::open(dir.file("plain/results.db")); }).find("is not a folder") !=
        std::string::npos);
  CHECK(store_error_of([&] { Store::open("/dev/null"); }).find("not a regular file") != std::string::npos);
}

TEST_CASE("a failed insert leaves no partial rows") {
  TempDir dir;
  const std::string path = dir.file("results.db");
  Store store = Store::open(path);
  RunRecord run;
  run.id = "run-a";
  run.kind = RunKind::kRun;

  SECTION("a trace source given twice: checked by moesim") {
    Trace t = small_trace();
    CHECK(store_error_of([&] { store.insert_run(run, {{"x", 1}}, {t, t}); }).find("already has a predicted trace") !=
          std::string::npos);
  }
  SECTION("a metric without a name") {
    CHECK(store_error_of([&] { store.insert_run(run, {{"ok", 1}, {"", 2}}); }).find("has no name") !=
          std::string::npos);
  }
  SECTION("a constraint SQLite itself enforces fails mid-transaction") {
    raw_sql(path,
            "CREATE TRIGGER refuse BEFORE INSERT ON run_metrics WHEN NEW.name = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned metric'); END");
    std::string err = store_error_of([&] { store.insert_run(run, {{"ok", 1}, {"poison", 2}}); });
    CHECK(err.find("poisoned metric") != std::string::npos);
    CHECK(err.find("store.cc:") != std::string::npos);  // where the call was made
  }
  CHECK(raw_count(path, "runs") == 0);
  CHECK(raw_count(path, "run_metrics") == 0);
  CHECK(raw_count(path, "traces") == 0);
  CHECK_FALSE(store.find_run("run-a").has_value());

  // The store still works after the failure, and a duplicate id leaves the first row alone.
  run.status = "first";
  store.insert_run(run);
  RunRecord dup = run;
  dup.status = "second";
  CHECK(store_error_of([&] { store.insert_run(dup); }).find("already stored") != std::string::npos);
  CHECK(store.find_run("run-a")->status == "first");
  CHECK(raw_count(path, "runs") == 1);
}

TEST_CASE("concurrent writers from several threads don't corrupt the store") {
  TempDir dir;
  const std::string path = dir.file("results.db");
  constexpr int kThreads = 3;
  constexpr int kRuns = 20;
  Store shared = Store::open(path);
  std::vector<std::thread> threads;
  std::mutex mu;
  std::vector<std::string> failures;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      try {
        Store own = Store::open(path);  // its own connection
        for (int i = 0; i < kRuns; ++i) {
          RunRecord r;
          r.id = fmt::format("t{}-{}", t, i);
          own.insert_run(r, {{"i", static_cast<double>(i)}});
          RunRecord s;
          s.kind = RunKind::kSweep;  // auto ids from one shared connection
          shared.insert_run(s);
        }
      } catch (const std::exception& e) {  // Catch2's macros are not thread-safe: collect, check later
        std::lock_guard<std::mutex> lock(mu);
        failures.push_back(e.what());
      }
    });
  }
  for (std::thread& th : threads) th.join();
  INFO(fmt::format("{}", fmt::join(failures, "\n")));
  CHECK(failures.empty());
  CHECK(shared.list_runs(RunKind::kSimulate).size() == kThreads * kRuns);
  CHECK(shared.list_runs(RunKind::kSweep).size() == kThreads * kRuns);
  CHECK(raw_count(path, "run_metrics") == kThreads * kRuns);
}

TEST_CASE("concurrent writers from two processes creating the store at once both land") {
  TempDir dir;
  const std::string path = dir.file("results.db");
  constexpr int kRuns = 25;
  std::vector<pid_t> children;
  for (int p = 0; p < 2; ++p) {
    pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int rc = 0;
      try {
        Store store = Store::open(path);
        for (int i = 0; i < kRuns; ++i) {
          RunRecord r;
          r.id = fmt::format("p{}-{}", p, i);
          r.kind = RunKind::kRun;
          Trace t = small_trace();
          t.mutable_run()->set_source(MEASURED);
          store.insert_run(r, {{"i", static_cast<double>(i)}}, {t});
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "child %d: %s\n", p, e.what());
        rc = 1;
      }
      std::fflush(stderr);
      ::_exit(rc);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
  Store store = Store::open(path);
  std::vector<RunRecord> runs = store.list_runs();
  CHECK(runs.size() == 2 * kRuns);
  CHECK(store.find_run("p0-0").has_value());
  CHECK(store.find_run(fmt::format("p1-{}", kRuns - 1)).has_value());
  CHECK(raw_count(path, "traces") == 2 * kRuns);
  REQUIRE(store.find_trace("p1-3", MEASURED).has_value());
  CHECK(raw_text(path, "PRAGMA integrity_check") == "ok");
}

TEST_CASE("run kinds map to their names and back") {
  for (RunKind k : {RunKind::kSimulate, RunKind::kRun, RunKind::kPlan, RunKind::kSweep, RunKind::kValidate, RunKind::kCalibrate})
    CHECK(parse_run_kind(run_kind_name(k)) == k);
  CHECK(run_kind_name(RunKind::kValidate) == "validate");
  CHECK_FALSE(parse_run_kind("simulation").has_value());
}
