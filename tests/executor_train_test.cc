// Training moe-tiny for real: the loss falls on the synthetic task, the same model and seed give
// the same losses on 1 rank and on 2 ranks (data parallel, experts split over both), and models
// the executor cannot run are refused before anything is computed.
#include "costmodel/model.h"
#include "executor/comm.h"
#include "executor/error.h"
#include "executor/train.h"
#include "traces/recorder.h"

#include <catch2/catch.hpp>

#include <string>

namespace moesim::exec {
namespace {

model::Model moe_tiny() { return cost::load_model(std::string(MOESIM_SOURCE_DIR) + "/configs/models/moe-tiny.textproto"); }

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
  TrainOptions o;
  o.model = moe_tiny();
  o.steps = 50;
  o.batch = 8;
  const TrainResult r = train(o, nullptr, *backend);
  REQUIRE(r.steps.size() == 50);
  // Untrained, the loss is about ln(64) = 4.16 (a uniform guess over the vocabulary).
  CHECK(r.steps.front().loss == Approx(std::log(64.0)).margin(0.3));
  CHECK(r.steps.back().loss < 0.5 * r.steps.front().loss);
  // Every step and MoE layer left spans and expert loads in the trace.
  int moe_spans = 0, loads = 0;
  for (const trace::Span& s : r.trace.spans()) moe_spans += s.op_id() == "L1.moe.dispatch fwd";
  for (const trace::ExpertLoad& l : r.trace.expert_load()) {
    int64_t sum = 0;
    for (int64_t c : l.tokens_per_expert()) sum += c;
    CHECK(sum == 8 * 32 * 2);  // every token picks top-2 of 4 experts
    ++loads;
  }
  CHECK(moe_spans == 50);
  CHECK(loads == 2 * 50);
  // Same seed, same losses.
  const TrainResult again = train(o, nullptr, *backend);
  for (int i = 0; i < 50; ++i) CHECK(again.steps[i].loss == r.steps[i].loss);
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

// Run by CTest under mpirun -np 2 (hidden from the plain run): data parallel over 2 ranks with the
// experts split over both trains the same model as one rank on the whole batch.
TEST_CASE("2 ranks (DP 2, EP 2) and 1 rank give the same losses", "[.ep2]") {
  auto world = make_mpi_comm(60);
  REQUIRE(world->size() == 2);
  auto backend = make_cpu_backend(1);
  TrainOptions o;
  o.model = moe_tiny();
  o.steps = 8;
  o.batch = 4;
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
