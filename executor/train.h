// Training a small MoE transformer for real on CPU or GPU ranks: the model of a configs/models file
// (costmodel/model.proto, the same file the cost model and simulator read), data parallel over
// the ranks with its experts spread over an expert-parallel group, on a synthetic task.
//
//   exec::TrainOptions o{.model = cost::load_model("configs/models/moe-tiny.textproto"), .steps = 50};
//   exec::TrainResult r = exec::train(o, world.get(), *backend);   // collective over `world`
//   r.steps[49].loss < r.steps[0].loss
//
// The model: token + learned position embeddings; per layer x += attn(LN(x)), x += ffn(LN(x)) where
// ffn is the MoE layer (executor/moe_layer.h) on MoE layers and a GELU MLP elsewhere; a final LN and
// an untied output projection; softmax cross-entropy on next tokens. Supported: decoder-only
// transformers with multi-head attention (kv heads = heads), GELU FFNs and experts; anything else
// is refused with a clear exec::Error before any rank computes.
//
// The synthetic task: sequence s of step n starts at a token drawn from (seed, n, s) and continues
// by t -> (3 t + 1) mod vocab, so the next token is a fixed function of the current one: a model
// that learns it drives the loss towards 0 from ln(vocab). Sequence s of a step goes to data-parallel
// rank s / (batch / dp), so any split of the ranks sees the same global batch.
//
// Parallelism: dp = ranks; ep divides both the ranks and the experts (default: as many ranks as
// divide the experts, up to all of them: EP = ranks for moe-tiny on 2 or 4 ranks). Ranks with the
// same index within their EP group form an expert data-parallel group. Each rank's loss is the mean
// over its tokens; gradients are summed over the ranks sharing a parameter (dense and router
// weights: all ranks; experts: their expert data-parallel group) and divided by dp: the gradient of
// the global mean loss.
//
// Tracing: every op is a span with the Schedule-style op id "L<i>.<part> <pass>" (for example
// "L1.moe.dispatch fwd", "L0.attn bwd", "grad_all_reduce", "optimizer"), on the compute or comm
// stream; the MoE layer's gate/dispatch/experts/combine parts are laid out one after the other
// inside the layer's span from its measured part times, the dispatch and combine with the bytes
// this rank's tokens send to other EP ranks (x the group size, nccl-tests' all-to-all size) and
// algBw/busBw. Spans are timed on the steady clock after a device synchronize at both ends (on a
// GPU they measure the device's work, not the launches). Per-layer expert loads (before drops) are
// recorded every step, and each rank's peak memory at the end (CPU ranks: getrusage's peak RSS;
// GPU ranks: the most device memory held in tensors).
//
// Devices: everything runs on `backend` (tensors on its device); `world` must be an engine over
// that device's buffers (MPI for the CPU, NCCL for CUDA: gradients are all-reduced in place on the
// device), else exec::Error.
#pragma once

#include "costmodel/model.pb.h"
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/moe_layer.h"
#include "traces/trace.pb.h"

#include <cstdint>
#include <vector>

namespace moesim::exec {

enum class OptimizerKind { kAdam, kSgd };

struct TrainOptions {
  model::Model model;
  int steps = 20;
  int64_t batch = 8;   // sequences per step over all ranks (a multiple of dp)
  int sequence = 0;    // tokens per sequence; 0: the model's max_sequence
  int ep = 0;          // expert-parallel group size; 0: the default above
  double capacity_factor = 1.25;
  RoutingPolicy routing = RoutingPolicy::kVanilla;
  OptimizerKind optimizer = OptimizerKind::kAdam;
  float lr = 3e-3f;
  uint64_t seed = 1;
};

struct StepRecord {
  int step = 0;
  double loss = 0;         // mean over the global batch
  double step_time_s = 0;  // wall clock of the step on rank 0 (forward, backward, sync, update)
};

struct TrainResult {
  int ranks = 1, dp = 1, ep = 1;
  int64_t parameters = 0;  // of the whole model (every expert once)
  std::vector<StepRecord> steps;
  trace::Trace trace;      // this rank's spans (merge ranks with traces/recorder.h)
};

// Every problem with the options and model for `ranks` ranks, one message each (empty: fine).
std::vector<std::string> validate(const TrainOptions& options, int ranks);

// Collective over `world` (null: one rank, no MPI). Throws exec::Error listing every problem of
// validate() before computing anything.
TrainResult train(const TrainOptions& options, Comm* world, Backend& backend);

// The synthetic task's tokens for sequences [first, first + count) of `step`: ids and next-token
// targets, [count * sequence] each.
void synthetic_batch(uint64_t seed, int step, int vocab, int sequence, int64_t first, int64_t count,
                     std::vector<int32_t>& ids, std::vector<int32_t>& targets);

}  // namespace moesim::exec
