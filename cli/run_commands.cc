// `moesim run` and `moesim bench-layer`: the executor on real ranks.
//
// Everything that can be wrong with the input (files, options, the model for the executor, the
// rank count) is checked before any rank starts (exit 2). Then, for several ranks outside an MPI
// launch, moesim starts itself under mpirun (cli/launch.h); every rank computes, and rank 0 alone
// prints, writes the trace and the store row. A rank that fails (a peer died, a timeout) ends all
// ranks with a message naming it (exit 1).
#include "cli/cli.pb.h"
#include "cli/commands.h"
#include "planner/plan_file.h"
#include "schedule/lowering.h"
#include "cli/executor_runs.h"
#include "cli/launch.h"
#include "common/json.h"
#include "common/units.h"
#include "costmodel/model.h"
#include "costmodel/setup.h"
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/error.h"
#include "executor/moe_layer.h"
#include "executor/train.h"
#include "traces/chrome_trace.h"
#include "traces/recorder.h"
#include "traces/store.h"

#include <fmt/format.h>

#include <cstring>
#include <iostream>
#include <optional>

namespace moesim::cli {
namespace {

int run(const Args& a) {
  if (!a.positional().empty()) throw UsageError("run takes no positional arguments");
  if (a.has("--model") == a.has("--plan")) throw UsageError("give --model FILE or --plan FILE (one of them)");
  if (a.has("--plan") && a.has("--strategy")) throw UsageError("--plan carries its strategy: drop --strategy");
  const bool json = a.flag("--json");
  // A plan (moesim plan --out): its model, strategy, workload and seed.
  std::optional<sim::Scenario> plan;
  if (a.has("--plan")) {
    try {
      plan.emplace(planner::load_plan(a.get("--plan")));
    } catch (const ConfigError& e) {
      return report_config_error(e, a.get("--plan"), json);
    }
  }
  const int ranks = a.get_int("--ranks", plan ? plan->setup.layout.devices : 1, 1, 4096);
  const exec::Device device = check_device(a, ranks);
  exec::TrainOptions o;
  o.steps = a.get_int("--steps", 20, 1, 1000000);
  o.batch = a.get_int("--batch", plan ? static_cast<int>(plan->setup.layout.global_batch) : 8 * ranks, 1, 1 << 24);
  o.sequence = a.get_int("--sequence", plan && plan->setup.cost.per_token ? plan->setup.layout.sequence : 0, 2, 1 << 20);
  o.seed = static_cast<uint64_t>(a.get_int("--seed", plan ? static_cast<int>(plan->seed) : 1, 0, INT32_MAX));
  o.lr = static_cast<float>(a.get_double("--lr", 3e-3, 1e-9, 10));
  const double timeout_s = a.get_double("--timeout", 60, 0.1, 86400);
  if (a.has("--optimizer")) {
    const std::string opt = a.get("--optimizer");
    if (opt != "adam" && opt != "sgd") throw UsageError(fmt::format("--optimizer: expected adam or sgd, got '{}'", opt));
    o.optimizer = opt == "sgd" ? exec::OptimizerKind::kSgd : exec::OptimizerKind::kAdam;
  }
  std::string strategy_name = "ep=ranks";
  const std::string strategy_file = plan ? a.get("--plan") : a.get("--strategy");
  try {
    o.model = plan ? *plan->setup.model : cost::load_model(a.get("--model"));
    if (plan || a.has("--strategy")) {
      const cost::Loaded<strategy::Strategy> s = plan ? plan->setup.strategy : cost::load_strategy(a.get("--strategy"));
      apply_strategy(*s, strategy_file, ranks, o);
      strategy_name = s->name();
    }
  } catch (const ConfigError& e) {
    return report_config_error(e, plan ? a.get("--plan") : a.get("--model"), json);
  }
  o.capacity_factor = a.get_double("--capacity-factor", o.capacity_factor, 1e-6, 1e6);
  o.routing = policy_of(a, o.routing);
  // A plan's step runs op by op as the simulator lowers it, so both traces carry the same op ids.
  if (plan) o.schedule = std::make_shared<schedule::Schedule>(schedule::lower(plan->setup, {.seed = plan->seed, .fold = schedule::Fold::kNever}));
  refuse_if_any(fmt::format("{} cannot run on {} rank(s):", plan ? a.get("--plan") : a.get("--model"), ranks), exec::validate(o, ranks));
  const Launch launch = launch_ranks(ranks);
  if (launch.relaunched) return launch.exit_code;

  return on_ranks(ranks, threads_per_rank(a, ranks), timeout_s, device, [&](exec::Comm* world, exec::Comm* host_world, exec::Backend& backend) {
    const exec::TrainResult r = exec::train(o, world, backend);
    const trace::Trace merged = gather_traces(r.trace, host_world);
    if (world && world->rank() != 0) return kExitOk;

    RunResult out;
    out.set_model(o.model.name());
    out.set_ranks(r.ranks);
    out.set_dp(r.dp);
    out.set_ep(r.ep);
    out.set_parameters(r.parameters);
    const int sequence = o.sequence > 0 ? o.sequence : o.model.transformer().max_sequence();
    out.set_tokens_per_step(o.batch * sequence);
    double steady_s = 0;
    for (const exec::StepRecord& s : r.steps) {
      RunStep* st = out.add_steps();
      st->set_step(s.step);
      st->set_step_time_s(s.step_time_s);
      st->set_loss(s.loss);
      if (s.step > 0 || r.steps.size() == 1) steady_s += s.step_time_s;
    }
    const double counted = r.steps.size() > 1 ? static_cast<double>(r.steps.size() - 1) : 1.0;
    out.set_tokens_per_s(steady_s > 0 ? counted * out.tokens_per_step() / steady_s : 0);
    if (a.has("--trace")) {
      trace::write_chrome_trace(merged, a.get("--trace"));
      out.set_trace_file(a.get("--trace"));
    }
    if (a.has("--db")) {
      Store store = Store::open(a.get("--db"));
      RunRecord rec;
      rec.kind = RunKind::kRun;
      rec.model = o.model.name();
      rec.strategy = strategy_name;
      rec.seed = o.seed;
      rec.step_time_s = r.steps.back().step_time_s;
      rec.tokens_per_s = out.tokens_per_s();
      rec.result_json = to_json(out);
      rec.version = MOESIM_VERSION;
      out.set_run_id(store.insert_run(rec, {{"final_loss", r.steps.back().loss}, {"ranks", double(r.ranks)}}, {merged}));
    }
    if (json) {
      std::cout << to_json(out);
    } else {
      std::cout << fmt::format("{} on {} rank(s) ({}): dp {} ep {}, {} parameters, {} tokens per step\n\n",
                               out.model(), out.ranks(), backend.name(), out.dp(), out.ep(),
                               format_count(double(out.parameters())), out.tokens_per_step());
      std::cout << fmt::format("{:>6} {:>12} {:>10}\n", "step", "time", "loss");
      for (const RunStep& s : out.steps())
        std::cout << fmt::format("{:>6} {:>12} {:>10.4f}\n", s.step(), format_seconds(s.step_time_s()), s.loss());
      std::cout << fmt::format("\n{:.0f} tokens/s after the first step", out.tokens_per_s());
      if (!out.trace_file().empty()) std::cout << fmt::format("; trace {}", out.trace_file());
      if (!out.run_id().empty()) std::cout << fmt::format("; stored as {}", out.run_id());
      std::cout << '\n';
    }
    return kExitOk;
  });
}

int bench_layer(const Args& a) {
  if (!a.positional().empty()) throw UsageError("bench-layer takes no positional arguments");
  const int ranks = a.get_int("--ranks", 1, 1, 4096);
  const exec::Device device = check_device(a, ranks);
  exec::BenchLayerOptions o;
  o.layer.num_experts = a.get_int("--experts", 8, 1, 1 << 16);
  o.layer.top_k = a.get_int("--top-k", 2, 1, 1 << 16);
  o.layer.hidden = a.get_int("--hidden", 512, 1, 1 << 16);
  o.layer.ffn_hidden = a.get_int("--ffn", static_cast<int>(4 * o.layer.hidden), 1, 1 << 18);
  o.layer.capacity_factor = a.get_double("--capacity-factor", 1.25, 1e-6, 1e6);
  o.layer.routing = policy_of(a, exec::RoutingPolicy::kVanilla);
  o.tokens = a.get_int("--tokens", 4096, 1, 1 << 26);
  o.iterations = a.get_int("--iterations", 3, 1, 10000);
  const double timeout_s = a.get_double("--timeout", 60, 0.1, 86400);
  std::vector<std::string> problems = exec::validate(o.layer, ranks);
  if (o.tokens % ranks != 0) problems.push_back(fmt::format("--tokens {} does not split evenly over {} ranks", o.tokens, ranks));
  refuse_if_any("bad layer:", problems);
  const Launch launch = launch_ranks(ranks);
  if (launch.relaunched) return launch.exit_code;

  return on_ranks(ranks, threads_per_rank(a, ranks), timeout_s, device, [&](exec::Comm* world, exec::Comm*, exec::Backend& backend) {
    const exec::BenchLayerResult r = exec::bench_layer(o, world, backend);
    if (world && world->rank() != 0) return kExitOk;
    BenchLayerResult out;
    out.set_ranks(ranks);
    out.set_tokens(r.tokens);
    out.set_experts(o.layer.num_experts);
    out.set_top_k(o.layer.top_k);
    out.set_hidden(o.layer.hidden);
    out.set_ffn_hidden(o.layer.ffn_hidden);
    out.set_step_s(r.step_s);
    out.set_tokens_per_s(r.tokens_per_s);
    out.set_gate_s(r.gate_s);
    out.set_dispatch_s(r.dispatch_s);
    out.set_experts_s(r.experts_s);
    out.set_combine_s(r.combine_s);
    out.set_gemm_efficiency_vs_blas(r.gemm_efficiency_vs_blas);
    out.set_dropped_assignments(r.routing.dropped_assignments);
    if (a.flag("--json")) {
      std::cout << to_json(out);
      return kExitOk;
    }
    std::cout << fmt::format("MoE layer: {} experts top-{}, d {} ffn {}, {} tokens over {} rank(s) ({})\n\n",
                             out.experts(), out.top_k(), out.hidden(), out.ffn_hidden(), out.tokens(), out.ranks(),
                             backend.name());
    std::cout << fmt::format("forward + backward  {}  ({:.0f} tokens/s)\n", format_seconds(out.step_s()), out.tokens_per_s());
    for (const auto& [name, s] : {std::pair{"gate", out.gate_s()}, {"dispatch", out.dispatch_s()},
                                  {"experts", out.experts_s()}, {"combine", out.combine_s()}})
      std::cout << fmt::format("  {:<10} {:>10}\n", name, format_seconds(s));
    std::cout << fmt::format("expert GEMMs at {:.0f}% of {} on the same shapes; {} assignments dropped\n",
                             100 * out.gemm_efficiency_vs_blas(),
                             device == exec::Device::kCuda ? "cublasSgemm" : "cblas_sgemm", out.dropped_assignments());
    return kExitOk;
  });
}

}  // namespace

std::vector<Command> run_commands() {
  return {
      {"run", "train a model for real on CPU ranks (MPI) or GPU ranks (NCCL), traced: loss and step time per step",
       "usage: moesim run --model M [--strategy S] [--ranks N] [--steps K] [--batch B] [--sequence L]\n"
       "       moesim run --plan best.plan.textproto [--steps K] ...   (a plan from `moesim plan --out`)\n"
       "                  [--lr X] [--optimizer adam|sgd] [--capacity-factor F]\n"
       "                  [--routing vanilla|batch_priority|no_drop] [--seed N] [--timeout S]\n"
       "                  [--device cpu|cuda] [--threads N] [--trace t.json] [--db results.db] [--json]\n\n"
       "  --model M      a transformer of configs/models (moe-tiny.textproto trains in seconds)\n"
       "  --plan P       the plan's model and strategy (DP x EP: tp 1, pp 1), its workload's batch and\n"
       "                 sequence, its seed; ranks default to its devices\n"
       "  --strategy S   dp must equal --ranks; its ep, capacity factor and drop policy are used (tp and\n"
       "                 pp 1). Without it, experts are spread over all ranks (EP = ranks)\n"
       "  --ranks N      ranks to launch (default 1). Outside an mpirun/srun launch moesim starts\n"
       "                 itself under mpirun; inside one, N must match its size\n"
       "  --batch B      sequences per step over all ranks (default 8 per rank)\n"
       "  --timeout S    a rank waiting longer than S seconds on a peer ends the job (default 60)\n"
       "  --device D     cpu (default: OpenBLAS, MPI between ranks) or cuda (one GPU per rank, local rank\n"
       "                 % GPUs; NCCL between ranks, bootstrapped over MPI). cuda is refused (exit 2)\n"
       "                 without a CUDA build, without a device, or with more ranks than GPUs here\n"
       "  --threads N    OpenBLAS threads per CPU rank (default: this machine's cores / its ranks)\n"
       "  --trace FILE   Chrome-trace JSON of every rank's ops (chrome://tracing, ui.perfetto.dev)\n"
       "  --db FILE      add a row to the SQLite results store (created on first use)\n"
       "  --json         per-step step_time_s and loss, tokens_per_s, ...\n\n"
       "The task is synthetic (executor/train.h): the next token is 3t + 1 mod vocab, so the loss falls\n"
       "from ln(vocab). Exit 2 on bad input (before any rank starts), 1 when a rank fails.\n",
       {{}, {"--model", "--plan", "--strategy", "--ranks", "--steps", "--batch", "--sequence", "--lr", "--optimizer",
             "--capacity-factor", "--routing", "--seed", "--timeout", "--trace", "--db", "--device", "--threads"}},
       run},
      {"bench-layer", "time one MoE layer forward + backward on real ranks: tokens/s and its parts",
       "usage: moesim bench-layer [--experts E] [--top-k K] [--tokens T] [--hidden D] [--ffn F] [--ranks N]\n"
       "                          [--capacity-factor C] [--routing vanilla|batch_priority|no_drop]\n"
       "                          [--iterations I] [--timeout S] [--device cpu|cuda] [--threads N] [--json]\n\n"
       "Defaults: 8 experts, top-2, 4096 tokens (of the whole EP group), d 512, ffn 4d, 1 rank,\n"
       "OpenBLAS threads per CPU rank this machine's cores / its ranks (--threads).\n"
       "--json carries tokens_per_s, gate_s, dispatch_s, experts_s, combine_s and\n"
       "gemm_efficiency_vs_blas (the layer's expert GEMMs against the vendor BLAS on the same shapes:\n"
       "cblas_sgemm, or cublasSgemm with --device cuda; timed side by side in the same run).\n"
       "--device cuda runs the layer on one GPU per rank (local rank % GPUs) with NCCL all-to-alls;\n"
       "refused (exit 2) without a CUDA build, without a device, or with more ranks than GPUs here.\n",
       {{}, {"--experts", "--top-k", "--tokens", "--hidden", "--ffn", "--ranks", "--capacity-factor", "--routing",
             "--iterations", "--timeout", "--device", "--threads"}},
       bench_layer},
  };
}

}  // namespace moesim::cli
