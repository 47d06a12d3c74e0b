#include "planner/plan_file.h"

#include "common/config.h"
#include "planner/plan.pb.h"

#include <fmt/format.h>
#include <google/protobuf/text_format.h>

#include <filesystem>
#include <optional>

namespace moesim::planner {

sim::Scenario load_plan(const std::string& path) {
  namespace fs = std::filesystem;
  plan::Plan p;
  ConfigDocument doc = ConfigDocument::parse_file(path, &p);
  Diagnostics diags;
  ConfigScope root = doc.root(&diags);
  const fs::path dir = fs::path(path).parent_path();
  auto input = [&](const char* field, const std::string& rel) {
    const fs::path f = fs::path(rel).is_absolute() ? fs::path(rel) : dir / rel;
    if (rel.empty()) root.error(field, "missing");
    else if (!fs::is_regular_file(f)) root.error(field, fmt::format("no such file: {}", f.string()));
    return f.lexically_normal().string();
  };
  const std::string cluster = input("cluster", p.cluster()), model = input("model", p.model()), workload = input("workload", p.workload());
  const std::string profile = p.has_device_profile() ? input("device_profile", p.device_profile()) : std::string();
  if (!p.has_strategy()) root.error("strategy", "missing");
  for (int r = 0; r < p.device_of_rank_size(); ++r)
    if (p.device_of_rank(r) != r) {
      root.error("device_of_rank", "placements other than rank r on device r are not supported yet", r);
      break;
    }
  diags.throw_if_any();

  // The workload as the plan chose it: parsed, its knobs replaced, validated as text named after
  // the workload file.
  const cost::Loaded<workload::Workload> w = cost::load_workload(workload);
  workload::Workload chosen = *w;
  if (chosen.has_training()) {
    if (p.has_micro_batch()) chosen.mutable_training()->set_micro_batch(p.micro_batch());
    if (p.has_recompute()) chosen.mutable_training()->set_recompute(p.recompute());
  }
  std::string workload_text, strategy_text;
  google::protobuf::TextFormat::PrintToString(chosen, &workload_text);
  google::protobuf::TextFormat::PrintToString(p.strategy(), &strategy_text);

  // The plan's share of the cluster: its first `nodes` nodes.
  std::optional<std::string> cluster_text;
  if (p.has_nodes()) {
    const topo::Cluster full = topo::load_cluster(cluster);
    hw::Cluster spec = full.spec();
    if (!spec.has_node() || p.nodes() < 1 || p.nodes() > spec.nodes()) {
      root.error("nodes", fmt::format("{} is not between 1 and the cluster's {} nodes", p.nodes(), spec.nodes()));
      diags.throw_if_any();
    }
    spec.set_nodes(p.nodes());
    cluster_text.emplace();
    google::protobuf::TextFormat::PrintToString(spec, &*cluster_text);
  }

  sim::Scenario s;
  s.path = path;
  s.name = p.has_name() ? p.name() : fs::path(path).stem().string();
  s.seed = p.seed();
  s.setup = cost::load_setup(cost::ConfigSource{cluster, cluster_text}, cost::ConfigSource{model, std::nullopt},
                             cost::ConfigSource{workload, workload_text}, cost::ConfigSource{path + "#strategy", strategy_text});
  s.cluster = cluster;
  s.model = model;
  s.workload = workload;
  s.strategy = fmt::format("{}#strategy", path);
  if (!profile.empty()) s.profile = cost::load_device_profile(profile);
  return s;
}

}  // namespace moesim::planner
