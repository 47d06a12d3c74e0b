#include "costmodel/calibration.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <map>
#include <optional>
#include <stdexcept>

namespace moesim::cost {
namespace {

// The time a kernel spent beyond its launch, floored at 1% of the measurement.
double busy_s(const KernelSample& s, double launch_s) { return std::max(s.seconds - launch_s, 0.01 * s.seconds); }

// Weighted least squares for t = sum_k x_k c_k over a few terms: the normal equations, solved by
// Gaussian elimination. Weights 1 / t^2 fit relative errors; weights 1 keep sums. No solution
// when the terms cannot be told apart (a pivot below 1e-10 of its column's scale).
class LeastSquares {
 public:
  explicit LeastSquares(size_t terms) : n_(terms), a_(terms * terms, 0.0), b_(terms, 0.0) {}
  void add(std::initializer_list<double> x, double t, double w) { add(x.begin(), t, w); }
  void add(const std::vector<double>& x, double t, double w) { add(x.data(), t, w); }
  void add(const double* v, double t, double w) {
    for (size_t i = 0; i < n_; ++i) {
      for (size_t j = 0; j < n_; ++j) a_[i * n_ + j] += w * v[i] * v[j];
      b_[i] += w * v[i] * t;
    }
  }
  std::optional<std::vector<double>> solve() const {
    // Scaled to a unit diagonal, so that the pivot test compares like with like.
    std::vector<double> a = a_, b = b_, scale(n_);
    for (size_t i = 0; i < n_; ++i) {
      scale[i] = std::sqrt(std::max(a[i * n_ + i], 0.0));
      if (!(scale[i] > 0)) return std::nullopt;
    }
    for (size_t i = 0; i < n_; ++i) {
      for (size_t j = 0; j < n_; ++j) a[i * n_ + j] /= scale[i] * scale[j];
      b[i] /= scale[i];
    }
    for (size_t c = 0; c < n_; ++c) {
      size_t p = c;
      for (size_t r = c + 1; r < n_; ++r)
        if (std::fabs(a[r * n_ + c]) > std::fabs(a[p * n_ + c])) p = r;
      if (std::fabs(a[p * n_ + c]) < 1e-10) return std::nullopt;
      for (size_t j = 0; j < n_; ++j) std::swap(a[c * n_ + j], a[p * n_ + j]);
      std::swap(b[c], b[p]);
      for (size_t r = c + 1; r < n_; ++r) {
        const double f = a[r * n_ + c] / a[c * n_ + c];
        for (size_t j = c; j < n_; ++j) a[r * n_ + j] -= f * a[c * n_ + j];
        b[r] -= f * b[c];
      }
    }
    std::vector<double> x(n_);
    for (size_t i = n_; i-- > 0;) {
      double s = b[i];
      for (size_t j = i + 1; j < n_; ++j) s -= a[i * n_ + j] * x[j];
      x[i] = s / a[i * n_ + i];
    }
    for (size_t i = 0; i < n_; ++i) x[i] /= scale[i];
    return x;
  }

 private:
  size_t n_;
  std::vector<double> a_, b_;  // the normal equations: row-major matrix, right-hand side
};

// A GEMM sample's BLAS calls: its groups (one for a plain GEMM).
double blas_calls(const KernelSample& s) { return std::max(1.0, s.groups); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

double fit_peak_flops(const std::vector<KernelSample>& samples, double launch_s, double call_s) {
  double best = 0;
  for (const KernelSample& s : samples) {
    const double busy = s.seconds - launch_s - blas_calls(s) * call_s;
    if (s.flops > 0 && busy > 0.01 * s.seconds && busy >= 0.5 * (s.seconds - launch_s))
      best = std::max(best, s.flops / busy);
  }
  return best;
}

std::vector<KernelSample> without_blas_calls(std::vector<KernelSample> samples, double call_s) {
  for (KernelSample& s : samples) s.seconds = std::max(s.seconds - blas_calls(s) * call_s, 0.01 * s.seconds);
  return samples;
}

double fit_blas_call_s(const std::vector<KernelSample>& gemm, const std::vector<KernelSample>& grouped,
                       double launch_s, int steps) {
  std::vector<KernelSample> all = gemm;
  all.insert(all.end(), grouped.begin(), grouped.end());
  // The mean |error| of both kinds through the profile fitted with c; infinite without a peak.
  auto error_at = [&](double c) {
    const double peak = fit_peak_flops(all, launch_s, c);
    if (!(peak > 0)) return std::numeric_limits<double>::infinity();
    const std::vector<KernelSample> g = without_blas_calls(gemm, c), gg = without_blas_calls(grouped, c);
    profile::DeviceProfile spec;
    hw::DeviceType& device = *spec.mutable_device();
    device.set_name("blas-call-fit");
    device.mutable_peak_flops_per_s()->set_fp32(peak);
    device.set_memory_bytes(1);
    device.set_memory_bandwidth_bps(1);
    spec.set_kernel_launch_overhead_s(launch_s);
    spec.set_blas_call_s(c);
    for (auto [kind, samples] : {std::pair{profile::GEMM, &g}, std::pair{profile::GROUPED_GEMM, &gg}})
      if (!samples->empty()) *spec.add_compute() = fit_efficiency_curve(kind, profile::FP32, *samples, peak, launch_s);
    const DeviceProfile p = DeviceProfile::from_spec(spec, "blas call fit");
    double sum = 0;
    for (auto [kind, samples] : {std::pair{OpKind::kGemm, &gemm}, std::pair{OpKind::kGroupedGemm, &grouped}})
      for (const KernelSample& s : *samples) {
        Op op;
        op.kind = kind;
        op.flops = s.flops;
        op.groups = static_cast<int64_t>(blas_calls(s));
        sum += std::fabs(op_time(p, op, DType::kFp32).time_s - s.seconds) / s.seconds;
      }
    return sum / static_cast<double>(all.size());
  };
  double most = 0;
  for (const KernelSample& s : all) most = std::max(most, (s.seconds - launch_s) / blas_calls(s));
  if (!(most > 0)) return 0;
  // The grid over [0, most], then again around its best.
  double best = 0, best_error = std::numeric_limits<double>::infinity(), lo = 0, hi = most;
  for (int pass = 0; pass < 2; ++pass) {
    const double step = (hi - lo) / steps;
    for (int i = 0; i <= steps; ++i) {
      const double c = lo + step * i, error = error_at(c);
      if (error < best_error) {
        best_error = error;
        best = c;
      }
    }
    lo = std::max(0.0, best - step);
    hi = best + step;
  }
  return best;
}

profile::EfficiencyCurve fit_efficiency_curve(profile::OpKind op, profile::DType dtype,
                                              const std::vector<KernelSample>& samples, double peak_flops,
                                              double launch_s, double group_ratio) {
  profile::EfficiencyCurve curve;
  curve.set_op(op);
  curve.set_dtype(dtype);
  std::vector<std::pair<double, double>> pts;  // (flops, efficiency)
  for (const KernelSample& s : samples)
    if (s.flops > 0 && s.seconds > 0 && peak_flops > 0)
      pts.emplace_back(s.flops, std::clamp(s.flops / (peak_flops * busy_s(s, launch_s)), 1e-9, 1.0));
  std::sort(pts.begin(), pts.end());
  double prev_f = 0, prev_e = 0;
  for (size_t i = 0; i < pts.size();) {
    size_t j = i;
    double log_sum = 0;
    std::vector<double> effs;
    for (; j < pts.size() && pts[j].first <= pts[i].first * group_ratio; ++j) {
      log_sum += std::log(pts[j].first);
      effs.push_back(pts[j].second);
    }
    const double f = std::exp(log_sum / static_cast<double>(j - i));
    double e = median(effs);
    if (prev_f > 0) {
      if (f <= prev_f) {  // rounding of the geometric mean: keep the points strictly increasing
        i = j;
        continue;
      }
      e = std::min(e, prev_e * (1 + std::log(f / prev_f)));
    }
    profile::EfficiencyPoint* p = curve.add_point();
    p->set_flops(f);
    p->set_efficiency(e);
    prev_f = f;
    prev_e = e;
    i = j;
  }
  return curve;
}

double fit_memory_bandwidth(const std::vector<KernelSample>& samples, double launch_s) {
  double bytes = 0, seconds = 0;
  for (const KernelSample& s : samples) {
    if (s.bytes <= 0 || s.seconds <= 0) continue;
    bytes += s.bytes;
    seconds += busy_s(s, launch_s);
  }
  return seconds > 0 ? bytes / seconds : 0;
}

std::vector<std::pair<double, double>> memory_time_factors(const std::vector<KernelSample>& samples, double launch_s,
                                                           double Bps) {
  std::map<double, std::vector<double>> by_bytes;
  for (const KernelSample& s : samples)
    if (s.bytes > 0 && s.seconds > 0) by_bytes[s.bytes].push_back(busy_s(s, launch_s));
  std::vector<std::pair<double, double>> out;
  if (!(Bps > 0)) return out;
  for (auto& [bytes, seconds] : by_bytes)
    out.emplace_back(bytes, std::clamp(median(std::move(seconds)) * Bps / bytes, 0.01, 100.0));
  return out;
}

double fit_backward_factor(const DeviceProfile& profile, OpKind kind, const std::vector<KernelSample>& samples) {
  std::vector<double> ratios;
  for (const KernelSample& s : samples) {
    Op op;
    op.name = "backward";
    op.kind = kind;
    op.flops = s.flops;
    op.bytes = s.bytes;  // backward stays false: the roofline time with factor 1
    op.softmax_elements = s.softmax_elements;
    op.groups = std::max<int64_t>(1, static_cast<int64_t>(s.groups));
    const OpTime t = op_time(profile, op, DType::kFp32);
    const double roofline = t.time_s - t.launch_s;
    if (roofline > 0 && s.seconds > 0) ratios.push_back(busy_s(s, t.launch_s) / roofline);
  }
  return ratios.empty() ? 1.0 : std::clamp(median(ratios), 0.01, 100.0);
}

namespace {

// The fit's figures for a per-step time lambda and an inverse bandwidth beta.
LinkFit link_fit(const std::vector<LinkSample>& samples, double step_overhead_s, double lambda, double beta,
                 const LinkRendezvous& rendezvous) {
  LinkFit fit;
  fit.lambda_s = lambda;
  fit.latency_s = std::max(0.0, lambda - step_overhead_s);
  fit.bandwidth_Bps = beta > 0 ? 1 / beta : 1e18;
  fit.rendezvous = rendezvous;
  std::vector<double> residuals;
  for (const LinkSample& s : samples) {
    const double model = s.steps * (step_overhead_s + fit.latency_s) + rendezvous.steps(s) * rendezvous.latency_s +
                         s.transfer_c / fit.bandwidth_Bps;
    residuals.push_back(std::fabs(model - s.seconds) / s.seconds * 100);
  }
  fit.median_abs_residual_pct = median(residuals);
  fit.max_abs_residual_pct = *std::max_element(residuals.begin(), residuals.end());
  return fit;
}

// The eager limit and rendezvous latency that fit `samples` best, or none (see fit_link).
LinkRendezvous fit_rendezvous(const std::vector<LinkSample>& samples) {
  // Squared relative residuals of the least-squares fit over `x(s)`'s terms; infinite when the
  // terms cannot be told apart or (with `solution`) one of them comes out not positive.
  auto residual = [&](auto x, size_t terms, std::vector<double>* solution) {
    LeastSquares f(terms);
    for (const LinkSample& s : samples) f.add(x(s), s.seconds, 1 / (s.seconds * s.seconds));
    const auto v = f.solve();
    if (!v || (solution && std::any_of(v->begin(), v->end(), [](double t) { return t <= 0; })))
      return std::numeric_limits<double>::infinity();
    double sum = 0;
    for (const LinkSample& s : samples) {
      const std::vector<double> xs = x(s);
      double model = 0;
      for (size_t i = 0; i < terms; ++i) model += (*v)[i] * xs[i];
      sum += std::pow((model - s.seconds) / s.seconds, 2);
    }
    if (solution) *solution = *v;
    return sum;
  };
  const double none = residual([](const LinkSample& s) { return std::vector<double>{s.steps, s.transfer_c}; }, 2, nullptr);
  std::vector<double> sizes;
  for (const LinkSample& s : samples) sizes.push_back(s.message_bytes);
  std::sort(sizes.begin(), sizes.end());
  LinkRendezvous best;
  double best_residual = 0.5 * none;
  for (size_t i = 1; i + 2 < sizes.size(); ++i) {  // at least two samples either side
    if (!(sizes[i] > 0) || sizes[i + 1] == sizes[i]) continue;
    const LinkRendezvous step{std::sqrt(sizes[i] * sizes[i + 1]), 1};
    std::vector<double> v;
    const double r = residual(
        [&](const LinkSample& s) { return std::vector<double>{s.steps, step.steps(s), s.transfer_c}; }, 3, &v);
    if (r < best_residual && v[1] >= 0.05 * v[0]) {  // and R a material part of a step
      best_residual = r;
      best = {step.eager_limit_bytes, v[1]};
    }
  }
  return best;
}

}  // namespace

void median_host_rates(const std::vector<InSituFit>& rounds, InSituFit* fit) {
  if (rounds.empty()) return;
  for (double InSituFit::*rate :
       {&InSituFit::routing_choice_s, &InSituFit::dispatch_choice_s, &InSituFit::routing_backward_choice_s}) {
    std::vector<double> v;
    for (const InSituFit& r : rounds) v.push_back(r.*rate);
    fit->*rate = median(std::move(v));
  }
}

std::map<std::pair<std::string, bool>, double> fit_op_kind_factors(const std::vector<std::string>& kinds,
                                                                   const std::vector<bool>& backward,
                                                                   const std::vector<double>& measured,
                                                                   const std::vector<double>& model, double overhead_s) {
  std::map<std::pair<std::string, bool>, std::pair<double, double>> sums;  // (measured, model) beyond h
  for (size_t j = 0; j < kinds.size() && j < backward.size() && j < measured.size() && j < model.size(); ++j) {
    auto& [t, m] = sums[{kinds[j], backward[j]}];
    t += measured[j] - overhead_s;
    m += model[j] - overhead_s;
  }
  std::map<std::pair<std::string, bool>, double> out;
  for (const auto& [key, s] : sums)
    if (s.second > 0) out[key] = std::clamp(s.first / s.second, 0.1, 10.0);
  return out;
}

double sized_kind_factor(double at_step, double at_half) {
  return std::clamp(1.0, std::min(at_step, at_half), std::max(at_step, at_half));
}

double op_overhead_intercept(const std::vector<std::pair<double, double>>& times, double tokens_small,
                             double tokens_big) {
  if (times.empty() || !(tokens_small >= 0 && tokens_small < tokens_big)) return std::numeric_limits<double>::infinity();
  std::vector<double> at_zero;
  for (auto [small, big] : times) at_zero.push_back((tokens_big * small - tokens_small * big) / (tokens_big - tokens_small));
  return std::max(median(std::move(at_zero)), 0.0);
}

InSituFit fit_in_situ(const std::vector<double>& c, const std::vector<double>& b, const std::vector<double>& t,
                      const InSituTerms& terms, const InSituHost& host, double max_op_overhead_s) {
  // An op with nothing the factor scales (c = 0: a permutation is its gather and its dispatch's
  // decision) still tells the overhead. One holding a lookup's backward sits out (its own factor).
  auto valid = [&](size_t j) { return c[j] >= 0 && t[j] > 0; };
  auto scatters = [&](size_t j) { return valid(j) && at_or_zero(terms.scatter_add, j) > 0; };
  auto used = [&](size_t j) { return valid(j) && !scatters(j); };
  InSituFit fit;
  // Each host term's time per choice: its ops' measured seconds over their choices.
  auto rate = [&](const std::vector<double>& counts, const std::vector<double>& seconds) {
    double n = 0, s = 0;
    for (size_t j = 0; j < c.size(); ++j)
      if (used(j) && at_or_zero(counts, j) > 0) {
        n += at_or_zero(counts, j);
        s += at_or_zero(seconds, j);
      }
    return n > 0 ? s / n : 0.0;
  };
  fit.routing_choice_s = rate(terms.gate, host.routing_s);
  fit.routing_backward_choice_s = rate(terms.gate_backward, host.routing_s);
  fit.dispatch_choice_s = rate(terms.dispatch, host.dispatch_s);
  // The rest, t - (b - d - e) - the measured host seconds = f c + f_g d + f_gb e + h, by least
  // squares on relative errors for h, f_g and f_gb (each gather column only where some op holds
  // such gathers); then f from the measured sum.
  bool forward = false, backward = false;
  for (size_t j = 0; j < c.size(); ++j) {
    forward = forward || (used(j) && at_or_zero(terms.gather, j) > 0);
    backward = backward || (used(j) && at_or_zero(terms.gather_backward, j) > 0);
  }
  const size_t gather_columns = (forward ? 1 : 0) + (backward ? 1 : 0);
  // Without the overhead's column when it comes out negative (or above its cap): h is held at 0
  // (or the cap), and the gathers' factors must come from a fit that holds it there (with a
  // negative h they took up what h took off every op: the calibration step's gathers came out
  // 30-40% over).
  const double cap = std::max(max_op_overhead_s, 0.0);
  LeastSquares with_h(2 + gather_columns), without_h(1 + gather_columns), at_cap(1 + gather_columns);
  double scaled = 0, rest = 0, ops = 0;
  std::vector<double> row;
  for (size_t j = 0; j < c.size(); ++j)
    if (used(j)) {
      const double d = at_or_zero(terms.gather, j), e = at_or_zero(terms.gather_backward, j);
      const double r = t[j] - (b[j] - d - e) - at_or_zero(host.routing_s, j) - at_or_zero(host.dispatch_s, j);
      scaled += c[j];
      rest += r;
      ops += 1;
      row = {c[j]};
      if (forward) row.push_back(d);
      if (backward) row.push_back(e);
      without_h.add(row, r, 1 / (t[j] * t[j]));
      if (std::isfinite(cap)) at_cap.add(row, r - cap, 1 / (t[j] * t[j]));
      row.push_back(1);
      with_h.add(row, r, 1 / (t[j] * t[j]));
    }
  if (scaled <= 0) return fit;
  std::optional<std::vector<double>> x = with_h.solve();
  if (x && x->back() > cap) {
    fit.op_overhead_s = cap;
    x = at_cap.solve();
  } else if (x && x->back() > 0) {
    fit.op_overhead_s = x->back();
  } else {
    x = without_h.solve();
  }
  if (x) {
    if (forward) fit.gather_factor = std::clamp((*x)[1], 0.1, 10.0);
    if (backward) fit.gather_backward_factor = std::clamp((*x)[forward ? 2 : 1], 0.1, 10.0);
  }
  double gathered = 0;  // the gathers' seconds through their factors
  for (size_t j = 0; j < c.size(); ++j)
    if (used(j))
      gathered += fit.gather_factor * at_or_zero(terms.gather, j) +
                  fit.gather_backward_factor * at_or_zero(terms.gather_backward, j);
  fit.op_overhead_s = std::min(fit.op_overhead_s, std::max(rest - gathered, 0.0) / ops);
  fit.factor = std::clamp((rest - gathered - ops * fit.op_overhead_s) / scaled, 0.1, 10.0);
  // The lookups' backwards: what the ops holding them leave past the rest of the fit (time_s with
  // f_s still 1).
  double left = 0, scattered = 0;
  for (size_t j = 0; j < c.size(); ++j)
    if (scatters(j)) {
      scattered += at_or_zero(terms.scatter_add, j);
      left += t[j] - fit.time_s(c[j], b[j], terms, j);
    }
  if (scattered > 0) fit.scatter_add_factor = std::clamp(1 + left / scattered, 0.1, 10.0);
  return fit;
}

double InSituFit::time_s(double scaled, double fixed, const InSituTerms& terms, size_t j) const {
  const double s = at_or_zero(terms.scatter_add, j);
  return fixed + (gather_factor - 1) * at_or_zero(terms.gather, j) +
         (gather_backward_factor - 1) * (at_or_zero(terms.gather_backward, j) - s) + (scatter_add_factor - 1) * s +
         factor * scaled + op_overhead_s +
         routing_choice_s * at_or_zero(terms.gate, j) + dispatch_choice_s * at_or_zero(terms.dispatch, j) +
         routing_backward_choice_s * at_or_zero(terms.gate_backward, j);
}

AttentionCoreFit fit_attention_core(const std::vector<KernelSample>& samples, double launch_s) {
  LeastSquares f(3);  // t = flops u + scores v + groups w
  for (const KernelSample& s : samples) {
    if (!(s.seconds > 0) || s.flops <= 0 || s.softmax_elements <= 0 || s.groups <= 0)
      throw std::invalid_argument("attention samples need positive FLOPs, score elements, groups and times");
    const double t = busy_s(s, launch_s);
    f.add({s.flops, s.softmax_elements, s.groups}, t, 1 / (t * t));
  }
  const auto x = f.solve();
  if (!x)
    throw std::invalid_argument("attention samples must differ in head dim and in sequence length to separate the "
                                "softmax and the per-group calls from the matmuls");
  return {std::max(0.0, (*x)[1]), std::max(0.0, (*x)[2])};
}

double fit_priority_sort(const std::vector<SortSample>& samples) {
  if (samples.empty()) throw std::invalid_argument("a sort fit needs at least one sample");
  double num = 0, den = 0;  // min sum ((x s - y) / y)^2 over the samples whose sort took time
  for (const SortSample& s : samples) {
    if (!(s.tokens >= 2) || !(s.vanilla_s > 0) || !(s.batch_priority_s > 0))
      throw std::invalid_argument("sort samples need at least 2 tokens and positive times");
    const double x = priority_sort_work(s.tokens), y = s.batch_priority_s - s.vanilla_s;
    if (y <= 0) continue;
    num += x / y;
    den += x * x / (y * y);
  }
  return den > 0 ? num / den : 0;
}

LinkFit fit_link(const std::vector<LinkSample>& samples, double step_overhead_s, double fallback_Bps) {
  if (samples.size() < 2) throw std::invalid_argument("a link fit needs at least 2 collective samples");
  for (const LinkSample& s : samples)
    if (!(s.seconds > 0)) throw std::invalid_argument("collective samples need positive times");
  const LinkRendezvous rendezvous = fit_rendezvous(samples);
  // What is left of each time for t = steps lambda + c beta.
  auto rest = [&](const LinkSample& s) { return s.seconds - rendezvous.steps(s) * rendezvous.latency_s; };
  LeastSquares f(2);
  for (const LinkSample& s : samples) f.add({s.steps, s.transfer_c}, rest(s), 1 / (s.seconds * s.seconds));
  const auto x = f.solve();
  if (!x) throw std::invalid_argument("collective samples of one shape cannot separate latency from bandwidth");
  double lambda = (*x)[0];
  double beta = (*x)[1];
  auto one_term = [&](bool latency, double known) {  // the other term fixed at `known`
    double num = 0, den = 0;
    for (const LinkSample& s : samples) {
      const double w = 1 / (s.seconds * s.seconds), v = latency ? s.steps : s.transfer_c;
      num += w * v * (rest(s) - known * (latency ? s.transfer_c : s.steps));
      den += w * v * v;
    }
    return den > 0 ? num / den : 0;
  };
  if (beta <= 0) {  // no visible bandwidth term: latency alone, over the fallback bandwidth
    beta = fallback_Bps > 0 ? 1 / fallback_Bps : 0;
    lambda = one_term(true, beta);
  }
  if (lambda < 0) {  // no visible latency: bandwidth alone
    lambda = 0;
    beta = one_term(false, 0);
  }
  return link_fit(samples, step_overhead_s, lambda, beta, rendezvous);
}

LinkFit fit_link_bandwidth(const std::vector<LinkSample>& samples, double step_overhead_s, double latency_s,
                           const LinkRendezvous& rendezvous, Pooling pooling) {
  const double lambda = step_overhead_s + latency_s;
  double num = 0, den = 0;
  std::vector<double> betas;  // each sample's own seconds per transfer byte
  for (const LinkSample& s : samples) {
    if (!(s.seconds > 0) || s.transfer_c <= 0) continue;
    const double rest = s.seconds - s.steps * lambda - rendezvous.steps(s) * rendezvous.latency_s;
    const double w = 1 / (s.seconds * s.seconds);
    num += w * s.transfer_c * rest;
    den += w * s.transfer_c * s.transfer_c;
    betas.push_back(rest / s.transfer_c);
  }
  if (betas.empty()) throw std::invalid_argument("no collective sample moves bytes: the bandwidth cannot be fitted");
  const double beta = pooling == Pooling::kMedian ? median(betas) : num / den;
  return link_fit(samples, step_overhead_s, lambda, std::max(beta, 1e-15), rendezvous);
}

}  // namespace moesim::cost
