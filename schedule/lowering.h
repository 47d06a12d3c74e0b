// The lowering: (cluster, model, workload, strategy) -> Schedule (schedule/schedule.proto), the
// per-rank ordered ops that the simulator times and the executor runs.
//
//   cost::Setup s = cost::load_setup(cluster, model, workload, strategy);
//   schedule::Schedule sch = schedule::lower(s, {.seed = 7});
//
// ## Ranks and groups
// Rank r = t + tp (d + dp p) (costmodel/strategy.proto): TP groups share (p, d), data-parallel
// groups share (p, t), an expert-parallel group is ep consecutive data-parallel indices
// [g ep, (g+1) ep) of one (p, t), and an expert's data-parallel group is the dp/ep ranks with the
// same d mod ep.
//
// ## Ops of one training step, per rank
// Micro-steps in pipeline order: GPipe (every forward, then every backward), 1F1B (warm-up of
// pp - p - 1 forwards, then one forward one backward, then the remaining backwards), interleaved
// 1F1B with v chunks (Megatron-LM's order: forward micro-step k runs chunk (k / pp) mod v of
// micro-batch (k / (pp v)) pp + k mod pp, backward chunks in reverse; warm-up
// (pp - p - 1) 2 + (v - 1) pp). Chunk c of pp v holds the c-th contiguous slice of the layers
// (costmodel/setup.h's rule) and runs on stage c mod pp.
// A forward micro-step: RECV the activations (not on the first chunk), the chunk's layers, SEND
// them on (not on the last chunk). Per layer (op ids "<layer>.<part>[.c<i>] mb<m> <phase>"):
//   transformer, dense FFN:  attn, [tp_allreduce], mlp, [tp_allreduce]
//   transformer, MoE:        attn, [tp_allreduce], moe.gate (router, top-k, permutation),
//                            [moe.shared], then per overlap chunk i: moe.dispatch_a2a.c<i>,
//                            moe.experts.c<i>, moe.combine_a2a.c<i> (all dispatches are queued
//                            first on the comm stream so chunk i+1's dispatch overlaps chunk i's
//                            experts), moe.combine, [tp_allreduce]
//   other layers (embedding, head, ResNet blocks ...): one op named after the layer.
// With sequence parallelism the TP all-reduces are a reduce-scatter and an all-gather.
// A backward micro-step runs the same in reverse ("bwd"; the combine's backward sends along the
// dispatch direction), preceded per layer by "recompute": SELECTIVE re-runs the layer's norms,
// attention core, activation functions and expert down projections; FULL re-runs its whole
// forward, all-to-alls included.
// Data-parallel gradients: as the last micro-batch's backward finishes each layer, its gradients
// join a bucket (bucket_bytes); a full bucket is all-reduced (ZeRO 0) or reduce-scattered
// (ZeRO >= 1) on the data-parallel stream, overlapping the rest of the backward; routed experts'
// gradients go to the expert data-parallel group instead. ZeRO-3 also all-gathers each layer's
// weights before its forward and backward. Then "optimizer", then (ZeRO 1, 2) the weights'
// all-gather per bucket.
// Expert offload: each MoE layer's offloaded expert weights are copied in over PCIe on the copy
// stream ("<layer>.moe.prefetch"), at most prefetch_layers ahead of the layer that uses them.
//
// ## Inference
// Prefill of the batch (forward micro-steps through the pipeline), then one decode iteration per
// generated token ("decode<i>"), attention reading the KV cache of its context.
//
// ## Times and bytes
// Compute ops take costmodel/compute.h's time for their kernels on the rank's device profile:
// GEMMs and attention split over tp, norms over tp only with sequence parallelism; backward
// kernels from cost::backward_ops. Routed experts: per MoE layer and micro-batch, each EP group's
// tokens (micro_batch x sequence x ep) are routed by the routing model (cost::routing_loads with
// the workload's distribution, capacity factor and drop policy), experts are placed
// (cost::place_experts) and each EP rank's expert kernels are sized for the tokens it keeps, so
// hot experts make stragglers. The dispatch all-to-all-v sends rank j's kept tokens from every
// source in equal shares (hidden x 2 bytes per token, / tp); the combine is its transpose.
// Memory: static bytes = costmodel/memory.h's estimate without activations; each forward layer
// allocates its stored activations for the micro-batch (as memory.h counts them) and its
// backward frees them; FULL recompute allocates one layer's full activations while it runs.
//
// ## Folding
// With dp > 1 and fold (kAuto: more than kFoldAboveDevices devices), only data-parallel index 0
// of each (stage, tp rank) is simulated, standing for the dp replicas. Its expert kernels are
// sized for the busiest EP rank of its group in each micro-batch (the straggler every rank of
// the group waits for at the combine), and its collectives still name every member rank.
#pragma once

#include "costmodel/compute.h"
#include "costmodel/setup.h"
#include "schedule/schedule.pb.h"

#include <cstdint>

namespace moesim::schedule {

inline constexpr int kFoldAboveDevices = 256;
inline constexpr int kDefaultRoutingSamples = 64;

enum class Fold { kAuto, kNever, kDataParallel };

struct LoweringOptions {
  uint64_t seed = 1;  // the run's seed, mixed with the workload's routing seed for routing draws
  Fold fold = Fold::kAuto;
  // Routing draws in the pool (one pool per expert-count/top-k/token-count shape); each (MoE layer,
  // micro-batch, EP group) picks one by a seeded hash, so layers and groups do not share
  // stragglers. 0 = a fresh draw for every (layer, micro-batch, EP group). Each draw keeps its own
  // straggler.
  int routing_samples = kDefaultRoutingSamples;
  // The profile of every device; null: each device type's priors (cost::default_profile).
  const cost::DeviceProfile* profile = nullptr;
  // Gradient bucket size; 0 = Megatron-LM's 40M elements at the gradient precision.
  double bucket_bytes = 0;
};

// `setup` must come from cost::load_setup (validated).
Schedule lower(const cost::Setup& setup, const LoweringOptions& options = {});

// The data type a workload's GEMMs run in: FP8 for FP8 training (DeepSeek-V3 style), else the
// precision's own type.
cost::DType compute_dtype(const workload::Workload& workload);

}  // namespace moesim::schedule
