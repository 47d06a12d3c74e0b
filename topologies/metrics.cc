#include "topologies/metrics.h"

#include "common/precision.h"

#include <boost/graph/adjacency_list.hpp>
#include <boost/graph/push_relabel_max_flow.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <unordered_map>
#include <thread>

namespace moesim::topo {
namespace {

// Integer max-flow. Capacities are whole multiples of a unit chosen so that the fastest link is
// 2^30 units: exact arithmetic (no floating-point termination worries in push-relabel), and no
// overflow even summed over 2^26 links.
class FlowNetwork {
 public:
  using Traits = boost::adjacency_list_traits<boost::vecS, boost::vecS, boost::directedS>;
  using Net = boost::adjacency_list<
      boost::vecS, boost::vecS, boost::directedS, boost::no_property,
      boost::property<boost::edge_capacity_t, int64_t,
                      boost::property<boost::edge_residual_capacity_t, int64_t,
                                      boost::property<boost::edge_reverse_t, Traits::edge_descriptor>>>>;
  static constexpr int64_t kUnbounded = int64_t{1} << 60;

  explicit FlowNetwork(size_t vertices) : net_(vertices) {}

  void add(size_t u, size_t v, int64_t capacity) {
    auto cap = boost::get(boost::edge_capacity, net_);
    auto rev = boost::get(boost::edge_reverse, net_);
    auto e = boost::add_edge(u, v, net_).first;
    auto r = boost::add_edge(v, u, net_).first;
    cap[e] = capacity;
    cap[r] = 0;
    rev[e] = r;
    rev[r] = e;
  }
  double max_flow(size_t s, size_t t) { return static_cast<double>(boost::push_relabel_max_flow(net_, s, t)); }

 private:
  Net net_;
};

struct FlowUnit {
  double Bps;
  explicit FlowUnit(const Graph& g) : Bps(0) {
    for (EdgeId e : boost::make_iterator_range(boost::edges(g))) Bps = std::max(Bps, g[e].bandwidth_Bps);
    Bps = std::max(Bps, 1.0) / double(1 << 30);
  }
  int64_t capacity(const LinkProps& l) const { return std::llround(l.bandwidth_Bps / Bps); }
};

// Vertices of each node (devices outside any node are their own group).
std::vector<std::vector<VertexId>> node_groups(const Cluster& c) {
  const Graph& g = c.graph();
  std::vector<std::vector<VertexId>> groups;
  std::vector<int> node_to_group;
  for (VertexId v = 0; v < boost::num_vertices(g); ++v) {
    const VertexProps& p = g[v];
    int group;
    if (p.node >= 0) {
      if (static_cast<size_t>(p.node) >= node_to_group.size()) node_to_group.resize(p.node + 1, -1);
      if (node_to_group[p.node] < 0) {
        node_to_group[p.node] = static_cast<int>(groups.size());
        groups.emplace_back();
      }
      group = node_to_group[p.node];
    } else if (p.kind == hw::DEVICE) {
      group = static_cast<int>(groups.size());
      groups.emplace_back();
    } else {
      continue;
    }
    groups[group].push_back(v);
  }
  return groups;
}

// Max-flow from `sources` (a subset of `members`) to anything outside `members`.
double flow_out_of(const Graph& g, const FlowUnit& unit, const std::vector<VertexId>& members,
                   const std::vector<VertexId>& sources) {
  std::unordered_map<VertexId, size_t> local;
  for (VertexId v : members) local.emplace(v, local.size());
  const size_t src = local.size(), sink = src + 1;
  FlowNetwork net(local.size() + 2);
  for (VertexId v : members)
    for (EdgeId e : boost::make_iterator_range(boost::out_edges(v, g))) {
      auto it = local.find(boost::target(e, g));
      net.add(local[v], it == local.end() ? sink : it->second, unit.capacity(g[e]));
    }
  for (VertexId s : sources) net.add(src, local[s], FlowNetwork::kUnbounded);
  return net.max_flow(src, sink) * unit.Bps;
}

std::vector<DeviceBandwidth> device_bandwidths(const Cluster& c) {
  const Graph& g = c.graph();
  std::vector<DeviceBandwidth> out(c.device_count());
  for (int r = 0; r < c.device_count(); ++r)
    for (EdgeId e : boost::make_iterator_range(boost::out_edges(c.device(r).vertex, g))) {
      if (g[e].kind == hw::SCALEUP) {
        out[r].scaleup_Bps += g[e].bandwidth_Bps;
        out[r].scaleup_half_duplex = out[r].scaleup_half_duplex || g[e].half_duplex;
      }
      if (g[e].kind == hw::PCIE) out[r].host_Bps += g[e].bandwidth_Bps;
    }
  std::vector<std::vector<VertexId>> groups = node_groups(c);
  const FlowUnit unit(g);
  // Equivalent nodes have equal figures: compute node 0 (ranks 0..D-1) and copy by local index.
  const bool copy = c.symmetry().nodes_equivalent && !c.spec().has_graph();
  for (const std::vector<VertexId>& members : groups) {
    std::vector<VertexId> devs;
    for (VertexId v : members)
      if (g[v].kind == hw::DEVICE) devs.push_back(v);
    if (devs.empty()) continue;
    if (copy && g[devs[0]].node > 0) {
      for (VertexId v : devs) out[g[v].device].scaleout_Bps = out[c.device(g[v].device).local_index].scaleout_Bps;
      continue;
    }
    const double node_share = flow_out_of(g, unit, members, devs) / static_cast<double>(devs.size());
    for (VertexId v : devs) out[g[v].device].scaleout_Bps = std::min(flow_out_of(g, unit, members, {v}), node_share);
  }
  return out;
}

std::vector<std::vector<uint8_t>> bisection_splits(const Cluster& c) {
  const int n = c.device_count();
  std::vector<std::vector<uint8_t>> splits;
  std::vector<uint8_t> halves(n);
  for (int r = 0; r < n; ++r) halves[r] = r >= n / 2;
  splits.push_back(std::move(halves));
  if (c.node_count() >= 2 && c.node_count() % 2 == 0 && !c.spec().has_graph()) {
    std::vector<uint8_t> parity(n);
    for (int r = 0; r < n; ++r) parity[r] = c.device(r).node % 2;
    splits.push_back(std::move(parity));
  }
  for (const std::vector<uint8_t>& by_node : c.symmetry().node_splits) {
    std::vector<uint8_t> side(n);
    for (int r = 0; r < n; ++r) side[r] = by_node[c.device(r).node];
    splits.push_back(std::move(side));
  }
  return splits;
}

}  // namespace

double cut_bandwidth(const Cluster& c, const std::vector<uint8_t>& side) {
  const Graph& g = c.graph();
  const size_t v_count = boost::num_vertices(g), src = v_count, sink = v_count + 1;
  const FlowUnit unit(g);
  FlowNetwork net(v_count + 2);
  for (EdgeId e : boost::make_iterator_range(boost::edges(g)))
    net.add(boost::source(e, g), boost::target(e, g), unit.capacity(g[e]));
  for (int r = 0; r < c.device_count(); ++r) {
    if (side[r] == 0) net.add(src, c.device(r).vertex, FlowNetwork::kUnbounded);
    else net.add(c.device(r).vertex, sink, FlowNetwork::kUnbounded);
  }
  return net.max_flow(src, sink) * unit.Bps;
}

void for_each_source(const Router& router, const std::vector<int>& sources, int threads,
                     const std::function<void(int, const std::vector<RouteSummary>&)>& fn) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads = std::min<int>(threads, static_cast<int>(sources.size()));
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < sources.size();) fn(sources[i], router.routes_from(sources[i]));
  };
  std::vector<std::jthread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
}

std::vector<RouteClass> route_classes(const Cluster& c, int src, const std::vector<RouteSummary>& routes) {
  std::vector<RouteClass> classes;
  for (int d = 0; d < c.device_count(); ++d) {
    if (d == src || !routes[d].reachable()) continue;
    const RouteSummary& r = routes[d];
    const bool same = c.device(d).node >= 0 && c.device(d).node == c.device(src).node;
    auto it = std::find_if(classes.begin(), classes.end(), [&](const RouteClass& k) {
      return k.same_node == same && k.hops == r.hops && k.paths == r.paths && approx_eq(k.bottleneck_Bps, r.bottleneck_Bps) &&
             approx_eq(k.latency_s, r.latency_s);
    });
    if (it == classes.end()) classes.push_back(RouteClass{same, r.hops, r.bottleneck_Bps, r.latency_s, r.paths, 1});
    else ++it->destinations;
  }
  std::sort(classes.begin(), classes.end(), [](const RouteClass& a, const RouteClass& b) {
    return std::tie(b.same_node, a.hops, a.latency_s) < std::tie(a.same_node, b.hops, b.latency_s);
  });
  return classes;
}

TopologyMetrics compute_metrics(const Cluster& c, const MetricsOptions& options) {
  TopologyMetrics m;
  m.devices = device_bandwidths(c);

  if (c.device_count() >= 2) {
    m.bisection_bandwidth_Bps = std::numeric_limits<double>::infinity();
    for (const std::vector<uint8_t>& side : bisection_splits(c))
      m.bisection_bandwidth_Bps = std::min(m.bisection_bandwidth_Bps, cut_bandwidth(c, side));
  }

  std::vector<int> sources;
  for (int r = 0; r < c.device_count(); ++r)
    if (options.all_sources || !c.symmetry().nodes_equivalent || c.device(r).node == 0) sources.push_back(r);
  m.sources_examined = static_cast<int>(sources.size());
  if (options.progress) options.progress->set_total(sources.size());

  Router router(c);
  std::mutex mu;
  for_each_source(router, sources, options.threads, [&](int src, const std::vector<RouteSummary>& routes) {
    int hops = 0;
    double latency = 0;
    for (int d = 0; d < c.device_count(); ++d)
      if (d != src && routes[d].reachable()) {
        hops = std::max(hops, routes[d].hops);
        latency = std::max(latency, routes[d].latency_s);
      }
    std::vector<RouteClass> classes = src == 0 ? route_classes(c, 0, routes) : std::vector<RouteClass>{};
    {
      std::lock_guard lock(mu);
      m.diameter_hops = std::max(m.diameter_hops, hops);
      m.max_route_latency_s = std::max(m.max_route_latency_s, latency);
      if (src == 0) m.route_classes = std::move(classes);
    }
    if (options.progress) options.progress->advance();
  });
  return m;
}

}  // namespace moesim::topo
