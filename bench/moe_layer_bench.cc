// MoE layer benchmark: forward + backward of one layer (default 8 experts, top-2, 4096 tokens,
// D 512, F 2048, vanilla routing at capacity factor 1.25) on the CPU back end, reporting tokens/s,
// the split into gate / dispatch / experts / combine, and the expert GEMMs' throughput against
// cblas_sgemm on the same shapes, timed alternately in the same run
// (target: gemm_efficiency_vs_blas >= 0.85).
//   build/bench/moe_layer_bench [--tokens N] [--hidden D] [--ffn F] [--experts E] [--top-k K]
//       [--capacity-factor C] [--routing vanilla|batch_priority|no_drop] [--iterations N]
//       [--warmup N] [--threads N] [--json]
//   mpirun -np 2 build/bench/moe_layer_bench ...     (EP over the ranks; rank 0 prints)
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/moe_layer.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>

using namespace moesim;

namespace {

constexpr double kTargetEfficiency = 0.85;

int usage(const char* bad) {
  if (bad != nullptr) std::fprintf(stderr, "moe_layer_bench: bad argument %s\n", bad);
  std::fprintf(stderr,
               "usage: moe_layer_bench [--tokens N] [--hidden D] [--ffn F] [--experts E] [--top-k K]\n"
               "                       [--capacity-factor C] [--routing vanilla|batch_priority|no_drop]\n"
               "                       [--iterations N] [--warmup N] [--threads N] [--json]\n");
  return bad == nullptr ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  exec::BenchLayerOptions options;
  int threads = 0;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help") return usage(nullptr);
    if (a == "--json") {
      json = true;
      continue;
    }
    if (i + 1 >= argc) return usage(argv[i]);
    const char* v = argv[++i];
    char* end = nullptr;
    const long long n = std::strtoll(v, &end, 10);
    const bool is_int = *end == '\0';
    if (a == "--tokens" && is_int) options.tokens = n;
    else if (a == "--hidden" && is_int) options.layer.hidden = n;
    else if (a == "--ffn" && is_int) options.layer.ffn_hidden = n;
    else if (a == "--experts" && is_int) options.layer.num_experts = static_cast<int>(n);
    else if (a == "--top-k" && is_int) options.layer.top_k = static_cast<int>(n);
    else if (a == "--iterations" && is_int) options.iterations = static_cast<int>(n);
    else if (a == "--warmup" && is_int) options.warmup_iterations = static_cast<int>(n);
    else if (a == "--threads" && is_int) threads = static_cast<int>(n);
    else if (a == "--capacity-factor") options.layer.capacity_factor = std::strtod(v, nullptr);
    else if (a == "--routing" && exec::routing_policy_from_name(v))
      options.layer.routing = *exec::routing_policy_from_name(v);
    else return usage(argv[i - 1]);
  }

  exec::BenchLayerResult r;
  std::string backend_name;
  int rank = 0;
  try {
    std::unique_ptr<exec::Comm> world;
    if (exec::launched_by_mpi()) {
      world = exec::make_mpi_comm(600);
      rank = world->rank();
    }
    std::unique_ptr<exec::Backend> backend = exec::make_cpu_backend(threads);
    backend_name = backend->name();
    r = exec::bench_layer(options, world.get(), *backend);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_layer_bench: %s\n", e.what());
    return 2;
  }
  if (rank != 0) return 0;

  const exec::MoeLayerConfig& c = options.layer;
  const bool pass = r.gemm_efficiency_vs_blas >= kTargetEfficiency;
  const double parts = r.gate_s + r.dispatch_s + r.experts_s + r.combine_s;
  auto pct = [&](double s) { return parts > 0 ? 100 * s / parts : 0.0; };
  if (json) {
    std::printf(
        "{\"tokens\": %lld, \"hidden\": %lld, \"ffn_hidden\": %lld, \"experts\": %d, \"top_k\": %d, \"ep\": %d, "
        "\"routing\": \"%s\", \"capacity_factor\": %g, \"backend\": \"%s\", \"iterations\": %d,\n"
        " \"step_s\": %.6g, \"tokens_per_s\": %.6g, \"gate_s\": %.6g, \"dispatch_s\": %.6g, \"experts_s\": %.6g, "
        "\"combine_s\": %.6g, \"expert_gemm_s\": %.6g,\n"
        " \"expert_gemm_flops_per_s\": %.6g, \"blas_gemm_flops_per_s\": %.6g, \"gemm_efficiency_vs_blas\": %.4f, "
        "\"dropped_assignments\": %lld, \"pass\": %s}\n",
        static_cast<long long>(r.tokens), static_cast<long long>(c.hidden), static_cast<long long>(c.ffn_hidden),
        c.num_experts, c.top_k, r.ep_size, exec::routing_policy_name(c.routing), c.capacity_factor,
        backend_name.c_str(), options.iterations, r.step_s, r.tokens_per_s, r.gate_s, r.dispatch_s, r.experts_s,
        r.combine_s, r.expert_gemm_s, r.expert_gemm_flops_per_s, r.blas_gemm_flops_per_s, r.gemm_efficiency_vs_blas,
        static_cast<long long>(r.routing.dropped_assignments), pass ? "true" : "false");
  } else {
    std::printf("MoE layer forward + backward: %lld tokens, D %lld, F %lld, %d experts, top-%d, EP %d, %s at "
                "capacity factor %g (C = %lld)\n",
                static_cast<long long>(r.tokens), static_cast<long long>(c.hidden),
                static_cast<long long>(c.ffn_hidden), c.num_experts, c.top_k, r.ep_size,
                exec::routing_policy_name(c.routing), c.capacity_factor,
                static_cast<long long>(r.routing.expert_capacity));
    std::printf("back end %s, mean of %d iterations after %d warm-up\n\n", backend_name.c_str(), options.iterations,
                options.warmup_iterations);
    std::printf("  step (forward + backward)  %10.2f ms   %10.0f tokens/s\n", r.step_s * 1e3, r.tokens_per_s);
    std::printf("  gate                       %10.2f ms   %5.1f %%\n", r.gate_s * 1e3, pct(r.gate_s));
    std::printf("  dispatch                   %10.2f ms   %5.1f %%\n", r.dispatch_s * 1e3, pct(r.dispatch_s));
    std::printf("  experts                    %10.2f ms   %5.1f %%   (GEMMs %.2f ms, GELU and biases %.2f ms)\n",
                r.experts_s * 1e3, pct(r.experts_s), r.expert_gemm_s * 1e3, (r.experts_s - r.expert_gemm_s) * 1e3);
    std::printf("  combine                    %10.2f ms   %5.1f %%\n", r.combine_s * 1e3, pct(r.combine_s));
    std::printf("\n  expert GEMMs in the layer  %8.1f GFLOP/s\n", r.expert_gemm_flops_per_s / 1e9);
    std::printf("  cblas_sgemm, same shapes   %8.1f GFLOP/s\n", r.blas_gemm_flops_per_s / 1e9);
    std::printf("  gemm_efficiency_vs_blas    %8.3f   %s (target >= %.2f)\n", r.gemm_efficiency_vs_blas,
                pass ? "PASS" : "FAIL", kTargetEfficiency);
    std::printf("\n  tokens per expert (before drops -> kept):");
    for (size_t e = 0; e < r.routing.assigned_per_expert.size(); ++e)
      std::printf(" %lld->%lld", static_cast<long long>(r.routing.assigned_per_expert[e]),
                  static_cast<long long>(r.routing.kept_per_expert[e]));
    std::printf("\n  dropped assignments: %lld of %lld\n", static_cast<long long>(r.routing.dropped_assignments),
                static_cast<long long>(r.tokens * c.top_k));
  }
  return pass ? 0 : 1;
}
