#include "costmodel/compute.h"

#include "common/config.h"
#include "common/precision.h"
#include "topologies/registry.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/descriptor.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

namespace moesim::cost {
namespace {

namespace pb = google::protobuf;

constexpr int kKinds = 7, kDTypes = 5;
static_assert(static_cast<int>(OpKind::kOptimizer) == kKinds - 1 && static_cast<int>(DType::kFp8) == kDTypes - 1,
              "the enum tables below list every OpKind and DType of ops.h");

// Enum tables, indexed by the cost enums' values.
constexpr profile::OpKind kProfileKind[kKinds] = {profile::GEMM, profile::GROUPED_GEMM, profile::ATTENTION,
                                                  profile::NORM, profile::ELEMENTWISE, profile::EMBEDDING,
                                                  profile::OPTIMIZER};
constexpr profile::DType kProfileDType[kDTypes] = {profile::FP32, profile::TF32, profile::BF16, profile::FP16,
                                                   profile::FP8};
constexpr const char* kPeakField[kDTypes] = {"fp32", "tf32", "bf16", "fp16", "fp8"};

// Fallbacks, tried in order (compute.h).
const std::vector<DType>& fallback_chain(DType d) {
  using enum DType;
  static const std::vector<DType> chains[kDTypes] = {
      /* fp32 */ {kFp32},
      /* tf32 */ {kTf32, kFp32},
      /* bf16 */ {kBf16, kFp16, kFp32},
      /* fp16 */ {kFp16, kBf16, kFp32},
      /* fp8  */ {kFp8, kBf16, kFp16, kFp32},
  };
  return chains[static_cast<int>(d)];
}

int index_of(profile::OpKind k) {
  for (int i = 0; i < kKinds; ++i)
    if (kProfileKind[i] == k) return i;
  return -1;
}
int index_of(profile::DType d) {
  for (int i = 0; i < kDTypes; ++i)
    if (kProfileDType[i] == d) return i;
  return -1;
}

bool is_vector_op(OpKind k) {
  return k == OpKind::kNorm || k == OpKind::kElementwise || k == OpKind::kEmbedding || k == OpKind::kOptimizer;
}

// "GEMM, GROUPED_GEMM, ...": the values a config may write (the UNSPECIFIED zero left out).
std::string enum_names(const pb::EnumDescriptor* e) {
  std::string out;
  for (int i = 0; i < e->value_count(); ++i)
    if (e->value(i)->number() != 0) out += (out.empty() ? "" : ", ") + e->value(i)->name();
  return out;
}

// e[i+1] <= e[i] * (1 + ln(f[i+1] / f[i])): compute time does not fall as flops grow (compute.h).
double steepest_next(double flops, double efficiency, double next_flops) {
  return efficiency * (1 + std::log(next_flops / flops));
}
bool too_steep(double flops, double efficiency, double next_flops, double next_efficiency) {
  return next_efficiency > steepest_next(flops, efficiency, next_flops) * (1 + kRelEps);
}

// Built-in priors: roughly an H100 SXM5 running cuBLAS(Lt) GEMMs and FlashAttention-class kernels,
// from public benchmark observations (large bf16 GEMMs ~0.7-0.76 of dense peak, fp8 a lower
// fraction, tiny kernels a few microseconds whatever their size). The same figures as
// configs/devices/h100-sxm5.textproto; replaced per device by `moesim calibrate`.
struct Prior {
  OpKind kind;
  std::vector<DType> dtypes;
  std::vector<std::pair<double, double>> points;  // (flops, efficiency)
};

const std::vector<Prior>& builtin_priors() {
  using enum DType;
  using enum OpKind;
  static const std::vector<Prior> priors = {
      {kGemm, {kBf16, kFp16},
       {{1e6, 0.0065}, {1e7, 0.02}, {1e8, 0.065}, {1e9, 0.2}, {1e10, 0.5}, {1e11, 0.68}, {1e12, 0.74}, {1e13, 0.76}}},
      {kGemm, {kFp8},
       {{1e6, 0.004}, {1e7, 0.012}, {1e8, 0.038}, {1e9, 0.12}, {1e10, 0.35}, {1e11, 0.55}, {1e12, 0.63}, {1e13, 0.66}}},
      {kGemm, {kTf32}, {{1e6, 0.01}, {1e7, 0.032}, {1e8, 0.1}, {1e9, 0.3}, {1e10, 0.6}, {1e11, 0.7}, {1e12, 0.72}}},
      {kGemm, {kFp32}, {{1e6, 0.05}, {1e7, 0.15}, {1e8, 0.45}, {1e9, 0.7}, {1e10, 0.8}, {1e11, 0.85}}},
      {kGroupedGemm, {kBf16, kFp16},
       {{1e6, 0.004}, {1e7, 0.013}, {1e8, 0.04}, {1e9, 0.13}, {1e10, 0.38}, {1e11, 0.58}, {1e12, 0.66}, {1e13, 0.68}}},
      {kGroupedGemm, {kFp8},
       {{1e6, 0.0025}, {1e7, 0.008}, {1e8, 0.025}, {1e9, 0.08}, {1e10, 0.25}, {1e11, 0.45}, {1e12, 0.55}, {1e13, 0.58}}},
      {kGroupedGemm, {kTf32},
       {{1e6, 0.0065}, {1e7, 0.02}, {1e8, 0.062}, {1e9, 0.19}, {1e10, 0.45}, {1e11, 0.6}, {1e12, 0.65}}},
      {kGroupedGemm, {kFp32}, {{1e6, 0.035}, {1e7, 0.11}, {1e8, 0.33}, {1e9, 0.6}, {1e10, 0.72}, {1e11, 0.78}}},
      {kAttention, {kBf16, kFp16},
       {{1e7, 0.01}, {1e8, 0.03}, {1e9, 0.095}, {1e10, 0.3}, {1e11, 0.45}, {1e12, 0.5}, {1e13, 0.52}}},
      {kAttention, {kFp8},
       {{1e7, 0.006}, {1e8, 0.019}, {1e9, 0.06}, {1e10, 0.19}, {1e11, 0.33}, {1e12, 0.4}, {1e13, 0.42}}},
      {kAttention, {kTf32}, {{1e7, 0.012}, {1e8, 0.036}, {1e9, 0.11}, {1e10, 0.3}, {1e11, 0.42}, {1e12, 0.45}}},
      {kAttention, {kFp32}, {{1e6, 0.03}, {1e7, 0.09}, {1e8, 0.25}, {1e9, 0.45}, {1e10, 0.55}, {1e11, 0.6}}},
      {kNorm, {kFp32, kTf32, kBf16, kFp16, kFp8}, {{1, 0.5}}},
      {kElementwise, {kFp32, kTf32, kBf16, kFp16, kFp8}, {{1, 0.5}}},
      {kEmbedding, {kFp32, kTf32, kBf16, kFp16, kFp8}, {{1, 0.5}}},
      {kOptimizer, {kFp32, kTf32, kBf16, kFp16, kFp8}, {{1, 0.5}}},
  };
  return priors;
}

// Peak of `d` as the device gives it, or nullopt.
std::optional<double> given_peak(const hw::PeakFlops& peak, DType d) {
  const pb::FieldDescriptor* f = peak.GetDescriptor()->FindFieldByName(kPeakField[static_cast<int>(d)]);
  if (!peak.GetReflection()->HasField(peak, f)) return std::nullopt;
  return peak.GetReflection()->GetDouble(peak, f);
}

void validate_curve(const ConfigScope& c, const profile::EfficiencyCurve& curve) {
  if (!c.has("op") || index_of(curve.op()) < 0)
    c.error("op", fmt::format("missing required value: one of {}", enum_names(profile::OpKind_descriptor())));
  if (!c.has("dtype") || index_of(curve.dtype()) < 0)
    c.error("dtype", fmt::format("missing required value: one of {}", enum_names(profile::DType_descriptor())));
  if (curve.point_size() == 0) c.error("point", "a curve needs at least one point { flops: ... efficiency: ... }");
  // The last point whose flops and efficiency both validated, for the order and slope checks.
  int prev = -1;
  for (int j = 0; j < curve.point_size(); ++j) {
    ConfigScope p = c.child("point", j);
    const profile::EfficiencyPoint& pt = curve.point(j);
    const bool flops_ok = p.positive("flops", Need::kRequired);
    const bool eff_ok = p.positive("efficiency", Need::kRequired, /*allow_zero=*/false, 1.0);
    if (!flops_ok) continue;
    if (prev >= 0 && pt.flops() <= curve.point(prev).flops()) {
      p.error("flops", fmt::format("sizes must increase along a curve: {:g} follows {:g}", pt.flops(),
                                   curve.point(prev).flops()));
      continue;
    }
    if (!eff_ok) continue;
    if (prev >= 0) {
      const profile::EfficiencyPoint& a = curve.point(prev);
      if (too_steep(a.flops(), a.efficiency(), pt.flops(), pt.efficiency()))
        p.error("efficiency", fmt::format("rises too steeply from {:g} at {:g} FLOPs: a bigger kernel would run "
                                          "faster; at most {:.4g} here (e * (1 + ln(flops / previous flops)))",
                                          a.efficiency(), a.flops(),
                                          steepest_next(a.flops(), a.efficiency(), pt.flops())));
    }
    prev = j;
  }
}

// The kinds of scheduled compute op a profile's op_kind may name (validation's labels).
constexpr std::array<std::string_view, 10> kOpKindNames = {"embed",  "attention", "mlp",     "gate", "permute",
                                                           "shared", "experts",   "combine", "head", "optimizer"};

// Points of a BytesFactor curve (`field` under `parent`): bytes > 0 and increasing, factors in (0, 100].
void check_by_bytes(const ConfigScope& parent, const char* field,
                    const google::protobuf::RepeatedPtrField<profile::BytesFactor>& points) {
  for (int i = 0; i < points.size(); ++i) {
    ConfigScope f = parent.child(field, i);
    f.positive("bytes", Need::kRequired, /*allow_zero=*/false, 1e18);
    f.positive("time_factor", Need::kRequired, /*allow_zero=*/false, 100.0);
    if (i > 0 && points[i].has_bytes() && !(points[i].bytes() > points[i - 1].bytes()))
      f.error("bytes", fmt::format("{} bytes: the points' bytes must increase (the previous point has {})",
                                   points[i].bytes(), points[i - 1].bytes()));
  }
}

void validate(const ConfigScope& root, const profile::DeviceProfile& p) {
  if (root.require("device") && !p.device().has_preset()) topo::validate_device_type(root.child("device"), Need::kOptional);  // else reported
  root.positive("memory_bandwidth_efficiency", Need::kOptional, /*allow_zero=*/false, 1.0);
  std::set<int> memory_kinds;
  for (int i = 0; i < p.memory_size(); ++i) {
    ConfigScope m = root.child("memory", i);
    m.require("op");
    m.positive("efficiency", Need::kRequired, /*allow_zero=*/false, 1.0);
    if (p.memory(i).has_op() && (index_of(p.memory(i).op()) < 0 || !memory_kinds.insert(p.memory(i).op()).second))
      m.error("op", fmt::format("{} is not a kernel kind or has a memory efficiency already",
                                profile::OpKind_Name(p.memory(i).op())));
    check_by_bytes(m, "by_bytes", p.memory(i).by_bytes());
  }
  auto check_factors = [&](const char* field, const auto& factors) {
    std::set<int> kinds;
    for (int i = 0; i < factors.size(); ++i) {
      ConfigScope b = root.child(field, i);
      b.require("op");
      b.positive("time_factor", Need::kRequired, /*allow_zero=*/false, 100.0);
      if (factors.Get(i).has_op() && (index_of(factors.Get(i).op()) < 0 || !kinds.insert(factors.Get(i).op()).second))
        b.error("op", fmt::format("{} is not a kernel kind or has a {} factor already",
                                  profile::OpKind_Name(factors.Get(i).op()), field));
    }
  };
  check_factors("backward", p.backward());
  check_factors("in_situ", p.in_situ());
  check_by_bytes(root, "transfer_footprint", p.transfer_footprint());
  check_by_bytes(root, "gather_in_situ", p.gather_in_situ());
  check_by_bytes(root, "host_footprint", p.host_footprint());
  check_by_bytes(root, "gather_footprint", p.gather_footprint());
  check_by_bytes(root, "scatter_add_footprint", p.scatter_add_footprint());
  root.positive("threads_per_rank", Need::kOptional, /*allow_zero=*/false, 4096);
  root.positive("softmax_score_s", Need::kOptional, /*allow_zero=*/true, 1e-3);
  root.positive("op_overhead_s", Need::kOptional, /*allow_zero=*/true, 1.0);
  root.positive("attention_group_s", Need::kOptional, /*allow_zero=*/true, 1.0);
  root.positive("blas_call_s", Need::kOptional, /*allow_zero=*/true, 1e-2);
  root.in_range("step_spread_factor", 1.0, 10.0, Need::kOptional);
  root.in_range("alone_step_spread_factor", 1.0, 10.0, Need::kOptional);
  std::set<std::pair<std::string, bool>> op_kinds;
  for (int i = 0; i < p.op_kind_size(); ++i) {
    ConfigScope f = root.child("op_kind", i);
    const profile::OpKindFactor& k = p.op_kind(i);
    if (f.require("op") && !is_op_kind(k.op()))
      f.error("op", fmt::format("'{}' is not a kind of compute op (one of {})", k.op(), fmt::join(kOpKindNames, ", ")));
    else if (k.has_op() && !op_kinds.insert({k.op(), k.backward()}).second)
      f.error("op", fmt::format("{} {} has a factor already", k.op(), k.backward() ? "backward" : "forward"));
    f.positive("time_factor", Need::kRequired, /*allow_zero=*/false, 10.0);
  }
  root.positive("routing_choice_s", Need::kOptional, /*allow_zero=*/true, 1e-3);
  root.positive("dispatch_choice_s", Need::kOptional, /*allow_zero=*/true, 1e-3);
  root.positive("routing_backward_choice_s", Need::kOptional, /*allow_zero=*/true, 1e-3);
  root.positive("priority_sort_s", Need::kOptional, /*allow_zero=*/true, 1e-3);
  root.positive("calibration_step_s", Need::kOptional, /*allow_zero=*/false, 3600);
  root.positive("ranks_per_host", Need::kOptional, /*allow_zero=*/false, 1 << 20);
  root.positive("alone_time_factor", Need::kOptional, /*allow_zero=*/false, 10.0);
  root.positive("alone_gather_time_factor", Need::kOptional, /*allow_zero=*/false, 10.0);
  std::set<int> gather_kernels;
  for (int i = 0; i < p.gather_kernel_size(); ++i) {
    ConfigScope g = root.child("gather_kernel", i);
    g.require("kernel");
    g.positive("time_factor", Need::kRequired, /*allow_zero=*/false, 100.0);
    const profile::GatherKernel k = p.gather_kernel(i).kernel();
    if (p.gather_kernel(i).has_kernel() &&
        (k == profile::GATHER_KERNEL_UNSPECIFIED || !gather_kernels.insert(k).second))
      g.error("kernel", fmt::format("{} is not a gather kernel or has a factor already", profile::GatherKernel_Name(k)));
  }
  topo::check_latency(root, "kernel_launch_overhead_s");
  std::map<std::pair<int, int>, int> seen;  // (kind, dtype) -> curve index
  for (int i = 0; i < p.compute_size(); ++i) {
    ConfigScope c = root.child("compute", i);
    const profile::EfficiencyCurve& curve = p.compute(i);
    validate_curve(c, curve);
    const int kind = index_of(curve.op()), dtype = index_of(curve.dtype());
    if (!curve.has_op() || !curve.has_dtype() || kind < 0 || dtype < 0) continue;
    auto [it, fresh] = seen.emplace(std::pair{kind, dtype}, i);
    if (!fresh)
      c.error("", fmt::format("a second curve for {} {}; the first is on line {}", profile::OpKind_Name(curve.op()),
                              profile::DType_Name(curve.dtype()), root.line_of("compute", it->second)));
  }
}

}  // namespace

// Builds DeviceProfiles: resolves the preset, validates everything, lays the curves out.
class ProfileBuilder {
 public:
  // `doc` is the parsed file of `spec` (null for a message built in code).
  static DeviceProfile build(profile::DeviceProfile spec, const ConfigDocument* doc, const std::string& name) {
    Diagnostics diags;
    const profile::DeviceProfile written = spec;
    auto scope_of = [&](const profile::DeviceProfile& m) {
      return doc ? doc->root_for(m, &diags) : ConfigScope(m, nullptr, name, "", 0, &diags);
    };
    if (spec.has_device()) topo::resolve_device_preset(spec.mutable_device(), scope_of(written).child("device"));
    validate(scope_of(spec), spec);
    diags.throw_if_any();

    DeviceProfile out;
    out.spec_ = std::move(spec);
    const profile::DeviceProfile& s = out.spec_;
    out.source_ = s.has_source() ? s.source() : "unspecified";
    if (s.has_memory_bandwidth_efficiency()) out.memory_efficiency_ = s.memory_bandwidth_efficiency();
    out.kind_memory_efficiency_.fill(out.memory_efficiency_);
    for (int i = 0; i < s.memory_size(); ++i) {
      const size_t kind = static_cast<size_t>(index_of(s.memory(i).op()));
      out.kind_memory_efficiency_[kind] = s.memory(i).efficiency();
      out.kind_memory_entry_[kind] = i + 1;
    }
    for (const profile::OpKindFactor& k : s.op_kind()) out.op_kind_factor_[{k.op(), k.backward()}] = k.time_factor();
    out.backward_factor_.fill(1.0);
    for (const profile::BackwardFactor& b : s.backward())
      out.backward_factor_[static_cast<size_t>(index_of(b.op()))] = b.time_factor();
    out.gather_kernel_factor_.fill(1.0);
    for (const profile::GatherKernelFactor& g : s.gather_kernel())
      out.gather_kernel_factor_[static_cast<size_t>(from_proto(g.kernel()))] = g.time_factor();
    out.in_situ_factor_.fill(1.0);
    for (const profile::InSituFactor& f : s.in_situ())
      out.in_situ_factor_[static_cast<size_t>(index_of(f.op()))] = f.time_factor();
    if (s.has_kernel_launch_overhead_s()) out.launch_overhead_s_ = s.kernel_launch_overhead_s();
    else if (s.device().has_kernel_launch_overhead_s()) out.launch_overhead_s_ = s.device().kernel_launch_overhead_s();

    resolve_dtypes(s.device().peak_flops_per_s(), out);
    for (const Prior& prior : builtin_priors())
      for (DType d : prior.dtypes) out.curves_[slot(prior.kind, d)] = to_curve(prior.points);
    for (const profile::EfficiencyCurve& c : s.compute()) {
      std::vector<std::pair<double, double>> points;
      for (const profile::EfficiencyPoint& p : c.point()) points.emplace_back(p.flops(), p.efficiency());
      out.curves_[index_of(c.op()) * kDTypes + index_of(c.dtype())] = to_curve(points);
    }
    return out;
  }

 private:
  static int slot(OpKind k, DType d) { return static_cast<int>(k) * kDTypes + static_cast<int>(d); }

  static DeviceProfile::Curve to_curve(const std::vector<std::pair<double, double>>& points) {
    MOESIM_ASSERT(!points.empty(), "an efficiency curve without points");
    DeviceProfile::Curve c;
    for (size_t i = 0; i < points.size(); ++i) {
      MOESIM_ASSERT(i == 0 || (points[i].first > points[i - 1].first &&
                               !too_steep(points[i - 1].first, points[i - 1].second, points[i].first, points[i].second)),
                    "efficiency curve point {} out of order or too steep", i);
      c.flops.push_back(points[i].first);
      c.efficiency.push_back(points[i].second);
    }
    return c;
  }

  // Fallback chains; a device with none of a chain's types (no fp32 peak) uses its slowest peak.
  static void resolve_dtypes(const hw::PeakFlops& peak, DeviceProfile& out) {
    std::optional<std::pair<double, DType>> slowest;
    for (int i = 0; i < kDTypes; ++i)
      if (auto v = given_peak(peak, DType(i)); v && (!slowest || *v < slowest->first)) slowest = std::pair{*v, DType(i)};
    MOESIM_ASSERT(slowest.has_value(), "a validated device without any peak");
    for (int i = 0; i < kDTypes; ++i) {
      out.effective_[i] = slowest->second;
      out.peak_flops_per_s_[i] = slowest->first;
      for (DType d : fallback_chain(DType(i))) {
        if (auto v = given_peak(peak, d)) {
          out.effective_[i] = d;
          out.peak_flops_per_s_[i] = *v;
          break;
        }
      }
    }
  }
};

double DeviceProfile::Curve::at(double f) const {
  if (f <= flops.front()) return efficiency.front();
  if (f >= flops.back()) return efficiency.back();
  const size_t i = std::upper_bound(flops.begin(), flops.end(), f) - flops.begin();  // flops[i-1] < f < flops[i]
  const double t = std::log(f / flops[i - 1]) / std::log(flops[i] / flops[i - 1]);
  return efficiency[i - 1] + t * (efficiency[i] - efficiency[i - 1]);
}

const DeviceProfile::Curve& DeviceProfile::curve(OpKind kind, DType dtype) const {
  return curves_[static_cast<int>(kind) * kDTypes + static_cast<int>(effective_dtype(dtype))];
}

DeviceProfile DeviceProfile::from_spec(profile::DeviceProfile spec, const std::string& name) {
  return ProfileBuilder::build(std::move(spec), nullptr, name);
}

DType DeviceProfile::effective_dtype(DType dtype) const { return effective_[static_cast<int>(dtype)]; }

double DeviceProfile::peak_flops_per_s(DType dtype) const { return peak_flops_per_s_[static_cast<int>(dtype)]; }

double DeviceProfile::peak_flops_per_s(OpKind kind, DType dtype) const {
  return peak_flops_per_s(is_vector_op(kind) ? DType::kFp32 : dtype);
}

double DeviceProfile::backward_time_factor(OpKind kind) const { return backward_factor_[static_cast<size_t>(kind)]; }
double DeviceProfile::in_situ_time_factor(OpKind kind) const { return in_situ_factor_[static_cast<size_t>(kind)]; }

namespace {

// A factor by bytes (device_profile.proto BytesFactor points): linear in log bytes between points,
// flat beyond the ends; `none` without points.
double factor_by_bytes(const google::protobuf::RepeatedPtrField<profile::BytesFactor>& points, double bytes, double none) {
  if (points.empty()) return none;
  if (!(bytes > points[0].bytes())) return points[0].time_factor();
  for (int i = 1; i < points.size(); ++i) {
    const profile::BytesFactor &a = points[i - 1], &b = points[i];
    if (bytes > b.bytes()) continue;
    const double w = std::log(bytes / a.bytes()) / std::log(b.bytes() / a.bytes());
    return a.time_factor() + w * (b.time_factor() - a.time_factor());
  }
  return points[points.size() - 1].time_factor();
}

}  // namespace

double DeviceProfile::transfer_time_factor(double working_set_bytes) const {
  return factor_by_bytes(spec_.transfer_footprint(), working_set_bytes, 1.0);
}

double DeviceProfile::host_time_factor(double working_set_bytes) const {
  return factor_by_bytes(spec_.host_footprint(), working_set_bytes, 1.0);
}

double DeviceProfile::gather_footprint_factor(double working_set_bytes) const {
  return factor_by_bytes(spec_.gather_footprint(), working_set_bytes, 0.0);
}

double DeviceProfile::scatter_add_factor(double working_set_bytes) const {
  return factor_by_bytes(spec_.scatter_add_footprint(), working_set_bytes, 0.0);
}

double DeviceProfile::gather_time_factor(double bytes) const {
  return factor_by_bytes(spec_.gather_in_situ(), bytes, in_situ_time_factor(OpKind::kEmbedding));
}

double DeviceProfile::by_ranks_here(double alone, double busy, int ranks_here) const {
  const int calibrated = spec_.has_ranks_per_host() ? spec_.ranks_per_host() : 1;
  if (calibrated <= 1 || ranks_here >= calibrated) return busy;
  return alone + (busy - alone) * static_cast<double>(std::max(ranks_here, 1) - 1) / (calibrated - 1);
}

double DeviceProfile::host_share_factor(int ranks_here, bool gathers) const {
  const double alone = gathers && spec_.has_alone_gather_time_factor() ? spec_.alone_gather_time_factor()
                       : spec_.has_alone_time_factor()                  ? spec_.alone_time_factor()
                                                                        : 1.0;
  return by_ranks_here(alone, 1.0, ranks_here);
}

double DeviceProfile::memory_bandwidth_efficiency(OpKind kind) const {
  return kind_memory_efficiency_[static_cast<size_t>(kind)];
}

bool is_op_kind(std::string_view name) {
  return std::find(kOpKindNames.begin(), kOpKindNames.end(), name) != kOpKindNames.end();
}

double DeviceProfile::step_spread_factor(int ranks_here) const {
  const double busy = step_spread_factor();
  return spec_.has_alone_step_spread_factor() ? by_ranks_here(spec_.alone_step_spread_factor(), busy, ranks_here)
                                              : busy;
}

double DeviceProfile::op_kind_factor(const std::string& kind, bool backward) const {
  auto it = op_kind_factor_.find({kind, backward});
  return it == op_kind_factor_.end() ? 1.0 : it->second;
}

double DeviceProfile::memory_time_factor(OpKind kind, double bytes) const {
  const int entry = kind_memory_entry_[static_cast<size_t>(kind)];
  return entry == 0 ? 1.0 : factor_by_bytes(spec_.memory(entry - 1).by_bytes(), bytes, 1.0);
}

double DeviceProfile::compute_efficiency(OpKind kind, DType dtype, double flops) const {
  return curve(kind, dtype).at(flops);
}

DeviceProfile load_device_profile(const std::string& path) {
  profile::DeviceProfile spec;
  ConfigDocument doc = ConfigDocument::parse_file(path, &spec);
  return ProfileBuilder::build(spec, &doc, path);
}

DeviceProfile load_device_profile_text(const std::string& text, const std::string& name) {
  profile::DeviceProfile spec;
  ConfigDocument doc = ConfigDocument::parse_text(text, name, &spec);
  return ProfileBuilder::build(spec, &doc, name);
}

DeviceProfile default_profile(const hw::DeviceType& device) {
  profile::DeviceProfile spec;
  *spec.mutable_device() = device;
  spec.set_source("prior (built-in)");
  return ProfileBuilder::build(std::move(spec), nullptr, fmt::format("device type '{}'", device.name()));
}

namespace {

// The BLAS calls an op makes (each pays the profile's blas_call_s): a GEMM one, a grouped GEMM
// one per group (the executors loop over the experts).
double blas_calls(const Op& op) {
  if (op.kind == OpKind::kGemm) return 1;
  if (op.kind == OpKind::kGroupedGemm) return static_cast<double>(std::max<int64_t>(op.groups, 1));
  return 0;
}

}  // namespace

OpTime op_time(const DeviceProfile& profile, const Op& op, DType dtype) {
  MOESIM_ASSERT(std::isfinite(op.flops) && op.flops >= 0 && std::isfinite(op.bytes) && op.bytes >= 0,
                "op {}: flops {} and bytes {} must be finite and >= 0", op.name, op.flops, op.bytes);
  OpTime t;
  t.dtype = profile.effective_dtype(dtype);
  t.efficiency = profile.compute_efficiency(op.kind, dtype, op.flops);
  t.compute_s = op.flops > 0 ? op.flops / (profile.peak_flops_per_s(op.kind, dtype) * t.efficiency) : 0;
  t.compute_s += op.softmax_elements * profile.softmax_score_s();
  if (op.kind == OpKind::kAttention) t.compute_s += static_cast<double>(op.groups) * profile.attention_group_s();
  const double bytes = op.bytes * dtype_bytes(t.dtype) / dtype_bytes(dtype);
  t.memory_s = bytes / (profile.memory_bandwidth_Bps() * profile.memory_bandwidth_efficiency(op.kind)) *
               profile.memory_time_factor(op.kind, bytes);
  if (op.kind == OpKind::kEmbedding) t.memory_s *= profile.gather_kernel_factor(op.gather_kernel);
  // A lookup's backward at the rank's working set where the lowering gave it: in place of both the
  // in-situ and the backward factor.
  const bool scatter_add = op.kind == OpKind::kEmbedding && op.backward &&
                           op.gather_kernel == GatherKernel::kScatterAdd && op.scatter_add_factor > 0;
  const double in_situ =
      scatter_add                                  ? op.scatter_add_factor
      : op.kind != OpKind::kEmbedding || op.backward ? profile.in_situ_time_factor(op.kind)
      : op.gather_footprint_factor > 0             ? op.gather_footprint_factor
                                                   : profile.gather_time_factor(op.bytes);
  const double f = in_situ * (op.backward && !scatter_add ? profile.backward_time_factor(op.kind) : 1.0) *
                   (op.kind == OpKind::kEmbedding ? op.gather_share_factor : 1.0);
  t.compute_s *= f;
  t.memory_s *= f;
  // Fitted in situ: not scaled again; the per-choice rates at the rank's working set against the
  // calibration step's. The sort's rate comes from a microbenchmark, not that step: unscaled (on
  // the development VM moe-tiny's sorts ran 1.13x its rate in a step, the host factor there 0.89).
  t.host_s = (op.routing_choices * (op.backward ? profile.routing_backward_choice_s() : profile.routing_choice_s()) +
              op.dispatch_choices * profile.dispatch_choice_s()) *
                 op.host_time_factor +
             priority_sort_work(op.priority_sort_tokens) * profile.priority_sort_s();
  t.launch_s = profile.kernel_launch_overhead_s() + blas_calls(op) * profile.blas_call_s();
  t.memory_bound = t.memory_s > t.compute_s;
  t.time_s = t.launch_s + std::max(t.compute_s, t.memory_s) + t.host_s;
  return t;
}

OpsTime ops_time(const DeviceProfile& profile, std::span<const Op> ops, DType dtype) {
  OpsTime total;
  for (const Op& op : ops) {
    const OpTime t = op_time(profile, op, dtype);
    (t.memory_bound ? total.memory_bound_s : total.compute_bound_s) += t.time_s - t.launch_s;
    total.launch_s += t.launch_s;
    total.time_s += t.time_s;
    total.flops += op.flops;
    total.bytes += op.bytes;
    ++total.kernels;
  }
  return total;
}

std::vector<Op> backward_ops(const Op& fwd) {
  if (fwd.fused_backward) return {};
  auto derived = [&](const char* suffix, double m, double n, double k, double flops, double bytes) {
    Op op = fwd;
    op.name = fwd.name + suffix;
    op.m = m;
    op.n = n;
    op.k = k;
    op.flops = flops;
    op.bytes = bytes;
    op.backward = true;
    // The capacity decision is the forward's alone; a top-k's choices stay, for the gradient's host
    // side (routing_backward_choice_s).
    op.dispatch_choices = 0;
    op.priority_sort_tokens = 0;
    return op;
  };
  switch (fwd.kind) {
    case OpKind::kGemm:
    case OpKind::kGroupedGemm:
      return {derived(".dgrad", fwd.m, fwd.k, fwd.n, fwd.flops, fwd.bytes),
              derived(".wgrad", fwd.k, fwd.n, fwd.m, fwd.flops, fwd.bytes)};
    case OpKind::kAttention: return {derived(".bwd", fwd.m, fwd.n, fwd.k, 2.5 * fwd.flops, 2 * fwd.bytes)};
    // A top-k's backward is the router's gradient, which its host term times
    // (routing_backward_choice_s): no FLOPs of its own.
    case OpKind::kNorm:
    case OpKind::kElementwise:
      return {derived(".bwd", fwd.m, fwd.n, fwd.k, fwd.routing_choices > 0 ? 0 : 2 * fwd.flops, 2 * fwd.bytes)};
    // A gather's gradient scatters (adds) the output's gradient rows back into the source's: the
    // written bytes read once, the source's read and written. A lookup's scatter-add reads and
    // writes a table row per token, however few distinct rows they hit: a 64-row table's
    // gradient takes 512 tokens' time for 512 tokens, not 64 rows', where the forward's repeated
    // rows are read from cache.
    case OpKind::kEmbedding: {
      const double written = fwd.bytes - fwd.gather_source_bytes;
      const double touched = fwd.gather_backward_kernel == GatherKernel::kScatterAdd ? written : fwd.gather_source_bytes;
      Op bwd = derived(".bwd", fwd.m, fwd.n, fwd.k, 0, written + 2 * touched);
      bwd.gather_kernel = fwd.gather_backward_kernel;
      return {bwd};
    }
    case OpKind::kOptimizer: return {};
  }
  MOESIM_ASSERT(false, "op {}: unknown kind {}", fwd.name, static_cast<int>(fwd.kind));
  return {};
}

}  // namespace moesim::cost
