// Topology benchmark: building, routing and deriving figures on big clusters.
//   make bench            (or build/bench/topology_bench [--json] from the repository root)
// Targets (issue: foundation and topologies): h800-2048 build + all-pairs device routes < 1 s;
// a 16,384-GPU rail-optimised cluster built with its derived figures < 10 s and < 2 GiB.
// The machine is noisy, so a ratio measured side by side in the same run is printed too.
#include "topologies/metrics.h"
#include "topologies/routing.h"

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

using namespace moesim;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Peak resident memory of this process so far (VmHWM), bytes.
double peak_rss_bytes() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024;
  return 0;
}

struct AllPairs {
  double seconds = 0;
  uint64_t routes = 0;
  uint64_t unreachable = 0;
};

AllPairs route_all(const topo::Cluster& c, const std::vector<int>& sources, int threads) {
  topo::Router router(c);
  std::atomic<uint64_t> routes{0}, unreachable{0};
  auto t0 = std::chrono::steady_clock::now();
  topo::for_each_source(router, sources, threads, [&](int src, const std::vector<topo::RouteSummary>& r) {
    uint64_t bad = 0;
    for (int d = 0; d < c.device_count(); ++d) bad += d != src && !r[d].reachable();
    routes += r.size() - 1;
    unreachable += bad;
  });
  return {seconds_since(t0), routes, unreachable};
}

std::vector<int> first_sources(const topo::Cluster& c, int count) {
  std::vector<int> out;
  const int step = std::max(1, c.device_count() / count);
  for (int r = 0; r < c.device_count() && static_cast<int>(out.size()) < count; r += step) out.push_back(r);
  return out;
}

struct Row {
  std::string name, what;
  double value;
  std::string unit;
};

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json")) {
      json = true;
    } else if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::printf("usage: topology_bench [--json]\n\nTimes building, all-pairs routing and derived figures of "
                  "configs/hardware/h800-2048 and h100-16k (run from the repository root).\n");
      return 0;
    } else {
      std::fprintf(stderr, "topology_bench: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<Row> rows;
  std::vector<std::pair<std::string, bool>> targets;

  // h800-2048: build, then every device's routes to every device.
  auto t0 = std::chrono::steady_clock::now();
  topo::Cluster h800 = topo::load_cluster("configs/hardware/h800-2048.textproto");
  const double h800_build = seconds_since(t0);
  std::vector<int> all(h800.device_count());
  for (int r = 0; r < h800.device_count(); ++r) all[r] = r;
  AllPairs many = route_all(h800, all, cores);
  AllPairs one = route_all(h800, all, 1);
  t0 = std::chrono::steady_clock::now();
  topo::TopologyMetrics h800_metrics = topo::compute_metrics(h800);
  const double h800_metrics_s = seconds_since(t0);
  rows.push_back({"h800-2048", "build (parse, validate, graph)", h800_build, "s"});
  rows.push_back({"h800-2048", fmt::format("all-pairs routes, {} threads ({} routes)", cores, many.routes), many.seconds, "s"});
  rows.push_back({"h800-2048", "all-pairs routes, 1 thread", one.seconds, "s"});
  rows.push_back({"h800-2048", "ratio 1 thread / all threads (same run)", one.seconds / many.seconds, "x"});
  rows.push_back({"h800-2048", "derived figures (compute_metrics)", h800_metrics_s, "s"});
  rows.push_back({"h800-2048", "peak resident memory so far", peak_rss_bytes() / (1 << 20), "MiB"});
  targets.emplace_back(fmt::format("h800-2048 build + all-pairs routes < 1 s: {:.3f} s", h800_build + many.seconds),
                       h800_build + many.seconds < 1.0 && many.unreachable == 0);

  // 16,384 GPUs: build and derived figures; routes from a sample of sources (all 268M pairs
  // would take minutes here and are not needed by anything).
  t0 = std::chrono::steady_clock::now();
  topo::Cluster big = topo::load_cluster("configs/hardware/h100-16k.textproto");
  const double big_build = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  topo::TopologyMetrics big_metrics = topo::compute_metrics(big);
  const double big_metrics_s = seconds_since(t0);
  AllPairs sample = route_all(big, first_sources(big, 64), cores);
  const double big_rss = peak_rss_bytes();
  rows.push_back({"h100-16k", fmt::format("build ({} vertices, {} directed links)", big.vertex_count(), big.directed_link_count()),
                  big_build, "s"});
  rows.push_back({"h100-16k", "derived figures (compute_metrics)", big_metrics_s, "s"});
  rows.push_back({"h100-16k", fmt::format("routes from 64 sources ({} routes)", sample.routes), sample.seconds, "s"});
  rows.push_back({"h100-16k", "per-source routing time", sample.seconds / 64, "s"});
  rows.push_back({"h100-16k", "peak resident memory (whole run)", big_rss / (1 << 20), "MiB"});
  targets.emplace_back(fmt::format("h100-16k build + derived figures < 10 s: {:.3f} s", big_build + big_metrics_s),
                       big_build + big_metrics_s < 10.0);
  targets.emplace_back(fmt::format("h100-16k peak memory < 2 GiB: {:.0f} MiB", big_rss / (1 << 20)),
                       big_rss < 2.0 * (1 << 30) && sample.unreachable == 0);

  bool all_pass = true;
  for (const auto& t : targets) all_pass &= t.second;
  if (json) {
    std::printf("{\n  \"cores\": %d,\n  \"h800_bisection_bandwidth_Bps\": %.6g,\n  \"h100_16k_diameter_hops\": %d,\n", cores,
                h800_metrics.bisection_bandwidth_Bps, big_metrics.diameter_hops);
    std::printf("  \"measurements\": [\n");
    for (size_t i = 0; i < rows.size(); ++i)
      std::printf("    {\"cluster\": \"%s\", \"what\": \"%s\", \"value\": %.6g, \"unit\": \"%s\"}%s\n", rows[i].name.c_str(),
                  rows[i].what.c_str(), rows[i].value, rows[i].unit.c_str(), i + 1 < rows.size() ? "," : "");
    std::printf("  ],\n  \"targets\": [\n");
    for (size_t i = 0; i < targets.size(); ++i)
      std::printf("    {\"target\": \"%s\", \"pass\": %s}%s\n", targets[i].first.c_str(), targets[i].second ? "true" : "false",
                  i + 1 < targets.size() ? "," : "");
    std::printf("  ],\n  \"all_pass\": %s\n}\n", all_pass ? "true" : "false");
  } else {
    std::printf("%-10s %-52s %12s\n", "cluster", "measurement", "value");
    for (const Row& r : rows) std::printf("%-10s %-52s %10.3f %s\n", r.name.c_str(), r.what.c_str(), r.value, r.unit.c_str());
    std::printf("\ntargets (%d cores):\n", cores);
    for (const auto& t : targets) std::printf("  %s  %s\n", t.second ? "PASS" : "FAIL", t.first.c_str());
  }
  return all_pass ? 0 : 1;
}
