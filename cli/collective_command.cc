// `moesim collective`: the analytic (alpha-beta) cost of one collective over ranks of a cluster.
#include "cli/commands.h"
#include "common/json.h"
#include "common/units.h"
#include "costmodel/collectives.h"
#include "costmodel/collectives.pb.h"
#include "topologies/cluster.h"

#include <fmt/format.h>

#include <array>
#include <charconv>
#include <cmath>
#include <iostream>
#include <optional>
#include <utility>

namespace moesim::cli {
namespace {

constexpr std::array<std::pair<std::string_view, double>, 12> kByteUnits = {{
    {"", 1},
    {"B", 1},
    {"KB", 1e3},
    {"kB", 1e3},
    {"MB", 1e6},
    {"GB", 1e9},
    {"TB", 1e12},
    {"KiB", 1024.0},
    {"MiB", 1024.0 * 1024},
    {"GiB", 1024.0 * 1024 * 1024},
    {"TiB", 1024.0 * 1024 * 1024 * 1024},
    {"bytes", 1},
}};

// "4096", "64MiB", "1.5 GB", "1e6" -> bytes.
double parse_bytes(const std::string& text) {
  auto bad = [&] {
    return UsageError(fmt::format(
        "--bytes: expected a positive size such as 4096, 64MiB or 1.5GB (units B, KB, MB, GB, TB, KiB, MiB, GiB, "
        "TiB), got '{}'",
        text));
  };
  double value = 0;
  const char* end = text.data() + text.size();
  auto [rest, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc()) throw bad();
  while (rest != end && *rest == ' ') ++rest;
  const std::string_view unit(rest, end - rest);
  for (const auto& [name, scale] : kByteUnits) {
    if (name != unit) continue;
    const double bytes = value * scale;
    if (!std::isfinite(bytes) || bytes <= 0) throw bad();
    return bytes;
  }
  throw bad();
}

int parse_rank(std::string_view s, const std::string& whole) {
  int v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size() || v < 0)
    throw UsageError(fmt::format("--ranks: expected N or a list such as 0-7,16-23, got '{}'", whole));
  return v;
}

// "N": the first N devices; "0-7,16-23,40": ranks and ranges, in this order.
std::vector<int> parse_ranks(const std::string& text, int devices) {
  if (text.find_first_of(",-") == std::string::npos) {
    const int n = parse_rank(text, text);
    if (n > devices) throw UsageError(fmt::format("--ranks {}: the cluster has {} devices", n, devices));
    return cost::first_ranks(n);
  }
  std::vector<int> ranks;
  for (size_t start = 0; start <= text.size();) {
    size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    const std::string_view item(text.data() + start, comma - start);
    const size_t dash = item.find('-');
    const int lo = parse_rank(item.substr(0, dash), text);
    const int hi = dash == std::string_view::npos ? lo : parse_rank(item.substr(dash + 1), text);
    if (hi < lo) throw UsageError(fmt::format("--ranks: range {}-{} runs backwards", lo, hi));
    if (hi >= devices)
      throw UsageError(fmt::format("--ranks: rank {} is out of range: the cluster has ranks 0 .. {}", hi, devices - 1));
    for (int r = lo; r <= hi; ++r) ranks.push_back(r);
    start = comma + 1;
  }
  return ranks;
}

void print_table(const report::CollectiveReport& r, std::ostream& out) {
  out << fmt::format("{:<11}{}\n", "op", r.op());
  out << fmt::format("{:<11}{}\n", "algorithm", r.algorithm());
  out << fmt::format("{:<11}{} on {} node{} of {}\n", "ranks", r.ranks(), r.nodes(), r.nodes() == 1 ? "" : "s",
                     r.cluster());
  out << fmt::format("{:<11}{} ({:.0f} B, {})\n", "size", format_bytes(r.size_bytes()), r.size_bytes(),
                     r.size_meaning());
  out << fmt::format("{:<11}{}\n", "time", format_seconds(r.time_s()));
  out << fmt::format("{:<11}{}  ({} steps x (overhead {} + message latency: route, and rendezvous over the "
                     "eager limit))\n",
                     "  latency", format_seconds(r.latency_s()), r.steps(), format_seconds(r.step_overhead_s()));
  out << fmt::format("{:<11}{}  (bytes over shared bandwidth)\n", "  transfer", format_seconds(r.transfer_s()));
  out << fmt::format("{:<11}{}  (size / time)\n", "algBw", format_bandwidth(r.alg_bw_bps()));
  out << fmt::format("{:<11}{}  (algBw x {})\n", "busBw", format_bandwidth(r.bus_bw_bps()), r.bus_factor_formula());
  out << fmt::format("{:<11}{} = {:.4g} for n = {}\n", "factor", r.bus_factor_formula(), r.bus_factor(), r.ranks());
}

int collective(const Args& a) {
  if (!a.positional().empty()) throw UsageError("collective takes no positional arguments; give the cluster with --cluster");
  for (const char* option : {"--cluster", "--op", "--bytes"})
    if (!a.has(option)) throw UsageError(fmt::format("give {}", option));
  cost::CollectiveOp op;
  cost::CollectiveAlgo algo;
  try {
    op = cost::parse_op(a.get("--op"));
    algo = a.has("--algo") ? cost::parse_algo(a.get("--algo")) : cost::default_algo(op);
  } catch (const cost::CollectiveError& e) {
    throw UsageError(e.what());
  }
  const double bytes = parse_bytes(a.get("--bytes"));
  cost::CollectiveParams params;
  params.step_overhead_s = a.get_double("--step-overhead", params.step_overhead_s, 0, 1);

  const std::string file = a.get("--cluster");
  std::optional<topo::Cluster> cluster;
  try {
    cluster.emplace(topo::load_cluster(file));
  } catch (const ConfigError& e) {
    return report_config_error(e, file, a.flag("--json"));
  }
  const std::vector<int> ranks =
      a.has("--ranks") ? parse_ranks(a.get("--ranks"), cluster->device_count()) : cost::first_ranks(cluster->device_count());

  report::CollectiveReport r;
  try {
    cost::CollectiveModel model(*cluster, params);
    const cost::CollectiveCost c = model.cost(op, algo, ranks, bytes);
    r.set_cluster(cluster->name());
    r.set_file(file);
    r.set_op(std::string(cost::op_name(op)));
    r.set_algorithm(c.algorithm);
    r.set_ranks(static_cast<int>(ranks.size()));
    r.set_nodes(model.node_count(ranks));
    for (int rank : ranks) r.add_rank_list(rank);
    r.set_size_bytes(bytes);
    r.set_size_meaning(std::string(cost::size_meaning(op)));
    r.set_time_s(c.time_s);
    r.set_latency_s(c.latency_s);
    r.set_transfer_s(c.transfer_s);
    r.set_steps(c.steps);
    r.set_alg_bw_bps(c.alg_bw_Bps);
    r.set_bus_bw_bps(c.bus_bw_Bps);
    r.set_bus_factor(c.bus_factor);
    r.set_bus_factor_formula(std::string(cost::bus_factor_formula(op)));
    r.set_step_overhead_s(params.step_overhead_s);
  } catch (const cost::CollectiveError& e) {
    std::cerr << fmt::format("moesim collective: {}\n", e.what());
    return kExitBadInput;
  }
  if (a.flag("--json")) std::cout << to_json(r);
  else print_table(r, std::cout);
  return kExitOk;
}

std::string collective_help() {
  std::string algos;
  for (const auto& e : cost::collective_algorithms().entries())
    algos += fmt::format("    {:<26}{}\n", e.name, e.description);
  return fmt::format(
      "usage: moesim collective --cluster FILE --op OP --bytes SIZE [--ranks RANKS] [--algo ALGO]\n"
      "                         [--step-overhead SECONDS] [--json]\n\n"
      "  --cluster FILE    a cluster description (configs/hardware/*.textproto)\n"
      "  --op OP           all_reduce, all_gather, reduce_scatter, all_to_all, send_recv, broadcast\n"
      "  --bytes SIZE      the size as nccl-tests counts it: the per-rank buffer (all_reduce, all_to_all),\n"
      "                    the total output (all_gather), the total input (reduce_scatter), the message\n"
      "                    (send_recv, broadcast). Bytes with an optional unit: B, KB, MB, GB, TB (powers\n"
      "                    of 1000) or KiB, MiB, GiB, TiB (powers of 1024): 4096, 64MiB, 1.5GB\n"
      "  --ranks RANKS     N for the first N devices, or ranks and ranges in ring order: 0-7,16-23\n"
      "                    (default: every device)\n"
      "  --algo ALGO       the op's algorithm (default: ring; direct for all_to_all and send_recv;\n"
      "                    tree for broadcast):\n"
      "{}"
      "  --step-overhead SECONDS\n"
      "                    software cost of one step on top of the route latency (default {})\n"
      "  --json            machine-readable output (time_s, latency_s, transfer_s, alg_bw_Bps,\n"
      "                    bus_bw_Bps, bus_factor, ...)\n\n"
      "An alpha-beta estimate: each step costs overhead + message latency + bytes / bandwidth, with\n"
      "device ports and NICs shared by the flows crossing them at once (formulas in\n"
      "costmodel/collectives.h). A message's latency is its route's, and the cluster's rendezvous\n"
      "latency more when it is over the collective library's eager limit (hardware.proto Rendezvous).\n"
      "algBw = size / time; busBw = algBw x factor as nccl-tests defines it: all_reduce 2(n-1)/n;\n"
      "all_gather, reduce_scatter, all_to_all (n-1)/n; send_recv, broadcast 1.\n",
      algos, cost::kDefaultStepOverhead_s);
}

}  // namespace

std::vector<Command> collective_commands() {
  return {
      {"collective", "analytic time and algBw/busBw of a collective over ranks of a cluster", collective_help(),
       {{}, {"--cluster", "--op", "--bytes", "--ranks", "--algo", "--step-overhead"}}, collective},
  };
}

}  // namespace moesim::cli
