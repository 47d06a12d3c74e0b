#include "costmodel/collectives.h"

#include "common/error.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace moesim::cost {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// ECMP paths examined to find the NICs a device sends through (they vary nearest the source first).
constexpr int kNicPaths = 64;

// The names a cluster's collective_efficiency uses too (topologies/cluster.h), in enum order.
constexpr std::array<std::pair<CollectiveOp, std::string_view>, 6> kOps = {{
    {CollectiveOp::kAllReduce, topo::kCollectiveOpNames[0]},
    {CollectiveOp::kAllGather, topo::kCollectiveOpNames[1]},
    {CollectiveOp::kReduceScatter, topo::kCollectiveOpNames[2]},
    {CollectiveOp::kAllToAll, topo::kCollectiveOpNames[3]},
    {CollectiveOp::kSendRecv, topo::kCollectiveOpNames[4]},
    {CollectiveOp::kBroadcast, topo::kCollectiveOpNames[5]},
}};
static_assert(std::size(topo::kCollectiveOpNames) == kOps.size(), "one name per collective op");
constexpr std::array<std::pair<CollectiveAlgo, std::string_view>, 4> kAlgos = {{
    {CollectiveAlgo::kRing, "ring"},
    {CollectiveAlgo::kTree, "tree"},
    {CollectiveAlgo::kDirect, "direct"},
    {CollectiveAlgo::kHierarchical, "hierarchical"},
}};

template <typename Table>
std::string table_names(const Table& table) {
  std::string out;
  for (const auto& [value, name] : table) out += fmt::format("{}{}", out.empty() ? "" : ", ", name);
  return out;
}

std::string registry_key(CollectiveOp op, CollectiveAlgo algo) {
  return fmt::format("{}.{}", op_name(op), algo_name(algo));
}

// Algorithms registered for `op`, "ring, tree".
std::string algos_for(CollectiveOp op) {
  std::string out;
  for (const auto& e : collective_algorithms().entries())
    if (e.value.op == op) out += fmt::format("{}{}", out.empty() ? "" : ", ", algo_name(e.value.algo));
  return out;
}

int floor_log2(int n) {
  int d = 0;
  while (n >>= 1) ++d;
  return d;
}

int heap_parent(int p) { return (p - 1) / 2; }

void check_size(double bytes) {
  if (!std::isfinite(bytes) || bytes <= 0)
    throw CollectiveError(fmt::format("size must be a positive finite number of bytes, got {}", bytes));
}

}  // namespace

std::string_view op_name(CollectiveOp op) {
  for (const auto& [o, name] : kOps)
    if (o == op) return name;
  MOESIM_ASSERT(false, "unnamed collective op {}", static_cast<int>(op));
  return {};
}

std::string_view algo_name(CollectiveAlgo algo) {
  for (const auto& [a, name] : kAlgos)
    if (a == algo) return name;
  MOESIM_ASSERT(false, "unnamed collective algorithm {}", static_cast<int>(algo));
  return {};
}

CollectiveOp parse_op(std::string_view name) {
  for (const auto& [o, n] : kOps)
    if (n == name) return o;
  throw CollectiveError(fmt::format("unknown collective '{}': choose {}", name, table_names(kOps)));
}

CollectiveAlgo parse_algo(std::string_view name) {
  for (const auto& [a, n] : kAlgos)
    if (n == name) return a;
  throw CollectiveError(fmt::format("unknown collective algorithm '{}': choose {}", name, table_names(kAlgos)));
}

const Registry<CollectiveAlgorithm>& collective_algorithms() {
  static const Registry<CollectiveAlgorithm> registry = [] {
    using Op = CollectiveOp;
    using Algo = CollectiveAlgo;
    Registry<CollectiveAlgorithm> r("collective algorithm");
    r.add("all_reduce.ring", "default: 2(n-1) steps of S/n around the ranks in order",
          {Op::kAllReduce, Algo::kRing});
    r.add("all_reduce.tree", "double binary tree: 2 floor(log2 n) steps of latency, the ring's bandwidth",
          {Op::kAllReduce, Algo::kTree});
    r.add("all_gather.ring", "default: n-1 steps of S/n around the ranks in order", {Op::kAllGather, Algo::kRing});
    r.add("reduce_scatter.ring", "default: n-1 steps of S/n around the ranks in order",
          {Op::kReduceScatter, Algo::kRing});
    r.add("all_to_all.direct", "default: every rank to every other at once, n-1 message latencies",
          {Op::kAllToAll, Algo::kDirect});
    r.add("all_to_all.hierarchical", "2-D: within nodes over scale-up, then across nodes between same-local-index ranks",
          {Op::kAllToAll, Algo::kHierarchical});
    r.add("send_recv.direct", "default: each rank to the next in the list, all at once (pipeline stages)",
          {Op::kSendRecv, Algo::kDirect});
    r.add("broadcast.tree", "default: pipelined binary tree from the first rank, floor(log2 n) steps of latency",
          {Op::kBroadcast, Algo::kTree});
    return r;
  }();
  return registry;
}

CollectiveAlgo default_algo(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kAllToAll:
    case CollectiveOp::kSendRecv: return CollectiveAlgo::kDirect;
    case CollectiveOp::kBroadcast: return CollectiveAlgo::kTree;
    default: return CollectiveAlgo::kRing;
  }
}

double bus_factor(CollectiveOp op, int ranks) {
  const double n = ranks;
  switch (op) {
    case CollectiveOp::kAllReduce: return 2 * (n - 1) / n;
    case CollectiveOp::kAllGather:
    case CollectiveOp::kReduceScatter:
    case CollectiveOp::kAllToAll: return (n - 1) / n;
    case CollectiveOp::kSendRecv:
    case CollectiveOp::kBroadcast: return 1;
  }
  return 1;
}

std::string_view bus_factor_formula(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kAllReduce: return "2(n-1)/n";
    case CollectiveOp::kAllGather:
    case CollectiveOp::kReduceScatter:
    case CollectiveOp::kAllToAll: return "(n-1)/n";
    case CollectiveOp::kSendRecv:
    case CollectiveOp::kBroadcast: return "1";
  }
  return "1";
}

std::string_view size_meaning(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kAllReduce: return "per-rank buffer";
    case CollectiveOp::kAllGather: return "total output";
    case CollectiveOp::kReduceScatter: return "total input";
    case CollectiveOp::kAllToAll: return "per-rank send buffer";
    case CollectiveOp::kSendRecv: return "message per sender";
    case CollectiveOp::kBroadcast: return "root buffer";
  }
  return "";
}

std::vector<int> first_ranks(int n) {
  std::vector<int> out(std::max(n, 0));
  for (int i = 0; i < n; ++i) out[i] = i;
  return out;
}

struct CollectiveModel::Source {
  std::once_flag routes_once;
  std::vector<Route> routes;  // by destination rank
  std::once_flag nics_once;
  std::vector<int> nics;  // compact NIC ids
};

namespace detail {

// The flows of one phase, added up per route, device port and NIC (see the header's beta(F)).
// Positions index the rank list.
class PhaseLoad {
 public:
  struct Result {
    double alpha_s = 0;   // o + the largest message latency; 0 when nothing moves
    double beta_s = 0;    // the slowest flow or busiest port
    int max_messages = 0; // the most flows any rank sends or receives
  };

  PhaseLoad(const CollectiveModel& m, const std::vector<int>& ranks)
      : m_(m),
        ranks_(ranks),
        rows_(ranks.size(), nullptr),
        nics_(ranks.size(), nullptr),
        port_out_(ranks.size(), 0),
        port_in_(ranks.size(), 0),
        sent_(ranks.size(), 0),
        received_(ranks.size(), 0) {}

  void add(int i, int j, double bytes) {
    if (i == j || bytes <= 0) return;
    const int s = ranks_[i], t = ranks_[j];
    if (rows_[i] == nullptr) rows_[i] = &m_.routes_from(s);
    const CollectiveModel::Route& r = (*rows_[i])[t];
    if (!(r.bottleneck_Bps > 0))
      throw CollectiveError(fmt::format("no route from rank {} to rank {} in {}", s, t, m_.cluster_.name()));
    any_ = true;
    latency_s_ = std::max(latency_s_, r.latency_s + m_.rendezvous_s(s, t, bytes));
    route_transfer_s_ = std::max(route_transfer_s_, bytes / r.bottleneck_Bps);
    ++sent_[i];
    ++received_[j];
    if (m_.node_of_[s] == m_.node_of_[t]) {
      port_out_[i] += bytes;
      port_in_[j] += bytes;
      return;
    }
    if (m_.port_carries_offnode_[s]) port_out_[i] += bytes;
    if (m_.port_carries_offnode_[t]) port_in_[j] += bytes;
    spread(nics(i), bytes, nic_out_, touched_out_);
    spread(nics(j), bytes, nic_in_, touched_in_);
  }

  Result finish() const {
    Result r;
    if (!any_) return r;
    r.alpha_s = m_.params_.step_overhead_s + latency_s_;
    r.beta_s = route_transfer_s_;
    for (size_t i = 0; i < ranks_.size(); ++i) {
      const int rank = ranks_[i];
      r.beta_s = m_.port_half_duplex_[rank]
                     ? std::max(r.beta_s, (port_out_[i] + port_in_[i]) / m_.port_out_Bps_[rank])
                     : std::max({r.beta_s, port_out_[i] / m_.port_out_Bps_[rank], port_in_[i] / m_.port_in_Bps_[rank]});
      r.max_messages = std::max({r.max_messages, sent_[i], received_[i]});
    }
    for (int k : touched_out_) r.beta_s = std::max(r.beta_s, nic_out_[k] / m_.nic_out_Bps_[k]);
    for (int k : touched_in_) r.beta_s = std::max(r.beta_s, nic_in_[k] / m_.nic_in_Bps_[k]);
    return r;
  }

 private:
  const std::vector<int>& nics(int i) {
    if (nics_[i] == nullptr) nics_[i] = &m_.nics_of(ranks_[i]);
    return *nics_[i];
  }

  void spread(const std::vector<int>& nics, double bytes, std::vector<double>& load, std::vector<int>& touched) {
    if (nics.empty()) return;
    if (load.empty()) load.assign(m_.nic_out_Bps_.size(), 0);
    const double share = bytes / static_cast<double>(nics.size());
    for (int k : nics) {
      if (load[k] == 0) touched.push_back(k);
      load[k] += share;
    }
  }

  const CollectiveModel& m_;
  const std::vector<int>& ranks_;
  std::vector<const std::vector<CollectiveModel::Route>*> rows_;
  std::vector<const std::vector<int>*> nics_;
  std::vector<double> port_out_, port_in_;
  std::vector<int> sent_, received_;
  std::vector<double> nic_out_, nic_in_;  // by compact NIC id, allocated on the first off-node flow
  std::vector<int> touched_out_, touched_in_;
  double latency_s_ = 0;
  double route_transfer_s_ = 0;
  bool any_ = false;
};

}  // namespace detail

using detail::PhaseLoad;

CollectiveModel::CollectiveModel(const topo::Cluster& cluster, CollectiveParams params)
    : cluster_(cluster),
      params_(params),
      router_(cluster),
      sources_(std::make_unique<Source[]>(cluster.device_count())) {
  if (!std::isfinite(params.step_overhead_s) || params.step_overhead_s < 0)
    throw CollectiveError(
        fmt::format("step overhead must be a finite number of seconds >= 0, got {}", params.step_overhead_s));
  const topo::Graph& g = cluster.graph();
  const int devices = cluster.device_count();

  node_of_.resize(devices);
  std::unordered_map<int, int> compact;
  for (int r = 0; r < devices; ++r) {
    const int node = cluster.device(r).node;
    int id = static_cast<int>(node_ranks_.size());
    if (node >= 0) id = compact.emplace(node, id).first->second;
    if (id == static_cast<int>(node_ranks_.size())) node_ranks_.emplace_back();
    node_of_[r] = id;
    node_ranks_[id].push_back(r);
  }

  port_out_Bps_.resize(devices);
  port_in_Bps_.resize(devices);
  port_carries_offnode_.resize(devices);
  port_half_duplex_.resize(devices);
  for (int r = 0; r < devices; ++r) {
    const topo::VertexId v = cluster.device(r).vertex;
    double up_out = 0, up_in = 0, all_out = 0, all_in = 0;
    bool half_duplex = false;
    for (topo::EdgeId e : boost::make_iterator_range(boost::out_edges(v, g))) {
      all_out += g[e].bandwidth_Bps;
      if (g[e].kind == hw::SCALEUP) up_out += g[e].bandwidth_Bps;
      half_duplex = half_duplex || (g[e].kind == hw::SCALEUP && g[e].half_duplex);
    }
    for (topo::EdgeId e : boost::make_iterator_range(boost::in_edges(v, g))) {
      all_in += g[e].bandwidth_Bps;
      if (g[e].kind == hw::SCALEUP) up_in += g[e].bandwidth_Bps;
    }
    const bool scaleup = up_out > 0 && up_in > 0;
    port_out_Bps_[r] = scaleup ? up_out : (all_out > 0 ? all_out : kInf);
    port_in_Bps_[r] = scaleup ? up_in : (all_in > 0 ? all_in : kInf);
    port_carries_offnode_[r] = !scaleup;
    port_half_duplex_[r] = scaleup && half_duplex;
  }

  nic_of_vertex_.assign(boost::num_vertices(g), -1);
  for (topo::VertexId v = 0; v < boost::num_vertices(g); ++v) {
    if (g[v].kind != hw::NIC) continue;
    double out = 0, in = 0;
    for (topo::EdgeId e : boost::make_iterator_range(boost::out_edges(v, g)))
      if (g[e].kind == hw::NETWORK) out += g[e].bandwidth_Bps;
    for (topo::EdgeId e : boost::make_iterator_range(boost::in_edges(v, g)))
      if (g[e].kind == hw::NETWORK) in += g[e].bandwidth_Bps;
    nic_of_vertex_[v] = static_cast<int>(nic_out_Bps_.size());
    nic_out_Bps_.push_back(out > 0 ? out : kInf);
    nic_in_Bps_.push_back(in > 0 ? in : kInf);
  }
}

CollectiveModel::~CollectiveModel() = default;

const std::vector<CollectiveModel::Route>& CollectiveModel::routes_from(int src) const {
  Source& s = sources_[src];
  std::call_once(s.routes_once, [&] {
    std::vector<topo::RouteSummary> all = router_.routes_from(src);
    s.routes.resize(all.size());
    for (size_t d = 0; d < all.size(); ++d)
      s.routes[d] = all[d].reachable() ? Route{all[d].bottleneck_Bps, all[d].latency_s} : Route{0, kInf};
    ++routed_sources_;
  });
  return s.routes;
}

const std::vector<int>& CollectiveModel::nics_of(int rank) const {
  Source& s = sources_[rank];
  std::call_once(s.nics_once, [&] {
    const topo::Graph& g = cluster_.graph();
    const int home = cluster_.device(rank).node;
    if (home < 0 || node_ranks_.size() < 2) return;
    const std::vector<int>& mine = node_ranks_[node_of_[rank]];
    const size_t local = std::find(mine.begin(), mine.end(), rank) - mine.begin();
    const std::vector<int>& next = node_ranks_[(node_of_[rank] + 1) % node_ranks_.size()];
    const int peer = local < next.size() ? next[local] : next[0];
    for (const auto& path : router_.route(rank, peer, kNicPaths).path_list) {
      for (topo::VertexId v : path) {
        if (g[v].kind != hw::NIC || g[v].node != home) continue;
        const int id = nic_of_vertex_[v];
        if (std::find(s.nics.begin(), s.nics.end(), id) == s.nics.end()) s.nics.push_back(id);
        break;
      }
    }
  });
  return s.nics;
}

const CollectiveModel::Route& CollectiveModel::route(int src, int dst) const {
  const int n = cluster_.device_count();
  if (src < 0 || src >= n || dst < 0 || dst >= n)
    throw CollectiveError(fmt::format("route {} -> {}: ranks must be in 0 .. {}", src, dst, n - 1));
  return routes_from(src)[dst];
}

double CollectiveModel::message_latency_s(int src, int dst, double bytes) const {
  return route(src, dst).latency_s + rendezvous_s(src, dst, bytes);
}

double CollectiveModel::rendezvous_s(int src, int dst, double bytes) const {
  return cluster_.rendezvous_s(node_of_[src] != node_of_[dst], bytes);
}

int CollectiveModel::node_count(const std::vector<int>& ranks) const {
  std::vector<int> nodes;
  for (int r : ranks) nodes.push_back(node_of_.at(r));
  std::sort(nodes.begin(), nodes.end());
  return static_cast<int>(std::unique(nodes.begin(), nodes.end()) - nodes.begin());
}

void CollectiveModel::check_ranks(const std::vector<int>& ranks) const {
  if (ranks.size() < 2) throw CollectiveError(fmt::format("a collective needs at least 2 ranks, got {}", ranks.size()));
  const int n = cluster_.device_count();
  for (int r : ranks)
    if (r < 0 || r >= n)
      throw CollectiveError(fmt::format("rank {} is out of range: {} has ranks 0 .. {}", r, cluster_.name(), n - 1));
  std::vector<int> sorted = ranks;
  std::sort(sorted.begin(), sorted.end());
  if (auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end())
    throw CollectiveError(fmt::format("rank {} is listed twice", *dup));
}

CollectiveCost CollectiveModel::cost(CollectiveOp op, const std::vector<int>& ranks, double bytes) const {
  return cost(op, default_algo(op), ranks, bytes);
}

CollectiveCost CollectiveModel::cost(CollectiveOp op, CollectiveAlgo algo, const std::vector<int>& ranks,
                                     double bytes) const {
  if (collective_algorithms().find(registry_key(op, algo)) == nullptr)
    throw CollectiveError(
        fmt::format("{} has no algorithm '{}': choose {}", op_name(op), algo_name(algo), algos_for(op)));
  check_ranks(ranks);
  check_size(bytes);
  if (op == CollectiveOp::kAllToAll) return all_to_all_impl(ranks, algo, bytes, nullptr);

  const int n = static_cast<int>(ranks.size());
  auto ring = [&](double chunk) {
    PhaseLoad p(*this, ranks);
    for (int i = 0; i < n; ++i) p.add(i, (i + 1) % n, chunk);
    return p.finish();
  };
  // Tree 1 (heap layout over positions) and, for the double tree, tree 2 over positions rotated by one.
  auto tree = [&](double chunk, bool both) {
    PhaseLoad p(*this, ranks);
    for (int c = 1; c < n; ++c) p.add(heap_parent(c), c, chunk);
    if (both)
      for (int c = 1; c < n; ++c) p.add((heap_parent(c) + 1) % n, (c + 1) % n, chunk);
    return p.finish();
  };

  CollectiveCost c;
  c.algorithm = algo_name(algo);
  switch (op) {
    case CollectiveOp::kAllReduce:
      if (algo == CollectiveAlgo::kRing) {
        const PhaseLoad::Result r = ring(bytes / n);
        c.steps = 2 * (n - 1);
        c.latency_s = c.steps * r.alpha_s;
        c.transfer_s = c.steps * r.beta_s;
      } else {
        const int depth = floor_log2(n);
        c.steps = 2 * depth;
        c.latency_s = c.steps * tree(bytes, true).alpha_s;
        c.transfer_s = ring(2.0 * (n - 1) / n * bytes).beta_s;
      }
      break;
    case CollectiveOp::kAllGather:
    case CollectiveOp::kReduceScatter: {
      const PhaseLoad::Result r = ring(bytes / n);
      c.steps = n - 1;
      c.latency_s = c.steps * r.alpha_s;
      c.transfer_s = c.steps * r.beta_s;
      break;
    }
    case CollectiveOp::kSendRecv: {
      PhaseLoad p(*this, ranks);
      for (int i = 0; i + 1 < n; ++i) p.add(i, i + 1, bytes);
      const PhaseLoad::Result r = p.finish();
      c.steps = 1;
      c.latency_s = r.alpha_s;
      c.transfer_s = r.beta_s;
      break;
    }
    case CollectiveOp::kBroadcast: {
      const PhaseLoad::Result r = tree(bytes, false);
      c.steps = floor_log2(n);
      c.latency_s = c.steps * r.alpha_s;
      c.transfer_s = r.beta_s;
      break;
    }
    case CollectiveOp::kAllToAll: break;  // above
  }
  c.transfer_s /= cluster_.collective_efficiency(op_name(op));
  c.latency_s += cluster_.collective_latency_s(op_name(op));
  c.time_s = c.latency_s + c.transfer_s;
  c.bus_factor = bus_factor(op, n);
  c.alg_bw_Bps = bytes / c.time_s;
  c.bus_bw_Bps = c.alg_bw_Bps * c.bus_factor;
  return c;
}

CollectiveCost CollectiveModel::all_to_all_v(const std::vector<int>& ranks, const std::vector<std::vector<double>>& bytes,
                                             CollectiveAlgo algo) const {
  if (algo != CollectiveAlgo::kDirect && algo != CollectiveAlgo::kHierarchical)
    throw CollectiveError(fmt::format("all_to_all has no algorithm '{}': choose {}", algo_name(algo),
                                      algos_for(CollectiveOp::kAllToAll)));
  check_ranks(ranks);
  const size_t n = ranks.size();
  if (bytes.size() != n)
    throw CollectiveError(fmt::format("all-to-all-v: the bytes matrix has {} rows for {} ranks", bytes.size(), n));
  double total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (bytes[i].size() != n)
      throw CollectiveError(fmt::format("all-to-all-v: row {} has {} entries for {} ranks", i, bytes[i].size(), n));
    for (size_t j = 0; j < n; ++j) {
      if (!std::isfinite(bytes[i][j]) || bytes[i][j] < 0)
        throw CollectiveError(
            fmt::format("all-to-all-v: bytes[{}][{}] must be a finite number >= 0, got {}", i, j, bytes[i][j]));
      total += bytes[i][j];
    }
  }
  if (!(total > 0)) throw CollectiveError("all-to-all-v: the bytes matrix is all zero");
  return all_to_all_impl(ranks, algo, total / static_cast<double>(n), &bytes);
}

CollectiveCost CollectiveModel::all_to_all_impl(const std::vector<int>& ranks, CollectiveAlgo algo, double size_bytes,
                                                const std::vector<std::vector<double>>* matrix) const {
  const int n = static_cast<int>(ranks.size());
  const double uniform = size_bytes / n;
  auto flow = [&](int i, int j) { return matrix ? (*matrix)[i][j] : uniform; };

  CollectiveCost c;
  c.algorithm = algo_name(algo);
  if (algo == CollectiveAlgo::kDirect) {
    PhaseLoad p(*this, ranks);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) p.add(i, j, flow(i, j));
    const PhaseLoad::Result r = p.finish();
    c.steps = r.max_messages;
    c.latency_s = r.max_messages * r.alpha_s;
    c.transfer_s = r.beta_s;
  } else {
    // at[a][j]: the position of node a's j-th rank in the list.
    std::vector<std::vector<int>> at;
    std::unordered_map<int, int> group;
    for (int i = 0; i < n; ++i) {
      auto [it, fresh] = group.emplace(node_of_[ranks[i]], static_cast<int>(at.size()));
      if (fresh) at.emplace_back();
      at[it->second].push_back(i);
    }
    const int m = static_cast<int>(at.size());
    if (m < 2)
      throw CollectiveError("hierarchical all_to_all needs ranks on at least 2 nodes; on one node use direct");
    const int g = static_cast<int>(at[0].size());
    for (int a = 1; a < m; ++a)
      if (static_cast<int>(at[a].size()) != g)
        throw CollectiveError(fmt::format(
            "hierarchical all_to_all needs the same number of ranks on every node: {} on the node of rank {}, {} on "
            "the node of rank {}",
            g, ranks[at[0][0]], at[a].size(), ranks[at[a][0]]));

    PhaseLoad gather(*this, ranks);  // phase 1: (a,j) -> (a,j') what goes to local index j' anywhere
    for (int a = 0; a < m; ++a)
      for (int j = 0; j < g; ++j)
        for (int k = 0; k < g; ++k) {
          if (k == j) continue;
          double sum = 0;
          for (int b = 0; b < m; ++b) sum += flow(at[a][j], at[b][k]);
          gather.add(at[a][j], at[a][k], sum);
        }
    PhaseLoad exchange(*this, ranks);  // phase 2: (a,j) -> (b,j) what node a has for (b,j)
    for (int a = 0; a < m; ++a)
      for (int b = 0; b < m; ++b) {
        if (b == a) continue;
        for (int j = 0; j < g; ++j) {
          double sum = 0;
          for (int k = 0; k < g; ++k) sum += flow(at[a][k], at[b][j]);
          exchange.add(at[a][j], at[b][j], sum);
        }
      }
    const PhaseLoad::Result r1 = gather.finish(), r2 = exchange.finish();
    c.steps = r1.max_messages + r2.max_messages;
    c.latency_s = r1.max_messages * r1.alpha_s + r2.max_messages * r2.alpha_s;
    c.transfer_s = r1.beta_s + r2.beta_s;
  }
  c.transfer_s /= cluster_.collective_efficiency(op_name(CollectiveOp::kAllToAll));
  c.latency_s += cluster_.collective_latency_s(op_name(CollectiveOp::kAllToAll));
  c.time_s = c.latency_s + c.transfer_s;
  c.bus_factor = bus_factor(CollectiveOp::kAllToAll, n);
  c.alg_bw_Bps = c.time_s > 0 ? size_bytes / c.time_s : kInf;
  c.bus_bw_Bps = c.alg_bw_Bps * c.bus_factor;
  return c;
}

}  // namespace moesim::cost
