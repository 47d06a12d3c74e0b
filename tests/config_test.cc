// Config reading: parse errors keep line and column; scopes point at the line of each field;
// the precision policy and unit formatting.
#include "common/config.h"
#include "common/precision.h"
#include "common/units.h"
#include "topologies/hardware.pb.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

using namespace moesim;

TEST_CASE("a parse error keeps its line and column") {
  hw::Cluster c;
  try {
    ConfigDocument::parse_text("name: \"x\"\nnodes: 2\n  bogus_field: 3\n", "f.textproto", &c);
    FAIL("no error");
  } catch (const ConfigError& e) {
    REQUIRE(e.diagnostics().size() == 1);
    const Diagnostic& d = e.diagnostics()[0];
    CHECK(d.file == "f.textproto");
    CHECK(d.line == 3);
    CHECK(d.column > 0);  // protobuf points just past the unknown name
    CHECK(d.message.find("bogus_field") != std::string::npos);
    CHECK(d.to_string().rfind(fmt::format("f.textproto:3:{}: ", d.column), 0) == 0);
  }
}

TEST_CASE("scopes find the line of nested and repeated fields") {
  hw::Cluster c;
  ConfigDocument doc = ConfigDocument::parse_text(
      "name: \"x\"\n"
      "node {\n"
      "  devices_per_node: 8\n"
      "  nic { bandwidth_Bps: 1 }\n"
      "  nic {\n"
      "    bandwidth_Bps: 0\n"
      "  }\n"
      "}\n",
      "f.textproto", &c);
  Diagnostics diags;
  ConfigScope root = doc.root(&diags);
  ConfigScope node = root.child("node");
  CHECK(node.line() == 2);
  CHECK(node.line_of("devices_per_node") == 3);
  CHECK(node.child("nic", 1).line() == 5);
  CHECK(node.child("nic", 1).line_of("bandwidth_Bps") == 6);
  CHECK(node.line_of("host_memory_bytes") == 2);  // not written: the enclosing message's line
  CHECK(node.child("nic", 1).path_of("bandwidth_Bps") == "node.nic[1].bandwidth_Bps");

  CHECK(node.child("nic", 0).positive("bandwidth_Bps", Need::kRequired));
  CHECK_FALSE(node.child("nic", 1).positive("bandwidth_Bps", Need::kRequired));
  CHECK_FALSE(node.positive("host_memory_bytes", Need::kOptional));  // absent, optional: no problem
  CHECK_FALSE(root.require("nodes"));
  CHECK(node.in_range("devices_per_node", 1, 8, Need::kRequired));
  REQUIRE(diags.items().size() == 2);
  try {
    diags.throw_if_any();
    FAIL("no error");
  } catch (const ConfigError& e) {
    // Sorted by line.
    CHECK(e.diagnostics()[0].to_string() == "f.textproto:1: nodes: missing required value");
    CHECK(e.diagnostics()[1].to_string() == "f.textproto:6: node.nic[1].bandwidth_Bps: must be greater than zero, got 0");
  }
}

TEST_CASE("non-finite numbers are refused") {
  hw::Cluster c;
  ConfigDocument doc = ConfigDocument::parse_text("node { scaleup_bandwidth_Bps: inf scaleup_latency_s: nan }", "f", &c);
  Diagnostics diags;
  ConfigScope node = doc.root(&diags).child("node");
  CHECK_FALSE(node.positive("scaleup_bandwidth_Bps", Need::kRequired));
  CHECK_FALSE(node.positive("scaleup_latency_s", Need::kRequired, /*allow_zero=*/true));
  REQUIRE(diags.items().size() == 2);
  CHECK(diags.items()[0].message == "must be a finite number, got inf");
}

TEST_CASE("precision policy") {
  CHECK(approx_eq(1.0, 1.0 + 1e-12));
  CHECK_FALSE(approx_eq(1.0, 1.0 + 1e-6));
  CHECK(definitely_less(1.0, 1.1));
  CHECK_FALSE(definitely_less(1.0, 1.0 + 1e-12));
  CHECK(sub_snap(3.0, 3.0 + 1e-13) == 0.0);
  CHECK(sub_snap(3.0, 2.0) == 1.0);
}

TEST_CASE("units format with decimal prefixes") {
  CHECK(format_bandwidth(50e9) == "50 GB/s");
  CHECK(format_bytes(80e9) == "80 GB");
  CHECK(format_flops(989.4e12) == "989 TFLOP/s");
  CHECK(format_seconds(1.5e-6) == "1.5 us");
  CHECK(format_seconds(250e-9) == "250 ns");
  CHECK(format_seconds(0.02) == "20 ms");
}
