// Device memory per rank for a (cluster, model, workload, strategy) setup: will it fit?
//
//   cost::MemoryReport r = cost::estimate_memory(setup);
//   r.fits;  r.ranks[r.peak_rank].total_bytes;
//
// Model states (training), bytes per parameter held by a rank, after ZeRO (Rajbhandari et al.
// 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", sec. 5), where N
// is the data-parallel degree the parameter is replicated over (dp for dense parameters, the
// expert data-parallel degree dp/ep for routed experts):
//   mixed precision (BF16/FP16/FP8):  weights 2, gradients 2, Adam/AdamW 12 (fp32 master copy,
//                                     momentum, variance), SGD 8 (master copy, momentum);
//   FP32/TF32:                        weights 4, gradients 4, Adam/AdamW 8, SGD 4.
//   ZeRO-1 divides the optimizer states by N, ZeRO-2 also the gradients, ZeRO-3 also the weights:
//   mixed-precision Adam is 16 bytes/param at stage 0, 4 + 12/N at 1, 2 + 14/N at 2, 16/N at 3.
// Quantised experts (strategy.expert_weight_precision) store expert weights at 1 byte (FP8, INT8)
// or 0.5 (INT4); their gradients and optimizer states are unchanged.
//
// Parameters on a rank: the layers of its pipeline stage (setup.h), dense parameters / tp,
// routed experts / (ep * tp) plus any replicas the placement puts on its EP rank.
//
// Activations (training), per micro-batch of T = micro_batch * sequence tokens (samples for CNNs):
//   sum over the stage's layers of T * a(layer), a = the layer's bytes per token for the
//   workload's recompute mode (model.h), with tensors split over TP ranks divided by tp, full-width
//   ones divided by tp only with sequence parallelism, and routed-expert tensors scaled by the
//   capacity factor (the padded expert buffers hold capacity_factor * k * T token slots; dropless
//   routing holds the busiest EP rank's expected load instead). FULL recompute keeps each layer's
//   input and adds one layer's full activations as the recompute working set.
//   Micro-batches in flight on stage s of pp (Narayanan et al. 2021, Megatron-LM schedules):
//     GPipe: all m;  1F1B: min(m, pp - s);
//     interleaved 1F1B with v chunks: min(m, (2 (pp - s - 1) + (v - 1) pp + 1) / v) stage-equivalents.
// MoE buffers: the dispatch send buffer (T k tokens of d elements) and receive buffer (its
//   capacity-padded share, capacity_factor * k * T), the same again for the combine: one layer's
//   worth live at a time, 2 (1 + capacity_factor) k T d bytes at 16 bits, / tp.
// Communication buffers: strategy.comm_buffer_bytes when given; else a prior of 64 MiB of
//   collective-library buffers per process group of more than one rank (dp, tp, ep, pp), plus two
//   gradient buckets of 40M elements at the gradient precision when dp > 1 (Megatron-LM's default
//   bucket size).
// Inference: weights only, the KV cache (batch per replica * (prompt + generated) tokens *
//   per-layer bytes per token, at kv_cache_precision, / tp except MLA's shared latent), and one
//   layer's activations for the prefill of a micro-batch as the working set.
// Offload: `offload.expert_fraction` of the expert weights lives in host memory (offloaded_bytes),
//   the device keeps the rest plus a prefetch buffer of `prefetch_layers` MoE layers' offloaded
//   part; `offload.optimizer_states` moves the optimizer states to the host.
#pragma once

#include "costmodel/setup.h"

#include <string>
#include <vector>

namespace moesim::cost {

// Bytes per parameter of one kind of model state, for a precision/optimizer/ZeRO stage.
struct StateBytesPerParam {
  double weights = 0, gradients = 0, optimizer = 0;
  double total() const { return weights + gradients + optimizer; }
};
StateBytesPerParam state_bytes_per_param(workload::Precision precision, workload::Optimizer optimizer, int zero_stage,
                                         int data_parallel, bool training);

struct RankMemory {
  int rank = 0;
  int stage = 0;     // pipeline stage
  int ep_rank = 0;   // index within its expert-parallel group
  double params = 0; // parameters held (before ZeRO sharding)
  double weights_bytes = 0;
  double gradients_bytes = 0;
  double optimizer_bytes = 0;
  double activations_bytes = 0;
  double moe_buffers_bytes = 0;
  double comm_buffers_bytes = 0;
  double kv_cache_bytes = 0;
  double offloaded_bytes = 0;  // in host memory, not counted in total_bytes
  double in_flight_micro_batches = 0;
  double total_bytes = 0;      // on the device
  double capacity_bytes = 0;   // the device's memory
  double margin_bytes() const { return capacity_bytes - total_bytes; }
  bool fits() const { return total_bytes <= capacity_bytes; }
};

// What a rank's step works over: weights, gradients, optimizer states, activations, MoE buffers
// and KV cache; not the communication library's buffers, which are reserved, not swept (a
// transfer's speed depends on what else the step touches: DeviceProfile::transfer_time_factor).
inline double working_set_bytes(const RankMemory& m) {
  return m.weights_bytes + m.gradients_bytes + m.optimizer_bytes + m.activations_bytes + m.moe_buffers_bytes +
         m.kv_cache_bytes;
}

struct MemoryReport {
  std::vector<RankMemory> ranks;  // every rank, by rank index
  int peak_rank = 0;              // the first rank with the least margin
  bool fits = true;               // every rank fits
  double host_offload_bytes_per_node = 0;  // the busiest node's offloaded bytes
  double host_memory_bytes_per_node = 0;   // 0 when the cluster does not say
};

MemoryReport estimate_memory(const Setup& setup);

}  // namespace moesim::cost
