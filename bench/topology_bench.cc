// Topology benchmark: building, routing and deriving figures on big clusters.
//   make bench        (or build/bench/topology_bench [--json]; configs are found in the source tree)
// Targets (issue: foundation and topologies):
//   h800-2048: build + all-pairs device routes < 1 s;
//   16,384-GPU rail-optimised (h100-16k): build + derived figures < 10 s and < 2 GiB peak memory.
// The machine is noisy, so ratios measured side by side in the same run are printed too.
// Peak memory is the process's high-water mark (getrusage ru_maxrss) after each phase; the
// clusters are measured one after the other, each freed before the next is loaded.
#include "common/error.h"
#include "topologies/metrics.h"
#include "topologies/routing.h"

#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace moesim;

namespace {

#ifndef MOESIM_SOURCE_DIR
#define MOESIM_SOURCE_DIR "."
#endif
const std::string kConfigDir = std::string(MOESIM_SOURCE_DIR) + "/configs/hardware/";

constexpr double kMiB = 1 << 20;
constexpr double kGiB = 1 << 30;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Peak resident memory of this process so far, bytes (Linux reports ru_maxrss in KiB).
double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024;
}

// One timed phase: wall time and the memory high-water mark right after it.
struct Phase {
  std::string cluster, what;
  double seconds = 0;
  double peak_rss_bytes = 0;
};

struct Ratio {
  std::string what;
  double value = 0;
};

struct Target {
  std::string what, measured;
  bool pass = false;
};

struct Report {
  int cores = 1;
  std::vector<Phase> phases;
  std::vector<Ratio> ratios;
  std::vector<Target> targets;
  std::vector<std::pair<std::string, std::string>> facts;  // counts and derived figures, for the record
};

template <typename Fn>
double timed(Report& rep, const std::string& cluster, const std::string& what, Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  const double s = seconds_since(t0);
  rep.phases.push_back({cluster, what, s, peak_rss_bytes()});
  return s;
}

struct Routing {
  uint64_t routes = 0;       // source != destination pairs
  uint64_t unreachable = 0;  // among them
};

// Router construction plus routes from every listed source.
Routing route_from(const topo::Cluster& c, const std::vector<int>& sources, int threads) {
  topo::Router router(c);
  std::atomic<uint64_t> routes{0}, unreachable{0};
  topo::for_each_source(router, sources, threads, [&](int src, const std::vector<topo::RouteSummary>& r) {
    uint64_t bad = 0;
    for (int d = 0; d < c.device_count(); ++d) bad += d != src && !r[d].reachable();
    routes += r.size() - 1;
    unreachable += bad;
  });
  return {routes.load(), unreachable.load()};
}

// `count` distinct sources spread over the cluster: the stride is one more than N / count, so
// consecutive samples differ in node, group and local index (rail) alike.
std::vector<int> spread_sources(int devices, int count) {
  std::vector<int> out;
  const int64_t stride = devices / count + 1;
  for (int64_t i = 0; i < count && i < devices; ++i) out.push_back(static_cast<int>((i * stride) % devices));
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::string reachability(const Routing& r) {
  return r.unreachable == 0 ? "all reachable" : fmt::format("{} UNREACHABLE", r.unreachable);
}

void bench_h800(Report& rep) {
  const std::string name = "h800-2048";
  std::optional<topo::Cluster> c;
  const double build_s = timed(rep, name, "build (parse, validate, graph)",
                               [&] { c.emplace(topo::load_cluster(kConfigDir + "h800-2048.textproto")); });
  std::vector<int> all(c->device_count());
  for (int r = 0; r < c->device_count(); ++r) all[r] = r;

  Routing many, one;
  const double many_s = timed(rep, name, fmt::format("all-pairs routes, {} threads", rep.cores),
                              [&] { many = route_from(*c, all, rep.cores); });
  const double one_s = timed(rep, name, "all-pairs routes, 1 thread", [&] { one = route_from(*c, all, 1); });
  topo::TopologyMetrics m;
  timed(rep, name, "derived figures (compute_metrics)", [&] { m = topo::compute_metrics(*c); });

  rep.ratios.push_back({fmt::format("h800-2048 all-pairs routes: 1 thread / {} threads", rep.cores), one_s / many_s});
  rep.facts.emplace_back("h800-2048 graph", fmt::format("{} vertices, {} directed links", c->vertex_count(),
                                                        c->directed_link_count()));
  rep.facts.emplace_back("h800-2048 all-pairs routes", fmt::format("{} routes, {}", many.routes, reachability(many)));
  rep.facts.emplace_back("h800-2048 derived figures",
                         fmt::format("bisection {:.4g} TB/s, diameter {} hops, {} sources examined",
                                     m.bisection_bandwidth_Bps / 1e12, m.diameter_hops, m.sources_examined));
  const double total = build_s + many_s;
  rep.targets.push_back({"h800-2048 build + all-pairs routes < 1 s",
                         fmt::format("{:.3f} s ({})", total, reachability(many)),
                         total < 1.0 && many.unreachable == 0 && many.routes > 0});
}

void bench_16k(Report& rep) {
  const std::string name = "h100-16k";
  std::optional<topo::Cluster> c;
  const double build_s = timed(rep, name, "build (parse, validate, graph)",
                               [&] { c.emplace(topo::load_cluster(kConfigDir + "h100-16k.textproto")); });
  topo::TopologyMetrics m;
  const double metrics_s = timed(rep, name, "derived figures (compute_metrics)", [&] { m = topo::compute_metrics(*c); });
  const double metrics_rss = rep.phases.back().peak_rss_bytes;

  // One of compute_metrics' bisection max-flows on its own (ranks [0, N/2) vs the rest), to show
  // how its time splits between max-flows and routing.
  std::vector<uint8_t> halves(c->device_count());
  for (int r = 0; r < c->device_count(); ++r) halves[r] = r >= c->device_count() / 2;
  double cut_Bps = 0;
  timed(rep, name, "  of which: one bisection max-flow (cut_bandwidth)", [&] { cut_Bps = topo::cut_bandwidth(*c, halves); });

  // All 268M pairs are not needed by anything; a sample gives the per-source cost.
  const std::vector<int> sample = spread_sources(c->device_count(), 64);
  Routing many, one;
  const double many_s = timed(rep, name, fmt::format("routes from {} sources, {} threads", sample.size(), rep.cores),
                              [&] { many = route_from(*c, sample, rep.cores); });
  const double one_s = timed(rep, name, fmt::format("routes from {} sources, 1 thread", sample.size()),
                             [&] { one = route_from(*c, sample, 1); });

  rep.ratios.push_back({fmt::format("h100-16k sampled routes: 1 thread / {} threads", rep.cores), one_s / many_s});
  rep.facts.emplace_back("h100-16k graph", fmt::format("{} vertices, {} directed links", c->vertex_count(),
                                                       c->directed_link_count()));
  rep.facts.emplace_back("h100-16k sampled routes", fmt::format("{} routes, {}", many.routes, reachability(many)));
  rep.facts.emplace_back("h100-16k one source, 1 thread", fmt::format("{:.2f} ms", one_s / sample.size() * 1e3));
  rep.facts.emplace_back("h100-16k all-pairs estimate",
                         fmt::format("{:.0f} s on {} threads ({} sources x {:.2f} ms per source)",
                                     many_s / sample.size() * c->device_count(), rep.cores, c->device_count(),
                                     many_s / sample.size() * 1e3));
  rep.facts.emplace_back("h100-16k derived figures",
                         fmt::format("bisection {:.4g} TB/s (halves cut alone {:.4g} TB/s), diameter {} hops, "
                                     "{} sources examined",
                                     m.bisection_bandwidth_Bps / 1e12, cut_Bps / 1e12, m.diameter_hops,
                                     m.sources_examined));
  const double total = build_s + metrics_s;
  rep.targets.push_back({"16,384-GPU rail-optimised build + metrics < 10 s", fmt::format("{:.3f} s", total),
                         total < 10.0});
  rep.targets.push_back({"16,384-GPU rail-optimised build + metrics < 2 GiB",
                         fmt::format("{:.0f} MiB peak after metrics, {:.0f} MiB whole run", metrics_rss / kMiB,
                                     peak_rss_bytes() / kMiB),
                         metrics_rss < 2 * kGiB});
  rep.targets.push_back({"16,384-GPU sampled routes all reachable", reachability(many),
                         many.unreachable == 0 && many.routes > 0});
}

// Strings here are our own (no quotes or backslashes), so no escaping is needed.
void print_json(const Report& rep, bool all_pass) {
  std::printf("{\n  \"cores\": %d,\n  \"phases\": [\n", rep.cores);
  for (size_t i = 0; i < rep.phases.size(); ++i) {
    const Phase& p = rep.phases[i];
    std::printf("    {\"cluster\": \"%s\", \"phase\": \"%s\", \"seconds\": %.6g, \"peak_rss_bytes\": %.0f}%s\n",
                p.cluster.c_str(), p.what.c_str() + p.what.find_first_not_of(' '), p.seconds, p.peak_rss_bytes,
                i + 1 < rep.phases.size() ? "," : "");
  }
  std::printf("  ],\n  \"ratios\": [\n");
  for (size_t i = 0; i < rep.ratios.size(); ++i)
    std::printf("    {\"what\": \"%s\", \"ratio\": %.4g}%s\n", rep.ratios[i].what.c_str(), rep.ratios[i].value,
                i + 1 < rep.ratios.size() ? "," : "");
  std::printf("  ],\n  \"facts\": {\n");
  for (size_t i = 0; i < rep.facts.size(); ++i)
    std::printf("    \"%s\": \"%s\"%s\n", rep.facts[i].first.c_str(), rep.facts[i].second.c_str(),
                i + 1 < rep.facts.size() ? "," : "");
  std::printf("  },\n  \"targets\": [\n");
  for (size_t i = 0; i < rep.targets.size(); ++i)
    std::printf("    {\"target\": \"%s\", \"measured\": \"%s\", \"pass\": %s}%s\n", rep.targets[i].what.c_str(),
                rep.targets[i].measured.c_str(), rep.targets[i].pass ? "true" : "false",
                i + 1 < rep.targets.size() ? "," : "");
  std::printf("  ],\n  \"all_pass\": %s\n}\n", all_pass ? "true" : "false");
}

void print_table(const Report& rep) {
  std::printf("%-10s %-52s %10s %14s\n", "cluster", "phase", "wall s", "peak RSS MiB");
  for (const Phase& p : rep.phases)
    std::printf("%-10s %-52s %10.3f %14.1f\n", p.cluster.c_str(), p.what.c_str(), p.seconds, p.peak_rss_bytes / kMiB);
  std::printf("\nratios measured side by side in this run:\n");
  for (const Ratio& r : rep.ratios) std::printf("  %-52s %6.2fx\n", r.what.c_str(), r.value);
  std::printf("\n");
  for (const auto& [what, value] : rep.facts) std::printf("  %-32s %s\n", what.c_str(), value.c_str());
  std::printf("\ntargets (%d cores):\n", rep.cores);
  for (const Target& t : rep.targets)
    std::printf("  %s  %-50s %s\n", t.pass ? "PASS" : "FAIL", t.what.c_str(), t.measured.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json")) {
      json = true;
    } else if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::printf(
          "usage: topology_bench [--json]\n\n"
          "Times building, routing and derived figures (compute_metrics) of\n"
          "  %sh800-2048.textproto  (all-pairs device routes, all threads and 1 thread)\n"
          "  %sh100-16k.textproto   (routes from 64 spread sources)\n"
          "with the peak resident memory after each phase, and checks the targets:\n"
          "  h800-2048 build + all-pairs routes < 1 s;\n"
          "  16,384-GPU rail-optimised build + metrics < 10 s and < 2 GiB.\n\n"
          "  --json   the figures as JSON instead of a table\n\n"
          "Exit code: 0 all targets pass, 1 a target fails, 2 bad usage or config.\n",
          kConfigDir.c_str(), kConfigDir.c_str());
      return 0;
    } else {
      std::fprintf(stderr, "topology_bench: unknown option %s (try --help)\n", argv[i]);
      return 2;
    }
  }
  Report rep;
  rep.cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  try {
    bench_h800(rep);
    bench_16k(rep);
  } catch (const ConfigError& e) {
    for (const Diagnostic& d : e.diagnostics()) std::fprintf(stderr, "%s\n", d.to_string().c_str());
    return 2;
  }
  bool all_pass = true;
  for (const Target& t : rep.targets) all_pass &= t.pass;
  if (json) print_json(rep, all_pass);
  else print_table(rep);
  return all_pass ? 0 : 1;
}
