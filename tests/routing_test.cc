// Routing on small explicit graphs: cost metric, ECMP sets, transit rules, hop lists.
#include "topologies/routing.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <cstdio>

#include <string>

using namespace moesim;

namespace {

// Devices g0..g{n-1} and the given switches and links (`a b bandwidth latency` per entry).
topo::Cluster graph(int devices, std::vector<std::string> switches, std::vector<std::string> links,
                    const std::string& extra_vertices = "") {
  std::string text = "name: \"g\"\ngraph {\n";
  for (int d = 0; d < devices; ++d) text += fmt::format("  vertex {{ name: \"g{}\" kind: DEVICE device_type: \"h100-sxm5\" }}\n", d);
  for (const std::string& s : switches) text += fmt::format("  vertex {{ name: \"{}\" kind: SWITCH }}\n", s);
  text += extra_vertices;
  for (const std::string& l : links) {
    char a[32], b[32];
    double bw, lat;
    REQUIRE(std::sscanf(l.c_str(), "%31s %31s %lf %lf", a, b, &bw, &lat) == 4);
    text += fmt::format("  link {{ a: \"{}\" b: \"{}\" bandwidth_Bps: {} latency_s: {} }}\n", a, b, bw, lat);
  }
  return topo::load_cluster_text(text + "}\n", "graph.textproto");
}

std::vector<std::string> names(const topo::Cluster& c, const std::vector<topo::VertexId>& path) {
  std::vector<std::string> out;
  for (topo::VertexId v : path) out.push_back(c.graph()[v].name);
  return out;
}

}  // namespace

TEST_CASE("a route prefers fast links over few hops when the reference transfer is faster") {
  // Direct 1 GB/s link (1 MiB: ~1 ms) vs two 100 GB/s hops (~21 us).
  topo::Cluster c = graph(2, {"s"}, {"g0 g1 1e9 1e-6", "g0 s 100e9 1e-6", "s g1 100e9 1e-6"});
  topo::Route r = topo::Router(c).route(0, 1);
  CHECK(r.hops == 2);
  CHECK(r.bottleneck_Bps == Approx(100e9));
  CHECK(r.latency_s == Approx(2e-6));
  REQUIRE(r.path_list.size() == 1);
  CHECK(names(c, r.path_list[0]) == std::vector<std::string>{"g0", "s", "g1"});
}

TEST_CASE("equal-cost paths form the ECMP set, each spelled out") {
  topo::Cluster c = graph(2, {"s1", "s2", "s3"},
                          {"g0 s1 10e9 1e-6", "s1 g1 10e9 1e-6", "g0 s2 10e9 1e-6", "s2 g1 10e9 1e-6",
                           "g0 s3 5e9 1e-6", "s3 g1 5e9 1e-6"});  // s3 is slower: not equal cost
  topo::Route r = topo::Router(c).route(0, 1);
  CHECK(r.paths == 2);
  REQUIRE(r.path_list.size() == 2);
  CHECK(names(c, r.path_list[0])[1] != names(c, r.path_list[1])[1]);
  for (const auto& p : r.path_list) CHECK(names(c, p)[1] != "s3");
  // max_paths bounds the list, not the count.
  topo::Route one = topo::Router(c).route(0, 1, 1);
  CHECK(one.paths == 2);
  CHECK(one.path_list.size() == 1);
}

TEST_CASE("routes never pass through a third device") {
  // g0 - g1 - g2 over fast links, and g0 - s - g2 over slow ones: g0 -> g2 must take s.
  topo::Cluster c = graph(3, {"s"}, {"g0 g1 100e9 1e-6", "g1 g2 100e9 1e-6", "g0 s 1e9 1e-6", "s g2 1e9 1e-6"});
  topo::Route r = topo::Router(c).route(0, 2);
  REQUIRE(r.reachable());
  CHECK(names(c, r.path_list[0]) == std::vector<std::string>{"g0", "s", "g2"});
  CHECK(r.bottleneck_Bps == Approx(1e9));
}

TEST_CASE("routes_from gives every destination, itself at zero hops") {
  topo::Cluster c = graph(3, {"s"}, {"g0 s 10e9 1e-6", "g1 s 20e9 2e-6", "g2 s 30e9 3e-6"});
  std::vector<topo::RouteSummary> routes = topo::Router(c).routes_from(1);
  REQUIRE(routes.size() == 3);
  CHECK(routes[1].hops == 0);
  CHECK(routes[1].paths == 1);
  CHECK(routes[0].hops == 2);
  CHECK(routes[0].bottleneck_Bps == Approx(10e9));
  CHECK(routes[0].latency_s == Approx(3e-6));
  CHECK(routes[2].bottleneck_Bps == Approx(20e9));
  CHECK(routes[2].latency_s == Approx(5e-6));
}

TEST_CASE("one-way links are honoured") {
  // g0 -> g1 directly (one way); g1 -> g0 only around through s.
  std::string text = R"(name: "oneway" graph {
    vertex { name: "g0" kind: DEVICE device_type: "h100-sxm5" }
    vertex { name: "g1" kind: DEVICE device_type: "h100-sxm5" }
    vertex { name: "s" kind: SWITCH }
    link { a: "g0" b: "g1" bandwidth_Bps: 100e9 bidirectional: false }
    link { a: "g1" b: "s" bandwidth_Bps: 10e9 }
    link { a: "s" b: "g0" bandwidth_Bps: 10e9 }
  })";
  topo::Cluster c = topo::load_cluster_text(text, "oneway.textproto");
  CHECK(c.link_count() == 3);
  CHECK(c.directed_link_count() == 5);
  topo::Router router(c);
  CHECK(router.route(0, 1).hops == 1);
  CHECK(router.route(1, 0).hops == 2);
}

TEST_CASE("a route that enters another node does not leave it again") {
  // Two paths from g0 to g1: through node 5's switch (entering and leaving node 5, cheaper)
  // or through the fabric switch f (dearer). Transit through a third node is not allowed.
  std::string extra = R"(  vertex { name: "n5" kind: SWITCH node: 5 }
  vertex { name: "f" kind: SWITCH }
)";
  topo::Cluster c = graph(2, {}, {"g0 n5 100e9 0", "n5 g1 100e9 0", "g0 f 10e9 0", "f g1 10e9 0"}, extra);
  topo::Route r = topo::Router(c).route(0, 1);
  CHECK(names(c, r.path_list[0]) == std::vector<std::string>{"g0", "f", "g1"});
}
