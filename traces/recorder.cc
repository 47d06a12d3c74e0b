#include "traces/recorder.h"

#include "common/error.h"

#include <fmt/format.h>

#include <algorithm>
#include <ctime>
#include <map>
#include <utility>

namespace moesim::trace {
namespace {

struct OpKindName {
  OpKind kind;
  std::string_view name;
};

constexpr OpKindName kOpKindNames[] = {
    {GEMM, "gemm"},
    {GROUPED_GEMM, "grouped_gemm"},
    {ATTENTION, "attention"},
    {NORM, "norm"},
    {ELEMENTWISE, "elementwise"},
    {GATE, "gate"},
    {DISPATCH, "dispatch"},
    {COMBINE, "combine"},
    {ALL_REDUCE, "all_reduce"},
    {ALL_TO_ALL, "all_to_all"},
    {ALL_GATHER, "all_gather"},
    {REDUCE_SCATTER, "reduce_scatter"},
    {SEND, "send"},
    {RECV, "recv"},
    {OPTIMIZER, "optimizer"},
    {MEMCPY, "memcpy"},
    {OTHER, "other"},
};

struct StreamKindName {
  StreamKind kind;
  std::string_view name;
};

constexpr StreamKindName kStreamKindNames[] = {
    {COMPUTE, "compute"},
    {COMM, "comm"},
    {COPY, "copy"},
};

struct SourceName {
  Source source;
  std::string_view name;
};

constexpr SourceName kSourceNames[] = {
    {PREDICTED, "predicted"},
    {MEASURED, "measured"},
};

}  // namespace

std::string_view op_kind_name(OpKind kind) {
  for (const OpKindName& e : kOpKindNames)
    if (e.kind == kind) return e.name;
  return "";
}

std::optional<OpKind> parse_op_kind(std::string_view name) {
  for (const OpKindName& e : kOpKindNames)
    if (e.name == name) return e.kind;
  return std::nullopt;
}

std::string_view stream_kind_name(StreamKind kind) {
  for (const StreamKindName& e : kStreamKindNames)
    if (e.kind == kind) return e.name;
  return "";
}

std::string_view source_name(Source source) {
  for (const SourceName& e : kSourceNames)
    if (e.source == source) return e.name;
  return "";
}

std::optional<Source> parse_source(std::string_view name) {
  for (const SourceName& e : kSourceNames)
    if (e.name == name) return e.source;
  return std::nullopt;
}

bool is_collective(OpKind kind) {
  switch (kind) {
    case ALL_REDUCE:
    case ALL_TO_ALL:
    case ALL_GATHER:
    case REDUCE_SCATTER:
    case SEND:
    case RECV: return true;
    default: return false;
  }
}

double bus_factor(OpKind kind, int ranks) {
  if (ranks < 1) return 0;
  const double n = ranks;
  switch (kind) {
    case ALL_REDUCE: return 2 * (n - 1) / n;
    case ALL_GATHER:
    case REDUCE_SCATTER:
    case ALL_TO_ALL: return (n - 1) / n;
    default: return 1;
  }
}

std::string utc_now_iso8601() {
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char buf[32];
  size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return std::string(buf, n);
}

// ---- ScopedSpan ------------------------------------------------------------------------------

ScopedSpan::ScopedSpan(Recorder* recorder, Span span, int collective_ranks)
    : recorder_(recorder), span_(std::move(span)), collective_ranks_(collective_ranks) {}

ScopedSpan::ScopedSpan(ScopedSpan&& other) noexcept
    : recorder_(std::exchange(other.recorder_, nullptr)),
      span_(std::move(other.span_)),
      collective_ranks_(other.collective_ranks_) {}

ScopedSpan& ScopedSpan::operator=(ScopedSpan&& other) noexcept {
  if (this != &other) {
    if (is_open()) {
      try {
        end();
      } catch (...) {  // out of memory while storing the span: it is lost, the program goes on
      }
    }
    recorder_ = std::exchange(other.recorder_, nullptr);
    span_ = std::move(other.span_);
    collective_ranks_ = other.collective_ranks_;
  }
  return *this;
}

ScopedSpan::~ScopedSpan() {
  if (!is_open()) return;
  try {
    end();
  } catch (...) {  // as above: a destructor must not throw
  }
}

ScopedSpan& ScopedSpan::bytes(double b) {
  if (is_open()) span_.set_bytes(b);
  return *this;
}

ScopedSpan& ScopedSpan::flops(double f) {
  if (is_open()) span_.set_flops(f);
  return *this;
}

ScopedSpan& ScopedSpan::name(std::string n) {
  if (is_open()) span_.set_name(std::move(n));
  return *this;
}

ScopedSpan& ScopedSpan::host_routing(double routing_s, double dispatch_s) {
  if (is_open()) {
    span_.set_routing_host_s(routing_s);
    span_.set_dispatch_host_s(dispatch_s);
  }
  return *this;
}

ScopedSpan& ScopedSpan::collective(int ranks, double factor, std::string algorithm) {
  if (!is_open()) return *this;
  collective_ranks_ = std::max(ranks, 1);
  CollectiveStats* c = span_.mutable_collective();
  c->set_ranks(collective_ranks_);
  c->set_bus_factor(factor);
  c->set_algorithm(std::move(algorithm));
  return *this;
}

void ScopedSpan::end(double b) {
  bytes(b);
  end();
}

void ScopedSpan::end() {
  if (!is_open()) return;
  Recorder* rec = std::exchange(recorder_, nullptr);
  span_.set_end_ns(std::max(rec->now_ns(), span_.start_ns()));
  if (collective_ranks_ > 0) {
    CollectiveStats* c = span_.mutable_collective();
    const int64_t dur_ns = span_.end_ns() - span_.start_ns();
    const double alg = dur_ns > 0 ? span_.bytes() / (static_cast<double>(dur_ns) * 1e-9) : 0.0;
    c->set_alg_bw_bps(alg);
    c->set_bus_bw_bps(alg * c->bus_factor());
  }
  rec->finish(std::move(span_));
}

// ---- Recorder --------------------------------------------------------------------------------

Recorder::Recorder(int rank, std::string device)
    : epoch_(std::chrono::steady_clock::now()), rank_(rank), device_(std::move(device)) {}

int64_t Recorder::to_trace_ns(std::chrono::steady_clock::time_point t) const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t - epoch_).count();
}

int64_t Recorder::now_ns() const { return to_trace_ns(std::chrono::steady_clock::now()); }

ScopedSpan Recorder::begin(std::string op_id, OpKind kind, StreamId stream) {
  Span span;
  span.set_op_id(std::move(op_id));
  span.set_kind(kind);
  span.set_rank(rank_);
  span.set_device(device_);
  span.mutable_stream()->set_kind(stream.kind);
  span.mutable_stream()->set_index(stream.index);
  span.set_step(step_.load(std::memory_order_relaxed));
  span.set_start_ns(now_ns());
  return ScopedSpan(this, std::move(span), 0);
}

void Recorder::add(Span span) {
  MOESIM_ASSERT(span.end_ns() >= span.start_ns(), "span '{}' ends at {} ns, before its start {} ns",
                span.op_id(), span.end_ns(), span.start_ns());
  finish(std::move(span));
}

void Recorder::finish(Span span) {
  std::lock_guard<std::mutex> lock(mu_);
  spans_.push_back(std::move(span));
}

void Recorder::set_step(int step) { step_.store(step, std::memory_order_relaxed); }
int Recorder::step() const { return step_.load(std::memory_order_relaxed); }

void Recorder::note_peak_memory(int rank, std::string device, double peak_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  for (RankMemory& m : memory_) {
    if (m.rank() != rank) continue;
    if (peak_bytes > m.peak_bytes()) m.set_peak_bytes(peak_bytes);
    if (m.device().empty()) m.set_device(std::move(device));
    return;
  }
  RankMemory& m = memory_.emplace_back();
  m.set_rank(rank);
  m.set_device(std::move(device));
  m.set_peak_bytes(peak_bytes);
}

void Recorder::add_expert_load(ExpertLoad load) {
  std::lock_guard<std::mutex> lock(mu_);
  loads_.push_back(std::move(load));
}

size_t Recorder::span_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return spans_.size();
}

Trace Recorder::snapshot(const RunInfo& run) const {
  Trace out;
  *out.mutable_run() = run;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out.mutable_spans()->Reserve(static_cast<int>(spans_.size()));
    for (const Span& s : spans_) *out.add_spans() = s;
    for (const RankMemory& m : memory_) *out.add_peak_memory() = m;
    for (const ExpertLoad& l : loads_) *out.add_expert_load() = l;
  }
  std::stable_sort(out.mutable_spans()->begin(), out.mutable_spans()->end(), span_order);
  std::sort(out.mutable_peak_memory()->begin(), out.mutable_peak_memory()->end(),
            [](const RankMemory& a, const RankMemory& b) { return a.rank() < b.rank(); });
  return out;
}

// ---- ordering and merging --------------------------------------------------------------------

bool span_order(const Span& a, const Span& b) {
  if (a.start_ns() != b.start_ns()) return a.start_ns() < b.start_ns();
  if (a.rank() != b.rank()) return a.rank() < b.rank();
  if (a.stream().kind() != b.stream().kind()) return a.stream().kind() < b.stream().kind();
  if (a.stream().index() != b.stream().index()) return a.stream().index() < b.stream().index();
  if (a.end_ns() != b.end_ns()) return a.end_ns() < b.end_ns();
  return a.op_id() < b.op_id();
}

Trace merge(const std::vector<Trace>& parts) {
  Trace out;
  if (parts.empty()) return out;
  const RunInfo& run = parts.front().run();
  *out.mutable_run() = run;
  for (size_t i = 1; i < parts.size(); ++i) {
    const RunInfo& other = parts[i].run();
    if (other.run_id() != run.run_id() || other.source() != run.source()) {
      throw TraceError(fmt::format(
          "cannot merge traces of different runs: part 0 is run '{}' ({}), part {} is run '{}' ({})",
          run.run_id(), source_name(run.source()), i, other.run_id(), source_name(other.source())));
    }
  }
  std::map<int, const RankMemory*> peak_by_rank;
  for (const Trace& part : parts) {
    for (const Span& s : part.spans()) *out.add_spans() = s;
    for (const RankMemory& m : part.peak_memory()) {
      auto [it, inserted] = peak_by_rank.emplace(m.rank(), &m);
      if (!inserted && m.peak_bytes() > it->second->peak_bytes()) it->second = &m;
    }
    for (const ExpertLoad& l : part.expert_load()) *out.add_expert_load() = l;
  }
  for (const auto& [rank, m] : peak_by_rank) *out.add_peak_memory() = *m;
  std::stable_sort(out.mutable_spans()->begin(), out.mutable_spans()->end(), span_order);
  return out;
}

}  // namespace moesim::trace
