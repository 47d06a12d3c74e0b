// The search (planner/planner.h): enumerate, prune by divisibility and memory, rank by the analytic
// estimate, simulate the best, rank again by simulated step time.
#include "costmodel/memory.h"
#include "planner/estimate.h"
#include "planner/planner.h"
#include "planner/space.h"
#include "schedule/lowering.h"
#include "sim/engine.h"

#include <fmt/format.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <chrono>
#include <map>

namespace moesim::planner {
namespace {

struct Survivor {
  Candidate candidate;
  double estimate_s = 0;
  std::string bottleneck;
  double peak_bytes = 0;
  int peak_rank = 0;
};

// The workload with the candidate's micro-batch size and recompute mode, loaded once per pair.
class Workloads {
 public:
  explicit Workloads(const cost::Setup& base) : base_(base) {}
  const cost::Setup& for_candidate(const Candidate& c) {
    const auto key = std::make_pair(c.micro_batch, static_cast<int>(c.recompute));
    auto it = setups_.find(key);
    if (it != setups_.end()) return it->second;
    workload::Workload w = *base_.workload;
    if (w.has_training()) {
      w.mutable_training()->set_micro_batch(c.micro_batch);
      w.mutable_training()->set_recompute(c.recompute);
    }
    std::string text;
    google::protobuf::TextFormat::PrintToString(w, &text);
    cost::Setup s = base_;
    s.workload = cost::load_workload_text(text, base_.workload.doc ? base_.workload.doc->file() : "workload");
    return setups_.emplace(key, std::move(s)).first->second;
  }

 private:
  const cost::Setup& base_;
  std::map<std::pair<int64_t, int>, cost::Setup> setups_;
};

cost::Setup setup_of(Workloads& workloads, const Candidate& c) {
  std::string text;
  google::protobuf::TextFormat::PrintToString(c.strategy, &text);
  return cost::with_strategy(workloads.for_candidate(c), cost::load_strategy_text(text, c.strategy.name()));
}

std::string bottleneck_of(const std::map<std::string, double>& breakdown) {
  std::string best = "compute";
  double most = 0;
  for (const auto& [k, v] : breakdown)
    if (k != "compute" && v > most) most = v, best = k;
  auto c = breakdown.find("compute");
  return c != breakdown.end() && c->second >= most ? "compute" : best;
}

// The search on one cluster: every candidate, pruned, estimated, the best simulated.
SearchResult search_cluster(cost::Setup loaded, const SearchOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  SearchResult out;
  out.base = std::move(loaded);
  const cost::Setup& base = out.base;
  const bool training = base.workload->has_training();
  // The base layout's global batch and sequence (enumerate reads them); dp = 1 needs no division.
  out.base.layout.global_batch = training ? base.workload->training().global_batch() : base.workload->inference().batch();

  const Space space = enumerate(base, o);
  out.layouts_considered = space.layouts;
  out.candidates = static_cast<int64_t>(space.candidates.size());
  out.pruned_divisibility = space.pruned_divisibility;

  Workloads workloads(base);
  Estimator estimator(*base.cluster, o.profile);
  std::vector<Survivor> survivors;
  // Memory depends on neither the all-to-all algorithm nor the overlap chunks: one estimate per rest.
  std::map<std::string, MemorySummary> memory_cache;
  double closest_overflow = -1;
  std::string closest;
  size_t done = 0;
  auto consider = [&](const std::vector<Candidate>& candidates) {
  for (const Candidate& c : candidates) {
    if (o.progress && (++done % 256 == 0 || done == candidates.size())) o.progress(done, candidates.size());
    std::optional<cost::Setup> s;
    try {
      s.emplace(setup_of(workloads, c));
    } catch (const ConfigError&) {
      ++out.pruned_divisibility;  // heads, kv heads or experts that tp / ep do not divide, ...
      continue;
    }
    strategy::Strategy mem_key = c.strategy;
    mem_key.clear_all_to_all();
    mem_key.clear_overlap_chunks();
    mem_key.clear_name();
    const std::string key = mem_key.SerializeAsString() + fmt::format("|{}|{}", c.micro_batch, static_cast<int>(c.recompute));
    auto it = memory_cache.find(key);
    if (it == memory_cache.end()) it = memory_cache.emplace(key, summarize(cost::estimate_memory(*s))).first;
    const MemorySummary& mem = it->second;
    if (!mem.fits) {
      ++out.pruned_memory;
      const double over = mem.peak_bytes - mem.capacity_bytes;
      if (closest_overflow < 0 || over < closest_overflow) {
        closest_overflow = over;
        closest = fmt::format("{} needs {:.1f} GB on rank {} of {:.1f} GB", c.strategy.name(), mem.peak_bytes / 1e9, mem.peak_rank,
                              mem.capacity_bytes / 1e9);
      }
      continue;
    }
    Survivor sv{c, 0, "", mem.peak_bytes, mem.peak_rank};
    const Estimate e = estimator.estimate(*s, mem);
    sv.estimate_s = e.step_s;
    sv.bottleneck = e.bottleneck;
    survivors.push_back(std::move(sv));
  }
  };
  consider(space.candidates);
  // Nothing fits: expert offload (half, then all of each rank's expert weights in host memory,
  // prefetched a layer ahead) for MoE models, unless the user pinned offload.
  bool moe = false;
  for (const cost::Layer& layer : base.cost.layers) moe |= layer.moe;
  if (survivors.empty() && moe && !o.pinned.has_offload()) {
    for (double fraction : {0.5, 1.0}) {
      std::vector<Candidate> offloaded = space.candidates;
      for (Candidate& c : offloaded) {
        c.strategy.mutable_offload()->set_expert_fraction(fraction);
        c.strategy.mutable_offload()->set_prefetch_layers(1);
        c.strategy.set_name(fmt::format("{} offload{:g}", c.strategy.name(), fraction));
      }
      out.candidates += static_cast<int64_t>(offloaded.size());
      done = 0;
      consider(offloaded);
      if (!survivors.empty()) break;
    }
  }
  if (survivors.empty()) {
    out.no_plan_reason = closest.empty() ? "no strategy divides this cluster, model and workload"
                                         : fmt::format("no strategy fits in device memory; the closest: {}", closest);
    out.search_wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return out;
  }
  std::stable_sort(survivors.begin(), survivors.end(), [](const Survivor& a, const Survivor& b) { return a.estimate_s < b.estimate_s; });

  // The best by estimate, simulated.
  const size_t n_sim = std::min(survivors.size(), static_cast<size_t>(std::max(0, o.simulate_top)));
  std::vector<RankedPlan> ranked;
  for (size_t i = 0; i < survivors.size() && (i < n_sim || ranked.size() < static_cast<size_t>(o.top)); ++i) {
    const Survivor& sv = survivors[i];
    const cost::Setup setup = setup_of(workloads, sv.candidate);
    RankedPlan rp;
    rp.estimate_s = sv.estimate_s;
    rp.step_time_s = sv.estimate_s;
    plan::Plan& p = rp.plan;
    *p.mutable_strategy() = sv.candidate.strategy;
    p.set_seed(o.seed);
    if (training) {
      p.set_micro_batch(sv.candidate.micro_batch);
      p.set_recompute(sv.candidate.recompute);
    }
    plan::Prediction* pr = p.mutable_predicted();
    pr->set_estimate_s(sv.estimate_s);
    pr->set_peak_memory_bytes(sv.peak_bytes);
    pr->set_peak_rank(sv.peak_rank);
    pr->set_bottleneck(sv.bottleneck);
    if (i < n_sim) {
      schedule::LoweringOptions lo;
      lo.seed = o.seed;
      lo.routing_samples = o.routing_samples;
      lo.profile = o.profile;
      const schedule::Schedule sch = schedule::lower(setup, lo);
      sim::SimOptions so;
      so.network = sch.folded() ? sim::NetworkMode::kAnalytic : sim::NetworkMode::kFlows;
      so.record_trace = false;
      const sim::SimResult r = sim::simulate(sch, *setup.cluster, so);
      ++out.simulated;
      rp.simulated = true;
      rp.step_time_s = r.step_time_s;
      pr->set_simulated(true);
      pr->set_peak_memory_bytes(r.peak_memory_bytes);
      pr->set_peak_rank(r.peak_rank);
      const sim::RankResult& b = sim::bottleneck_rank(r);
      for (const auto& [k, v] : b.breakdown) (*pr->mutable_breakdown())[k] = v;
      pr->set_bottleneck(bottleneck_of(b.breakdown));
    }
    pr->set_step_time_s(rp.step_time_s);
    if (rp.step_time_s > 0) {
      pr->set_samples_per_s(static_cast<double>(setup.layout.global_batch) / rp.step_time_s);
      if (setup.cost.per_token) {
        const double tokens = training ? static_cast<double>(setup.layout.global_batch) * setup.layout.sequence
                                       : static_cast<double>(setup.layout.global_batch) *
                                             (base.workload->inference().prompt_tokens() + base.workload->inference().generated_tokens());
        pr->set_tokens_per_s(tokens / rp.step_time_s);
      }
    }
    ranked.push_back(std::move(rp));
  }
  // Simulated plans by their simulated time; the rest after them by their estimate.
  std::stable_sort(ranked.begin(), ranked.end(), [](const RankedPlan& a, const RankedPlan& b) {
    if (a.simulated != b.simulated) return a.simulated;
    return a.step_time_s < b.step_time_s;
  });
  if (ranked.size() > static_cast<size_t>(o.top)) ranked.resize(static_cast<size_t>(std::max(1, o.top)));
  for (size_t i = 0; i < ranked.size(); ++i) ranked[i].plan.set_rank_in_search(static_cast<int>(i) + 1);
  out.plans = std::move(ranked);
  if (o.target_tokens_per_s > 0 && !out.plans.empty() && out.plans[0].plan.predicted().tokens_per_s() < o.target_tokens_per_s)
    out.no_plan_reason = fmt::format("no plan reaches {:.0f} tokens/s; the closest, {}, reaches {:.0f} tokens/s, its bottleneck {}",
                                     o.target_tokens_per_s, out.plans[0].plan.strategy().name(),
                                     out.plans[0].plan.predicted().tokens_per_s(), out.plans[0].plan.predicted().bottleneck());
  out.search_wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

// The cluster with only its first `nodes` nodes, as text named after it.
cost::ConfigSource with_nodes(const topo::Cluster& cluster, int nodes) {
  hw::Cluster spec = cluster.spec();
  spec.set_nodes(nodes);
  std::string text;
  google::protobuf::TextFormat::PrintToString(spec, &text);
  return {fmt::format("{} (first {} nodes)", cluster.source(), nodes), text};
}

double tokens_per_step(const cost::Setup& s) {
  const workload::Workload& w = *s.workload;
  if (w.has_training()) return static_cast<double>(w.training().global_batch()) * (s.cost.per_token ? s.cost.sequence : 1);
  return static_cast<double>(w.inference().batch()) * (w.inference().prompt_tokens() + w.inference().generated_tokens());
}

}  // namespace

SearchResult search(const cost::ConfigSource& cluster, const cost::ConfigSource& model, const cost::ConfigSource& workload,
                    const SearchOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  cost::Setup full = cost::load_setup_without_strategy(cluster, model, workload);
  if (o.objective == Objective::kStepTime) {
    SearchResult r = search_cluster(std::move(full), o);
    const double price = r.base.cluster->spec().price_per_device_hour();
    const double tokens = tokens_per_step(r.base);
    if (price > 0 && tokens > 0)
      for (RankedPlan& p : r.plans)
        p.plan.mutable_predicted()->set_cost_per_million_tokens(price * r.base.cluster->device_count() * p.step_time_s / 3600 / tokens * 1e6);
    return r;
  }

  const hw::Cluster& spec = full.cluster->spec();
  if (!spec.has_node() || spec.has_graph())
    throw std::invalid_argument("cost and fewest-devices objectives need a cluster of `nodes` copies of a node template");
  if (o.objective == Objective::kCostPerToken && !spec.has_price_per_device_hour())
    throw std::invalid_argument(fmt::format("{}: the cost objective needs price_per_device_hour in the cluster", full.cluster->source()));
  if (o.objective == Objective::kFewestDevices && !(o.target_tokens_per_s > 0))
    throw std::invalid_argument("the fewest-devices objective needs a target (--target-tokens-per-s)");
  const double price = spec.price_per_device_hour();

  // 1, 2, 4, ... nodes, and all of them.
  std::vector<int> counts;
  for (int n = 1; n < spec.nodes(); n *= 2) counts.push_back(n);
  counts.push_back(spec.nodes());
  SearchResult out;
  std::string best_reach;
  double best_tokens = -1;
  for (int n : counts) {
    std::optional<cost::Setup> part;
    try {
      part.emplace(n == spec.nodes() ? full : cost::load_setup_without_strategy(with_nodes(*full.cluster, n), model, workload));
    } catch (const ConfigError&) {
      continue;  // a fabric that cannot be cut to n nodes
    }
    SearchResult r = search_cluster(std::move(*part), o);
    out.layouts_considered += r.layouts_considered;
    out.candidates += r.candidates;
    out.pruned_divisibility += r.pruned_divisibility;
    out.pruned_memory += r.pruned_memory;
    out.simulated += r.simulated;
    const int devices = r.base.cluster->device_count();
    const double tokens = tokens_per_step(r.base);
    for (RankedPlan& p : r.plans) {
      p.nodes = n;
      p.plan.set_nodes(n);
      const double step = p.step_time_s;
      if (price > 0 && tokens > 0)
        p.plan.mutable_predicted()->set_cost_per_million_tokens(price * devices * step / 3600 / tokens * 1e6);
    }
    if (!r.plans.empty() && r.plans[0].plan.predicted().tokens_per_s() > best_tokens) {
      best_tokens = r.plans[0].plan.predicted().tokens_per_s();
      best_reach = fmt::format("{} on {} nodes ({:.0f} tokens/s, bottleneck {})", r.plans[0].plan.strategy().name(), n, best_tokens,
                               r.plans[0].plan.predicted().bottleneck());
    }
    if (o.objective == Objective::kFewestDevices) {
      if (!r.plans.empty() && r.plans[0].plan.predicted().tokens_per_s() >= o.target_tokens_per_s) {
        out.plans = std::move(r.plans);
        out.base = std::move(r.base);
        break;
      }
      continue;
    }
    for (RankedPlan& p : r.plans) out.plans.push_back(std::move(p));
    if (n == spec.nodes()) out.base = std::move(r.base);
  }
  if (o.objective == Objective::kCostPerToken) {
    std::stable_sort(out.plans.begin(), out.plans.end(), [](const RankedPlan& a, const RankedPlan& b) {
      return a.plan.predicted().cost_per_million_tokens() < b.plan.predicted().cost_per_million_tokens();
    });
    if (out.plans.size() > static_cast<size_t>(o.top)) out.plans.resize(static_cast<size_t>(o.top));
  } else if (out.plans.empty()) {
    out.no_plan_reason = best_tokens < 0 ? "no strategy fits on any node count"
                                         : fmt::format("no node count reaches {:.0f} tokens/s; the closest: {}", o.target_tokens_per_s,
                                                       best_reach);
  }
  for (size_t i = 0; i < out.plans.size(); ++i) out.plans[i].plan.set_rank_in_search(static_cast<int>(i) + 1);
  out.search_wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

}  // namespace moesim::planner
