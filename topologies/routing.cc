#include "topologies/routing.h"

#include "common/precision.h"

#include <boost/graph/dijkstra_shortest_paths_no_color_map.hpp>
#include <boost/property_map/function_property_map.hpp>

namespace moesim::topo {
namespace {

constexpr double kInf = std::numeric_limits<double>::max();  // Boost's "unreachable" distance

uint64_t saturating_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

}  // namespace

Router::Router(const Cluster& cluster) : cluster_(cluster) {
  const Graph& g = cluster.graph();
  cost_.resize(boost::num_edges(g));
  for (EdgeId e : boost::make_iterator_range(boost::edges(g))) {
    const LinkProps& l = g[e];
    cost_[boost::get(boost::edge_index, g, e)] = l.latency_s + kRouteReferenceBytes / l.bandwidth_Bps;
  }
}

bool Router::blocked(EdgeId e, VertexId src) const {
  const Graph& g = cluster_.graph();
  const VertexId u = boost::source(e, g);
  const VertexProps& pu = g[u];
  if (pu.kind == hw::DEVICE && u != src) return true;
  // Inside a node other than the source's: may go deeper, may not leave.
  return pu.node >= 0 && pu.node != g[src].node && g[boost::target(e, g)].node != pu.node;
}

Router::Search Router::search(VertexId src) const {
  const Graph& g = cluster_.graph();
  const size_t n = boost::num_vertices(g);
  Search s{std::vector<double>(n, kInf), std::vector<uint64_t>(n, 0), std::vector<double>(n, 0),
           std::vector<double>(n, 0), std::vector<int>(n, 0)};
  s.paths[src] = 1;
  s.bottleneck[src] = std::numeric_limits<double>::infinity();

  auto weight = boost::make_function_property_map<EdgeId, double>(
      [&](EdgeId e) { return blocked(e, src) ? kInf : cost_[boost::get(boost::edge_index, g, e)]; });

  // Dijkstra examines a vertex's out-edges only once its distance is final, so ECMP counts,
  // bottlenecks and hop counts can be carried forward edge by edge, before Boost relaxes them.
  struct Visitor : boost::default_dijkstra_visitor {
    Search* s;
    const Router* r;
    VertexId src;
    void examine_edge(EdgeId e, const Graph& g) const {
      if (r->blocked(e, src)) return;
      const VertexId u = boost::source(e, g), v = boost::target(e, g);
      const double cand = s->dist[u] + r->cost_[boost::get(boost::edge_index, g, e)];
      const double bottleneck = std::min(s->bottleneck[u], g[e].bandwidth_Bps);
      const double latency = s->latency[u] + g[e].latency_s;
      if (s->paths[v] == 0 || definitely_less(cand, s->dist[v])) {
        s->paths[v] = s->paths[u];
        s->bottleneck[v] = bottleneck;
        s->latency[v] = latency;
        s->hops[v] = s->hops[u] + 1;
      } else if (approx_eq(cand, s->dist[v])) {
        s->paths[v] = saturating_add(s->paths[v], s->paths[u]);
        s->bottleneck[v] = std::max(s->bottleneck[v], bottleneck);
        s->latency[v] = std::min(s->latency[v], latency);
        s->hops[v] = std::min(s->hops[v], s->hops[u] + 1);
      }
    }
  } vis;
  vis.s = &s;
  vis.r = this;
  vis.src = src;

  boost::dijkstra_shortest_paths_no_color_map(
      g, src,
      boost::weight_map(weight)
          .distance_map(boost::make_iterator_property_map(s.dist.begin(), boost::get(boost::vertex_index, g)))
          .visitor(vis));
  return s;
}

std::vector<RouteSummary> Router::routes_from(int src) const {
  const VertexId sv = cluster_.device(src).vertex;
  Search s = search(sv);
  std::vector<RouteSummary> out(cluster_.device_count());
  for (int r = 0; r < cluster_.device_count(); ++r) {
    const VertexId v = cluster_.device(r).vertex;
    out[r] = RouteSummary{s.bottleneck[v], s.latency[v], s.hops[v], s.paths[v]};
  }
  return out;
}

Route Router::route(int src, int dst, int max_paths) const {
  const Graph& g = cluster_.graph();
  const VertexId sv = cluster_.device(src).vertex, dv = cluster_.device(dst).vertex;
  Search s = search(sv);
  Route r;
  static_cast<RouteSummary&>(r) = RouteSummary{s.bottleneck[dv], s.latency[dv], s.hops[dv], s.paths[dv]};
  if (!r.reachable()) return r;

  // Walk the shortest-path DAG backwards from the destination, depth first, in edge order.
  std::vector<VertexId> stack{dv};
  auto walk = [&](auto&& self, VertexId v) -> void {
    if (static_cast<int>(r.path_list.size()) >= max_paths) return;
    if (v == sv) {
      r.path_list.emplace_back(stack.rbegin(), stack.rend());
      return;
    }
    for (EdgeId e : boost::make_iterator_range(boost::in_edges(v, g))) {
      const VertexId u = boost::source(e, g);
      if (s.paths[u] == 0 || blocked(e, sv)) continue;
      if (!approx_eq(s.dist[u] + cost_[boost::get(boost::edge_index, g, e)], s.dist[v])) continue;
      stack.push_back(u);
      self(self, u);
      stack.pop_back();
    }
  };
  walk(walk, dv);
  return r;
}

}  // namespace moesim::topo
