// Analytic (alpha-beta) cost of collectives over ranks of a cluster: the fast path the planner
// calls thousands of times. Contention is counted, not solved: bytes are added up per device
// port and per NIC, and the busiest one sets the pace. The event simulator's max-min fair flow
// network is the precise answer; this is the estimate that ranks candidates before it runs.
//
//   cost::CollectiveModel m(cluster);
//   cost::CollectiveCost c = m.cost(cost::CollectiveOp::kAllReduce, cost::CollectiveAlgo::kRing,
//                                   cost::first_ranks(8), 256e6);
//   c.time_s; c.bus_bw_Bps;   // nccl-tests' busBw, comparable across rank counts
//
// ## Notation
// n ranks r_0 .. r_{n-1}, device ranks of the cluster, in the order given (that order is the ring
// order and the tree layout: the caller places ranks, e.g. node by node so a ring leaves each node
// once). S is the size as nccl-tests defines it for the op (see CollectiveOp). o is the per-step
// software overhead (CollectiveParams::step_overhead_s). Routes come from topo::Router: each
// (source, destination) pair has a bottleneck bandwidth B and a latency L. A flow f over the
// collective library's eager limit (hardware.proto Rendezvous, within a node or between nodes)
// waits for a handshake first: R_f is its rendezvous latency, 0 for a flow up to the limit.
//
// ## One phase: a set F of flows that run at the same time
//   alpha(F) = o + max_{f in F} (L_f + R_f)
//   beta(F)  = max( max_{f in F} bytes_f / B_f,                  the flow's own route
//                   max_{ports p} bytes(p) / capacity(p) )        shared ports
// The shared ports, each counted in both directions (out of / into a device or NIC):
//   - a device's port: its scale-up links (sum of its SCALEUP links) for flows to devices of the
//     same node; a device without scale-up links (PCIe boxes, explicit graphs) has all its links
//     as one port, carrying its flows to other nodes too;
//   - a NIC: its NETWORK links. A flow between nodes leaves through the source device's NICs and
//     enters through the destination's, its bytes split evenly over them (ECMP). A device's NICs
//     are those its route to a peer in another node leaves through (the same-local-index device
//     of the next node); routes are assumed to use the same NICs for every other node and to
//     enter a device through the NICs it leaves by (true of the generated fabrics: GPU i uses its
//     PCIe neighbour NIC i whatever the destination).
// Uniform flows of b bytes, k of them on a port, give beta = b / (capacity / k): the port's
// capacity shared fairly by the flows crossing it. Uneven flows give the busiest port's drain
// time, the bound all-to-all-v is governed by. Not counted: contention inside the fabric core
// (oversubscribed leaf uplinks, torus links shared by routes of different nodes), PCIe switch
// uplinks, and the fact that a short flow's share frees up when it ends (max-min fairness):
// that is the simulator's job.
// The two maxima are taken separately, so time = latency_s + transfer_s exactly; this can exceed
// the max over flows of (L_f + bytes_f / rate_f) by at most the smaller of the two terms.
//
// ## Algorithms (steps = alphas charged; CollectiveCost::steps)
//   ring (all_reduce):      F_ring(c) = { r_i -> r_{(i+1) mod n} : c bytes }
//                           t = 2(n-1) [ alpha(F_ring) + beta(F_ring(S/n)) ]           steps 2(n-1)
//                           (reduce-scatter then all-gather, 2(n-1) steps of S/n: Patarasuk &
//                           Yuan 2009; the NCCL ring)
//   tree (all_reduce):      double binary tree (NCCL): tree 1 is the heap layout of positions
//                           (parent of p is (p-1)/2), tree 2 the same over positions rotated by
//                           one. Latency: reduce up and broadcast down, D = floor(log2 n) levels:
//                           t = 2D alpha(F_tree) + beta(F_ring(2(n-1)S/n))               steps 2D
//                           where F_tree holds the parent-child edges of both trees. Bandwidth:
//                           charged as the ring's, since NCCL's pipelined double tree reaches
//                           about the same busBw as its ring; the tree only shortens the latency.
//   ring (all_gather):      t = (n-1) [ alpha(F_ring) + beta(F_ring(S/n)) ]   S = total output
//   ring (reduce_scatter):  t = (n-1) [ alpha(F_ring) + beta(F_ring(S/n)) ]   S = total input
//                           steps n-1 for both
//   direct (all_to_all):    every rank sends S/n to every other rank, all flows at once:
//                           F = { r_i -> r_j, i != j : S/n }
//                           t = (n-1) alpha(F) + beta(F)                                 steps n-1
//                           Each rank posts n-1 messages, each paying the overhead and latency
//                           (the pairwise-exchange latency term), while the bytes of all of them
//                           share the ports at once (NCCL's grouped send/recv: NVLink and
//                           network traffic overlap). On m nodes of g ranks, a rank's NIC carries
//                           (n - g) flows of S/n.
//   hierarchical (all_to_all): 2-D, for ranks spread evenly over m >= 2 nodes, g per node; a
//                           rank's local index j is its order among the node's ranks in the list.
//                           Phase 1, within each node over scale-up: rank (a, j) sends to each
//                           local peer (a, j') what it has for local index j' on every node:
//                             F1 = { (a,j) -> (a,j'), j' != j : S/g }   (m chunks of S/n)
//                           after which rank (a, j) holds node a's data for (b, j) for every b.
//                           Phase 2, across nodes between same-local-index peers:
//                             F2 = { (a,j) -> (b,j), b != a : S/m }    (g chunks of S/n)
//                           t = (g-1) alpha(F1) + beta(F1) + (m-1) alpha(F2) + beta(F2)
//                                                                          steps (g-1) + (m-1)
//                           The scatter phase of a gather/exchange/scatter scheme is empty here:
//                           phase 1 gathers by destination local index, so phase 2 delivers to
//                           the final rank (Tutel's 2DH all-to-all). Against direct: the same
//                           bytes cross NICs, (g-1) S/g move over scale-up instead of
//                           (g-1) S/n, the phases run one after the other, and the
//                           latency term falls from (n-1) to (g-1) + (m-1) alphas: hierarchical
//                           wins when messages are small and nodes many.
//   direct (send_recv):     a pipeline boundary: r_i sends S to r_{i+1} for i < n-1, all at once
//                           (n = 2 is one point-to-point transfer). t = alpha(F) + beta(F), steps 1
//   tree (broadcast):       from r_0 down tree 1 (heap layout), pipelined in small chunks, every
//                           parent feeding its (up to 2) children at once:
//                           t = D alpha(F_tree1) + beta(F_tree1(S))                       steps D
//
// ## Bandwidths as nccl-tests reports them (its doc/PERFORMANCE.md)
//   algBw = S / t,   busBw = algBw * factor, factor:
//     all_reduce 2(n-1)/n;  all_gather, reduce_scatter, all_to_all (n-1)/n;  send_recv, broadcast 1.
// busBw is comparable across rank counts and with the links' bandwidth: a ring all-reduce on n
// ranks with no latency reaches busBw = B_ring.
//
// ## Uneven all-to-all (all-to-all-v, the MoE dispatch): bytes[i][j] from r_i to r_j
//   direct:       F = { r_i -> r_j : bytes[i][j] > 0, i != j };  t = k alpha(F) + beta(F), where
//                 k = the most messages any rank sends or receives. beta(F) is the busiest port's
//                 bytes over its capacity: the heaviest row (sender) or column (receiver) sets it.
//   hierarchical: the uniform scheme with phase bytes summed from the matrix:
//                 F1: (a,j) -> (a,j') carries sum_b bytes[(a,j)][(b,j')];
//                 F2: (a,j) -> (b,j)  carries sum_j'' bytes[(a,j'')][(b,j)].
//   S for algBw is the mean per-rank send buffer, sum_ij bytes[i][j] / n (diagonal included), so a
//   uniform matrix reports what all_to_all reports; factor (n-1)/n.
//
// ## Speed
// A CollectiveModel routes lazily: routes from a source rank are computed on first use (one
// Dijkstra) and kept, 16 bytes per (source, device); a device's NICs cost one more route the first
// time a flow leaves or enters it across nodes. A collective over n ranks then costs O(n) (rings, trees) or O(n^2)
// (all-to-all) arithmetic. Thread-safe: concurrent calls share the cache.
#pragma once

#include "common/registry.h"
#include "topologies/cluster.h"
#include "topologies/routing.h"

#include <atomic>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moesim::cost {

// The size S of each op is nccl-tests' "size" (the count of bytes it reports per line).
enum class CollectiveOp {
  kAllReduce,      // S = each rank's buffer (input = output)
  kAllGather,      // S = the total output (each rank contributes S/n)
  kReduceScatter,  // S = the total input of each rank (each rank keeps S/n)
  kAllToAll,       // S = each rank's send buffer (S/n to each rank, itself included)
  kSendRecv,       // S = the message each sender sends
  kBroadcast,      // S = the root's buffer
};

enum class CollectiveAlgo { kRing, kTree, kDirect, kHierarchical };

// Names as the CLI and configs write them: "all_reduce", "all_to_all", ...; "ring", "hierarchical".
std::string_view op_name(CollectiveOp op);
std::string_view algo_name(CollectiveAlgo algo);
// Throw CollectiveError naming the valid choices for an unknown name.
CollectiveOp parse_op(std::string_view name);
CollectiveAlgo parse_algo(std::string_view name);

// Bad requests (unknown op or algorithm, too few ranks, a rank out of range or repeated, a size
// that is not a positive finite number, hierarchical all-to-all on ranks that are not spread
// evenly over several nodes). Library callers catch std::invalid_argument; the CLI exits 2.
class CollectiveError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A registered algorithm: `moesim list` shows them as "<op>.<algo>" with a one-line description.
struct CollectiveAlgorithm {
  CollectiveOp op;
  CollectiveAlgo algo;
};
const Registry<CollectiveAlgorithm>& collective_algorithms();

// ring for all_reduce, all_gather, reduce_scatter; direct for all_to_all and send_recv; tree for
// broadcast.
CollectiveAlgo default_algo(CollectiveOp op);

// nccl-tests' busBw / algBw for the op on n ranks, and the factor as written ("2(n-1)/n").
double bus_factor(CollectiveOp op, int ranks);
std::string_view bus_factor_formula(CollectiveOp op);
// What S means for the op, for reports: "per-rank buffer", "total output", ...
std::string_view size_meaning(CollectiveOp op);

// Ranks 0 .. n-1.
std::vector<int> first_ranks(int n);

struct CollectiveCost {
  double time_s = 0;
  double alg_bw_Bps = 0;   // S / time_s (+inf when nothing moves: an all-to-all-v that stays local)
  double bus_bw_Bps = 0;   // alg_bw_Bps * bus_factor
  double bus_factor = 0;
  double latency_s = 0;    // the alpha part: steps x (overhead + route latency)
  double transfer_s = 0;   // the beta part: bytes over (shared) bandwidth
  std::string algorithm;   // "ring", "tree", "direct", "hierarchical"
  int steps = 0;           // alphas charged: 2(n-1) for a ring all-reduce, ...
};

// Typical per-step software cost: NCCL's own tuning model charges a few microseconds per ring
// step (src/graph/tuning.cc: about 3.4 us per NVLink ring step with the Simple protocol, base
// latencies of 4-8 us per call). The route latency comes on top, from the cluster's links.
inline constexpr double kDefaultStepOverhead_s = 2e-6;

struct CollectiveParams {
  double step_overhead_s = kDefaultStepOverhead_s;  // o: finite, >= 0
};

namespace detail {
class PhaseLoad;
}

class CollectiveModel {
 public:
  // Keeps a reference to `cluster`, which must outlive the model. Throws CollectiveError for an
  // overhead that is negative or not finite. Routes nothing yet.
  explicit CollectiveModel(const topo::Cluster& cluster, CollectiveParams params = {});
  ~CollectiveModel();
  CollectiveModel(const CollectiveModel&) = delete;
  CollectiveModel& operator=(const CollectiveModel&) = delete;

  // A collective of `bytes` (S, see CollectiveOp) over `ranks` (device ranks, at least 2,
  // distinct, in ring / tree order) with the given algorithm, or the op's default one.
  CollectiveCost cost(CollectiveOp op, CollectiveAlgo algo, const std::vector<int>& ranks, double bytes) const;
  CollectiveCost cost(CollectiveOp op, const std::vector<int>& ranks, double bytes) const;

  // All-to-all-v: bytes[i][j] from ranks[i] to ranks[j] (n x n, finite, >= 0, some > 0; the
  // diagonal stays local and costs nothing). kDirect or kHierarchical.
  CollectiveCost all_to_all_v(const std::vector<int>& ranks, const std::vector<std::vector<double>>& bytes,
                              CollectiveAlgo algo = CollectiveAlgo::kDirect) const;

  // The route summary the model uses between two device ranks (routes `src` if not yet done).
  struct Route {
    double bottleneck_Bps = 0;
    double latency_s = 0;
  };
  const Route& route(int src, int dst) const;
  // What one message of `bytes` from rank `src` to `dst` waits before its bytes flow: its route's
  // latency, and the collective library's rendezvous when it is over the eager limit (the
  // cluster's Rendezvous within a node or between nodes).
  double message_latency_s(int src, int dst, double bytes) const;

  const topo::Cluster& cluster() const { return cluster_; }
  const CollectiveParams& params() const { return params_; }
  // How many nodes the ranks span (a device outside any node counts as a node of its own).
  int node_count(const std::vector<int>& ranks) const;
  // Sources routed so far (each one Dijkstra); for tests of laziness.
  int routed_sources() const { return routed_sources_.load(); }

 private:
  friend class detail::PhaseLoad;
  struct Source;  // lazily filled routes and NICs of one source device

  const std::vector<Route>& routes_from(int src) const;
  const std::vector<int>& nics_of(int rank) const;  // compact NIC ids
  void check_ranks(const std::vector<int>& ranks) const;
  double rendezvous_s(int src, int dst, double bytes) const;
  CollectiveCost all_to_all_impl(const std::vector<int>& ranks, CollectiveAlgo algo, double size_bytes,
                                 const std::vector<std::vector<double>>* matrix) const;

  const topo::Cluster& cluster_;
  CollectiveParams params_;
  topo::Router router_;

  // Per device, from the graph (no routing): compact node id, port capacities.
  std::vector<int> node_of_;                  // compact node id; devices outside nodes get their own
  std::vector<std::vector<int>> node_ranks_;  // by compact node id, in rank order
  std::vector<double> port_out_Bps_, port_in_Bps_;
  std::vector<uint8_t> port_carries_offnode_;  // no scale-up links: off-node flows share the port
  std::vector<uint8_t> port_half_duplex_;      // half-duplex scale-up links: out + in share the port
  // Per NIC (compact id over the graph's NIC vertices): NETWORK link capacity each way.
  std::vector<int> nic_of_vertex_;  // -1 for vertices that are not NICs
  std::vector<double> nic_out_Bps_, nic_in_Bps_;

  std::unique_ptr<Source[]> sources_;
  mutable std::atomic<int> routed_sources_{0};
};

}  // namespace moesim::cost
