// Cost model benchmark: the answers a planner asks thousands of times must be fast.
//   make bench        (or build/bench/costmodel_bench [--json]; configs are found in the source tree)
// Targets (issue: cost model and model zoo): `moesim model show` and `moesim memory` on
// DeepSeek-V3 answer in under 100 ms, measured end to end (the binary as a user runs it, --json to
// /dev/null) and in-process. Also timed, for the record: an analytic all-to-all on h800-2048 and a
// DeepSeek-V3-sized routing sample. The machine is noisy: each figure is the median of several runs,
// and the ratio in-process / end to end is printed from the same run.
#include "bench_args.h"

#include "costmodel/collectives.h"
#include "costmodel/memory.h"
#include "costmodel/routing_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace moesim;

namespace {

const std::string kSource = MOESIM_SOURCE_DIR;

template <typename Fn>
double median_s(int runs, Fn&& fn) {
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Row {
  std::string what;
  double seconds;
  double target_s;  // 0: no target
};

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  if (const std::optional<int> exit_code = moesim::bench::parse_json_flag(argc, argv, "costmodel_bench", json)) return *exit_code;
  const std::string model = kSource + "/configs/models/deepseek-v3.textproto";
  const std::string setup_args = fmt::format(
      "--cluster {0}/configs/hardware/h800-2048.textproto --model {1} --workload {0}/configs/workloads/deepseek-v3-pretrain.textproto "
      "--strategy {0}/configs/strategies/deepseek-v3-published.textproto",
      kSource, model);
  std::vector<Row> rows;
  try {
    rows.push_back({"model show deepseek-v3, in-process (load + analyze)", median_s(21, [&] {
                      cost::analyze(cost::load_model(model), {});
                    }), 0.1});
    rows.push_back({"memory deepseek-v3 on h800-2048, in-process (load 4 files + estimate)", median_s(11, [&] {
                      cost::Setup s = cost::load_setup(kSource + "/configs/hardware/h800-2048.textproto", model,
                                                       kSource + "/configs/workloads/deepseek-v3-pretrain.textproto",
                                                       kSource + "/configs/strategies/deepseek-v3-published.textproto");
                      cost::estimate_memory(s);
                    }), 0.1});
    const std::string binary = MOESIM_BINARY;
    rows.push_back({"moesim model show deepseek-v3 --json, end to end", median_s(7, [&] {
                      if (std::system((binary + " model show " + model + " --json >/dev/null").c_str()) != 0) std::exit(1);
                    }), 0.1});
    rows.push_back({"moesim memory (deepseek-v3 on h800-2048) --json, end to end", median_s(7, [&] {
                      if (std::system((binary + " memory " + setup_args + " --json >/dev/null").c_str()) != 0) std::exit(1);
                    }), 0.1});

    topo::Cluster c = topo::load_cluster(kSource + "/configs/hardware/h800-2048.textproto");
    cost::CollectiveModel cm(c);
    std::vector<int> ep64(64);
    for (int i = 0; i < 64; ++i) ep64[i] = i * 2;  // 64 ranks over 16 nodes
    cm.cost(cost::CollectiveOp::kAllToAll, ep64, 64e6);  // routes cached once
    rows.push_back({"analytic all-to-all, 64 ranks of h800-2048 (routes cached)", median_s(101, [&] {
                      cm.cost(cost::CollectiveOp::kAllToAll, cost::CollectiveAlgo::kHierarchical, ep64, 64e6);
                    }), 0});
    cost::RoutingProblem p;
    p.tokens = 65536;
    p.experts = 256;
    p.top_k = 8;
    p.capacity_factor = 1.0;
    p.probabilities.assign(256, 1.0 / 256);
    rows.push_back({"routing loads, 65536 tokens x 256 experts top-8", median_s(5, [&] { cost::routing_loads(p); }), 0});
  } catch (const std::exception& e) {
    std::fprintf(stderr, "costmodel_bench: %s\n", e.what());
    return 2;
  }

  bool pass = true;
  for (const Row& r : rows) pass &= r.target_s == 0 || r.seconds < r.target_s;
  const double ratio_model = rows[0].seconds / rows[2].seconds;
  const double ratio_memory = rows[1].seconds / rows[3].seconds;
  if (json) {
    std::printf("{\n  \"rows\": [\n");
    for (size_t i = 0; i < rows.size(); ++i)
      std::printf("    {\"what\": \"%s\", \"seconds\": %.6g, \"target_s\": %g}%s\n", rows[i].what.c_str(), rows[i].seconds,
                  rows[i].target_s, i + 1 < rows.size() ? "," : "");
    std::printf("  ],\n  \"in_process_over_end_to_end\": {\"model_show\": %.3f, \"memory\": %.3f},\n  \"pass\": %s\n}\n",
                ratio_model, ratio_memory, pass ? "true" : "false");
  } else {
    std::printf("cost model benchmark (median of several runs)\n\n");
    for (const Row& r : rows)
      std::printf("  %-72s %9.3f ms  %s\n", r.what.c_str(), r.seconds * 1e3,
                  r.target_s == 0 ? "" : (r.seconds < r.target_s ? "PASS (< 100 ms)" : "FAIL (>= 100 ms)"));
    std::printf("\nin-process / end to end, same run: model show %.2f, memory %.2f (the rest is process start and output)\n",
                ratio_model, ratio_memory);
  }
  return pass ? 0 : 1;
}
