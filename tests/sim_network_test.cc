// The flow network (max-min fair rates by water-filling) against hand-solved cases, and the
// collectives' flow decompositions against the analytic cost model they mirror.
#include "sim/flows.h"
#include "sim/network.h"

#include "test_clusters.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

using namespace moesim;
using cost::CollectiveAlgo;
using cost::CollectiveOp;

namespace {

constexpr double o = cost::kDefaultStepOverhead_s;

topo::Cluster load(const char* name) {
  return topo::load_cluster(fmt::format("{}/configs/hardware/{}.textproto", MOESIM_SOURCE_DIR, name));
}

// Devices g0..g{n-1}, the given switches and links (`a b bandwidth` per entry, 1 us each).
topo::Cluster graph(int devices, const std::vector<std::string>& switches, const std::vector<std::string>& links) {
  std::string text = "name: \"g\"\ngraph {\n";
  for (int d = 0; d < devices; ++d)
    text += fmt::format("  vertex {{ name: \"g{}\" kind: DEVICE device_type: \"h100-sxm5\" }}\n", d);
  for (const std::string& s : switches) text += fmt::format("  vertex {{ name: \"{}\" kind: SWITCH }}\n", s);
  for (const std::string& l : links) {
    char a[32], b[32];
    double bw;
    REQUIRE(std::sscanf(l.c_str(), "%31s %31s %lf", a, b, &bw) == 3);
    text += fmt::format("  link {{ a: \"{}\" b: \"{}\" bandwidth_Bps: {} latency_s: 1e-6 }}\n", a, b, bw);
  }
  return topo::load_cluster_text(text + "}\n", "graph.textproto");
}

topo::Cluster nodes_of(int nodes, int devices, int nics) {
  test::SmallNode n;
  n.devices = devices;
  n.nics = nics;
  return test::small_cluster(nodes, "single_switch { }", n);
}

// Runs the network until no flow is left; end time by flow id.
std::map<int64_t, double> run_to_end(sim::FlowNetwork& net) {
  std::map<int64_t, double> end;
  for (double t = net.next_completion_s(); std::isfinite(t); t = net.next_completion_s()) {
    net.advance(t);
    for (const sim::FinishedFlow& f : net.take_finished()) end[f.id] = f.end_s;
  }
  return end;
}

// Several collectives started together on one network, each phase's delay then its flows, the
// next phase when they have all finished. Returns each collective's end time.
std::vector<double> run_together(const topo::Cluster& c, const std::vector<std::vector<sim::Phase>>& collectives) {
  struct Run {
    size_t phase = 0;
    int rep = 0;
    int pending = 0;
    bool started = false;
    double ready_s = 0;
    double end_s = -1;
  };
  sim::FlowNetwork net(c);
  std::vector<Run> runs(collectives.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    REQUIRE_FALSE(collectives[i].empty());
    runs[i].ready_s = collectives[i][0].delay_s;
  }
  for (;;) {
    double t = net.next_completion_s();
    for (const Run& r : runs)
      if (r.end_s < 0 && !r.started) t = std::min(t, r.ready_s);
    if (!std::isfinite(t)) break;
    net.advance(t);
    for (size_t i = 0; i < runs.size(); ++i) {
      Run& r = runs[i];
      if (r.end_s >= 0 || r.started || r.ready_s > t) continue;
      r.started = true;
      for (const sim::FlowSpec& f : collectives[i][r.phase].flows) net.add_flow(f.src, f.dst, f.bytes, i);
      r.pending = static_cast<int>(collectives[i][r.phase].flows.size());
    }
    for (const sim::FinishedFlow& f : net.take_finished()) {
      Run& r = runs[f.tag];
      if (--r.pending > 0) continue;
      const std::vector<sim::Phase>& phases = collectives[f.tag];
      r.started = false;
      if (++r.rep >= phases[r.phase].repeat) {
        r.rep = 0;
        if (++r.phase == phases.size()) {
          r.end_s = net.now();
          continue;
        }
      }
      r.ready_s = net.now() + phases[r.phase].delay_s;
    }
  }
  std::vector<double> out;
  for (const Run& r : runs) out.push_back(r.end_s);
  return out;
}

double total_bytes(const std::vector<sim::Phase>& phases) {
  double sum = 0;
  for (const sim::Phase& p : phases)
    for (const sim::FlowSpec& f : p.flows) sum += p.repeat * f.bytes;
  return sum;
}

bool all_flows_are(const sim::Phase& p, double bytes) {
  for (const sim::FlowSpec& f : p.flows)
    if (f.bytes != Approx(bytes)) return false;
  return true;
}

std::vector<std::vector<double>> filled(int n, double v) {
  return std::vector<std::vector<double>>(n, std::vector<double>(n, v));
}

// An uneven matrix: rank i sends (1 + (i + 2j) mod 5) MB to j, a few pairs nothing.
std::vector<std::vector<double>> uneven(int n) {
  std::vector<std::vector<double>> b(n, std::vector<double>(n));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) b[i][j] = (i * 7 + j * 3) % 11 == 0 ? 0 : (1 + (i + 2 * j) % 5) * 1e6;
  return b;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// The solver

TEST_CASE("two flows into one link get half of it each, and finish together") {
  // g0, g1, g2 on one switch, 10 GB/s links: g0 -> g2 and g1 -> g2 share s -> g2.
  topo::Cluster c = graph(3, {"s"}, {"g0 s 10e9", "g1 s 10e9", "g2 s 10e9"});
  sim::FlowNetwork net(c);
  const int64_t a = net.add_flow(0, 2, 1e9, 7);
  const int64_t b = net.add_flow(1, 2, 1e9, 8);
  CHECK(net.active_flows() == 2);
  CHECK(net.rate(a) == Approx(5e9));
  CHECK(net.rate(b) == Approx(5e9));
  CHECK(net.next_completion_s() == Approx(0.2));
  net.advance(0.2);
  const std::vector<sim::FinishedFlow> done = net.take_finished();
  REQUIRE(done.size() == 2);
  CHECK(done[0].id == a);
  CHECK(done[0].tag == 7);
  CHECK(done[1].tag == 8);
  CHECK(done[1].end_s == Approx(0.2));
  CHECK(net.active_flows() == 0);
  CHECK(net.next_completion_s() == std::numeric_limits<double>::infinity());
  // A flow the other way is alone on its links.
  const int64_t back = net.add_flow(2, 0, 1e9, 0);
  CHECK(net.rate(back) == Approx(10e9));
}

TEST_CASE("the classic three-flow example, and freed bandwidth speeding up the others") {
  // s1 -L1(10 GB/s)-> s2 -L2(4 GB/s)-> s3, access links of 100 GB/s.
  //   A: g0 (on s1) -> g3 (on s3) crosses L1 and L2; B: g1 (on s1) -> g4 (on s2) crosses L1;
  //   C: g2 (on s2) -> g5 (on s3) crosses L2.
  // L2 saturates first (4 / 2 flows = 2 < 10 / 2): A = C = 2 GB/s; then L1 leaves B 10 - 2 = 8.
  topo::Cluster c = graph(6, {"s1", "s2", "s3"},
                          {"g0 s1 100e9", "g1 s1 100e9", "g2 s2 100e9", "g3 s3 100e9", "g4 s2 100e9", "g5 s3 100e9",
                           "s1 s2 10e9", "s2 s3 4e9"});
  sim::FlowNetwork net(c);
  const int64_t a = net.add_flow(0, 3, 1e9, 0);
  const int64_t b = net.add_flow(1, 4, 8e9, 0);
  const int64_t cc = net.add_flow(2, 5, 4e9, 0);
  CHECK(net.rate(a) == Approx(2e9));
  CHECK(net.rate(b) == Approx(8e9));
  CHECK(net.rate(cc) == Approx(2e9));
  // A ends at 1e9 / 2e9 = 0.5 s. B has 8e9 - 4e9 = 4e9 left and gets all of L1: 0.5 + 0.4 = 0.9 s.
  // C has 4e9 - 1e9 = 3e9 left and gets all of L2: 0.5 + 0.75 = 1.25 s.
  CHECK(net.next_completion_s() == Approx(0.5));
  net.advance(0.5);
  CHECK(net.rate(b) == Approx(10e9));
  CHECK(net.rate(cc) == Approx(4e9));
  CHECK(net.rate(a) == 0);  // finished
  const int64_t recomputed = net.recomputations();
  std::map<int64_t, double> end = run_to_end(net);
  CHECK(end.at(a) == Approx(0.5));
  CHECK(end.at(b) == Approx(0.9));
  CHECK(end.at(cc) == Approx(1.25));
  CHECK(net.recomputations() == recomputed + 2);  // after B ends and when C ends (empty)

  SECTION("advancing past completions steps through them exactly") {
    sim::FlowNetwork again(c);
    again.add_flow(0, 3, 1e9, 0);
    again.add_flow(1, 4, 8e9, 0);
    again.add_flow(2, 5, 4e9, 0);
    again.advance(2.0);
    CHECK(again.now() == 2.0);
    std::vector<sim::FinishedFlow> done = again.take_finished();
    REQUIRE(done.size() == 3);
    CHECK(done[0].end_s == Approx(0.5));
    CHECK(done[1].end_s == Approx(0.9));
    CHECK(done[2].end_s == Approx(1.25));
  }
  SECTION("links keep the bytes and busy time they carried") {
    // L1 carried A + B = 9 GB over 0.9 s; the access links into s1 and out of s2 carried B's 8 GB.
    std::vector<sim::LinkUse> top = net.busiest_links(3, 1.25);
    REQUIRE(top.size() == 3);
    CHECK(top[0].from == "s1");
    CHECK(top[0].to == "s2");
    CHECK(top[0].bytes == Approx(9e9));
    CHECK(top[0].busy_s == Approx(0.9));
    CHECK(top[0].capacity_Bps == Approx(10e9));
    CHECK(top[0].utilisation == Approx(9e9 / (10e9 * 1.25)));
    CHECK(top[1].bytes == Approx(8e9));
    CHECK(top[2].bytes == Approx(8e9));
    // Every link that carried anything: 3 access links in, 3 out, L1, L2.
    std::vector<sim::LinkUse> all = net.busiest_links(100, 1.25);
    CHECK(all.size() == 8);
    CHECK(all.back().bytes == Approx(1e9));  // A's links at the ends
  }
}

TEST_CASE("a flow finishing mid-way: completion times worked out by hand") {
  // Three flows into g3 over s -> g3 (12 GB/s): 1, 2 and 3 GB. Each gets 4 GB/s; the 1 GB flow
  // ends at 0.25 s, then two share 6 GB/s: the 2 GB flow (1 GB left) ends at 0.25 + 1/6 s; the
  // last one (3 - 1 - 1 = 1 GB left at that point) gets 12 GB/s: 1/12 s more.
  topo::Cluster c = graph(4, {"s"}, {"g0 s 100e9", "g1 s 100e9", "g2 s 100e9", "g3 s 12e9"});
  sim::FlowNetwork net(c);
  const int64_t f1 = net.add_flow(0, 3, 1e9, 0);
  const int64_t f2 = net.add_flow(1, 3, 2e9, 0);
  const int64_t f3 = net.add_flow(2, 3, 3e9, 0);
  std::map<int64_t, double> end = run_to_end(net);
  CHECK(end.at(f1) == Approx(0.25));
  CHECK(end.at(f2) == Approx(0.25 + 1.0 / 6));
  CHECK(end.at(f3) == Approx(0.25 + 1.0 / 6 + 1.0 / 12));
  // A flow started later joins at the time of the last advance.
  sim::FlowNetwork later(c);
  later.advance(1.0);
  const int64_t x = later.add_flow(0, 3, 12e9, 0);
  CHECK(run_to_end(later).at(x) == Approx(2.0));
}

TEST_CASE("self flows and empty flows finish at once") {
  topo::Cluster c = graph(2, {"s"}, {"g0 s 10e9", "g1 s 10e9"});
  sim::FlowNetwork net(c);
  net.advance(0.5);
  const int64_t self = net.add_flow(1, 1, 1e9, 3);
  const int64_t empty = net.add_flow(0, 1, 0, 4);
  CHECK(net.active_flows() == 0);
  CHECK(net.next_completion_s() == 0.5);
  std::vector<sim::FinishedFlow> done = net.take_finished();
  REQUIRE(done.size() == 2);
  CHECK(done[0].id == self);
  CHECK(done[0].start_s == 0.5);
  CHECK(done[0].end_s == 0.5);
  CHECK(done[1].id == empty);
  CHECK(net.next_completion_s() == std::numeric_limits<double>::infinity());
}

TEST_CASE("ECMP spreads a flow over parallel paths") {
  SECTION("a fat-tree leaf-to-leaf flow is not limited by one spine uplink") {
    // 4 nodes of 1 device and 1 NIC of 10 GB/s, 2 NICs per leaf, 2 spines, 2:1 oversubscribed:
    // each leaf-spine link is 2 x 10 / (2 x 2) = 5 GB/s. Device 0 (leaf 0) -> device 2 (leaf 1)
    // has two equal-cost paths; half the flow on each reaches the NIC's 10 GB/s.
    test::SmallNode n;
    n.devices = 1;
    n.nics = 1;
    topo::Cluster c = test::small_cluster(4, "fat_tree { nics_per_leaf: 2 spines: 2 oversubscription: 2 }", n);
    sim::FlowNetwork net(c);
    const int64_t f = net.add_flow(0, 2, 1e9, 0);
    CHECK(net.rate(f) == Approx(10e9));
    // With one path only, the single uplink is the bottleneck.
    sim::FlowNetwork one_path(c, 1);
    CHECK(one_path.rate(one_path.add_flow(0, 2, 1e9, 0)) == Approx(5e9));
    // Two flows leaving leaf 0 (devices 0 and 1 to 2 and 3) share both uplinks: 2 x 5 GB/s / 2.
    const int64_t g = net.add_flow(1, 3, 1e9, 0);
    CHECK(net.rate(f) == Approx(5e9));
    CHECK(net.rate(g) == Approx(5e9));
    // Both uplinks of leaf 0 carry bytes, evenly.
    run_to_end(net);
    int uplinks = 0;
    for (const sim::LinkUse& u : net.busiest_links(100, net.now()))
      if (u.from == "leaf0" && u.to.rfind("spine", 0) == 0) {
        ++uplinks;
        CHECK(u.bytes == Approx(1e9));
      }
    CHECK(uplinks == 2);
  }
  SECTION("parallel edges of equal cost share the flow; a slower parallel edge is not used") {
    // Two 10 GB/s links g0 - s: 20 GB/s out of g0. Between s and g1, a 40 GB/s link and a slower
    // 5 GB/s one (dearer, so no route uses it).
    topo::Cluster c = graph(2, {"s"}, {"g0 s 10e9", "g0 s 10e9", "s g1 40e9", "s g1 5e9"});
    sim::FlowNetwork net(c);
    const int64_t f = net.add_flow(0, 1, 2e9, 0);
    CHECK(net.rate(f) == Approx(20e9));
    run_to_end(net);
    std::vector<sim::LinkUse> used = net.busiest_links(100, net.now());
    REQUIRE(used.size() == 3);
    CHECK(used[0].capacity_Bps == Approx(40e9));
    CHECK(used[0].bytes == Approx(2e9));
    CHECK(used[1].bytes == Approx(1e9));
    CHECK(used[2].bytes == Approx(1e9));
  }
}

TEST_CASE("thousands of flows: a 64-rank all-to-all-v on h100-64 finishes with every byte delivered") {
  topo::Cluster c = load("h100-64");
  sim::FlowNetwork net(c);
  double sent = 0;
  int flows = 0;
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < 64; ++j) {
      if (i == j) continue;
      const double bytes = (1 + (i * 13 + j * 7) % 17) * 1e5;
      net.add_flow(i, j, bytes, 0);
      sent += bytes;
      ++flows;
    }
  CHECK(flows == 4032);
  std::map<int64_t, double> end = run_to_end(net);
  CHECK(end.size() == 4032);
  // Each rank's bytes leave through its NVSwitch port or its PCIe link to the NIC; no link
  // carries more than its capacity over the run.
  double crossed = 0;
  for (const sim::LinkUse& u : net.busiest_links(1 << 20, net.now())) {
    CHECK(u.utilisation <= 1 + 1e-9);
    if (u.from.find(".gpu") != std::string::npos) crossed += u.bytes;  // out of a device
  }
  CHECK(crossed == Approx(sent));
  CHECK(net.recomputations() <= flows);
}

// ------------------------------------------------------------------------------------------------
// Decompositions

TEST_CASE("each collective's phases, flows and bytes on small clusters") {
  topo::Cluster c = nodes_of(2, 2, 2);  // ranks 0, 1 on node 0; 2, 3 on node 1
  cost::CollectiveModel m(c);
  const std::vector<int> ranks = cost::first_ranks(4);
  const double S = 64e6;
  // The same cluster with a collective library's `efficiency` line (hardware.proto).
  auto with_library = [](const std::string& efficiency) {
    return topo::load_cluster_text(test::cluster_text(2, "single_switch { }", {.devices = 2, .nics = 2}) + efficiency,
                                   "library.textproto");
  };
  // Latencies of test::SmallNode: 1 us over scale-up, 2.4 us between nodes.
  const double a_up = o + 1e-6, a_net = o + 4 * 100e-9 + 2e-6;

  SECTION("ring all-reduce: one phase of 4 ring flows of S/4, repeated 2(n-1) = 6 times") {
    std::vector<sim::Phase> p = sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S);
    REQUIRE(p.size() == 1);
    CHECK(p[0].repeat == 6);
    REQUIRE(p[0].flows.size() == 4);
    CHECK(all_flows_are(p[0], S / 4));
    CHECK(p[0].flows[3].src == 3);
    CHECK(p[0].flows[3].dst == 0);
    CHECK(p[0].delay_s == Approx(a_net));  // the ring crosses nodes at 1 -> 2 and 3 -> 0
    CHECK(total_bytes(p) == Approx(6 * S));
  }
  SECTION("a library at half the links' rate for all-reduce moves twice the bytes, the all-to-all unchanged") {
    const topo::Cluster slow = with_library("collective_efficiency { op: \"all_reduce\" bandwidth_efficiency: 0.5 }\n");
    cost::CollectiveModel half(slow);
    CHECK(total_bytes(sim::decompose(half, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S)) ==
          Approx(12 * S));
    CHECK(total_bytes(sim::decompose(half, CollectiveOp::kAllToAll, CollectiveAlgo::kDirect, ranks, S)) ==
          Approx(total_bytes(sim::decompose(m, CollectiveOp::kAllToAll, CollectiveAlgo::kDirect, ranks, S))));
  }
  SECTION("a library's fixed time per all-gather: a phase of no flows first, once; other collectives none") {
    const topo::Cluster fixed =
        with_library("collective_efficiency { op: \"all_gather\" bandwidth_efficiency: 1 latency_s: 1e-5 }\n");
    cost::CollectiveModel lib(fixed);
    const std::vector<sim::Phase> p = sim::decompose(lib, CollectiveOp::kAllGather, CollectiveAlgo::kRing, ranks, S);
    const std::vector<sim::Phase> q = sim::decompose(m, CollectiveOp::kAllGather, CollectiveAlgo::kRing, ranks, S);
    REQUIRE(p.size() == q.size() + 1);
    CHECK(p[0].delay_s == 1e-5);
    CHECK(p[0].repeat == 1);
    CHECK(p[0].flows.empty());
    CHECK(total_bytes(p) == Approx(total_bytes(q)));
    CHECK(sim::idle_time_s(fixed, p) == Approx(sim::idle_time_s(c, q) + 1e-5));
    CHECK(sim::decompose(lib, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S).size() == 1);
  }
  SECTION("tree all-reduce: one phase, 2 floor(log2 4) = 4 tree alphas, ring flows of 2(n-1)S/n") {
    std::vector<sim::Phase> p = sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kTree, ranks, S);
    REQUIRE(p.size() == 1);
    CHECK(p[0].repeat == 1);
    CHECK(p[0].flows.size() == 4);
    CHECK(all_flows_are(p[0], 2.0 * 3 / 4 * S));
    CHECK(p[0].delay_s == Approx(4 * a_net));
  }
  SECTION("all-gather and reduce-scatter: n-1 = 3 repeats of S/4") {
    for (CollectiveOp op : {CollectiveOp::kAllGather, CollectiveOp::kReduceScatter}) {
      std::vector<sim::Phase> p = sim::decompose(m, op, CollectiveAlgo::kRing, ranks, S);
      REQUIRE(p.size() == 1);
      CHECK(p[0].repeat == 3);
      CHECK(p[0].flows.size() == 4);
      CHECK(all_flows_are(p[0], S / 4));
    }
  }
  SECTION("direct all-to-all: 12 flows of S/4 at once after n-1 = 3 alphas") {
    std::vector<sim::Phase> p = sim::decompose(m, CollectiveOp::kAllToAll, CollectiveAlgo::kDirect, ranks, S);
    REQUIRE(p.size() == 1);
    CHECK(p[0].flows.size() == 12);
    CHECK(all_flows_are(p[0], S / 4));
    CHECK(p[0].delay_s == Approx(3 * a_net));
  }
  SECTION("hierarchical all-to-all: within nodes (S/g to the local peer), then across (S/m)") {
    std::vector<sim::Phase> p = sim::decompose(m, CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, ranks, S);
    REQUIRE(p.size() == 2);
    REQUIRE(p[0].flows.size() == 4);
    for (const sim::FlowSpec& f : p[0].flows) CHECK(c.device(f.src).node == c.device(f.dst).node);
    CHECK(all_flows_are(p[0], S / 2));
    CHECK(p[0].delay_s == Approx(1 * a_up));
    REQUIRE(p[1].flows.size() == 4);
    for (const sim::FlowSpec& f : p[1].flows) {
      CHECK(c.device(f.src).node != c.device(f.dst).node);
      CHECK(c.device(f.src).local_index == c.device(f.dst).local_index);
    }
    CHECK(all_flows_are(p[1], S / 2));
    CHECK(p[1].delay_s == Approx(1 * a_net));
  }
  SECTION("hierarchical all-to-all on 4 nodes of 2: (g-1) = 1 and (m-1) = 3 alphas") {
    topo::Cluster c4 = nodes_of(4, 2, 2);
    cost::CollectiveModel m4(c4);
    std::vector<sim::Phase> p =
        sim::decompose(m4, CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, cost::first_ranks(8), S);
    REQUIRE(p.size() == 2);
    CHECK(p[0].flows.size() == 8);   // each rank to its 1 local peer: m chunks of S/n = S/2
    CHECK(all_flows_are(p[0], S / 2));
    CHECK(p[1].flows.size() == 24);  // each rank to 3 same-index peers: g chunks of S/n = S/4
    CHECK(all_flows_are(p[1], S / 4));
    CHECK(p[0].delay_s == Approx(a_up));
    CHECK(p[1].delay_s == Approx(3 * a_net));
  }
  SECTION("send/recv: each rank to the next, S each, one alpha") {
    std::vector<sim::Phase> p = sim::decompose(m, CollectiveOp::kSendRecv, CollectiveAlgo::kDirect, {0, 1, 3}, S);
    REQUIRE(p.size() == 1);
    REQUIRE(p[0].flows.size() == 2);
    CHECK(p[0].flows[1].src == 1);
    CHECK(p[0].flows[1].dst == 3);
    CHECK(all_flows_are(p[0], S));
    CHECK(p[0].delay_s == Approx(a_net));
  }
  SECTION("broadcast: tree 1 from the first rank, n-1 flows of S, floor(log2 n) alphas") {
    topo::Cluster d = load("dgx-h100");
    cost::CollectiveModel md(d);
    std::vector<sim::Phase> p = sim::decompose(md, CollectiveOp::kBroadcast, CollectiveAlgo::kTree, cost::first_ranks(8), S);
    REQUIRE(p.size() == 1);
    REQUIRE(p[0].flows.size() == 7);
    CHECK(all_flows_are(p[0], S));
    CHECK(p[0].flows[0].src == 0);
    CHECK(p[0].flows[6].src == 3);  // heap layout: position 7's parent is (7 - 1) / 2
    CHECK(p[0].flows[6].dst == 7);
    CHECK(p[0].delay_s == Approx(3 * (o + 2e-6)));
  }
  SECTION("all-to-all-v: one flow per non-zero off-diagonal entry, k alphas") {
    std::vector<std::vector<double>> b = filled(4, 0);
    b[0][1] = 5e6;
    b[0][2] = 1e6;
    b[0][3] = 2e6;
    b[2][0] = 3e6;
    b[3][3] = 9e6;  // stays local
    std::vector<sim::Phase> p = sim::decompose_all_to_all_v(m, ranks, b, CollectiveAlgo::kDirect);
    REQUIRE(p.size() == 1);
    CHECK(p[0].flows.size() == 4);
    CHECK(total_bytes(p) == Approx(11e6));
    CHECK(p[0].delay_s == Approx(3 * a_net));  // rank 0 sends 3 messages
    std::vector<sim::Phase> h = sim::decompose_all_to_all_v(m, ranks, b, CollectiveAlgo::kHierarchical);
    REQUIRE(h.size() == 2);
    // Phase 1: 0 -> 1 carries what 0 has for local index 1 anywhere: b[0][1] + b[0][3] = 7 MB;
    // 2 -> 3 carries nothing (b[2][1] + b[2][3] = 0). Phase 2: 0 -> 2 (node 0's data for rank 2:
    // b[0][2] + b[1][2] = 1 MB), 1 -> 3 (b[0][3] + b[1][3] = 2 MB), 2 -> 0 (3 MB).
    REQUIRE(h[0].flows.size() == 1);
    CHECK(h[0].flows[0].bytes == Approx(7e6));
    REQUIRE(h[1].flows.size() == 3);
    CHECK(total_bytes({h[1]}) == Approx(6e6));
    // Diagonal only: nothing moves, no phases.
    std::vector<std::vector<double>> local = filled(4, 0);
    local[1][1] = 1e6;
    CHECK(sim::decompose_all_to_all_v(m, ranks, local, CollectiveAlgo::kDirect).empty());
  }
}

// ------------------------------------------------------------------------------------------------
// Acceptance: a single collective on an idle cluster takes the analytic time (within 1%)

namespace {

struct Case {
  std::string name;
  std::vector<sim::Phase> phases;
  double analytic_s;
};

std::vector<Case> every_case(const cost::CollectiveModel& m, const std::vector<int>& ranks, double S) {
  std::vector<Case> out;
  auto add = [&](CollectiveOp op, CollectiveAlgo algo) {
    out.push_back({fmt::format("{}.{}", cost::op_name(op), cost::algo_name(algo)), sim::decompose(m, op, algo, ranks, S),
                   m.cost(op, algo, ranks, S).time_s});
  };
  add(CollectiveOp::kAllReduce, CollectiveAlgo::kRing);
  add(CollectiveOp::kAllReduce, CollectiveAlgo::kTree);
  add(CollectiveOp::kAllGather, CollectiveAlgo::kRing);
  add(CollectiveOp::kReduceScatter, CollectiveAlgo::kRing);
  add(CollectiveOp::kAllToAll, CollectiveAlgo::kDirect);
  add(CollectiveOp::kSendRecv, CollectiveAlgo::kDirect);
  add(CollectiveOp::kBroadcast, CollectiveAlgo::kTree);
  const int n = static_cast<int>(ranks.size());
  out.push_back({"all_to_all_v.direct", sim::decompose_all_to_all_v(m, ranks, uneven(n), CollectiveAlgo::kDirect),
                 m.all_to_all_v(ranks, uneven(n), CollectiveAlgo::kDirect).time_s});
  if (m.node_count(ranks) >= 2) {
    add(CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical);
    out.push_back({"all_to_all_v.hierarchical",
                   sim::decompose_all_to_all_v(m, ranks, uneven(n), CollectiveAlgo::kHierarchical),
                   m.all_to_all_v(ranks, uneven(n), CollectiveAlgo::kHierarchical).time_s});
  }
  return out;
}

}  // namespace

TEST_CASE("on an idle cluster each collective takes the analytic time within 1%") {
  struct Setup {
    const char* config;
    int ranks;
  };
  for (Setup s : {Setup{"dgx-h100", 8}, Setup{"h100-64", 16}, Setup{"h100-64", 32}, Setup{"h100-64", 64}}) {
    topo::Cluster c = load(s.config);
    cost::CollectiveModel m(c);
    for (double S : {1e6, 256e6}) {
      for (const Case& k : every_case(m, cost::first_ranks(s.ranks), S)) {
        const double flow_s = sim::idle_time_s(c, k.phases);
        INFO(s.config << " on " << s.ranks << " ranks, " << k.name << ", S = " << S << ": flows " << flow_s
                      << " s, analytic " << k.analytic_s << " s");
        CHECK(flow_s == Approx(k.analytic_s).epsilon(0.01));
      }
    }
  }
}

TEST_CASE("on small two-node clusters too, NICs shared or not") {
  for (int nics : {1, 2}) {
    topo::Cluster c = nodes_of(2, 2, nics);
    cost::CollectiveModel m(c);
    for (const Case& k : every_case(m, cost::first_ranks(4), 64e6)) {
      const double flow_s = sim::idle_time_s(c, k.phases);
      INFO(nics << " NICs per node, " << k.name << ": flows " << flow_s << " s, analytic " << k.analytic_s << " s");
      CHECK(flow_s == Approx(k.analytic_s).epsilon(0.01));
    }
  }
}

TEST_CASE("a rendezvous over the eager limit: the same step latency in flows and the analytic model") {
  // Within a node a message over 1 MB waits 5 us more, between nodes one over 4 MB 20 us more.
  const topo::Cluster c = topo::load_cluster_text(
      test::cluster_text(2, "single_switch { }") +
          "rendezvous { eager_limit_bytes: 1e6 latency_s: 5e-6 }\n"
          "network_rendezvous { eager_limit_bytes: 4e6 latency_s: 20e-6 }\n",
      "rendezvous.textproto");
  const topo::Cluster plain = nodes_of(2, 2, 2);
  const cost::CollectiveModel m(c), base(plain);
  CHECK(m.message_latency_s(0, 1, 1e6) == Approx(base.route(0, 1).latency_s));
  CHECK(m.message_latency_s(0, 1, 1.5e6) == Approx(base.route(0, 1).latency_s + 5e-6));
  CHECK(m.message_latency_s(0, 2, 1.5e6) == Approx(base.route(0, 2).latency_s));
  CHECK(m.message_latency_s(0, 2, 5e6) == Approx(base.route(0, 2).latency_s + 20e-6));
  const std::vector<int> node0 = {0, 1}, all = cost::first_ranks(4);
  // A ring all-reduce in one node: chunks of S/2, each of its 2 steps pays the rendezvous over 1 MB.
  for (double S : {1.5e6, 3e6}) {
    const cost::CollectiveCost a = m.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, node0, S),
                               b = base.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, node0, S);
    CHECK(a.latency_s - b.latency_s == Approx(S / 2 > 1e6 ? 2 * 5e-6 : 0).margin(1e-12));
    CHECK(a.transfer_s == Approx(b.transfer_s));
  }
  // An all-to-all over both nodes: each step's alpha takes its slowest message's latency.
  for (double S : {8e6, 24e6}) {  // S / 4 a message: 2 MB (within-node rendezvous only), 6 MB (both)
    const cost::CollectiveCost a = m.cost(CollectiveOp::kAllToAll, all, S), b = base.cost(CollectiveOp::kAllToAll, all, S);
    const double net = base.route(0, 2).latency_s, up = base.route(0, 1).latency_s;
    const double worst = std::max(up + 5e-6, net + (S / 4 > 4e6 ? 20e-6 : 0));
    CHECK(a.latency_s == Approx(a.steps * (o + worst)));
    CHECK(b.latency_s == Approx(b.steps * (o + net)));
  }
  for (const Case& k : every_case(m, all, 24e6)) {
    INFO(k.name);
    CHECK(sim::idle_time_s(c, k.phases) == Approx(k.analytic_s).epsilon(0.01));
  }
}

TEST_CASE("where flows and the analytic model legitimately differ (sim/flows.h)") {
  SECTION("a skewed all-to-all-v by hand: the busiest port idles while its senders are shared") {
    topo::Cluster c = load("dgx-h100");
    cost::CollectiveModel m(c);
    const double u = 450e9 * 1e-3;  // 1 ms at a port's 450 GB/s
    std::vector<std::vector<double>> b = filled(8, 0);
    b[0][2] = b[1][2] = 3 * u;
    b[0][3] = b[0][4] = b[1][5] = b[1][6] = 0.1 * u;
    const double alpha3 = 3 * (o + 2e-6);  // k = 3 messages from ranks 0 and 1
    const cost::CollectiveCost a = m.all_to_all_v(cost::first_ranks(8), b, CollectiveAlgo::kDirect);
    CHECK(a.time_s == Approx(alpha3 + 6e-3));  // rank 2's in-port: 6u
    const double flow_s = sim::idle_time_s(c, sim::decompose_all_to_all_v(m, cost::first_ranks(8), b, CollectiveAlgo::kDirect));
    CHECK(flow_s == Approx(alpha3 + 6.1e-3));  // 0.3 ms at 2c/3 into rank 2, then 5.8u at c
  }
  SECTION("random skewed matrices: never faster than the analytic time") {
    // Sizes e^(8x) MB, x uniform in [0, 1) from the raw generator (portable), a quarter of them 0.
    std::mt19937 rng(7);
    auto size = [&] { return std::exp(8.0 * (rng() / 4294967296.0)) * 1e6; };
    struct Setup {
      const char* config;
      int ranks;
    };
    for (Setup s : {Setup{"dgx-h100", 8}, Setup{"h100-64", 16}}) {
      topo::Cluster c = load(s.config);
      cost::CollectiveModel m(c);
      const std::vector<int> ranks = cost::first_ranks(s.ranks);
      double most = 0;
      for (int trial = 0; trial < 5; ++trial) {
        std::vector<std::vector<double>> b = filled(s.ranks, 0);
        for (auto& row : b)
          for (double& x : row) x = rng() % 4 == 0 ? 0 : size();
        for (CollectiveAlgo algo : {CollectiveAlgo::kDirect, CollectiveAlgo::kHierarchical}) {
          if (algo == CollectiveAlgo::kHierarchical && m.node_count(ranks) < 2) continue;
          const double analytic_s = m.all_to_all_v(ranks, b, algo).time_s;
          const double flow_s = sim::idle_time_s(c, sim::decompose_all_to_all_v(m, ranks, b, algo));
          INFO(s.config << " trial " << trial << " " << cost::algo_name(algo) << ": flows " << flow_s << " analytic "
                        << analytic_s);
          CHECK(flow_s >= analytic_s * (1 - 1e-9));
          most = std::max(most, flow_s / analytic_s);
        }
      }
      CHECK(most > 1.001);  // the matrices are skewed enough to show the difference
    }
  }
  SECTION("ECMP beats the single-path bottleneck the analytic model charges") {
    // The fat-tree of the ECMP test: a leaf-to-leaf send is charged at one 5 GB/s uplink, and
    // runs at the NIC's 10 GB/s over both.
    test::SmallNode n;
    n.devices = 1;
    n.nics = 1;
    topo::Cluster c = test::small_cluster(4, "fat_tree { nics_per_leaf: 2 spines: 2 oversubscription: 2 }", n);
    cost::CollectiveModel m(c);
    const double S = 1e9;
    const cost::CollectiveCost a = m.cost(CollectiveOp::kSendRecv, CollectiveAlgo::kDirect, {0, 2}, S);
    CHECK(a.transfer_s == Approx(S / 5e9));
    const double flow_s = sim::idle_time_s(c, sim::decompose(m, CollectiveOp::kSendRecv, CollectiveAlgo::kDirect, {0, 2}, S));
    CHECK(flow_s == Approx(a.latency_s + S / 10e9));
  }
}

// ------------------------------------------------------------------------------------------------
// Contention

TEST_CASE("collectives sharing links at once each take at least their idle time") {
  topo::Cluster c = load("h100-64");
  cost::CollectiveModel m(c);
  const std::vector<int> node0 = cost::first_ranks(8);
  const std::vector<int> reversed = {7, 6, 5, 4, 3, 2, 1, 0};
  const std::vector<int> two_nodes = cost::first_ranks(16);
  const double S = 256e6;
  const std::vector<sim::Phase> ring = sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, node0, S);
  const std::vector<sim::Phase> ring2 = sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, node0, S);
  const std::vector<sim::Phase> back = sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, reversed, S);
  const std::vector<sim::Phase> a2a = sim::decompose(m, CollectiveOp::kAllToAll, CollectiveAlgo::kDirect, two_nodes, S);
  const double ring_s = sim::idle_time_s(c, ring), a2a_s = sim::idle_time_s(c, a2a);

  SECTION("the same ring twice: every device link shared by two flows, the transfers take twice as long") {
    std::vector<double> end = run_together(c, {ring, ring2});
    const double transfer_s = ring_s - 14 * ring[0].delay_s;
    CHECK(end[0] == Approx(ring_s + transfer_s).epsilon(1e-6));
    CHECK(end[1] == Approx(end[0]));
  }
  SECTION("rings on different nodes share no link: each as fast as alone") {
    const std::vector<int> node1 = {8, 9, 10, 11, 12, 13, 14, 15};
    const std::vector<sim::Phase> other = sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, node1, S);
    std::vector<double> end = run_together(c, {ring, other});
    CHECK(end[0] == Approx(ring_s));
    CHECK(end[1] == Approx(sim::idle_time_s(c, other)));
  }
  SECTION("a ring and the same ring reversed share every device's NVSwitch port (a star, not a mesh)") {
    std::vector<double> end = run_together(c, {ring, back});
    CHECK(end[0] == Approx(ring_s + (ring_s - 14 * ring[0].delay_s)).epsilon(1e-6));
  }
  SECTION("an all-to-all over two nodes with a ring inside one of them") {
    std::vector<double> end = run_together(c, {a2a, ring});
    CHECK(end[0] >= a2a_s * (1 - 1e-9));
    CHECK(end[1] >= ring_s * (1 - 1e-9));
    CHECK(end[1] > ring_s * 1.01);  // the ring's NVSwitch links carry all-to-all bytes too
  }
}

// ------------------------------------------------------------------------------------------------
// Bad input

TEST_CASE("bad input is refused with a clear message") {
  topo::Cluster c = load("dgx-h100");
  cost::CollectiveModel m(c);
  sim::FlowNetwork net(c);
  using Catch::Matchers::Contains;

  SECTION("flows") {
    CHECK_THROWS_WITH(net.add_flow(-1, 0, 1e6, 0), Contains("source rank -1 is out of range"));
    CHECK_THROWS_WITH(net.add_flow(0, 8, 1e6, 0), Contains("destination rank 8 is out of range"));
    CHECK_THROWS_WITH(net.add_flow(0, 1, -1, 0), Contains("bytes must be a finite number >= 0"));
    CHECK_THROWS_AS(net.add_flow(0, 1, std::nan(""), 0), std::invalid_argument);
    CHECK_THROWS_AS(net.add_flow(0, 1, std::numeric_limits<double>::infinity(), 0), std::invalid_argument);
    CHECK(net.active_flows() == 0);
    net.advance(1.0);
    CHECK_THROWS_WITH(net.advance(0.5), Contains("not before now"));
    CHECK_THROWS_AS(net.advance(std::numeric_limits<double>::infinity()), std::invalid_argument);
    CHECK_THROWS_AS(sim::FlowNetwork(c, 0), std::invalid_argument);
    CHECK_THROWS_AS(net.busiest_links(-1, 1), std::invalid_argument);
    CHECK_THROWS_AS(net.busiest_links(1, -1), std::invalid_argument);
  }
  SECTION("no route") {
    // g0 - s - x - g1 with x inside node 5 and g1 in node 1: the graph is connected, but a route
    // that enters a node other than its source's may not leave it, so g0 and g1 have no route.
    std::string text = R"(name: "walled" graph {
      vertex { name: "g0" kind: DEVICE device_type: "h100-sxm5" }
      vertex { name: "g1" kind: DEVICE device_type: "h100-sxm5" node: 1 }
      vertex { name: "s" kind: SWITCH }
      vertex { name: "x" kind: SWITCH node: 5 }
      link { a: "g0" b: "s" bandwidth_Bps: 10e9 }
      link { a: "s" b: "x" bandwidth_Bps: 10e9 }
      link { a: "x" b: "g1" bandwidth_Bps: 10e9 }
    })";
    topo::Cluster walled = topo::load_cluster_text(text, "walled.textproto");
    sim::FlowNetwork n(walled);
    CHECK_THROWS_WITH(n.add_flow(0, 1, 1e6, 0), Contains("no route from rank 0 to rank 1"));
    CHECK_THROWS_WITH(n.add_flow(1, 0, 1e6, 0), Contains("no route from rank 1 to rank 0"));
    CHECK(n.add_flow(1, 1, 1e6, 0) >= 0);  // to itself: no route needed
    CHECK(n.active_flows() == 0);
  }
  SECTION("collectives: the model's errors") {
    const std::vector<int> ranks = cost::first_ranks(8);
    CHECK_THROWS_AS(sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, {0, 9}, 1e6), cost::CollectiveError);
    CHECK_THROWS_AS(sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, {0, 0}, 1e6), cost::CollectiveError);
    CHECK_THROWS_AS(sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, {0}, 1e6), cost::CollectiveError);
    CHECK_THROWS_AS(sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, -1), cost::CollectiveError);
    CHECK_THROWS_AS(sim::decompose(m, CollectiveOp::kAllGather, CollectiveAlgo::kRing, ranks, 0), cost::CollectiveError);
    CHECK_THROWS_WITH(sim::decompose(m, CollectiveOp::kAllReduce, CollectiveAlgo::kDirect, ranks, 1e6),
                      Contains("all_reduce has no algorithm 'direct'"));
    CHECK_THROWS_AS(sim::decompose(m, CollectiveOp::kBroadcast, CollectiveAlgo::kRing, ranks, 1e6), cost::CollectiveError);
    CHECK_THROWS_WITH(sim::decompose(m, CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, ranks, 1e6),
                      Contains("at least 2 nodes"));
    CHECK_THROWS_AS(sim::decompose_all_to_all_v(m, ranks, filled(8, -1), CollectiveAlgo::kDirect), cost::CollectiveError);
    CHECK_THROWS_AS(sim::decompose_all_to_all_v(m, ranks, filled(8, 0), CollectiveAlgo::kDirect), cost::CollectiveError);
    CHECK_THROWS_AS(sim::decompose_all_to_all_v(m, ranks, filled(7, 1), CollectiveAlgo::kDirect), cost::CollectiveError);
    CHECK_THROWS_AS(sim::decompose_all_to_all_v(m, ranks, filled(8, 1), CollectiveAlgo::kRing), cost::CollectiveError);
  }
  SECTION("phases") {
    CHECK_THROWS_AS(sim::idle_time_s(c, {sim::Phase{-1, 1, {}}}), std::invalid_argument);
    CHECK_THROWS_AS(sim::idle_time_s(c, {sim::Phase{0, 0, {}}}), std::invalid_argument);
    CHECK_THROWS_AS(sim::idle_time_s(c, {sim::Phase{0, 1, {{0, 99, 1e6}}}}), std::invalid_argument);
  }
}

TEST_CASE("half-duplex scale-up links: one way as long as both ways at half the bytes, flows and analytic alike") {
  // CPU ranks exchange through shared memory: the copies of both directions share one bandwidth
  // (topologies/hardware.proto scaleup_half_duplex).
  auto two_ranks = [](bool half_duplex) {
    return topo::load_cluster_text(
        fmt::format("name: \"shm\" nodes: 1 node {{ device {{ preset: \"h100-sxm5\" }} devices_per_node: 2 "
                    "intra_fabric: NVSWITCH scaleup_bandwidth_Bps: 10e9 scaleup_latency_s: 0 scaleup_half_duplex: {} "
                    "pcie {{ device_bandwidth_Bps: 1e9 latency_s: 1e-4 }} }}",
                    half_duplex),
        "shm.textproto");
  };
  const std::vector<std::vector<double>> one_way = {{0, 64e6}, {0, 0}}, both_ways = {{0, 32e6}, {32e6, 0}};
  for (bool half_duplex : {false, true}) {
    INFO("half duplex " << half_duplex);
    topo::Cluster c = two_ranks(half_duplex);
    cost::CollectiveModel m(c);
    const cost::CollectiveCost one = m.all_to_all_v({0, 1}, one_way), both = m.all_to_all_v({0, 1}, both_ways);
    // 64 MB one way at 10 GB/s; both ways 32 MB each: 3.2 ms on their own links, 6.4 sharing them.
    CHECK(one.transfer_s == Approx(6.4e-3));
    CHECK(both.transfer_s == Approx(half_duplex ? 6.4e-3 : 3.2e-3));
    for (const auto* bytes : {&one_way, &both_ways}) {
      const double flow_s = sim::idle_time_s(c, sim::decompose_all_to_all_v(m, {0, 1}, *bytes, CollectiveAlgo::kDirect));
      CHECK(flow_s == Approx(m.all_to_all_v({0, 1}, *bytes).time_s).epsilon(0.01));
    }
    // In the flow network, one flow each way: each at half the port when they share it.
    sim::FlowNetwork net(c);
    const int64_t a = net.add_flow(0, 1, 1e9, 0), b = net.add_flow(1, 0, 1e9, 0);
    CHECK(net.rate(a) == Approx(half_duplex ? 5e9 : 10e9));
    CHECK(net.rate(b) == Approx(half_duplex ? 5e9 : 10e9));
  }
}
