#include "sim/network.h"

#include "common/error.h"
#include "common/precision.h"
#include "topologies/routing.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <unordered_map>
#include <utility>

namespace moesim::sim {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Hop {
  int edge = 0;
  double weight = 0;  // w(f, e): the fraction of the flow's rate on this edge
};

// A span of Impl::hops: one routed (source, destination) pair.
struct RouteSpan {
  int begin = 0, end = 0;
};

struct Flow {
  int64_t id = 0;
  uint64_t tag = 0;
  RouteSpan route;
  double bytes = 0;
  double remaining = 0;
  double start_s = 0;
  double rate_Bps = 0;
  double finish_s = kInf;  // now + remaining / rate, valid while the rates are
};

// A binary min-heap of edges keyed by the level at which each saturates, with every edge's
// position kept so that a key can change, or an edge leave, in O(log size). Ties go to the lower
// edge index, so the filling order (and the result's rounding) is deterministic.
class EdgeHeap {
 public:
  void resize(size_t edges) {
    pos_.assign(edges, -1);
    key_.assign(edges, 0);
  }
  // Replaces the contents with `edges` (keys set with set_key first), in O(size).
  void assign(const std::vector<int>& edges) {
    clear();
    heap_ = edges;
    for (size_t i = 0; i < heap_.size(); ++i) pos_[heap_[i]] = static_cast<int>(i);
    for (int i = static_cast<int>(heap_.size()) / 2 - 1; i >= 0; --i) down(i);
  }
  void clear() {
    for (int e : heap_) pos_[e] = -1;
    heap_.clear();
  }
  bool empty() const { return heap_.empty(); }
  int top() const { return heap_.front(); }
  double key(int e) const { return key_[e]; }
  void set_key(int e, double key) { key_[e] = key; }
  // Inserts e or moves it to its new key.
  void update(int e, double key) {
    key_[e] = key;
    if (pos_[e] < 0) {
      pos_[e] = static_cast<int>(heap_.size());
      heap_.push_back(e);
      up(pos_[e]);
    } else {
      down(up(pos_[e]));
    }
  }
  void remove(int e) {
    const int i = pos_[e];
    if (i < 0) return;
    pos_[e] = -1;
    const int last = heap_.back();
    heap_.pop_back();
    if (i < static_cast<int>(heap_.size())) {
      heap_[i] = last;
      pos_[last] = i;
      down(up(i));
    }
  }

 private:
  bool less(int a, int b) const { return key_[a] < key_[b] || (key_[a] == key_[b] && a < b); }
  void put(int i, int e) {
    heap_[i] = e;
    pos_[e] = i;
  }
  int up(int i) {
    const int e = heap_[i];
    while (i > 0) {
      const int parent = (i - 1) / 2;
      if (!less(e, heap_[parent])) break;
      put(i, heap_[parent]);
      i = parent;
    }
    put(i, e);
    return i;
  }
  void down(int i) {
    const int n = static_cast<int>(heap_.size()), e = heap_[i];
    for (;;) {
      int child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && less(heap_[child + 1], heap_[child])) ++child;
      if (!less(heap_[child], e)) break;
      put(i, heap_[child]);
      i = child;
    }
    put(i, e);
  }

  std::vector<int> heap_;
  std::vector<int> pos_;     // by edge; -1 when not in the heap
  std::vector<double> key_;  // by edge
};

}  // namespace

struct FlowNetwork::Impl {
  const topo::Cluster& cluster;
  topo::Router router;
  int max_paths;

  // Per directed edge (by edge index).
  std::vector<double> capacity_Bps;
  std::vector<double> route_cost;  // the router's link cost, to choose among parallel edges
  std::vector<int> reverse_edge;   // a half-duplex link's other direction, else -1
  std::vector<double> carried_bytes;
  std::vector<double> busy_s;

  std::vector<Hop> hops;
  std::unordered_map<uint64_t, RouteSpan> routes;  // key src * devices + dst

  std::vector<Flow> active;  // in id order
  std::vector<FinishedFlow> finished;
  int64_t next_id = 0;
  double now_s = 0;
  bool dirty = false;
  int64_t recomputations = 0;
  double next_finish_s = kInf;

  // Water-filling state, per edge, valid for the touched edges after a recompute. Kept between
  // recomputes so that nothing is allocated once the vectors have grown.
  std::vector<uint32_t> touched_mark;  // == stamp when the edge is in `touched`
  uint32_t stamp = 0;
  std::vector<int> touched;
  std::vector<double> frozen_load_Bps;  // sum of w r over frozen flows; the edge's load at the end
  std::vector<double> open_weight;      // sum of w over unfrozen flows
  std::vector<int> open_count;          // unfrozen flows on the edge
  std::vector<int> flows_begin, flows_end;  // CSR of the flows on each edge, by edge index
  std::vector<int> edge_flows;
  std::vector<uint8_t> frozen;          // by position in `active`
  std::vector<uint8_t> pending;         // edge changed during the current freeze
  std::vector<int> changed;
  EdgeHeap heap;

  Impl(const topo::Cluster& c, int max_ecmp_paths) : cluster(c), router(c), max_paths(max_ecmp_paths) {
    const topo::Graph& g = c.graph();
    const size_t edges = boost::num_edges(g);
    capacity_Bps.resize(edges);
    route_cost.resize(edges);
    reverse_edge.assign(edges, -1);
    std::unordered_map<int, int> half_duplex;  // link id -> its first edge seen
    for (topo::EdgeId e : boost::make_iterator_range(boost::edges(g))) {
      const int i = static_cast<int>(boost::get(boost::edge_index, g, e));
      capacity_Bps[i] = g[e].bandwidth_Bps;
      route_cost[i] = g[e].latency_s + topo::kRouteReferenceBytes / g[e].bandwidth_Bps;
      if (!g[e].half_duplex) continue;
      auto [it, first] = half_duplex.try_emplace(g[e].link_id, i);
      if (!first) {
        reverse_edge[i] = it->second;
        reverse_edge[it->second] = i;
      }
    }
    carried_bytes.assign(edges, 0);
    busy_s.assign(edges, 0);
    touched_mark.assign(edges, 0);
    frozen_load_Bps.assign(edges, 0);
    open_weight.assign(edges, 0);
    open_count.assign(edges, 0);
    heap.resize(edges);
    flows_begin.assign(edges, 0);
    flows_end.assign(edges, 0);
    pending.assign(edges, 0);
  }

  void check_rank(int rank, const char* what) const {
    if (rank < 0 || rank >= cluster.device_count())
      throw std::invalid_argument(fmt::format("flow {} rank {} is out of range: {} has ranks 0 .. {}", what, rank,
                                              cluster.name(), cluster.device_count() - 1));
  }

  // The edges of the ECMP paths from src to dst with their weights, routed on first use.
  RouteSpan route(int src, int dst) {
    const uint64_t key = static_cast<uint64_t>(src) * static_cast<uint64_t>(cluster.device_count()) + dst;
    if (auto it = routes.find(key); it != routes.end()) return it->second;
    const topo::Graph& g = cluster.graph();
    const topo::Route r = router.route(src, dst, max_paths);
    if (!r.reachable() || r.path_list.empty())
      throw std::invalid_argument(fmt::format("no route from rank {} to rank {} in {}", src, dst, cluster.name()));
    // Each listed path carries 1/P of the flow. Between two consecutive vertices the share is split
    // evenly over the parallel edges of the lowest link cost (the ones the router counts as ECMP
    // paths; its path list then repeats the vertex path once per such edge, so per-edge weights
    // come out as the router's path counts say).
    std::vector<Hop> raw;
    const double per_path = 1.0 / static_cast<double>(r.path_list.size());
    std::vector<int> parallel;
    for (const std::vector<topo::VertexId>& path : r.path_list) {
      for (size_t h = 0; h + 1 < path.size(); ++h) {
        parallel.clear();
        double best = kInf;
        for (topo::EdgeId e : boost::make_iterator_range(boost::out_edges(path[h], g))) {
          if (boost::target(e, g) != path[h + 1]) continue;
          const int i = static_cast<int>(boost::get(boost::edge_index, g, e));
          if (parallel.empty() || definitely_less(route_cost[i], best)) {
            best = route_cost[i];
            parallel.clear();
          }
          if (approx_eq(route_cost[i], best)) parallel.push_back(i);
        }
        MOESIM_ASSERT(!parallel.empty(), "route {} -> {}: no edge between consecutive path vertices", src, dst);
        for (int i : parallel) raw.push_back({i, per_path / static_cast<double>(parallel.size())});
      }
    }
    // A half-duplex link carries the flow's bytes in both directions' shared capacity: the flow
    // loads its other direction as much.
    for (size_t h = 0, n = raw.size(); h < n; ++h)
      if (reverse_edge[raw[h].edge] >= 0) raw.push_back({reverse_edge[raw[h].edge], raw[h].weight});
    std::sort(raw.begin(), raw.end(), [](const Hop& a, const Hop& b) { return a.edge < b.edge; });
    RouteSpan span{static_cast<int>(hops.size()), 0};
    for (const Hop& h : raw) {
      if (static_cast<int>(hops.size()) > span.begin && hops.back().edge == h.edge)
        hops.back().weight += h.weight;
      else
        hops.push_back(h);
    }
    span.end = static_cast<int>(hops.size());
    routes.emplace(key, span);
    return span;
  }

  // Progressive filling: every unfrozen flow runs at the common level L; edge e saturates when
  // frozen_load(e) + L * open_weight(e) = capacity(e). Take the edge with the lowest such L,
  // freeze its open flows at L, update their other edges' levels in the heap, repeat. Each step
  // costs O(hops of the flows it freezes x log edges); a recompute O(total hops x log edges).
  void recompute() {
    ++recomputations;
    dirty = false;
    next_finish_s = kInf;
    if (++stamp == 0) {  // wrapped: clear the marks once every 2^32 recomputes
      std::fill(touched_mark.begin(), touched_mark.end(), 0);
      stamp = 1;
    }
    touched.clear();
    for (const Flow& f : active) {
      for (int h = f.route.begin; h < f.route.end; ++h) {
        const int e = hops[h].edge;
        if (touched_mark[e] != stamp) {
          touched_mark[e] = stamp;
          touched.push_back(e);
          frozen_load_Bps[e] = 0;
          open_weight[e] = 0;
          open_count[e] = 0;
        }
        open_weight[e] += hops[h].weight;
        ++open_count[e];
      }
    }
    // The flows of each edge, as positions in `active` (CSR over the touched edges).
    int offset = 0;
    for (int e : touched) {
      flows_begin[e] = flows_end[e] = offset;
      offset += open_count[e];
    }
    edge_flows.resize(offset);
    for (size_t i = 0; i < active.size(); ++i)
      for (int h = active[i].route.begin; h < active[i].route.end; ++h)
        edge_flows[flows_end[hops[h].edge]++] = static_cast<int>(i);

    for (int e : touched) heap.set_key(e, capacity_Bps[e] / open_weight[e]);
    heap.assign(touched);
    frozen.assign(active.size(), 0);
    size_t open_flows = active.size();
    double level = 0;
    while (open_flows > 0 && !heap.empty()) {
      const int e = heap.top();
      level = std::max(level, heap.key(e));
      heap.remove(e);
      for (int k = flows_begin[e]; k < flows_end[e]; ++k) {
        const int fi = edge_flows[k];
        if (frozen[fi]) continue;
        frozen[fi] = 1;
        --open_flows;
        Flow& f = active[fi];
        f.rate_Bps = level;
        for (int h = f.route.begin; h < f.route.end; ++h) {
          const int x = hops[h].edge;
          frozen_load_Bps[x] += hops[h].weight * level;
          open_weight[x] -= hops[h].weight;
          --open_count[x];
          if (!pending[x]) {
            pending[x] = 1;
            changed.push_back(x);
          }
        }
      }
      for (int x : changed) {
        pending[x] = 0;
        if (open_count[x] == 0) {
          heap.remove(x);
          continue;
        }
        // The level at which x saturates now; never below the current one (rounding).
        heap.update(x, std::max(level, (capacity_Bps[x] - frozen_load_Bps[x]) / open_weight[x]));
      }
      changed.clear();
    }
    heap.clear();
    MOESIM_ASSERT(open_flows == 0, "water-filling left {} flows without a rate", open_flows);
    for (Flow& f : active) {
      f.finish_s = f.rate_Bps > 0 ? now_s + f.remaining / f.rate_Bps : kInf;
      next_finish_s = std::min(next_finish_s, f.finish_s);
    }
  }

  void ensure_rates() {
    if (dirty) recompute();
  }

  // Drains every active flow at its rate from now to t (no completion strictly inside), and
  // retires the flows done by t.
  void drain_to(double t) {
    const double dt = t - now_s;
    if (dt > 0) {
      for (Flow& f : active) f.remaining = std::max(0.0, f.remaining - f.rate_Bps * dt);
      for (int e : touched) {
        carried_bytes[e] += frozen_load_Bps[e] * dt;
        busy_s[e] += dt;
      }
    }
    now_s = t;
    size_t kept = 0;
    for (size_t i = 0; i < active.size(); ++i) {
      Flow& f = active[i];
      if (f.finish_s <= t || f.remaining <= std::max(kFinishedBytes, kRelEps * f.bytes)) {
        finished.push_back({f.id, f.tag, f.start_s, t, f.bytes});
        dirty = true;
      } else {
        active[kept++] = f;
      }
    }
    active.resize(kept);
  }
};

FlowNetwork::FlowNetwork(const topo::Cluster& cluster, int max_ecmp_paths) {
  if (max_ecmp_paths < 1)
    throw std::invalid_argument(fmt::format("max_ecmp_paths must be at least 1, got {}", max_ecmp_paths));
  impl_ = std::make_unique<Impl>(cluster, max_ecmp_paths);
}

FlowNetwork::~FlowNetwork() = default;

int64_t FlowNetwork::add_flow(int src, int dst, double bytes, uint64_t tag) {
  Impl& m = *impl_;
  m.check_rank(src, "source");
  m.check_rank(dst, "destination");
  if (!std::isfinite(bytes) || bytes < 0)
    throw std::invalid_argument(
        fmt::format("flow {} -> {}: bytes must be a finite number >= 0, got {}", src, dst, bytes));
  const RouteSpan route = src == dst ? RouteSpan{} : m.route(src, dst);
  const int64_t id = m.next_id++;
  if (route.begin == route.end || bytes <= kFinishedBytes) {
    m.finished.push_back({id, tag, m.now_s, m.now_s, bytes});
    return id;
  }
  m.active.push_back({id, tag, route, bytes, bytes, m.now_s, 0, kInf});
  m.dirty = true;
  return id;
}

double FlowNetwork::next_completion_s() {
  Impl& m = *impl_;
  if (!m.finished.empty()) return m.now_s;
  m.ensure_rates();
  return m.next_finish_s;
}

void FlowNetwork::advance(double t_s) {
  Impl& m = *impl_;
  if (!std::isfinite(t_s) || t_s < m.now_s)
    throw std::invalid_argument(
        fmt::format("advance to {} s: time must be finite and not before now ({} s)", t_s, m.now_s));
  // Step from completion to completion, recomputing the rates at each, up to t_s.
  for (;;) {
    m.ensure_rates();
    if (m.active.empty() || m.next_finish_s > t_s) {
      m.drain_to(t_s);
      return;
    }
    m.drain_to(m.next_finish_s);
    if (m.now_s >= t_s) return;
  }
}

std::vector<FinishedFlow> FlowNetwork::take_finished() {
  std::vector<FinishedFlow> out = std::move(impl_->finished);
  impl_->finished.clear();
  std::sort(out.begin(), out.end(), [](const FinishedFlow& a, const FinishedFlow& b) { return a.id < b.id; });
  return out;
}

double FlowNetwork::now() const { return impl_->now_s; }

int FlowNetwork::active_flows() const { return static_cast<int>(impl_->active.size()); }

double FlowNetwork::rate(int64_t id) {
  Impl& m = *impl_;
  m.ensure_rates();
  auto it = std::lower_bound(m.active.begin(), m.active.end(), id, [](const Flow& f, int64_t v) { return f.id < v; });
  return it != m.active.end() && it->id == id ? it->rate_Bps : 0;
}

int64_t FlowNetwork::recomputations() const { return impl_->recomputations; }

std::vector<LinkUse> FlowNetwork::busiest_links(int k, double elapsed_s) const {
  if (k < 0) throw std::invalid_argument(fmt::format("busiest_links: k must be >= 0, got {}", k));
  if (!std::isfinite(elapsed_s) || elapsed_s < 0)
    throw std::invalid_argument(
        fmt::format("busiest_links: elapsed time must be a finite number of seconds >= 0, got {}", elapsed_s));
  const Impl& m = *impl_;
  std::vector<int> used;
  for (size_t e = 0; e < m.carried_bytes.size(); ++e)
    if (m.carried_bytes[e] > 0) used.push_back(static_cast<int>(e));
  const size_t top = std::min(used.size(), static_cast<size_t>(k));
  std::partial_sort(used.begin(), used.begin() + static_cast<std::ptrdiff_t>(top), used.end(), [&](int a, int b) {
    return m.carried_bytes[a] > m.carried_bytes[b] || (m.carried_bytes[a] == m.carried_bytes[b] && a < b);
  });
  used.resize(top);

  std::vector<LinkUse> out;
  if (used.empty()) return out;
  const topo::Graph& g = m.cluster.graph();
  std::vector<topo::EdgeId> by_index(m.carried_bytes.size());
  for (topo::EdgeId e : boost::make_iterator_range(boost::edges(g))) by_index[boost::get(boost::edge_index, g, e)] = e;
  for (int e : used) {
    LinkUse u;
    u.edge = e;
    u.from = g[boost::source(by_index[e], g)].name;
    u.to = g[boost::target(by_index[e], g)].name;
    u.bytes = m.carried_bytes[e];
    u.capacity_Bps = m.capacity_Bps[e];
    u.busy_s = m.busy_s[e];
    u.utilisation = elapsed_s > 0 ? u.bytes / (u.capacity_Bps * elapsed_s) : 0;
    out.push_back(std::move(u));
  }
  return out;
}

}  // namespace moesim::sim
