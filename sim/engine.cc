// The event engine (sim/engine.h): flat arrays over every op of the schedule, successor lists built
// once, one binary heap of (ns, sequence) events.
#include "sim/engine.h"

#include "common/error.h"
#include "costmodel/collectives.h"
#include "sim/flows.h"
#include "traces/recorder.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace moesim::sim {
namespace {

using schedule::Collective;

// ---- time ------------------------------------------------------------------------------------

// A time within this of a whole nanosecond is that nanosecond: products such as 1e-6 * 1e9 land a
// few ulps beside the integer, and ceil must not turn them into one more nanosecond.
constexpr double kNsSnapAbs = 1e-6;
constexpr double kNsSnapRel = 1e-12;
// Durations above this are refused (int64 nanoseconds overflow near 9.2e9 s).
constexpr double kMaxDuration_s = 1e8;

int64_t ceil_ns(double s) {
  const double v = s * 1e9;
  const double r = std::nearbyint(v);
  if (std::fabs(v - r) <= kNsSnapAbs + kNsSnapRel * std::fabs(v)) return static_cast<int64_t>(r);
  return static_cast<int64_t>(std::ceil(v));
}

double ns_to_s(int64_t ns) { return static_cast<double>(ns) / 1e9; }

// A collective's transfer time factor (schedule.proto Collective.transfer_factor; 0 means 1).
double transfer_factor(const Collective& c) { return c.transfer_factor() > 0 ? c.transfer_factor() : 1.0; }

// ---- breakdown categories --------------------------------------------------------------------

enum Category : uint8_t {
  kCompute,
  kAllToAll,
  kAllReduce,
  kAllGather,
  kReduceScatter,
  kP2p,
  kBroadcast,
  kPipelineBubble,
  kOffloadStall,
  kOther,
  kCategoryCount,
};

constexpr std::array<std::string_view, kCategoryCount> kCategoryNames = {
    "compute", "all_to_all", "all_reduce", "all_gather", "reduce_scatter",
    "p2p",     "broadcast",  "pipeline_bubble", "offload_stall", "other"};

// The schedule's collective ops, as the cost model and the breakdown name them.
struct CollectiveKind {
  Collective::Op op;
  cost::CollectiveOp cost_op;
  Category category;
};
constexpr std::array<CollectiveKind, 7> kCollectiveKinds = {{
    {Collective::ALL_REDUCE, cost::CollectiveOp::kAllReduce, kAllReduce},
    {Collective::ALL_GATHER, cost::CollectiveOp::kAllGather, kAllGather},
    {Collective::REDUCE_SCATTER, cost::CollectiveOp::kReduceScatter, kReduceScatter},
    {Collective::ALL_TO_ALL, cost::CollectiveOp::kAllToAll, kAllToAll},
    {Collective::ALL_TO_ALL_V, cost::CollectiveOp::kAllToAll, kAllToAll},
    {Collective::SEND_RECV, cost::CollectiveOp::kSendRecv, kP2p},
    {Collective::BROADCAST, cost::CollectiveOp::kBroadcast, kBroadcast},
}};

const CollectiveKind* find_kind(Collective::Op op) {
  for (const CollectiveKind& k : kCollectiveKinds)
    if (k.op == op) return &k;
  return nullptr;
}

// What a gap spent waiting for a non-collective op is charged to.
Category category_of_plain_op(const schedule::Op& op) {
  if (op.stream().kind() == trace::COPY || op.kind() == trace::MEMCPY) return kOffloadStall;
  switch (op.kind()) {
    case trace::ALL_TO_ALL: return kAllToAll;
    case trace::ALL_REDUCE: return kAllReduce;
    case trace::ALL_GATHER: return kAllGather;
    case trace::REDUCE_SCATTER: return kReduceScatter;
    case trace::SEND:
    case trace::RECV: return kP2p;
    default: return kOther;
  }
}

// ---- events ----------------------------------------------------------------------------------

enum class EventType : uint8_t {
  kOpEnd,          // payload: global op index (a compute or copy op)
  kCollectiveEnd,  // payload: collective index (kAnalytic)
  kPhaseStart,     // payload: collective index (kFlows: a phase's delay is over)
  kNetwork,        // payload: network version (kFlows: the network's next completion)
};

struct Event {
  int64_t ns;
  int64_t seq;
  int64_t payload;
  EventType type;
};

// Min-heap order on (ns, seq): std heap functions keep the largest first, so "greater" here.
struct Later {
  bool operator()(const Event& a, const Event& b) const { return a.ns != b.ns ? a.ns > b.ns : a.seq > b.seq; }
};

// ---- per-op and per-collective state ---------------------------------------------------------

struct OpState {
  int64_t duration_ns = 0;
  int64_t gap_ns = 0;  // after the span, before its successors (schedule Op gap_s)
  int64_t alloc_bytes = 0;
  int64_t free_bytes = 0;
  int64_t ready_ns = -1;
  int64_t start_ns = -1;
  int64_t end_ns = -1;
  int32_t pending = 0;      // unfinished predecessors
  int32_t collective = -1;  // 0-based
  int32_t rank = 0;         // index into schedule.ranks
  int32_t trigger = -1;     // the predecessor whose end made this op ready
  int32_t local = 0;        // index within its rank's ops
  bool compute = false;     // on a compute stream, not a collective
  Category waited_category = kOther;  // what a gap waiting for this op is charged to
};

struct RankState {
  int64_t static_bytes = 0;
  double capacity_bytes = 0;  // 0: unknown (no limit)
  int64_t current_bytes = 0;
  int64_t peak_bytes = 0;
  int32_t peak_op = -1;      // global index; -1: the static bytes alone
  int32_t overflow_op = -1;  // global index
  bool static_overflow = false;
  int32_t last_finished = -1;
  int64_t end_ns = 0;
};

// One shape of collective: everything that depends only on (op, algorithm, ranks, size, matrix).
struct Shape {
  double time_s = 0;             // kAnalytic
  std::vector<Phase> phases;     // kFlows, decomposed on first use, dropped after the last
  bool decomposed = false;
  int uses_left = 0;             // collectives of this shape not yet finished
};

struct CollectiveState {
  int32_t needed = 0;   // simulated participating ops
  int32_t arrived = 0;
  int32_t shape = -1;
  cost::CollectiveOp cost_op = cost::CollectiveOp::kAllReduce;
  cost::CollectiveAlgo algo = cost::CollectiveAlgo::kRing;
  bool vee = false;
  Category category = kOther;
  double size_bytes = 0;  // S: `bytes`, or for all-to-all-v the mean send buffer sum / n
  int64_t start_ns = -1;
  int64_t end_ns = -1;
  // kFlows progress
  int32_t phase = 0;
  int32_t repeat_left = 0;
  int64_t outstanding_flows = 0;
};

std::string op_label(const schedule::Schedule& s, int rank_index, int local) {
  const schedule::RankSchedule& r = s.ranks(rank_index);
  return fmt::format("rank {} op {} '{}'", r.rank(), local, r.ops(local).id());
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("simulate: " + what); }

class Engine {
 public:
  Engine(const schedule::Schedule& s, const topo::Cluster& cluster, const SimOptions& options)
      : s_(s), cluster_(cluster), options_(options), model_(cluster) {}

  SimResult run();

 private:
  void build();
  void build_collectives();
  void prepare_shapes();
  std::vector<std::vector<double>> matrix_of(const Collective& c) const;
  const Shape& shape_for_flows(int c);

  void push(int64_t ns, EventType type, int64_t payload) {
    heap_.push_back(Event{ns, seq_++, payload, type});
    std::push_heap(heap_.begin(), heap_.end(), Later{});
  }
  void make_ready(int g);
  void start_op(int g);
  void finish_op(int g);
  void start_collective(int c);
  void end_collective(int c);
  // kFlows
  void start_phase(int c);
  void add_phase_flows(int c);
  void phase_done(int c);
  void sync_network(double t_s);
  void on_network_event(int64_t version);
  void handle_finished_flows();
  void reschedule_network();

  [[noreturn]] void deadlock() const;
  void fill_result(SimResult& out) const;
  std::map<std::string, double> breakdown_of(int r) const;
  void charge(std::array<int64_t, kCategoryCount>& acc, int waited_for, int64_t g0, int64_t g1) const;

  const schedule::Schedule& s_;
  const topo::Cluster& cluster_;
  const SimOptions& options_;
  cost::CollectiveModel model_;

  std::vector<int32_t> rank_begin_;  // global op index of each rank's first op; size ranks + 1
  std::vector<OpState> ops_;
  std::vector<int32_t> succ_begin_, succ_;  // CSR successors
  std::vector<RankState> ranks_;

  std::vector<CollectiveState> colls_;
  std::vector<int32_t> coll_begin_, coll_ops_;  // CSR participating ops, in rank order
  std::vector<Shape> shapes_;

  std::vector<Event> heap_;
  int64_t seq_ = 0;
  int64_t now_ns_ = 0;
  int64_t events_ = 0;
  int64_t finished_ = 0;
  int64_t collectives_run_ = 0;
  int64_t next_progress_ = 0;

  // kFlows
  std::unique_ptr<FlowNetwork> net_;
  int64_t net_version_ = 0;
  int64_t net_scheduled_ns_ = -1;
  bool net_dirty_ = false;
  std::vector<uint64_t> finished_tags_;  // collective ids of flows finished, not yet handled
  std::vector<uint64_t> tag_batch_;
};

// ---- building --------------------------------------------------------------------------------

void Engine::build() {
  const int nranks = s_.ranks_size();
  const int devices = cluster_.device_count();
  if (s_.devices() > devices)
    bad(fmt::format("schedule '{}' runs on {} devices; cluster '{}' has {}", s_.name(), s_.devices(), cluster_.name(),
                    devices));
  rank_begin_.assign(nranks + 1, 0);
  std::vector<int32_t> seen(devices, -1);
  int64_t total = 0;
  for (int r = 0; r < nranks; ++r) {
    const schedule::RankSchedule& rs = s_.ranks(r);
    if (rs.rank() < 0 || rs.rank() >= devices)
      bad(fmt::format("ranks[{}]: rank {} is outside cluster '{}' ({} devices)", r, rs.rank(), cluster_.name(), devices));
    if (seen[rs.rank()] >= 0) bad(fmt::format("ranks[{}]: rank {} is listed twice (also ranks[{}])", r, rs.rank(), seen[rs.rank()]));
    seen[rs.rank()] = r;
    if (rs.represents() < 0) bad(fmt::format("rank {}: represents {} is negative", rs.rank(), rs.represents()));
    if (rs.static_bytes() < 0 || rs.capacity_bytes() < 0)
      bad(fmt::format("rank {}: static_bytes and capacity_bytes must be >= 0", rs.rank()));
    rank_begin_[r] = static_cast<int32_t>(total);
    total += rs.ops_size();
  }
  if (total >= std::numeric_limits<int32_t>::max()) bad(fmt::format("{} ops are more than the engine handles", total));
  rank_begin_[nranks] = static_cast<int32_t>(total);
  ops_.assign(total, OpState{});
  ranks_.assign(nranks, RankState{});

  // Predecessor counts and successor lists: the previous op on the same (rank, stream) and deps.
  std::vector<int32_t> succ_count(total + 1, 0);
  std::vector<std::pair<int32_t, int32_t>> edges;  // (from, to), global
  edges.reserve(total * 2);
  struct LastOnStream {
    int kind, index, op;
  };
  std::vector<LastOnStream> streams;
  for (int r = 0; r < nranks; ++r) {
    const schedule::RankSchedule& rs = s_.ranks(r);
    RankState& rk = ranks_[r];
    rk.static_bytes = rs.static_bytes();
    rk.capacity_bytes = static_cast<double>(rs.capacity_bytes());
    if (rk.capacity_bytes <= 0) {
      const hw::DeviceType& type = cluster_.device_type(rs.rank());
      rk.capacity_bytes = type.memory_bytes() > 0 ? type.memory_bytes() : 0;
    }
    rk.current_bytes = rk.peak_bytes = rk.static_bytes;
    rk.static_overflow = rk.capacity_bytes > 0 && static_cast<double>(rk.static_bytes) > rk.capacity_bytes;
    streams.clear();
    const int base = rank_begin_[r];
    for (int i = 0; i < rs.ops_size(); ++i) {
      const schedule::Op& op = rs.ops(i);
      const int g = base + i;
      OpState& st = ops_[g];
      st.rank = r;
      st.local = i;
      if (!(op.duration_s() >= 0) || !(op.duration_s() <= kMaxDuration_s))
        bad(fmt::format("{}: duration_s {} is not a finite number in [0, {:g}]", op_label(s_, r, i), op.duration_s(),
                        kMaxDuration_s));
      if (op.alloc_bytes() < 0 || op.free_bytes() < 0)
        bad(fmt::format("{}: alloc_bytes and free_bytes must be >= 0", op_label(s_, r, i)));
      if (op.collective() < 0 || op.collective() > s_.collectives_size())
        bad(fmt::format("{}: collective {} is out of range (the schedule has {} collectives, 1-based; 0 = none)",
                        op_label(s_, r, i), op.collective(), s_.collectives_size()));
      st.collective = op.collective() - 1;
      st.alloc_bytes = op.alloc_bytes();
      st.free_bytes = op.free_bytes();
      if (!(op.gap_s() >= 0) || !(op.gap_s() <= kMaxDuration_s))
        bad(fmt::format("{}: gap_s {} is not a finite number in [0, {:g}]", op_label(s_, r, i), op.gap_s(),
                        kMaxDuration_s));
      if (st.collective < 0) {
        st.duration_ns = ceil_ns(op.duration_s());
        st.gap_ns = ceil_ns(op.gap_s());
        st.compute = op.stream().kind() == trace::COMPUTE;
        st.waited_category = category_of_plain_op(op);
      }
      for (int d : op.deps()) {
        if (d < 0 || d >= i)
          bad(fmt::format("{}: dep {} does not point to an earlier op of rank {}", op_label(s_, r, i), d, rs.rank()));
        edges.emplace_back(base + d, g);
      }
      auto it = std::find_if(streams.begin(), streams.end(), [&](const LastOnStream& l) {
        return l.kind == op.stream().kind() && l.index == op.stream().index();
      });
      if (it == streams.end()) {
        streams.push_back({op.stream().kind(), op.stream().index(), g});
      } else {
        edges.emplace_back(it->op, g);
        it->op = g;
      }
    }
  }
  for (const auto& [from, to] : edges) {
    ++succ_count[from];
    ++ops_[to].pending;
  }
  succ_begin_.assign(total + 1, 0);
  for (int64_t g = 0; g < total; ++g) succ_begin_[g + 1] = succ_begin_[g] + succ_count[g];
  succ_.resize(edges.size());
  std::vector<int32_t> fill(succ_begin_.begin(), succ_begin_.end() - 1);
  // Edges were collected in (to) order per rank; successors of one op keep that order.
  for (const auto& [from, to] : edges) succ_[fill[from]++] = to;

  build_collectives();
}

void Engine::build_collectives() {
  const int ncoll = s_.collectives_size();
  const int devices = cluster_.device_count();
  colls_.assign(ncoll, CollectiveState{});
  std::vector<int32_t> count(ncoll + 1, 0);
  for (const OpState& op : ops_)
    if (op.collective >= 0) ++count[op.collective];
  coll_begin_.assign(ncoll + 1, 0);
  for (int c = 0; c < ncoll; ++c) coll_begin_[c + 1] = coll_begin_[c] + count[c];
  coll_ops_.resize(coll_begin_[ncoll]);
  std::vector<int32_t> fill(coll_begin_.begin(), coll_begin_.end() - 1);
  for (int g = 0; g < static_cast<int>(ops_.size()); ++g)
    if (ops_[g].collective >= 0) coll_ops_[fill[ops_[g].collective]++] = g;

  // Stamps per device: the collective listing it (to check membership and duplicates in O(n)).
  std::vector<int32_t> listed(devices, -1), joined(devices, -1);
  std::vector<int32_t> sched_index(devices, -1);
  for (int r = 0; r < s_.ranks_size(); ++r) sched_index[s_.ranks(r).rank()] = r;
  for (int c = 0; c < ncoll; ++c) {
    const Collective& col = s_.collectives(c);
    CollectiveState& cs = colls_[c];
    const std::string where = fmt::format("collective {}", c + 1);
    const CollectiveKind* kind = find_kind(col.op());
    if (!kind) bad(fmt::format("{}: op {} is not a collective op", where, static_cast<int>(col.op())));
    cs.cost_op = kind->cost_op;
    cs.category = kind->category;
    cs.vee = col.op() == Collective::ALL_TO_ALL_V;
    try {
      cs.algo = col.algorithm().empty() ? cost::default_algo(cs.cost_op) : cost::parse_algo(col.algorithm());
    } catch (const std::invalid_argument& e) {
      bad(fmt::format("{}: {}", where, e.what()));
    }
    if (col.ranks_size() < 2) bad(fmt::format("{}: {} ranks; a collective needs at least 2", where, col.ranks_size()));
    for (int i = 0; i < col.ranks_size(); ++i) {
      const int d = col.ranks(i);
      if (d < 0 || d >= devices)
        bad(fmt::format("{}: rank {} is outside cluster '{}' ({} devices)", where, d, cluster_.name(), devices));
      if (listed[d] == c) bad(fmt::format("{}: rank {} is listed twice", where, d));
      listed[d] = c;
    }
    if (cs.vee) {
      if (col.matrix() < 1 || col.matrix() > s_.matrices_size())
        bad(fmt::format("{}: matrix {} is out of range (the schedule has {} matrices, 1-based)", where, col.matrix(),
                        s_.matrices_size()));
      const schedule::ByteMatrix& m = s_.matrices(col.matrix() - 1);
      const int64_t n = col.ranks_size();
      if (m.n() != n || m.bytes_size() != n * n)
        bad(fmt::format("{}: matrix {} is {} x {} with {} entries; the collective has {} ranks", where, col.matrix(),
                        m.n(), m.n(), m.bytes_size(), n));
      double sum = 0;
      for (double b : m.bytes()) {
        if (!(b >= 0) || !std::isfinite(b)) bad(fmt::format("{}: matrix {} has an entry {}", where, col.matrix(), b));
        sum += b;
      }
      cs.size_bytes = sum / static_cast<double>(n);
    } else if (!(col.bytes() > 0) || !std::isfinite(col.bytes())) {
      bad(fmt::format("{}: bytes {} is not a positive finite number", where, col.bytes()));
    } else {
      cs.size_bytes = col.bytes();
    }
    if (!(col.transfer_factor() >= 0) || !(col.transfer_factor() <= 100))
      bad(fmt::format("{}: transfer_factor {} is not in [0, 100] (0 means 1)", where, col.transfer_factor()));
    // Participants: on listed ranks, one op per simulated rank, every simulated listed rank joins.
    int simulated_listed = 0;
    for (int d : col.ranks())
      if (sched_index[d] >= 0) ++simulated_listed;
    for (int k = coll_begin_[c]; k < coll_begin_[c + 1]; ++k) {
      const OpState& op = ops_[coll_ops_[k]];
      const int d = s_.ranks(op.rank).rank();
      if (listed[d] != c)
        bad(fmt::format("{}: names collective {}, which does not list rank {}", op_label(s_, op.rank, op.local), c + 1, d));
      if (joined[d] == c)
        bad(fmt::format("{}: rank {} has two ops in collective {}", op_label(s_, op.rank, op.local), d, c + 1));
      joined[d] = c;
    }
    cs.needed = coll_begin_[c + 1] - coll_begin_[c];
    if (cs.needed > 0 && cs.needed != simulated_listed) {
      for (int d : col.ranks())
        if (sched_index[d] >= 0 && joined[d] != c)
          bad(fmt::format("{}: simulated rank {} is listed but has no op for it", where, d));
    }
    for (int k = coll_begin_[c]; k < coll_begin_[c + 1]; ++k) {
      OpState& op = ops_[coll_ops_[k]];
      op.waited_category = cs.category;
    }
  }
}

std::vector<std::vector<double>> Engine::matrix_of(const Collective& c) const {
  const schedule::ByteMatrix& m = s_.matrices(c.matrix() - 1);
  const int n = m.n();
  std::vector<std::vector<double>> out(n, std::vector<double>(n));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) out[i][j] = c.transpose() ? m.bytes(j * n + i) : m.bytes(i * n + j);
  return out;
}

// Identical collectives share one Shape: the cache key is (op, algorithm, ranks, size, matrix,
// transpose), with the fields that do not matter for the op zeroed.
void Engine::prepare_shapes() {
  std::unordered_map<std::string, int32_t> index;
  std::string key;
  for (int c = 0; c < s_.collectives_size(); ++c) {
    CollectiveState& cs = colls_[c];
    if (cs.needed == 0) continue;  // never runs
    const Collective& col = s_.collectives(c);
    key.clear();
    auto put = [&key](const auto& v) { key.append(reinterpret_cast<const char*>(&v), sizeof v); };
    put(static_cast<int32_t>(col.op()));
    put(static_cast<int32_t>(cs.algo));
    put(cs.vee ? 0.0 : col.bytes());
    put(cs.vee ? col.matrix() : 0);
    put(cs.vee && col.transpose());
    put(transfer_factor(col));
    key.append(reinterpret_cast<const char*>(col.ranks().data()), sizeof(int32_t) * col.ranks_size());
    auto [it, inserted] = index.try_emplace(key, static_cast<int32_t>(shapes_.size()));
    if (inserted) {
      Shape sh;
      if (options_.network == NetworkMode::kAnalytic) {
        const std::vector<int> ranks(col.ranks().begin(), col.ranks().end());
        try {
          const cost::CollectiveCost cost = cs.vee ? model_.all_to_all_v(ranks, matrix_of(col), cs.algo)
                                                   : model_.cost(cs.cost_op, cs.algo, ranks, col.bytes());
          sh.time_s = cost.latency_s + cost.transfer_s * transfer_factor(col);
        } catch (const std::invalid_argument& e) {
          bad(fmt::format("collective {}: {}", c + 1, e.what()));
        }
        if (!(sh.time_s >= 0) || !(sh.time_s <= kMaxDuration_s))
          throw std::runtime_error(fmt::format("simulate: collective {}: the cost model gave {} s", c + 1, sh.time_s));
      }
      shapes_.push_back(std::move(sh));
    }
    cs.shape = it->second;
    ++shapes_[cs.shape].uses_left;
  }
}

const Shape& Engine::shape_for_flows(int c) {
  CollectiveState& cs = colls_[c];
  Shape& sh = shapes_[cs.shape];
  if (!sh.decomposed) {
    const Collective& col = s_.collectives(c);
    const std::vector<int> ranks(col.ranks().begin(), col.ranks().end());
    try {
      sh.phases = cs.vee ? decompose_all_to_all_v(model_, ranks, matrix_of(col), cs.algo)
                         : decompose(model_, cs.cost_op, cs.algo, ranks, col.bytes());
    } catch (const std::invalid_argument& e) {
      bad(fmt::format("collective {}: {}", c + 1, e.what()));
    }
    // A transfer slower than the links allow moves its bytes as if there were more of them.
    const double factor = transfer_factor(col);
    if (factor != 1)
      for (Phase& p : sh.phases)
        for (FlowSpec& f : p.flows) f.bytes *= factor;
    sh.decomposed = true;
  }
  return sh;
}

// ---- running ---------------------------------------------------------------------------------

void Engine::make_ready(int g) {
  OpState& op = ops_[g];
  op.ready_ns = now_ns_;
  if (op.collective < 0) {
    start_op(g);
    push(now_ns_ + op.duration_ns + op.gap_ns, EventType::kOpEnd, g);
    return;
  }
  CollectiveState& cs = colls_[op.collective];
  if (++cs.arrived == cs.needed) start_collective(op.collective);
}

void Engine::start_op(int g) {
  OpState& op = ops_[g];
  op.start_ns = now_ns_;
  RankState& rk = ranks_[op.rank];
  rk.current_bytes += op.alloc_bytes;
  if (rk.current_bytes > rk.peak_bytes) {
    rk.peak_bytes = rk.current_bytes;
    rk.peak_op = g;
  }
  if (rk.overflow_op < 0 && !rk.static_overflow && rk.capacity_bytes > 0 &&
      static_cast<double>(rk.current_bytes) > rk.capacity_bytes)
    rk.overflow_op = g;
}

void Engine::finish_op(int g) {
  OpState& op = ops_[g];
  op.end_ns = now_ns_ - op.gap_ns;  // the span; the rank's time runs on through the gap
  RankState& rk = ranks_[op.rank];
  rk.current_bytes -= op.free_bytes;
  rk.last_finished = g;
  rk.end_ns = now_ns_;
  ++finished_;
  for (int k = succ_begin_[g]; k < succ_begin_[g + 1]; ++k) {
    const int s = succ_[k];
    if (--ops_[s].pending == 0) {
      ops_[s].trigger = g;
      make_ready(s);
    }
  }
}

void Engine::start_collective(int c) {
  CollectiveState& cs = colls_[c];
  cs.start_ns = now_ns_;
  ++collectives_run_;
  for (int k = coll_begin_[c]; k < coll_begin_[c + 1]; ++k) start_op(coll_ops_[k]);
  if (options_.network == NetworkMode::kAnalytic) {
    push(now_ns_ + ceil_ns(shapes_[cs.shape].time_s), EventType::kCollectiveEnd, c);
    return;
  }
  const Shape& sh = shape_for_flows(c);
  cs.phase = 0;
  if (sh.phases.empty()) {
    end_collective(c);
    return;
  }
  cs.repeat_left = std::max(1, sh.phases[0].repeat);
  start_phase(c);
}

void Engine::end_collective(int c) {
  CollectiveState& cs = colls_[c];
  cs.end_ns = now_ns_;
  Shape& sh = shapes_[cs.shape];
  if (--sh.uses_left == 0) std::vector<Phase>().swap(sh.phases);
  for (int k = coll_begin_[c]; k < coll_begin_[c + 1]; ++k) finish_op(coll_ops_[k]);
}

void Engine::start_phase(int c) {
  const Phase& p = shapes_[colls_[c].shape].phases[colls_[c].phase];
  const int64_t delay_ns = ceil_ns(p.delay_s);
  if (delay_ns > 0)
    push(now_ns_ + delay_ns, EventType::kPhaseStart, c);
  else
    add_phase_flows(c);
}

void Engine::add_phase_flows(int c) {
  CollectiveState& cs = colls_[c];
  const Phase& p = shapes_[cs.shape].phases[cs.phase];
  if (p.flows.empty()) {
    phase_done(c);
    return;
  }
  sync_network(ns_to_s(now_ns_));
  cs.outstanding_flows = static_cast<int64_t>(p.flows.size());
  for (const FlowSpec& f : p.flows) net_->add_flow(f.src, f.dst, f.bytes, static_cast<uint64_t>(c));
  net_dirty_ = true;
}

void Engine::phase_done(int c) {
  CollectiveState& cs = colls_[c];
  const std::vector<Phase>& phases = shapes_[cs.shape].phases;
  if (--cs.repeat_left > 0) {
    start_phase(c);
    return;
  }
  if (++cs.phase < static_cast<int>(phases.size())) {
    cs.repeat_left = std::max(1, phases[cs.phase].repeat);
    start_phase(c);
    return;
  }
  end_collective(c);
}

// Brings the network to `t_s`, collecting the flows that finish on the way (handled afterwards by
// handle_finished_flows, so that no collective advances while the network is mid-update).
void Engine::sync_network(double t_s) {
  for (;;) {
    const double next = net_->next_completion_s();
    if (!(next <= t_s)) break;
    net_->advance(std::max(next, net_->now()));
    const std::vector<FinishedFlow> done = net_->take_finished();
    MOESIM_ASSERT(!done.empty(), "the network's next completion ({} s) finished no flow", next);
    for (const FinishedFlow& f : done) finished_tags_.push_back(f.tag);
    net_dirty_ = true;
  }
  if (t_s > net_->now()) net_->advance(t_s);
}

void Engine::on_network_event(int64_t version) {
  if (version != net_version_) return;  // superseded by a later reschedule
  net_scheduled_ns_ = -1;
  const double next = net_->next_completion_s();
  // Rates may have changed within the nanosecond since this event was queued: handle only what
  // is due now, otherwise queue the new completion.
  if (std::isfinite(next) && ceil_ns(next) <= now_ns_) sync_network(std::max(ns_to_s(now_ns_), next));
  net_dirty_ = true;
}

void Engine::handle_finished_flows() {
  // Finishing a phase may start flows, which may finish more at once: loop until quiet.
  std::vector<uint64_t>& batch = tag_batch_;
  while (!finished_tags_.empty()) {
    batch.swap(finished_tags_);
    for (uint64_t tag : batch) {
      const int c = static_cast<int>(tag);
      MOESIM_ASSERT(colls_[c].outstanding_flows > 0, "collective {}: a flow finished that was not outstanding", c + 1);
      if (--colls_[c].outstanding_flows == 0) phase_done(c);
    }
    batch.clear();
  }
}

void Engine::reschedule_network() {
  net_dirty_ = false;
  const double next = net_->next_completion_s();
  if (!std::isfinite(next)) {
    if (net_scheduled_ns_ >= 0) ++net_version_;
    net_scheduled_ns_ = -1;
    return;
  }
  const int64_t ns = std::max(ceil_ns(next), now_ns_);
  if (ns == net_scheduled_ns_) return;  // the queued event stands
  ++net_version_;
  net_scheduled_ns_ = ns;
  push(ns, EventType::kNetwork, net_version_);
}

SimResult Engine::run() {
  const auto wall0 = std::chrono::steady_clock::now();
  build();
  prepare_shapes();
  if (options_.network == NetworkMode::kFlows) net_ = std::make_unique<FlowNetwork>(cluster_);

  const int64_t total = static_cast<int64_t>(ops_.size());
  const int64_t progress_step = std::max<int64_t>(total / 100, 4096);
  next_progress_ = progress_step;
  heap_.reserve(1024);
  for (int g = 0; g < static_cast<int>(total); ++g)
    if (ops_[g].pending == 0) make_ready(g);

  for (;;) {
    if (net_) {
      handle_finished_flows();
      if (net_dirty_ && (heap_.empty() || heap_.front().ns != now_ns_)) reschedule_network();
    }
    if (heap_.empty()) break;
    std::pop_heap(heap_.begin(), heap_.end(), Later{});
    const Event e = heap_.back();
    heap_.pop_back();
    MOESIM_ASSERT(e.ns >= now_ns_, "time went backwards: event at {} ns after {} ns", e.ns, now_ns_);
    now_ns_ = e.ns;
    switch (e.type) {
      case EventType::kOpEnd: finish_op(static_cast<int>(e.payload)); break;
      case EventType::kCollectiveEnd: end_collective(static_cast<int>(e.payload)); break;
      case EventType::kPhaseStart: add_phase_flows(static_cast<int>(e.payload)); break;
      case EventType::kNetwork:
        if (e.payload != net_version_) continue;  // stale: not counted
        on_network_event(e.payload);
        break;
    }
    ++events_;
    if (options_.progress && finished_ >= next_progress_) {
      options_.progress(static_cast<double>(finished_) / static_cast<double>(total));
      next_progress_ = finished_ + progress_step;
    }
  }
  if (finished_ != total) deadlock();
  if (net_ && net_->active_flows() > 0)
    throw std::runtime_error(fmt::format("simulate: {} flows never finished", net_->active_flows()));
  if (options_.progress) options_.progress(1.0);

  SimResult out;
  fill_result(out);
  out.sim_wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  return out;
}

void Engine::deadlock() const {
  // Per rank, the first op that never finished: its predecessors are all earlier, so they
  // finished and it is ready, waiting in a collective for ranks that never joined.
  std::vector<std::string> stuck;
  int stuck_ranks = 0;
  const int64_t left = static_cast<int64_t>(ops_.size()) - finished_;
  for (int r = 0; r < s_.ranks_size(); ++r) {
    int at = rank_begin_[r];
    while (at < rank_begin_[r + 1] && ops_[at].end_ns >= 0) ++at;
    if (at == rank_begin_[r + 1]) continue;
    ++stuck_ranks;
    if (stuck.size() >= 6) continue;
    const OpState& op = ops_[at];
    std::string why;
    if (op.pending > 0) {
      why = fmt::format("waits for {} unfinished predecessor(s)", op.pending);
    } else if (op.collective >= 0) {
      const Collective& col = s_.collectives(op.collective);
      std::vector<int> missing;
      for (int k = coll_begin_[op.collective]; k < coll_begin_[op.collective + 1]; ++k)
        if (ops_[coll_ops_[k]].ready_ns < 0) missing.push_back(s_.ranks(ops_[coll_ops_[k]].rank).rank());
      why = fmt::format("waits in collective {} ({} over {} ranks) for rank(s) {}", op.collective + 1,
                        cost::op_name(colls_[op.collective].cost_op), col.ranks_size(), fmt::join(missing, ", "));
    } else {
      why = "is ready but never ran";
    }
    stuck.push_back(fmt::format("{} {}", op_label(s_, op.rank, op.local), why));
  }
  throw std::runtime_error(fmt::format("simulate: deadlock: {} ops on {} ranks can never run; {}", left, stuck_ranks,
                                       fmt::join(stuck, "; ")));
}

// ---- results ---------------------------------------------------------------------------------

void Engine::charge(std::array<int64_t, kCategoryCount>& acc, int waited_for, int64_t g0, int64_t g1) const {
  if (g1 <= g0) return;
  if (waited_for < 0) {
    acc[kOther] += g1 - g0;
    return;
  }
  const OpState& w = ops_[waited_for];
  if (w.collective >= 0 && colls_[w.collective].category == kP2p) {
    // A pipeline transfer: the time before it started waited for the other stage.
    const int64_t started = std::clamp(colls_[w.collective].start_ns, g0, g1);
    acc[kPipelineBubble] += started - g0;
    acc[kP2p] += g1 - started;
    return;
  }
  acc[w.waited_category] += g1 - g0;
}

std::map<std::string, double> Engine::breakdown_of(int r) const {
  std::array<int64_t, kCategoryCount> acc{};
  std::vector<int32_t> compute;
  for (int g = rank_begin_[r]; g < rank_begin_[r + 1]; ++g)
    if (ops_[g].compute) compute.push_back(g);
  std::stable_sort(compute.begin(), compute.end(), [&](int a, int b) { return ops_[a].start_ns < ops_[b].start_ns; });
  int64_t covered = 0;
  for (int g : compute) {
    const OpState& op = ops_[g];
    if (op.start_ns > covered) {
      charge(acc, op.trigger, covered, op.start_ns);
      covered = op.start_ns;
    }
    if (op.end_ns > covered) {
      acc[kCompute] += op.end_ns - covered;
      covered = op.end_ns;
    }
  }
  const RankState& rk = ranks_[r];
  charge(acc, rk.last_finished, covered, rk.end_ns);
  std::map<std::string, double> out;
  out[std::string(kCategoryNames[kCompute])] = ns_to_s(acc[kCompute]);
  for (int k = 0; k < kCategoryCount; ++k)
    if (acc[k] > 0) out[std::string(kCategoryNames[k])] = ns_to_s(acc[k]);
  return out;
}

void Engine::fill_result(SimResult& out) const {
  out.events = events_;
  out.collectives_run = collectives_run_;
  const int nranks = s_.ranks_size();
  int64_t step_ns = -1;
  int critical = -1;
  double least_margin = std::numeric_limits<double>::infinity();
  int64_t peak_at_least = -1;
  int peak = -1;
  out.ranks.reserve(nranks);
  for (int r = 0; r < nranks; ++r) {
    const schedule::RankSchedule& rs = s_.ranks(r);
    const RankState& rk = ranks_[r];
    RankResult rr;
    rr.rank = rs.rank();
    rr.represents = std::max(1, rs.represents());
    rr.end_s = ns_to_s(rk.end_ns);
    rr.peak_bytes = static_cast<double>(rk.peak_bytes);
    rr.capacity_bytes = rk.capacity_bytes;
    rr.fits = !rk.static_overflow && rk.overflow_op < 0;
    if (rk.peak_op >= 0) rr.peak_op = rs.ops(ops_[rk.peak_op].local).id();
    if (rk.static_overflow)
      rr.overflow_op = "static_bytes";
    else if (rk.overflow_op >= 0)
      rr.overflow_op = rs.ops(ops_[rk.overflow_op].local).id();
    rr.breakdown = breakdown_of(r);
    if (rk.end_ns > step_ns) {
      step_ns = rk.end_ns;
      critical = r;
    }
    const double margin = rk.capacity_bytes > 0 ? rk.capacity_bytes - rr.peak_bytes : std::numeric_limits<double>::infinity();
    if (peak < 0 || margin < least_margin || (margin == least_margin && rk.peak_bytes > peak_at_least)) {
      least_margin = margin;
      peak_at_least = rk.peak_bytes;
      peak = r;
    }
    out.fits = out.fits && rr.fits;
    out.ranks.push_back(std::move(rr));
  }
  if (critical >= 0) {
    out.step_time_s = ns_to_s(step_ns);
    out.critical_rank = out.ranks[critical].rank;
    out.breakdown = out.ranks[critical].breakdown;
    out.peak_rank = out.ranks[peak].rank;
    out.peak_memory_bytes = out.ranks[peak].peak_bytes;
  }
  if (net_) out.busiest_links = net_->busiest_links(options_.busiest_links, out.step_time_s);

  if (!options_.record_trace) return;
  trace::Trace& t = out.trace;
  t.mutable_run()->set_source(trace::PREDICTED);
  t.mutable_run()->set_cluster(cluster_.name());
  // Spans are made in trace::span_order directly: sort op indices on the same key (start, rank,
  // stream kind, stream index, end, op id; stable, so equal spans keep schedule order).
  std::vector<int32_t> order(ops_.size());
  std::iota(order.begin(), order.end(), 0);
  auto op_of = [&](int g) -> const schedule::Op& { return s_.ranks(ops_[g].rank).ops(ops_[g].local); };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const OpState& x = ops_[a];
    const OpState& y = ops_[b];
    if (x.start_ns != y.start_ns) return x.start_ns < y.start_ns;
    const int xr = s_.ranks(x.rank).rank(), yr = s_.ranks(y.rank).rank();
    if (xr != yr) return xr < yr;
    const schedule::Op& p = op_of(a);
    const schedule::Op& q = op_of(b);
    if (p.stream().kind() != q.stream().kind()) return p.stream().kind() < q.stream().kind();
    if (p.stream().index() != q.stream().index()) return p.stream().index() < q.stream().index();
    if (x.end_ns != y.end_ns) return x.end_ns < y.end_ns;
    return p.id() < q.id();
  });
  std::vector<const std::string*> device_of(nranks);
  for (int r = 0; r < nranks; ++r) {
    const schedule::RankSchedule& rs = s_.ranks(r);
    device_of[r] = &cluster_.graph()[cluster_.device(rs.rank()).vertex].name;
    trace::RankMemory* mem = t.add_peak_memory();
    mem->set_rank(rs.rank());
    mem->set_device(*device_of[r]);
    mem->set_peak_bytes(static_cast<double>(ranks_[r].peak_bytes));
  }
  t.mutable_spans()->Reserve(static_cast<int>(order.size()));
  for (int g : order) {
    const OpState& st = ops_[g];
    const schedule::Op& op = op_of(g);
    trace::Span& sp = *t.add_spans();
    sp.set_op_id(op.id());
    sp.set_name(op.name());
    sp.set_kind(op.kind());
    sp.set_rank(s_.ranks(st.rank).rank());
    sp.set_device(*device_of[st.rank]);
    *sp.mutable_stream() = op.stream();
    sp.set_start_ns(st.start_ns);
    sp.set_end_ns(st.end_ns);
    sp.set_flops(op.flops());
    double bytes = op.bytes();
    if (st.collective >= 0) {
      const Collective& col = s_.collectives(st.collective);
      if (bytes <= 0) bytes = colls_[st.collective].size_bytes;
      trace::CollectiveStats* cs = sp.mutable_collective();
      const int n = col.ranks_size();
      cs->set_ranks(n);
      cs->set_bus_factor(trace::bus_factor(op.kind(), n));
      const double duration_s = ns_to_s(st.end_ns - st.start_ns);
      if (duration_s > 0) {
        cs->set_alg_bw_bps(bytes / duration_s);
        cs->set_bus_bw_bps(bytes / duration_s * cs->bus_factor());
      }
      cs->set_algorithm(std::string(cost::algo_name(colls_[st.collective].algo)));
    }
    sp.set_bytes(bytes);
  }
  std::stable_sort(t.mutable_peak_memory()->begin(), t.mutable_peak_memory()->end(),
                   [](const trace::RankMemory& a, const trace::RankMemory& b) { return a.rank() < b.rank(); });
}

}  // namespace

SimResult simulate(const schedule::Schedule& schedule, const topo::Cluster& cluster, const SimOptions& options) {
  Engine engine(schedule, cluster, options);
  return engine.run();
}

const RankResult& bottleneck_rank(const SimResult& result) {
  auto busy = [](const RankResult& r) {
    auto it = r.breakdown.find("pipeline_bubble");
    return r.end_s - (it == r.breakdown.end() ? 0.0 : it->second);
  };
  const RankResult* best = &result.ranks.at(0);
  for (const RankResult& r : result.ranks)
    if (busy(r) > busy(*best)) best = &r;
  return *best;
}

}  // namespace moesim::sim
