// Training moe-tiny for real: the loss falls on the synthetic task, the same model and seed give
// the same losses on 1 rank and on 2 ranks (data parallel, experts split over both), and models
// the executor cannot run are refused before anything is computed.
#include "costmodel/model.h"
#include "costmodel/setup.h"
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/error.h"
#include "executor/train.h"
#include "schedule/lowering.h"
#include "test_clusters.h"
#include "traces/recorder.h"

#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>

namespace moesim::exec {
namespace {

model::Model moe_tiny() { return cost::load_model(std::string(MOESIM_SOURCE_DIR) + "/configs/models/moe-tiny.textproto"); }

// moe-tiny trained `steps` steps on a global batch of `batch` sequences.
TrainOptions tiny_training(int steps, int batch) {
  TrainOptions o;
  o.model = moe_tiny();
  o.steps = steps;
  o.batch = batch;
  return o;
}

TEST_CASE("The synthetic task is deterministic and follows t -> 3t + 1 mod vocab") {
  std::vector<int32_t> ids, targets, ids2, targets2;
  synthetic_batch(7, 3, 64, 16, 10, 2, ids, targets);
  synthetic_batch(7, 3, 64, 16, 10, 2, ids2, targets2);
  CHECK(ids == ids2);
  for (size_t i = 0; i < ids.size(); ++i) CHECK(targets[i] == (3 * ids[i] + 1) % 64);
  // Sequence 11 of the step is the same whether it is drawn alone or with sequence 10.
  synthetic_batch(7, 3, 64, 16, 11, 1, ids2, targets2);
  CHECK(std::vector<int32_t>(ids.begin() + 16, ids.end()) == ids2);
}

TEST_CASE("50 steps of moe-tiny on one rank lower the loss by more than half") {
  auto backend = make_cpu_backend(1);
  TrainOptions o = tiny_training(50, 8);
  const TrainResult r = train(o, nullptr, *backend);
  REQUIRE(r.steps.size() == 50);
  // Untrained, the loss is about ln(64) = 4.16 (a uniform guess over the vocabulary).
  CHECK(r.steps.front().loss == Approx(std::log(64.0)).margin(0.3));
  CHECK(r.steps.back().loss < 0.5 * r.steps.front().loss);
  // Every step and MoE layer left spans and expert loads in the trace.
  int moe_spans = 0, loads = 0;
  for (const trace::Span& s : r.trace.spans()) moe_spans += s.op_id() == "L1.moe.experts mb0 fwd";
  for (const trace::ExpertLoad& l : r.trace.expert_load()) {
    int64_t sum = 0;
    for (int64_t c : l.tokens_per_expert()) sum += c;
    CHECK(sum == 8 * 32 * 2);  // every token picks top-2 of 4 experts
    ++loads;
  }
  CHECK(moe_spans == 50);
  CHECK(loads == 2 * 50);
  // The gates carry their host-side routing seconds: forward the top-k and, on one rank, the
  // dispatch's decision apart; backward the router gradient. Nothing else has any.
  for (const trace::Span& s : r.trace.spans()) {
    INFO(s.op_id());
    const bool gate = s.name() == "moe.gate", fwd = s.op_id().ends_with("fwd");
    CHECK((s.routing_host_s() > 0) == gate);
    CHECK((s.dispatch_host_s() > 0) == (gate && fwd));
    CHECK(s.routing_host_s() + s.dispatch_host_s() <= 1e-9 * static_cast<double>(s.end_ns() - s.start_ns()));
  }
  // Same seed, same losses.
  const TrainResult again = train(o, nullptr, *backend);
  for (int i = 0; i < 50; ++i) CHECK(again.steps[i].loss == r.steps[i].loss);
}

// The lowering of moe-tiny on `ranks` devices (any device: the op order does not depend on it).
schedule::Schedule lower_tiny(int ranks, const std::string& strategy, const std::string& training) {
  const cost::Setup s = cost::load_setup(
      cost::ConfigSource{"cluster.textproto", test::cluster_text(1, "", test::SmallNode{.devices = ranks})},
      cost::ConfigSource{std::string(MOESIM_SOURCE_DIR) + "/configs/models/moe-tiny.textproto", std::nullopt},
      cost::ConfigSource{"workload.textproto", "name: \"w\" training { " + training + " precision: FP32 }"},
      cost::ConfigSource{"strategy.textproto", "name: \"s\" " + strategy});
  return schedule::lower(s, {.fold = schedule::Fold::kNever});
}

TEST_CASE("Without a plan the executor runs the lowering's ops for the same step, in its order") {
  const model::Model m = moe_tiny();
  for (const auto& [ranks, ep] : {std::pair{1, 1}, std::pair{2, 2}, std::pair{2, 1}, std::pair{4, 2}}) {
    INFO("ranks " << ranks << " ep " << ep);
    const schedule::Schedule lowered =
        lower_tiny(ranks, fmt::format("dp: {} ep: {}", ranks, ep), fmt::format("global_batch: {} micro_batch: 4", 4 * ranks));
    for (const schedule::RankSchedule& rs : lowered.ranks()) {
      const schedule::RankSchedule own = default_rank_schedule(m, rs.rank(), ranks, ep);
      REQUIRE(own.ops_size() == rs.ops_size());
      for (int i = 0; i < rs.ops_size(); ++i) {
        INFO("op " << i << " " << rs.ops(i).id());
        CHECK(own.ops(i).id() == rs.ops(i).id());
        CHECK(own.ops(i).name() == rs.ops(i).name());
        CHECK(own.ops(i).kind() == rs.ops(i).kind());
        CHECK(own.ops(i).layer() == rs.ops(i).layer());
        CHECK(std::vector<int>(own.ops(i).grad_layers().begin(), own.ops(i).grad_layers().end()) ==
              std::vector<int>(rs.ops(i).grad_layers().begin(), rs.ops(i).grad_layers().end()));
      }
    }
  }
}

TEST_CASE("A lowered schedule runs op by op: its ids on the spans, micro-batches accumulated") {
  auto backend = make_cpu_backend(1);
  TrainOptions o = tiny_training(2, 8);
  o.routing = RoutingPolicy::kNoDrop;  // no drops: micro-batches route the same tokens
  const TrainResult whole = train(o, nullptr, *backend);
  // The same batch as 2 micro-batches of 4 sequences (1F1B: each forward's backward next).
  o.schedule = std::make_shared<schedule::Schedule>(lower_tiny(1, "dp: 1 ep: 1", "global_batch: 8 micro_batch: 4"));
  REQUIRE(validate(o, 1).empty());
  const TrainResult split = train(o, nullptr, *backend);
  // Step 0's loss is the mean over the same tokens before any update.
  CHECK(split.steps[0].loss == Approx(whole.steps[0].loss).epsilon(1e-6));
  std::vector<std::string> ids;
  for (const trace::Span& s : split.trace.spans())
    if (s.step() == 0) ids.push_back(s.op_id());
  std::vector<std::string> expected;
  for (const schedule::Op& op : o.schedule->ranks(0).ops()) expected.push_back(op.id());
  CHECK(ids == expected);
  CHECK(std::count(ids.begin(), ids.end(), "L1.moe.experts mb1 bwd") == 1);
}

TEST_CASE("Schedules the executor cannot run are refused before computing, naming the op") {
  TrainOptions o;
  o.model = moe_tiny();
  o.batch = 8;
  auto problems = [&](const schedule::Schedule& s, int ranks) {
    o.schedule = std::make_shared<schedule::Schedule>(s);
    std::string all;
    for (const std::string& p : validate(o, ranks)) all += p + "\n";
    return all;
  };
  // GPipe keeps every micro-batch's activations; recompute and ZeRO are not executor ops.
  CHECK_THAT(problems(lower_tiny(1, "dp: 1 schedule: GPIPE", "global_batch: 8 micro_batch: 4"), 1),
             Catch::Contains("keeps one micro-batch's activations"));
  CHECK_THAT(problems(lower_tiny(1, "dp: 1", "global_batch: 8 micro_batch: 8 recompute: FULL"), 1),
             Catch::Contains("recompute is not supported"));
  CHECK_THAT(problems(lower_tiny(2, "dp: 2 ep: 2 zero_stage: 1", "global_batch: 8 micro_batch: 4"), 2),
             Catch::Contains("ZeRO"));
  CHECK_THAT(problems(lower_tiny(2, "dp: 2 ep: 2 overlap_chunks: 2", "global_batch: 8 micro_batch: 4"), 2),
             Catch::Contains("L0.moe.dispatch_a2a.c0 mb0 fwd"));
  // A schedule for other ranks or another strategy.
  CHECK_THAT(problems(lower_tiny(2, "dp: 2 ep: 2", "global_batch: 8 micro_batch: 4"), 1),
             Catch::Contains("the schedule is for 2 ranks, 1 launched"));
  // A schedule lowered before the route was an op of its own: its gates exchanged the metadata.
  schedule::Schedule old = lower_tiny(2, "dp: 2 ep: 2", "global_batch: 8 micro_batch: 4");
  for (schedule::RankSchedule& rs : *old.mutable_ranks()) {
    auto* ops = rs.mutable_ops();
    ops->erase(std::remove_if(ops->begin(), ops->end(),
                              [](const schedule::Op& op) { return op.name() == "moe.route" || op.name() == "moe.permute"; }),
               ops->end());
  }
  CHECK_THAT(problems(old, 2), Catch::Contains("0 moe.route and moe.permute ops where EP 2 needs 4"));
  o.ep = 1;
  CHECK_THAT(problems(lower_tiny(2, "dp: 2 ep: 2", "global_batch: 8 micro_batch: 4"), 2),
             Catch::Contains("exchanges tokens (all-to-alls, routes) but EP is 1"));
}

TEST_CASE("models and options the executor cannot run are refused with every reason") {
  TrainOptions o;
  o.model = cost::load_model(std::string(MOESIM_SOURCE_DIR) + "/configs/models/mixtral-8x7b.textproto");
  o.batch = 3;
  const std::vector<std::string> problems = validate(o, 2);
  REQUIRE(problems.size() >= 3);  // GQA attention, SwiGLU, batch not a multiple of 2 ranks
  auto backend = make_cpu_backend(1);
  CHECK_THROWS_AS(train(o, nullptr, *backend), Error);
  TrainOptions tiny;
  tiny.model = moe_tiny();
  tiny.ep = 3;
  CHECK_FALSE(validate(tiny, 2).empty());  // ep 3 divides neither 2 ranks nor 4 experts
  CHECK(validate(tiny, 1).size() == 1);
}

// moe-tiny on the CUDA back end: every layer, the MoE layer (routing decisions on the host), the loss
// and Adam on the GPU. The same seed gives the CPU back end's losses within fp32 round-off (the
// differences are the order of GPU reductions and cuBLAS's summation). Skips visibly without a device.
TEST_CASE("moe-tiny trains to the same losses on the CPU and the CUDA back end") {
  if (!cuda_available()) {
    WARN("CUDA half skipped: no CUDA device (or a build without CUDA)");
    return;
  }
  auto cpu = make_cpu_backend(1);
  auto gpu = make_cuda_backend(0);
  TrainOptions o = tiny_training(8, 8);
  const TrainResult on_cpu = train(o, nullptr, *cpu);
  const TrainResult on_gpu = train(o, nullptr, *gpu);
  for (int i = 0; i < o.steps; ++i) {
    std::printf("moe-tiny step %d: loss cpu %.9f cuda %.9f (rel diff %.2e)\n", i, on_cpu.steps[i].loss,
                on_gpu.steps[i].loss, std::fabs(on_gpu.steps[i].loss / on_cpu.steps[i].loss - 1));
    INFO("step " << i << ": cpu " << on_cpu.steps[i].loss << ", cuda " << on_gpu.steps[i].loss);
    CHECK(on_gpu.steps[i].loss == Approx(on_cpu.steps[i].loss).epsilon(1e-4));
  }
  CHECK(on_gpu.steps.back().loss < on_gpu.steps.front().loss);
  // Spans name the device, and the peak is the GPU tensors' (a few MB for moe-tiny).
  REQUIRE(on_gpu.trace.spans_size() > 0);
  CHECK(on_gpu.trace.spans(0).device() == "cuda:0");
  REQUIRE(on_gpu.trace.peak_memory_size() == 1);
  CHECK(on_gpu.trace.peak_memory(0).peak_bytes() > 0);
}

namespace {

struct Run {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// `env`: variable assignments put before the command ("LD_DEBUG=files").
Run run_moesim(const std::string& args, const std::string& env = "") {
  Run r;
  const std::string command = env + " " + std::string(MOESIM_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace

// The CLI on a GPU: bench-layer and run with --device cuda. Without CUDA or a device both are
// refused before any rank starts (exit 2) with the reason.
TEST_CASE("moesim bench-layer and run --device cuda: run on a GPU, refused plainly without one") {
  const Run bench = run_moesim("bench-layer --device cuda --experts 4 --top-k 2 --tokens 512 --hidden 64 --ffn 128 "
                               "--iterations 2 --json");
  const Run run = run_moesim("run --device cuda --model " + std::string(MOESIM_SOURCE_DIR) +
                             "/configs/models/moe-tiny.textproto --steps 3 --json");
  if (!cuda_available()) {
    WARN("CUDA half skipped: no CUDA device (or a build without CUDA); checking the refusal instead");
    for (const Run& r : {bench, run}) {
      INFO(r.output);
      CHECK(r.exit_code == 2);
      CHECK((r.output.find("built without CUDA") != std::string::npos ||
             r.output.find("no CUDA device") != std::string::npos));
    }
    return;
  }
  INFO(bench.output);
  CHECK(bench.exit_code == 0);
  CHECK(bench.output.find("\"tokens_per_s\"") != std::string::npos);
  CHECK(bench.output.find("\"experts_s\"") != std::string::npos);
  INFO(run.output);
  CHECK(run.exit_code == 0);
  CHECK(run.output.find("\"loss\"") != std::string::npos);
}

// The CUDA back end is a module loaded on the first CUDA request (executor/cuda_module.h): a
// command that never touches a GPU does not load cuBLAS, whose start-up takes half a second; a
// --device cuda request loads the module in a CUDA build. The dynamic loader's own report
// (LD_DEBUG=files) names every library it loads.
TEST_CASE("moesim loads the CUDA module only for a CUDA request") {
  const Run cpu = run_moesim("model show " + std::string(MOESIM_SOURCE_DIR) + "/configs/models/moe-tiny.textproto",
                             "LD_DEBUG=files");
  INFO(cpu.output.substr(0, 4000));
  CHECK(cpu.exit_code == 0);
  CHECK(cpu.output.find("libprotobuf") != std::string::npos);  // the report is there
  for (const char* lib : {"libmoesim_cuda", "libcublas", "libcudart", "libnccl"})
    CHECK(cpu.output.find(lib) == std::string::npos);
  const Run gpu = run_moesim("bench-layer --device cuda --experts 4 --top-k 2 --tokens 512 --hidden 64 --ffn 128 "
                             "--iterations 1 --json",
                             "LD_DEBUG=files");
#ifdef MOESIM_HAVE_CUDA
  CHECK(gpu.output.find("libmoesim_cuda") != std::string::npos);
  CHECK(gpu.output.find("libcublas") != std::string::npos);
#else
  CHECK(gpu.output.find("built without CUDA") != std::string::npos);
#endif
}

// Run by CTest under mpirun -np 2: each MoE layer's route gathers the routing metadata the
// lowering prices (cost::route_bytes_per_rank), so the simulator moves the executor's bytes.
TEST_CASE("A route gathers the bytes its Schedule op carries", "[.ep2]") {
  auto world = make_mpi_comm(60);
  REQUIRE(world->size() == 2);
  auto backend = make_cpu_backend(1);
  TrainOptions o = tiny_training(1, 8);
  o.schedule = std::make_shared<schedule::Schedule>(lower_tiny(2, "dp: 2 ep: 2", "global_batch: 8 micro_batch: 4"));
  const TrainResult r = train(o, world.get(), *backend);
  std::map<std::string, double> scheduled;
  for (const schedule::Op& op : o.schedule->ranks(world->rank()).ops())
    if (op.name() == "moe.route") scheduled[op.id()] = op.bytes();
  REQUIRE(!scheduled.empty());
  int routes = 0;
  for (const trace::Span& s : r.trace.spans()) {
    if (s.name() != "moe.route") continue;
    ++routes;
    INFO(s.op_id());
    REQUIRE(scheduled.count(s.op_id()) == 1);
    CHECK(s.bytes() == Approx(scheduled[s.op_id()]));
    CHECK(s.kind() == trace::ALL_GATHER);
  }
  CHECK(routes == static_cast<int>(scheduled.size()));
  // With EP 2 the dispatch's decision is the permutation's, measured there.
  for (const trace::Span& s : r.trace.spans()) {
    INFO(s.op_id());
    CHECK((s.dispatch_host_s() > 0) == (s.name() == "moe.permute"));
    CHECK((s.routing_host_s() > 0) == (s.name() == "moe.gate"));
  }
}

// Run by CTest under mpirun -np 2 (hidden from the plain run): data parallel over 2 ranks with the
// experts split over both trains the same model as one rank on the whole batch.
TEST_CASE("2 ranks (DP 2, EP 2) and 1 rank give the same losses", "[.ep2]") {
  auto world = make_mpi_comm(60);
  REQUIRE(world->size() == 2);
  auto backend = make_cpu_backend(1);
  TrainOptions o = tiny_training(8, 4);
  const TrainResult two = train(o, world.get(), *backend);
  CHECK(two.ep == 2);
  const TrainResult one = train(o, nullptr, *backend);  // every rank alone, the whole batch
  for (int i = 0; i < o.steps; ++i) {
    INFO("step " << i);
    CHECK(two.steps[i].loss == Approx(one.steps[i].loss).epsilon(1e-4));
  }
  CHECK(two.steps.back().loss < two.steps.front().loss);
}

}  // namespace
}  // namespace moesim::exec
