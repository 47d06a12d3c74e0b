// The unit of compute cost: one kernel's worth of work, described by its shape so that a device
// profile can say how efficiently a device runs it. The model zoo (model.h) breaks every layer
// into Ops; compute.h times them; the simulator's lowering schedules them.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

namespace moesim::cost {

enum class OpKind {
  kGemm,         // C[m,n] = A[m,k] B[k,n]
  kGroupedGemm,  // `groups` GEMMs of (at most) this shape: experts of one MoE layer
  kAttention,    // scores + softmax + weighted values (fused, flash-style): m = query tokens per
                 // head, n = key tokens, k = head dim, groups = heads x sequences
  kNorm,         // LayerNorm / RMSNorm: memory bound
  kElementwise,  // activation functions, residual adds, softmax of the router, top-k
  kEmbedding,    // row gathers: an embedding table lookup, an MoE layer's dispatch (the rows in
                 // send order) and combine (the k weighted rows of a token): memory bound, rows
                 // at scattered addresses
  kOptimizer,    // the optimizer's update over a rank's parameters (Adam: moments, sqrt, divide)
};

enum class DType { kFp32, kTf32, kBf16, kFp16, kFp8 };

// What a row gather (kEmbedding) does with its rows, which sets its time per cost-model byte
// against a copying gather's (the profile's gather_kernel factors; the cost model's bytes count
// each distinct source row once, but a scatter-add's a row per token), in the order of
// device_profile.proto's GatherKernel (whose values are these + 1):
enum class GatherKernel {
  kCopy,             // rows copied to their slots (an MoE dispatch): the reference, 1
  kSum,              // rows summed into each output row (an MoE combine)
  kLookup,           // rows of a small table copied to many outputs (an embedding lookup)
  kSumBackward,      // a dispatch's backward: each token's k gradient rows summed into its
  kCombineBackward,  // the combine's backward: gradient rows scaled to their slots, each dotted
  kScatterAdd,       // output rows added into a table's (a lookup's backward)
};
inline constexpr int kGatherKernels = 6;

inline double dtype_bytes(DType t) {
  switch (t) {
    case DType::kFp32:
    case DType::kTf32: return 4;
    case DType::kBf16:
    case DType::kFp16: return 2;
    case DType::kFp8: return 1;
  }
  return 4;
}

// One forward kernel. FLOPs and bytes are totals for the kernel (all groups).
struct Op {
  std::string name;  // "attn.qkv", "moe.experts.up"
  OpKind kind = OpKind::kGemm;
  double m = 0, n = 0, k = 0;  // GEMM/attention view (see OpKind); 0 for memory-bound ops
  int64_t groups = 1;
  double flops = 0;  // 2*m*n*k*groups for GEMMs
  double bytes = 0;  // memory traffic: inputs read + outputs written + weights read
  bool backward = false;  // a backward kernel (backward_ops): the profile's backward factor applies
  bool fused_backward = false;  // its gradient is computed with it (a loss): no backward kernels
  // Attention: the score elements its softmax normalises (groups x m x n), timed by the profile's
  // softmax_score_s on top of the FLOPs (0 elsewhere).
  double softmax_elements = 0;
  // An MoE gate's top-k: its token-choices (tokens x top-k), timed by the profile's
  // routing_choice_s on top, its backward's by routing_backward_choice_s (0 elsewhere).
  double routing_choices = 0;
  // An MoE dispatch: the token-choices its capacity decision and send layout go over (the EP
  // group's, once lowered), timed by the profile's dispatch_choice_s on top (0 elsewhere).
  double dispatch_choices = 0;
  // An MoE dispatch: the tokens its capacity decision goes over (one rank's), and those it sorts by
  // their top gate probability under batch-priority dropping: the EP group's, set by on_ep_rank for
  // that policy alone (0 in the model's ops), timed by the profile's priority_sort_s per
  // priority_sort_work (n log2 n) on top.
  double dispatch_tokens = 0;
  double priority_sort_tokens = 0;
  // A row gather (kEmbedding): the distinct source rows' bytes, part of `bytes` (the rest is what
  // it writes). Its backward reads the written rows' gradient and adds into the source's: the
  // written bytes once and the source's twice, a scatter-add's a row per written row
  // (backward_ops).
  double gather_source_bytes = 0;
  // A row gather's kernel, and its backward's (backward_ops gives the backward op the latter).
  GatherKernel gather_kernel = GatherKernel::kCopy;
  GatherKernel gather_backward_kernel = GatherKernel::kScatterAdd;
  // The host terms above fitted in a step (routing, dispatch; not the sort, a microbenchmark's
  // rate) take this many times the profile's rates: the running rank's working set
  // (DeviceProfile::host_time_factor), set by the lowering.
  double host_time_factor = 1;
  // A row gather's kernels take this many times their time on top of the op's own host-share
  // factor (the lowering's: a rank alone on its host, DeviceProfile::host_share_factor for gathers
  // over the one for every op). Backward ops keep it (backward_ops).
  double gather_share_factor = 1;
  // A forward row gather's in-situ factor at the running rank's working set
  // (DeviceProfile::gather_footprint_factor), set by the lowering; 0: by the op's bytes
  // (DeviceProfile::gather_time_factor).
  double gather_footprint_factor = 0;
  // A lookup's backward (a kScatterAdd backward gather) at the running rank's working set
  // (DeviceProfile::scatter_add_factor), set by the lowering on the forward op; 0: the backward
  // gathers' factor.
  double scatter_add_factor = 0;
};

// A row gather (OpKind::kEmbedding) writing `written` bytes from a source whose distinct rows are
// `source` bytes: its traffic counts each source row once however often it is gathered (a
// 64-entry vocabulary read for 256 tokens, a token's row sent to its k experts).
inline Op gather_op(std::string name, double source, double written, GatherKernel kernel,
                    GatherKernel backward_kernel) {
  Op op;
  op.name = std::move(name);
  op.kind = OpKind::kEmbedding;
  op.bytes = source + written;
  op.gather_source_bytes = source;
  op.gather_kernel = kernel;
  op.gather_backward_kernel = backward_kernel;
  return op;
}

// A share `f` of `op`'s work (a tensor-parallel split, fewer tokens): its FLOPs, traffic and
// softmax elements.
inline void scale_work(Op& op, double f) {
  op.flops *= f;
  op.bytes *= f;
  op.gather_source_bytes *= f;
  op.softmax_elements *= f;
}

// `op` as one rank of an expert-parallel group of `ep` ranks runs it: a dispatch decides the whole
// group's routing (every rank derives the exchange pattern), so its choices are the group's, and
// under batch-priority dropping it sorts the group's tokens (other policies sort none).
inline Op on_ep_rank(Op op, int ep, bool batch_priority) {
  op.dispatch_choices *= ep;
  op.priority_sort_tokens = batch_priority ? op.dispatch_tokens * ep : 0;
  return op;
}

// A sort's comparisons, n log2 n, for n sorted tokens (0 below 2).
inline double priority_sort_work(double n) { return n >= 2 ? n * std::log2(n) : 0; }

}  // namespace moesim::cost
