// Calibration fits: measured kernel and collective times -> a device profile's efficiency curves
// and a cluster's link parameters, in the cost model's own terms, so that the cost model (and the
// simulator through it) reproduces the measurements. `moesim calibrate` measures; this fits.
//
// ## Kernels (costmodel/compute.h)
// A compute-bound kernel takes launch_s + flops / (peak x eff(flops)). Given the launch overhead
// and the peak, each sample gives eff_i = flops_i / (peak x (t_i - launch_s)) (t_i - launch_s
// floored at 1% of t_i). The curve's points are the samples grouped by size: samples whose FLOPs
// lie within a factor `group_ratio` of a group's first sample form one point at their geometric
// mean FLOPs with their median efficiency. Efficiencies are clamped to (0, 1], and each point to
// e[i+1] <= e[i] (1 + ln(f[i+1] / f[i])) (compute.h's rule: a bigger kernel never runs faster).
// The peak is the fastest sample's achieved FLOP/s (t - launch), so the best kernel has
// efficiency 1.
// On a GPU each BLAS call also costs the host a fixed time c (the profile's blas_call_s): t =
// launch_s + calls x c + flops / (peak x eff(flops)), whose flat part a curve under that rule
// cannot follow. fit_blas_call_s searches c for the smallest mean |error| of GEMMs and grouped
// GEMMs through curves fitted to t - calls x c.
// Memory-bound kernels take launch_s + bytes / bandwidth: the bandwidth is sum(bytes) /
// sum(t - launch), the time-weighted fit over the samples.
//
// ## Links (costmodel/collectives.h)
// A collective's modelled time is steps x (o + L) + transfer, with transfer inversely proportional
// to the link bandwidth B. With lambda = o + L and beta = 1/B, every sample is linear:
//   t_i = steps_i lambda + c_i beta,   c_i = transfer_i(B_ref) x B_ref,
// fitted by least squares on relative errors (weights 1 / t_i^2), then L = max(0, lambda - o).
// The samples' steps_i and c_i come from the cost model on the cluster being calibrated. Steps
// whose messages are over the library's eager limit E add R each (a third term: fit_link).
#pragma once

#include "costmodel/compute.h"
#include "costmodel/device_profile.pb.h"

#include <limits>
#include <map>
#include <vector>

namespace moesim::cost {

struct KernelSample {
  double flops = 0;
  double bytes = 0;
  double seconds = 0;  // measured, launch included
  double softmax_elements = 0;  // attention cores: score elements (cost::Op::softmax_elements)
  double groups = 0;            // attention cores: sequences x heads (cost::Op::groups);
                                // grouped GEMMs: their groups, each a BLAS call
};

// The achieved FLOP/s of the fastest sample (flops / (t - launch - calls x call_s)) among those
// whose arithmetic is at least half of their time beyond the launch (the rest of a GPU's small
// GEMMs is its BLAS calls' fixed time, by which their FLOPs would give a rate above the
// device's); 0 without samples.
double fit_peak_flops(const std::vector<KernelSample>& samples, double launch_s, double call_s = 0);

// The efficiency curve of `op` / `dtype` through the samples (see above). Samples with no FLOPs
// are ignored; an empty curve when none is left.
profile::EfficiencyCurve fit_efficiency_curve(profile::OpKind op, profile::DType dtype,
                                              const std::vector<KernelSample>& samples, double peak_flops,
                                              double launch_s, double group_ratio = 2.0);

// c above (seconds per BLAS call) from the GEMMs' and the grouped GEMMs' samples: the value whose
// fitted profile (peak and both curves through without_blas_calls) has the smallest mean |error|
// over both, searched on a grid of `steps` + 1 values from 0 to the largest (t - launch)
// / calls, then on one as fine around its best (the smallest of equals). The samples that tell c
// apart are grouped GEMMs of the same FLOPs in different groups. 0 without samples.
double fit_blas_call_s(const std::vector<KernelSample>& gemm, const std::vector<KernelSample>& grouped,
                       double launch_s, int steps = 400);

// The samples with their BLAS calls' time (calls x call_s; calls = max(1, groups)) taken off,
// floored at 1% of their time.
std::vector<KernelSample> without_blas_calls(std::vector<KernelSample> samples, double call_s);

// Bandwidth of memory-bound kernels: sum(bytes) / sum(t - launch).
double fit_memory_bandwidth(const std::vector<KernelSample>& samples, double launch_s);

// A memory-bound kind's time factors by bytes (device_profile.proto MemoryEfficiency by_bytes) for
// the bandwidth `Bps` its efficiency gives: per size of the samples (equal bytes: their median
// time), (t - launch) / (bytes / Bps), clamped to [0.01, 100]. By increasing bytes; none without
// samples that move bytes.
std::vector<std::pair<double, double>> memory_time_factors(const std::vector<KernelSample>& samples, double launch_s,
                                                           double Bps);

// The backward factor of `kind` (device_profile.proto `backward`): the median over the samples
// (backward kernels' FLOPs, bytes and times) of (t - launch) / (the profile's roofline time for
// them with factor 1, launch aside). 1 without samples.
double fit_backward_factor(const DeviceProfile& profile, OpKind kind, const std::vector<KernelSample>& samples);

// The in-situ factor f (device_profile.proto `in_situ`), the time h every scheduled op takes
// around its kernels (`op_overhead_s`) and the host times of an MoE layer's routing per
// token-choice: a gate's forward g (`routing_choice_s`), a dispatch's capacity decision g_d
// (`dispatch_choice_s`) and a gate's backward g_b (`routing_backward_choice_s`), from a
// calibration step: op j's measured time t_j against the model's time for it, split into a part
// the factor scales (its kernels' roofline time c_j, launches aside), a fixed part b_j (launches),
// its token-choices per host term (r_j, q_j, s_j; 0 for other ops) and the host-side routing
// seconds measured inside it (u_j of a gate forward or backward, v_j of a dispatch decision).
// Each host term's time per choice is its ops' measured seconds over their choices (g = sum u_j /
// sum r_j over the gates forward, g_b over the gates backward, g_d = sum v_j / sum q_j): measured
// where the routing runs, not fitted, since a gate's kernels (its skinny router GEMM, its
// LayerNorm) run slower in a step than modelled and a fitted g took their excess (100 ns per
// choice on the development VM against 25 measured). Then h from t_j - b_j - u_j - v_j = f c_j + h
// by least squares on relative errors (weights 1 / t_j^2: the small ops, whose time is mostly h,
// set it; the ops' sizes spread over decades, which tells h from f), floored at 0 and capped by
// what the measured sum leaves; and f = (sum_j (t_j - b_j - u_j - v_j) - n h) / sum_j c_j, so that
// the predicted sum of the ops is the measured one (a step is a sum of ops). f is clamped to
// [0.1, 10]; f = 1 and the rest 0 without ops.
// Gathers (EMBEDDING kernels: lookups, the dispatch's and the combine's row gathers) have their
// own factors, f_g forward and f_gb backward (a backward gather adds rows into its source's
// gradient): their times d_j and e_j (parts of b_j, at the profile's out-of-cache rate) depend on
// what a step leaves in cache, which the other kernels' do not; h, f_g and f_gb then come from
// t_j - (b_j - d_j - e_j) - u_j - v_j = f c_j + f_g d_j + f_gb e_j + h (the same least squares;
// where h comes out negative, again without h, so that the gathers' factors are the best with h
// at its floor), each clamped to [0.1, 10] (1 without such gathers), and f keeps the measured sum
// with the gathers' terms in it. An op holding a lookup's backward (a scatter-add into its table,
// s_j of its e_j) sits out of those: a table's gradient is cache resident or not by the step's
// working set, where the combine's backward is not (device_profile.proto scatter_add_footprint),
// and one f_gb for both priced the one 10% over where the other was 10% under. Its factor f_s is
// then what those ops leave: sum_j (t_j - (b_j - d_j - e_j) - u_j - v_j - f c_j - f_g d_j
// - f_gb (e_j - s_j) - h) / sum_j s_j over them, clamped to [0.1, 10] (1 without such ops).
// Op j's entry of a per-op vector of InSituTerms or InSituHost: 0 past a shorter vector's end.
inline double at_or_zero(const std::vector<double>& v, size_t j) { return j < v.size() ? v[j] : 0.0; }
struct InSituTerms {
  // Per op; shorter vectors: 0 past their end. Token-choices per host term, and the seconds of the
  // op's forward gathers (`gather`, d_j), backward gathers (`gather_backward`, e_j) and of its
  // lookups' backwards among those (`scatter_add`, s_j) at the profile's rate (parts of its fixed
  // time b_j).
  std::vector<double> gate = {}, dispatch = {}, gate_backward = {}, gather = {}, gather_backward = {},
                      scatter_add = {};
};
struct InSituHost {
  // Per op, seconds (trace Span routing_host_s, dispatch_host_s); shorter vectors: 0 past their end.
  std::vector<double> routing_s = {}, dispatch_s = {};
};
struct InSituFit {
  double factor = 1;
  double op_overhead_s = 0;
  double routing_choice_s = 0;
  double dispatch_choice_s = 0;
  double routing_backward_choice_s = 0;
  double gather_factor = 1;           // f_g
  double gather_backward_factor = 1;  // f_gb
  double scatter_add_factor = 1;      // f_s
  // Op j's time through the fit: b_j + (f_g - 1) d_j + (f_gb - 1) (e_j - s_j) + (f_s - 1) s_j
  // + f c_j + h + its host terms' counts x their times.
  double time_s(double scaled, double fixed, const InSituTerms& terms, size_t j) const;
};
// The routing's host rates of `fit` (routing_choice_s, dispatch_choice_s,
// routing_backward_choice_s), each the median of its value over `rounds` (fits of the same step
// run again): they are measured, apart from the rest of the fit (which subtracts the measured host
// seconds), and one round's can be slowed alone: one calibration in about ten on the development
// VM took the dispatch's from its median round at 14.8 ns a choice, against 7-9 in the others,
// and put the suite's permutations 90% over. Unchanged without rounds.
void median_host_rates(const std::vector<InSituFit>& rounds, InSituFit* fit);
// `max_op_overhead_s`: h held at most there (where the fit would put it higher, again with h at
// that value), from the same ops measured at fewer tokens (op_overhead_intercept).
InSituFit fit_in_situ(const std::vector<double>& scaled, const std::vector<double>& fixed,
                      const std::vector<double>& measured, const InSituTerms& terms = {}, const InSituHost& host = {},
                      double max_op_overhead_s = std::numeric_limits<double>::infinity());

// Per kind of scheduled op (`kinds[j]`, validation's label) and direction: the sum over its ops of
// (t_j - h) over the sum of (m_j - h), m_j the op's time through the in-situ fit and h its per-op
// overhead (device_profile.proto op_kind), clamped to [0.1, 10]; a kind whose ops' times through
// the fit do not exceed h is left out. Keyed by (kind, backward).
std::map<std::pair<std::string, bool>, double> fit_op_kind_factors(const std::vector<std::string>& kinds,
                                                                   const std::vector<bool>& backward,
                                                                   const std::vector<double>& measured,
                                                                   const std::vector<double>& model, double overhead_s);

// A kind of op's factor where it was measured at two sizes that disagree (its pace follows its
// size; device_profile.proto op_kind): the one nearer 1 where both lie on one side of 1, else 1
// (1 clamped into the interval they span). Neither measurement is read beyond what both say: on
// the third host the lookup's forward came out 1.27 in the calibration step and 1.36 at half its
// tokens (moe-tiny's: 1.33), the optimizer's 1.25 and 1.05 (moe-tiny's 0.96).
double sized_kind_factor(double at_step, double at_half);

// The per-op overhead as the time an op takes at no tokens: the same ops measured in a step of
// `tokens_small` and one of `tokens_big` tokens per rank (seconds (t_small, t_big) per op), each
// op's line through its two times read at 0 tokens, (n_big t_small - n_small t_big) / (n_big -
// n_small); the median over the ops, floored at 0. For ops whose kernels are memory-bound (row
// gathers, elementwise), whose time is linear in the tokens. In a step, ops of similar sizes cannot
// tell h from the gathers' factor: on the third host (Intel, 480 MiB L3) the calibration step's
// fit put h at 9-11 us with every gather factor at its floor, where moe-tiny's quickest ops took
// 5 us and every small op extrapolated to about 1 us (1.3-1.6 through this). Infinity without
// ops or with tokens_small >= tokens_big: no bound.
double op_overhead_intercept(const std::vector<std::pair<double, double>>& times, double tokens_small,
                             double tokens_big);

// An attention core's time beyond its FLOPs (device_profile.proto softmax_score_s and
// attention_group_s) from attention cores' forward samples: t_i - launch_s = flops_i u + scores_i v
// + groups_i w by least squares on relative errors (weights 1 / t_i^2); v and w floored at 0.
// The samples must differ in FLOPs per score (head dims) and in scores per group (sequence
// lengths), else the terms cannot be told apart: std::invalid_argument.
struct AttentionCoreFit {
  double softmax_score_s = 0;
  double group_s = 0;
};
AttentionCoreFit fit_attention_core(const std::vector<KernelSample>& samples, double launch_s);

// A batch-priority dispatch's sort (device_profile.proto priority_sort_s) from timings of the
// capacity decision over `tokens` tokens under both policies: the batch-priority decision's extra
// time over the vanilla one's per tokens x log2(tokens) (cost::priority_sort_work), by least squares
// on relative errors through the origin; 0 when the sort costs nothing measurable. Throws
// std::invalid_argument without samples or with one of fewer than 2 tokens or a time not > 0.
struct SortSample {
  double tokens = 0;
  double vanilla_s = 0;         // measured
  double batch_priority_s = 0;  // measured
};
double fit_priority_sort(const std::vector<SortSample>& samples);

// A collective sample in the model's linear form (see above).
struct LinkSample {
  double steps = 0;          // alphas the model charges
  double transfer_c = 0;     // transfer time x bandwidth (bytes through the bottleneck)
  double seconds = 0;        // measured
  double message_bytes = 0;  // the size of each step's messages (against an eager limit)
};

// The collective library's rendezvous (hardware.proto Rendezvous): each step whose messages are
// over `eager_limit_bytes` costs `latency_s` more. No step: eager_limit_bytes 0.
struct LinkRendezvous {
  double eager_limit_bytes = 0;
  double latency_s = 0;
  // The alphas of `s` that take the rendezvous.
  double steps(const LinkSample& s) const {
    return eager_limit_bytes > 0 && s.message_bytes > eager_limit_bytes ? s.steps : 0;
  }
};

struct LinkFit {
  double latency_s = 0;    // L (per step, route latency) = lambda - overhead, floored at 0
  double lambda_s = 0;     // the fitted per-step time o + L
  double bandwidth_Bps = 0;
  LinkRendezvous rendezvous;
  double median_abs_residual_pct = 0;  // |model - measured| / measured over the samples
  double max_abs_residual_pct = 0;
};

// t_i = steps_i lambda + rendezvous steps_i R + c_i / B by least squares on relative errors. The
// eager limit is searched between consecutive message sizes (placed at the geometric mean of the
// two, with at least two samples on either side); a step is kept when it adds a material time (R
// at least 5% of the per-step lambda) and explains the samples clearly better than none (the
// squared relative residuals at most half). Open MPI's shared-memory sends on the development VM
// take 0.4 us at 3.4 KB and 2.2 us at 4 KB (0.35 and 0.56 us copied through its segment, as the
// executor sets it). R is a difference between the two sides' per-step times, so it holds when L
// is floored at 0 (an eager step faster than the overhead o, as on CPU ranks).
// Throws std::invalid_argument with fewer than 2 samples or when the samples cannot separate
// latency from bandwidth (all of one size). When the fit finds no bandwidth term (bigger
// transfers no slower: latency-bound samples), the bandwidth is `fallback_Bps` (when > 0) and
// the latency is fitted alone.
LinkFit fit_link(const std::vector<LinkSample>& samples, double step_overhead_s, double fallback_Bps = 0);

// How fit_link_bandwidth pools its samples.
enum class Pooling {
  // Least squares on relative errors of t_i = steps_i (o + L) + rendezvous steps_i R + c_i / B:
  // samples of many sizes (microbenchmarks), where the large transfers set B and the small ones,
  // mostly latency (and under o + L when L is floored at 0), weigh little.
  kLeastSquares,
  // 1/B the median over the samples of each one's own (t_i - steps_i (o + L) - rendezvous steps_i
  // R) / c_i: samples of one or two sizes drawn over a calibration, such as a training step's
  // exchanges, which on a shared VM run at two or three paces 1.5x apart; the median takes the
  // usual one, as validation's per-op medians do (a mean would sit between them).
  kMedian,
};

// The bandwidth alone, with the per-step latency L and the rendezvous given (for samples of too
// few sizes to separate the terms, or with the latency fitted elsewhere). Throws
// std::invalid_argument without samples that move bytes.
LinkFit fit_link_bandwidth(const std::vector<LinkSample>& samples, double step_overhead_s, double latency_s,
                           const LinkRendezvous& rendezvous = {}, Pooling pooling = Pooling::kLeastSquares);

}  // namespace moesim::cost
