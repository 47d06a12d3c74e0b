// Analytic collective costs against alpha-beta values worked out by hand from the clusters' numbers.
#include "costmodel/collectives.h"

#include "test_clusters.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>
#include <thread>

using namespace moesim;
using cost::CollectiveAlgo;
using cost::CollectiveOp;

namespace {

constexpr double o = cost::kDefaultStepOverhead_s;

topo::Cluster dgx() { return topo::load_cluster(MOESIM_SOURCE_DIR "/configs/hardware/dgx-h100.textproto"); }

// test::SmallNode's numbers: scale-up 100 GB/s through an NVSwitch (1 us device to device), NICs of
// 10 GB/s with 1 us cables, PCIe 64 GB/s with 100 ns per hop, one PCIe switch per device.
constexpr double kUp_Bps = 100e9, kNic_Bps = 10e9;
constexpr double kUpLatency_s = 1e-6;
// Device to a device of another node over the single switch, each device on its own NIC:
// gpu -> pcie -> nic (2 x 100 ns), nic -> switch -> nic (2 x 1 us), nic -> pcie -> gpu (2 x 100 ns).
constexpr double kNetLatency_s = 4 * 100e-9 + 2 * 1e-6;

topo::Cluster nodes_of(int nodes, int devices, int nics) {
  test::SmallNode n;
  n.devices = devices;
  n.nics = nics;
  return test::small_cluster(nodes, "single_switch { }", n);
}

std::vector<std::vector<double>> filled(int n, double v) { return std::vector<std::vector<double>>(n, std::vector<double>(n, v)); }

}  // namespace

TEST_CASE("one DGX H100 node: every op against its formula over NVSwitch") {
  topo::Cluster c = dgx();
  cost::CollectiveModel m(c);
  // The config: scale-up 450 GB/s per device per direction, 2 us device to device (two NVSwitch
  // hops of 1 us): every pair's route is B = 450 GB/s, L = 2 us, and alpha = o + 2 us.
  const double B = 450e9, alpha = o + 2e-6;
  CHECK(m.route(0, 5).bottleneck_Bps == Approx(B));
  CHECK(m.route(0, 5).latency_s == Approx(2e-6));
  const double S = 256e6;
  const std::vector<int> ranks = cost::first_ranks(8);

  SECTION("ring all-reduce: 2(n-1) steps of S/n, t = 14 (alpha + S/8/B)") {
    cost::CollectiveCost r = m.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S);
    CHECK(r.algorithm == "ring");
    CHECK(r.steps == 14);
    CHECK(r.latency_s == Approx(14 * alpha));
    CHECK(r.transfer_s == Approx(14 * S / 8 / B));
    CHECK(r.time_s == Approx(14 * (alpha + S / 8 / B)));
    // busBw = algBw x 2(n-1)/n: as S grows it approaches the link's 450 GB/s.
    CHECK(r.bus_factor == Approx(2.0 * 7 / 8));
    CHECK(r.alg_bw_Bps == Approx(S / r.time_s));
    CHECK(r.bus_bw_Bps == Approx(r.alg_bw_Bps * 14 / 8));
    CHECK(m.cost(CollectiveOp::kAllReduce, ranks, 1e14).bus_bw_Bps == Approx(B).epsilon(1e-3));
  }
  SECTION("all-gather and reduce-scatter: n-1 steps of S/n") {
    for (CollectiveOp op : {CollectiveOp::kAllGather, CollectiveOp::kReduceScatter}) {
      cost::CollectiveCost r = m.cost(op, ranks, S);
      CHECK(r.steps == 7);
      CHECK(r.time_s == Approx(7 * (alpha + S / 8 / B)));
      CHECK(r.bus_factor == Approx(7.0 / 8));
    }
  }
  SECTION("tree all-reduce: 2 floor(log2 8) = 6 latency steps, the ring's bandwidth term") {
    cost::CollectiveCost r = m.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kTree, ranks, S);
    CHECK(r.steps == 6);
    CHECK(r.latency_s == Approx(6 * alpha));
    CHECK(r.transfer_s == Approx(2.0 * 7 / 8 * S / B));
    // Small messages: the tree's 6 alphas beat the ring's 14.
    CHECK(m.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kTree, ranks, 1024).time_s <
          m.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, 1024).time_s);
  }
  SECTION("direct all-to-all: n-1 message latencies, 7 flows of S/8 share each device's NVSwitch link") {
    cost::CollectiveCost r = m.cost(CollectiveOp::kAllToAll, ranks, S);
    CHECK(r.algorithm == "direct");
    CHECK(r.steps == 7);
    CHECK(r.time_s == Approx(7 * alpha + 7 * (S / 8) / B));
    CHECK(r.bus_factor == Approx(7.0 / 8));
  }
  SECTION("broadcast: pipelined binary tree, 3 latency steps, a parent feeds 2 children over one link") {
    cost::CollectiveCost r = m.cost(CollectiveOp::kBroadcast, ranks, S);
    CHECK(r.algorithm == "tree");
    CHECK(r.steps == 3);
    CHECK(r.time_s == Approx(3 * alpha + 2 * S / B));
    CHECK(r.bus_factor == 1);
  }
  SECTION("send/recv: one step, t = alpha + S/B") {
    cost::CollectiveCost r = m.cost(CollectiveOp::kSendRecv, {3, 6}, S);
    CHECK(r.steps == 1);
    CHECK(r.time_s == Approx(alpha + S / B));
    CHECK(r.alg_bw_Bps == Approx(r.bus_bw_Bps));
  }
  SECTION("a ring all-reduce is a reduce-scatter followed by an all-gather") {
    CHECK(m.cost(CollectiveOp::kAllReduce, ranks, S).time_s ==
          Approx(m.cost(CollectiveOp::kReduceScatter, ranks, S).time_s + m.cost(CollectiveOp::kAllGather, ranks, S).time_s));
  }
}

TEST_CASE("a ring over two nodes crosses the NICs only where it leaves a node") {
  SECTION("each device on its own NIC") {
    topo::Cluster c = nodes_of(2, 2, 2);
    cost::CollectiveModel m(c);
    CHECK(m.route(1, 2).bottleneck_Bps == Approx(kNic_Bps));
    CHECK(m.route(1, 2).latency_s == Approx(kNetLatency_s));
    CHECK(m.route(0, 1).latency_s == Approx(kUpLatency_s));
    const double S = 64e6;
    // Ring 0 -> 1 -> 2 -> 3 -> 0: edges 1->2 and 3->0 cross the switch (B = 10 GB/s, L = 2.4 us),
    // each alone on its NIC. alpha = o + 2.4 us (the slowest edge); beta = (S/4) / 10 GB/s.
    cost::CollectiveCost r = m.cost(CollectiveOp::kAllReduce, cost::first_ranks(4), S);
    CHECK(r.time_s == Approx(6 * (o + kNetLatency_s + S / 4 / kNic_Bps)));
    CHECK(m.node_count(cost::first_ranks(4)) == 2);
  }
  SECTION("two devices share one NIC: a ring that leaves the node at every edge halves its bandwidth") {
    topo::Cluster c = nodes_of(2, 2, 1);
    cost::CollectiveModel m(c);
    const double S = 64e6;
    // In node order one ring edge leaves each node: the NIC carries one flow each way.
    cost::CollectiveCost ordered = m.cost(CollectiveOp::kAllReduce, {0, 1, 2, 3}, S);
    CHECK(ordered.transfer_s == Approx(6 * (S / 4) / kNic_Bps));
    // Interleaved (0 2 1 3) every edge crosses: 0->2 and 1->3 both leave through node 0's NIC.
    cost::CollectiveCost interleaved = m.cost(CollectiveOp::kAllReduce, {0, 2, 1, 3}, S);
    CHECK(interleaved.transfer_s == Approx(6 * 2 * (S / 4) / kNic_Bps));
  }
}

TEST_CASE("direct all-to-all across two nodes: the flows leaving a node share its NICs") {
  const double S = 64e6;
  SECTION("a NIC per device: each NIC carries the device's 2 flows to the other node") {
    topo::Cluster c = nodes_of(2, 2, 2);
    cost::CollectiveModel m(c);
    // Each rank sends S/4 to 3 peers: one over NVSwitch (100 GB/s alone), two through its NIC
    // (10 GB/s shared by 2). alpha = o + 2.4 us, charged n-1 = 3 times.
    cost::CollectiveCost r = m.cost(CollectiveOp::kAllToAll, cost::first_ranks(4), S);
    CHECK(r.steps == 3);
    CHECK(r.latency_s == Approx(3 * (o + kNetLatency_s)));
    CHECK(r.transfer_s == Approx(2 * (S / 4) / kNic_Bps));
  }
  SECTION("one NIC per node: it carries both devices' flows, 4 of S/4") {
    topo::Cluster c = nodes_of(2, 2, 1);
    cost::CollectiveModel m(c);
    cost::CollectiveCost r = m.cost(CollectiveOp::kAllToAll, cost::first_ranks(4), S);
    CHECK(r.transfer_s == Approx(4 * (S / 4) / kNic_Bps));
    // Device 1 reaches the NIC beside device 0 through the CPU: gpu1 -> pcie1 -> cpu -> pcie0 ->
    // nic (4 x 100 ns), 2 x 1 us of cables, and the same 4 PCIe hops into device 1 of node 1.
    CHECK(m.route(1, 3).latency_s == Approx(8 * 100e-9 + 2e-6));
    CHECK(r.latency_s == Approx(3 * (o + 8 * 100e-9 + 2e-6)));
  }
}

TEST_CASE("hierarchical all-to-all beats direct on small messages over many nodes, loses on large ones") {
  // 8 nodes of 4 devices, a NIC each: n = 32, g = 4, m = 8.
  topo::Cluster c = nodes_of(8, 4, 4);
  cost::CollectiveModel m(c);
  const std::vector<int> ranks = cost::first_ranks(32);
  const double a_net = o + kNetLatency_s, a_up = o + kUpLatency_s;
  // direct: 31 alphas; a device's NIC carries its 28 off-node flows of S/32.
  auto direct = [&](double S) { return 31 * a_net + 28 * (S / 32) / kNic_Bps; };
  // hierarchical: phase 1, 3 local peers get S/4 each over scale-up; phase 2, 7 same-index peers
  // get S/8 each through the NIC: the same 7/8 S crosses the NIC as in direct.
  auto hier = [&](double S) { return 3 * a_up + 3 * (S / 4) / kUp_Bps + 7 * a_net + 7 * (S / 8) / kNic_Bps; };
  for (double S : {64.0 * 1024, 1024.0 * 1024 * 1024}) {
    INFO("S = " << S);
    cost::CollectiveCost d = m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kDirect, ranks, S);
    cost::CollectiveCost h = m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, ranks, S);
    CHECK(d.time_s == Approx(direct(S)));
    CHECK(h.time_s == Approx(hier(S)));
    CHECK(d.steps == 31);
    CHECK(h.steps == 3 + 7);
    CHECK(h.algorithm == "hierarchical");
  }
  CHECK(m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, ranks, 64 * 1024).time_s <
        m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kDirect, ranks, 64 * 1024).time_s);
  CHECK(m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, ranks, 1 << 30).time_s >
        m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kDirect, ranks, 1 << 30).time_s);
}

TEST_CASE("busBw = algBw x the nccl-tests factor, for every registered algorithm") {
  topo::Cluster c = nodes_of(8, 4, 4);
  cost::CollectiveModel m(c);
  const std::vector<int> ranks = cost::first_ranks(32);
  const double n = 32, S = 8e6;
  for (const auto& e : cost::collective_algorithms().entries()) {
    INFO(e.name);
    CHECK_FALSE(e.description.empty());
    CHECK(e.name == fmt::format("{}.{}", cost::op_name(e.value.op), cost::algo_name(e.value.algo)));
    cost::CollectiveCost r = m.cost(e.value.op, e.value.algo, ranks, S);
    double factor = 1;
    if (e.value.op == CollectiveOp::kAllReduce) factor = 2 * (n - 1) / n;
    if (e.value.op == CollectiveOp::kAllGather || e.value.op == CollectiveOp::kReduceScatter ||
        e.value.op == CollectiveOp::kAllToAll)
      factor = (n - 1) / n;
    CHECK(r.bus_factor == Approx(factor));
    CHECK(cost::bus_factor(e.value.op, 32) == Approx(factor));
    CHECK(r.alg_bw_Bps == Approx(S / r.time_s));
    CHECK(r.bus_bw_Bps == Approx(r.alg_bw_Bps * factor));
    CHECK(r.time_s == Approx(r.latency_s + r.transfer_s));
    CHECK(r.latency_s > 0);
    CHECK(r.transfer_s > 0);
  }
  CHECK(cost::bus_factor_formula(CollectiveOp::kAllReduce) == "2(n-1)/n");
  CHECK(cost::bus_factor_formula(CollectiveOp::kAllToAll) == "(n-1)/n");
  CHECK(cost::bus_factor_formula(CollectiveOp::kSendRecv) == "1");
  CHECK(cost::default_algo(CollectiveOp::kAllReduce) == CollectiveAlgo::kRing);
  CHECK(cost::default_algo(CollectiveOp::kAllToAll) == CollectiveAlgo::kDirect);
  CHECK(cost::parse_op("reduce_scatter") == CollectiveOp::kReduceScatter);
  CHECK(cost::parse_algo("hierarchical") == CollectiveAlgo::kHierarchical);
}

TEST_CASE("all-to-all-v: the heaviest row or column sets the time") {
  topo::Cluster c = nodes_of(2, 2, 2);  // ranks 0, 1 on node 0; 2, 3 on node 1; a NIC each
  cost::CollectiveModel m(c);
  const std::vector<int> ranks = cost::first_ranks(4);
  const double H = 100e6, L = 1e6;
  const double alpha = o + kNetLatency_s;

  SECTION("a heavy sender") {
    auto bytes = filled(4, L);
    for (int j = 0; j < 4; ++j) bytes[0][j] = H;
    // Rank 0's NIC carries H to rank 2 and H to rank 3: 2H / 10 GB/s. Every other port is
    // lighter: rank 2's NIC receives H + L, rank 0's NVSwitch link sends H at 100 GB/s.
    cost::CollectiveCost r = m.all_to_all_v(ranks, bytes);
    CHECK(r.steps == 3);
    CHECK(r.time_s == Approx(3 * alpha + 2 * H / kNic_Bps));
    // S = the mean per-rank send buffer.
    CHECK(r.alg_bw_Bps == Approx((4 * H + 12 * L) / 4 / r.time_s));
  }
  SECTION("a heavy receiver costs what the transposed heavy sender costs") {
    auto bytes = filled(4, L);
    for (int i = 0; i < 4; ++i) bytes[i][3] = H;
    cost::CollectiveCost r = m.all_to_all_v(ranks, bytes);
    CHECK(r.time_s == Approx(3 * alpha + 2 * H / kNic_Bps));  // rank 3's NIC receives from 0 and 1
    auto transposed = filled(4, L);
    for (int j = 0; j < 4; ++j) transposed[3][j] = H;
    CHECK(m.all_to_all_v(ranks, transposed).time_s == Approx(r.time_s));
  }
  SECTION("hierarchical sums the matrix into its phases") {
    auto bytes = filled(4, L);
    for (int j = 0; j < 4; ++j) bytes[0][j] = H;
    // Phase 1: rank 0 sends rank 1 what goes to local index 1 anywhere: bytes[0][1] + bytes[0][3]
    // = 2H over NVSwitch. Phase 2: rank 0 sends rank 2 what node 0 has for rank 2: bytes[0][2] +
    // bytes[1][2] = H + L through its NIC; rank 1 sends rank 3 bytes[0][3] + bytes[1][3] = H + L.
    cost::CollectiveCost r = m.all_to_all_v(ranks, bytes, CollectiveAlgo::kHierarchical);
    CHECK(r.steps == 2);
    CHECK(r.time_s == Approx((o + kUpLatency_s) + 2 * H / kUp_Bps + alpha + (H + L) / kNic_Bps));
  }
  SECTION("a uniform matrix costs what all_to_all costs") {
    const double S = 32e6;
    for (CollectiveAlgo algo : {CollectiveAlgo::kDirect, CollectiveAlgo::kHierarchical}) {
      cost::CollectiveCost v = m.all_to_all_v(ranks, filled(4, S / 4), algo);
      cost::CollectiveCost u = m.cost(CollectiveOp::kAllToAll, algo, ranks, S);
      CHECK(v.time_s == Approx(u.time_s));
      CHECK(v.bus_bw_Bps == Approx(u.bus_bw_Bps));
      CHECK(v.steps == u.steps);
    }
  }
  SECTION("data that stays on its rank costs nothing") {
    auto bytes = filled(4, 0);
    for (int i = 0; i < 4; ++i) bytes[i][i] = H;
    cost::CollectiveCost r = m.all_to_all_v(ranks, bytes);
    CHECK(r.time_s == 0);
    CHECK(r.steps == 0);
    CHECK(std::isinf(r.alg_bw_Bps));
  }
}

TEST_CASE("send/recv between pipeline stages: every boundary at once") {
  topo::Cluster c = nodes_of(2, 2, 2);
  cost::CollectiveModel m(c);
  const double S = 10e6;
  CHECK(m.cost(CollectiveOp::kSendRecv, {0, 2}, S).time_s == Approx(o + kNetLatency_s + S / kNic_Bps));
  // Chain 0 -> 1 -> 2 -> 3: the crossing 1 -> 2 is the slowest boundary.
  CHECK(m.cost(CollectiveOp::kSendRecv, {0, 1, 2, 3}, S).time_s == Approx(o + kNetLatency_s + S / kNic_Bps));
}

TEST_CASE("the step overhead is a parameter") {
  topo::Cluster c = dgx();
  cost::CollectiveModel none(c, {.step_overhead_s = 0});
  cost::CollectiveModel big(c, {.step_overhead_s = 10e-6});
  const double S = 1e6;
  CHECK(none.cost(CollectiveOp::kAllReduce, cost::first_ranks(8), S).latency_s == Approx(14 * 2e-6));
  CHECK(big.cost(CollectiveOp::kAllReduce, cost::first_ranks(8), S).latency_s == Approx(14 * 12e-6));
}

TEST_CASE("bad requests throw CollectiveError (an invalid_argument)") {
  topo::Cluster c = nodes_of(2, 2, 2);
  cost::CollectiveModel m(c);
  const std::vector<int> four = cost::first_ranks(4);
  using E = cost::CollectiveError;
  CHECK_THROWS_AS(m.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kHierarchical, four, 1e6), E);
  CHECK_THROWS_WITH(m.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kDirect, four, 1e6),
                    Catch::Contains("all_reduce has no algorithm 'direct': choose ring, tree"));
  CHECK_THROWS_AS(m.cost(CollectiveOp::kBroadcast, CollectiveAlgo::kRing, four, 1e6), E);
  CHECK_THROWS_AS(m.cost(CollectiveOp::kAllReduce, {0}, 1e6), E);
  CHECK_THROWS_AS(m.cost(CollectiveOp::kAllReduce, {}, 1e6), E);
  CHECK_THROWS_WITH(m.cost(CollectiveOp::kAllReduce, {0, 4}, 1e6), Catch::Contains("rank 4 is out of range"));
  CHECK_THROWS_AS(m.cost(CollectiveOp::kAllReduce, {0, -1}, 1e6), E);
  CHECK_THROWS_WITH(m.cost(CollectiveOp::kAllReduce, {0, 1, 0}, 1e6), Catch::Contains("rank 0 is listed twice"));
  for (double bad : {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()})
    CHECK_THROWS_AS(m.cost(CollectiveOp::kAllGather, four, bad), E);
  // Hierarchical needs several nodes with as many ranks each.
  CHECK_THROWS_WITH(m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, {0, 1}, 1e6),
                    Catch::Contains("at least 2 nodes"));
  CHECK_THROWS_WITH(m.cost(CollectiveOp::kAllToAll, CollectiveAlgo::kHierarchical, {0, 1, 2}, 1e6),
                    Catch::Contains("same number of ranks on every node"));
  // All-to-all-v: shape, values, algorithm.
  CHECK_THROWS_AS(m.all_to_all_v(four, filled(3, 1)), E);
  auto ragged = filled(4, 1);
  ragged[2].pop_back();
  CHECK_THROWS_AS(m.all_to_all_v(four, ragged), E);
  auto negative = filled(4, 1);
  negative[1][2] = -1;
  CHECK_THROWS_AS(m.all_to_all_v(four, negative), E);
  auto nan = filled(4, 1);
  nan[0][3] = std::nan("");
  CHECK_THROWS_AS(m.all_to_all_v(four, nan), E);
  CHECK_THROWS_AS(m.all_to_all_v(four, filled(4, 0)), E);
  CHECK_THROWS_AS(m.all_to_all_v(four, filled(4, 1), CollectiveAlgo::kRing), E);
  // Names and parameters.
  CHECK_THROWS_WITH(cost::parse_op("allreduce"), Catch::Contains("choose all_reduce, all_gather"));
  CHECK_THROWS_AS(cost::parse_algo("rign"), E);
  CHECK_THROWS_AS(cost::CollectiveModel(c, {.step_overhead_s = -1e-6}), E);
  CHECK_THROWS_AS(cost::CollectiveModel(c, {.step_overhead_s = std::nan("")}), std::invalid_argument);
  CHECK_THROWS_AS(m.route(0, 9), E);
}

TEST_CASE("routes are computed lazily, once per source, and shared by threads") {
  topo::Cluster c = topo::load_cluster(MOESIM_SOURCE_DIR "/configs/hardware/h800-2048.textproto");
  cost::CollectiveModel m(c);
  CHECK(m.routed_sources() == 0);
  std::vector<int> two_nodes = cost::first_ranks(16);
  const double S = 64e6;
  m.cost(CollectiveOp::kAllReduce, two_nodes, S);
  CHECK(m.routed_sources() == 16);
  // 2 nodes of 8 H800s, 50 GB/s NIC per GPU on a fat-tree: each GPU's NIC carries 8 flows of S/16.
  cost::CollectiveCost a2a = m.cost(CollectiveOp::kAllToAll, two_nodes, S);
  CHECK(a2a.transfer_s == Approx(8 * (S / 16) / 50e9));
  CHECK(m.routed_sources() == 16);
  // Nodes 0 and 4 sit on different leaves; no oversubscription, so the same NIC-bound answer.
  std::vector<int> far = cost::first_ranks(8);
  for (int r = 32; r < 40; ++r) far.push_back(r);
  CHECK(m.cost(CollectiveOp::kAllToAll, far, S).transfer_s == Approx(a2a.transfer_s));
  CHECK(m.routed_sources() == 24);

  // Concurrent callers on a fresh model see the same answers and route each source once.
  cost::CollectiveModel shared(c);
  std::vector<double> times(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] { times[t] = shared.cost(CollectiveOp::kAllToAll, two_nodes, S).time_s; });
  for (std::thread& t : threads) t.join();
  for (double t : times) CHECK(t == a2a.time_s);
  CHECK(shared.routed_sources() == 16);
}

TEST_CASE("a collective library's bandwidth efficiency divides that collective's transfer, and only its") {
  std::ifstream f(MOESIM_SOURCE_DIR "/configs/hardware/dgx-h100.textproto");
  std::stringstream text;
  text << f.rdbuf() << "\ncollective_efficiency { op: \"all_reduce\" bandwidth_efficiency: 0.5 }\n";
  const topo::Cluster slow = topo::load_cluster_text(text.str(), "slow-all-reduce.textproto");
  CHECK(slow.collective_efficiency("all_reduce") == 0.5);
  CHECK(slow.collective_efficiency("all_to_all") == 1);
  const topo::Cluster c = dgx();
  const cost::CollectiveModel plain(c), halved(slow);
  const std::vector<int> ranks = cost::first_ranks(8);
  const double S = 256e6;
  const cost::CollectiveCost a = plain.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S);
  const cost::CollectiveCost b = halved.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S);
  CHECK(b.transfer_s == Approx(2 * a.transfer_s));
  CHECK(b.latency_s == Approx(a.latency_s));
  CHECK(halved.cost(CollectiveOp::kAllToAll, ranks, S).time_s ==
        Approx(plain.cost(CollectiveOp::kAllToAll, ranks, S).time_s));
}

TEST_CASE("a collective library's time per call adds to that collective's latency, and only its") {
  std::ifstream f(MOESIM_SOURCE_DIR "/configs/hardware/dgx-h100.textproto");
  std::stringstream text;
  text << f.rdbuf() << "\ncollective_efficiency { op: \"all_gather\" bandwidth_efficiency: 1 latency_s: 1e-5 }\n";
  const topo::Cluster fixed = topo::load_cluster_text(text.str(), "fixed-all-gather.textproto");
  CHECK(fixed.collective_latency_s("all_gather") == 1e-5);
  CHECK(fixed.collective_latency_s("all_reduce") == 0);
  const topo::Cluster c = dgx();
  const cost::CollectiveModel plain(c), library(fixed);
  const std::vector<int> ranks = cost::first_ranks(8);
  for (double S : {4e3, 256e6}) {
    const cost::CollectiveCost a = plain.cost(CollectiveOp::kAllGather, CollectiveAlgo::kRing, ranks, S);
    const cost::CollectiveCost b = library.cost(CollectiveOp::kAllGather, CollectiveAlgo::kRing, ranks, S);
    CHECK(b.latency_s == Approx(a.latency_s + 1e-5));
    CHECK(b.transfer_s == Approx(a.transfer_s));
    CHECK(library.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S).time_s ==
          Approx(plain.cost(CollectiveOp::kAllReduce, CollectiveAlgo::kRing, ranks, S).time_s));
  }
}
