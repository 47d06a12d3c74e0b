#include "costmodel/calibration.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace moesim::cost {
namespace {

// The time a kernel spent beyond its launch, floored at 1% of the measurement.
double busy_s(const KernelSample& s, double launch_s) { return std::max(s.seconds - launch_s, 0.01 * s.seconds); }

// Weighted least squares for t = x1 a + x2 b: the normal equations' sums, and the solution when
// the two terms can be told apart. Weights 1 / t^2 fit relative errors; weights 1 keep sums.
struct TwoTerms {
  double a11 = 0, a12 = 0, a22 = 0, b1 = 0, b2 = 0;
  void add(double x1, double x2, double t, double w) {
    a11 += w * x1 * x1;
    a12 += w * x1 * x2;
    a22 += w * x2 * x2;
    b1 += w * x1 * t;
    b2 += w * x2 * t;
  }
  bool separable() const { return std::fabs(a11 * a22 - a12 * a12) > 1e-12 * a11 * a22; }
  double a() const { return (b1 * a22 - b2 * a12) / (a11 * a22 - a12 * a12); }
  double b() const { return (a11 * b2 - a12 * b1) / (a11 * a22 - a12 * a12); }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

double fit_peak_flops(const std::vector<KernelSample>& samples, double launch_s) {
  double best = 0;
  for (const KernelSample& s : samples)
    if (s.flops > 0 && s.seconds > 0) best = std::max(best, s.flops / busy_s(s, launch_s));
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

double fit_backward_factor(const DeviceProfile& profile, OpKind kind, const std::vector<KernelSample>& samples) {
  std::vector<double> ratios;
  for (const KernelSample& s : samples) {
    Op op;
    op.name = "backward";
    op.kind = kind;
    op.flops = s.flops;
    op.bytes = s.bytes;  // backward stays false: the roofline time with factor 1
    op.softmax_elements = s.softmax_elements;
    const OpTime t = op_time(profile, op, DType::kFp32);
    const double roofline = t.time_s - t.launch_s;
    if (roofline > 0 && s.seconds > 0) ratios.push_back(busy_s(s, t.launch_s) / roofline);
  }
  return ratios.empty() ? 1.0 : std::clamp(median(ratios), 0.01, 100.0);
}

namespace {

// The fit's figures for a per-step time lambda and an inverse bandwidth beta.
LinkFit link_fit(const std::vector<LinkSample>& samples, double step_overhead_s, double lambda, double beta) {
  LinkFit fit;
  fit.lambda_s = lambda;
  fit.latency_s = std::max(0.0, lambda - step_overhead_s);
  fit.bandwidth_Bps = beta > 0 ? 1 / beta : 1e18;
  std::vector<double> residuals;
  for (const LinkSample& s : samples) {
    const double model = s.steps * (step_overhead_s + fit.latency_s) + s.transfer_c / fit.bandwidth_Bps;
    residuals.push_back(std::fabs(model - s.seconds) / s.seconds * 100);
  }
  fit.median_abs_residual_pct = median(residuals);
  fit.max_abs_residual_pct = *std::max_element(residuals.begin(), residuals.end());
  return fit;
}

}  // namespace

InSituFit fit_in_situ(const std::vector<double>& c, const std::vector<double>& b, const std::vector<double>& t) {
  double scaled = 0, measured = 0, ops = 0;
  TwoTerms f;
  for (size_t j = 0; j < c.size(); ++j)
    if (c[j] > 0 && t[j] > 0) {
      scaled += c[j];
      measured += t[j] - b[j];
      ops += 1;
      f.add(c[j], 1, t[j] - b[j], 1 / (t[j] * t[j]));
    }
  InSituFit fit;
  if (scaled <= 0) return fit;
  if (f.separable() && f.b() > 0) fit.op_overhead_s = std::min(f.b(), std::max(measured, 0.0) / ops);
  fit.factor = std::clamp((measured - ops * fit.op_overhead_s) / scaled, 0.1, 10.0);
  return fit;
}


double fit_softmax_score_s(const std::vector<KernelSample>& samples, double launch_s) {
  TwoTerms f;
  for (const KernelSample& s : samples) {
    if (!(s.seconds > 0) || s.flops <= 0 || s.softmax_elements <= 0)
      throw std::invalid_argument("attention samples need positive FLOPs, score elements and times");
    const double t = busy_s(s, launch_s);
    f.add(s.flops, s.softmax_elements, t, 1 / (t * t));
  }
  if (samples.size() < 2 || !f.separable())
    throw std::invalid_argument("attention samples of one head dim cannot separate the softmax from the matmuls");
  return std::max(0.0, f.b());
}

LinkFit fit_link(const std::vector<LinkSample>& samples, double step_overhead_s, double fallback_Bps) {
  if (samples.size() < 2) throw std::invalid_argument("a link fit needs at least 2 collective samples");
  TwoTerms f;  // t = steps lambda + c beta
  for (const LinkSample& s : samples) {
    if (!(s.seconds > 0)) throw std::invalid_argument("collective samples need positive times");
    f.add(s.steps, s.transfer_c, s.seconds, 1 / (s.seconds * s.seconds));
  }
  if (!f.separable())
    throw std::invalid_argument("collective samples of one shape cannot separate latency from bandwidth");
  double lambda = f.a();
  double beta = f.b();
  if (beta <= 0) {  // no visible bandwidth term: latency alone, over the fallback bandwidth
    beta = fallback_Bps > 0 ? 1 / fallback_Bps : 0;
    lambda = (f.b1 - beta * f.a12) / f.a11;
  }
  if (lambda < 0) {  // no visible latency: bandwidth alone
    lambda = 0;
    beta = f.b2 / f.a22;
  }
  return link_fit(samples, step_overhead_s, lambda, beta);
}

LinkFit fit_link_bandwidth(const std::vector<LinkSample>& samples, double step_overhead_s, double latency_s) {
  const double lambda = step_overhead_s + latency_s;
  double num = 0, den = 0;
  for (const LinkSample& s : samples) {
    if (!(s.seconds > 0) || s.transfer_c <= 0) continue;
    const double w = 1 / (s.seconds * s.seconds);
    num += w * s.transfer_c * (s.seconds - s.steps * lambda);
    den += w * s.transfer_c * s.transfer_c;
  }
  if (den <= 0) throw std::invalid_argument("no collective sample moves bytes: the bandwidth cannot be fitted");
  return link_fit(samples, step_overhead_s, lambda, std::max(num / den, 1e-15));
}


}  // namespace moesim::cost
