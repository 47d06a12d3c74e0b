// Loading the workload and strategy configs and checking that a (cluster, model, workload,
// strategy) quadruple makes sense together, every problem at once, each pointing at its line:
//
//   cost::Setup s = cost::load_setup(cluster_path, model_path, workload_path, strategy_path);
//   s.layout.dp;           // data-parallel degree
//   s.layout.micro_batches;
//
// Layout rules (the ones Megatron-LM uses; see costmodel/strategy.proto):
//   devices = dp * tp * pp; ep divides dp (expert-parallel groups are drawn from the data-parallel
//   ranks, each expert's matrices split over tp like the dense layers), so the expert
//   data-parallel degree is dp / ep; ep divides the experts; tp divides the attention heads and
//   the kv heads (or kv heads divide tp: GQA heads are replicated); pp * virtual_stages <= layers
//   (stages need not be equal: DeepSeek-V3 runs 61 layers on 16 stages);
//   global_batch = dp * micro_batch * micro_batches.
#pragma once

#include "common/config.h"
#include "costmodel/model.h"
#include "costmodel/strategy.pb.h"
#include "costmodel/workload.pb.h"
#include "topologies/cluster.h"

#include <memory>
#include <optional>
#include <string>

namespace moesim::cost {

// A parsed config with its file's locations (so later cross-checks can point at lines).
// Shared, so that setups differing in one file (the planner's candidates) share the others.
template <typename T>
struct Loaded {
  std::shared_ptr<T> msg;
  std::shared_ptr<ConfigDocument> doc;
  const T& operator*() const { return *msg; }
  const T* operator->() const { return msg.get(); }
};

// Parse + validate one file on its own. Throws ConfigError with every problem.
Loaded<model::Model> load_model_config(const std::string& path);
Loaded<workload::Workload> load_workload(const std::string& path);
Loaded<strategy::Strategy> load_strategy(const std::string& path);
Loaded<workload::Workload> load_workload_text(const std::string& text, const std::string& name);
Loaded<strategy::Strategy> load_strategy_text(const std::string& text, const std::string& name);
void validate_workload(const ConfigScope& scope);
// Bytes per activation element (and all-to-all payload) at the workload's precision: 4 for FP32
// and TF32, 2 for the 16-bit and FP8 precisions (activations stay 16-bit around FP8 GEMMs).
double activation_bytes(const workload::Workload& workload);
void validate_strategy(const ConfigScope& scope);

// The strategy's degrees resolved against the workload and cluster.
struct Layout {
  int devices = 0;
  int dp = 1, tp = 1, pp = 1, ep = 1;
  int virtual_stages = 1;
  int expert_dp = 1;               // dp / ep
  bool training = true;
  int64_t global_batch = 0;        // sequences (samples) per step; inference: the batch
  int64_t micro_batch = 1;         // per replica per micro-step
  int64_t micro_batches = 1;       // per step per pipeline
  int sequence = 0;                // tokens per sample (1 for CNNs)
  // Layers (indices into ModelCost::layers) held by each pipeline stage, embedding on the first
  // stage and head on the last; transformer layers split as evenly as possible, earlier stages
  // taking the remainder.
  std::vector<std::vector<int>> stage_layers;

  // The device rank of (pipeline stage, data-parallel index, tensor-parallel index).
  int rank(int stage, int dp_index, int tp_index) const { return tp_index + tp * (dp_index + dp * stage); }
};

// Checks the strategy and workload against the model and the device count; reports problems on
// the strategy's and workload's lines. Returns the layout (valid only when nothing was reported).
Layout check_layout(int devices, const model::Model& model, const ModelCost& cost,
                    const Loaded<workload::Workload>& workload, const Loaded<strategy::Strategy>& strategy,
                    Diagnostics* diags);

struct Setup {
  std::shared_ptr<topo::Cluster> cluster;
  Loaded<model::Model> model;
  Loaded<workload::Workload> workload;
  Loaded<strategy::Strategy> strategy;
  ModelCost cost;  // analysed at the workload's sequence length
  Layout layout;
};

// Loads all four (each file validated on its own, then together); throws ConfigError listing
// every problem of every file.
Setup load_setup(const std::string& cluster_path, const std::string& model_path, const std::string& workload_path,
                 const std::string& strategy_path);

// The same cluster, model and workload (shared, not reloaded) with another strategy: the layout
// checked again. Throws ConfigError with the strategy's problems.
Setup with_strategy(const Setup& base, Loaded<strategy::Strategy> strategy);

// A config given by path, or as text named `path` (a config inlined in another file: the text
// keeps that file's line numbers, so diagnostics point into it).
struct ConfigSource {
  std::string path;
  std::optional<std::string> text;
};
Setup load_setup(const ConfigSource& cluster, const ConfigSource& model, const ConfigSource& workload,
                 const ConfigSource& strategy);

// The cluster, model and workload alone (no strategy, no layout): what the planner starts from.
// Throws ConfigError with every problem of the three.
Setup load_setup_without_strategy(const ConfigSource& cluster, const ConfigSource& model, const ConfigSource& workload);

}  // namespace moesim::cost
