#include "topologies/report.h"

#include "common/error.h"
#include "common/json.h"
#include "common/precision.h"
#include "common/units.h"

#include <fmt/format.h>
#include <fmt/ostream.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>

namespace moesim::topo {

report::TopologyReport make_report(const Cluster& c, const TopologyMetrics& m) {
  report::TopologyReport r;
  r.set_name(c.name());
  r.set_description(c.spec().description());
  r.set_source(c.source());
  r.set_fabric(c.fabric_kind());
  r.set_device_count(c.device_count());
  r.set_node_count(c.node_count());
  r.set_link_count(c.link_count());
  r.set_directed_link_count(c.directed_link_count());
  r.set_vertex_count(c.vertex_count());
  const Graph& g = c.graph();
  for (VertexId v = 0; v < boost::num_vertices(g); ++v) {
    if (g[v].kind == hw::SWITCH) r.set_switch_count(r.switch_count() + 1);
    if (g[v].kind == hw::NIC) r.set_nic_count(r.nic_count() + 1);
    if (g[v].kind == hw::HOST) r.set_host_count(r.host_count() + 1);
  }
  r.set_bisection_bandwidth_bps(m.bisection_bandwidth_Bps);
  r.set_diameter_hops(m.diameter_hops);
  r.set_max_route_latency_s(m.max_route_latency_s);
  r.set_diameter_sources(m.sources_examined);
  for (const hw::DeviceType& t : c.device_types()) *r.add_device_types() = t;
  for (int d = 0; d < c.device_count(); ++d) {
    const hw::DeviceType& t = c.device_type(d);
    r.set_total_device_memory_bytes(r.total_device_memory_bytes() + t.memory_bytes());
    r.set_total_peak_bf16_flops_per_s(r.total_peak_bf16_flops_per_s() + t.peak_flops_per_s().bf16());
    report::DeviceReport* dr = r.add_devices();
    dr->set_rank(d);
    dr->set_name(g[c.device(d).vertex].name);
    dr->set_node(c.device(d).node);
    dr->set_type(t.name());
    dr->set_scaleup_bandwidth_bps(m.devices[d].scaleup_Bps);
    dr->set_scaleup_half_duplex(m.devices[d].scaleup_half_duplex);
    dr->set_scaleout_bandwidth_bps(m.devices[d].scaleout_Bps);
    dr->set_host_bandwidth_bps(m.devices[d].host_Bps);
  }
  *r.mutable_collective_efficiency() = c.spec().collective_efficiency();
  if (c.spec().has_rendezvous()) *r.mutable_rendezvous() = c.spec().rendezvous();
  if (c.spec().has_network_rendezvous()) *r.mutable_network_rendezvous() = c.spec().network_rendezvous();
  for (const RouteClass& k : m.route_classes) {
    report::RouteClassReport* rc = r.add_routes_from_device0();
    rc->set_same_node(k.same_node);
    rc->set_destinations(k.destinations);
    rc->set_hops(k.hops);
    rc->set_bottleneck_bps(k.bottleneck_Bps);
    rc->set_latency_s(k.latency_s);
    rc->set_ecmp_paths(static_cast<uint32_t>(std::min<uint64_t>(k.paths, UINT32_MAX)));
  }
  return r;
}

std::string report_json(const report::TopologyReport& r) { return to_json(r); }

namespace {

// "50 GB/s" when every device has it, "25 GB/s .. 50 GB/s" otherwise.
template <typename Get>
std::string device_range(const report::TopologyReport& r, Get get, std::string (*fmt_one)(double)) {
  double lo = std::numeric_limits<double>::infinity(), hi = 0;
  for (const report::DeviceReport& d : r.devices()) {
    lo = std::min(lo, get(d));
    hi = std::max(hi, get(d));
  }
  return approx_eq(lo, hi) ? fmt_one(hi) : fmt::format("{} .. {}", fmt_one(lo), fmt_one(hi));
}

}  // namespace

void print_report_table(const report::TopologyReport& r, std::ostream& out) {
  auto line = [&](std::string_view key, const std::string& value) { fmt::print(out, "  {:<22}{}\n", key, value); };
  fmt::print(out, "cluster {}  ({})\n", r.name(), r.source());
  if (!r.description().empty()) fmt::print(out, "  {}\n", r.description());
  std::string types;
  for (const hw::DeviceType& t : r.device_types()) types += (types.empty() ? "" : ", ") + t.name();
  line("devices", fmt::format("{} ({}) in {} node{}", r.device_count(), types, r.node_count(), r.node_count() == 1 ? "" : "s"));
  line("fabric", r.fabric());
  line("graph", fmt::format("{} vertices ({} devices, {} NICs, {} switches, {} hosts), {} links ({} directed)",
                            r.vertex_count(), r.device_count(), r.nic_count(), r.switch_count(), r.host_count(),
                            r.link_count(), r.directed_link_count()));
  line("peak compute", fmt::format("{} bf16 dense", format_flops(r.total_peak_bf16_flops_per_s())));
  line("device memory", format_bytes(r.total_device_memory_bytes()));
  const bool half_duplex = std::any_of(r.devices().begin(), r.devices().end(),
                                       [](const report::DeviceReport& d) { return d.scaleup_half_duplex(); });
  line("scale-up / device", device_range(r, [](auto& d) { return d.scaleup_bandwidth_bps(); }, format_bandwidth) +
                                (half_duplex ? " (half-duplex: both directions together)" : ""));
  line("scale-out / device", device_range(r, [](auto& d) { return d.scaleout_bandwidth_bps(); }, format_bandwidth));
  line("host link / device", device_range(r, [](auto& d) { return d.host_bandwidth_bps(); }, format_bandwidth));
  line("bisection bandwidth", format_bandwidth(r.bisection_bandwidth_bps()) + " (one direction)");
  line("diameter", fmt::format("{} hops, longest route latency {} (routes from {} of {} devices)", r.diameter_hops(),
                               format_seconds(r.max_route_latency_s()), r.diameter_sources(), r.device_count()));
  std::vector<std::string> library;
  for (const hw::CollectiveEfficiency& e : r.collective_efficiency())
    library.push_back(fmt::format("{} at {:.2f} of the links", e.op(), e.bandwidth_efficiency()));
  auto rendezvous = [&](const hw::Rendezvous& v, std::string_view where) {
    library.push_back(fmt::format("rendezvous {} more over {} a message ({})", format_seconds(v.latency_s()),
                                  format_bytes(v.eager_limit_bytes()), where));
  };
  if (r.has_rendezvous()) rendezvous(r.rendezvous(), "within a node");
  if (r.has_network_rendezvous()) rendezvous(r.network_rendezvous(), "between nodes");
  if (!library.empty()) line("collective library", fmt::format("{}", fmt::join(library, "; ")));
  if (r.routes_from_device0_size() == 0) return;
  fmt::print(out, "\nroutes from {}:\n", r.devices(0).name());
  fmt::print(out, "  {:<11}{:>8}{:>6}{:>13}{:>11}{:>12}\n", "to", "devices", "hops", "bottleneck", "latency", "ECMP paths");
  for (const report::RouteClassReport& k : r.routes_from_device0())
    fmt::print(out, "  {:<11}{:>8}{:>6}{:>13}{:>11}{:>12}\n", k.same_node() ? "same node" : "other node", k.destinations(),
               k.hops(), format_bandwidth(k.bottleneck_bps()), format_seconds(k.latency_s()), k.ecmp_paths());
}

report::RouteReport make_route_report(const Cluster& c, int src, int dst, int max_paths) {
  const Graph& g = c.graph();
  topo::Route route = Router(c).route(src, dst, max_paths);
  report::RouteReport r;
  r.set_from(g[c.device(src).vertex].name);
  r.set_to(g[c.device(dst).vertex].name);
  r.set_reachable(route.reachable());
  r.set_hops(route.hops);
  r.set_bottleneck_bps(route.bottleneck_Bps);
  r.set_latency_s(route.latency_s);
  r.set_ecmp_paths(static_cast<uint32_t>(std::min<uint64_t>(route.paths, UINT32_MAX)));
  for (const std::vector<VertexId>& path : route.path_list) {
    report::RoutePath* p = r.add_paths();
    p->set_source(g[path.front()].name);
    for (size_t i = 1; i < path.size(); ++i) {
      // Of parallel links between the two vertices, the fastest is the one a route takes.
      const LinkProps* best = nullptr;
      for (EdgeId e : boost::make_iterator_range(boost::out_edges(path[i - 1], g)))
        if (boost::target(e, g) == path[i] && (!best || g[e].bandwidth_Bps > best->bandwidth_Bps)) best = &g[e];
      MOESIM_ASSERT(best != nullptr, "no link {} -> {}", g[path[i - 1]].name, g[path[i]].name);
      report::RouteHop* hop = p->add_hops();
      hop->set_vertex(g[path[i]].name);
      hop->set_link_kind(hw::LinkKind_Name(best->kind));
      hop->set_bandwidth_bps(best->bandwidth_Bps);
      hop->set_latency_s(best->latency_s);
    }
  }
  return r;
}

void print_route_table(const report::RouteReport& r, std::ostream& out) {
  if (!r.reachable()) {
    fmt::print(out, "no route from {} to {}\n", r.from(), r.to());
    return;
  }
  fmt::print(out, "route {} -> {}: {} hops, bottleneck {}, latency {}, {} ECMP path{}\n", r.from(), r.to(), r.hops(),
             format_bandwidth(r.bottleneck_bps()), format_seconds(r.latency_s()), r.ecmp_paths(),
             r.ecmp_paths() == 1 ? "" : "s");
  for (int i = 0; i < r.paths_size(); ++i) {
    fmt::print(out, "\npath {} of {}:\n  {}\n", i + 1, r.ecmp_paths(), r.paths(i).source());
    for (const report::RouteHop& h : r.paths(i).hops())
      fmt::print(out, "   -> {:<22}{:<9}{:>11}{:>10}\n", h.vertex(), h.link_kind(), format_bandwidth(h.bandwidth_bps()),
                 format_seconds(h.latency_s()));
  }
}

void write_dot(const Cluster& c, std::ostream& out) {
  const Graph& g = c.graph();
  auto shape = [](hw::VertexKind k) {
    switch (k) {
      case hw::DEVICE: return "box, style=filled, fillcolor=\"#b7e1a1\"";
      case hw::NIC: return "cds, style=filled, fillcolor=\"#f7d794\"";
      case hw::HOST: return "box3d, style=filled, fillcolor=\"#c8d6e5\"";
      default: return "ellipse";
    }
  };
  auto colour = [](hw::LinkKind k) {
    switch (k) {
      case hw::SCALEUP: return "#2e86de";
      case hw::PCIE: return "#8395a7";
      case hw::SOCKET: return "#222f3e";
      default: return "#ee5253";
    }
  };
  fmt::print(out, "digraph \"{}\" {{\n  graph [rankdir=TB, fontname=\"Helvetica\"];\n", c.name());
  fmt::print(out, "  node [fontname=\"Helvetica\", fontsize=10];\n  edge [fontname=\"Helvetica\", fontsize=8];\n");
  std::map<int, std::vector<VertexId>> by_node;
  for (VertexId v = 0; v < boost::num_vertices(g); ++v) by_node[g[v].node].push_back(v);
  for (const auto& [node, members] : by_node) {
    const bool boxed = node >= 0;
    if (boxed) fmt::print(out, "  subgraph \"cluster_node{0}\" {{\n    label=\"node{0}\";\n", node);
    for (VertexId v : members) fmt::print(out, "  {}\"{}\" [shape={}];\n", boxed ? "  " : "", g[v].name, shape(g[v].kind));
    if (boxed) fmt::print(out, "  }}\n");
  }
  std::vector<int> directions(c.link_count(), 0);
  for (EdgeId e : boost::make_iterator_range(boost::edges(g))) ++directions[g[e].link_id];
  std::vector<uint8_t> drawn(c.link_count(), 0);
  for (EdgeId e : boost::make_iterator_range(boost::edges(g))) {
    const LinkProps& l = g[e];
    if (drawn[l.link_id]++) continue;
    fmt::print(out, "  \"{}\" -> \"{}\" [dir={}, color=\"{}\", label=\"{}\"];\n", g[boost::source(e, g)].name,
               g[boost::target(e, g)].name, directions[l.link_id] == 2 ? "both" : "forward", colour(l.kind),
               format_bandwidth(l.bandwidth_Bps));
  }
  fmt::print(out, "}}\n");
}

}  // namespace moesim::topo
