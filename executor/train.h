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
// The step runs op by op: the ops of this rank's RankSchedule (TrainOptions::schedule, lowered
// from the same model, strategy and batch by schedule/lowering.h, or without one the lowering's
// order for one micro-batch), each a span carrying the op's id, name, kind and stream ("embed mb0
// fwd", "L1.moe.dispatch_a2a mb0 fwd", "L0.attn mb1 bwd", "grad_bucket0", "optimizer"), so the
// measured trace joins the simulator's op by op. Ops map to the executor's work: "attn" is
// LN + attention + residual, "moe.gate" LN + router + top-k + capacity + the permutation,
// "moe.dispatch_a2a" / "moe.combine_a2a" the all-to-all-v's (backward: the other direction),
// "moe.experts" the expert FFNs, "moe.combine" the weighted sum + residual, "head" final LN +
// logits + loss, a gradient bucket the all-reduce of its layers' gradients (Op.grad_layers),
// "optimizer" the 1/dp scaling and the update. Schedules with recompute, ZeRO >= 1, offload,
// overlap chunks, TP or PP, or several micro-batches in flight (GPipe) are refused. The
// all-to-alls carry the bytes this rank's tokens send to other EP ranks (x the group size,
// nccl-tests' all-to-all size) and algBw/busBw. Spans are timed on the steady clock after a
// device synchronize at both ends (on a GPU they measure the device's work, not the launches).
// Per-layer expert loads (before drops, summed over micro-batches; layer = the cost model's layer
// index) are recorded every step, and each rank's peak memory at the end (CPU ranks: getrusage's
// peak RSS; GPU ranks: the most device memory held in tensors).
//
// Devices: everything runs on `backend` (tensors on its device); `world` must be an engine over
// that device's buffers (MPI for the CPU, NCCL for CUDA: gradients are all-reduced in place on the
// device), else exec::Error.
#pragma once

#include "costmodel/model.pb.h"
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/moe_layer.h"
#include "schedule/schedule.pb.h"
#include "traces/trace.pb.h"

#include <memory>

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
  // The step to run, op by op (schedule/lowering.h of the same model, strategy and batch, every
  // rank lowered: not folded): each rank runs its RankSchedule's ops in order and its spans carry
  // their ids. Null: the lowering's op order for this model with one micro-batch
  // (default_rank_schedule).
  std::shared_ptr<const schedule::Schedule> schedule;
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

// The ops one rank runs without a schedule: what the lowering gives a DP x EP training step of
// `model` with one micro-batch and one gradient bucket (tested against schedule::lower).
schedule::RankSchedule default_rank_schedule(const model::Model& model, int rank, int ranks, int ep);

// Every problem with the options, model and schedule for `ranks` ranks, one message each (empty: fine).
std::vector<std::string> validate(const TrainOptions& options, int ranks);

// Collective over `world` (null: one rank, no MPI). Throws exec::Error listing every problem of
// validate() before computing anything.
TrainResult train(const TrainOptions& options, Comm* world, Backend& backend);

// The synthetic task's tokens for sequences [first, first + count) of `step`: ids and next-token
// targets, [count * sequence] each.
void synthetic_batch(uint64_t seed, int step, int vocab, int sequence, int64_t first, int64_t count,
                     std::vector<int32_t>& ids, std::vector<int32_t>& targets);

}  // namespace moesim::exec
