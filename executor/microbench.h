// Microbenchmarks for `moesim calibrate`: the executor's own kernels and collectives timed on
// real ranks, each sample described in the cost model's terms (costmodel/ops.h FLOPs and bytes)
// so that costmodel/calibration.h can fit a device profile and link parameters from them.
//
//   exec::Microbenchmarks m = exec::run_microbenchmarks(backend, world.get(), {});
//   cost::fit_efficiency_curve(profile::GEMM, profile::FP32, m.gemm, peak, m.launch_s);
//
// Every rank runs every benchmark at the same time (as ranks train: on a shared CPU they compete
// for cores and memory bandwidth, and the figures say so); each sample is the lower quartile of
// batches of repetitions of one rank's time, the median over rounds, and the slowest rank's.
//   launch_s      the median time of the smallest kernels (a 1x1x1 GEMM, a 1-element GELU)
//   gemm          backend GEMMs over shapes of transformer layers (rows 16..4096 by d 64..512),
//                 each in the three forms a linear layer runs: forward, dX and dW (cost::backward_ops)
//   grouped_gemm  1, 2 and 4 expert GEMMs one after the other (the executor's expert FFN)
//   attention     the attention sublayer as the executor's "attn" op runs it (LayerNorm, QKV
//                 projection, causal core, output projection) forward and backward, whole: the
//                 calibration subtracts the cost model's time for its norm and projections to
//                 get the core's
//   norm          LayerNorm forward (and backward, norm_backward), with the cost model's bytes at fp32
//   activation    GELU forward (and backward, activation_backward; cost::kActivationFlops per output,
//                 backward twice the forward's, as cost::backward_ops counts them)
//   elementwise   residual adds (streaming), with the cost model's bytes
//   gather        row gathers (embedding lookup, MoE dispatch) from and to buffers out of cache, as
//                 a step's gathers find them, with the cost model's bytes
//   gather_kernels  the executor's row gathers (the MoE dispatch's, combine's, an embedding
//                 lookup's and their backwards) on the same tokens and widths, warm
//   optimizer     Adam steps over 4K..1M parameters (FLOPs cost::kAdamFlopsPerParameter each; bytes
//                 the lowering's: parameters, gradients and both moments read and written)
//   capacity      the MoE capacity decision (assign_capacity) over 256..16384 tokens under vanilla
//                 and batch-priority dropping (the latter's sort: cost::fit_priority_sort)
//   all_to_all, all_reduce  (2+ ranks) all-to-all-v of S bytes per rank's send buffer split evenly,
//                 and all-reduces of S bytes, S from 1 KB to 4 MB, after a barrier each, each call
//                 on the next of a ring of buffers beyond the last-level cache (as a step's
//                 exchanges find theirs)
#pragma once

#include "costmodel/calibration.h"
#include "executor/backend.h"
#include "executor/comm.h"

#include <functional>
#include <vector>

namespace moesim::exec {

struct CommSample {
  double bytes = 0;    // nccl-tests' S
  double seconds = 0;  // measured
};

// One shape's row gathers as the executor runs them, top-2 over `tokens` tokens `cols` wide, and
// a `table_rows`-row embedding table: the dispatch's copy (gather_rows, each token's row to its 2
// slots), the combine's weighted sum (gather_sum_rows), a lookup (gather_rows from the table),
// and their backwards: the dispatch's sum of each token's 2 rows (gather_sum_rows, no weights),
// the combine's (gather_sum_rows_backward), the lookup's scatter-add into the table
// (scatter_add_rows). Seconds per call, warm.
struct GatherKernels {
  int64_t tokens = 0, cols = 0, table_rows = 0;
  double copy_s = 0, sum_s = 0, lookup_s = 0, sum_backward_s = 0, combine_backward_s = 0, scatter_add_s = 0;
};

struct AttentionSample {
  int64_t batch = 0, sequence = 0, d_model = 0, heads = 0;
  double forward_s = 0, backward_s = 0;
};

struct Microbenchmarks {
  double launch_s = 0;
  std::vector<cost::KernelSample> gemm, grouped_gemm, norm, activation, elementwise, gather, optimizer;
  std::vector<cost::KernelSample> norm_backward, activation_backward;  // the backward kernels' FLOPs and bytes
  std::vector<AttentionSample> attention;
  std::vector<cost::SortSample> capacity;
  std::vector<GatherKernels> gather_kernels;
  std::vector<CommSample> all_to_all, all_reduce;
  int ranks = 1;
};

struct MicrobenchOptions {
  double min_sample_s = 2e-3;  // each sample repeats its kernel until at least this long
  bool quick = false;          // fewer shapes and sizes (tests)
  int rounds = 1;              // every sample this many times, spread over the run: the median
  // Which families run: the kernels' (launch .. capacity), the collectives' (all_to_all,
  // all_reduce; 2+ ranks). calibrate runs the collectives last, after its in-situ step: the
  // gigabytes they move through MPI warm its state, and a step's exchanges then run faster than
  // in the fresh processes of `run` and `validate`.
  bool kernels = true;
  bool collectives = true;
  std::function<void(double fraction)> progress;  // 0..1, on rank 0
};

// Collective over `world` (null: one rank, no collectives).
Microbenchmarks run_microbenchmarks(Backend& backend, Comm* world, const MicrobenchOptions& options);

}  // namespace moesim::exec
