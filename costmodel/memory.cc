#include "costmodel/memory.h"

#include "common/precision.h"
#include "costmodel/routing_model.h"

#include <algorithm>
#include <cmath>

namespace moesim::cost {
namespace {

constexpr double kCommBufferPerGroup_bytes = 64.0 * 1024 * 1024;
constexpr double kGradientBucketElements = 40e6;

bool mixed(workload::Precision p) { return p != workload::FP32 && p != workload::TF32; }

double precision_bytes(workload::Precision p) {
  switch (p) {
    case workload::FP32:
    case workload::TF32: return 4;
    case workload::FP8: return 1;
    default: return 2;
  }
}

double expert_weight_bytes(strategy::WeightPrecision p, double fallback) {
  switch (p) {
    case strategy::W_BF16: return 2;
    case strategy::W_FP8:
    case strategy::W_INT8: return 1;
    case strategy::W_INT4: return 0.5;
    default: return fallback;
  }
}

// Micro-batches (in whole-stage units) whose activations stage s holds at the peak.
double in_flight(const Layout& l, strategy::PipelineSchedule schedule, int s) {
  const double m = static_cast<double>(l.micro_batches);
  if (!l.training) return 1;
  switch (schedule) {
    case strategy::GPIPE: return m;
    case strategy::INTERLEAVED_1F1B: {
      const double v = l.virtual_stages;
      return std::min(m, (2.0 * (l.pp - s - 1) + (v - 1) * l.pp + 1) / v);
    }
    default: return std::min(m, static_cast<double>(l.pp - s));
  }
}

// Per EP rank: how many routed experts of one MoE layer it holds, and the factor by which its
// expected expert load exceeds the mean (for dropless buffers).
struct ExpertShare {
  std::vector<double> experts_on_rank;
  std::vector<double> load_factor;
};

ExpertShare expert_share(const Setup& s) {
  ExpertShare out;
  const Layout& l = s.layout;
  out.experts_on_rank.assign(l.ep, 0);
  out.load_factor.assign(l.ep, 1);
  const Layer* moe = nullptr;
  for (const Layer& layer : s.cost.layers)
    if (layer.moe) moe = &layer;
  if (moe == nullptr) return out;
  const int E = moe->experts;
  std::vector<double> p = s.workload->has_routing() ? expert_probabilities(s.workload->routing(), E)
                                                    : std::vector<double>(E, 1.0 / E);
  std::vector<double> pi = inclusion_probabilities(p, std::max(1, std::min(moe->top_k, E)));
  const strategy::ExpertPlacement* placement = s.strategy->has_placement() ? &s.strategy->placement() : nullptr;
  const ExpertPlacementMap map = place_experts(E, l.ep, placement, pi);
  std::vector<double> load(l.ep, 0);
  double total = 0;
  for (int e = 0; e < E; ++e) {
    const double copies = static_cast<double>(map.expert_ranks[e].size());
    for (int r : map.expert_ranks[e]) {
      out.experts_on_rank[r] += 1;
      load[r] += pi[e] / copies;
    }
    total += pi[e];
  }
  for (int r = 0; r < l.ep; ++r) out.load_factor[r] = total > 0 ? load[r] / (total / l.ep) : 1;
  return out;
}

}  // namespace

StateBytesPerParam state_bytes_per_param(workload::Precision precision, workload::Optimizer optimizer, int zero_stage,
                                         int data_parallel, bool training) {
  StateBytesPerParam b;
  const bool mp = mixed(precision);
  b.weights = mp ? 2 : 4;
  if (!training) return b;
  b.gradients = mp ? 2 : 4;
  const double master = mp ? 4 : 0;
  b.optimizer = master + (optimizer == workload::SGD ? 4 : 8);
  const double n = std::max(1, data_parallel);
  if (zero_stage >= 1) b.optimizer /= n;
  if (zero_stage >= 2) b.gradients /= n;
  if (zero_stage >= 3) b.weights /= n;
  return b;
}

MemoryReport estimate_memory(const Setup& s) {
  const Layout& l = s.layout;
  const strategy::Strategy& st = *s.strategy;
  const workload::Workload& wk = *s.workload;
  const bool training = wk.has_training();
  const workload::Precision precision = training ? wk.training().precision() : wk.inference().precision();
  const double act_scale = precision_bytes(precision) >= 4 ? 2.0 : 1.0;  // model.h counts 16-bit tensors
  const workload::Recompute recompute = training ? wk.training().recompute() : workload::NONE;
  const StateBytesPerParam dense_b =
      state_bytes_per_param(precision, training ? wk.training().optimizer() : workload::ADAMW, st.zero_stage(), l.dp, training);
  StateBytesPerParam expert_b = state_bytes_per_param(precision, training ? wk.training().optimizer() : workload::ADAMW,
                                                      st.zero_stage(), l.expert_dp, training);
  const double expert_w_full = expert_weight_bytes(st.expert_weight_precision(), mixed(precision) ? 2 : 4);
  expert_b.weights = expert_b.weights * expert_w_full / (mixed(precision) ? 2 : 4);
  const double offload_fraction = st.has_offload() ? st.offload().expert_fraction() : 0;
  const bool offload_optimizer = st.has_offload() && st.offload().optimizer_states();
  const int prefetch_layers = st.has_offload() ? st.offload().prefetch_layers() : 0;
  const ExpertShare share = expert_share(s);
  const double cf = st.capacity_factor();

  // Tokens (samples) per micro-batch on one rank.
  const double seq = training ? l.sequence : wk.inference().prompt_tokens();
  const double tokens = static_cast<double>(l.micro_batch) * seq;

  // Communication buffers.
  double comm = 0;
  if (st.has_comm_buffer_bytes()) {
    comm = st.comm_buffer_bytes();
  } else {
    for (int g : {l.dp, l.tp, l.ep, l.pp}) comm += g > 1 ? kCommBufferPerGroup_bytes : 0;
    if (training && l.dp > 1) comm += 2 * kGradientBucketElements * (mixed(precision) ? 2 : 4);
  }

  // One entry per (stage, EP rank) class, then expanded to ranks.
  std::vector<std::vector<RankMemory>> cls(l.pp, std::vector<RankMemory>(l.ep));
  for (int stage = 0; stage < l.pp; ++stage) {
    for (int er = 0; er < l.ep; ++er) {
      RankMemory& r = cls[stage][er];
      r.stage = stage;
      r.ep_rank = er;
      double dense = 0, experts = 0, max_layer_act = 0, stored = 0, moe_tokens_k = 0, offload_layer = 0, kv = 0;
      int moe_layers = 0;
      for (int idx : l.stage_layers[stage]) {
        const Layer& layer = s.cost.layers[idx];
        dense += layer.dense_params / l.tp;
        if (layer.moe) {
          const double mine = layer.expert_params_each * share.experts_on_rank[er] / l.tp;
          experts += mine;
          offload_layer = std::max(offload_layer, mine * offload_fraction);
          moe_tokens_k = std::max(moe_tokens_k, layer.routed_per_token);
          ++moe_layers;
        }
        const double expert_scale = st.drop_policy() == strategy::NO_DROP ? share.load_factor[er] : cf;
        auto per_token = [&](const ActivationBytes& a) {
          return a.sharded / l.tp + a.replicated / (st.sequence_parallel() ? l.tp : 1) + a.expert * expert_scale / l.tp;
        };
        const double full = per_token(layer.act_none) * layer.sample_share;
        max_layer_act = std::max(max_layer_act, full);
        if (recompute == workload::FULL) stored += layer.act_full * layer.sample_share / (st.sequence_parallel() ? l.tp : 1);
        else if (recompute == workload::SELECTIVE) stored += per_token(layer.act_selective) * layer.sample_share;
        else stored += full;
        kv += layer.kv_cache_bytes / (s.model->transformer().attention() == model::MLA ? 1 : l.tp);
      }
      r.params = dense + experts;
      r.weights_bytes = dense * dense_b.weights + experts * expert_b.weights * (1 - offload_fraction);
      r.offloaded_bytes = experts * expert_b.weights * offload_fraction;
      if (offload_fraction > 0) r.weights_bytes += prefetch_layers * offload_layer * expert_b.weights;
      r.gradients_bytes = dense * dense_b.gradients + experts * expert_b.gradients;
      const double opt = dense * dense_b.optimizer + experts * expert_b.optimizer;
      (offload_optimizer ? r.offloaded_bytes : r.optimizer_bytes) += opt;

      if (training) {
        r.in_flight_micro_batches = in_flight(l, st.schedule(), stage);
        r.activations_bytes = tokens * act_scale * stored * r.in_flight_micro_batches;
        if (recompute == workload::FULL) r.activations_bytes += tokens * act_scale * max_layer_act;
      } else {
        r.in_flight_micro_batches = 1;
        const workload::Inference& inf = wk.inference();
        const double kv_prec = inf.has_kv_cache_precision() ? precision_bytes(inf.kv_cache_precision()) : precision_bytes(inf.precision());
        const double batch_per_replica = static_cast<double>(l.global_batch) / l.dp;
        r.kv_cache_bytes = batch_per_replica * (inf.prompt_tokens() + inf.generated_tokens()) * kv * kv_prec / 2;
        r.activations_bytes = tokens * act_scale * max_layer_act;
      }
      if (moe_layers > 0)
        r.moe_buffers_bytes = 2 * (1 + cf) * moe_tokens_k * tokens * s.cost.hidden * 2 * act_scale / l.tp;
      r.comm_buffers_bytes = comm;
      r.total_bytes = r.weights_bytes + r.gradients_bytes + r.optimizer_bytes + r.activations_bytes + r.moe_buffers_bytes +
                      r.comm_buffers_bytes + r.kv_cache_bytes;
    }
  }

  MemoryReport out;
  out.ranks.resize(l.devices);
  const topo::Cluster& c = *s.cluster;
  std::vector<double> node_offload(std::max(1, c.node_count()), 0);
  for (int rank = 0; rank < l.devices; ++rank) {
    const int dp_idx = (rank / l.tp) % l.dp;
    const int stage = rank / (l.tp * l.dp);
    RankMemory r = cls[stage][dp_idx % l.ep];
    r.rank = rank;
    r.capacity_bytes = c.device_type(rank).memory_bytes();
    out.ranks[rank] = r;
    // The first rank of the least margin (margins equal within the precision policy tie).
    if (definitely_less(r.margin_bytes(), out.ranks[out.peak_rank].margin_bytes())) out.peak_rank = rank;
    out.fits &= r.fits();
    const int node = c.device(rank).node;
    if (node >= 0) node_offload[node] += r.offloaded_bytes;
  }
  out.host_offload_bytes_per_node = *std::max_element(node_offload.begin(), node_offload.end());
  if (c.spec().has_node()) out.host_memory_bytes_per_node = c.spec().node().host_memory_bytes();
  if (out.host_memory_bytes_per_node > 0 && out.host_offload_bytes_per_node > out.host_memory_bytes_per_node) out.fits = false;
  return out;
}

}  // namespace moesim::cost
