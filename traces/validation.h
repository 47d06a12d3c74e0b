// Predicted against measured: the join of a simulator trace and an executor trace of the same
// Schedule by (op id, rank), and the error statistics `moesim validate` reports.
//
//   trace::Comparison c = trace::compare(predicted, measured, {.predicted_step_s = 0.023});
//   c.step.median_abs_pct;  c.per_kind["experts"];  c.worst(5);
//
// ## The join
// Every (op id, rank) of the predicted trace must appear in every compared step of the measured
// trace, and every measured (op id, rank) in the predicted one; the first op missing either way
// makes compare() throw TraceMismatch naming it (traces of different plans are not joined).
//
// ## Durations
// Predicted: the span's end - start (one simulated step). Measured: the median of the rank's span
// over the quiet steps: the faster `quiet_share` (default kQuietShare, half) of the compared steps
// (steps >= skip_steps, the warm-up left out) by step time. For a collective the
// simulator's span starts when every participant is ready (the rendezvous), while an executor
// rank's span starts when that rank arrives; so a measured collective is the shortest span of
// the ranks running the same op id in that step (the last to arrive waits for no one: its span is
// the exchange itself), the same for each of them. Each span is measured on its own rank's clock:
// ranks' trace clocks start at their own exit from a barrier, microseconds apart, which an
// exchange of a few microseconds cannot be compared across (measuring from the latest arrival to
// each rank's end found 0 for short all-gathers).
//
// ## Errors
// error_pct = (predicted - measured) / measured x 100 (positive: the simulator is slow). A step's
// measured time is the latest span end minus the earliest span start over all ranks in that step;
// each compared step gives one step-time error against the one predicted step time, and the mean
// over the quiet steps gives the run's step time and its error (step_error_pct).
// Medians and percentiles interpolate linearly between order statistics (numpy's default).
//
// ## Why the quiet steps, and an op's median over them
// On a shared machine other tenants slow whole stretches of a run and never speed one up: on the
// development VM one rank's moe-tiny step took 9.5-10.5 ms in most stretches and 13-15 ms in
// others of 100-200 ms, and the share of slow steps changed from run to run (a run's median moved
// by 40%). A stretch outlasts a step, so a step is slowed as a whole: the faster half of the
// steps is the machine's own speed. Within them a short op still meets a hiccup now and then (a
// rank descheduled for a few microseconds, a page fault), too short to slow its step out of the
// quiet half: over one run's steps, moe-tiny's 179 kB gradient all-reduce took 16-18 us in
// some steps and 40-147 in others, and a permutation's mean was 13.1 us against a median of 8.4.
// So an op's measured time is its median over the quiet steps, the op as it usually runs; a step
// is not a sum of medians, but the ops' medians fell short of their means' sum by 0.2-0.7% of the
// step over the suite's 2-rank plans, and the suite's per-kind errors fell (docs/VALIDATION.md).
// Calibration's in-situ step measures the same way, and its microbenchmarks take the lower
// quartile of repeated batches of one kernel (kQuietQuantile), so a prediction and its check
// describe one machine.
#pragma once

#include "traces/trace.pb.h"

#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace moesim::trace {

// The faster share of the steps that calibration and validation measure, and the statistic of a
// microbenchmark's repeated batches (see above).
inline constexpr double kQuietShare = 0.5;
// Steps a fresh process runs before its exchanges settle: on the development VM the calibration
// step's all-to-alls took 58, 40 and 36 us as medians of steps 0-9, 10-19 and 20-29, then 37-48.
// Validation leaves at least these out (when it runs twice as many) and calibration measures
// after them.
inline constexpr int kWarmupSteps = 10;
inline constexpr double kQuietQuantile = 0.25;

// The traces do not describe the same ops: what() names the first op missing and from which side.
class TraceMismatch : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct OpError {
  std::string op_id;
  std::string kind;  // op_kind_label(name)
  int rank = 0;
  double predicted_s = 0;
  double measured_s = 0;
  double error_pct = 0;
};

struct ErrorStats {
  int count = 0;
  double median_abs_pct = 0;
  double p90_abs_pct = 0;
  double max_abs_pct = 0;
  double mean_pct = 0;  // signed: the bias
};

struct CompareOptions {
  double predicted_step_s = 0;  // the simulator's step time
  int skip_steps = 1;           // measured warm-up steps left out (all kept when fewer steps exist)
  double quiet_share = kQuietShare;  // of the compared steps, by step time
};

struct Comparison {
  std::vector<OpError> ops;                 // every matched (op, rank), in predicted span order
  std::vector<double> measured_step_s;      // per compared step
  double predicted_step_s = 0;
  double measured_step_quiet_s = 0;         // the mean of measured_step_s over the quiet steps
  double step_error_pct = 0;                // predicted against measured_step_quiet_s
  ErrorStats step;                          // step-time errors, one per compared step
  std::map<std::string, ErrorStats> per_kind;
  // Each kind's share of the matched ops' measured time (every rank), percent: what its error
  // weighs in the step (a kind 50% off at 1% of the time moves the step by 0.5%).
  std::map<std::string, double> kind_share_pct;
  ErrorStats all_ops;
  int compared_steps = 0;

  // The n ops with the largest absolute error, largest first.
  std::vector<OpError> worst(size_t n) const;
};

// Throws TraceMismatch (see above), or std::invalid_argument for a measured trace without spans.
Comparison compare(const Trace& predicted, const Trace& measured, const CompareOptions& options);

// A span name as an error category: "moe.gate" -> "gate", "moe.dispatch_a2a" -> "dispatch_a2a",
// "attn" -> "attention", "grad_allreduce" -> "all_reduce"; other names as they are.
std::string op_kind_label(const std::string& name);

// The quiet steps: those whose time is within the fastest `share` (0..1] of the steps (at least
// one; ties with the last kept step kept).
std::set<int> quiet_steps(const std::map<int, double>& step_time_s, double share);

// Each kind's errors over repeated runs of one plan: per (op id, rank), the median of its error
// over the runs (a run is one validation of the plan in a fresh process; an op missing from a run
// counts in the others), then per kind the statistics of those medians; and how far the runs
// spread: per op half the range of its errors (percentage points), per kind the median of that
// (0 with one run). On the development VM one moe-tiny plan's gradient all-reduce measured 25-44
// us over eight fresh processes, its all-to-alls 7.2-8.7 us: one run's op is one draw of that
// spread, and an error within it is not the model's to mend.
struct KindOverRuns {
  ErrorStats errors;
  double spread_pct = 0;
};
std::map<std::string, KindOverRuns> per_kind_over_runs(const std::vector<std::vector<OpError>>& runs);

// Each measured step's time from `first_step` on: its latest span end minus its earliest span
// start over every rank.
std::map<int, double> step_times(const Trace& measured, int first_step = 0);

// Each (op id, rank)'s measured time as validation takes it (see "Durations"), the median over
// `steps`: a span's duration (its spans' sum in a step); a collective's, the shortest span of
// the ranks running that op id in the step, the same for each of them.
std::map<std::pair<std::string, int>, double> median_op_times(const Trace& measured, const std::set<int>& steps);

// Each (op id, rank)'s host-side routing seconds (Span routing_host_s, dispatch_host_s), each the
// median over `steps` (as median_op_times); only the ops that have some.
struct HostRouting {
  double routing_s = 0, dispatch_s = 0;
};
std::map<std::pair<std::string, int>, HostRouting> median_host_routing(const Trace& measured, const std::set<int>& steps);

// The q-quantile (0..1) of `values` with linear interpolation; 0 for no values.
double quantile(std::vector<double> values, double q);
ErrorStats error_stats(const std::vector<double>& errors_pct);

// Kendall's tau-a between two rankings of the same items given as scores (ties count 0):
// (concordant - discordant pairs) / (n (n - 1) / 2); 1 = the same order. 0 for fewer than 2 items.
double kendall_tau(const std::vector<double>& a, const std::vector<double>& b);

}  // namespace moesim::trace
