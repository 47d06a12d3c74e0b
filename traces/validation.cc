#include "traces/validation.h"

#include "traces/recorder.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <utility>

namespace moesim::trace {
namespace {

using Key = std::pair<std::string, int>;  // (op id, rank)

std::string describe(const Key& k) { return fmt::format("'{}' on rank {}", k.first, k.second); }

}  // namespace

std::string op_kind_label(const std::string& name) {
  if (name == "attn") return "attention";
  if (name == "grad_allreduce") return "all_reduce";
  if (name.rfind("moe.", 0) == 0) return name.substr(4);
  return name;
}

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

ErrorStats error_stats(const std::vector<double>& errors_pct) {
  ErrorStats s;
  s.count = static_cast<int>(errors_pct.size());
  if (errors_pct.empty()) return s;
  std::vector<double> abs;
  double sum = 0;
  for (double e : errors_pct) {
    abs.push_back(std::fabs(e));
    sum += e;
  }
  s.median_abs_pct = quantile(abs, 0.5);
  s.p90_abs_pct = quantile(abs, 0.9);
  s.max_abs_pct = *std::max_element(abs.begin(), abs.end());
  s.mean_pct = sum / static_cast<double>(errors_pct.size());
  return s;
}

std::map<std::string, KindOverRuns> per_kind_over_runs(const std::vector<std::vector<OpError>>& runs) {
  std::map<std::pair<std::string, int>, std::pair<std::string, std::vector<double>>> by_op;  // -> kind, errors
  for (const std::vector<OpError>& run : runs)
    for (const OpError& e : run) {
      if (!std::isfinite(e.error_pct)) continue;
      auto& [kind, errors] = by_op[{e.op_id, e.rank}];
      kind = e.kind;
      errors.push_back(e.error_pct);
    }
  std::map<std::string, std::vector<double>> kind_errors, kind_spreads;
  for (auto& [op, entry] : by_op) {
    const auto [lo, hi] = std::minmax_element(entry.second.begin(), entry.second.end());
    kind_spreads[entry.first].push_back((*hi - *lo) / 2);
    kind_errors[entry.first].push_back(quantile(entry.second, 0.5));
  }
  std::map<std::string, KindOverRuns> out;
  for (const auto& [kind, errors] : kind_errors) out[kind] = {error_stats(errors), quantile(kind_spreads[kind], 0.5)};
  return out;
}

double kendall_tau(const std::vector<double>& a, const std::vector<double>& b) {
  const size_t n = std::min(a.size(), b.size());
  if (n < 2) return 0;
  double score = 0;
  for (size_t i = 0; i < n; ++i)
    for (size_t j = i + 1; j < n; ++j) {
      const double s = (a[i] - a[j]) * (b[i] - b[j]);
      score += s > 0 ? 1 : s < 0 ? -1 : 0;
    }
  return score / (static_cast<double>(n) * static_cast<double>(n - 1) / 2);
}

std::set<int> quiet_steps(const std::map<int, double>& step_time_s, double share) {
  std::vector<double> times;
  for (const auto& [step, t] : step_time_s) times.push_back(t);
  std::sort(times.begin(), times.end());
  std::set<int> out;
  if (times.empty()) return out;
  const size_t keep = std::clamp<size_t>(static_cast<size_t>(std::ceil(share * static_cast<double>(times.size()))), 1,
                                         times.size());
  const double limit = times[keep - 1];
  for (const auto& [step, t] : step_time_s)
    if (t <= limit) out.insert(step);
  return out;
}

std::map<int, double> step_times(const Trace& measured, int first_step) {
  std::map<int, std::pair<int64_t, int64_t>> bounds;  // step -> earliest start, latest end
  for (const Span& s : measured.spans()) {
    if (s.step() < first_step) continue;
    auto [it, fresh] = bounds.emplace(s.step(), std::pair{s.start_ns(), s.end_ns()});
    it->second = {std::min(it->second.first, s.start_ns()), std::max(it->second.second, s.end_ns())};
  }
  std::map<int, double> out;
  for (const auto& [step, b] : bounds) out[step] = static_cast<double>(b.second - b.first) * 1e-9;
  return out;
}

namespace {

// The median of a (op id, rank)'s seconds over the steps it ran in.
double median_over_steps(const std::map<int, double>& by_step) {
  std::vector<double> v;
  for (const auto& [step, seconds] : by_step) v.push_back(seconds);
  return quantile(std::move(v), 0.5);
}

}  // namespace

std::map<std::pair<std::string, int>, double> median_op_times(const Trace& measured, const std::set<int>& steps) {
  // The last rank to arrive at a collective waits for no one: its span is the exchange itself.
  // Measured on one rank's clock, as ranks' clocks start at their own exit from a barrier.
  std::map<std::pair<int, std::string>, int64_t> shortest;  // (step, collective op id) -> ns
  for (const Span& s : measured.spans()) {
    if (!steps.count(s.step()) || !is_collective(s.kind())) continue;
    const int64_t d = std::max<int64_t>(0, s.end_ns() - s.start_ns());
    auto [it, fresh] = shortest.emplace(std::pair{s.step(), s.op_id()}, d);
    if (!fresh) it->second = std::min(it->second, d);
  }
  std::map<std::pair<std::string, int>, std::map<int, double>> per_step;  // (op id, rank) -> step -> s
  for (const Span& s : measured.spans()) {
    if (!steps.count(s.step())) continue;
    const int64_t d = is_collective(s.kind()) ? shortest[{s.step(), s.op_id()}] : std::max<int64_t>(0, s.end_ns() - s.start_ns());
    per_step[{s.op_id(), s.rank()}][s.step()] += static_cast<double>(d) * 1e-9;
  }
  std::map<std::pair<std::string, int>, double> out;
  for (const auto& [key, by_step] : per_step) out[key] = median_over_steps(by_step);
  return out;
}

std::map<std::pair<std::string, int>, HostRouting> median_host_routing(const Trace& measured, const std::set<int>& steps) {
  // (op id, rank) -> step -> seconds, the routing's and the dispatch's
  std::map<std::pair<std::string, int>, std::pair<std::map<int, double>, std::map<int, double>>> per_step;
  for (const Span& s : measured.spans()) {
    if (!steps.count(s.step()) || (s.routing_host_s() <= 0 && s.dispatch_host_s() <= 0)) continue;
    auto& [routing, dispatch] = per_step[{s.op_id(), s.rank()}];
    routing[s.step()] += s.routing_host_s();
    dispatch[s.step()] += s.dispatch_host_s();
  }
  std::map<std::pair<std::string, int>, HostRouting> out;
  for (const auto& [key, times] : per_step) out[key] = {median_over_steps(times.first), median_over_steps(times.second)};
  return out;
}

std::vector<OpError> Comparison::worst(size_t n) const {
  std::vector<OpError> out = ops;
  std::stable_sort(out.begin(), out.end(),
                   [](const OpError& x, const OpError& y) { return std::fabs(x.error_pct) > std::fabs(y.error_pct); });
  if (out.size() > n) out.resize(n);
  return out;
}

Comparison compare(const Trace& predicted, const Trace& measured, const CompareOptions& options) {
  if (measured.spans().empty()) throw std::invalid_argument("the measured trace has no spans");
  int last_step = 0;
  for (const Span& s : measured.spans()) last_step = std::max(last_step, s.step());
  const int first_step = last_step >= options.skip_steps ? options.skip_steps : 0;

  // Per compared step: each (op, rank)'s span.
  std::map<int, std::set<Key>> by_step;
  for (const Span& s : measured.spans()) {
    if (s.step() < first_step) continue;
    const Key k{s.op_id(), s.rank()};
    if (!by_step[s.step()].insert(k).second)
      throw TraceMismatch(fmt::format("measured trace: op {} appears twice in step {}", describe(k), s.step()));
  }

  // The quiet steps: the faster `quiet_share` of the compared steps by step time (ties kept).
  const std::map<int, double> step_time = step_times(measured, first_step);
  const std::set<int> quiet = quiet_steps(step_time, options.quiet_share);
  const std::map<Key, double> medians = median_op_times(measured, quiet);

  Comparison c;
  c.predicted_step_s = options.predicted_step_s;
  std::set<Key> predicted_keys;
  for (const Span& p : predicted.spans()) {
    const Key k{p.op_id(), p.rank()};
    if (!predicted_keys.insert(k).second)
      throw TraceMismatch(fmt::format("predicted trace: op {} appears twice", describe(k)));
    for (const auto& [step, keys] : by_step)
      if (!keys.count(k))
        throw TraceMismatch(fmt::format("op {} of the prediction is missing from the measured step {}: the traces are "
                                        "not of the same schedule",
                                        describe(k), step));
    OpError e;
    e.op_id = p.op_id();
    e.kind = op_kind_label(p.name().empty() ? p.op_id() : p.name());
    e.rank = p.rank();
    e.predicted_s = static_cast<double>(p.end_ns() - p.start_ns()) * 1e-9;
    e.measured_s = medians.at(k);
    e.error_pct = e.measured_s > 0 ? (e.predicted_s - e.measured_s) / e.measured_s * 100
                  : e.predicted_s > 0 ? std::numeric_limits<double>::infinity()
                                      : 0;
    c.ops.push_back(std::move(e));
  }
  for (const auto& [step, keys] : by_step)
    for (const Key& k : keys)
      if (!predicted_keys.count(k))
        throw TraceMismatch(fmt::format("measured op {} (step {}) is not in the prediction: the traces are not of the "
                                        "same schedule",
                                        describe(k), step));

  std::vector<double> step_errors, all_errors;
  std::map<std::string, std::vector<double>> kind_errors;
  for (const auto& [step, t] : step_time) {
    c.measured_step_s.push_back(t);
    if (t > 0) step_errors.push_back((options.predicted_step_s - t) / t * 100);
  }
  double measured_total_s = 0;
  for (const OpError& e : c.ops) {
    measured_total_s += e.measured_s;
    c.kind_share_pct[e.kind] += e.measured_s;
    if (!std::isfinite(e.error_pct)) continue;
    kind_errors[e.kind].push_back(e.error_pct);
    all_errors.push_back(e.error_pct);
  }
  for (auto& [kind, share] : c.kind_share_pct) share = measured_total_s > 0 ? share / measured_total_s * 100 : 0;
  c.compared_steps = static_cast<int>(by_step.size());
  for (int step : quiet) c.measured_step_quiet_s += step_time.at(step) / static_cast<double>(quiet.size());
  if (c.measured_step_quiet_s > 0)
    c.step_error_pct = (options.predicted_step_s - c.measured_step_quiet_s) / c.measured_step_quiet_s * 100;
  c.step = error_stats(step_errors);
  c.all_ops = error_stats(all_errors);
  for (const auto& [kind, errors] : kind_errors) c.per_kind[kind] = error_stats(errors);
  return c;
}

}  // namespace moesim::trace
