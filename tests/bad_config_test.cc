// Catalogue of bad hardware configs. Each case takes a known-good small cluster, breaks one thing
// and checks the exact diagnostic that loading reports: the line where the offending field is
// written (or, for a missing field, the line of the message that should hold it), the field path
// and the gist of the message.
#include "common/error.h"
#include "topologies/cluster.h"

#include "test_diagnostics.h"

#include <catch2/catch.hpp>

#include <string>
#include <utility>
#include <vector>

using moesim::ConfigError;
using moesim::Diagnostic;

namespace {

constexpr const char* kFile = "bad.textproto";

// A config as numbered lines, so that each case can say which line it breaks. set() replaces a
// line of the base (numbered 1..n as written below); a replacement spanning several lines shifts
// the lines after it in the text that is loaded.
class Config {
 public:
  explicit Config(std::vector<std::string> lines) : lines_(std::move(lines)) {}
  Config& set(int line, std::string text) {
    lines_.at(line - 1) = std::move(text);
    return *this;
  }
  std::string text() const {
    std::string out;
    for (const std::string& l : lines_) out += l + "\n";
    return out;
  }

 private:
  std::vector<std::string> lines_;
};

// Two nodes of two H100s on an NVSwitch, two NICs each, on a fat-tree of two leaves.
std::vector<std::string> node_lines() {
  return {
      /*  1 */ "name: \"bad\"",
      /*  2 */ "nodes: 2",
      /*  3 */ "node {",
      /*  4 */ "  name: \"n\"",
      /*  5 */ "  device { preset: \"h100-sxm5\" }",
      /*  6 */ "  devices_per_node: 2",
      /*  7 */ "  intra_fabric: NVSWITCH",
      /*  8 */ "  scaleup_bandwidth_Bps: 450e9",
      /*  9 */ "  scaleup_latency_s: 2e-6",
      /* 10 */ "  pcie { device_bandwidth_Bps: 64e9 latency_s: 250e-9 }",
      /* 11 */ "  nic {",
      /* 12 */ "    count: 2",
      /* 13 */ "    bandwidth_Bps: 50e9",
      /* 14 */ "    latency_s: 1e-6",
      /* 15 */ "  }",
      /* 16 */ "}",
  };
}

Config fat_tree_cluster() {
  std::vector<std::string> lines = node_lines();
  lines.insert(lines.end(), {
                                /* 17 */ "fabric {",
                                /* 18 */ "  fat_tree {",
                                /* 19 */ "    nics_per_leaf: 2",
                                /* 20 */ "    spines: 2",
                                /* 21 */ "  }",
                                /* 22 */ "}",
                            });
  return Config(lines);
}

// The same nodes on one switch written out: every NIC cabled to "sw".
Config explicit_fabric_cluster() {
  std::vector<std::string> lines = node_lines();
  lines.insert(lines.end(), {
                                /* 17 */ "fabric {",
                                /* 18 */ "  explicit {",
                                /* 19 */ "    switch { name: \"sw\" }",
                                /* 20 */ "    link { a: \"node0.nic0\" b: \"sw\" bandwidth_Bps: 50e9 }",
                                /* 21 */ "    link { a: \"node0.nic1\" b: \"sw\" bandwidth_Bps: 50e9 }",
                                /* 22 */ "    link { a: \"node1.nic0\" b: \"sw\" bandwidth_Bps: 50e9 }",
                                /* 23 */ "    link { a: \"node1.nic1\" b: \"sw\" bandwidth_Bps: 50e9 }",
                                /* 24 */ "  }",
                                /* 25 */ "}",
                            });
  return Config(lines);
}

// Two devices on one switch, as an explicit graph.
Config graph_cluster() {
  return Config({
      /* 1 */ "name: \"g\"",
      /* 2 */ "graph {",
      /* 3 */ "  vertex { name: \"gpu0\" kind: DEVICE device_type: \"h100-sxm5\" }",
      /* 4 */ "  vertex { name: \"gpu1\" kind: DEVICE device_type: \"h100-sxm5\" }",
      /* 5 */ "  vertex { name: \"sw\" kind: SWITCH }",
      /* 6 */ "  link { a: \"gpu0\" b: \"sw\" bandwidth_Bps: 450e9 kind: SCALEUP }",
      /* 7 */ "  link { a: \"gpu1\" b: \"sw\" bandwidth_Bps: 450e9 kind: SCALEUP }",
      /* 8 */ "}",
  });
}

// Every diagnostic loading `text` gives; fails the test when the config loads.
using moesim::test::describe;

std::vector<Diagnostic> diagnostics_of(const std::string& text) {
  return moesim::test::diagnostics_of([&] { (void)moesim::topo::load_cluster_text(text, kFile); }, text);
}

// The single diagnostic of a config with one problem.
Diagnostic only_diagnostic(const Config& config) {
  std::vector<Diagnostic> d = diagnostics_of(config.text());
  INFO(config.text() << "gave:\n" << describe(d));
  REQUIRE(d.size() == 1);
  return d[0];
}

// A validation problem: file, line and field path exact, no column, message containing `gist`.
void check(const Diagnostic& d, int line, const std::string& field_path, const std::string& gist) {
  INFO(d.to_string());
  CHECK(d.file == kFile);
  CHECK(d.line == line);
  CHECK(d.column == 0);
  CHECK(d.field_path == field_path);
  CHECK_THAT(d.message, Catch::Contains(gist));
}

// A text-format problem: file, line and column exact, no field path.
void check_parse(const Diagnostic& d, int line, int column, const std::string& gist) {
  INFO(d.to_string());
  CHECK(d.file == kFile);
  CHECK(d.line == line);
  CHECK(d.column == column);
  CHECK(d.field_path.empty());
  CHECK_THAT(d.message, Catch::Contains(gist));
}

}  // namespace

TEST_CASE("the good bases load, so every failure below comes from the one thing broken") {
  for (const Config& c : {fat_tree_cluster(), explicit_fabric_cluster(), graph_cluster()}) {
    INFO(c.text());
    CHECK_NOTHROW(moesim::topo::load_cluster_text(c.text(), kFile));
  }
  CHECK(moesim::topo::load_cluster_text(fat_tree_cluster().text(), kFile).device_count() == 4);
  CHECK(moesim::topo::load_cluster_text(graph_cluster().text(), kFile).device_count() == 2);
}

// ---------------------------------------------------------------------------------------------
// Text format.

TEST_CASE("syntax error: a missing colon keeps line and column, no field path") {
  //          1234567890123456789
  Config c = fat_tree_cluster().set(13, "    bandwidth_Bps 50e9");
  check_parse(only_diagnostic(c), 13, 19, "Expected \":\"");
}

TEST_CASE("syntax error: an unknown field is refused on its line") {
  // protobuf 3.21 reports the token after the name (the colon); moesim points at the name itself.
  Config c = fat_tree_cluster().set(9, "  scaleup_latency: 2e-6");
  check_parse(only_diagnostic(c), 9, 3, "no field named \"scaleup_latency\"");
}

TEST_CASE("syntax error: a value out of range for int32") {
  //          1234567
  Config c = fat_tree_cluster().set(2, "nodes: 3000000000");
  check_parse(only_diagnostic(c), 2, 8, "Integer out of range");
}

TEST_CASE("syntax error: a non-repeated field written twice") {
  Config c = fat_tree_cluster().set(6, "  devices_per_node: 2\n  devices_per_node: 2");
  std::vector<Diagnostic> d = diagnostics_of(c.text());
  INFO(describe(d));
  REQUIRE(d.size() == 1);
  CHECK(d[0].line == 7);
  CHECK(d[0].field_path.empty());
  CHECK_THAT(d[0].message, Catch::Contains("devices_per_node") && Catch::Contains("multiple times"));
}

TEST_CASE("syntax error: two kinds of fabric in one oneof") {
  Config c = fat_tree_cluster().set(21, "  }\n  single_switch { }");
  std::vector<Diagnostic> d = diagnostics_of(c.text());
  INFO(describe(d));
  REQUIRE(d.size() == 1);
  CHECK(d[0].line == 22);
  CHECK(d[0].field_path.empty());
  CHECK_THAT(d[0].message, Catch::Contains("oneof"));
}

// protobuf's parser reports an unknown enum value at the token after the value (here the next
// line's field name, 8:3); moesim moves it back to the value the message quotes.
TEST_CASE("syntax error: an unknown enum value is refused on its own line") {
  //          12345678901234567
  Config c = fat_tree_cluster().set(7, "  intra_fabric: NVLINK");
  Diagnostic d = only_diagnostic(c);
  INFO(d.to_string());
  CHECK(d.line == 7);
  CHECK(d.column > 0);
  CHECK(d.field_path.empty());
  CHECK_THAT(d.message, Catch::Contains("Unknown enumeration value of \"NVLINK\""));
}

// Same, with the value given as a number.
TEST_CASE("syntax error: an enum value given by an unknown number is refused on its own line") {
  Config c = fat_tree_cluster().set(7, "  intra_fabric: 7");
  Diagnostic d = only_diagnostic(c);
  INFO(d.to_string());
  CHECK(d.line == 7);
  CHECK(d.field_path.empty());
  CHECK_THAT(d.message, Catch::Contains("intra_fabric"));
}

// ---------------------------------------------------------------------------------------------
// Missing values: reported at the line of the message that should hold them.

TEST_CASE("missing value: the cluster has no name") {
  Config c = fat_tree_cluster().set(1, "");
  check(only_diagnostic(c), 1, "name", "missing required value");
}

TEST_CASE("missing value: the node has no devices_per_node") {
  Config c = fat_tree_cluster().set(6, "");
  check(only_diagnostic(c), 3, "node.devices_per_node", "missing required value");
}

TEST_CASE("missing value: the node has no intra_fabric") {
  Config c = fat_tree_cluster().set(7, "");
  check(only_diagnostic(c), 3, "node.intra_fabric", "missing required value: NVSWITCH, NVLINK_MESH or PCIE_TREE");
}

TEST_CASE("missing value: the NIC has no bandwidth") {
  Config c = fat_tree_cluster().set(13, "");
  check(only_diagnostic(c), 11, "node.nic[0].bandwidth_Bps", "missing required value");
}

TEST_CASE("missing value: an empty config lacks name, node and nodes") {
  std::vector<Diagnostic> d = diagnostics_of("");
  INFO(describe(d));
  REQUIRE(d.size() == 3);
  check(d[0], 1, "name", "missing required value");
  check(d[1], 1, "node", "missing required value");
  check(d[2], 1, "nodes", "missing required value");
}

TEST_CASE("missing value: a device without preset lacks its peak, memory and memory bandwidth") {
  Config c = fat_tree_cluster().set(5, "  device { name: \"x\" }");
  std::vector<Diagnostic> d = diagnostics_of(c.text());
  INFO(describe(d));
  REQUIRE(d.size() == 3);
  check(d[0], 5, "node.device.peak_flops_per_s", "missing required value");
  check(d[1], 5, "node.device.memory_bytes", "missing required value");
  check(d[2], 5, "node.device.memory_bandwidth_Bps", "missing required value");
}

TEST_CASE("missing value: two CPU sockets without a socket bandwidth") {
  Config c = fat_tree_cluster().set(9, "  scaleup_latency_s: 2e-6 cpu_sockets: 2");
  check(only_diagnostic(c), 3, "node.socket_bandwidth_Bps", "missing required value");
}

TEST_CASE("missing value: a rail-optimised fabric without spines") {
  Config c = fat_tree_cluster().set(18, "  rail_optimized {").set(19, "    nodes_per_group: 2").set(20, "");
  check(only_diagnostic(c), 18, "fabric.rail_optimized.spines", "missing required value");
}

TEST_CASE("missing value: two nodes without a fabric") {
  Config c = fat_tree_cluster();
  for (int line = 17; line <= 22; ++line) c.set(line, "");
  // No fabric is written: the diagnostic points at the cluster itself (line 1).
  check(only_diagnostic(c), 1, "fabric", "missing required value: 2 nodes need a fabric");
}

TEST_CASE("missing value: a fabric with none of its kinds chosen") {
  Config c = fat_tree_cluster().set(18, "").set(19, "").set(20, "").set(21, "");
  check(only_diagnostic(c), 17, "fabric", "choose one fabric: single_switch, fat_tree");
}

// ---------------------------------------------------------------------------------------------
// Numbers out of range.

TEST_CASE("bad number: zero NIC bandwidth") {
  Config c = fat_tree_cluster().set(13, "    bandwidth_Bps: 0");
  check(only_diagnostic(c), 13, "node.nic[0].bandwidth_Bps", "must be greater than zero, got 0");
}

TEST_CASE("bad number: negative NIC bandwidth") {
  Config c = fat_tree_cluster().set(13, "    bandwidth_Bps: -50e9");
  Diagnostic d = only_diagnostic(c);
  check(d, 13, "node.nic[0].bandwidth_Bps", "must be greater than zero, got -");
  CHECK_THAT(d.message, Catch::Contains("50000000000") || Catch::Contains("5e+10"));
}

TEST_CASE("bad number: an absurd bandwidth, latency or memory is refused") {
  check(only_diagnostic(fat_tree_cluster().set(13, "    bandwidth_Bps: 1e300")), 13, "node.nic[0].bandwidth_Bps",
        "must be at most 1e+15, got 1e+300");
  check(only_diagnostic(fat_tree_cluster().set(14, "    latency_s: 3600")), 14, "node.nic[0].latency_s",
        "must be at most 1, got 3600");
  check(only_diagnostic(fat_tree_cluster().set(5, "  device { preset: \"h100-sxm5\" memory_bytes: 1e40 }")), 5,
        "node.device.memory_bytes", "must be at most 1e+15");
}

TEST_CASE("bad number: NaN NIC bandwidth") {
  Config c = fat_tree_cluster().set(13, "    bandwidth_Bps: nan");
  check(only_diagnostic(c), 13, "node.nic[0].bandwidth_Bps", "must be a finite number, got nan");
}

TEST_CASE("bad number: the second NIC entry is named by its index and line") {
  Config c = fat_tree_cluster().set(15, "  }\n  nic { count: 1 bandwidth_Bps: 0 }");
  check(only_diagnostic(c), 16, "node.nic[1].bandwidth_Bps", "must be greater than zero, got 0");
}

TEST_CASE("bad number: a preset's value overridden with a negative one") {
  Config c = fat_tree_cluster().set(5, "  device { preset: \"h100-sxm5\" memory_bytes: -1 }");
  check(only_diagnostic(c), 5, "node.device.memory_bytes", "must be greater than zero, got -1");
}

TEST_CASE("bad number: infinite scale-up bandwidth") {
  Config c = fat_tree_cluster().set(8, "  scaleup_bandwidth_Bps: inf");
  check(only_diagnostic(c), 8, "node.scaleup_bandwidth_Bps", "must be a finite number, got inf");
}

TEST_CASE("bad number: devices_per_node zero") {
  Config c = fat_tree_cluster().set(6, "  devices_per_node: 0");
  check(only_diagnostic(c), 6, "node.devices_per_node", "must be between 1 and 1024, got 0");
}

TEST_CASE("bad number: negative node count") {
  Config c = fat_tree_cluster().set(2, "nodes: -2");
  check(only_diagnostic(c), 2, "nodes", "must be between 1 and 1048576, got -2");
}

TEST_CASE("bad number: fat-tree oversubscription below 1") {
  Config c = fat_tree_cluster().set(21, "    oversubscription: 0.5\n  }");
  check(only_diagnostic(c), 21, "fabric.fat_tree.oversubscription",
        "must be a finite ratio of at least 1 (down:up), got 0.5");
}

// ---------------------------------------------------------------------------------------------
// Node template.

TEST_CASE("node: unknown device preset lists the registered names") {
  Config c = fat_tree_cluster().set(5, "  device { preset: \"h200-nope\" }");
  Diagnostic d = only_diagnostic(c);
  check(d, 5, "node.device.preset", "unknown device type 'h200-nope'; registered: ");
  for (const char* name : {"h100-sxm5", "h800-sxm5", "a100-sxm4-80gb", "a100-sxm4-40gb", "mi300x"})
    CHECK_THAT(d.message, Catch::Contains(name));
}

TEST_CASE("node: PCIE_TREE with a scale-up bandwidth") {
  Config c = fat_tree_cluster().set(7, "  intra_fabric: PCIE_TREE");
  check(only_diagnostic(c), 8, "node.scaleup_bandwidth_Bps", "a PCIE_TREE node has no scale-up links");
}

TEST_CASE("node: NIC affinity names a device outside the node") {
  // count defaults to 1; the node has devices 0 and 1.
  Config c = fat_tree_cluster().set(12, "    devices: 5");
  check(only_diagnostic(c), 12, "node.nic[0].devices[0]", "device 5 is not in this node (0..1)");
}

TEST_CASE("node: NIC affinity lists a device twice") {
  Config c = fat_tree_cluster().set(12, "    devices: 1\n    devices: 1");
  check(only_diagnostic(c), 13, "node.nic[0].devices[1]", "device 1 listed twice");
}

TEST_CASE("node: NIC affinity on a NIC entry with count 2") {
  Config c = fat_tree_cluster().set(14, "    latency_s: 1e-6\n    devices: 0");
  check(only_diagnostic(c), 15, "node.nic[0].devices", "a PCIe affinity list describes one NIC");
}

TEST_CASE("node: a fabric but no NIC to attach to") {
  Config c = fat_tree_cluster();
  for (int line = 11; line <= 15; ++line) c.set(line, "");
  check(only_diagnostic(c), 3, "node.nic", "the fabric needs at least one NIC per node");
}

// ---------------------------------------------------------------------------------------------
// Fabrics.

TEST_CASE("torus: dimensions that do not multiply to the node count") {
  Config c = fat_tree_cluster()
                 .set(18, "  torus {")
                 .set(19, "    dims: 2")
                 .set(20, "    dims: 2")
                 .set(21, "    link_bandwidth_Bps: 50e9 }");
  check(only_diagnostic(c), 19, "fabric.torus.dims", "the dimensions multiply to 4 but the cluster has 2 nodes");
}

TEST_CASE("torus: four dimensions") {
  Config c = fat_tree_cluster()
                 .set(18, "  torus {")
                 .set(19, "    dims: 1")
                 .set(20, "    dims: 2\n    dims: 1\n    dims: 1")
                 .set(21, "    link_bandwidth_Bps: 50e9 }");
  check(only_diagnostic(c), 19, "fabric.torus.dims", "a torus has 2 or 3 dimensions, got 4");
}

TEST_CASE("torus: a zero dimension is named by its index") {
  Config c = fat_tree_cluster()
                 .set(18, "  torus {")
                 .set(19, "    dims: 2")
                 .set(20, "    dims: 0")
                 .set(21, "    link_bandwidth_Bps: 50e9 }");
  check(only_diagnostic(c), 20, "fabric.torus.dims[1]", "each dimension must be between 1 and 1048576, got 0");
}

TEST_CASE("explicit fabric: a link to an undeclared switch") {
  Config c = explicit_fabric_cluster().set(23, "    link { a: \"node1.nic1\" b: \"sx\" bandwidth_Bps: 50e9 }");
  check(only_diagnostic(c), 23, "fabric.explicit.link[3].b", "'sx' is neither a switch of this fabric nor a NIC port");
}

TEST_CASE("explicit fabric: a link to a NIC port beyond the node's NICs") {
  Config c = explicit_fabric_cluster().set(23, "    link { a: \"node1.nic2\" b: \"sw\" bandwidth_Bps: 50e9 }");
  check(only_diagnostic(c), 23, "fabric.explicit.link[3].a", "(N < 2, K < 2)");
}

TEST_CASE("explicit fabric: a switch declared twice") {
  Config c = explicit_fabric_cluster().set(19, "    switch { name: \"sw\" }\n    switch { name: \"sw\" }");
  check(only_diagnostic(c), 20, "fabric.explicit.switch[1].name", "duplicate vertex name 'sw'");
}

TEST_CASE("explicit fabric: a declared vertex that is not a switch") {
  Config c = explicit_fabric_cluster().set(19, "    switch { name: \"sw\" kind: DEVICE }");
  check(only_diagnostic(c), 19, "fabric.explicit.switch[0].kind", "an explicit fabric declares switches only");
}

TEST_CASE("explicit fabric: node 1's NICs left unattached disconnect the cluster") {
  Config c = explicit_fabric_cluster().set(22, "").set(23, "");
  check(only_diagnostic(c), 17, "fabric", "the cluster is disconnected: node0.gpu0 and node1.gpu0 cannot reach");
}

// ---------------------------------------------------------------------------------------------
// Explicit graphs.

TEST_CASE("graph: a link to a missing vertex") {
  Config c = graph_cluster().set(7, "  link { a: \"gpu1\" b: \"sw2\" bandwidth_Bps: 450e9 kind: SCALEUP }");
  check(only_diagnostic(c), 7, "graph.link[1].b", "no vertex named 'sw2' in this graph");
}

TEST_CASE("graph: a vertex name used twice") {
  Config c = graph_cluster().set(5, "  vertex { name: \"sw\" kind: SWITCH }\n  vertex { name: \"sw\" kind: SWITCH }");
  check(only_diagnostic(c), 6, "graph.vertex[3].name", "duplicate vertex name 'sw'");
}

TEST_CASE("graph: an unknown device type") {
  Config c = graph_cluster().set(4, "  vertex { name: \"gpu1\" kind: DEVICE device_type: \"tpu\" }");
  Diagnostic d = only_diagnostic(c);
  check(d, 4, "graph.vertex[1].device_type", "unknown device type 'tpu'");
  CHECK_THAT(d.message, Catch::Contains("h100-sxm5"));
}

TEST_CASE("graph: two devices and no link are disconnected") {
  Config c = graph_cluster().set(5, "").set(6, "").set(7, "");
  check(only_diagnostic(c), 2, "graph", "the cluster is disconnected: gpu0 and gpu1 cannot reach each other");
}

TEST_CASE("graph: a one-way link leaves the devices disconnected") {
  Config c = graph_cluster()
                 .set(5, "")
                 .set(6, "  link { a: \"gpu0\" b: \"gpu1\" bandwidth_Bps: 450e9 kind: SCALEUP bidirectional: false }")
                 .set(7, "");
  check(only_diagnostic(c), 2, "graph", "the cluster is disconnected");
}

TEST_CASE("graph: no DEVICE vertex") {
  Config c = graph_cluster()
                 .set(3, "  vertex { name: \"gpu0\" kind: HOST }")
                 .set(4, "  vertex { name: \"gpu1\" kind: HOST }")
                 .set(6, "  link { a: \"gpu0\" b: \"sw\" bandwidth_Bps: 450e9 kind: PCIE }")
                 .set(7, "  link { a: \"gpu1\" b: \"sw\" bandwidth_Bps: 450e9 kind: PCIE }");
  // A problem with the vertex list as a whole points at its first entry.
  check(only_diagnostic(c), 3, "graph.vertex", "the graph has no DEVICE vertex");
}

TEST_CASE("graph and node given together") {
  Config c = graph_cluster().set(8, "}\nnodes: 1\nnode { devices_per_node: 1 }");
  check(only_diagnostic(c), 2, "graph", "either as node + nodes + fabric or as an explicit graph, not both");
}

// ---------------------------------------------------------------------------------------------
// Size limits.

TEST_CASE("size: a million nodes of 1024 devices is refused before building") {
  Config c = fat_tree_cluster().set(2, "nodes: 1000000").set(6, "  devices_per_node: 1024");
  Diagnostic d = only_diagnostic(c);
  check(d, 2, "nodes", "the cluster would have 1024000000 devices");
  CHECK_THAT(d.message, Catch::Contains("the limits are 1048576, 8388608 and 67108864"));
}

// ---------------------------------------------------------------------------------------------
// Several problems at once.

TEST_CASE("several problems: every one is reported, sorted by line") {
  Config c = fat_tree_cluster()
                 .set(13, "    bandwidth_Bps: nan")   // reported at line 13
                 .set(1, "")                         // name missing: line 1
                 .set(8, "  scaleup_bandwidth_Bps: -1")
                 .set(6, "  devices_per_node: 0");
  std::vector<Diagnostic> d = diagnostics_of(c.text());
  INFO(describe(d));
  REQUIRE(d.size() == 4);
  for (size_t i = 1; i < d.size(); ++i) CHECK(d[i - 1].line <= d[i].line);
  check(d[0], 1, "name", "missing required value");
  check(d[1], 6, "node.devices_per_node", "must be between 1 and 1024, got 0");
  check(d[2], 8, "node.scaleup_bandwidth_Bps", "must be greater than zero, got -1");
  check(d[3], 13, "node.nic[0].bandwidth_Bps", "must be a finite number, got nan");
}

TEST_CASE("several problems: the explicit graph reports every bad link and vertex") {
  Config c = graph_cluster()
                 .set(3, "  vertex { name: \"gpu0\" kind: DEVICE }")
                 .set(6, "  link { a: \"gpu0\" b: \"gpu0\" bandwidth_Bps: 0 kind: SCALEUP }")
                 .set(7, "  link { a: \"gpu1\" b: \"nowhere\" bandwidth_Bps: 450e9 kind: SCALEUP }");
  std::vector<Diagnostic> d = diagnostics_of(c.text());
  INFO(describe(d));
  REQUIRE(d.size() == 4);
  for (size_t i = 1; i < d.size(); ++i) CHECK(d[i - 1].line <= d[i].line);
  check(d[0], 3, "graph.vertex[0].device_type", "missing required value");
  check(d[1], 6, "graph.link[0].b", "a link cannot join a vertex to itself");
  check(d[2], 6, "graph.link[0].bandwidth_Bps", "must be greater than zero, got 0");
  check(d[3], 7, "graph.link[1].b", "no vertex named 'nowhere'");
}

// The fabric is checked even when the node has problems, so a user sees both at once.
TEST_CASE("several problems: a node problem and a fabric problem are both reported") {
  Config c = fat_tree_cluster()
                 .set(13, "    bandwidth_Bps: 0")
                 .set(21, "    oversubscription: 0.5\n  }");
  std::vector<Diagnostic> d = diagnostics_of(c.text());
  INFO(describe(d));
  REQUIRE(d.size() == 2);
  check(d[0], 13, "node.nic[0].bandwidth_Bps", "must be greater than zero, got 0");
  check(d[1], 21, "fabric.fat_tree.oversubscription", "at least 1");
}

// An unknown preset does not hide the rest of the file's problems.
TEST_CASE("several problems: an unknown preset and a bad NIC bandwidth are both reported") {
  Config c = fat_tree_cluster()
                 .set(5, "  device { preset: \"h200-nope\" }")
                 .set(13, "    bandwidth_Bps: 0");
  std::vector<Diagnostic> d = diagnostics_of(c.text());
  INFO(describe(d));
  REQUIRE(d.size() == 2);
  check(d[0], 5, "node.device.preset", "unknown device type 'h200-nope'");
  check(d[1], 13, "node.nic[0].bandwidth_Bps", "must be greater than zero, got 0");
}

// ---------------------------------------------------------------------------------------------
// Files.

TEST_CASE("missing file: a ConfigError naming the file") {
  const std::string path = "/nonexistent/moesim/no-such-cluster.textproto";
  try {
    (void)moesim::topo::load_cluster(path);
    FAIL("loaded a file that does not exist");
  } catch (const ConfigError& e) {
    REQUIRE(e.diagnostics().size() == 1);
    const Diagnostic& d = e.diagnostics()[0];
    CHECK(d.file == path);
    CHECK(d.field_path.empty());
    CHECK_THAT(d.message, Catch::Contains("cannot open file"));
    CHECK_THAT(std::string(e.what()), Catch::Contains(path));
  }
}

TEST_CASE("a price per device hour must be a positive number") {
  Config c = fat_tree_cluster().set(1, "name: \"bad\"\nprice_per_device_hour: -2");
  check(only_diagnostic(c), 2, "price_per_device_hour", "must be");
}

TEST_CASE("a rendezvous has an eager limit above 0 and a latency of at least 0") {
  Config no_limit = fat_tree_cluster().set(1, "name: \"bad\"\nrendezvous { latency_s: 1e-6 }");
  check(only_diagnostic(no_limit), 2, "rendezvous.eager_limit_bytes", "required");
  Config negative =
      fat_tree_cluster().set(1, "name: \"bad\"\nnetwork_rendezvous { eager_limit_bytes: 65536 latency_s: -1e-6 }");
  check(only_diagnostic(negative), 2, "network_rendezvous.latency_s", "must be");
  Config zero = fat_tree_cluster().set(1, "name: \"bad\"\nrendezvous { eager_limit_bytes: 0 latency_s: 1e-6 }");
  check(only_diagnostic(zero), 2, "rendezvous.eager_limit_bytes", "greater than zero");
}

TEST_CASE("a collective efficiency names a known collective once, with an efficiency above 0 and at most 10") {
  Config unknown = fat_tree_cluster().set(1, "name: \"bad\"\ncollective_efficiency { op: \"allreduce\" bandwidth_efficiency: 0.5 }");
  check(only_diagnostic(unknown), 2, "collective_efficiency[0].op", "'allreduce' is not a collective");
  Config zero = fat_tree_cluster().set(1, "name: \"bad\"\ncollective_efficiency { op: \"all_reduce\" bandwidth_efficiency: 0 }");
  check(only_diagnostic(zero), 2, "collective_efficiency[0].bandwidth_efficiency", "greater than zero");
  Config twice = fat_tree_cluster().set(1, "name: \"bad\"\ncollective_efficiency { op: \"all_reduce\" bandwidth_efficiency: 0.5 }\n"
                                            "collective_efficiency { op: \"all_reduce\" bandwidth_efficiency: 0.7 }");
  check(only_diagnostic(twice), 3, "collective_efficiency[1].op", "efficiency already");
  Config negative = fat_tree_cluster().set(
      1, "name: \"bad\"\ncollective_efficiency { op: \"all_gather\" bandwidth_efficiency: 1 latency_s: -1e-6 }");
  check(only_diagnostic(negative), 2, "collective_efficiency[0].latency_s", "");
}
