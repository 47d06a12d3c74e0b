// Fabric generators: derived figures against hand-computed formulas.
#include "test_clusters.h"
#include "topologies/metrics.h"
#include "topologies/registry.h"
#include "topologies/routing.h"

#include <catch2/catch.hpp>

using namespace moesim;
using moesim::test::SmallNode;
using moesim::test::small_cluster;

namespace {

int rank_of(const topo::Cluster& c, int node, int local) {
  for (int r = 0; r < c.device_count(); ++r)
    if (c.device(r).node == node && c.device(r).local_index == local) return r;
  FAIL("no device " << local << " in node " << node);
  return -1;
}

// The symmetry hint must give the same diameter as routing from every device.
void check_symmetry_hint(const topo::Cluster& c) {
  REQUIRE(c.symmetry().nodes_equivalent);
  topo::TopologyMetrics hinted = topo::compute_metrics(c);
  topo::MetricsOptions all;
  all.all_sources = true;
  topo::TopologyMetrics full = topo::compute_metrics(c, all);
  CHECK(hinted.sources_examined < full.sources_examined);
  CHECK(full.sources_examined == c.device_count());
  CHECK(hinted.diameter_hops == full.diameter_hops);
  CHECK(hinted.max_route_latency_s == Approx(full.max_route_latency_s));
}

}  // namespace

TEST_CASE("fat-tree: counts, bisection, diameter and ECMP paths follow the formulas") {
  // 8 nodes x 2 NICs = 16 ports; 4 ports per leaf -> 4 leaves; 2 spines.
  const double B = 10e9;
  topo::Cluster c = small_cluster(8, "fat_tree { nics_per_leaf: 4 spines: 2 link_latency_s: 1e-7 }");
  CHECK(c.device_count() == 16);
  CHECK(c.node_count() == 8);
  // Per node: 1 CPU, 2 PCIe switches, 2 devices, 1 NVSwitch, 2 NICs = 8 vertices; + 4 leaves + 2 spines.
  CHECK(c.vertex_count() == 8 * 8 + 4 + 2);
  // Per node: 2 PCIe uplinks + 2 device links + 2 NVSwitch ports + 2 NIC-to-PCIe = 8 links;
  // fabric: 16 NIC cables + 4 leaves x 2 spines = 24.
  CHECK(c.link_count() == 8 * 8 + 24);
  CHECK(c.directed_link_count() == 2 * c.link_count());

  topo::TopologyMetrics m = topo::compute_metrics(c);
  // Full bisection (oversubscription 1): half the ports at port speed.
  CHECK(m.bisection_bandwidth_Bps == Approx(16 / 2 * B));
  // device -> PCIe -> NIC -> leaf -> spine -> leaf -> NIC -> PCIe -> device
  CHECK(m.diameter_hops == 8);
  for (const topo::DeviceBandwidth& d : m.devices) {
    CHECK(d.scaleout_Bps == Approx(B));
    CHECK(d.scaleup_Bps == Approx(100e9));
    CHECK(d.host_Bps == Approx(64e9));
  }

  topo::Router router(c);
  // Nodes 0 and 1 share leaf 0: one path through the leaf. Node 0 and node 2 are on different
  // leaves: one path per spine.
  topo::Route same_leaf = router.route(rank_of(c, 0, 0), rank_of(c, 1, 0));
  CHECK(same_leaf.hops == 6);
  CHECK(same_leaf.paths == 1);
  topo::Route across = router.route(rank_of(c, 0, 0), rank_of(c, 2, 0));
  CHECK(across.hops == 8);
  CHECK(across.paths == 2);
  REQUIRE(across.path_list.size() == 2);
  CHECK(c.graph()[across.path_list[0][4]].name != c.graph()[across.path_list[1][4]].name);  // the two spines
  // Same node: over the NVSwitch, not the network.
  topo::Route local = router.route(0, 1);
  CHECK(local.hops == 2);
  CHECK(local.bottleneck_Bps == Approx(100e9));
  check_symmetry_hint(c);
}

TEST_CASE("fat-tree: oversubscription divides the bisection and the leaf uplinks") {
  const double B = 10e9;
  for (double r : {1.0, 2.0, 4.0}) {
    topo::Cluster c = small_cluster(8, fmt::format("fat_tree {{ nics_per_leaf: 4 spines: 2 oversubscription: {} }}", r));
    topo::TopologyMetrics m = topo::compute_metrics(c);
    INFO("oversubscription " << r);
    CHECK(m.bisection_bandwidth_Bps == Approx(16 / 2 * B / r));
    // A leaf's uplink to one spine: 4 ports x B / (r x 2 spines).
    topo::Route across = topo::Router(c).route(0, 4);
    CHECK(across.bottleneck_Bps == Approx(std::min(B, 4 * B / (r * 2))));
  }
}

TEST_CASE("fat-tree: partly filled leaves switch the symmetry hint off, and figures stay right") {
  // 5 nodes x 2 NICs = 10 ports on leaves of 4: the last leaf is half empty.
  topo::Cluster c = small_cluster(5, "fat_tree { nics_per_leaf: 4 spines: 2 }");
  CHECK_FALSE(c.symmetry().nodes_equivalent);
  topo::TopologyMetrics m = topo::compute_metrics(c);
  CHECK(m.sources_examined == c.device_count());
  CHECK(m.diameter_hops == 8);
}

TEST_CASE("fat-tree: a single leaf needs no spines") {
  topo::Cluster c = small_cluster(2, "fat_tree { nics_per_leaf: 4 spines: 2 }");
  CHECK(c.vertex_count() == 2 * 8 + 1);  // one leaf, no spine
  topo::TopologyMetrics m = topo::compute_metrics(c);
  CHECK(m.diameter_hops == 6);
  CHECK(m.bisection_bandwidth_Bps == Approx(2 * 10e9));
}

TEST_CASE("rail-optimised: NIC i of every node on rail i, spines between groups") {
  const double B = 10e9;
  // 4 nodes in groups of 2, 2 rails -> 4 rail leaves; 2 spines.
  topo::Cluster c = small_cluster(4, "rail_optimized { nodes_per_group: 2 spines: 2 }");
  CHECK(c.vertex_count() == 4 * 8 + 4 + 2);
  CHECK(c.link_count() == 4 * 8 + 8 + 4 * 2);
  topo::Router router(c);
  // Same group, same rail: one rail switch between them.
  topo::Route rail = router.route(rank_of(c, 0, 0), rank_of(c, 1, 0));
  CHECK(rail.hops == 6);
  CHECK(rail.paths == 1);
  CHECK(c.graph()[rail.path_list[0][3]].name == "group0.rail0");
  // Other group, same rail: through either spine.
  topo::Route far = router.route(rank_of(c, 0, 1), rank_of(c, 2, 1));
  CHECK(far.hops == 8);
  CHECK(far.paths == 2);
  CHECK(c.graph()[far.path_list[0][3]].name == "group0.rail1");
  CHECK(c.graph()[far.path_list[0][5]].name == "group1.rail1");
  topo::TopologyMetrics m = topo::compute_metrics(c);
  CHECK(m.bisection_bandwidth_Bps == Approx(8 / 2 * B));
  check_symmetry_hint(c);
}

TEST_CASE("torus: diameter, bisection and ECMP path counts of k-ary n-cubes") {
  const double L = 5e9;
  const std::string torus = "torus {{ dims: [{}] link_bandwidth_Bps: 5e9 link_latency_s: 1e-7 }}";
  SmallNode one{.devices = 1, .nics = 1};

  SECTION("4 x 4") {
    topo::Cluster c = small_cluster(16, fmt::format(fmt::runtime(torus), "4, 4"), one);
    topo::TopologyMetrics m = topo::compute_metrics(c);
    // 3 hops to the router, floor(4/2) + floor(4/2) router hops, 3 hops down.
    CHECK(m.diameter_hops == 3 + 2 + 2 + 3);
    // Bisection of a k x k torus: 2 k links (each ring is cut twice).
    CHECK(m.bisection_bandwidth_Bps == Approx(2 * 4 * L));
    // (0,0) -> (2,2): both directions tie in each dimension, 2 x 2 choices, C(4,2) = 6 orders.
    topo::Route r = topo::Router(c).route(0, 2 + 2 * 4, 64);
    CHECK(r.paths == 24);
    CHECK(r.path_list.size() == 24);
    // (0,0) -> (1,0): one shortest path.
    CHECK(topo::Router(c).route(0, 1).paths == 1);
    check_symmetry_hint(c);
  }
  SECTION("4 x 4 x 4") {
    topo::Cluster c = small_cluster(64, fmt::format(fmt::runtime(torus), "4, 4, 4"), one);
    topo::TopologyMetrics m = topo::compute_metrics(c);
    CHECK(m.diameter_hops == 3 + 6 + 3);
    CHECK(m.bisection_bandwidth_Bps == Approx(2 * 16 * L));
    // Per node 4 links (PCIe uplink, device, NVSwitch port, NIC); 64 NIC cables; a ring of 4 per
    // line in each of 3 dimensions: 3 x 64 router links.
    CHECK(c.link_count() == 64 * 4 + 64 + 3 * 64);
  }
  SECTION("8 x 2: the narrow cut is across the long dimension") {
    topo::Cluster c = small_cluster(16, fmt::format(fmt::runtime(torus), "8, 2"), one);
    topo::TopologyMetrics m = topo::compute_metrics(c);
    // Cutting the 8-ring in half crosses 2 links in each of 2 rings; a ring of 2 is one link.
    CHECK(m.bisection_bandwidth_Bps == Approx(2 * 2 * L));
    CHECK(m.diameter_hops == 3 + 4 + 1 + 3);
  }
}

TEST_CASE("single switch: one hop between any two NICs") {
  topo::Cluster c = small_cluster(4, "single_switch { link_latency_s: 1e-7 }");
  topo::TopologyMetrics m = topo::compute_metrics(c);
  CHECK(m.diameter_hops == 6);
  CHECK(m.bisection_bandwidth_Bps == Approx(4 * 10e9));  // nodes {0,1} vs {2,3}: 4 NIC cables cross
  check_symmetry_hint(c);
}

TEST_CASE("NVLink mesh: a device's scale-up bandwidth is split over its peers") {
  topo::Cluster c = small_cluster(1, "", SmallNode{.devices = 4, .nics = 0, .scaleup_Bps = 192e9, .intra = "NVLINK_MESH"});
  topo::TopologyMetrics m = topo::compute_metrics(c);
  CHECK(m.devices[0].scaleup_Bps == Approx(192e9));
  CHECK(m.devices[0].scaleout_Bps == 0);  // no fabric
  topo::Route r = topo::Router(c).route(0, 3);
  CHECK(r.hops == 1);
  CHECK(r.bottleneck_Bps == Approx(64e9));
  // Devices {0,1} vs {2,3}: 4 mesh links of 64 GB/s cross, plus two devices' PCIe links through
  // the CPU.
  CHECK(m.bisection_bandwidth_Bps == Approx(4 * 64e9 + 2 * 64e9));
}

TEST_CASE("half-duplex scale-up links are marked on the graph and in the report") {
  for (bool half : {false, true}) {
    INFO("half duplex " << half);
    const topo::Cluster c = topo::load_cluster_text(
        fmt::format("name: \"shm\" nodes: 1 node {{ device {{ preset: \"h100-sxm5\" }} devices_per_node: 2 "
                    "intra_fabric: NVSWITCH scaleup_bandwidth_Bps: 10e9 scaleup_latency_s: 0 scaleup_half_duplex: {} "
                    "pcie {{ device_bandwidth_Bps: 1e9 latency_s: 1e-4 }} }}",
                    half),
        "shm.textproto");
    int scaleup = 0, marked = 0;
    for (topo::EdgeId e : boost::make_iterator_range(boost::edges(c.graph()))) {
      scaleup += c.graph()[e].kind == hw::SCALEUP;
      marked += c.graph()[e].half_duplex;
    }
    CHECK(scaleup == 4);
    CHECK(marked == (half ? 4 : 0));  // only the scale-up links, both directions
    const topo::TopologyMetrics m = topo::compute_metrics(c);
    CHECK(m.devices[0].scaleup_Bps == Approx(10e9));
    CHECK(m.devices[0].scaleup_half_duplex == half);
  }
}

TEST_CASE("scale-out bandwidth is the graph's fair share, not the NIC's datasheet figure") {
  SECTION("two devices share each NIC") {
    topo::Cluster c = small_cluster(2, "single_switch {}", SmallNode{.devices = 4, .nics = 2, .nic_Bps = 10e9});
    for (const topo::DeviceBandwidth& d : topo::compute_metrics(c).devices) CHECK(d.scaleout_Bps == Approx(5e9));
  }
  SECTION("a slow PCIe link caps the NIC") {
    topo::Cluster c = small_cluster(2, "single_switch {}", SmallNode{.nic_Bps = 50e9, .pcie_Bps = 16e9});
    for (const topo::DeviceBandwidth& d : topo::compute_metrics(c).devices) CHECK(d.scaleout_Bps == Approx(16e9));
  }
}

TEST_CASE("explicit fabric: switches and links written out join NIC ports") {
  std::string text = moesim::test::cluster_text(3, R"(explicit {
      switch { name: "a" } switch { name: "b" }
      link { a: "node0.nic0" b: "a" bandwidth_Bps: 10e9 } link { a: "node0.nic1" b: "b" bandwidth_Bps: 10e9 }
      link { a: "node1.nic0" b: "a" bandwidth_Bps: 10e9 } link { a: "node1.nic1" b: "b" bandwidth_Bps: 10e9 }
      link { a: "node2.nic0" b: "a" bandwidth_Bps: 10e9 } link { a: "node2.nic1" b: "b" bandwidth_Bps: 10e9 }
      link { a: "a" b: "b" bandwidth_Bps: 5e9 } })");
  topo::Cluster c = topo::load_cluster_text(text, "explicit.textproto");
  CHECK(c.fabric_kind() == "explicit");
  CHECK_FALSE(c.symmetry().nodes_equivalent);
  topo::Route r = topo::Router(c).route(0, 2);  // node0.gpu0 -> node1.gpu0 through switch a
  CHECK(r.hops == 6);
  CHECK(c.graph()[r.path_list[0][3]].name == "a");
}

TEST_CASE("explicit graph: any vertices and links") {
  topo::Cluster c = topo::load_cluster_text(R"(name: "two"
    device_type { name: "toy" peak_flops_per_s { fp32: 1e12 } memory_bytes: 1e9 memory_bandwidth_Bps: 1e11 }
    graph {
      vertex { name: "g0" kind: DEVICE device_type: "toy" node: 0 }
      vertex { name: "g1" kind: DEVICE device_type: "h100-sxm5" node: 1 }
      vertex { name: "sw" kind: SWITCH }
      link { a: "g0" b: "sw" bandwidth_Bps: 20e9 latency_s: 1e-6 kind: NETWORK }
      link { a: "g1" b: "sw" bandwidth_Bps: 10e9 latency_s: 1e-6 kind: NETWORK }
    })", "graph.textproto");
  CHECK(c.fabric_kind() == "explicit-graph");
  CHECK(c.device_count() == 2);
  CHECK(c.node_count() == 2);
  CHECK(c.device_type(0).name() == "toy");
  CHECK(c.device_type(1).name() == "H100-SXM5");
  topo::TopologyMetrics m = topo::compute_metrics(c);
  CHECK(m.bisection_bandwidth_Bps == Approx(10e9));
  CHECK(m.devices[0].scaleout_Bps == Approx(20e9));
  CHECK(m.diameter_hops == 2);
  CHECK(m.max_route_latency_s == Approx(2e-6));
}

TEST_CASE("every registered fabric generator and device preset has a description") {
  for (const auto& e : topo::fabric_generators().entries()) CHECK_FALSE(e.description.empty());
  for (const auto& e : topo::device_presets().entries()) {
    CHECK_FALSE(e.description.empty());
    CHECK(e.value.peak_flops_per_s().bf16() > 0);
  }
  // One generator per case of hw::Fabric, under the case's field name.
  const auto* oneof = hw::Fabric::descriptor()->FindOneofByName("kind");
  REQUIRE(oneof->field_count() == static_cast<int>(topo::fabric_generators().entries().size()));
  for (int i = 0; i < oneof->field_count(); ++i) CHECK(topo::fabric_generators().find(oneof->field(i)->name()) != nullptr);
}
