// The event engine: ordering and determinism, streams and deps, collectives as rendezvous (against
// the analytic model, and against it within 1% as flows on an idle network), shadow ranks, the
// memory timeline, the breakdown, deadlocks and schedules that are not well-formed.
#include "sim/engine.h"

#include "costmodel/collectives.h"
#include "sim/flows.h"
#include "traces/recorder.h"

#include "test_clusters.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace moesim;
using schedule::Collective;
using trace::StreamId;

namespace {

topo::Cluster dgx() { return topo::load_cluster(MOESIM_SOURCE_DIR "/configs/hardware/dgx-h100.textproto"); }

constexpr double us = 1e-6;
// The engine's rounding of a duration: up to whole nanoseconds.
int64_t ceil_ns(double s) {
  const double v = s * 1e9;
  return std::fabs(v - std::nearbyint(v)) < 1e-6 ? std::llround(v) : static_cast<int64_t>(std::ceil(v));
}

// Builds schedules by hand: ranks, ops on streams, collectives.
class Sched {
 public:
  explicit Sched(std::string name = "test") { s.set_name(name); }

  // Adds a simulated rank; returns its index in the schedule.
  int rank(int device, int64_t static_bytes = 0, int64_t capacity_bytes = 0, int represents = 1) {
    schedule::RankSchedule* r = s.add_ranks();
    r->set_rank(device);
    r->set_static_bytes(static_bytes);
    r->set_capacity_bytes(capacity_bytes);
    r->set_represents(represents);
    return s.ranks_size() - 1;
  }
  // A compute (or copy) op of `duration_s`; returns its index on the rank.
  int op(int r, std::string id, double duration_s, StreamId stream = StreamId::compute(), std::vector<int> deps = {},
         trace::OpKind kind = trace::GEMM) {
    schedule::Op* o = add(r, std::move(id), kind, stream, deps);
    o->set_duration_s(duration_s);
    o->set_flops(1e9);
    return s.ranks(r).ops_size() - 1;
  }
  // A communication op joining collective `c` (1-based).
  int comm(int r, std::string id, int c, trace::OpKind kind, std::vector<int> deps = {},
           StreamId stream = StreamId::comm()) {
    schedule::Op* o = add(r, std::move(id), kind, stream, deps);
    o->set_collective(c);
    o->set_bytes(s.collectives(c - 1).bytes());
    return s.ranks(r).ops_size() - 1;
  }
  // A collective; returns its 1-based index.
  int collective(Collective::Op op, std::vector<int> ranks, double bytes, std::string algorithm = "") {
    Collective* c = s.add_collectives();
    c->set_op(op);
    c->set_algorithm(std::move(algorithm));
    for (int d : ranks) c->add_ranks(d);
    c->set_bytes(bytes);
    return s.collectives_size();
  }
  int matrix(const std::vector<std::vector<double>>& m) {
    schedule::ByteMatrix* b = s.add_matrices();
    b->set_n(static_cast<int>(m.size()));
    for (const auto& row : m)
      for (double v : row) b->add_bytes(v);
    return s.matrices_size();
  }
  schedule::Op& last(int r) { return *s.mutable_ranks(r)->mutable_ops(s.ranks(r).ops_size() - 1); }

  schedule::Schedule s;

 private:
  schedule::Op* add(int r, std::string id, trace::OpKind kind, StreamId stream, const std::vector<int>& deps) {
    schedule::Op* o = s.mutable_ranks(r)->add_ops();
    o->set_name(id);
    o->set_id(std::move(id));
    o->set_kind(kind);
    o->mutable_stream()->set_kind(stream.kind);
    o->mutable_stream()->set_index(stream.index);
    for (int d : deps) o->add_deps(d);
    o->set_micro_batch(-1);
    o->set_layer(-1);
    return o;
  }
};

double duration_s(const trace::Span& s) { return static_cast<double>(s.end_ns() - s.start_ns()) / 1e9; }

const trace::Span& span(const sim::SimResult& r, int rank, const std::string& id) {
  for (const trace::Span& s : r.trace.spans())
    if (s.rank() == rank && s.op_id() == id) return s;
  FAIL("no span " << id << " on rank " << rank);
  throw std::logic_error("unreachable");
}

double sum_of(const std::map<std::string, double>& m) {
  double t = 0;
  for (const auto& [k, v] : m) t += v;
  return t;
}

double at(const std::map<std::string, double>& m, const std::string& k) {
  auto it = m.find(k);
  return it == m.end() ? 0.0 : it->second;
}

sim::SimOptions analytic() {
  sim::SimOptions o;
  o.network = sim::NetworkMode::kAnalytic;
  return o;
}
sim::SimOptions flows() { return sim::SimOptions{}; }

// Two ranks with compute, a2a-v, all-reduce and a pipeline send: enough to exercise every path.
Sched mixed_schedule() {
  Sched b;
  const int r0 = b.rank(0, 1 << 20, 0), r1 = b.rank(1, 1 << 20, 0);
  const int m = b.matrix({{0, 3e6}, {1e6, 0}});
  Collective* v = b.s.add_collectives();
  v->set_op(Collective::ALL_TO_ALL_V);
  v->add_ranks(0);
  v->add_ranks(1);
  v->set_matrix(m);
  const int a2a = b.s.collectives_size();
  const int ar = b.collective(Collective::ALL_REDUCE, {0, 1}, 64e6, "ring");
  const int p2p = b.collective(Collective::SEND_RECV, {0, 1}, 8e6);
  for (int r : {r0, r1}) {
    const int g = b.op(r, "gate", r == r0 ? 10 * us : 12 * us);
    b.last(r).set_alloc_bytes(1000);
    const int d = b.comm(r, "dispatch", a2a, trace::ALL_TO_ALL, {g});
    const int e = b.op(r, "experts", r == r0 ? 40 * us : 25 * us, StreamId::compute(), {d});
    b.last(r).set_free_bytes(1000);
    b.comm(r, "grad_allreduce", ar, trace::ALL_REDUCE, {e}, StreamId::comm(1));
    b.op(r, "prefetch", 30 * us, StreamId::copy());
    b.comm(r, r == r0 ? "send" : "recv", p2p, r == r0 ? trace::SEND : trace::RECV, {e});
  }
  return b;
}

}  // namespace

TEST_CASE("ops on one stream run one after another, on two streams side by side, deps cross streams") {
  topo::Cluster c = dgx();
  Sched b;
  const int r = b.rank(0);
  const int a = b.op(r, "a", 10 * us);
  b.op(r, "b", 20 * us);                                      // same stream: after a
  b.op(r, "c", 15 * us, StreamId::compute(1));                // another stream: from 0
  b.op(r, "d", 5 * us, StreamId::copy(), {a});                // waits for a only
  const int e = b.op(r, "e", 1 * us, StreamId::copy());       // after d on the copy stream
  b.op(r, "f", 2 * us, StreamId::compute(1), {1, e});         // after c, b and e
  sim::SimResult res = sim::simulate(b.s, c, analytic());

  CHECK(span(res, 0, "a").start_ns() == 0);
  CHECK(span(res, 0, "a").end_ns() == 10'000);
  CHECK(span(res, 0, "b").start_ns() == 10'000);
  CHECK(span(res, 0, "b").end_ns() == 30'000);
  CHECK(span(res, 0, "c").start_ns() == 0);
  CHECK(span(res, 0, "c").end_ns() == 15'000);
  CHECK(span(res, 0, "d").start_ns() == 10'000);
  CHECK(span(res, 0, "e").start_ns() == 15'000);
  CHECK(span(res, 0, "f").start_ns() == 30'000);
  CHECK(span(res, 0, "f").end_ns() == 32'000);
  CHECK(res.step_time_s == Approx(32 * us));
  CHECK(res.ranks.size() == 1);
  CHECK(res.ranks[0].end_s == Approx(32 * us));
  // Spans carry the op's identity and the device's name, in span order.
  const trace::Span& f = span(res, 0, "f");
  CHECK(f.device() == "node0.gpu0");
  CHECK(f.stream().kind() == trace::COMPUTE);
  CHECK(f.stream().index() == 1);
  CHECK(f.flops() == 1e9);
  CHECK(res.trace.run().source() == trace::PREDICTED);
  CHECK(std::is_sorted(res.trace.spans().begin(), res.trace.spans().end(), trace::span_order));
  CHECK(res.trace.spans_size() == 6);
  CHECK(res.events == 6);
}

TEST_CASE("a compute op's gap is in its rank's step, after its span and before what follows it") {
  topo::Cluster c = dgx();
  Sched b;
  const int r = b.rank(0);
  const int a = b.op(r, "a", 10 * us);
  b.last(r).set_gap_s(3 * us);
  b.op(r, "b", 20 * us);                        // same stream: after a's gap
  b.op(r, "c", 5 * us, StreamId::copy(), {a});  // a dependant on another stream waits it too
  b.last(r).set_gap_s(1 * us);
  sim::SimResult res = sim::simulate(b.s, c, analytic());
  CHECK(span(res, 0, "a").end_ns() == 10'000);  // the op itself
  CHECK(span(res, 0, "b").start_ns() == 13'000);
  CHECK(span(res, 0, "c").start_ns() == 13'000);
  CHECK(span(res, 0, "c").end_ns() == 18'000);
  CHECK(res.step_time_s == Approx(33 * us));  // b ends last; c's gap ends before it
  CHECK(sum_of(res.ranks[0].breakdown) == Approx(res.ranks[0].end_s).epsilon(1e-12));
  // A gap that is not a finite number >= 0 is refused, naming the op.
  b.last(r).set_gap_s(-1 * us);
  CHECK_THROWS_WITH(sim::simulate(b.s, c, analytic()), Catch::Contains("op 2 'c': gap_s"));
}

TEST_CASE("durations round up to whole nanoseconds, and exact ones stay exact") {
  topo::Cluster c = dgx();
  Sched b;
  const int r = b.rank(0);
  b.op(r, "exact", 1e-6);       // 1e-6 * 1e9 is not exactly 1000 in doubles
  b.op(r, "fraction", 1.2e-9);  // 1.2 ns -> 2 ns
  b.op(r, "zero", 0);
  sim::SimResult res = sim::simulate(b.s, c, analytic());
  CHECK(span(res, 0, "exact").end_ns() == 1000);
  CHECK(span(res, 0, "fraction").end_ns() == 1002);
  CHECK(span(res, 0, "zero").start_ns() == 1002);
  CHECK(span(res, 0, "zero").end_ns() == 1002);
}

TEST_CASE("a run is deterministic: the same schedule twice gives byte-identical traces") {
  topo::Cluster c = dgx();
  Sched b = mixed_schedule();
  for (const sim::SimOptions& o : {analytic(), flows()}) {
    sim::SimResult one = sim::simulate(b.s, c, o);
    sim::SimResult two = sim::simulate(b.s, c, o);
    std::string x, y;
    REQUIRE(one.trace.SerializeToString(&x));
    REQUIRE(two.trace.SerializeToString(&y));
    CHECK(x == y);
    CHECK(one.trace.spans_size() == 12);
    CHECK(one.events == two.events);
    CHECK(one.step_time_s == two.step_time_s);
    CHECK(one.collectives_run == 3);
  }
}

TEST_CASE("events at the same nanosecond run in the order they were queued") {
  // On one rank, "free" (stream 0) gives back 100 bytes and "pred" (stream 1) ends at the same
  // nanosecond, which lets "take" allocate 100. Whichever end was queued first runs first: free
  // first keeps the peak at 100, take first raises it to 200.
  topo::Cluster c = dgx();
  auto run = [&](bool free_first) {
    Sched b;
    const int r = b.rank(0);
    auto add_free = [&] {
      b.op(r, "free", 10 * us, StreamId::compute(0));
      b.last(r).set_alloc_bytes(100);
      b.last(r).set_free_bytes(100);
    };
    auto add_pred = [&] { b.op(r, "pred", 10 * us, StreamId::compute(1)); };
    if (free_first) {
      add_free();
      add_pred();
    } else {
      add_pred();
      add_free();
    }
    const int pred = free_first ? 1 : 0;
    b.op(r, "take", 1 * us, StreamId::compute(1), {pred});
    b.last(r).set_alloc_bytes(100);
    return sim::simulate(b.s, c, analytic());
  };
  sim::SimResult free_first = run(true), take_first = run(false);
  CHECK(span(free_first, 0, "take").start_ns() == 10'000);
  CHECK(span(take_first, 0, "take").start_ns() == 10'000);
  CHECK(free_first.ranks[0].peak_bytes == 100);
  CHECK(free_first.ranks[0].peak_op == "free");
  CHECK(take_first.ranks[0].peak_bytes == 200);
  CHECK(take_first.ranks[0].peak_op == "take");
}

TEST_CASE("a collective waits for its slowest participant and all participants end together") {
  topo::Cluster c = dgx();
  cost::CollectiveModel model(c);
  const std::vector<int> ranks = cost::first_ranks(8);
  struct Case {
    Collective::Op op;
    cost::CollectiveOp cost_op;
    trace::OpKind kind;
    std::string algo;
  };
  const double S = 64e6;
  for (const Case& k : {Case{Collective::ALL_REDUCE, cost::CollectiveOp::kAllReduce, trace::ALL_REDUCE, "ring"},
                        Case{Collective::ALL_REDUCE, cost::CollectiveOp::kAllReduce, trace::ALL_REDUCE, "tree"},
                        Case{Collective::ALL_TO_ALL, cost::CollectiveOp::kAllToAll, trace::ALL_TO_ALL, "direct"},
                        Case{Collective::ALL_GATHER, cost::CollectiveOp::kAllGather, trace::ALL_GATHER, ""}}) {
    DYNAMIC_SECTION(cost::op_name(k.cost_op) << " " << k.algo) {
      Sched b;
      const int coll = b.collective(k.op, ranks, S, k.algo);
      for (int d : ranks) {
        const int r = b.rank(d);
        const int pre = b.op(r, "pre", (10 + 5 * d) * us);  // rank 7 is the slowest: 45 us
        b.comm(r, "coll", coll, k.kind, {pre});
        b.op(r, "post", 1 * us, StreamId::compute(), {1});
      }
      const cost::CollectiveAlgo algo = k.algo.empty() ? cost::default_algo(k.cost_op) : cost::parse_algo(k.algo);
      const double expected_s = model.cost(k.cost_op, algo, ranks, S).time_s;
      SECTION("analytic: the cost model's time, exactly") {
        sim::SimResult res = sim::simulate(b.s, c, analytic());
        for (int d : ranks) {
          const trace::Span& s = span(res, d, "coll");
          CHECK(s.start_ns() == 45'000);
          CHECK(s.end_ns() - s.start_ns() == ceil_ns(expected_s));
          CHECK(span(res, d, "post").start_ns() == s.end_ns());
          CHECK(s.collective().ranks() == 8);
          CHECK(s.collective().bus_factor() == Approx(trace::bus_factor(k.kind, 8)));
          CHECK(s.collective().alg_bw_bps() == Approx(S / duration_s(s)).epsilon(1e-9));
          CHECK(s.collective().bus_bw_bps() == Approx(s.collective().alg_bw_bps() * s.collective().bus_factor()));
          CHECK(s.collective().algorithm() == std::string(cost::algo_name(algo)));
          CHECK(s.bytes() == S);
        }
        CHECK(res.step_time_s == Approx(45 * us + expected_s + 1 * us).margin(2e-9));
        CHECK(res.collectives_run == 1);
        CHECK(res.busiest_links.empty());
      }
      SECTION("flows on an idle network: within 1% of the cost model") {
        sim::SimResult res = sim::simulate(b.s, c, flows());
        const trace::Span& s0 = span(res, 0, "coll");
        CHECK(s0.start_ns() == 45'000);
        const double took_s = duration_s(s0);
        CHECK(took_s == Approx(expected_s).epsilon(0.01));
        // And the decomposition's own idle time, give or take a nanosecond of rounding per step.
        const std::vector<sim::Phase> phases = sim::decompose(model, k.cost_op, algo, ranks, S);
        CHECK(took_s == Approx(sim::idle_time_s(c, phases)).margin(30e-9));
        for (int d : ranks) CHECK(span(res, d, "coll").end_ns() == s0.end_ns());
        CHECK_FALSE(res.busiest_links.empty());
        CHECK(res.busiest_links.size() <= 10);
      }
    }
  }
}

TEST_CASE("concurrent collectives contend for links as flows, not in the analytic model") {
  topo::Cluster c = dgx();
  const std::vector<int> ranks = cost::first_ranks(8);
  Sched b;
  const int x = b.collective(Collective::ALL_TO_ALL, ranks, 64e6);
  const int y = b.collective(Collective::ALL_TO_ALL, ranks, 64e6);
  for (int d : ranks) {
    const int r = b.rank(d);
    b.comm(r, "x", x, trace::ALL_TO_ALL, {}, StreamId::comm(0));
    b.comm(r, "y", y, trace::ALL_TO_ALL, {}, StreamId::comm(1));
  }
  cost::CollectiveModel model(c);
  const cost::CollectiveCost alone = model.cost(cost::CollectiveOp::kAllToAll, ranks, 64e6);
  sim::SimResult a = sim::simulate(b.s, c, analytic());
  sim::SimResult f = sim::simulate(b.s, c, flows());
  CHECK(span(a, 3, "x").start_ns() == 0);
  CHECK(span(a, 3, "y").start_ns() == 0);
  CHECK(duration_s(span(a, 3, "y")) == Approx(alone.time_s).margin(1e-9));
  // Side by side, the two share every device's NVSwitch port: each transfer takes twice as long.
  CHECK(duration_s(span(f, 3, "x")) == Approx(alone.latency_s + 2 * alone.transfer_s).epsilon(0.01));
  CHECK(duration_s(span(f, 3, "y")) == Approx(alone.latency_s + 2 * alone.transfer_s).epsilon(0.01));
  CHECK(f.step_time_s > 1.5 * a.step_time_s);
}

TEST_CASE("all-to-all-v: the matrix, transposed or not, as the cost model times it") {
  topo::Cluster c = dgx();
  cost::CollectiveModel model(c);
  const std::vector<int> ranks = cost::first_ranks(4);
  std::vector<std::vector<double>> m(4, std::vector<double>(4, 1e6));
  m[0][3] = 40e6;  // one heavy sender: rank 0's row sets the pace; transposed, rank 0 receives it
  Sched b;
  const int mi = b.matrix(m);
  for (bool transpose : {false, true}) {
    Collective* v = b.s.add_collectives();
    v->set_op(Collective::ALL_TO_ALL_V);
    v->set_algorithm("direct");
    for (int d : ranks) v->add_ranks(d);
    v->set_matrix(mi);
    v->set_transpose(transpose);
  }
  for (int d : ranks) {
    const int r = b.rank(d);
    b.comm(r, "dispatch", 1, trace::ALL_TO_ALL);
    b.comm(r, "combine", 2, trace::ALL_TO_ALL);
  }
  std::vector<std::vector<double>> t(4, std::vector<double>(4));
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) t[i][j] = m[j][i];
  const double dispatch_s = model.all_to_all_v(ranks, m, cost::CollectiveAlgo::kDirect).time_s;
  const double combine_s = model.all_to_all_v(ranks, t, cost::CollectiveAlgo::kDirect).time_s;
  sim::SimResult res = sim::simulate(b.s, c, analytic());
  CHECK(duration_s(span(res, 2, "dispatch")) == Approx(dispatch_s).margin(1e-9));
  CHECK(duration_s(span(res, 2, "combine")) == Approx(combine_s).margin(1e-9));
  // S for the bandwidths: the mean send buffer, sum / n.
  const double sum = 15 * 1e6 + 40e6;
  CHECK(span(res, 2, "dispatch").bytes() == Approx(sum / 4));
  sim::SimResult f = sim::simulate(b.s, c, flows());
  CHECK(duration_s(span(f, 2, "dispatch")) == Approx(dispatch_s).epsilon(0.01));
  CHECK(duration_s(span(f, 2, "combine")) == Approx(combine_s).epsilon(0.01));
}

TEST_CASE("shadow ranks: a collective's unsimulated ranks are ready with the others and still load it") {
  topo::Cluster c = dgx();
  cost::CollectiveModel model(c);
  const std::vector<int> all = cost::first_ranks(8);
  const double S = 32e6;
  Sched b;
  const int coll = b.collective(Collective::ALL_TO_ALL, all, S);
  // Simulate ranks 0 and 4 only, each standing for 4.
  for (int d : {0, 4}) {
    const int r = b.rank(d, 0, 0, 4);
    const int pre = b.op(r, "pre", d == 0 ? 10 * us : 20 * us);
    b.comm(r, "a2a", coll, trace::ALL_TO_ALL, {pre});
  }
  const double expected_s = model.cost(cost::CollectiveOp::kAllToAll, all, S).time_s;
  for (const sim::SimOptions& o : {analytic(), flows()}) {
    sim::SimResult res = sim::simulate(b.s, c, o);
    for (int d : {0, 4}) {
      const trace::Span& s = span(res, d, "a2a");
      CHECK(s.start_ns() == 20'000);  // the slower simulated rank; shadows do not hold it up
      if (o.network == sim::NetworkMode::kAnalytic)
        CHECK(s.end_ns() - s.start_ns() == ceil_ns(expected_s));
      else
        CHECK(duration_s(s) == Approx(expected_s).epsilon(0.01));
      CHECK(s.collective().ranks() == 8);
    }
    REQUIRE(res.ranks.size() == 2);
    CHECK(res.ranks[1].represents == 4);
    // Timed over all 8 ranks, not the 2 simulated ones.
    CHECK(expected_s > model.cost(cost::CollectiveOp::kAllToAll, std::vector<int>{0, 4}, S).time_s);
  }
}

TEST_CASE("memory timeline: the peak and its op, and an overflow reported, not thrown") {
  topo::Cluster c = dgx();
  constexpr int64_t GB = 1'000'000'000;
  Sched b;
  const int r = b.rank(0, 2 * GB, 10 * GB);
  b.op(r, "act1", 1 * us);
  b.last(r).set_alloc_bytes(3 * GB);
  b.op(r, "act2", 1 * us);
  b.last(r).set_alloc_bytes(3 * GB);  // 8 GB
  b.op(r, "bwd2", 1 * us);
  b.last(r).set_free_bytes(3 * GB);  // 5 GB
  b.op(r, "big", 1 * us);
  b.last(r).set_alloc_bytes(6 * GB);  // 11 GB: past the 10 GB
  b.last(r).set_free_bytes(6 * GB);
  b.op(r, "bigger", 1 * us);
  b.last(r).set_alloc_bytes(7 * GB);  // 12 GB: the peak, but not the first overflow
  b.last(r).set_free_bytes(7 * GB);
  const int r1 = b.rank(1, 1 * GB, 10 * GB);
  b.op(r1, "small", 1 * us);
  b.last(r1).set_alloc_bytes(1 * GB);

  sim::SimResult res = sim::simulate(b.s, c, analytic());
  REQUIRE(res.ranks.size() == 2);
  const sim::RankResult& r0 = res.ranks[0];
  CHECK(r0.peak_bytes == 12.0 * GB);
  CHECK(r0.peak_op == "bigger");
  CHECK_FALSE(r0.fits);
  CHECK(r0.overflow_op == "big");
  CHECK(r0.capacity_bytes == 10.0 * GB);
  CHECK(res.ranks[1].fits);
  CHECK(res.ranks[1].overflow_op.empty());
  CHECK(res.ranks[1].peak_bytes == 2.0 * GB);
  CHECK_FALSE(res.fits);
  CHECK(res.peak_rank == 0);
  CHECK(res.peak_memory_bytes == 12.0 * GB);
  REQUIRE(res.trace.peak_memory_size() == 2);
  CHECK(res.trace.peak_memory(0).rank() == 0);
  CHECK(res.trace.peak_memory(0).peak_bytes() == 12.0 * GB);
  CHECK(res.trace.peak_memory(1).device() == "node0.gpu1");

  SECTION("no capacity in the schedule: the device type's memory (H100: 80 GB)") {
    b.s.mutable_ranks(0)->set_capacity_bytes(0);
    sim::SimResult d = sim::simulate(b.s, c, analytic());
    CHECK(d.ranks[0].fits);
    CHECK(d.ranks[0].capacity_bytes == Approx(c.device_type(0).memory_bytes()));
  }
  SECTION("static bytes alone past the capacity") {
    b.s.mutable_ranks(1)->set_static_bytes(12 * GB);
    sim::SimResult d = sim::simulate(b.s, c, analytic());
    CHECK_FALSE(d.ranks[1].fits);
    CHECK(d.ranks[1].overflow_op == "static_bytes");
    CHECK(d.peak_rank == 1);  // least margin: 10 - 13 GB against rank 0's 10 - 12 GB
  }
}

TEST_CASE("breakdown: compute plus the gaps charged to what they waited for, summing to the end time") {
  topo::Cluster c = dgx();
  SECTION("an exposed all-to-all and the gradient all-reduce tail") {
    Sched b;
    const int a2a = b.collective(Collective::ALL_TO_ALL, {0, 1}, 64e6);
    const int ar = b.collective(Collective::ALL_REDUCE, {0, 1}, 256e6);
    for (int d : {0, 1}) {
      const int r = b.rank(d);
      const int g = b.op(r, "gate", d == 0 ? 10 * us : 30 * us);
      const int x = b.comm(r, "dispatch", a2a, trace::ALL_TO_ALL, {g});
      const int e = b.op(r, "experts", 50 * us, StreamId::compute(), {x});
      b.comm(r, "grads", ar, trace::ALL_REDUCE, {e}, StreamId::comm(1));
    }
    sim::SimResult res = sim::simulate(b.s, c, analytic());
    for (const sim::RankResult& rr : res.ranks) {
      INFO("rank " << rr.rank);
      CHECK(sum_of(rr.breakdown) == Approx(rr.end_s).epsilon(1e-12));
      CHECK(at(rr.breakdown, "other") == 0);
    }
    const double a2a_s = duration_s(span(res, 0, "dispatch"));
    const double ar_s = duration_s(span(res, 0, "grads"));
    // Rank 0 waited 20 us for rank 1's gate and then the transfer: all of it the all-to-all's.
    CHECK(at(res.ranks[0].breakdown, "compute") == Approx(60 * us));
    CHECK(at(res.ranks[0].breakdown, "all_to_all") == Approx(20 * us + a2a_s));
    CHECK(at(res.ranks[1].breakdown, "all_to_all") == Approx(a2a_s));
    CHECK(at(res.ranks[1].breakdown, "all_reduce") == Approx(ar_s));
    CHECK(res.breakdown == res.ranks[res.critical_rank].breakdown);
    CHECK(res.step_time_s == Approx(res.ranks[0].end_s));
  }
  SECTION("a pipeline receive: the bubble before the transfer, then p2p") {
    Sched b;
    const int p2p = b.collective(Collective::SEND_RECV, {0, 1}, 16e6);
    const int r0 = b.rank(0), r1 = b.rank(1);
    const int f = b.op(r0, "fwd", 100 * us);
    b.comm(r0, "send", p2p, trace::SEND, {f});
    const int rv = b.comm(r1, "recv", p2p, trace::RECV);
    b.op(r1, "fwd", 100 * us, StreamId::compute(), {rv});
    sim::SimResult res = sim::simulate(b.s, c, analytic());
    const double t_s = duration_s(span(res, 1, "recv"));
    CHECK(span(res, 1, "recv").start_ns() == 100'000);
    const auto& bd = res.ranks[1].breakdown;
    CHECK(at(bd, "pipeline_bubble") == Approx(100 * us));
    CHECK(at(bd, "p2p") == Approx(t_s));
    CHECK(at(bd, "compute") == Approx(100 * us));
    CHECK(sum_of(bd) == Approx(res.ranks[1].end_s).epsilon(1e-12));
    // Stage 0 ends with its send: the tail after its compute is the transfer.
    CHECK(at(res.ranks[0].breakdown, "p2p") == Approx(t_s));
    CHECK(res.critical_rank == 1);
  }
  SECTION("a prefetch on the copy stream that compute waits for is an offload stall") {
    Sched b;
    const int r = b.rank(0);
    const int copy = b.op(r, "prefetch", 50 * us, StreamId::copy(), {}, trace::MEMCPY);
    b.op(r, "attn", 20 * us);
    b.op(r, "experts", 10 * us, StreamId::compute(), {copy});
    sim::SimResult res = sim::simulate(b.s, c, analytic());
    CHECK(at(res.breakdown, "compute") == Approx(30 * us));
    CHECK(at(res.breakdown, "offload_stall") == Approx(30 * us));
    CHECK(sum_of(res.breakdown) == Approx(60 * us));
  }
}

TEST_CASE("a deadlock is reported with the stuck ops, not hung on") {
  topo::Cluster c = dgx();
  Sched b;
  const int x = b.collective(Collective::ALL_REDUCE, {0, 1}, 1e6);
  const int y = b.collective(Collective::ALL_REDUCE, {0, 1}, 1e6);
  const int r0 = b.rank(0), r1 = b.rank(1);
  b.op(r0, "compute", 1 * us);
  b.comm(r0, "first_x", x, trace::ALL_REDUCE);
  b.comm(r0, "then_y", y, trace::ALL_REDUCE);
  b.comm(r1, "first_y", y, trace::ALL_REDUCE);
  b.comm(r1, "then_x", x, trace::ALL_REDUCE);
  b.op(r1, "after", 1 * us, StreamId::compute(), {1});  // never runs either
  for (const sim::SimOptions& o : {analytic(), flows()}) {
    try {
      sim::simulate(b.s, c, o);
      FAIL("no deadlock reported");
    } catch (const std::runtime_error& e) {
      const std::string msg = e.what();
      INFO(msg);
      CHECK(msg.find("deadlock") != std::string::npos);
      CHECK(msg.find("rank 0 op 1 'first_x'") != std::string::npos);
      CHECK(msg.find("rank 1 op 0 'first_y'") != std::string::npos);
      CHECK(msg.find("rank 1 op 0 'first_y' waits in collective 2 (all_reduce over 2 ranks) for rank(s) 0") !=
            std::string::npos);
      CHECK(msg.find("5 ops on 2 ranks") != std::string::npos);
    }
  }
}

TEST_CASE("schedules that are not well-formed are refused up front, naming the rank and op") {
  topo::Cluster c = dgx();
  Sched b;
  const int coll = b.collective(Collective::ALL_REDUCE, {0, 1}, 1e6);
  const int r0 = b.rank(0), r1 = b.rank(1);
  b.op(r0, "a", 1 * us);
  b.op(r0, "b", 1 * us, StreamId::compute(), {0});
  b.comm(r0, "ar", coll, trace::ALL_REDUCE);
  b.comm(r1, "ar", coll, trace::ALL_REDUCE);
  REQUIRE_NOTHROW(sim::simulate(b.s, c, analytic()));

  auto refused = [&](const schedule::Schedule& s, const std::string& words) {
    INFO(words);
    try {
      sim::simulate(s, c, analytic());
      FAIL("accepted");
    } catch (const std::invalid_argument& e) {
      INFO(e.what());
      CHECK(std::string(e.what()).find(words) != std::string::npos);
    }
  };
  SECTION("a dep forward, or to itself") {
    b.s.mutable_ranks(0)->mutable_ops(0)->add_deps(1);
    refused(b.s, "rank 0 op 0 'a': dep 1 does not point to an earlier op");
    b.s.mutable_ranks(0)->mutable_ops(0)->set_deps(0, 0);
    refused(b.s, "rank 0 op 0 'a': dep 0");
  }
  SECTION("a collective index out of range") {
    b.s.mutable_ranks(1)->mutable_ops(0)->set_collective(2);
    refused(b.s, "rank 1 op 0 'ar': collective 2 is out of range");
  }
  SECTION("an op on a rank the collective does not list") {
    b.s.mutable_collectives(0)->set_ranks(1, 2);
    refused(b.s, "rank 1 op 0 'ar': names collective 1, which does not list rank 1");
  }
  SECTION("a listed simulated rank without an op for it") {
    b.s.mutable_ranks(1)->mutable_ops(0)->set_collective(0);
    refused(b.s, "simulated rank 1 is listed but has no op");
  }
  SECTION("two ops of one rank in one collective") {
    b.comm(r1, "ar2", coll, trace::ALL_REDUCE);
    refused(b.s, "rank 1 op 1 'ar2': rank 1 has two ops in collective 1");
  }
  SECTION("ranks outside the cluster or listed twice") {
    b.s.mutable_ranks(1)->set_rank(8);
    refused(b.s, "rank 8 is outside cluster 'dgx-h100'");
    b.s.mutable_ranks(1)->set_rank(0);
    refused(b.s, "rank 0 is listed twice");
  }
  SECTION("a collective listing a rank twice, or outside the cluster, or an unknown algorithm") {
    b.s.mutable_collectives(0)->add_ranks(0);
    refused(b.s, "collective 1: rank 0 is listed twice");
    b.s.mutable_collectives(0)->set_ranks(2, 9);
    refused(b.s, "collective 1: rank 9 is outside");
    b.s.mutable_collectives(0)->mutable_ranks()->RemoveLast();
    b.s.mutable_collectives(0)->set_algorithm("bogus");
    refused(b.s, "collective 1:");
  }
  SECTION("a bad duration or size") {
    b.s.mutable_ranks(0)->mutable_ops(1)->set_duration_s(-1);
    refused(b.s, "rank 0 op 1 'b': duration_s");
    b.s.mutable_ranks(0)->mutable_ops(1)->set_duration_s(NAN);
    refused(b.s, "rank 0 op 1 'b': duration_s");
    b.s.mutable_ranks(0)->mutable_ops(1)->set_duration_s(1e-6);
    b.s.mutable_collectives(0)->set_bytes(0);
    refused(b.s, "collective 1: bytes 0");
    b.s.mutable_collectives(0)->set_bytes(1e6);
    b.s.mutable_collectives(0)->set_transfer_factor(-1);
    refused(b.s, "collective 1: transfer_factor -1");
    b.s.mutable_collectives(0)->set_transfer_factor(NAN);
    refused(b.s, "collective 1: transfer_factor nan");
  }
  SECTION("an all-to-all-v whose matrix is missing or the wrong size") {
    b.s.mutable_collectives(0)->set_op(Collective::ALL_TO_ALL_V);
    b.s.mutable_collectives(0)->set_matrix(1);
    refused(b.s, "matrix 1 is out of range");
    b.matrix({{0, 1, 2}, {3, 4, 5}, {6, 7, 8}});
    refused(b.s, "matrix 1 is 3 x 3");
  }
}

namespace {

// A random well-formed schedule: 8 ranks, collectives over random subsets issued by every member
// in one global order (so it cannot deadlock), compute and copy ops between them on random
// streams with random deps on earlier ops.
schedule::Schedule random_schedule(uint32_t seed) {
  std::mt19937 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  Sched b(fmt::format("random{}", seed));
  const int n = 8;
  for (int d = 0; d < n; ++d) b.rank(d);
  const Collective::Op ops[] = {Collective::ALL_REDUCE, Collective::ALL_GATHER, Collective::REDUCE_SCATTER,
                                Collective::ALL_TO_ALL, Collective::SEND_RECV, Collective::BROADCAST};
  const trace::OpKind kinds[] = {trace::ALL_REDUCE, trace::ALL_GATHER, trace::REDUCE_SCATTER,
                                 trace::ALL_TO_ALL, trace::SEND, trace::OTHER};
  auto filler = [&](int r) {
    for (int k = uniform(0, 2); k > 0; --k) {
      const int have = b.s.ranks(r).ops_size();
      std::vector<int> deps;
      if (have > 0 && uniform(0, 1)) deps.push_back(uniform(0, have - 1));
      const int which = uniform(0, 2);
      const StreamId stream = which == 2 ? StreamId::copy() : StreamId::compute(which);
      const double whole_us = uniform(0, 40);
      const double extra_ns = uniform(0, 999);  // drawn in sequence: same seed, same schedule
      b.op(r, fmt::format("op{}", have), whole_us * us + extra_ns * 1e-9, stream, deps);
    }
  };
  for (int c = 0; c < 24; ++c) {
    const int pick = uniform(0, 5);
    std::vector<int> members;
    for (int d = 0; d < n; ++d)
      if (uniform(0, 1)) members.push_back(d);
    if (ops[pick] == Collective::SEND_RECV) members.resize(std::min<size_t>(members.size(), 2));
    if (members.size() < 2) continue;
    const int coll = b.collective(ops[pick], members, uniform(1, 64) * 1e6);
    for (int d : members) {
      filler(d);
      const int have = b.s.ranks(d).ops_size();
      std::vector<int> deps;
      if (have > 0) deps.push_back(uniform(0, have - 1));
      b.comm(d, fmt::format("c{}", coll), coll, kinds[pick], deps, StreamId::comm(uniform(0, 1)));
    }
  }
  for (int d = 0; d < n; ++d) filler(d);
  return b.s;
}

}  // namespace

TEST_CASE("random schedules: every op starts once its predecessors end, collectives start with the last participant") {
  topo::Cluster c = dgx();
  cost::CollectiveModel model(c);
  for (uint32_t seed = 1; seed <= 20; ++seed) {
    const schedule::Schedule s = random_schedule(seed);
    for (const sim::SimOptions& o : {analytic(), flows()}) {
      INFO("seed " << seed << (o.network == sim::NetworkMode::kFlows ? " flows" : " analytic"));
      sim::SimResult res = sim::simulate(s, c, o);
      // Spans by (rank, op index): op ids are "op<i>" and "c<k>", unique per rank.
      std::map<std::pair<int, std::string>, const trace::Span*> by;
      for (const trace::Span& sp : res.trace.spans()) by[{sp.rank(), sp.op_id()}] = &sp;
      REQUIRE(by.size() == static_cast<size_t>(res.trace.spans_size()));
      std::map<int, int64_t> coll_start, coll_end, coll_ready;
      for (const schedule::RankSchedule& rs : s.ranks()) {
        std::map<std::pair<int, int>, int> last_on_stream;
        for (int i = 0; i < rs.ops_size(); ++i) {
          const schedule::Op& op = rs.ops(i);
          const trace::Span& sp = *by.at({rs.rank(), op.id()});
          int64_t ready = 0;
          auto after = [&](int j) { ready = std::max(ready, by.at({rs.rank(), rs.ops(j).id()})->end_ns()); };
          for (int d : op.deps()) after(d);
          const std::pair<int, int> stream{op.stream().kind(), op.stream().index()};
          if (auto it = last_on_stream.find(stream); it != last_on_stream.end()) after(it->second);
          last_on_stream[stream] = i;
          CHECK(sp.start_ns() >= ready);
          if (op.collective() == 0) {
            CHECK(sp.start_ns() == ready);
            CHECK(sp.end_ns() - sp.start_ns() == ceil_ns(op.duration_s()));
          } else {
            const int k = op.collective();
            coll_ready[k] = std::max(coll_ready[k], ready);
            if (coll_start.count(k)) {
              CHECK(coll_start[k] == sp.start_ns());
              CHECK(coll_end[k] == sp.end_ns());
            }
            coll_start[k] = sp.start_ns();
            coll_end[k] = sp.end_ns();
          }
        }
      }
      for (const auto& [k, start] : coll_start) {
        CHECK(start == coll_ready[k]);
        if (o.network == sim::NetworkMode::kAnalytic) {
          const Collective& col = s.collectives(k - 1);
          const std::vector<int> ranks(col.ranks().begin(), col.ranks().end());
          const cost::CollectiveOp op = col.op() == Collective::ALL_REDUCE      ? cost::CollectiveOp::kAllReduce
                                        : col.op() == Collective::ALL_GATHER     ? cost::CollectiveOp::kAllGather
                                        : col.op() == Collective::REDUCE_SCATTER ? cost::CollectiveOp::kReduceScatter
                                        : col.op() == Collective::ALL_TO_ALL     ? cost::CollectiveOp::kAllToAll
                                        : col.op() == Collective::SEND_RECV      ? cost::CollectiveOp::kSendRecv
                                                                                 : cost::CollectiveOp::kBroadcast;
          CHECK(coll_end[k] - start == ceil_ns(model.cost(op, ranks, col.bytes()).time_s));
        }
      }
      CHECK(res.collectives_run == static_cast<int64_t>(coll_start.size()));
      for (const sim::RankResult& rr : res.ranks) CHECK(sum_of(rr.breakdown) == Approx(rr.end_s).epsilon(1e-12));
    }
  }
}

namespace {

// A synthetic MoE-like step: `ranks` ranks in expert-parallel groups of 4, `iters` (layer,
// micro-batch) iterations of gate -> dispatch a2a-v -> experts -> combine a2a-v (transposed), and a
// data-parallel all-reduce of gradients on a second comm stream every 16 iterations. Expert
// times vary per rank (stragglers), matrices cycle over 16.
schedule::Schedule synthetic(int ranks, int iters) {
  Sched b("synthetic");
  const int ep = 4;
  std::vector<int> mats;
  for (int k = 0; k < 16; ++k) {
    std::vector<std::vector<double>> m(ep, std::vector<double>(ep));
    for (int i = 0; i < ep; ++i)
      for (int j = 0; j < ep; ++j) m[i][j] = 1e6 * (1 + (i * 7 + j * 3 + k) % 5);
    mats.push_back(b.matrix(m));
  }
  std::vector<int> rank_index;
  for (int d = 0; d < ranks; ++d) rank_index.push_back(b.rank(d, 1 << 30, 0));
  for (int it = 0; it < iters; ++it) {
    std::vector<int> dispatch(ranks / ep), combine(ranks / ep);
    for (int g = 0; g < ranks / ep; ++g) {
      std::vector<int> members;
      for (int j = 0; j < ep; ++j) members.push_back(g * ep + j);
      for (int t = 0; t < 2; ++t) {
        Collective* v = b.s.add_collectives();
        v->set_op(Collective::ALL_TO_ALL_V);
        for (int d : members) v->add_ranks(d);
        v->set_matrix(mats[it % 16]);
        v->set_transpose(t == 1);
        (t == 0 ? dispatch : combine)[g] = b.s.collectives_size();
      }
    }
    int allreduce0 = 0;
    if (it % 16 == 15) {
      for (int j = 0; j < ep; ++j) {
        std::vector<int> members;
        for (int g = 0; g < ranks / ep; ++g) members.push_back(g * ep + j);
        const int c = b.collective(Collective::ALL_REDUCE, members, 64e6);
        if (j == 0) allreduce0 = c;
      }
    }
    for (int d = 0; d < ranks; ++d) {
      const int r = rank_index[d];
      const int gate = b.op(r, "gate", 20 * us);
      const int x = b.comm(r, "dispatch", dispatch[d / ep], trace::ALL_TO_ALL, {gate});
      const int e = b.op(r, "experts", (40 + (d * 13 + it * 7) % 17) * us, StreamId::compute(), {x});
      b.last(r).set_alloc_bytes(1 << 20);
      b.comm(r, "combine", combine[d / ep], trace::ALL_TO_ALL, {e});
      b.last(r).set_free_bytes(1 << 20);
      if (allreduce0) b.comm(r, "grads", allreduce0 + d % ep, trace::ALL_REDUCE, {e}, StreamId::comm(1));
    }
  }
  return b.s;
}

}  // namespace

TEST_CASE("a larger synthetic step: every op runs once, events counted, progress reported") {
  topo::Cluster c = test::small_cluster(4, "single_switch { }", test::SmallNode{.devices = 8, .nics = 8});
  const schedule::Schedule s = synthetic(32, 64);
  int64_t ops = 0;
  for (const auto& r : s.ranks()) ops += r.ops_size();
  std::vector<double> progress;
  sim::SimOptions o = analytic();
  o.progress = [&](double f) { progress.push_back(f); };
  sim::SimResult res = sim::simulate(s, c, o);
  CHECK(res.trace.spans_size() == ops);
  CHECK(res.collectives_run == s.collectives_size());
  // One end event per compute op, one per collective.
  CHECK(res.events == 32 * 64 * 2 + s.collectives_size());
  REQUIRE_FALSE(progress.empty());
  CHECK(progress.back() == 1.0);
  CHECK(std::is_sorted(progress.begin(), progress.end()));
  for (const sim::RankResult& rr : res.ranks) CHECK(sum_of(rr.breakdown) == Approx(rr.end_s).epsilon(1e-12));
  CHECK(res.ranks[0].peak_bytes == (1 << 30) + (1 << 20));
  // As flows, contention can only slow the step down (give or take the solver's rounding).
  sim::SimResult f = sim::simulate(synthetic(8, 8), c, flows());
  sim::SimResult a = sim::simulate(synthetic(8, 8), c, analytic());
  CHECK(f.step_time_s >= 0.99 * a.step_time_s);
  CHECK(f.step_time_s <= 1.5 * a.step_time_s);
}

// Timing, not a test (run with "[.bench]"): ~200k ops and ~26k collectives in kAnalytic mode.
TEST_CASE("engine speed on a synthetic step of 200k ops", "[.bench]") {
  topo::Cluster c = test::small_cluster(4, "single_switch { }", test::SmallNode{.devices = 8, .nics = 8});
  const schedule::Schedule s = synthetic(32, 1600);
  int64_t ops = 0;
  for (const auto& r : s.ranks()) ops += r.ops_size();
  for (bool record : {false, true}) {
    sim::SimOptions o = analytic();
    o.record_trace = record;
    const auto t0 = std::chrono::steady_clock::now();
    sim::SimResult res = sim::simulate(s, c, o);
    const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print("{} ops, {} collectives, {} events, trace {}: {:.3f} s ({:.2f} M events/s, {:.2f} M ops/s); "
               "step {:.3f} ms\n",
               ops, s.collectives_size(), res.events, record ? "on" : "off", wall_s, res.events / wall_s / 1e6,
               ops / wall_s / 1e6, res.step_time_s * 1e3);
    CHECK(res.trace.spans_size() == (record ? ops : 0));
  }
  const schedule::Schedule small = synthetic(32, 200);
  for (sim::NetworkMode mode : {sim::NetworkMode::kAnalytic, sim::NetworkMode::kFlows}) {
    sim::SimOptions o;
    o.network = mode;
    o.record_trace = false;
    sim::SimResult res = sim::simulate(small, c, o);
    fmt::print("{} collectives, {}: {:.3f} s, {} events; step {:.3f} ms\n", small.collectives_size(),
               mode == sim::NetworkMode::kFlows ? "flows" : "analytic", res.sim_wall_s, res.events,
               res.step_time_s * 1e3);
  }
}
