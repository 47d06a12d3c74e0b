// The lowering, op by op: each strategy of a tiny model on one 8-GPU node
// (schedule/lowering.h states the rules these tests check).
#include "costmodel/memory.h"
#include "schedule/lowering.h"
#include "sim/engine.h"
#include "temp_dir.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <unistd.h>

using namespace moesim;
using schedule::Collective;
using schedule::Op;
using schedule::RankSchedule;
using schedule::Schedule;

namespace {

std::string src(const std::string& rel) { return std::string(MOESIM_SOURCE_DIR) + "/" + rel; }

constexpr const char* kTinyTraining = R"(name: "tiny-train"
training { global_batch: 16 micro_batch: 1 sequence: 32 precision: BF16 optimizer: ADAMW }
routing { zipf { exponent: 1.2 } }
)";

// moe-tiny with 8 experts (one per GPU at ep 8), written once per process.
std::string tiny8() {
  static const std::string path = [] {
    const std::string p = (test::process_temp_dir() / "moe_tiny8.textproto").string();
    std::ofstream(p) << R"(name: "moe-tiny8"
transformer { layers: 2 hidden: 64 heads: 4 ffn_hidden: 128 activation: GELU norm: LAYER_NORM bias: true vocab: 64
  max_sequence: 32 learned_positions: true moe { experts: 8 top_k: 2 } })";
    return p;
  }();
  return path;
}

cost::Setup make_setup(const std::string& strategy, const std::string& workload = kTinyTraining,
                       const std::string& model = "",
                       const std::string& cluster = "configs/hardware/dgx-h100.textproto") {
  return cost::load_setup(cost::ConfigSource{src(cluster), std::nullopt},
                          cost::ConfigSource{model.empty() ? tiny8() : src(model), std::nullopt},
                          cost::ConfigSource{"workload.textproto", workload},
                          cost::ConfigSource{"strategy.textproto", "name: \"s\"\n" + strategy});
}

const RankSchedule& rank(const Schedule& s, int r) {
  for (const RankSchedule& rs : s.ranks())
    if (rs.rank() == r) return rs;
  FAIL("rank " << r << " not in the schedule");
  return s.ranks(0);
}

// `s` lowered with its devices' priors edited by `base`, and by `base` then `edit`.
std::pair<Schedule, Schedule> lowered_pair(const cost::Setup& s, const std::function<void(profile::DeviceProfile&)>& edit,
                                           const std::function<void(profile::DeviceProfile&)>& base = {}) {
  profile::DeviceProfile spec = cost::default_profile(s.cluster->device_type(0)).spec();
  if (base) base(spec);
  const cost::DeviceProfile before = cost::DeviceProfile::from_spec(spec);
  edit(spec);
  const cost::DeviceProfile after = cost::DeviceProfile::from_spec(spec);
  return {schedule::lower(s, {.profile = &before}), schedule::lower(s, {.profile = &after})};
}

const Op& find(const RankSchedule& rs, const std::string& id) {
  for (const Op& op : rs.ops())
    if (op.id() == id) return op;
  FAIL("no op '" << id << "' on rank " << rs.rank());
  return rs.ops(0);
}

int index_of(const RankSchedule& rs, const std::string& id) {
  for (int i = 0; i < rs.ops_size(); ++i)
    if (rs.ops(i).id() == id) return i;
  return -1;
}

bool has(const RankSchedule& rs, const std::string& id) { return index_of(rs, id) >= 0; }

sim::SimOptions analytic() {
  sim::SimOptions o;
  o.network = sim::NetworkMode::kAnalytic;
  o.record_trace = false;
  return o;
}

const Collective& coll(const Schedule& s, const Op& op) {
  REQUIRE(op.collective() > 0);
  return s.collectives(op.collective() - 1);
}

std::vector<int> ranks_of(const Collective& c) { return {c.ranks().begin(), c.ranks().end()}; }

// The (backward, micro-batch) of each micro-step on a rank, from its "attn" compute ops of the
// first layer it runs in the step's direction.
std::vector<std::pair<bool, int>> micro_steps(const RankSchedule& rs, const std::string& first_fwd_layer,
                                              const std::string& first_bwd_layer) {
  std::vector<std::pair<bool, int>> out;
  for (const Op& op : rs.ops()) {
    if (op.stream().kind() != trace::COMPUTE) continue;
    if (!op.backward() && op.id().rfind(first_fwd_layer + " ", 0) == 0) out.push_back({false, op.micro_batch()});
    if (op.backward() && op.id().rfind(first_bwd_layer + " ", 0) == 0) out.push_back({true, op.micro_batch()});
  }
  return out;
}

// `s` lowered (seed 3) under its device's priors and under the priors with `price` applied.
struct PlainAndPriced {
  Schedule plain, priced;
};
PlainAndPriced lower_plain_and_priced(const cost::Setup& s, const std::function<void(profile::DeviceProfile&)>& price) {
  const cost::DeviceProfile plain = cost::default_profile(s.cluster->device_type(0));
  profile::DeviceProfile spec = plain.spec();
  price(spec);
  const cost::DeviceProfile priced = cost::DeviceProfile::from_spec(spec);
  return {schedule::lower(s, {.seed = 3, .profile = &plain}), schedule::lower(s, {.seed = 3, .profile = &priced})};
}

}  // namespace

TEST_CASE("data parallel: each micro-batch forward then backward, gradient buckets, optimizer", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 1 zero_stage: 0");
  const Schedule sch = schedule::lower(s);
  REQUIRE(sch.ranks_size() == 8);
  REQUIRE_FALSE(sch.folded());
  const RankSchedule& r3 = rank(sch, 3);
  // 2 micro-batches (16 / 8): 1F1B on one stage is F0 B0 F1 B1.
  CHECK(micro_steps(r3, "embed", "embed") ==
        std::vector<std::pair<bool, int>>{{false, 0}, {true, 0}, {false, 1}, {true, 1}});
  // Forward order within a micro-batch.
  const std::vector<std::string> fwd = {"embed mb0 fwd",       "L0.attn mb0 fwd",    "L0.moe.gate mb0 fwd",
                                        "L0.moe.experts mb0 fwd", "L0.moe.combine mb0 fwd", "L1.attn mb0 fwd",
                                        "head mb0 fwd"};
  for (size_t i = 1; i < fwd.size(); ++i) CHECK(index_of(r3, fwd[i - 1]) < index_of(r3, fwd[i]));
  CHECK(index_of(r3, "head mb0 bwd") > index_of(r3, "head mb0 fwd"));
  CHECK(index_of(r3, "embed mb0 bwd") > index_of(r3, "L0.attn mb0 bwd"));
  // No EP: no all-to-all at all.
  for (const Op& op : r3.ops()) CHECK(op.kind() != trace::ALL_TO_ALL);

  // Gradients: every parameter's gradient at 2 bytes (bf16) is all-reduced once over the 8 ranks
  // (dense buckets over dp, expert buckets over the expert data-parallel group, here also 8).
  double grad_bytes = 0;
  for (const Op& op : r3.ops()) {
    if (op.kind() != trace::ALL_REDUCE) continue;
    const Collective& c = coll(sch, op);
    CHECK(c.op() == Collective::ALL_REDUCE);
    CHECK(c.algorithm() == "ring");
    CHECK(ranks_of(c) == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7});
    CHECK(op.stream().kind() == trace::COMM);
    CHECK(op.stream().index() == 1);
    grad_bytes += c.bytes();
  }
  CHECK(grad_bytes == Approx(s.cost.total_params * 2).epsilon(1e-9));
  // The optimizer is the last compute op and waits for every gradient collective.
  const Op& opt = find(r3, "optimizer");
  std::set<int> deps(opt.deps().begin(), opt.deps().end());
  for (int i = 0; i < r3.ops_size(); ++i)
    if (r3.ops(i).kind() == trace::ALL_REDUCE) CHECK(deps.count(i) == 1);
  // Every dep points backwards (the engine's contract).
  for (int i = 0; i < r3.ops_size(); ++i)
    for (int d : r3.ops(i).deps()) CHECK(d < i);
}

TEST_CASE("expert parallel: dispatch and combine all-to-all-v over the EP group sized by the routing draw", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 8 drop_policy: NO_DROP");
  const Schedule sch = schedule::lower(s, {.seed = 3});
  const RankSchedule& r0 = rank(sch, 0);
  const Op& dispatch = find(r0, "L0.moe.dispatch_a2a mb1 fwd");
  const Op& combine = find(r0, "L0.moe.combine_a2a mb1 fwd");
  const Collective& d = coll(sch, dispatch);
  const Collective& c = coll(sch, combine);
  CHECK(d.op() == Collective::ALL_TO_ALL_V);
  CHECK(ranks_of(d) == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(d.matrix() == c.matrix());
  CHECK_FALSE(d.transpose());
  CHECK(c.transpose());
  // The same collective on every member rank.
  for (int r = 1; r < 8; ++r) CHECK(find(rank(sch, r), "L0.moe.dispatch_a2a mb1 fwd").collective() == dispatch.collective());
  // Dropless: every one of the EP group's 8 x 32 tokens goes to 2 experts, 64 x 2 bytes each.
  const schedule::ByteMatrix& m = sch.matrices(d.matrix() - 1);
  REQUIRE(m.n() == 8);
  double total = 0;
  std::vector<double> column(8, 0);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      total += m.bytes(i * 8 + j);
      column[j] += m.bytes(i * 8 + j);
    }
  CHECK(total == Approx(8.0 * 32 * 2 * 64 * 2).epsilon(1e-9));
  // Skewed routing (Zipf 1.2 over 8 experts, one per rank) makes the expert kernels' time follow
  // the tokens each rank receives: more tokens, never less time.
  std::vector<double> expert_time(8);
  for (int r = 0; r < 8; ++r) expert_time[r] = find(rank(sch, r), "L0.moe.experts mb1 fwd").duration_s();
  for (int a = 0; a < 8; ++a)
    for (int b = 0; b < 8; ++b)
      if (column[a] > column[b]) CHECK(expert_time[a] >= expert_time[b]);
  CHECK(*std::max_element(column.begin(), column.end()) > 1.5 * total / 8);  // a real straggler
  CHECK(sch.expert_imbalance() > 1.2);
  // Backward sends gradients the other way: the combine's backward uses the dispatch direction.
  CHECK_FALSE(coll(sch, find(r0, "L0.moe.combine_a2a mb1 bwd")).transpose());
  CHECK(coll(sch, find(r0, "L0.moe.dispatch_a2a mb1 bwd")).transpose());
}

TEST_CASE("under vanilla drops the first EP ranks' tokens fill the buffers: their rows carry the bytes", "[lowering]") {
  // Uniform routing, capacity factor 0.5: each expert keeps half the group's assignments, about
  // what the first half of the ranks bring. Batch priority drops by gate probability instead, so
  // every rank keeps about as much.
  const std::string uniform = R"(name: "tiny-uniform"
training { global_batch: 16 micro_batch: 1 sequence: 32 precision: BF16 optimizer: ADAMW }
routing { uniform: true })";
  for (const char* policy : {"VANILLA", "BATCH_PRIORITY"}) {
    INFO(policy);
    const cost::Setup s = make_setup(fmt::format("dp: 8 ep: 8 capacity_factor: 0.5 drop_policy: {}", policy), uniform);
    // Without launch overheads, which hide these small gathers on a GPU.
    const Schedule sch = lower_plain_and_priced(s, [](profile::DeviceProfile& p) { p.set_kernel_launch_overhead_s(0); }).priced;
    const schedule::ByteMatrix& m = sch.matrices(coll(sch, find(rank(sch, 0), "L0.moe.dispatch_a2a mb1 fwd")).matrix() - 1);
    REQUIRE(m.n() == 8);
    double first = 0, total = 0;
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) {
        total += m.bytes(i * 8 + j);
        if (i < 4) first += m.bytes(i * 8 + j);
      }
    // Half of the group's 8 x 32 x 2 assignments kept, 64 x 2 bytes each.
    CHECK(total == Approx(8.0 * 32 * 2 * 64 * 2 / 2).epsilon(0.02));
    if (std::string(policy) == "VANILLA") CHECK(first / total > 0.8);
    else CHECK(first / total == Approx(0.5).margin(0.1));
    // A rank's dispatch and combine gather only its kept rows: under vanilla the last rank's
    // tokens, mostly dropped, cost it less than the first's.
    for (const char* op : {"L0.moe.permute mb1 fwd", "L0.moe.combine mb1 fwd", "L0.moe.combine mb1 bwd"}) {
      INFO(op);
      const double r0 = find(rank(sch, 0), op).duration_s(), r7 = find(rank(sch, 7), op).duration_s();
      if (std::string(policy) == "VANILLA") CHECK(r7 < 0.9 * r0);
      else CHECK(r7 == Approx(r0).epsilon(0.1));
    }
  }
}

TEST_CASE("folding simulates one data-parallel replica carrying the EP group's straggler", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 8 drop_policy: NO_DROP");
  const Schedule full = schedule::lower(s, {.seed = 3, .fold = schedule::Fold::kNever});
  const Schedule folded = schedule::lower(s, {.seed = 3, .fold = schedule::Fold::kDataParallel});
  REQUIRE(folded.folded());
  REQUIRE(folded.ranks_size() == 1);
  CHECK(folded.ranks(0).represents() == 8);
  for (const char* id : {"L0.moe.experts mb0 fwd", "L1.moe.experts mb1 fwd", "L0.moe.experts mb1 bwd"}) {
    double slowest = 0;
    for (int r = 0; r < 8; ++r) slowest = std::max(slowest, find(rank(full, r), id).duration_s());
    CHECK(find(folded.ranks(0), id).duration_s() == Approx(slowest).epsilon(1e-12));
  }
  // Its collectives still name every member (the others are shadows).
  CHECK(ranks_of(coll(folded, find(folded.ranks(0), "L0.moe.dispatch_a2a mb0 fwd"))) ==
        std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7});
  // And the simulated step equals the unfolded one when the network is analytic: every member
  // waits for the straggler at the combine anyway.
  const sim::SimResult a = sim::simulate(full, *s.cluster, analytic());
  const sim::SimResult b = sim::simulate(folded, *s.cluster, analytic());
  CHECK(b.step_time_s == Approx(a.step_time_s).epsilon(1e-6));
}

TEST_CASE("tensor parallel: all-reduce after attention and MLP, or reduce-scatter and all-gather", "[lowering]") {
  const std::string dense = R"(name: "dense-tiny"
transformer { layers: 2 hidden: 64 heads: 4 ffn_hidden: 128 activation: GELU norm: LAYER_NORM vocab: 64 max_sequence: 32 }
)";
  const std::string model_path = (std::filesystem::temp_directory_path() / fmt::format("{}_dense_tiny.textproto", ::getpid())).string();
  { std::ofstream(model_path) << dense; }
  {
    const cost::Setup s = cost::load_setup(cost::ConfigSource{src("configs/hardware/dgx-h100.textproto"), std::nullopt},
                                           cost::ConfigSource{model_path, std::nullopt},
                                           cost::ConfigSource{"w", kTinyTraining}, cost::ConfigSource{"s", "name: \"s\" dp: 4 tp: 2"});
    const Schedule sch = schedule::lower(s);
    const RankSchedule& r5 = rank(sch, 5);  // t = 1, d = 2
    for (const char* id : {"L0.attn.tp_allreduce mb0 fwd", "L0.mlp.tp_allreduce mb0 fwd", "L1.attn.tp_allreduce mb1 bwd"}) {
      const Collective& c = coll(sch, find(r5, id));
      CHECK(c.op() == Collective::ALL_REDUCE);
      CHECK(ranks_of(c) == std::vector<int>{4, 5});
      CHECK(c.bytes() == 32.0 * 64 * 2);  // one micro-batch's activations, 16-bit
    }
    CHECK(index_of(r5, "L0.attn mb0 fwd") < index_of(r5, "L0.attn.tp_allreduce mb0 fwd"));
    CHECK(index_of(r5, "L0.attn.tp_allreduce mb0 fwd") < index_of(r5, "L0.mlp mb0 fwd"));
    // Data-parallel gradients over the ranks of the same tensor slice.
    CHECK(ranks_of(coll(sch, find(r5, "grad_bucket0"))) == std::vector<int>{1, 3, 5, 7});
  }
  {
    const cost::Setup s = cost::load_setup(cost::ConfigSource{src("configs/hardware/dgx-h100.textproto"), std::nullopt},
                                           cost::ConfigSource{model_path, std::nullopt}, cost::ConfigSource{"w", kTinyTraining},
                                           cost::ConfigSource{"s", "name: \"s\" dp: 4 tp: 2 sequence_parallel: true"});
    const Schedule sch = schedule::lower(s);
    const RankSchedule& r0 = rank(sch, 0);
    CHECK(coll(sch, find(r0, "L0.attn.tp_allreduce.rs mb0 fwd")).op() == Collective::REDUCE_SCATTER);
    CHECK(coll(sch, find(r0, "L0.attn.tp_allreduce.ag mb0 fwd")).op() == Collective::ALL_GATHER);
    CHECK_FALSE(has(r0, "L0.attn.tp_allreduce mb0 fwd"));
  }
  std::filesystem::remove(model_path);
}

TEST_CASE("pipeline: GPipe, 1F1B and interleaved 1F1B micro-step orders, matched sends and receives", "[lowering]") {
  const std::string vit_work = R"(name: "w" training { global_batch: 16 micro_batch: 1 precision: BF16 })";
  auto steps = [](const Schedule& sch, int r) {
    std::vector<std::pair<bool, int>> out;
    const RankSchedule& rs = rank(sch, r);
    // The first compute op of each micro-step: the one right after a different micro-step's op.
    int last_mb = -2;
    bool last_bwd = false;
    for (const Op& op : rs.ops()) {
      if (op.stream().kind() != trace::COMPUTE || op.micro_batch() < 0) continue;
      if (op.micro_batch() != last_mb || op.backward() != last_bwd) out.push_back({op.backward(), op.micro_batch()});
      last_mb = op.micro_batch();
      last_bwd = op.backward();
    }
    return out;
  };
  using V = std::vector<std::pair<bool, int>>;
  {  // pp 2, dp 4: 4 micro-batches per pipeline.
    const Schedule g = schedule::lower(make_setup("dp: 4 pp: 2 ep: 1 schedule: GPIPE"));
    CHECK(steps(g, 0) == V{{false, 0}, {false, 1}, {false, 2}, {false, 3}, {true, 0}, {true, 1}, {true, 2}, {true, 3}});
    const Schedule f = schedule::lower(make_setup("dp: 4 pp: 2 ep: 1 schedule: ONE_F_ONE_B"));
    // Stage 0 warms up with pp - 0 - 1 = 1 forward; stage 1 with none.
    CHECK(steps(f, 0) == V{{false, 0}, {false, 1}, {true, 0}, {false, 2}, {true, 1}, {false, 3}, {true, 2}, {true, 3}});
    CHECK(steps(f, 4) == V{{false, 0}, {true, 0}, {false, 1}, {true, 1}, {false, 2}, {true, 2}, {false, 3}, {true, 3}});
    // Every send has its receive on the peer, same collective, opposite op kinds.
    std::map<int, std::vector<std::pair<int, trace::OpKind>>> p2p;
    for (const RankSchedule& rs : f.ranks())
      for (const Op& op : rs.ops())
        if (op.kind() == trace::SEND || op.kind() == trace::RECV) p2p[op.collective()].push_back({rs.rank(), op.kind()});
    REQUIRE(p2p.size() == 4 * 4 * 2);  // 4 replicas x 4 micro-batches x (activations, gradients)
    for (const auto& [c, ends] : p2p) {
      REQUIRE(ends.size() == 2);
      CHECK(ends[0].second != ends[1].second);
      const Collective& col = f.collectives(c - 1);
      CHECK(col.op() == Collective::SEND_RECV);
      CHECK(col.bytes() == 32.0 * 64 * 2);
    }
  }
  {  // Interleaved, pp 2 x 2 chunks of ViT-B/16's 12 blocks, 4 micro-batches (Megatron-LM's order).
    const cost::Setup s = make_setup("dp: 4 pp: 2 schedule: INTERLEAVED_1F1B virtual_stages: 2", vit_work,
                                     "configs/models/vit-b16.textproto");
    const Schedule sch = schedule::lower(s);
    // Forward micro-steps of stage 0 by (chunk, mb): (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3);
    // its warm-up is (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards, then 1F1B.
    const RankSchedule& r0 = rank(sch, 0);
    std::vector<std::string> first;  // the first compute op id of each micro-step
    int last_mb = -2;
    bool last_bwd = false;
    std::string last_layer;
    for (const Op& op : r0.ops()) {
      if (op.stream().kind() != trace::COMPUTE || op.micro_batch() < 0) continue;
      const std::string layer = op.id().substr(0, op.id().find('.'));
      const bool new_chunk = layer != last_layer && (layer == "patch_embed" || layer == "L6" || layer == "L11" || layer == "L5" ||
                                                     layer == "head" || layer == "embed");
      if (op.micro_batch() != last_mb || op.backward() != last_bwd || new_chunk) first.push_back(op.id());
      last_mb = op.micro_batch();
      last_bwd = op.backward();
      last_layer = layer;
    }
    REQUIRE(first.size() >= 6);
    CHECK(first[0].find("mb0 fwd") != std::string::npos);
    CHECK(first[1].find("mb1 fwd") != std::string::npos);
    CHECK(first[2].rfind("L6", 0) == 0);  // chunk 1 of stage 0 = global chunk 2 = blocks 6..8
    CHECK(first[2].find("mb0 fwd") != std::string::npos);
    CHECK(first[3].rfind("L6", 0) == 0);
    CHECK(first[3].find("mb1 fwd") != std::string::npos);
    CHECK(first[4].find("mb2 fwd") != std::string::npos);  // the last warm-up forward...
    CHECK(first[5].find("bwd") != std::string::npos);      // ...then the first backward
  }
}

TEST_CASE("ZeRO: all-reduce at stage 0, reduce-scatter then all-gather at 1 and 2, per-layer gathers at 3", "[lowering]") {
  auto kinds = [](const Schedule& sch) {
    std::map<std::string, int> n;
    for (const Op& op : rank(sch, 0).ops())
      if (op.stream().kind() == trace::COMM && op.stream().index() == 1) ++n[op.name()];
    return n;
  };
  const auto z0 = kinds(schedule::lower(make_setup("dp: 8 ep: 1 zero_stage: 0")));
  CHECK(z0.at("grad_allreduce") >= 1);
  CHECK(z0.count("grad_reduce_scatter") == 0);
  const auto z1 = kinds(schedule::lower(make_setup("dp: 8 ep: 1 zero_stage: 1")));
  CHECK(z1.count("grad_allreduce") == 0);
  CHECK(z1.at("grad_reduce_scatter") == z1.at("param_allgather"));
  const Schedule s3 = schedule::lower(make_setup("dp: 8 ep: 1 zero_stage: 3"));
  const auto z3 = kinds(s3);
  CHECK(z3.count("param_allgather") == 0);
  // Every layer with weights gathers them before each forward and each backward of each micro-batch.
  CHECK(z3.at("zero3_allgather") == 4 * 2 * 2);  // embed, L0, L1, head x 2 micro-batches x fwd, bwd
  const RankSchedule& r0 = rank(s3, 0);
  const Op& attn = find(r0, "L0.attn mb1 fwd");
  const int gather = index_of(r0, "L0.zero3_allgather mb1 fwd");
  REQUIRE(gather >= 0);
  CHECK(std::find(attn.deps().begin(), attn.deps().end(), gather) != attn.deps().end());
}

TEST_CASE("recompute: selective kernels before each layer's backward, or the whole forward again", "[lowering]") {
  auto work = [](const char* mode) {
    return fmt::format(R"(name: "w" training {{ global_batch: 16 micro_batch: 1 sequence: 32 recompute: {} }})", mode);
  };
  const RankSchedule none = schedule::lower(make_setup("dp: 8 ep: 8", work("NONE"))).ranks(0);
  CHECK_FALSE(has(none, "L0.recompute mb0 bwd"));
  const RankSchedule sel = schedule::lower(make_setup("dp: 8 ep: 8", work("SELECTIVE"))).ranks(0);
  const Op& rc = find(sel, "L1.recompute mb0 bwd");
  CHECK(rc.duration_s() > 0);
  CHECK(rc.duration_s() < find(sel, "L1.attn mb0 fwd").duration_s() + find(sel, "L1.moe.experts mb0 fwd").duration_s());
  CHECK(index_of(sel, "L1.recompute mb0 bwd") < index_of(sel, "L1.moe.combine mb0 bwd"));
  const Schedule full = schedule::lower(make_setup("dp: 8 ep: 8", work("FULL")));
  const RankSchedule& f = full.ranks(0);
  // The forward runs again, all-to-alls included, before the layer's backward.
  CHECK(has(f, "L1.attn mb0 recompute"));
  CHECK(coll(full, find(f, "L1.moe.dispatch_a2a mb0 recompute")).op() == Collective::ALL_TO_ALL_V);
  CHECK(index_of(f, "L1.moe.combine mb0 recompute") < index_of(f, "L1.moe.combine mb0 bwd"));
}

TEST_CASE("overlap chunks: every dispatch queued before the first experts chunk, payloads split", "[lowering]") {
  const Schedule one = schedule::lower(make_setup("dp: 8 ep: 8 overlap_chunks: 1"), {.seed = 5});
  const Schedule two = schedule::lower(make_setup("dp: 8 ep: 8 overlap_chunks: 2"), {.seed = 5});
  const RankSchedule& r = two.ranks(0);
  CHECK(index_of(r, "L0.moe.dispatch_a2a.c1 mb0 fwd") < index_of(r, "L0.moe.experts.c0 mb0 fwd"));
  CHECK(index_of(r, "L0.moe.experts.c0 mb0 fwd") < index_of(r, "L0.moe.combine_a2a.c0 mb0 fwd"));
  CHECK(index_of(r, "L0.moe.combine_a2a.c0 mb0 fwd") < index_of(r, "L0.moe.experts.c1 mb0 fwd"));
  auto total = [](const Schedule& sch, const Collective& c) {
    double t = 0;
    for (double b : sch.matrices(c.matrix() - 1).bytes()) t += b;
    return t;
  };
  const double whole = total(one, coll(one, find(one.ranks(0), "L0.moe.dispatch_a2a mb0 fwd")));
  CHECK(total(two, coll(two, find(r, "L0.moe.dispatch_a2a.c0 mb0 fwd"))) == Approx(whole / 2));
  CHECK(total(two, coll(two, find(r, "L0.moe.dispatch_a2a.c1 mb0 fwd"))) == Approx(whole / 2));
}

TEST_CASE("memory: every activation freed by its backward, the timeline peak is the cost model estimate", "[lowering]") {
  for (const char* strategy : {"dp: 4 pp: 2 ep: 4 schedule: ONE_F_ONE_B", "dp: 4 pp: 2 ep: 4 schedule: GPIPE",
                               "dp: 8 ep: 8 zero_stage: 1"}) {
    INFO(strategy);
    const cost::Setup s = make_setup(strategy);
    const Schedule sch = schedule::lower(s);
    for (const RankSchedule& rs : sch.ranks()) {
      int64_t alloc = 0, freed = 0;
      for (const Op& op : rs.ops()) {
        alloc += op.alloc_bytes();
        freed += op.free_bytes();
      }
      CHECK(alloc == freed);
      CHECK(alloc > 0);
    }
    const sim::SimResult r = sim::simulate(sch, *s.cluster, analytic());
    const cost::MemoryReport m = cost::estimate_memory(s);
    // In-flight micro-batches as memory.h counts them (1F1B: pp - stage, GPipe: all) are what the
    // timeline holds at its peak; activation bytes are rounded down to whole bytes per layer.
    for (const sim::RankResult& rr : r.ranks) CHECK(rr.peak_bytes == Approx(m.ranks[rr.rank].total_bytes).epsilon(1e-6));
  }
}

TEST_CASE("expert offload: weights copied in over PCIe on the copy stream before the experts run", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 8 offload { expert_fraction: 0.5 prefetch_layers: 1 }");
  const Schedule sch = schedule::lower(s);
  const RankSchedule& r = sch.ranks(0);
  const int copy = index_of(r, "L1.moe.prefetch mb0 fwd");
  REQUIRE(copy >= 0);
  const Op& c = r.ops(copy);
  CHECK(c.kind() == trace::MEMCPY);
  CHECK(c.stream().kind() == trace::COPY);
  const cost::Layer& layer = s.cost.layers[c.layer()];
  CHECK(c.bytes() == Approx(layer.expert_params / 8 * 2 * 0.5));
  CHECK(c.duration_s() == Approx(c.bytes() / s.cluster->spec().node().pcie().device_bandwidth_bps()));
  const Op& experts = find(r, "L1.moe.experts mb0 fwd");
  CHECK(std::find(experts.deps().begin(), experts.deps().end(), copy) != experts.deps().end());
  // Prefetching one layer ahead: L1's copy waits for L0's experts to release the buffer.
  CHECK(std::find(c.deps().begin(), c.deps().end(), index_of(r, "L0.moe.experts mb0 fwd")) != c.deps().end());
}

TEST_CASE("inference: prefill through the layers, then one decode iteration per generated token", "[lowering]") {
  const std::string work = R"(name: "serve" inference { batch: 8 prompt_tokens: 16 generated_tokens: 3 })";
  const cost::Setup s = make_setup("dp: 8 ep: 8", work);
  const Schedule sch = schedule::lower(s);
  const RankSchedule& r = sch.ranks(0);
  for (const Op& op : r.ops()) CHECK_FALSE(op.backward());
  CHECK(has(r, "L0.attn mb0 fwd"));
  CHECK(has(r, "L1 decode0"));
  CHECK(has(r, "L1 decode2"));
  CHECK_FALSE(has(r, "L1 decode3"));
  CHECK(coll(sch, find(r, "L0.moe.dispatch_a2a decode1")).op() == Collective::ALL_TO_ALL_V);
  // Later decode iterations read a longer KV cache: never faster.
  CHECK(find(r, "L0 decode2").duration_s() >= find(r, "L0 decode0").duration_s());
  CHECK(sch.tokens() == 8.0 * (16 + 3));
  CHECK(!has(r, "optimizer"));
}

TEST_CASE("a decode iteration prices its dispatch's decision over the EP group, as training does", "[lowering]") {
  const std::string work = R"(name: "serve" inference { batch: 8 prompt_tokens: 16 generated_tokens: 3 })";
  auto added = [&](int ep) {  // what dispatch_choice_s adds to a decode iteration of an MoE layer
    const PlainAndPriced l = lower_plain_and_priced(make_setup(fmt::format("dp: 8 ep: {} drop_policy: NO_DROP", ep), work),
                                                    [](profile::DeviceProfile& p) { p.set_dispatch_choice_s(1e-8); });
    return find(rank(l.priced, 2), "L1 decode1").duration_s() - find(rank(l.plain, 2), "L1 decode1").duration_s();
  };
  const double one = added(1);
  CHECK(one > 0);
  CHECK(added(8) == Approx(8 * one).epsilon(1e-3));
}

TEST_CASE("lowering is deterministic in its seed", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 8");
  const std::string a = schedule::lower(s, {.seed = 11}).SerializeAsString();
  const std::string b = schedule::lower(s, {.seed = 11}).SerializeAsString();
  const std::string c = schedule::lower(s, {.seed = 12}).SerializeAsString();
  CHECK(a == b);
  CHECK(a != c);
}

TEST_CASE("a profile's per-op overhead is added to every compute op, not to collectives", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 1 zero_stage: 0");
  const auto [a, b] = lowered_pair(s, [](profile::DeviceProfile& p) { p.set_op_overhead_s(7e-6); });
  const RankSchedule &ra = rank(a, 0), &rb = rank(b, 0);
  REQUIRE(ra.ops_size() == rb.ops_size());
  int compute = 0;
  for (int i = 0; i < ra.ops_size(); ++i) {
    INFO(ra.ops(i).id());
    if (ra.ops(i).collective() != 0) {
      CHECK(rb.ops(i).duration_s() == ra.ops(i).duration_s());
    } else if (ra.ops(i).duration_s() > 0) {
      CHECK(rb.ops(i).duration_s() == Approx(ra.ops(i).duration_s() + 7e-6).epsilon(1e-12));
      ++compute;
    }
  }
  CHECK(compute > 10);
}

TEST_CASE("a profile's factor for a kind of op scales those ops in that direction, their overhead aside", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 8");
  const auto [a, b] = lowered_pair(
      s,
      [](profile::DeviceProfile& p) {
        profile::OpKindFactor* gate = p.add_op_kind();
        gate->set_op("gate");
        gate->set_time_factor(1.5);
      },
      [](profile::DeviceProfile& p) { p.set_op_overhead_s(2e-6); });
  const RankSchedule &ra = rank(a, 0), &rb = rank(b, 0);
  REQUIRE(ra.ops_size() == rb.ops_size());
  int gates = 0;
  for (int i = 0; i < ra.ops_size(); ++i) {
    INFO(ra.ops(i).id());
    if (ra.ops(i).name() == "moe.gate" && !ra.ops(i).backward()) {
      CHECK(rb.ops(i).duration_s() == Approx(1.5 * (ra.ops(i).duration_s() - 2e-6) + 2e-6).epsilon(1e-12));
      ++gates;
    } else {
      CHECK(rb.ops(i).duration_s() == ra.ops(i).duration_s());  // gates backward and every other op
    }
  }
  CHECK(gates > 0);
}

TEST_CASE("a profile's step spread gives every compute op a gap of its share, collectives none", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 1 zero_stage: 0");
  auto spread = [](profile::DeviceProfile& p) { p.set_step_spread_factor(1.04); };
  const auto [a, b] = lowered_pair(s, spread);
  const RankSchedule &ra = rank(a, 0), &rb = rank(b, 0);
  REQUIRE(ra.ops_size() == rb.ops_size());
  int compute = 0;
  for (int i = 0; i < ra.ops_size(); ++i) {
    INFO(ra.ops(i).id());
    CHECK(ra.ops(i).gap_s() == 0);
    CHECK(rb.ops(i).duration_s() == ra.ops(i).duration_s());  // the op's own time stays
    if (ra.ops(i).collective() != 0) {
      CHECK(rb.ops(i).gap_s() == 0);
    } else if (ra.ops(i).duration_s() > 0) {
      CHECK(rb.ops(i).gap_s() == Approx(0.04 * ra.ops(i).duration_s()).epsilon(1e-12));
      ++compute;
    }
  }
  CHECK(compute > 10);
  // The simulated step takes the gaps.
  CHECK(sim::simulate(b, *s.cluster, {}).step_time_s > sim::simulate(a, *s.cluster, {}).step_time_s);
  // Calibrated with 16 ranks a host and 1.02 alone: 8 of them on the host take 1.02 + 0.02 x 7 / 15.
  const Schedule c = lowered_pair(s,
                                  [](profile::DeviceProfile& p) {
                                    p.set_ranks_per_host(16);
                                    p.set_alone_step_spread_factor(1.02);
                                  },
                                  spread)
                         .second;
  const RankSchedule& rc = rank(c, 0);
  for (int i = 0; i < rc.ops_size(); ++i)
    if (rc.ops(i).collective() == 0 && rc.ops(i).duration_s() > 0)
      CHECK(rc.ops(i).gap_s() == Approx((0.02 + 0.02 * 7 / 15) * rc.ops(i).duration_s()).epsilon(1e-12));
}

TEST_CASE("a profile calibrated with more ranks per host scales a plan with fewer between alone and busy", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 1 zero_stage: 0");  // 8 ranks on one DGX node
  cost::DeviceProfile plain = cost::default_profile(s.cluster->device_type(0));
  profile::DeviceProfile spec = plain.spec();
  spec.set_ranks_per_host(16);
  spec.set_alone_time_factor(0.7);
  const cost::DeviceProfile shared = cost::DeviceProfile::from_spec(spec);
  const Schedule a = schedule::lower(s, {.profile = &plain});
  const Schedule b = schedule::lower(s, {.profile = &shared});
  const RankSchedule &ra = rank(a, 3), &rb = rank(b, 3);
  REQUIRE(ra.ops_size() == rb.ops_size());
  const double factor = 0.7 + 0.3 * 7 / 15;  // 8 of the 16 calibrated ranks on the host
  for (int i = 0; i < ra.ops_size(); ++i) {
    INFO(ra.ops(i).id());
    const double expected = ra.ops(i).collective() == 0 ? ra.ops(i).duration_s() * factor : ra.ops(i).duration_s();
    CHECK(rb.ops(i).duration_s() == Approx(expected).epsilon(1e-12));
  }
  // The row gathers by their own factor: the embedding's backward (its scatter-adds alone) moves by
  // it, its forward between the two (its elementwise kernels by the op's), the ops without gathers
  // as before. Without launch overheads, which take the op's factor.
  profile::DeviceProfile quick = plain.spec();
  quick.set_kernel_launch_overhead_s(0);
  const cost::DeviceProfile unshared = cost::DeviceProfile::from_spec(quick);
  quick.set_ranks_per_host(16);
  quick.set_alone_time_factor(0.7);
  quick.set_alone_gather_time_factor(0.4);
  const cost::DeviceProfile gathers = cost::DeviceProfile::from_spec(quick);
  const Schedule c = schedule::lower(s, {.profile = &unshared}), d = schedule::lower(s, {.profile = &gathers});
  const RankSchedule &rc = rank(c, 3), &rd = rank(d, 3);
  REQUIRE(rd.ops_size() == rc.ops_size());
  const double gather_factor = 0.4 + 0.6 * 7 / 15;
  int embeds = 0, blocks = 0;
  for (int i = 0; i < rc.ops_size(); ++i) {
    INFO(rc.ops(i).id());
    const std::string& id = rc.ops(i).id();
    const bool embed = id.rfind("embed ", 0) == 0, block = id.find(".attn") != std::string::npos || id.find(".mlp") != std::string::npos;
    embeds += embed;
    blocks += block;
    if (block) CHECK(rd.ops(i).duration_s() == Approx(rc.ops(i).duration_s() * factor).epsilon(1e-9));
    if (embed && id.ends_with("bwd")) CHECK(rd.ops(i).duration_s() == Approx(rc.ops(i).duration_s() * gather_factor).margin(1e-10));
    if (embed && id.ends_with("fwd")) {
      CHECK(rd.ops(i).duration_s() > rc.ops(i).duration_s() * gather_factor + 1e-10);
      CHECK(rd.ops(i).duration_s() < rc.ops(i).duration_s() * factor - 1e-10);
    }
  }
  CHECK(embeds == 4);  // two micro-batches, forward and backward
  CHECK(blocks > 4);
}

TEST_CASE("forward row gathers take the gather footprint's factor at their rank's working set", "[lowering]") {
  // Points at half and twice rank 3's working set, 0.2 and 0.8: at its working set, half way in
  // log bytes, 0.5, which must price every op as a flat factor of 0.5 by bytes does (forward
  // gathers at 0.5, backward ones and the other kernels as before); past the last point, its 0.8.
  const cost::Setup s = make_setup("dp: 8 ep: 8 capacity_factor: 1.25");
  const double ws = cost::working_set_bytes(cost::estimate_memory(s).ranks.at(3));
  REQUIRE(ws > 0);
  const profile::DeviceProfile base = cost::default_profile(s.cluster->device_type(0)).spec();
  auto lowered = [&](const std::function<void(profile::DeviceProfile&)>& edit) {
    profile::DeviceProfile spec = base;
    edit(spec);
    const cost::DeviceProfile p = cost::DeviceProfile::from_spec(spec);
    return schedule::lower(s, {.seed = 3, .profile = &p});
  };
  auto point = [](google::protobuf::RepeatedPtrField<profile::BytesFactor>* curve, double bytes, double factor) {
    profile::BytesFactor* f = curve->Add();
    f->set_bytes(bytes);
    f->set_time_factor(factor);
  };
  struct Case {
    double first, second, factor;  // the points' working sets (0.2 and 0.8), the factor at ws
  };
  for (const Case c : {Case{ws / 2, 2 * ws, 0.5}, Case{ws / 8, ws / 2, 0.8}}) {
    INFO("points at " << c.first << " and " << c.second << " bytes, the rank's working set " << ws);
    const Schedule by_footprint = lowered([&](profile::DeviceProfile& p) {
      point(p.mutable_gather_footprint(), c.first, 0.2);
      point(p.mutable_gather_footprint(), c.second, 0.8);
    });
    const Schedule by_bytes = lowered([&](profile::DeviceProfile& p) { point(p.mutable_gather_in_situ(), 1e3, c.factor); });
    const Schedule plain = lowered([](profile::DeviceProfile&) {});
    const RankSchedule &rf = rank(by_footprint, 3), &rb = rank(by_bytes, 3), &rp = rank(plain, 3);
    REQUIRE(rf.ops_size() == rb.ops_size());
    int moved = 0;
    for (int i = 0; i < rf.ops_size(); ++i) {
      INFO(rf.ops(i).id());
      CHECK(rf.ops(i).duration_s() == Approx(rb.ops(i).duration_s()).epsilon(1e-12));
      moved += rf.ops(i).duration_s() != Approx(rp.ops(i).duration_s()).epsilon(1e-9);
    }
    CHECK(moved > 0);  // the embedding's and the MoE layers' forward gathers
  }
}

TEST_CASE("lookups' backwards take the scatter-add footprint's factor at their rank's working set", "[lowering]") {
  // Points at half and twice rank 3's working set, 0.5 and 1.5: at it, 1 (half way in log bytes),
  // in place of the backward gathers' in_situ x backward (here 3 x 1): the embedding's backward
  // (a scatter-add into its tables) as with no factor at all; every other op, the MoE layers'
  // backward gathers among them, as with in_situ 3.
  const cost::Setup s = make_setup("dp: 8 ep: 8 capacity_factor: 1.25");
  const double ws = cost::working_set_bytes(cost::estimate_memory(s).ranks.at(3));
  profile::DeviceProfile spec = cost::default_profile(s.cluster->device_type(0)).spec();
  const cost::DeviceProfile unscaled = cost::DeviceProfile::from_spec(spec);
  profile::InSituFactor* f = spec.add_in_situ();
  f->set_op(profile::EMBEDDING);
  f->set_time_factor(3);
  const cost::DeviceProfile plain = cost::DeviceProfile::from_spec(spec);
  for (auto [bytes, factor] : {std::pair{ws / 2, 0.5}, {2 * ws, 1.5}}) {
    profile::BytesFactor* p = spec.add_scatter_add_footprint();
    p->set_bytes(bytes);
    p->set_time_factor(factor);
  }
  const cost::DeviceProfile footprint = cost::DeviceProfile::from_spec(spec);
  const Schedule sp = schedule::lower(s, {.seed = 3, .profile = &plain}),
                 sf = schedule::lower(s, {.seed = 3, .profile = &footprint}),
                 su = schedule::lower(s, {.seed = 3, .profile = &unscaled});
  const RankSchedule &rp = rank(sp, 3), &rf = rank(sf, 3), &ru = rank(su, 3);
  REQUIRE(rp.ops_size() == rf.ops_size());
  REQUIRE(ru.ops_size() == rf.ops_size());
  int lookups = 0;
  for (int i = 0; i < rp.ops_size(); ++i) {
    const std::string& id = rp.ops(i).id();
    INFO(id);
    const bool lookup = id.starts_with("embed") && id.ends_with("bwd");
    lookups += lookup;
    CHECK(rf.ops(i).duration_s() == Approx((lookup ? ru : rp).ops(i).duration_s()).epsilon(1e-12));
    if (lookup) CHECK(rf.ops(i).duration_s() < rp.ops(i).duration_s());
  }
  CHECK(lookups == 2);  // two micro-batches
}

TEST_CASE("a batch-priority dispatch prices the sort of its EP group's tokens", "[lowering]") {
  // 32 tokens per rank and micro-batch, EP = 8: under batch priority every rank of the group sorts
  // the group's 256 tokens (256 log2 256 = 2048 at the profile's priority_sort_s); vanilla sorts none.
  for (const char* policy : {"BATCH_PRIORITY", "VANILLA"}) {
    const PlainAndPriced l =
        lower_plain_and_priced(make_setup(fmt::format("dp: 8 ep: 8 drop_policy: {} capacity_factor: 1.25", policy)),
                               [](profile::DeviceProfile& p) { p.set_priority_sort_s(1e-8); });
    const RankSchedule &ra = rank(l.plain, 2), &rb = rank(l.priced, 2);
    REQUIRE(ra.ops_size() == rb.ops_size());
    const bool sorts = std::string(policy) == "BATCH_PRIORITY";
    for (int i = 0; i < ra.ops_size(); ++i) {
      INFO(policy << " " << ra.ops(i).id());
      const bool permute = ra.ops(i).id().find(".moe.permute") != std::string::npos && ra.ops(i).id().ends_with("fwd");
      const double extra = sorts && permute ? 256 * 8 * 1e-8 : 0;
      CHECK(rb.ops(i).duration_s() == Approx(ra.ops(i).duration_s() + extra).margin(1e-8));  // ns-rounded
    }
  }
}

TEST_CASE("a dispatch's capacity decision is priced over its EP group's token-choices", "[lowering]") {
  // 32 tokens per rank and micro-batch, top-2: every rank of an EP group of 8 decides the group's
  // 8 x 32 x 2 choices; with EP = 1 the gate holds the dispatch and its rank's 64.
  for (int ep : {8, 1}) {
    const PlainAndPriced l = lower_plain_and_priced(make_setup(fmt::format("dp: 8 ep: {} drop_policy: NO_DROP", ep)),
                                                    [](profile::DeviceProfile& p) { p.set_dispatch_choice_s(1e-8); });
    const RankSchedule &ra = rank(l.plain, 2), &rb = rank(l.priced, 2);
    REQUIRE(ra.ops_size() == rb.ops_size());
    const std::string holder = ep > 1 ? "L0.moe.permute mb1 fwd" : "L0.moe.gate mb1 fwd";
    for (int i = 0; i < ra.ops_size(); ++i) {
      INFO(ra.ops(i).id());
      const double extra = ra.ops(i).id().find(ep > 1 ? ".moe.permute" : ".moe.gate") != std::string::npos &&
                                   ra.ops(i).id().ends_with("fwd")
                               ? (ep > 1 ? 8 * 32 * 2 : 32 * 2) * 1e-8
                               : 0;
      CHECK(rb.ops(i).duration_s() == Approx(ra.ops(i).duration_s() + extra).margin(1e-8));  // ns-rounded
    }
    CHECK(find(rb, holder).duration_s() > find(ra, holder).duration_s());
  }
}

TEST_CASE("a profile's footprint factor slows every collective by its ranks' working sets", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 8");
  const cost::MemoryReport m = cost::estimate_memory(s);
  auto footprint = [](std::vector<std::pair<double, double>> points) {
    return [points](profile::DeviceProfile& p) {
      for (auto [bytes, factor] : points) {
        profile::BytesFactor* f = p.add_transfer_footprint();
        f->set_bytes(bytes);
        f->set_time_factor(factor);
      }
    };
  };
  // Points at half and twice each rank's working set: every rank is half way in log bytes.
  const double ws = cost::working_set_bytes(m.ranks[0]);
  REQUIRE(ws > 0);
  for (const cost::RankMemory& r : m.ranks) REQUIRE(cost::working_set_bytes(r) == Approx(ws));
  const PlainAndPriced l = lower_plain_and_priced(s, footprint({{ws / 2, 1.0}, {ws * 2, 3.0}}));
  REQUIRE(l.priced.collectives_size() == l.plain.collectives_size());
  for (int c = 0; c < l.priced.collectives_size(); ++c) {
    CHECK(l.plain.collectives(c).transfer_factor() == 0);  // priors: none
    CHECK(l.priced.collectives(c).transfer_factor() == Approx(2.0));
  }
  // The simulator moves a collective's bytes that many times slower: in the analytic network its
  // transfer part grows by exactly (f - 1) x transfer, so equal steps in f add equal time.
  auto a2a_s = [&](double factor) {
    const Schedule sch = lower_plain_and_priced(s, footprint({{1.0, factor}})).priced;
    sim::SimOptions o = analytic();
    o.record_trace = true;
    const sim::SimResult r = sim::simulate(sch, *s.cluster, o);
    for (const trace::Span& sp : r.trace.spans())
      if (sp.rank() == 2 && sp.op_id() == "L0.moe.dispatch_a2a mb0 fwd") return static_cast<double>(sp.end_ns() - sp.start_ns());
    FAIL("no dispatch span");
    return 0.0;
  };
  const double one = a2a_s(1), two = a2a_s(2), three = a2a_s(3);
  CHECK(two > one);
  CHECK(three - two == Approx(two - one).epsilon(0.01));
}

TEST_CASE("a profile's host footprint scales the routing's host time of every rank, not its kernels", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 8");
  auto gate_s = [&](double rate, double factor) {
    const PlainAndPriced l = lower_plain_and_priced(s, [&](profile::DeviceProfile& p) {
      p.set_routing_choice_s(rate);
      p.set_dispatch_choice_s(rate);
      profile::BytesFactor* h = p.add_host_footprint();
      h->set_bytes(1);
      h->set_time_factor(factor);
    });
    return find(rank(l.priced, 2), "L0.moe.gate mb0 fwd").duration_s();
  };
  const double kernels = gate_s(0, 1), host = gate_s(1e-8, 1) - kernels;
  CHECK(host > 0);
  CHECK(gate_s(1e-8, 2) - kernels == Approx(2 * host).epsilon(1e-6));
  CHECK(gate_s(0, 2) == Approx(kernels));
}

// The executor adds an MoE layer's residual in its combine op, and the residual's gradient into
// the stream's at the end of the gate's backward (the combine's backward passes it through):
// priced there, an elementwise backward factor moves the gate's backward by the residual's and
// the top-k's backward kernels, and leaves the combine's backward (its summing gather) alone.
TEST_CASE("an MoE layer's residual is priced forward in the combine and its gradient's sum in the gate's backward", "[lowering]") {
  const cost::Setup s = make_setup("dp: 8 ep: 1 zero_stage: 0");
  auto slower_elementwise_backward = [](profile::DeviceProfile& p) {
    profile::BackwardFactor* b = p.add_backward();
    b->set_op(profile::ELEMENTWISE);
    b->set_time_factor(3);
  };
  const cost::DeviceProfile plain = cost::default_profile(s.cluster->device_type(0));
  profile::DeviceProfile spec = plain.spec();
  REQUIRE(spec.backward_size() == 0);  // the priors' backward factors are 1
  slower_elementwise_backward(spec);
  const cost::DeviceProfile priced = cost::DeviceProfile::from_spec(spec);
  const PlainAndPriced l = lower_plain_and_priced(s, slower_elementwise_backward);
  const RankSchedule &a = rank(l.plain, 0), &b = rank(l.priced, 0);
  CHECK(find(b, "L0.moe.combine mb0 bwd").duration_s() == find(a, "L0.moe.combine mb0 bwd").duration_s());
  CHECK(find(b, "L0.moe.combine mb0 fwd").duration_s() == find(a, "L0.moe.combine mb0 fwd").duration_s());
  // The gate's backward: its top-k's and the residual's backward kernels at 3x.
  cost::ModelOptions mo;
  mo.sequence = 32;
  mo.tokens = 32;  // one sequence per micro-batch
  mo.act_elem_bytes = cost::activation_bytes(*s.workload);
  const cost::ModelCost mc = cost::analyze(*s.model, mo);
  double extra = 0;
  for (const cost::Op& op : mc.layers[1].ops)  // L0
    if (op.name == "L0.moe.topk" || op.name == "L0.residual")
      for (const cost::Op& bwd : cost::backward_ops(op))
        extra += cost::op_time(priced, bwd, cost::DType::kBf16).time_s - cost::op_time(plain, bwd, cost::DType::kBf16).time_s;
  REQUIRE(mc.layers[1].name == "L0");
  CHECK(extra > 0);
  CHECK(find(b, "L0.moe.gate mb0 bwd").duration_s() ==
        Approx(find(a, "L0.moe.gate mb0 bwd").duration_s() + extra).epsilon(1e-9));
}
