// Compute cost: how long one kernel (an Op, costmodel/ops.h) takes on a device, on a roofline
// whose efficiencies come from a device profile (costmodel/device_profile.proto).
//
//   cost::DeviceProfile p = cost::load_device_profile("configs/devices/h100-sxm5.textproto");
//   cost::OpTime t = cost::op_time(p, op, cost::DType::kBf16);
//
// The model, per kernel:
//
//   time_s    = launch_s + max(compute_s, memory_s) x in_situ(kind) [x backward(kind) for
//               backward kernels]   (the profile's per-kind factors, default 1; a forward row
//               gather's in_situ by its bytes where the profile has gather_in_situ points)
//               [+ host_s: routing_choices x routing_choice_s for an MoE gate's top-k
//               (routing_backward_choice_s for its backward), dispatch_choices x
//               dispatch_choice_s for its dispatch, + n log2 n x priority_sort_s for the n
//               tokens a batch-priority dispatch sorts; all x Op::host_time_factor]
//   launch_s  = kernel launch overhead (profile, else device type, else 4 us)
//               [+ blas_call_s per BLAS call: a GEMM's one, a grouped GEMM's one per group]
//   compute_s = flops / (peak_flops(kind, dtype') * eff_compute(kind, dtype', flops))
//   memory_s  = bytes * width(dtype') / width(dtype) / (memory_bandwidth_Bps * eff_memory)
//               [x gather_kernel(kernel) for a row gather: its kernel's time per byte
//               against a copying gather's, default 1]
//
// dtype' is the data type the op really runs in on this device (fallbacks below); width() is
// dtype_bytes(). eff_compute is the profile's curve for (kind, dtype'): linear in log(flops)
// between points, clamped at the ends,
//
//   eff(f) = e[i] + (e[i+1] - e[i]) * ln(f / f[i]) / ln(f[i+1] / f[i])   for f[i] <= f <= f[i+1],
//
// so at the geometric midpoint sqrt(f[i] f[i+1]) it is the mean of e[i] and e[i+1]. Validation
// keeps e[i+1] <= e[i] (1 + ln(f[i+1]/f[i])), which makes compute_s non-decreasing in flops: a
// bigger kernel never runs faster. An op with 0 flops has compute_s = 0.
//
// peak_flops(kind, dtype'):
//   - GEMM, grouped GEMM, attention: the device's dense peak for dtype' (tensor cores);
//   - norm, elementwise, embedding: the non-tensor fp32 peak whatever the dtype (vector units,
//     math in fp32 registers); these are memory-bound in practice.
//
// Data-type fallbacks (dtype -> dtype'), for a device without a peak for the requested type:
//   fp8  -> bf16 -> fp16 -> fp32   the op runs in 16 bits: its tensors are twice as wide, so the
//                                  bytes term doubles (fp8 on an A100 is a bf16 op);
//   bf16 -> fp16 -> fp32, fp16 -> bf16 -> fp32   (bf16 and fp16 share tensor-core rates);
//   tf32 -> fp32;
//   fp32 -> (nothing: if the device gives no fp32 peak, the slowest peak it does give is used).
// The efficiency curve is that of dtype', as the kernel that runs is a dtype' kernel.
//
// Efficiency curves: the profile's curve for (kind, dtype') if it has one, else the built-in
// prior for that pair (compute.cc; roughly an H100 with cuBLAS / FlashAttention-class kernels:
// large bf16 GEMMs ~0.75 of peak, attention ~0.5, vector ops a flat 0.5 of the fp32 peak).
// Memory efficiency defaults to 0.85 of datasheet HBM bandwidth; a profile may give a kernel kind
// its own (`memory { op: NORM efficiency: 0.4 }`), used in memory_s for that kind.
#pragma once

#include "costmodel/device_profile.pb.h"
#include "costmodel/ops.h"
#include "topologies/hardware.pb.h"

#include <array>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moesim::cost {

inline constexpr double kDefaultMemoryBandwidthEfficiency = 0.85;
inline constexpr double kDefaultKernelLaunchOverhead_s = 4e-6;

// A gather kernel as device_profile.proto names it (its GatherKernel values are cost's + 1), and back.
inline profile::GatherKernel to_proto(GatherKernel k) { return static_cast<profile::GatherKernel>(static_cast<int>(k) + 1); }
inline GatherKernel from_proto(profile::GatherKernel k) { return static_cast<GatherKernel>(static_cast<int>(k) - 1); }

// A validated device profile: the device (preset resolved) and one efficiency curve per
// (op kind, dtype), the profile's own over the built-in priors. Cheap to copy.
class DeviceProfile {
 public:
  // Validates a message built in code (diagnostics name `name` and field paths; no lines) and
  // throws ConfigError with every problem. Files go through load_device_profile().
  static DeviceProfile from_spec(profile::DeviceProfile spec, const std::string& name = "<device profile>");

  // The profile with presets resolved: spec().device() is the full device type.
  const profile::DeviceProfile& spec() const { return spec_; }
  const hw::DeviceType& device() const { return spec_.device(); }
  const std::string& name() const { return spec_.device().name(); }
  // "prior", "calibrated on ..."; "unspecified" when the profile does not say.
  const std::string& source() const { return source_; }

  // The data type an op asked to run in `dtype` really runs in (fallbacks above).
  DType effective_dtype(DType dtype) const;
  // Dense peak FLOP/s for `dtype` after fallback (tensor-core ops).
  double peak_flops_per_s(DType dtype) const;
  // Peak FLOP/s for an op of `kind`: the vector (fp32) peak for norm/elementwise/embedding.
  double peak_flops_per_s(OpKind kind, DType dtype) const;
  // eff_compute(kind, dtype', flops) in (0, 1], dtype' = effective_dtype(dtype).
  double compute_efficiency(OpKind kind, DType dtype, double flops) const;
  double memory_bandwidth_Bps() const { return spec_.device().memory_bandwidth_bps(); }
  double memory_bandwidth_efficiency() const { return memory_efficiency_; }
  // The kind's own memory efficiency (profile `memory`), else the one above.
  double memory_bandwidth_efficiency(OpKind kind) const;
  // A kernel of that kind and `bytes`: its memory time over what the efficiency gives (profile
  // `memory` by_bytes, linear in log bytes; 1 without points).
  double memory_time_factor(OpKind kind, double bytes) const;
  // Backward kernels of this kind take this many times their roofline time (profile `backward`; 1).
  double backward_time_factor(OpKind kind) const;
  // Every kernel of this kind takes this many times its roofline time (profile `in_situ`; 1).
  double in_situ_time_factor(OpKind kind) const;
  // A collective's transfer time factor for ranks holding `working_set_bytes` each
  // (cost::working_set_bytes; profile transfer_footprint, linear in log bytes; 1 without points).
  double transfer_time_factor(double working_set_bytes) const;
  // The routing's host terms' time factor for a rank holding `working_set_bytes` (profile
  // host_footprint, linear in log bytes; 1 without points).
  double host_time_factor(double working_set_bytes) const;
  // A forward row gather's (EMBEDDING kernel's) in-situ factor by its bytes (profile gather_in_situ,
  // linear in log bytes; without points in_situ_time_factor(kEmbedding), which backward gathers
  // take).
  double gather_time_factor(double bytes) const;
  // The same by the running rank's working set (profile gather_footprint, linear in log bytes,
  // flat beyond the ends), which replaces the factor by bytes where given; 0 without points.
  double gather_footprint_factor(double working_set_bytes) const;
  // A lookup's backward (scatter-add) in-situ factor by the running rank's working set (profile
  // scatter_add_footprint, as gather_footprint), in place of the backward gathers'; 0 without points.
  double scatter_add_factor(double working_set_bytes) const;
  double kernel_launch_overhead_s() const { return launch_overhead_s_; }
  // Per attention score element (profile softmax_score_s; 0).
  double softmax_score_s() const { return spec_.softmax_score_s(); }
  // Per attention group, sequence x head (profile attention_group_s; 0).
  double attention_group_s() const { return spec_.attention_group_s(); }
  // Per BLAS call of a GEMM (a grouped GEMM's per group) beyond its kernel launch (blas_call_s; 0).
  double blas_call_s() const { return spec_.blas_call_s(); }
  // A scheduled compute op's time factor by its kind as validation names it ("gate") and direction
  // (profile op_kind; 1).
  double op_kind_factor(const std::string& kind, bool backward) const;
  // A step over the time its ops compose to (profile step_spread_factor; 1).
  double step_spread_factor() const { return spec_.has_step_spread_factor() ? spec_.step_spread_factor() : 1.0; }
  // For a rank sharing its host with `ranks_here` ranks (itself included): the one above at the
  // calibrated ranks_per_host or more, alone_step_spread_factor at 1, linear between (profile).
  double step_spread_factor(int ranks_here) const;
  // A compute op's time factor for a rank sharing its host with `ranks_here` ranks (itself
  // included) of a plan: 1 at the calibrated ranks_per_host or more, alone_time_factor at 1,
  // linear between (profile ranks_per_host, alone_time_factor; 1). A row gather's with `gathers`
  // (alone_gather_time_factor at 1, where given).
  double host_share_factor(int ranks_here, bool gathers = false) const;
  // Per token-choice of an MoE gate's routing (profile routing_choice_s; 0).
  double routing_choice_s() const { return spec_.routing_choice_s(); }
  // Per EP-group token-choice of an MoE dispatch's capacity decision (dispatch_choice_s; 0).
  double dispatch_choice_s() const { return spec_.dispatch_choice_s(); }
  // Per token x log2(tokens) of a batch-priority dispatch's sort (priority_sort_s; 0).
  double priority_sort_s() const { return spec_.priority_sort_s(); }
  // A row gather's kernel against a copying gather, per cost-model byte (gather_kernel; 1).
  double gather_kernel_factor(GatherKernel k) const { return gather_kernel_factor_[static_cast<size_t>(k)]; }
  // Per token-choice of an MoE gate's backward (routing_backward_choice_s; 0).
  double routing_backward_choice_s() const { return spec_.routing_backward_choice_s(); }
  // Per scheduled compute op, around its kernels (profile op_overhead_s; 0).
  double op_overhead_s() const { return spec_.op_overhead_s(); }

 private:
  friend class ProfileBuilder;  // compute.cc: validation and curve resolution
  struct Curve {
    std::vector<double> flops, efficiency;  // increasing flops, at least one point
    double at(double f) const;
  };
  static constexpr int kKinds = 7, kDTypes = 5;

  DeviceProfile() = default;
  const Curve& curve(OpKind kind, DType dtype) const;
  // `busy` for a rank sharing its host with the calibrated ranks_per_host or more, `alone` for a
  // rank alone on it, linear between.
  double by_ranks_here(double alone, double busy, int ranks_here) const;

  profile::DeviceProfile spec_;
  std::string source_;
  std::array<Curve, kKinds * kDTypes> curves_;
  std::array<DType, kDTypes> effective_{};  // by requested DType
  std::array<double, kDTypes> peak_flops_per_s_{};  // by requested DType, after fallback
  double memory_efficiency_ = kDefaultMemoryBandwidthEfficiency;
  std::array<double, kKinds> kind_memory_efficiency_{};  // by kind; filled when built
  std::array<int, kKinds> kind_memory_entry_{};          // by kind: its spec_.memory index + 1; 0: none
  std::map<std::pair<std::string, bool>, double> op_kind_factor_;  // (op kind, backward) -> factor
  std::array<double, kKinds> backward_factor_{};         // by kind; filled when built
  std::array<double, kKinds> in_situ_factor_{};          // by kind; filled when built
  std::array<double, kGatherKernels> gather_kernel_factor_{};  // by GatherKernel; filled when built
  double launch_overhead_s_ = kDefaultKernelLaunchOverhead_s;
};

// Whether `name` is a kind of scheduled compute op a profile's op_kind may name (validation's
// labels: embed, attention, mlp, gate, permute, shared, experts, combine, head, optimizer).
bool is_op_kind(std::string_view name);

// Parses and validates a profile file. Throws ConfigError listing every problem, each as
// FILE:LINE: field.path: message: a curve point's efficiency outside (0, 1] or flops not
// increasing (or rising too steeply, see above), a curve without points or without op/dtype, two
// curves for one pair, an unknown device preset (the message lists the registered ones), an
// inline device without name, peaks or memory bandwidth. Curves left out use the priors.
DeviceProfile load_device_profile(const std::string& path);
DeviceProfile load_device_profile_text(const std::string& text, const std::string& name);

// The priors for a device when no profile is given: built-in curves, memory efficiency 0.85,
// the device's own launch overhead (else 4 us). Throws ConfigError if the device type lacks
// peaks or memory bandwidth.
DeviceProfile default_profile(const hw::DeviceType& device);

struct OpTime {
  double time_s = 0;     // launch_s + max(compute_s, memory_s) + host_s
  double compute_s = 0;  // flops / (peak * efficiency) (+ attention's scores and groups), x factors
  double memory_s = 0;   // bytes / (bandwidth * memory efficiency)
  double launch_s = 0;
  double host_s = 0;     // an MoE layer's routing on the host: after the kernel, not beside it
  double efficiency = 0;      // eff_compute applied to the compute term
  bool memory_bound = false;  // memory_s > compute_s
  DType dtype = DType::kFp32; // the data type the op ran in (after fallback)
};

// Times one kernel. `op` must have non-negative flops and bytes (asserted).
OpTime op_time(const DeviceProfile& profile, const Op& op, DType dtype);

// Total over a sequence of kernels run one after another on one stream.
struct OpsTime {
  double time_s = 0;           // compute_bound_s + memory_bound_s + launch_s
  double compute_bound_s = 0;  // kernel time (launch excluded) of compute-bound kernels
  double memory_bound_s = 0;   // kernel time (launch excluded) of memory-bound kernels
  double launch_s = 0;
  double flops = 0;
  double bytes = 0;  // as given in the ops (before any dtype fallback)
  int64_t kernels = 0;
};
OpsTime ops_time(const DeviceProfile& profile, std::span<const Op> ops, DType dtype);

// The kernels of an op's backward pass (same dtype, names suffixed); none for an op whose
// gradient is computed with it (Op::fused_backward, the loss):
//   GEMM C[m,n] = A[m,k] B[k,n]  -> ".dgrad" dA = dC B^T: GEMM (m, n'=k, k'=n)
//                                   ".wgrad" dB = A^T dC: GEMM (m'=k, n, k'=m)
//     each with the forward's FLOPs and bytes (the same three matrices, roles rotated);
//   grouped GEMM                 -> the same per group, `groups` kept;
//   attention                    -> ".bwd": one fused kernel, same shape, 2.5x the forward's FLOPs
//     (flash-style: S = QK^T is recomputed; with dV, dP, dQ, dK that makes 5 matmuls to the
//     forward's 2) and 2x its bytes (reads Q, K, V, O, dO; writes dQ, dK, dV);
//   norm, elementwise            -> ".bwd": 2x the forward's FLOPs and bytes (reads the saved
//     input and dY, writes dX, plus the weight-gradient reduction for norms);
//   embedding                    -> ".bwd": scatter-add of dY into the touched table rows, 2x the
//     forward's bytes (read dY, read-modify-write the gradient rows, atomics), no FLOPs counted.
std::vector<Op> backward_ops(const Op& fwd);

}  // namespace moesim::cost
