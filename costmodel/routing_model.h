// The token routing model: which experts a batch's tokens choose, how full each expert's buffer
// gets, what the capacity limit drops, where experts live on the expert-parallel (EP) ranks and
// how many bytes the dispatch all-to-all moves between them. Symbols as in ../shared/SEEDS.md:
// T tokens, E experts, k experts per token, C expert capacity, R EP ranks.
//
//   std::vector<double> p = cost::expert_probabilities(workload.routing(), E);
//   cost::RoutingProblem problem{T, E, k, strategy.capacity_factor(), strategy.drop_policy(), p,
//                                workload.routing().seed()};
//   cost::RoutingLoads loads = cost::routing_loads(problem);
//   cost::ExpertPlacementMap map = cost::place_experts(E, R, &strategy.placement(), loads.expected_load);
//   double busiest = cost::max_rank_load(map, loads.sampled_load);       // tokens on the busiest rank
//   auto bytes = cost::dispatch_bytes(map, problem, D * 2.0, /*dedup_per_rank=*/true);  // bf16 tokens
//
// The router model. A token's router scores are s_e = log p_e + g_e with g_e i.i.d. standard
// Gumbel noise; the token takes the k experts with the highest scores (the Gumbel-top-k trick:
// this is exactly sampling k distinct experts without replacement in proportion to p, i.e. the
// Plackett-Luce model) in descending score order, and its gate probabilities are the softmax of
// the scores over all E experts, gate_e = p_e e^{g_e} / sum_i p_i e^{g_i}. Experts with p_e = 0
// are never chosen: a token chooses k' = min(k, #{e : p_e > 0}) experts.
//
// Randomness: every sample comes from a std::mt19937_64 seeded with the problem's seed (never
// std::random_device) through moesim's own transforms (no std::*_distribution, whose algorithms
// differ between standard libraries): the same seed gives the same output bits (across
// platforms too, up to last-ulp differences between math libraries' exp/log, which can very
// rarely change one draw).
#pragma once

#include "common/config.h"
#include "common/registry.h"
#include "costmodel/strategy.pb.h"
#include "costmodel/workload.pb.h"

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace moesim::cost {

// ---------------------------------------------------------------------------------------------
// Routing distributions: p_e, the probability that one routing choice lands on expert e.
//
//   uniform          p_e = 1/E
//   zipf             p_e ∝ (e+1)^-s: expert index order is popularity rank order (rank r = e+1),
//                    so p_0/p_1 = 2^s
//   dataset_mixture  DAMEX: a token of dataset d (share f_d) goes to one of d's experts S_d,
//                    uniformly among them, with probability a (`affinity`), else uniformly
//                    anywhere:  p_e = sum_d f_d (a [e in S_d] / |S_d| + (1 - a) / E).
//                    Fractions are normalised by their sum (validation requires it to be 1
//                    within 1e-3, so this only removes rounding).
//   histogram        p_e = w_e / sum_i w_i
//
// A model without experts (E <= 0) ignores the distribution; validation then skips the checks
// that need E (histogram length, dataset expert indices).
struct RoutingDistributionKind {
  // Records every problem with the distribution; `routing` is the RoutingDistribution message.
  void (*validate)(const ConfigScope& routing, int experts);
  // p_e for e in [0, experts); only called on a message that validated, with experts > 0.
  std::vector<double> (*probabilities)(const workload::RoutingDistribution& routing, int experts);
};

// Registered under the names of RoutingDistribution's `kind` cases: uniform, zipf,
// dataset_mixture, histogram.
const Registry<RoutingDistributionKind>& routing_distributions();

// The registered name of the distribution's kind ("uniform" when no case is set: the default).
std::string_view routing_distribution_name(const workload::RoutingDistribution& routing);

// Validates the RoutingDistribution at `scope` for a model with `experts` experts, recording
// every problem in the scope's Diagnostics (see common/config.h). Problems: zipf exponent missing
// or outside [0, 10]; histogram without weights, length != experts, a negative or non-finite
// weight, all weights zero; dataset_mixture without datasets, a dataset without experts, an
// expert index outside [0, experts) or listed twice, fraction missing or outside (0, 1],
// fractions not summing to 1 within 1e-3, affinity outside [0, 1]; `uniform: false`.
void validate_routing(const ConfigScope& scope, int experts);

// p_e for a validated distribution; sums to 1. Requires experts > 0.
std::vector<double> expert_probabilities(const workload::RoutingDistribution& routing, int experts);

// Inclusion probabilities of top-k sampling without replacement (Plackett-Luce):
//   pi_e = P(e is among a token's k' chosen experts),  sum_e pi_e = k',  p_e <= pi_e <= 1.
// k = 1 gives pi = p. There is no closed form for k > 1; with exponential clocks X_i ~ Exp(p_i)
// (the first k to ring are the chosen experts),
//   pi_e = integral_0^inf p_e e^{-p_e t} P(N_{-e}(t) <= k-1) dt,
// where N_{-e}(t) = #{i != e : X_i <= t} is Poisson-binomial with success probabilities
// 1 - e^{-p_i t}. The integral is evaluated by the trapezoid rule in log t (exponentially
// convergent for this smooth, doubly decaying integrand; relative error < 1e-9), with
// leave-one-out Poisson-binomial tails from prefix/suffix dynamic programmes truncated at k
// terms: O(points * E * k), about 1 ms for E = 256, k = 8. The result is rescaled by k'/sum(pi)
// to remove the remaining quadrature error. `probabilities` may be any non-negative weights with
// a positive sum.
std::vector<double> inclusion_probabilities(const std::vector<double>& probabilities, int top_k);

// ---------------------------------------------------------------------------------------------
// Expert loads and capacity drops.

struct RoutingProblem {
  int64_t tokens = 0;  // T: tokens routed together (one micro-batch of one MoE layer, one EP group)
  int experts = 0;     // E
  int top_k = 1;       // k, 1 <= k <= E
  double capacity_factor = 1.25;
  strategy::DropPolicy drop_policy = strategy::VANILLA;
  std::vector<double> probabilities;  // p_e, size E (non-negative, positive sum; normalised here)
  uint64_t seed = 1;
  // Optional: inclusion_probabilities(probabilities, top_k), for callers that route many problems
  // with the same distribution (about 1 ms saved per call at E = 256, k = 8). Empty: computed.
  std::vector<double> inclusion;
  // The ranks the tokens come from, in consecutive blocks (tokens_per_source): the capacity is
  // the group's, filled in policy order over all of them (so under VANILLA the first ranks' tokens
  // take the buffers first), and RoutingLoads.kept_by_source says whose assignments were kept.
  int sources = 1;
};

// Expert capacity, in token slots per expert:
//   C = ceil(capacity_factor * k * T / E)
// (SEEDS.md writes round(); ceil is what GShard/Switch implementations allocate and guarantees
// C >= the mean load whenever capacity_factor >= 1). A product within moesim's relative epsilon
// of an integer counts as that integer, so 1.1 * 100 gives 110, not 111.
int64_t expert_capacity(int64_t tokens, int experts, int top_k, double capacity_factor);

// T tokens over R ranks in consecutive blocks: rank s holds floor(T/R) + (s < T mod R) of them.
std::vector<int64_t> tokens_per_source(int64_t tokens, int sources);

// Bytes of one rank's routing metadata in an MoE layer's route, the all-gather over the EP group
// before the dispatch (EP > 1): each of its tokens' top gate probability and choices
// (routed_per_token of them), and its aux-loss sums (2E + 2), all fp32, as the executor's MoE
// layer exchanges them (the capacity decision is the group's; every all-to-all-v needs its
// counts first).
double route_bytes_per_rank(double tokens, double routed_per_token, int experts);

// The order in which a capacity policy fills the experts' buffers, as assignment indices t*k + j
// (token t's j-th choice): VANILLA (and NO_DROP) token by token, a token's choices in order;
// BATCH_PRIORITY every token's 1st choice first, tokens by descending priority[t] (ties by token
// index), then every 2nd choice in the same token order, and so on. Each expert keeps the first
// assignments that reach it. The executor's MoE layer fills its buffers in this same order, so a
// predicted and an executed layer drop the same assignments.
std::vector<int64_t> fill_order(strategy::DropPolicy policy, int64_t tokens, int k, std::span<const double> priority);

struct RoutingLoads {
  // T * pi_e: the expected number of tokens choosing expert e (sums to T k').
  std::vector<double> expected_load;
  // Tokens that chose e in this sample, before any drop (sums to T k' exactly).
  std::vector<int64_t> sampled_load;
  // C for VANILLA and BATCH_PRIORITY; for NO_DROP the buffer grows to the busiest expert, so
  // this is max_e sampled_load.
  int64_t capacity = 0;
  // Dropped token->expert assignments / (T k'). Expert e keeps min(load_e, C) assignments
  // whatever the policy, so dropped assignments = sum_e max(0, sampled_load_e - C); the policy
  // only decides which ones.
  double dropped_fraction = 0;
  double tokens_fully_dropped_fraction = 0;  // tokens that lost every one of their k' experts / T
  double primary_dropped_fraction = 0;       // tokens that lost their top-1 expert / T
  // sum of gate probabilities of dropped assignments / sum over all assignments.
  double dropped_gate_mass_fraction = 0;
  // kept_by_source[s][e]: source s's assignments to expert e that its buffer kept (sums over s to
  // min(sampled_load_e, capacity)). Exact on the per-token path; on the multinomial path each
  // expert's kept assignments split over the sources as the subsample's did (as their tokens
  // when nothing dropped).
  std::vector<std::vector<double>> kept_by_source;
  double max_load = 0;   // max_e sampled_load_e (before drops: the busiest expert's demand)
  double imbalance = 0;  // max_load / (T k' / E); 1 means perfectly even
  // How the sample was drawn: T when tokens were routed one by one; for the multinomial path
  // the size of the subsample the policy-specific fractions came from, 0 when nothing dropped
  // (see routing_loads).
  int64_t simulated_tokens = 0;
};

// Per-token simulation costs one exponential draw per token and expert with p_e > 0 (a few ns
// each, mostly the generator); above this many draws routing_loads switches to the multinomial
// approximation, and this many draws is the subsample it simulates.
inline constexpr int64_t kPerTokenDrawBudget = int64_t{1} << 21;

// Samples a routing of the problem's tokens and fills the experts' buffers.
//
// Small problems (T * #{e : p_e > 0} <= kPerTokenDrawBudget) are simulated token by token
// (sample_token_routes below), then buffers are filled in policy order, each expert keeping the
// first C assignments that reach it:
//   VANILLA         token order; a token's choices in descending score order;
//   BATCH_PRIORITY  (V-MoE BPR) every token's 1st choice first, tokens sorted by their top gate
//                   probability descending (ties by token index), then every 2nd choice in the
//                   same token order, and so on: low-priority tokens and secondary choices drop
//                   first, so BPR loses fewer primary assignments and less gate mass;
//   NO_DROP         nothing is dropped.
//
// Large problems: the loads are one multinomial draw of T k' assignments over the experts with
// probabilities pi_e / k' (conditional binomials). This ignores that one token's k' choices are
// distinct (the exact count is a sum of T dependent per-token indicators with variance
// T pi_e (1 - pi_e), the multinomial's is T pi_e (1 - pi_e / k')): negligible unless an expert
// is chosen by most tokens. dropped_fraction then follows from those loads exactly. The
// policy-specific fractions (primary, fully dropped, gate mass) come from a per-token simulation
// of a subsample of T' = kPerTokenDrawBudget / #{e : p_e > 0} tokens, seeded from the problem's
// seed, in which expert e keeps L'_e - round(o_e L'_e) of its L'_e assignments, where
// o_e = max(0, L_e - C) / L_e is the share the full sample dropped there: the subsample drops
// what the full batch drops, and the policy chooses which.
// DeepSeek-V3 sized problems (T = 65536, E = 256, k = 8) take the large path, with an
// 8192-token subsample: its policy-specific fractions carry a sampling error of about
// sqrt(f (1 - f) / 8192) <= 0.6% (absolute).
RoutingLoads routing_loads(const RoutingProblem& problem);

// One sampled routing: token t's choices are expert[t*top_k + j], j = 0..top_k-1, in descending
// score order, with gate probabilities gate[t*top_k + j] (so gate[t*top_k] is the token's top
// gate probability, its BPR priority). top_k here is k' (see above).
struct TokenRoutes {
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<int> expert;
  std::vector<double> gate;
};

// Routes `tokens` tokens under the router model above, exactly: each token draws E_e ~ Exp(1)
// for every expert with p_e > 0 (ziggurat method, Marsaglia & Tsang 2000), so that
// e^{s_e} = p_e / E_e; it takes the k' largest p_e / E_e and gate_e = (p_e / E_e) / sum_i p_i / E_i.
// Cost O(T E); the same (probabilities, tokens, top_k, seed) give the same routes, and the
// routes of the first n tokens do not depend on `tokens`.
TokenRoutes sample_token_routes(const std::vector<double>& probabilities, int64_t tokens, int top_k,
                                uint64_t seed);

// ---------------------------------------------------------------------------------------------
// Expert placement over the EP ranks.

struct ExpertPlacementMap {
  int ranks = 0;
  // Per expert, the EP ranks holding a copy: its home rank first, then replicas in the order
  // they were placed.
  std::vector<std::vector<int>> expert_ranks;
};

// Home ranks: `placement->expert_rank` when given (one entry per expert, each in [0, ranks)),
// else contiguous blocks, expert e on rank e / (E / R) (E divisible by R; both validated by the
// strategy's validation, asserted here). Then `placement->replicas` extra copies, one at a time,
// with rank loads L_r = sum over the experts on r of p_e / copies_e (a replicated expert's load
// split evenly among its copies): an expert's next copy goes to the least-loaded rank not yet
// holding it (ties: lower rank), and the expert chosen is the one whose copy leaves the lowest
// max_r L_r, ties broken by the lowest sum_r L_r^2 (the most even loads), then the lower index.
// For a given expert the least-loaded rank is the best target under that order, so this is the
// best single copy; it picks the hot experts on the busiest ranks (simply copying the expert with
// the highest p_e / copies_e can raise the maximum: its copies may land on ranks made busy by
// earlier copies). Stops early when every expert is on every rank. `probabilities` is any
// per-expert load measure (p_e, or expected loads for top-k > 1); it may be empty when no
// replicas are asked for. `placement` may be null.
ExpertPlacementMap place_experts(int experts, int ranks, const strategy::ExpertPlacement* placement,
                                 const std::vector<double>& probabilities);

// Load per rank: sum over experts e it holds of expert_loads_e / copies_e.
std::vector<double> rank_loads(const ExpertPlacementMap& map, const std::vector<double>& expert_loads);
std::vector<double> rank_loads(const ExpertPlacementMap& map, const std::vector<int64_t>& expert_loads);
// The busiest rank's load: what sets the MoE layer's compute time on the EP group.
double max_rank_load(const ExpertPlacementMap& map, const std::vector<double>& expert_loads);
double max_rank_load(const ExpertPlacementMap& map, const std::vector<int64_t>& expert_loads);

// ---------------------------------------------------------------------------------------------
// Dispatch all-to-all.
//
// bytes[src][dst]: bytes EP rank src sends to EP rank dst in the dispatch all-to-all (the
// combine all-to-all is the transpose; bytes[r][r] is the local part, which no link carries).
// Tokens start spread evenly over the ranks: rank s holds n_s = floor(T/R) + (s < T mod R)
// consecutive tokens. Each of a token's k' assignments is sent to a copy of its expert: the one
// on src itself when src holds one, else the copies in turn (round-robin per source and expert).
// Without dedup, row s sums to n_s k' bytes_per_token. With dedup_per_rank (the survey's
// redundancy elimination for top-k > 1), a token sends one copy to each distinct destination
// rank, however many of its experts live there. Assignments are counted before capacity drops
// (a dropless, unpadded dispatch).
//
// Small problems (as routing_loads decides) use the sampled routes of sample_token_routes with
// the problem's seed, the same tokens routing_loads routes. Large problems use expected values:
//   bytes[s][d] = n_s b sum_e pi_e w_s(e, d)                  without dedup,
//   bytes[s][d] = n_s b P(a token of s chooses an expert it sends to d)   with dedup,
// where w_s(e, d) is the share of e's assignments from s sent to d (1 to a local copy, else
// 1/copies to each copy) and the dedup probability is the Plackett-Luce group inclusion
// probability (as in inclusion_probabilities, with the group of "virtual experts" (e, d) of
// weight p_e w_s(e, d)); splitting a remote replicated expert over its copies this way is an
// approximation (it lets a token reach two copies of one expert).
std::vector<std::vector<double>> dispatch_bytes(const ExpertPlacementMap& map, const RoutingProblem& problem,
                                                double bytes_per_token, bool dedup_per_rank);

}  // namespace moesim::cost
