#include "costmodel/routing_model.h"

#include "common/precision.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <numbers>
#include <numeric>
#include <random>
#include <set>

namespace moesim::cost {
namespace {

namespace pb = google::protobuf;
using workload::RoutingDistribution;

// ---------------------------------------------------------------------------------------------
// Random numbers: raw mt19937_64 bits through our own transforms (no std::*_distribution).

double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }       // [0, 1)
double uniform_open0(std::mt19937_64& rng) { return static_cast<double>((rng() >> 11) + 1) * 0x1.0p-53; }  // (0, 1]

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
// Independent streams from one user seed.
uint64_t stream_seed(uint64_t seed, uint64_t stream) { return splitmix64(seed ^ splitmix64(stream)); }
constexpr uint64_t kMultinomialStream = 1;
constexpr uint64_t kSubsampleStream = 2;

// Exp(1) by the ziggurat method (Marsaglia & Tsang 2000: 256 layers of area v, the base strip
// reaching r), drawing 32 bits at a time, two per mt19937_64 output (low half first): the layer
// from the low 8 bits, the abscissa from the top 24, taken at the middle of its 2^-24 cell so
// that it is never 0. About half a generator call and one multiply per sample: per-token routing
// draws E of them per token, and the generator is the bottleneck.
class ExponentialZiggurat {
 public:
  ExponentialZiggurat() {
    constexpr double kScale = 0x1.0p24;
    std::array<double, kLayers> x{};
    x[kLayers - 1] = kR;
    for (int i = kLayers - 2; i >= 1; --i) x[i] = -std::log(kV / x[i + 1] + std::exp(-x[i + 1]));
    x[0] = 0;
    const double base_width = kV / std::exp(-kR);
    accept_[0] = static_cast<uint32_t>(kR / base_width * kScale);
    width_[0] = base_width / kScale;
    height_[0] = 1;
    for (int i = 1; i < kLayers; ++i) {
      accept_[i] = static_cast<uint32_t>(x[i - 1] / x[i] * kScale);
      width_[i] = x[i] / kScale;
      height_[i] = std::exp(-x[i]);
    }
  }

  class Stream {
   public:
    explicit Stream(uint64_t seed) : rng_(seed) {}
    uint32_t bits32() {
      if (spare_) {
        spare_ = false;
        return static_cast<uint32_t>(held_ >> 32);
      }
      held_ = rng_();
      spare_ = true;
      return static_cast<uint32_t>(held_);
    }
    double uniform_open0() { return (static_cast<double>(bits32()) + 1) * 0x1.0p-32; }  // (0, 1]

   private:
    std::mt19937_64 rng_;
    uint64_t held_ = 0;
    bool spare_ = false;
  };

  double operator()(Stream& bits) const {
    for (;;) {
      const uint32_t u = bits.bits32();
      const int layer = static_cast<int>(u & (kLayers - 1));
      const uint32_t j = u >> 8;
      const double x = (static_cast<double>(j) + 0.5) * width_[layer];
      if (j < accept_[layer]) return x;
      if (layer == 0) return kR - std::log(bits.uniform_open0());  // the tail beyond r: memoryless
      if (height_[layer] + bits.uniform_open0() * (height_[layer - 1] - height_[layer]) < std::exp(-x)) return x;
    }
  }

 private:
  static constexpr int kLayers = 256;
  static constexpr double kR = 7.69711747013104972;
  static constexpr double kV = 3.949659822581572e-3;
  std::array<uint32_t, kLayers> accept_{};
  std::array<double, kLayers> width_{};
  std::array<double, kLayers> height_{};
};

const ExponentialZiggurat& exponential() {
  static const ExponentialZiggurat z;
  return z;
}

double standard_normal(std::mt19937_64& rng) {  // Box-Muller
  const double r = std::sqrt(-2 * std::log(uniform_open0(rng)));
  return r * std::cos(2 * std::numbers::pi * uniform01(rng));
}

// log(x!) - [(x + 1/2) log x - x + log(2 pi)/2]: Stirling's error (Loader 2000).
double stirling_error(double x) {
  if (x < 16) return std::lgamma(x + 1) - (x + 0.5) * std::log(x) + x - 0.5 * std::log(2 * std::numbers::pi);
  const double x2 = x * x;
  return (1.0 / 12 - (1.0 / 360 - 1.0 / (1260 * x2)) / x2) / x;
}

// log P(Binomial(n, p) = m), accurate for any n (saddle-point form, Loader 2000).
double binomial_log_pmf(int64_t n, int64_t m, double p) {
  const double dn = static_cast<double>(n), dm = static_cast<double>(m);
  if (m == 0) return dn * std::log1p(-p);
  if (m == n) return dn * std::log(p);
  const double np = dn * p, nq = dn * (1 - p), a = dm - np;
  const double deviance = dm * std::log1p(a / np) + (dn - dm) * std::log1p(-a / nq);
  return stirling_error(dn) - stirling_error(dm) - stirling_error(dn - dm) -
         0.5 * std::log(2 * std::numbers::pi * dm * (dn - dm) / dn) - deviance;
}

// Binomial(n, p): exact inversion, searching outwards from the mode (O(sd) steps); beyond
// sd = 1000 a rounded normal (its skewness, 1/sd, no longer matters for loads).
int64_t sample_binomial(std::mt19937_64& rng, int64_t n, double p) {
  if (n <= 0 || p <= 0) return 0;
  if (p >= 1) return n;
  const double dn = static_cast<double>(n);
  const double sd = std::sqrt(dn * p * (1 - p));
  if (sd > 1000) {
    const double x = std::round(dn * p + sd * standard_normal(rng));
    return static_cast<int64_t>(std::clamp(x, 0.0, dn));
  }
  const int64_t mode = std::min(n, static_cast<int64_t>(std::floor((dn + 1) * p)));
  const double ratio = p / (1 - p);
  double u = uniform01(rng);
  const double f_mode = std::exp(binomial_log_pmf(n, mode, p));
  u -= f_mode;
  if (u < 0) return mode;
  int64_t hi = mode, lo = mode;
  double f_hi = f_mode, f_lo = f_mode;
  bool up = hi < n, down = lo > 0;  // a side stops at its bound or once its terms underflow
  while (up || down) {
    if (up) {
      f_hi *= static_cast<double>(n - hi) / static_cast<double>(hi + 1) * ratio;
      ++hi;
      u -= f_hi;
      if (u < 0) return hi;
      up = hi < n && f_hi > 0;
    }
    if (down) {
      f_lo *= static_cast<double>(lo) / static_cast<double>(n - lo + 1) / ratio;
      --lo;
      u -= f_lo;
      if (u < 0) return lo;
      down = lo > 0 && f_lo > 0;
    }
  }
  return mode;  // only rounding was left in u
}

// One multinomial draw of n over `weights` (non-negative, positive sum) by conditional binomials.
std::vector<int64_t> sample_multinomial(std::mt19937_64& rng, int64_t n, const std::vector<double>& weights) {
  std::vector<double> rest(weights.size() + 1, 0.0);  // rest[e] = sum of weights[e..]
  for (size_t e = weights.size(); e-- > 0;) rest[e] = rest[e + 1] + weights[e];
  std::vector<int64_t> out(weights.size(), 0);
  int64_t left = n;
  for (size_t e = 0; e < weights.size() && left > 0; ++e) {
    if (weights[e] <= 0) continue;
    const bool last = rest[e + 1] <= 0;
    out[e] = last ? left : sample_binomial(rng, left, std::min(1.0, weights[e] / rest[e]));
    left -= out[e];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Plackett-Luce group inclusion by quadrature (see inclusion_probabilities in the header):
//   P(A hit) = integral_0^inf p_A e^{-p_A t} P(N_{not A}(t) <= k-1) dt
// over groups A = [begin[g], begin[g+1]) of the weights, in x = log t with step h.
std::vector<double> group_inclusion(const std::vector<double>& weights, const std::vector<size_t>& begin, int k) {
  const size_t groups = begin.size() - 1;
  const size_t n = weights.size();
  const double total = std::accumulate(weights.begin(), weights.end(), 0.0);
  MOESIM_ASSERT(total > 0 && std::isfinite(total), "routing weights must have a positive finite sum, got {}", total);
  std::vector<double> p(n);
  size_t positive = 0;
  for (size_t v = 0; v < n; ++v) {
    p[v] = weights[v] / total;
    positive += p[v] > 0;
  }
  std::vector<double> group_p(groups, 0.0), out(groups, 0.0);
  for (size_t g = 0; g < groups; ++g)
    for (size_t v = begin[g]; v < begin[g + 1]; ++v) group_p[g] += p[v];
  if (k <= 1) return group_p;
  if (static_cast<size_t>(k) >= positive) {
    for (size_t g = 0; g < groups; ++g) out[g] = group_p[g] > 0 ? 1.0 : 0.0;
    return out;
  }

  const size_t K = static_cast<size_t>(k);
  // Step: F's transition narrows like 1/sqrt(k) in log t; 0.4/sqrt(k) keeps the relative error
  // below 1e-9 against exact enumeration, even for weights spanning 20 orders of magnitude, and
  // near 1e-11 for Zipf weights (tests/routing_model_test.cc checks 1e-9).
  const double h = 0.4 / std::sqrt(static_cast<double>(k));
  // Below t_low, k have rung only with probability P(N(t) >= k) <= t^k / k! (N is dominated by
  // a Poisson(t) count), so F = 1 there and that part is 1 - e^{-p_A t_low}, with a relative
  // error below t_low^{k+1} / (k + 1)! <= 2e-16 for k >= 2. The trapezoid sum then starts where
  // the integrand f(x) = p_A t e^{-p_A t} F is not negligible, which the Euler-Maclaurin term
  // (h^2 / 12) f'(x_low), f' = p_A t e^{-p_A t} (1 - p_A t) there, corrects to O(h^4 f'''(x_low)).
  constexpr double kTimeLow = 1e-5;
  constexpr double kNegligible = 1e-20;
  constexpr int kMaxPoints = 200000;
  std::vector<double> q(n), r(n), pre((n + 1) * K), suf((n + 1) * K);  // q: rung by t, r = 1 - q
  for (size_t g = 0; g < groups; ++g) {
    const double f = group_p[g] * kTimeLow * std::exp(-group_p[g] * kTimeLow);
    out[g] = -std::expm1(-group_p[g] * kTimeLow) + h * h / 12 * f * (1 - group_p[g] * kTimeLow);
  }
  for (int i = 0; i < kMaxPoints; ++i) {
    const double t = kTimeLow * std::exp(i * h);
    if (!std::isfinite(t)) break;
    for (size_t v = 0; v < n; ++v) {
      q[v] = -std::expm1(-p[v] * t);
      r[v] = std::exp(-p[v] * t);
    }
    // pre[v][j]: P(exactly j of the first v have rung); suf[v][j] then P(at most j of v.. have).
    std::fill(pre.begin(), pre.begin() + K, 0.0);
    pre[0] = 1;
    for (size_t v = 0; v < n; ++v) {
      const double* a = &pre[v * K];
      double* b = &pre[(v + 1) * K];
      b[0] = a[0] * r[v];
      for (size_t j = 1; j < K; ++j) b[j] = a[j] * r[v] + a[j - 1] * q[v];
    }
    std::fill(suf.begin() + n * K, suf.end(), 0.0);
    suf[n * K] = 1;
    for (size_t v = n; v-- > 0;) {
      const double* a = &suf[(v + 1) * K];
      double* b = &suf[v * K];
      b[0] = a[0] * r[v];
      for (size_t j = 1; j < K; ++j) b[j] = a[j] * r[v] + a[j - 1] * q[v];
    }
    for (size_t v = 0; v <= n; ++v)
      for (size_t j = 1; j < K; ++j) suf[v * K + j] += suf[v * K + j - 1];
    const double weight = (i == 0 ? 0.5 : 1.0) * h * t;  // dt = t dx
    for (size_t g = 0; g < groups; ++g) {
      if (group_p[g] <= 0) continue;
      const double* a = &pre[begin[g] * K];
      const double* c = &suf[begin[g + 1] * K];
      double f = 0;
      for (size_t j = 0; j < K; ++j) f += a[j] * c[K - 1 - j];
      out[g] += weight * group_p[g] * std::exp(-group_p[g] * t) * f;
    }
    // The integrand is at most p_A t P(N(t) <= k-1) and P(A hit) >= p_A.
    if (t * suf[K - 1] < kNegligible) break;
  }
  for (double& x : out) x = std::min(x, 1.0);
  return out;
}

std::vector<double> normalised(const std::vector<double>& w) {
  double total = 0;
  for (double x : w) {
    MOESIM_ASSERT(std::isfinite(x) && x >= 0, "routing probabilities must be finite and >= 0, got {}", x);
    total += x;
  }
  MOESIM_ASSERT(total > 0 && std::isfinite(total), "routing probabilities must have a positive sum, got {}", total);
  std::vector<double> p(w.size());
  for (size_t e = 0; e < w.size(); ++e) p[e] = w[e] / total;
  return p;
}

int positive_count(const std::vector<double>& p) {
  return static_cast<int>(std::count_if(p.begin(), p.end(), [](double x) { return x > 0; }));
}

// ---------------------------------------------------------------------------------------------
// Distributions.

void validate_uniform(const ConfigScope& s, int) {
  const auto& d = static_cast<const RoutingDistribution&>(s.message());
  if (d.has_uniform() && !d.uniform())
    s.error("uniform", "`uniform: false` names no distribution; write `uniform: true` or choose another kind");
}
std::vector<double> uniform_probabilities(const RoutingDistribution&, int experts) {
  return std::vector<double>(experts, 1.0 / experts);
}

constexpr double kMaxZipfExponent = 10;
void validate_zipf(const ConfigScope& s, int) {
  s.child("zipf").in_range("exponent", 0, kMaxZipfExponent, Need::kRequired);
}
std::vector<double> zipf_probabilities(const RoutingDistribution& d, int experts) {
  std::vector<double> w(experts);
  for (int e = 0; e < experts; ++e) w[e] = std::pow(static_cast<double>(e + 1), -d.zipf().exponent());
  return normalised(w);
}

void validate_histogram(const ConfigScope& s, int experts) {
  const ConfigScope h = s.child("histogram");
  const auto& msg = static_cast<const RoutingDistribution::Histogram&>(h.message());
  if (!h.require("weight")) return;
  if (experts > 0 && msg.weight_size() != experts)
    h.error("weight", fmt::format("has {} weights but the model has {} experts (one weight per expert)",
                                  msg.weight_size(), experts));
  bool usable = true;
  double total = 0;
  for (int i = 0; i < msg.weight_size(); ++i) {
    const double w = msg.weight(i);
    if (!std::isfinite(w) || w < 0) {
      h.error("weight", fmt::format("must be a finite number, zero or more, got {}", w), i);
      usable = false;
    } else {
      total += w;
    }
  }
  if (usable && total == 0) h.error("weight", "all weights are zero: no expert could be chosen");
  if (usable && !std::isfinite(total)) h.error("weight", "weights are too large to add up; scale them down");
}
std::vector<double> histogram_probabilities(const RoutingDistribution& d, int experts) {
  MOESIM_ASSERT(d.histogram().weight_size() == experts, "histogram has {} weights for {} experts",
                d.histogram().weight_size(), experts);
  return normalised({d.histogram().weight().begin(), d.histogram().weight().end()});
}

constexpr double kFractionSumTolerance = 1e-3;
void validate_dataset_mixture(const ConfigScope& s, int experts) {
  const ConfigScope m = s.child("dataset_mixture");
  const auto& msg = static_cast<const RoutingDistribution::DatasetMixture&>(m.message());
  m.in_range("affinity", 0, 1, Need::kOptional);
  if (msg.dataset_size() == 0) {
    m.error("dataset", "missing required value: a mixture needs at least one dataset");
    return;
  }
  bool fractions_ok = true;
  double fraction_sum = 0;
  for (int i = 0; i < msg.dataset_size(); ++i) {
    const ConfigScope d = m.child("dataset", i);
    const auto& ds = msg.dataset(i);
    if (d.positive("fraction", Need::kRequired, /*allow_zero=*/false, 1.0))
      fraction_sum += ds.fraction();
    else
      fractions_ok = false;
    if (ds.experts_size() == 0)
      d.error("experts", "missing required value: a dataset needs at least one preferred expert");
    std::set<int> seen;
    for (int j = 0; j < ds.experts_size(); ++j) {
      const int x = ds.experts(j);
      if (x < 0 || (experts > 0 && x >= experts))
        d.error("experts", experts > 0 ? fmt::format("expert {} is out of range [0, {})", x, experts)
                                       : fmt::format("expert {} is negative", x), j);
      else if (!seen.insert(x).second)
        d.error("experts", fmt::format("expert {} is listed twice", x), j);
    }
  }
  if (fractions_ok && std::fabs(fraction_sum - 1) > kFractionSumTolerance)
    m.error("dataset", fmt::format("dataset fractions sum to {:g}, not 1 (within {:g})", fraction_sum,
                                   kFractionSumTolerance));
}
std::vector<double> dataset_mixture_probabilities(const RoutingDistribution& d, int experts) {
  const auto& m = d.dataset_mixture();
  const double a = m.affinity();
  double fraction_sum = 0;
  for (const auto& ds : m.dataset()) fraction_sum += ds.fraction();
  MOESIM_ASSERT(fraction_sum > 0, "dataset fractions sum to {}", fraction_sum);
  std::vector<double> p(experts, 0.0);
  for (const auto& ds : m.dataset()) {
    const double f = ds.fraction() / fraction_sum;
    for (double& x : p) x += f * (1 - a) / experts;
    for (int e : ds.experts()) {
      MOESIM_ASSERT(e >= 0 && e < experts, "dataset {} names expert {} of {}", ds.name(), e, experts);
      p[e] += f * a / ds.experts_size();
    }
  }
  return normalised(p);
}

// ---------------------------------------------------------------------------------------------
// Buffer filling.

struct FillCounts {
  int64_t dropped = 0;
  int64_t fully_dropped_tokens = 0;
  int64_t primary_dropped = 0;
  double dropped_gate = 0;
  double total_gate = 0;
  std::vector<std::vector<int64_t>> kept;  // [source][expert], the tokens' blocks over `sources`
};

// Fills buffers in policy order; expert e keeps its first keep[e] assignments.
FillCounts fill_buffers(const TokenRoutes& r, strategy::DropPolicy policy, const std::vector<int64_t>& keep,
                        int sources) {
  FillCounts c;
  const int k = r.top_k;
  std::vector<int64_t> used(keep.size(), 0);
  std::vector<int> lost(r.tokens, 0);
  std::vector<double> priority(static_cast<size_t>(r.tokens));
  for (int64_t t = 0; t < r.tokens; ++t) priority[t] = k > 0 ? r.gate[static_cast<size_t>(t) * k] : 0;
  std::vector<int> source(static_cast<size_t>(r.tokens));
  int64_t t = 0;
  const std::vector<int64_t> blocks = tokens_per_source(r.tokens, sources);
  for (int s = 0; s < sources; ++s)
    for (int64_t i = 0; i < blocks[s]; ++i) source[static_cast<size_t>(t++)] = s;
  c.kept.assign(static_cast<size_t>(sources), std::vector<int64_t>(keep.size(), 0));
  for (int64_t a : fill_order(policy, r.tokens, k, priority)) {
    const int e = r.expert[a];
    c.total_gate += r.gate[a];
    if (used[e] < keep[e]) {
      ++used[e];
      ++c.kept[source[static_cast<size_t>(a / k)]][e];
      continue;
    }
    ++c.dropped;
    c.dropped_gate += r.gate[a];
    ++lost[a / k];
    if (a % k == 0) ++c.primary_dropped;
  }
  for (int x : lost) c.fully_dropped_tokens += (k > 0 && x == k);
  return c;
}

std::vector<int64_t> loads_of(const TokenRoutes& r, int experts) {
  std::vector<int64_t> load(experts, 0);
  for (int e : r.expert) ++load[e];
  return load;
}

void check_problem(const RoutingProblem& pr) {
  MOESIM_ASSERT(pr.tokens >= 0, "tokens must be >= 0, got {}", pr.tokens);
  MOESIM_ASSERT(pr.experts > 0, "a routing problem needs experts, got {}", pr.experts);
  MOESIM_ASSERT(pr.top_k >= 1 && pr.top_k <= pr.experts, "top_k {} outside [1, {}]", pr.top_k, pr.experts);
  MOESIM_ASSERT(pr.sources >= 1, "a routing problem needs at least one source rank, got {}", pr.sources);
  MOESIM_ASSERT(static_cast<int>(pr.probabilities.size()) == pr.experts, "{} probabilities for {} experts",
                pr.probabilities.size(), pr.experts);
  MOESIM_ASSERT(pr.drop_policy == strategy::VANILLA || pr.drop_policy == strategy::BATCH_PRIORITY ||
                    pr.drop_policy == strategy::NO_DROP,
                "unknown drop policy {}", static_cast<int>(pr.drop_policy));
  MOESIM_ASSERT(pr.drop_policy == strategy::NO_DROP || (std::isfinite(pr.capacity_factor) && pr.capacity_factor > 0),
                "capacity factor must be > 0, got {}", pr.capacity_factor);
}

bool per_token(const RoutingProblem& pr, int positive) {
  return pr.tokens <= kPerTokenDrawBudget / std::max(1, positive);
}

double safe_ratio(double a, double b) { return b > 0 ? a / b : 0.0; }

template <typename Load>
std::vector<double> rank_loads_impl(const ExpertPlacementMap& map, const std::vector<Load>& loads) {
  MOESIM_ASSERT(loads.size() == map.expert_ranks.size(), "{} loads for {} experts", loads.size(),
                map.expert_ranks.size());
  std::vector<double> out(map.ranks, 0.0);
  for (size_t e = 0; e < loads.size(); ++e) {
    const auto& copies = map.expert_ranks[e];
    for (int r : copies) out[r] += static_cast<double>(loads[e]) / static_cast<double>(copies.size());
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

const Registry<RoutingDistributionKind>& routing_distributions() {
  static const Registry<RoutingDistributionKind> registry = [] {
    Registry<RoutingDistributionKind> r("routing distribution");
    r.add("uniform", "every expert equally likely (the default)", {validate_uniform, uniform_probabilities});
    r.add("zipf", "expert of popularity rank r (index order) weighted r^-exponent",
          {validate_zipf, zipf_probabilities});
    r.add("dataset_mixture", "DAMEX: each dataset's tokens prefer its experts with probability `affinity`",
          {validate_dataset_mixture, dataset_mixture_probabilities});
    r.add("histogram", "one weight per expert, normalised", {validate_histogram, histogram_probabilities});
    return r;
  }();
  return registry;
}

std::string_view routing_distribution_name(const RoutingDistribution& routing) {
  const pb::OneofDescriptor* kind = routing.GetDescriptor()->FindOneofByName("kind");
  const pb::FieldDescriptor* set = routing.GetReflection()->GetOneofFieldDescriptor(routing, kind);
  return set == nullptr ? std::string_view("uniform") : std::string_view(set->name());
}

void validate_routing(const ConfigScope& scope, int experts) {
  const auto& d = static_cast<const RoutingDistribution&>(scope.message());
  const RoutingDistributionKind* kind = routing_distributions().find(routing_distribution_name(d));
  MOESIM_ASSERT(kind != nullptr, "routing distribution '{}' is not registered", routing_distribution_name(d));
  kind->validate(scope, experts);
}

std::vector<double> expert_probabilities(const RoutingDistribution& routing, int experts) {
  MOESIM_ASSERT(experts > 0, "expert_probabilities needs experts > 0, got {}", experts);
  const RoutingDistributionKind* kind = routing_distributions().find(routing_distribution_name(routing));
  MOESIM_ASSERT(kind != nullptr, "routing distribution '{}' is not registered", routing_distribution_name(routing));
  return kind->probabilities(routing, experts);
}

std::vector<double> inclusion_probabilities(const std::vector<double>& probabilities, int top_k) {
  MOESIM_ASSERT(top_k >= 1, "top_k must be >= 1, got {}", top_k);
  const std::vector<double> p = normalised(probabilities);
  std::vector<size_t> begin(p.size() + 1);
  std::iota(begin.begin(), begin.end(), size_t{0});
  std::vector<double> pi = group_inclusion(p, begin, top_k);
  const double k_eff = std::min(top_k, positive_count(p));
  const double sum = std::accumulate(pi.begin(), pi.end(), 0.0);
  for (double& x : pi) x = std::min(1.0, x * k_eff / sum);
  return pi;
}

int64_t expert_capacity(int64_t tokens, int experts, int top_k, double capacity_factor) {
  MOESIM_ASSERT(experts > 0 && tokens >= 0 && top_k >= 1, "bad capacity inputs");
  const double slots = capacity_factor * top_k * static_cast<double>(tokens) / experts;
  const double nearest = std::round(slots);
  return static_cast<int64_t>(approx_eq(slots, nearest) ? nearest : std::ceil(slots));
}

std::vector<int64_t> tokens_per_source(int64_t tokens, int sources) {
  MOESIM_ASSERT(tokens >= 0 && sources >= 1, "{} tokens over {} sources", tokens, sources);
  std::vector<int64_t> n(static_cast<size_t>(sources), tokens / sources);
  for (int s = 0; s < tokens % sources; ++s) ++n[s];
  return n;
}

double route_bytes_per_rank(double tokens, double routed_per_token, int experts) {
  return (tokens * (1 + routed_per_token) + 2.0 * experts + 2) * sizeof(float);
}

std::vector<int64_t> fill_order(strategy::DropPolicy policy, int64_t tokens, int k, std::span<const double> priority) {
  MOESIM_ASSERT(tokens >= 0 && k >= 0, "fill_order: tokens {} k {}", tokens, k);
  std::vector<int64_t> order(static_cast<size_t>(tokens) * static_cast<size_t>(k));
  if (policy != strategy::BATCH_PRIORITY) {
    std::iota(order.begin(), order.end(), 0);
    return order;
  }
  MOESIM_ASSERT(priority.size() == static_cast<size_t>(tokens), "{} priorities for {} tokens", priority.size(), tokens);
  std::vector<int64_t> by_priority(static_cast<size_t>(tokens));
  std::iota(by_priority.begin(), by_priority.end(), 0);
  std::stable_sort(by_priority.begin(), by_priority.end(), [&](int64_t a, int64_t b) { return priority[a] > priority[b]; });
  size_t i = 0;
  for (int j = 0; j < k; ++j)
    for (int64_t t : by_priority) order[i++] = t * k + j;
  return order;
}

TokenRoutes sample_token_routes(const std::vector<double>& probabilities, int64_t tokens, int top_k, uint64_t seed) {
  MOESIM_ASSERT(tokens >= 0 && top_k >= 1, "sample_token_routes: tokens {} top_k {}", tokens, top_k);
  const std::vector<double> p = normalised(probabilities);
  std::vector<int> live;
  for (int e = 0; e < static_cast<int>(p.size()); ++e)
    if (p[e] > 0) live.push_back(e);
  const int k = std::min<int>(top_k, static_cast<int>(live.size()));
  TokenRoutes r;
  r.tokens = tokens;
  r.top_k = k;
  r.expert.resize(static_cast<size_t>(tokens) * k);
  r.gate.resize(r.expert.size());
  ExponentialZiggurat::Stream bits(seed);
  const ExponentialZiggurat& exp1 = exponential();
  std::vector<double> best(k);  // descending e^{score}
  std::vector<int> best_e(k);
  for (int64_t t = 0; t < tokens; ++t) {
    int filled = 0;
    double sum = 0;
    for (int e : live) {
      const double s = p[e] / exp1(bits);  // e^{log p_e + Gumbel}
      sum += s;
      if (filled == k && s <= best[k - 1]) continue;
      int i = filled < k ? filled++ : k - 1;
      for (; i > 0 && best[i - 1] < s; --i) {
        best[i] = best[i - 1];
        best_e[i] = best_e[i - 1];
      }
      best[i] = s;
      best_e[i] = e;
    }
    for (int j = 0; j < k; ++j) {
      r.expert[static_cast<size_t>(t) * k + j] = best_e[j];
      r.gate[static_cast<size_t>(t) * k + j] = best[j] / sum;
    }
  }
  return r;
}

RoutingLoads routing_loads(const RoutingProblem& problem) {
  check_problem(problem);
  const std::vector<double> p = normalised(problem.probabilities);
  const int positive = positive_count(p);
  const int k = std::min(problem.top_k, positive);
  const int64_t T = problem.tokens;
  const double assignments = static_cast<double>(T) * k;
  const bool no_drop = problem.drop_policy == strategy::NO_DROP;

  RoutingLoads out;
  const std::vector<double> pi = problem.inclusion.size() == p.size() ? problem.inclusion : inclusion_probabilities(p, problem.top_k);
  out.expected_load.resize(problem.experts);
  for (int e = 0; e < problem.experts; ++e) out.expected_load[e] = static_cast<double>(T) * pi[e];
  out.capacity = no_drop ? 0 : expert_capacity(T, problem.experts, problem.top_k, problem.capacity_factor);

  FillCounts counts;  // about out.simulated_tokens tokens
  int64_t dropped = 0;
  if (per_token(problem, positive)) {
    const TokenRoutes routes = sample_token_routes(p, T, problem.top_k, problem.seed);
    out.sampled_load = loads_of(routes, problem.experts);
    const int64_t keep = no_drop ? std::numeric_limits<int64_t>::max() : out.capacity;
    counts = fill_buffers(routes, problem.drop_policy, std::vector<int64_t>(problem.experts, keep), problem.sources);
    dropped = counts.dropped;
    out.simulated_tokens = T;
  } else {
    std::mt19937_64 rng(stream_seed(problem.seed, kMultinomialStream));
    out.sampled_load = sample_multinomial(rng, T * k, pi);
    for (int64_t load : out.sampled_load) dropped += no_drop ? 0 : std::max<int64_t>(0, load - out.capacity);
    if (dropped > 0) {
      const int64_t sub_tokens = std::max<int64_t>(1, kPerTokenDrawBudget / positive);
      const TokenRoutes routes =
          sample_token_routes(p, sub_tokens, problem.top_k, stream_seed(problem.seed, kSubsampleStream));
      std::vector<int64_t> keep = loads_of(routes, problem.experts);
      for (int e = 0; e < problem.experts; ++e) {
        const int64_t full = out.sampled_load[e];
        const double over = full > 0 ? static_cast<double>(std::max<int64_t>(0, full - out.capacity)) / full : 0.0;
        keep[e] -= std::llround(over * static_cast<double>(keep[e]));
      }
      counts = fill_buffers(routes, problem.drop_policy, keep, problem.sources);
      out.simulated_tokens = sub_tokens;
    }
  }

  const int64_t max_load = *std::max_element(out.sampled_load.begin(), out.sampled_load.end());
  if (no_drop) out.capacity = max_load;
  // Whose assignments were kept: counted when every token was routed, else each expert's kept
  // assignments split as the subsample's (as the sources' tokens when nothing dropped).
  const std::vector<int64_t> blocks = tokens_per_source(T, problem.sources);
  out.kept_by_source.assign(static_cast<size_t>(problem.sources), std::vector<double>(problem.experts, 0.0));
  for (int e = 0; e < problem.experts; ++e) {
    const double kept = static_cast<double>(std::min(out.sampled_load[e], out.capacity));
    double counted_e = 0;
    if (!counts.kept.empty())
      for (int s = 0; s < problem.sources; ++s) counted_e += static_cast<double>(counts.kept[s][e]);
    for (int s = 0; s < problem.sources; ++s)
      out.kept_by_source[s][e] = counted_e > 0 ? kept * static_cast<double>(counts.kept[s][e]) / counted_e
                                               : kept * safe_ratio(static_cast<double>(blocks[s]), static_cast<double>(T));
  }
  const double counted = static_cast<double>(out.simulated_tokens);
  out.dropped_fraction = safe_ratio(static_cast<double>(dropped), assignments);
  out.tokens_fully_dropped_fraction = safe_ratio(static_cast<double>(counts.fully_dropped_tokens), counted);
  out.primary_dropped_fraction = safe_ratio(static_cast<double>(counts.primary_dropped), counted);
  out.dropped_gate_mass_fraction = safe_ratio(counts.dropped_gate, counts.total_gate);
  out.max_load = static_cast<double>(max_load);
  out.imbalance = safe_ratio(out.max_load, assignments / problem.experts);
  return out;
}

// ---------------------------------------------------------------------------------------------

ExpertPlacementMap place_experts(int experts, int ranks, const strategy::ExpertPlacement* placement,
                                 const std::vector<double>& probabilities) {
  MOESIM_ASSERT(experts > 0 && ranks > 0, "place_experts: {} experts on {} ranks", experts, ranks);
  ExpertPlacementMap map;
  map.ranks = ranks;
  map.expert_ranks.resize(experts);
  if (placement != nullptr && placement->expert_rank_size() > 0) {
    MOESIM_ASSERT(placement->expert_rank_size() == experts, "expert_rank has {} entries for {} experts",
                  placement->expert_rank_size(), experts);
    for (int e = 0; e < experts; ++e) {
      const int r = placement->expert_rank(e);
      MOESIM_ASSERT(r >= 0 && r < ranks, "expert {} placed on rank {} of {}", e, r, ranks);
      map.expert_ranks[e] = {r};
    }
  } else {
    MOESIM_ASSERT(experts % ranks == 0, "{} experts do not split evenly over {} ranks", experts, ranks);
    const int per_rank = experts / ranks;
    for (int e = 0; e < experts; ++e) map.expert_ranks[e] = {e / per_rank};
  }

  const int replicas = placement != nullptr ? placement->replicas() : 0;
  MOESIM_ASSERT(replicas >= 0, "replicas must be >= 0, got {}", replicas);
  if (replicas == 0) return map;
  MOESIM_ASSERT(static_cast<int>(probabilities.size()) == experts, "{} probabilities for {} experts",
                probabilities.size(), experts);
  for (int copy = 0; copy < replicas; ++copy) {
    const std::vector<double> load = rank_loads(map, probabilities);
    std::vector<int> by_load(ranks);  // busiest first
    std::iota(by_load.begin(), by_load.end(), 0);
    std::stable_sort(by_load.begin(), by_load.end(), [&](int a, int b) { return load[a] > load[b]; });
    int best_e = -1, best_rank = -1;
    double best_max = 0, best_squares = 0;
    for (int e = 0; e < experts; ++e) {
      const auto& at = map.expert_ranks[e];
      const int c = static_cast<int>(at.size());
      if (c == ranks) continue;
      auto holds = [&](int r) { return std::find(at.begin(), at.end(), r) != at.end(); };
      int target = -1;  // least loaded (lowest index on ties) among ranks without e
      for (int r = 0; r < ranks; ++r)
        if (!holds(r) && (target < 0 || load[r] < load[target])) target = r;
      const double share = probabilities[e] / (c + 1), shed = probabilities[e] / c - share;
      double new_max = load[target] + share;
      double squares_delta = 2 * load[target] * share + share * share;
      for (int r : at) {
        new_max = std::max(new_max, load[r] - shed);
        squares_delta += -2 * load[r] * shed + shed * shed;
      }
      for (int r : by_load)  // the busiest rank the copy leaves alone
        if (r != target && !holds(r)) {
          new_max = std::max(new_max, load[r]);
          break;
        }
      const bool better = best_e < 0 || definitely_less(new_max, best_max) ||
                          (approx_eq(new_max, best_max) && definitely_less(squares_delta, best_squares));
      if (better) {
        best_e = e;
        best_rank = target;
        best_max = new_max;
        best_squares = squares_delta;
      }
    }
    if (best_e < 0) break;  // every expert is on every rank
    map.expert_ranks[best_e].push_back(best_rank);
  }
  return map;
}

std::vector<double> rank_loads(const ExpertPlacementMap& map, const std::vector<double>& expert_loads) {
  return rank_loads_impl(map, expert_loads);
}
std::vector<double> rank_loads(const ExpertPlacementMap& map, const std::vector<int64_t>& expert_loads) {
  return rank_loads_impl(map, expert_loads);
}
double max_rank_load(const ExpertPlacementMap& map, const std::vector<double>& expert_loads) {
  const std::vector<double> l = rank_loads(map, expert_loads);
  return *std::max_element(l.begin(), l.end());
}
double max_rank_load(const ExpertPlacementMap& map, const std::vector<int64_t>& expert_loads) {
  const std::vector<double> l = rank_loads(map, expert_loads);
  return *std::max_element(l.begin(), l.end());
}

std::vector<std::vector<double>> dispatch_bytes(const ExpertPlacementMap& map, const RoutingProblem& problem,
                                                double bytes_per_token, bool dedup_per_rank) {
  check_problem(problem);
  MOESIM_ASSERT(static_cast<int>(map.expert_ranks.size()) == problem.experts, "placement of {} experts, problem of {}",
                map.expert_ranks.size(), problem.experts);
  MOESIM_ASSERT(map.ranks > 0, "placement over {} ranks", map.ranks);
  const int R = map.ranks, E = problem.experts;
  const int64_t T = problem.tokens;
  const std::vector<int64_t> on_rank = tokens_per_source(T, R);
  const std::vector<double> p = normalised(problem.probabilities);
  std::vector<std::vector<double>> bytes(R, std::vector<double>(R, 0.0));
  // holds[s * E + e]: rank s has a copy of expert e.
  std::vector<uint8_t> holds(static_cast<size_t>(R) * E, 0);
  for (int e = 0; e < E; ++e)
    for (int r : map.expert_ranks[e]) holds[static_cast<size_t>(r) * E + e] = 1;

  if (per_token(problem, positive_count(p))) {
    const TokenRoutes routes = sample_token_routes(p, T, problem.top_k, problem.seed);
    const int k = routes.top_k;
    std::vector<int> next_copy(static_cast<size_t>(R) * E, 0);  // round-robin cursor per (src, expert)
    std::vector<int> dst(k);
    int64_t t = 0;
    for (int s = 0; s < R; ++s) {
      for (int64_t i = 0; i < on_rank[s]; ++i, ++t) {
        int distinct = 0;
        for (int j = 0; j < k; ++j) {
          const int e = routes.expert[static_cast<size_t>(t) * k + j];
          const auto& copies = map.expert_ranks[e];
          int d = s;
          if (!holds[static_cast<size_t>(s) * E + e]) {
            int& cursor = next_copy[static_cast<size_t>(s) * E + e];
            d = copies[cursor];
            cursor = (cursor + 1) % static_cast<int>(copies.size());
          }
          if (dedup_per_rank && std::find(dst.begin(), dst.begin() + distinct, d) != dst.begin() + distinct) continue;
          dst[distinct++] = d;
          bytes[s][d] += bytes_per_token;
        }
      }
    }
    return bytes;
  }

  // Expected values. Sources holding no copy of a replicated expert all share one map w_s(e, d)
  // (every expert goes to its home or is split over its copies), so their group inclusions are
  // computed once.
  const int k = std::min(problem.top_k, positive_count(p));
  const std::vector<double> pi = inclusion_probabilities(p, problem.top_k);
  std::map<int, std::vector<double>> hit_cache;  // by source, -1 for the shared map
  for (int s = 0; s < R; ++s) {
    if (on_rank[s] == 0) continue;
    const double scale = static_cast<double>(on_rank[s]) * bytes_per_token;
    // Per destination: the (expert, share) pairs s sends there.
    std::vector<std::vector<std::pair<int, double>>> to(R);
    bool own_map = false;
    for (int e = 0; e < E; ++e) {
      const auto& copies = map.expert_ranks[e];
      if (holds[static_cast<size_t>(s) * E + e]) {
        to[s].push_back({e, 1.0});
        own_map = own_map || copies.size() > 1;
      } else {
        for (int d : copies) to[d].push_back({e, 1.0 / static_cast<double>(copies.size())});
      }
    }
    if (!dedup_per_rank) {
      for (int d = 0; d < R; ++d)
        for (auto [e, share] : to[d]) bytes[s][d] += scale * pi[e] * share;
      continue;
    }
    auto [it, fresh] = hit_cache.try_emplace(own_map ? s : -1);
    if (fresh) {
      std::vector<double> w;
      std::vector<size_t> begin{0};
      for (int d = 0; d < R; ++d) {
        for (auto [e, share] : to[d]) w.push_back(p[e] * share);
        begin.push_back(w.size());
      }
      it->second = group_inclusion(w, begin, k);
    }
    for (int d = 0; d < R; ++d) bytes[s][d] = scale * it->second[d];
  }
  return bytes;
}

}  // namespace moesim::cost
