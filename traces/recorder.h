// Recording traces (traces/trace.proto). Layers time their ops with a Recorder:
//
//   trace::Recorder rec(rank, "node0.gpu3");
//   {
//     auto span = rec.begin("L3.moe.dispatch_a2a mb2 fwd", trace::ALL_TO_ALL, StreamId::comm());
//     ... run it ...
//     span.collective(world, trace::bus_factor(trace::ALL_TO_ALL, world));
//     span.end(send_bytes);   // or let the destructor end it
//   }
//   rec.add(span_timed_with_cuda_events);
//   trace::Trace t = rec.snapshot(run_info);
//
// Times are steady_clock nanoseconds since the recorder was made (its epoch), so they are never
// negative and never go backwards. Recording is thread-safe: several threads (streams) may begin
// and end spans on one Recorder at once.
#pragma once

#include "traces/trace.pb.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace moesim::trace {

// A trace that cannot be used as asked: traces of different runs merged, a file not written.
class TraceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Names as written in reports and Chrome-trace categories: "gemm", "all_to_all", ...; "" for
// OP_KIND_UNSPECIFIED and values outside the enum. parse_* accept exactly those names.
std::string_view op_kind_name(OpKind kind);
std::optional<OpKind> parse_op_kind(std::string_view name);
std::string_view stream_kind_name(StreamKind kind);   // "compute", "comm", "copy"
std::string_view source_name(Source source);          // "predicted", "measured"
std::optional<Source> parse_source(std::string_view name);

bool is_collective(OpKind kind);  // all-reduce, all-to-all, all-gather, reduce-scatter, send, recv

// nccl-tests' busBw / algBw on n ranks (doc/PERFORMANCE.md; costmodel/collectives.h uses the same
// factors for predictions): 2(n-1)/n for all-reduce; (n-1)/n for all-gather, reduce-scatter and
// all-to-all; 1 for send and recv and for every other kind.
double bus_factor(OpKind kind, int ranks);

// A stream of one rank, by kind and index.
struct StreamId {
  StreamKind kind = COMPUTE;
  int32_t index = 0;

  static constexpr StreamId compute(int32_t i = 0) { return {COMPUTE, i}; }
  static constexpr StreamId comm(int32_t i = 0) { return {COMM, i}; }
  static constexpr StreamId copy(int32_t i = 0) { return {COPY, i}; }
};

// The current time in UTC as ISO 8601 ("2025-01-31T12:00:00Z"), for RunInfo.created.
std::string utc_now_iso8601();

class Recorder;

// An open span. Ends once: by end() or, if still open, by its destructor. Move-only; a moved-from
// span is closed. Setters return *this for chaining and are ignored once the span has ended.
class ScopedSpan {
 public:
  ScopedSpan(ScopedSpan&& other) noexcept;
  ScopedSpan& operator=(ScopedSpan&& other) noexcept;
  ScopedSpan(const ScopedSpan&) = delete;
  ScopedSpan& operator=(const ScopedSpan&) = delete;
  ~ScopedSpan();

  ScopedSpan& bytes(double b);
  ScopedSpan& flops(double f);
  ScopedSpan& name(std::string n);
  // Marks a collective on `ranks` ranks: at end, alg_bw_Bps = bytes / duration and
  // bus_bw_Bps = alg_bw_Bps x bus_factor (0 both when the duration is 0).
  ScopedSpan& collective(int ranks, double bus_factor, std::string algorithm = {});
  // An MoE op's host-side routing seconds (Span routing_host_s, dispatch_host_s).
  ScopedSpan& host_routing(double routing_s, double dispatch_s);

  void end();
  void end(double bytes);  // bytes(b).end()
  bool is_open() const { return recorder_ != nullptr; }

 private:
  friend class Recorder;
  ScopedSpan(Recorder* recorder, Span span, int collective_ranks);

  Recorder* recorder_ = nullptr;
  Span span_;
  int collective_ranks_ = 0;  // > 0: fill span_.collective at end
};

class Recorder {
 public:
  // `rank` and `device` are stamped on the spans begin() opens. The epoch is now.
  explicit Recorder(int rank = 0, std::string device = {});
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  // Opens a span on `stream` starting now. Spans still open when the Recorder is destroyed are
  // a bug: end them first.
  [[nodiscard]] ScopedSpan begin(std::string op_id, OpKind kind, StreamId stream = {});

  // A span timed elsewhere (CUDA events converted with to_trace_ns, the simulator's clock): kept as
  // given. Its end must not precede its start (MOESIM_ASSERT).
  void add(Span span);

  // The training step stamped on spans opened from now on (0 initially).
  void set_step(int step);
  int step() const;

  // Peak memory of a rank: keeps the largest value reported per rank.
  void note_peak_memory(int rank, std::string device, double peak_bytes);
  void add_expert_load(ExpertLoad load);

  std::chrono::steady_clock::time_point epoch() const { return epoch_; }
  int64_t now_ns() const;
  int64_t to_trace_ns(std::chrono::steady_clock::time_point t) const;

  int rank() const { return rank_; }
  const std::string& device() const { return device_; }
  size_t span_count() const;

  // Everything recorded so far under `run`: spans in span_order, peak memory by rank.
  Trace snapshot(const RunInfo& run = {}) const;

 private:
  friend class ScopedSpan;
  void finish(Span span);

  std::chrono::steady_clock::time_point epoch_;
  int rank_;
  std::string device_;
  std::atomic<int> step_{0};
  mutable std::mutex mu_;
  std::vector<Span> spans_;           // guarded by mu_
  std::vector<RankMemory> memory_;    // guarded by mu_
  std::vector<ExpertLoad> loads_;     // guarded by mu_
};

// The order spans are kept in: start_ns, then rank, stream kind, stream index, end_ns, op_id.
// Spans equal in all of these keep their relative order (sorts using it are stable).
bool span_order(const Span& a, const Span& b);

// The traces of several ranks of one run as one trace: run info of the first, spans of all in
// span_order, peak memory per rank (largest when a rank appears twice), expert loads in input
// order. Throws TraceError when the parts name different run ids or sources. Assumes a common
// epoch (trace.proto).
Trace merge(const std::vector<Trace>& parts);

}  // namespace moesim::trace
