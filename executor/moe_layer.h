// The mixture-of-experts layer of the executor: gate, capacity, expert-parallel dispatch, a grouped
// expert FFN, combine and the load-balancing losses, with hand-written forward and backward (the
// llm.c way). fp32, row-major, on the back end's device (CPU or CUDA). Math and policies follow ../shared/SEEDS.md ("MoE layer",
// "DAMEX"); the capacity rule and fill orders are the cost model's (costmodel/routing_model.h), so
// a simulated and an executed layer drop the same assignments.
//
//   exec::MoeLayer moe(config, *backend, ep_comm.get());   // ep_comm may be null: EP = 1, no MPI
//   exec::Tensor y = moe.forward(x, options);              // x [T_local, D] -> y [T_local, D]
//   exec::Tensor dx = moe.backward(dy);                    // dW accumulate; aux-loss grads included
//   ep_dp_comm->all_reduce_sum(moe.router_weight_grad().f32(), ...);  // W_r is replicated: see below
//
// Symbols: T tokens of the whole EP group (T_local on this rank), D = hidden, F = ffn_hidden,
// E = num_experts, k = top_k, ep = EP group size, E_local = E / ep.
//
// Forward, per token x (a row of the input):
//   g = x W_r                     router logits (W_r is [D, E], replicated on every rank)
//   z = g + sigma * eps           noisy gate when training with gate_noise_std > 0 (V-MoE):
//                                 sigma = gate_noise_std / E, eps ~ N(0,1): gate_noise_sample()
//   p = softmax(z)                gate probabilities
//   c_1..c_k                      the k largest p (descending; ties go to the lower expert index)
//   w_j = p_{c_j}                 gate weights (renormalize_gates: w_j = p_{c_j} / sum_j' p_{c_j'})
//   y = sum over kept j of w_j * FFN_{c_j}(x),  FFN_e(x) = act(x W1_e + b1_e) W2_e + b2_e
// act = GELU (tanh approximation, Backend::gelu) or the identity (exactness tests, ablations).
//
// Capacity: every expert takes at most C = ceil(capacity_factor * k * T / E) assignments from the
// whole EP group (T counts all ranks' tokens; a product within the precision policy of an integer
// counts as that integer). The policy decides which assignments overflow, in one order over the
// group's tokens, rank 0's first (the global token index is the rank's token offset + local index):
//   kVanilla        token order; a token's choices in descending probability order;
//   kBatchPriority  (V-MoE BPR) every token's 1st choice first, tokens sorted by their top gate
//                   probability descending (ties by global token index), then every 2nd choice in
//                   the same token order, and so on;
//   kNoDrop         nothing is dropped.
// A dropped assignment contributes nothing to y (the residual outside the layer carries the
// token). Because C and the fill order span the group, EP=1 over T tokens and EP=ep over T/ep
// tokens per rank route identically.
//
// Auxiliary losses (over the EP group's batch; each scaled by its weight and added to the
// objective whose gradient backward() returns; Var is the population variance over experts):
//   switch      E * sum_i f_i P_i, f_i = (assignments to i before drops) / (k T), P_i = mean_x p_i(x)
//               (Switch Transformer; f_i is the top-1 fraction when k = 1; no gradient through f)
//   importance  Var(I) / Mean(I)^2, I_i = sum_x p_i(x)                                  (V-MoE)
//   load        Var(L) / Mean(L)^2, L_i = sum_x Phi((g_i(x) - eta(x)) / sigma), eta(x) = the k-th
//               largest noisy logit z of x: the probability that i would be selected if its noise
//               were drawn again (V-MoE). Needs the noisy gate: computed only when training with
//               gate_noise_std > 0 (else 0); gradients flow through g_i and eta, as in V-MoE.
//   damex       mean over tokens with a dataset label d of -log p_{h(d)}(x), h = expert_of_dataset
//               (DAMEX); 0 when no token of the group carries a label.
//
// Expert parallelism: experts are split contiguously, rank r holds experts [r E_local, (r+1) E_local).
// Forward: (1) all_gather of the tokens per rank; (2) gate; (3) all_gather of the routing metadata
// (each token's top probability and k experts, (1+k) floats a token) so every rank applies the same
// group-wide capacity decision; every rank then knows how many rows it sends to and receives from
// every other rank per expert, so no separate counts exchange is needed; (4) all_to_all_v of the kept
// rows to the experts' ranks, grouped FFN per local expert (GEMMs over views of one buffer),
// all_to_all_v back; (5) combine. Backward runs the two all-to-alls in reverse. The aux losses'
// batch statistics are one all_reduce_sum of 2E+2 floats. Expert ids and counts travel as fp32,
// exact below 2^24: the group must route fewer than 2^24 assignments per step.
//
// Devices: every tensor op (router GEMM, noise, softmax, dispatch gather, expert FFN, combine,
// their backward and the router backward) runs through the Backend on its device, and the
// all-to-alls take device buffers (the Comm's engine must match: NCCL for CUDA). The routing
// decisions run on the host over one explicit device-to-host copy of the router's probabilities
// [T_local, E] (and the logits when the load or DAMEX loss needs them), as MoE frameworks do for
// the capacity assignment: top-k, gate weights, the capacity assignment in the cost model's fill
// order, the exchange layout and the aux-loss batch statistics; the slots and gate weights then go
// back to the device. The small metadata exchanges (token counts, routing metadata, aux sums) go
// through all_gather_host / all_reduce_sum_host.
//
// Parameters and gradients:
//   W_r [D, E] replicated; backward() adds this rank's tokens' share to router_weight_grad(): the
//     CALLER must sum it over the ranks that share W_r (the EP group, and DP replicas) before the
//     optimizer step.
//   W1 [E_local, D, F], b1 [E_local, F], W2 [E_local, F, D], b2 [E_local, D]: the local experts,
//     gradients complete on their rank (every token routed to an expert reaches that rank). Under
//     data parallelism with expert replicas, those are summed over the expert's replicas by the caller.
// Initialisation from config.seed, the executor's convention (executor/layers.h): every parameter
// draws from its own Rng stream derive_seed(seed, parameter name), with per-expert names
// "<name>.experts.<e>.w1" / ".w2" for the global expert index e, so expert e has the same weights
// whichever rank holds it and EP=1 and EP=2 build the same model. Weights are uniform in
// +-1/sqrt(fan_in) (W_r: fan_in D; W1: D; W2: F), biases zero.
#pragma once

#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/layers.h"
#include "executor/tensor.h"

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moesim::exec {

enum class RoutingPolicy { kVanilla, kBatchPriority, kNoDrop };
enum class ExpertActivation { kGelu, kIdentity };

// "vanilla", "batch_priority", "no_drop" (the cost model's VANILLA, BATCH_PRIORITY, NO_DROP).
const char* routing_policy_name(RoutingPolicy policy);
std::optional<RoutingPolicy> routing_policy_from_name(std::string_view name);  // either spelling

struct MoeLayerConfig {
  std::string name = "moe";  // parameter names and seed streams: "<name>.router.weight", ...
  int64_t hidden = 0;      // D
  int64_t ffn_hidden = 0;  // F
  int num_experts = 0;     // E, a multiple of the EP group size
  int top_k = 1;           // k, 1 <= k <= E
  double capacity_factor = 1.25;
  RoutingPolicy routing = RoutingPolicy::kVanilla;
  bool renormalize_gates = false;  // gate weights renormalised over the k chosen experts
  ExpertActivation activation = ExpertActivation::kGelu;

  double switch_loss_weight = 0;
  double importance_loss_weight = 0;
  double load_loss_weight = 0;  // needs gate_noise_std > 0
  double damex_loss_weight = 0;
  double gate_noise_std = 0;                // V-MoE's noise_std (they use 1): sigma = gate_noise_std / E
  std::vector<int> damex_expert_of_dataset;  // h(d) for dataset ids 0..size-1

  uint64_t seed = 1;  // parameters and gate noise
};

// Every problem of `config` for an EP group of `ep_size` ranks, one message each (empty: valid).
std::vector<std::string> validate(const MoeLayerConfig& config, int ep_size);

// The capacity C is the cost model's cost::expert_capacity (costmodel/routing_model.h).

// The noise eps ~ N(0, 1) added (times sigma) to logit `expert` of global token `token` in the
// forward call with `step`, for a layer whose noise key is `key` (MoeLayer::gate_noise_key()): a
// pure function of its arguments (counter-based: splitmix64 hashes, then Box-Muller), so any EP
// split draws the same noise for the same token.
float gate_noise_sample(uint64_t key, uint64_t step, int64_t token, int expert);

// The k largest entries of each row of probs [rows, cols], descending, ties to the lower index:
// experts[r * k + j].
void top_k_rows(const float* probs, int64_t rows, int cols, int k, int32_t* experts);

// The capacity decision over one batch of `tokens` tokens in global order: experts[t * k + j] is
// token t's j-th choice, top_prob[t] its top gate probability (used by kBatchPriority). Returns
// keep[t * k + j] (1 kept, 0 dropped): each expert keeps the first `capacity` assignments in the
// policy's order (see above; kNoDrop keeps all).
std::vector<uint8_t> assign_capacity(RoutingPolicy policy, int64_t capacity, int experts, int k, int64_t tokens,
                                     std::span<const int32_t> expert_of_assignment, std::span<const float> top_prob);

struct MoeForwardOptions {
  std::span<const int32_t> dataset_ids;  // per local token: -1 (none) or a DAMEX dataset id; empty: none
  uint64_t step = 0;                     // selects the gate noise draw
  bool training = true;                  // noisy gate and load loss only when training
  // > 0: every rank of the EP group routes this many tokens (the caller splits the batch evenly),
  // so the ranks' token counts need not be exchanged; it must be this rank's token count.
  int64_t tokens_per_rank = 0;
};

struct MoeAuxLosses {
  double switch_loss = 0;
  double importance_loss = 0;
  double load_loss = 0;
  double damex_loss = 0;
  double weighted_total = 0;  // sum of weight * loss: what backward() differentiates besides dy
};

// Routing of the last forward, over the whole EP group.
struct MoeRoutingStats {
  int64_t tokens = 0;           // T
  int64_t expert_capacity = 0;  // C; for kNoDrop the busiest expert's load
  std::vector<int64_t> assigned_per_expert;  // assignments per expert before drops (sum T k)
  std::vector<int64_t> kept_per_expert;      // after drops
  int64_t dropped_assignments = 0;
};

// Wall-clock seconds (steady clock, read after a device synchronize: on a GPU the device's time)
// of the parts of one forward or backward on this rank.
//   gate_s      router GEMM, noise, softmax, top-k, the capacity decision and its metadata
//               all_gather, aux losses and their all_reduce (backward: gate-weight, softmax and
//               aux-loss gradients, dW_r and the router's share of dx)
//   dispatch_s  packing kept rows, all_to_all_v to the experts' ranks, regrouping by expert
//               (backward: the reverse exchange of expert input gradients and their sum into dx)
//   experts_s   the grouped FFN (backward: its gradients)
//   combine_s   all_to_all_v of expert outputs back and the gate-weighted sum (backward: gradients
//               of expert outputs and gate weights, and their exchange to the experts' ranks)
// expert_gemm_s and expert_gemm_flops: the expert GEMM calls alone (part of experts_s), counted
// 2 m n k per GEMM, where MoeLayer::time_expert_gemms is on (0 otherwise).
struct MoePartTimes {
  double gate_s = 0;
  double dispatch_s = 0;
  double experts_s = 0;
  double combine_s = 0;
  double expert_gemm_s = 0;
  double expert_gemm_flops = 0;
  double total_s() const { return gate_s + dispatch_s + experts_s + combine_s; }
};

class MoeLayer {
 public:
  // ep_comm: the EP group (null or size 1: EP = 1, no communication at all). Throws exec::Error
  // listing every problem of the config, or when ep_comm's buffers are not on `backend`'s device.
  // `backend` and `ep_comm` must outlive the layer.
  MoeLayer(MoeLayerConfig config, Backend& backend, Comm* ep_comm = nullptr);

  // x [T_local, D] fp32 on the back end's device -> y [T_local, D]. Collective over the EP group: every rank
  // calls it (T_local may differ between ranks). x's buffer is kept (shared, not copied) for
  // backward: do not modify it in between.
  Tensor forward(const Tensor& x, const MoeForwardOptions& options = {});
  // dy [T_local, D] = dLoss/dy of the last forward -> dLoss/dx, where Loss also includes the
  // weighted aux losses. Accumulates (+=) into the parameter gradients. Collective. Once per
  // forward: it overwrites the forward's activations (a second call throws exec::Error).
  Tensor backward(const Tensor& dy);

  // The same forward and backward in the Schedule's parts (schedule/lowering.h: moe.gate,
  // moe.route, moe.permute, moe.dispatch_a2a, moe.experts, moe.combine_a2a, moe.combine), for an
  // executor that runs a Schedule op by op; forward() and backward() are these in order. With
  // EP > 1 the route is the one all-gather of the group's routing metadata (with the aux-loss sums),
  // the permute the group's capacity decision (every rank derives the whole exchange pattern) and
  // the local permutation into the send layout; with EP = 1 the gate does both and route and
  // permute are no-ops (a Schedule has neither). The exchanges are the all-to-all-v's (no-ops with
  // EP = 1); the combine is the weighted sum. Backward runs them in reverse: backward_combine
  // (d(output), d(gate weight)), backward_combine_exchange (d(output) to the experts' ranks), backward_experts,
  // backward_dispatch (input gradients back), backward_gate (dx and the router's gradients). Each
  // part must follow the one before (else exec::Error); forward_gate may start over at any time.
  void forward_gate(const Tensor& x, const MoeForwardOptions& options = {});
  void forward_route();
  void forward_permute();
  void forward_dispatch();
  void forward_experts();
  void forward_combine_exchange();
  Tensor forward_combine();
  void backward_combine(const Tensor& dy);
  void backward_combine_exchange();
  void backward_experts();
  void backward_dispatch();
  Tensor backward_gate();

  void zero_grad();
  // "<name>.router.weight" (replicated: sum its gradient over the EP and DP groups) and the local
  // experts' "<name>.experts.w1", ".b1", ".w2", ".b2" (local: E_local experts stacked).
  void register_params(ParamRegistry& registry);

  const MoeLayerConfig& config() const { return config_; }
  int ep_size() const { return ep_size_; }
  int ep_rank() const { return ep_rank_; }
  int local_experts() const { return local_experts_; }
  // Bytes the last forward's route gathered over the group (0 with EP = 1).
  double route_bytes() const { return route_bytes_; }
  int first_local_expert() const { return ep_rank_ * local_experts_; }
  // derive_seed(config.seed, name + ".gate_noise"): see gate_noise_sample().
  uint64_t gate_noise_key() const;

  // Parameters (shapes above) and their gradients.
  Tensor& router_weight() { return w_router_; }
  Tensor& w1() { return w1_; }
  Tensor& b1() { return b1_; }
  Tensor& w2() { return w2_; }
  Tensor& b2() { return b2_; }
  const Tensor& router_weight() const { return w_router_; }
  const Tensor& w1() const { return w1_; }
  const Tensor& b1() const { return b1_; }
  const Tensor& w2() const { return w2_; }
  const Tensor& b2() const { return b2_; }
  Tensor& router_weight_grad() { return dw_router_; }
  Tensor& w1_grad() { return dw1_; }
  Tensor& b1_grad() { return db1_; }
  Tensor& w2_grad() { return dw2_; }
  Tensor& b2_grad() { return db2_; }

  // Of the last forward.
  const MoeAuxLosses& aux_losses() const { return aux_; }
  const MoeRoutingStats& routing_stats() const { return stats_; }
  // This rank's tokens: choice j of local token t at [t * k + j].
  std::span<const int32_t> chosen_experts() const { return choice_; }
  std::span<const float> gate_weights() const { return gate_w_; }
  std::span<const uint8_t> kept() const { return keep_; }
  const MoePartTimes& forward_times() const { return fwd_times_; }
  const MoePartTimes& backward_times() const { return bwd_times_; }
  // Times each expert GEMM (expert_gemm_s) between device syncs, which a GPU's step would pay
  // for every GEMM: off unless on (moesim bench-layer).
  void time_expert_gemms(bool on) { time_gemms_ = on; }
  // Host-side routing seconds since the last call (trace Span routing_host_s, dispatch_host_s):
  // the gate's top-k, gate weights and aux sums, or its router gradient (routing_s); the capacity
  // decision and aux losses (dispatch_s).
  struct HostTimes {
    double routing_s = 0, dispatch_s = 0;
  };
  HostTimes take_host_times() { return std::exchange(host_times_, {}); }

 private:
  void init_parameters();
  void gate_forward(const MoeForwardOptions& options);
  void local_aux_sums();
  // The routing metadata per rank: its tokens' (top probability, k choices), padded to the most
  // tokens of a rank, from 0; its aux sums from sums_at; per_rank floats in all.
  struct RoutingLayout {
    int64_t sums_at = 0, per_rank = 0;
  };
  RoutingLayout routing_layout() const;
  void gather_routing();
  void route();
  void aux_forward();
  void decide();  // route() and aux_forward(), timed as the dispatch's host work
  void permute();
  void experts_forward();
  void experts_backward(const float* grad_out, float* grad_in);
  void timed_gemm(MoePartTimes& times, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                  const float* b, float beta, float* c);
  // Seconds since t0 once the device has finished the work issued so far.
  double elapsed_s(std::chrono::steady_clock::time_point t0);
  Tensor device_tensor(std::vector<int64_t> shape) const;
  // Moves rows between the send layout (this rank's kept assignments by expert, so by destination
  // rank) and the expert layout (this rank's experts' rows by local expert, then source rank):
  // send -> expert when to_experts, else back.
  void exchange(const float* from, float* to, bool to_experts);

  MoeLayerConfig config_;
  Backend& backend_;
  Comm* comm_ = nullptr;  // null when ep_size_ == 1: no communication
  int ep_size_ = 1;
  int ep_rank_ = 0;
  int local_experts_ = 0;

  Tensor w_router_, w1_, b1_, w2_, b2_;
  Tensor dw_router_, dw1_, db1_, dw2_, db2_;

  // The part that runs next (forward_gate .. backward_gate, then forward_gate again).
  enum class Part {
    kForwardGate,
    kForwardRoute,
    kForwardPermute,
    kForwardDispatch,
    kForwardExperts,
    kForwardCombineExchange,
    kForwardCombine,
    kBackwardCombine,
    kBackwardCombineExchange,
    kBackwardExperts,
    kBackwardDispatch,
    kBackwardGate,
    kEnd
  };
  void expect_part(Part part, const char* name);
  Part next_part_ = Part::kForwardGate;

  // State of the last forward, for backward.
  bool noisy_ = false;  // the noisy gate (and so the load loss) was on
  Tensor x_;
  int64_t tokens_ = 0;        // T_local
  int64_t token_offset_ = 0;  // global index of local token 0
  int64_t group_tokens_ = 0;  // T
  std::vector<int64_t> tokens_of_rank_;
  Tensor logits_;                      // g [T_local, E] (clean), on the device
  Tensor noisy_logits_;                // z [T_local, E] when noisy_
  Tensor probs_;                       // p [T_local, E]
  std::vector<float> host_probs_;      // p, copied to the host for the routing decisions
  std::vector<float> host_logits_;     // g on the host, when the load loss needs it
  std::vector<float> host_z_;          // the logits softmax saw, on the host, for DAMEX and eta
  std::vector<float> eta_;           // k-th largest noisy logit per token (load loss)
  std::vector<float> top_prob_;      // p of the 1st choice per token (BPR priority)
  std::vector<int32_t> choice_;
  std::vector<float> gate_w_;
  std::vector<uint8_t> keep_;
  std::vector<int64_t> slot_;              // row of assignment t*k+j in the send layout, -1 dropped
  Tensor slot_dev_, gate_w_dev_;           // the same on the device (i32, f32 [T_local k])
  std::vector<int32_t> dataset_of_token_;  // -1: none
  std::vector<int64_t> kept_by_rank_;      // [ep, E]: kept assignments of rank r's tokens to expert e
  int64_t send_rows_ = 0;                  // kept assignments of this rank's tokens
  int64_t expert_rows_ = 0;                // rows this rank's experts process
  std::vector<int64_t> expert_row_begin_;  // [E_local + 1]
  // The aux losses' sums [2E + 2]: I, L (load), DAMEX's sum of -log p and its labelled tokens;
  // this rank's after gate_forward, the group's after route (they travel with the metadata).
  std::vector<double> aux_sums_;
  std::vector<float> routing_all_;  // the group's metadata as gather_routing gathered it
  double route_bytes_ = 0;
  // Group-wide aux statistics: I, L (load), assignments before drops, DAMEX-labelled tokens.
  std::vector<double> importance_, load_;
  std::vector<int64_t> assigned_;
  double damex_tokens_ = 0;
  MoeAuxLosses aux_;
  MoeRoutingStats stats_;

  // Device buffers of the last call (send layout: send_rows_ x D; expert layout: expert_rows_ x D
  // or F), allocated per call from the device's allocator (CUDA: a block cache).
  Tensor send_buf_, expert_in_, hidden_pre_, hidden_act_, expert_out_, returned_;
  Tensor grad_send_, grad_expert_out_, grad_hidden_, grad_expert_in_, dgate_;
  MoePartTimes fwd_times_, bwd_times_;
  bool time_gemms_ = false;
  HostTimes host_times_;
};

// ---------------------------------------------------------------------------------------------
// Benchmark of one layer (bench/moe_layer_bench and the CLI): forward + backward on random data.

struct BenchLayerOptions {
  MoeLayerConfig layer = [] {
    MoeLayerConfig c;
    c.hidden = 512;
    c.ffn_hidden = 2048;
    c.num_experts = 8;
    c.top_k = 2;
    return c;
  }();
  int64_t tokens = 4096;  // T of the EP group, split evenly over its ranks
  int warmup_iterations = 1;
  int iterations = 3;
  uint64_t data_seed = 7;
};

struct BenchLayerResult {
  int ep_size = 1;
  int64_t tokens = 0;
  double step_s = 0;        // forward + backward, mean over iterations
  double tokens_per_s = 0;  // T / step_s
  // Per iteration (forward + backward), this rank.
  double gate_s = 0, dispatch_s = 0, experts_s = 0, combine_s = 0;
  double expert_gemm_s = 0;  // the GEMM calls inside experts_s (the rest: GELU, biases, bias grads)
  // The expert GEMMs in the layer vs the vendor BLAS on the same shapes and transposes (CPU:
  // cblas_sgemm; CUDA: cublasSgemm through the back end on separate buffers), timed alternately in
  // the same run: gemm_efficiency_vs_blas = blas time / layer GEMM time.
  double expert_gemm_flops_per_s = 0;
  double blas_gemm_flops_per_s = 0;
  double gemm_efficiency_vs_blas = 0;
  MoeRoutingStats routing;
};

// Collective over `comm` (null: one rank). Throws exec::Error for an invalid config or a tokens
// count that does not split evenly.
BenchLayerResult bench_layer(const BenchLayerOptions& options, Comm* comm, Backend& backend);

}  // namespace moesim::exec
