// `moesim topo show|route|check|dot` and `moesim list`.
#include "cli/cli.pb.h"
#include "cli/commands.h"
#include "common/json.h"
#include "common/progress.h"
#include "costmodel/collectives.h"
#include "costmodel/routing_model.h"
#include "topologies/cluster.h"
#include "topologies/metrics.h"
#include "topologies/registry.h"
#include "topologies/report.h"

#include <fmt/format.h>

#include <charconv>
#include <iostream>

namespace moesim::cli {
namespace {

const std::string& single_file(const Args& a) {
  if (a.positional().size() != 1)
    throw UsageError(a.positional().empty() ? "missing FILE" : "give exactly one FILE");
  return a.positional()[0];
}

// Runs `body` on a loaded cluster; config problems become exit 2 with every diagnostic.
template <typename Body>
int with_cluster(const Args& a, Body body) {
  const std::string& file = single_file(a);
  std::optional<topo::Cluster> cluster;
  try {
    cluster.emplace(topo::load_cluster(file));
  } catch (const ConfigError& e) {
    return report_config_error(e, file, a.flag("--json"));
  }
  return body(*cluster, file);
}

int topo_show(const Args& a) {
  topo::MetricsOptions options;
  options.all_sources = a.flag("--all-sources");
  options.threads = a.get_int("--threads", 0, 0, 1024);
  return with_cluster(a, [&](const topo::Cluster& c, const std::string&) {
    Progress progress("routing", 0);
    options.progress = &progress;
    report::TopologyReport r = topo::make_report(c, topo::compute_metrics(c, options));
    if (a.flag("--json")) std::cout << topo::report_json(r);
    else topo::print_report_table(r, std::cout);
    return kExitOk;
  });
}

// A device by name ("node3.gpu5") or rank ("29").
int find_device(const topo::Cluster& c, const std::string& file, const std::string& option, const std::string& ref) {
  for (int r = 0; r < c.device_count(); ++r)
    if (c.graph()[c.device(r).vertex].name == ref) return r;
  int rank = -1;
  if (auto [end, ec] = std::from_chars(ref.data(), ref.data() + ref.size(), rank);
      ec == std::errc() && end == ref.data() + ref.size() && rank >= 0 && rank < c.device_count())
    return rank;
  throw UsageError(fmt::format("{}: no device '{}' in {}: give a name ({} .. {}) or a rank (0 .. {})", option, ref, file,
                               c.graph()[c.device(0).vertex].name, c.graph()[c.devices().back().vertex].name,
                               c.device_count() - 1));
}

int topo_route(const Args& a) {
  if (!a.has("--from") || !a.has("--to")) throw UsageError("give --from and --to");
  const int max_paths = a.get_int("--paths", 1, 1, 1 << 16);
  return with_cluster(a, [&](const topo::Cluster& c, const std::string& file) {
    const int src = find_device(c, file, "--from", a.get("--from"));
    const int dst = find_device(c, file, "--to", a.get("--to"));
    report::RouteReport r = topo::make_route_report(c, src, dst, max_paths);
    if (a.flag("--json")) std::cout << to_json(r);
    else topo::print_route_table(r, std::cout);
    return kExitOk;
  });
}

int topo_check(const Args& a) {
  return with_cluster(a, [&](const topo::Cluster& c, const std::string& file) {
    if (a.flag("--json")) {
      CheckResult r;
      r.set_file(file);
      r.set_ok(true);
      r.set_device_count(c.device_count());
      r.set_node_count(c.node_count());
      r.set_link_count(c.link_count());
      std::cout << to_json(r);
    } else {
      std::cout << fmt::format("{}: ok: {} devices in {} nodes, {} links\n", file, c.device_count(), c.node_count(),
                               c.link_count());
    }
    return kExitOk;
  });
}

int topo_dot(const Args& a) {
  if (a.flag("--json")) throw UsageError("topo dot writes Graphviz; use topo show --json for JSON");
  return with_cluster(a, [&](const topo::Cluster& c, const std::string&) {
    topo::write_dot(c, std::cout);
    return kExitOk;
  });
}

template <typename T>
Registry* add_registry(ListResult& out, const moesim::Registry<T>& reg) {
  Registry* r = out.add_registries();
  r->set_kind(reg.kind());
  for (const auto& e : reg.entries()) {
    RegistryEntry* entry = r->add_entries();
    entry->set_name(e.name);
    entry->set_description(e.description);
  }
  return r;
}

int list(const Args& a) {
  if (!a.positional().empty()) throw UsageError("list takes no arguments");
  ListResult out;
  add_registry(out, topo::fabric_generators());
  add_registry(out, topo::device_presets());
  add_registry(out, cost::collective_algorithms());
  add_registry(out, cost::routing_distributions());
  if (a.flag("--json")) {
    std::cout << to_json(out);
    return kExitOk;
  }
  for (const Registry& r : out.registries()) {
    std::cout << fmt::format("{}s:\n", r.kind());
    size_t width = 16;
    for (const RegistryEntry& e : r.entries()) width = std::max(width, e.name().size() + 2);
    for (const RegistryEntry& e : r.entries()) std::cout << fmt::format("  {:<{}}{}\n", e.name(), width, e.description());
    std::cout << '\n';
  }
  return kExitOk;
}

}  // namespace

std::vector<Command> topo_commands() {
  return {
      {"topo show", "derived figures of a cluster: bandwidths, bisection, diameter, routes",
       "usage: moesim topo show FILE [--json] [--all-sources] [--threads N]\n\n"
       "  FILE           a cluster description (protobuf text format, configs/hardware/*.textproto)\n"
       "  --json         machine-readable output (device_count, node_count, link_count,\n"
       "                 bisection_bandwidth_Bps, diameter_hops, per-device bandwidths, ...)\n"
       "  --all-sources  route from every device for the diameter, even when nodes are equivalent\n"
       "  --threads N    routing threads (default: all cores)\n",
       {{"--all-sources"}, {"--threads"}}, topo_show},
      {"topo route", "the route between two devices, hop by hop, with its ECMP paths",
       "usage: moesim topo route FILE --from DEVICE --to DEVICE [--paths N] [--json]\n\n"
       "  DEVICE     a device name (node3.gpu5) or rank (29)\n"
       "  --paths N  spell out up to N of the route's equal-cost paths (default 1)\n\n"
       "Routes are shortest paths under cost = latency + 1 MiB / bandwidth per link; see docs/TOPOLOGIES.md.\n",
       {{}, {"--from", "--to", "--paths"}}, topo_route},
      {"topo check", "validate a cluster description; every problem as FILE:LINE: field: message",
       "usage: moesim topo check FILE [--json]\n\n"
       "Exit code 0 when the file is valid, 2 with every problem listed otherwise.\n",
       {}, topo_check},
      {"topo dot", "a Graphviz picture of a cluster (moesim topo dot C > c.dot; dot -Tsvg c.dot)",
       "usage: moesim topo dot FILE\n\n"
       "Devices, NICs, PCIe switches and CPUs grouped by node; one edge per physical link labelled\n"
       "with its bandwidth per direction, coloured by kind (blue scale-up, grey PCIe, red network).\n",
       {}, topo_dot},
      {"list", "registered fabric generators, device types and other pluggable parts",
       "usage: moesim list [--json]\n", {}, list},
  };
}

}  // namespace moesim::cli
