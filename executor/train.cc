#include "executor/train.h"

#include "costmodel/model.h"
#include "executor/cuda_memory.h"
#include "executor/error.h"
#include "executor/layers.h"
#include "executor/optimizer.h"
#include "traces/recorder.h"

#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <memory>
#include <optional>

namespace moesim::exec {
namespace {

// This process's peak resident memory (Linux reports ru_maxrss in KiB).
double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024;
}

// A span on the steady clock that starts and ends once the device has finished the work issued
// before it (CPU: no wait), so it measures the device's time for its ops, not their launch.
class DeviceSpan {
 public:
  DeviceSpan(Backend& backend, trace::Recorder& rec, std::string op_id, trace::OpKind kind,
             trace::StreamId stream = {})
      : backend_(backend), span_((backend.synchronize(), rec.begin(std::move(op_id), kind, stream))) {}
  DeviceSpan(const DeviceSpan&) = delete;
  DeviceSpan& operator=(const DeviceSpan&) = delete;
  ~DeviceSpan() {
    try {
      end();
    } catch (...) {  // a failed device surfaces at the next call; a destructor must not throw
    }
  }
  trace::ScopedSpan& span() { return span_; }
  void end() {
    if (!span_.is_open()) return;
    backend_.synchronize();
    span_.end();
  }

 private:
  Backend& backend_;
  trace::ScopedSpan span_;
};

// "cpu", "cuda:0": the device named on a rank's spans.
std::string device_label(const Backend& backend) {
  const std::string name = backend.name();
  return name.substr(0, name.find(' '));
}

int experts_of(const model::Transformer& t) { return t.has_moe() ? t.moe().experts() : 1; }

// The options' EP group size: theirs, else as many ranks as divide the experts (train.h).
int ep_of(const TrainOptions& o, int ranks) {
  if (o.ep > 0) return o.ep;
  const int experts = experts_of(o.model.transformer());
  int ep = 1;
  for (int e = 1; e <= ranks; ++e)
    if (ranks % e == 0 && experts % e == 0) ep = e;
  return ep;
}

// A GELU MLP for the dense layers of a model with MoE every n-th layer.
class Mlp {
 public:
  Mlp(Backend& b, const std::string& name, int64_t d, int64_t f, uint64_t seed)
      : backend_(b), fc1_(b, name + ".fc1", d, f, derive_seed(seed, name + ".fc1")),
        fc2_(b, name + ".fc2", f, d, derive_seed(seed, name + ".fc2")) {}
  Tensor forward(const Tensor& x) {
    pre_ = fc1_.forward(x);
    Tensor act = Tensor::empty(pre_.shape(), DType::kF32, backend_.device());
    backend_.gelu(pre_.device_f32(), act.device_f32(), act.numel());
    return fc2_.forward(act);
  }
  Tensor backward(const Tensor& dy) {
    Tensor dact = fc2_.backward(dy);
    Tensor dpre = Tensor::empty(pre_.shape(), DType::kF32, backend_.device());
    backend_.gelu_backward(pre_.device_f32(), dact.device_f32(), dpre.device_f32(), dpre.numel());
    return fc1_.backward(dpre);
  }
  void register_params(ParamRegistry& r) {
    fc1_.register_params(r);
    fc2_.register_params(r);
  }

 private:
  Backend& backend_;
  Linear fc1_, fc2_;
  Tensor pre_;
};

struct Block {
  std::string name;
  std::unique_ptr<LayerNorm> ln1, ln2;
  std::unique_ptr<CausalSelfAttention> attn;
  std::unique_ptr<MoeLayer> moe;
  std::unique_ptr<Mlp> mlp;
};

// What an op of the Schedule does in the executor.
enum class Action { kEmbed, kAttn, kMlp, kMoeGate, kMoeRoute, kMoePermute, kMoeDispatch, kMoeExperts, kMoeCombineA2a,
                    kMoeCombine, kHead, kGradSync, kExpertGradSync, kOptimizer };

struct ExecOp {
  Action action = Action::kOptimizer;
  bool backward = false;
  int block = -1;        // transformer block (layer - 1), -1 for others
  int micro_batch = 0;
  const schedule::Op* op = nullptr;
};

// The schedule's ops of one rank as executor actions, or every problem (empty ops then).
struct Program {
  std::vector<ExecOp> ops;
  int micro_batches = 1;
  std::vector<std::string> problems;
};

// Layers of the cost model (costmodel/model.h): "embed", "L0" .. "L<n-1>", "head".
Program compile(const schedule::RankSchedule& rs, const model::Transformer& t, int ep) {
  Program p;
  const int layers = t.layers();
  auto refuse = [&](const schedule::Op& op, const std::string& why) {
    if (p.problems.size() < 5)
      p.problems.push_back(fmt::format("op '{}' ({}): {}", op.id(), op.name(), why));
  };
  static const std::pair<const char*, Action> kLayerParts[] = {
      {"attn", Action::kAttn},
      {"mlp", Action::kMlp},
      {"moe.gate", Action::kMoeGate},
      {"moe.route", Action::kMoeRoute},
      {"moe.permute", Action::kMoePermute},
      {"moe.dispatch_a2a", Action::kMoeDispatch},
      {"moe.experts", Action::kMoeExperts},
      {"moe.combine_a2a", Action::kMoeCombineA2a},
      {"moe.combine", Action::kMoeCombine}};
  int open_mb = -1;  // the micro-batch whose forward ran and backward has not finished
  for (const schedule::Op& op : rs.ops()) {
    ExecOp e;
    e.op = &op;
    e.backward = op.backward();
    e.micro_batch = std::max(0, op.micro_batch());
    p.micro_batches = std::max(p.micro_batches, e.micro_batch + 1);
    const std::string& id = op.id();
    const bool recompute = id.size() >= 10 && id.compare(id.size() - 10, 10, " recompute") == 0;
    if (recompute || op.name() == "recompute") {
      refuse(op, "activation recompute is not supported by the executor (use recompute: NONE)");
      continue;
    }
    if (op.name() == "optimizer") {
      e.action = Action::kOptimizer;
    } else if (id.rfind("grad_bucket", 0) == 0 || id.rfind("expert_grad_bucket", 0) == 0) {
      if (op.kind() != trace::ALL_REDUCE) refuse(op, "the executor all-reduces gradients (ZeRO 0); ZeRO >= 1 is not supported");
      e.action = id[0] == 'e' ? Action::kExpertGradSync : Action::kGradSync;
    } else if (op.layer() == 0 && op.name() == "embed") {
      e.action = Action::kEmbed;
    } else if (op.layer() == layers + 1 && op.name() == "head") {
      e.action = Action::kHead;
    } else if (op.layer() >= 1 && op.layer() <= layers) {
      e.block = op.layer() - 1;
      // An overlap chunk's id carries ".c<i>" after the part ("L0.moe.experts.c1 mb0 fwd").
      bool chunked = false;
      for (size_t at = id.find(".c"); at != std::string::npos; at = id.find(".c", at + 1))
        chunked = chunked || (at + 2 < id.size() && std::isdigit(static_cast<unsigned char>(id[at + 2])));
      bool known = false;
      for (const auto& [name, action] : kLayerParts)
        if (op.name() == name && !chunked) {
          e.action = action;
          known = true;
        }
      if (!known) {
        refuse(op, "not an executor op: it runs DP x EP training without recompute, ZeRO, offload, overlap chunks or "
                   "tensor/pipeline parallelism");
        continue;
      }
      if (e.action != Action::kAttn && (e.action != Action::kMlp) != cost::is_moe_layer(t, e.block))
        refuse(op, "does not match the model's layer kind (MoE or dense)");
    } else {
      refuse(op, "not an executor op: it runs DP x EP training without recompute, ZeRO, offload, overlap chunks or "
                 "tensor/pipeline parallelism");
      continue;
    }
    // One micro-batch's activations at a time: each forward's backward before the next forward
    // (1F1B on one stage), as the layers keep one set of activations.
    if (e.action == Action::kEmbed && !e.backward) {
      if (open_mb >= 0) refuse(op, fmt::format("starts before micro-batch {}'s backward ended: the executor keeps one "
                                               "micro-batch's activations (use the 1F1B schedule)", open_mb));
      open_mb = e.micro_batch;
    }
    if (e.action == Action::kEmbed && e.backward) open_mb = -1;
    p.ops.push_back(e);
  }
  if (rs.ops_size() == 0) p.problems.push_back("the rank's schedule has no ops");
  // The MoE layer exchanges tokens exactly when EP > 1: four all-to-alls per MoE block and
  // micro-batch, after one route (the routing metadata's all-gather) and its permutation.
  int a2a = 0, routes = 0, moe_blocks = 0;
  for (const ExecOp& e : p.ops) {
    a2a += e.action == Action::kMoeDispatch || e.action == Action::kMoeCombineA2a;
    routes += e.action == Action::kMoeRoute || e.action == Action::kMoePermute;
  }
  for (int i = 0; i < t.layers(); ++i) moe_blocks += cost::is_moe_layer(t, i);
  if (ep > 1 && a2a != 4 * moe_blocks * p.micro_batches)
    p.problems.push_back(fmt::format("the schedule has {} all-to-alls where EP {} needs {} (4 per MoE layer and "
                                     "micro-batch): was it lowered with another strategy?",
                                     a2a, ep, 4 * moe_blocks * p.micro_batches));
  if (ep > 1 && routes != 2 * moe_blocks * p.micro_batches)
    p.problems.push_back(fmt::format("the schedule has {} moe.route and moe.permute ops where EP {} needs {} (one of "
                                     "each per MoE layer and micro-batch): was it lowered by an older moesim?",
                                     routes, ep, 2 * moe_blocks * p.micro_batches));
  if (ep == 1 && a2a + routes > 0)
    p.problems.push_back("the schedule exchanges tokens (all-to-alls, routes) but EP is 1");
  if (!p.problems.empty()) p.ops.clear();
  return p;
}

// The ops the lowering (schedule/lowering.h) gives one rank of a DP x EP training step of this
// model with one micro-batch, the default gradient bucket (one bucket: the model is small) and no
// overlap chunks: for runs without a plan.
schedule::RankSchedule default_schedule(const model::Transformer& t, int rank, int ranks, int ep) {
  schedule::RankSchedule rs;
  rs.set_rank(rank);
  rs.set_represents(1);
  const int layers = t.layers();
  auto add = [&](std::string what, std::string name, trace::OpKind kind, int layer, bool bwd, bool comm = false) {
    schedule::Op* op = rs.add_ops();
    op->set_id(layer >= 0 ? fmt::format("{} mb0 {}", what, bwd ? "bwd" : "fwd") : what);
    op->set_name(std::move(name));
    op->set_kind(kind);
    op->mutable_stream()->set_kind(comm ? trace::COMM : trace::COMPUTE);
    op->set_micro_batch(layer >= 0 ? 0 : -1);
    op->set_layer(layer);
    op->set_backward(bwd);
    return op;
  };
  auto block = [&](int i, bool bwd) {
    const std::string n = fmt::format("L{}", i);
    if (!cost::is_moe_layer(t, i)) {
      if (bwd) add(n + ".mlp", "mlp", trace::GEMM, i + 1, true);
      add(n + ".attn", "attn", trace::ATTENTION, i + 1, bwd);
      if (!bwd) add(n + ".mlp", "mlp", trace::GEMM, i + 1, false);
      return;
    }
    if (!bwd) add(n + ".attn", "attn", trace::ATTENTION, i + 1, false);
    const bool a2a = ep > 1;
    if (bwd) add(n + ".moe.combine", "moe.combine", trace::COMBINE, i + 1, true);
    else add(n + ".moe.gate", "moe.gate", trace::GATE, i + 1, false);
    if (a2a && !bwd) {
      add(n + ".moe.route", "moe.route", trace::ALL_GATHER, i + 1, false, true);
      add(n + ".moe.permute", "moe.permute", trace::ELEMENTWISE, i + 1, false);
    }
    if (a2a) add(n + (bwd ? ".moe.combine_a2a" : ".moe.dispatch_a2a"), bwd ? "moe.combine_a2a" : "moe.dispatch_a2a",
                 trace::ALL_TO_ALL, i + 1, bwd, true);
    add(n + ".moe.experts", "moe.experts", trace::GROUPED_GEMM, i + 1, bwd);
    if (a2a) add(n + (bwd ? ".moe.dispatch_a2a" : ".moe.combine_a2a"), bwd ? "moe.dispatch_a2a" : "moe.combine_a2a",
                 trace::ALL_TO_ALL, i + 1, bwd, true);
    if (bwd) add(n + ".moe.gate", "moe.gate", trace::GATE, i + 1, true);
    else add(n + ".moe.combine", "moe.combine", trace::COMBINE, i + 1, false);
    if (bwd) add(n + ".attn", "attn", trace::ATTENTION, i + 1, true);
  };
  add("embed", "embed", trace::ELEMENTWISE, 0, false);
  for (int i = 0; i < layers; ++i) block(i, false);
  add("head", "head", trace::GEMM, layers + 1, false);
  add("head", "head", trace::GEMM, layers + 1, true);
  for (int i = layers - 1; i >= 0; --i) block(i, true);
  add("embed", "embed", trace::ELEMENTWISE, 0, true);
  if (ranks > 1) {
    schedule::Op* g = add("grad_bucket0", "grad_allreduce", trace::ALL_REDUCE, -1, true, true);
    for (int li = layers + 1; li >= 0; --li) g->add_grad_layers(li);  // in the backward's order
  }
  if (ranks / ep > 1 && t.has_moe()) {
    schedule::Op* g = add("expert_grad_bucket0", "grad_allreduce", trace::ALL_REDUCE, -1, true, true);
    for (int i = layers - 1; i >= 0; --i)
      if (cost::is_moe_layer(t, i)) g->add_grad_layers(i + 1);
  }
  add("optimizer", "optimizer", trace::OPTIMIZER, -1, false);
  return rs;
}

class Model {
 public:
  Model(const TrainOptions& o, int ep, Backend& b, Comm* ep_comm, trace::Recorder& rec)
      : o_(o), t_(o.model.transformer()), backend_(b), rec_(rec) {
    const int64_t d = t_.hidden();
    const uint64_t seed = o.seed;
    tok_ = std::make_unique<Embedding>(b, "embed.tokens", t_.vocab(), d, derive_seed(seed, "embed.tokens"));
    pos_ = std::make_unique<Embedding>(b, "embed.positions", sequence(), d, derive_seed(seed, "embed.positions"));
    for (int i = 0; i < t_.layers(); ++i) {
      Block blk;
      blk.name = fmt::format("L{}", i);
      blk.ln1 = std::make_unique<LayerNorm>(b, blk.name + ".ln1", d);
      blk.ln2 = std::make_unique<LayerNorm>(b, blk.name + ".ln2", d);
      blk.attn = std::make_unique<CausalSelfAttention>(b, blk.name + ".attn", d, t_.heads(),
                                                       derive_seed(seed, blk.name + ".attn"));
      if (cost::is_moe_layer(t_, i)) {
        const model::Moe& m = t_.moe();
        MoeLayerConfig c;
        c.hidden = d;
        c.ffn_hidden = m.has_expert_ffn_hidden() ? m.expert_ffn_hidden() : t_.ffn_hidden();
        c.num_experts = m.experts();
        c.top_k = m.top_k();
        c.capacity_factor = o.capacity_factor;
        c.routing = o.routing;
        c.seed = derive_seed(seed, blk.name + ".moe");
        // Switch Transformer's load-balancing loss at its paper's weight 0.01. Every rank of an EP
        // group back-propagates the group's loss through its own tokens and the trainer divides
        // summed gradients by dp: weighting it by ep gives the mean over EP groups at 0.01.
        c.switch_loss_weight = 0.01 * ep;
        c.importance_loss_weight = 0;
        c.load_loss_weight = 0;
        c.damex_loss_weight = 0;
        c.gate_noise_std = 0;
        blk.moe = std::make_unique<MoeLayer>(c, b, ep_comm);
      } else {
        blk.mlp = std::make_unique<Mlp>(b, blk.name + ".mlp", d, t_.ffn_hidden(), seed);
      }
      blocks_.push_back(std::move(blk));
    }
    lnf_ = std::make_unique<LayerNorm>(b, "head.ln", d);
    head_ = std::make_unique<Linear>(b, "head.logits", d, t_.vocab(), derive_seed(seed, "head.logits"));

    // Parameters by the cost model's layer (embed = 0, block i = i + 1, head = n + 1).
    auto layer_params = [&](int layer, auto&& register_into) {
      const size_t before = params_.size();
      register_into();
      for (size_t i = before; i < params_.size(); ++i) layer_of_param_.push_back(layer);
    };
    layer_params(0, [&] {
      tok_->register_params(params_);
      pos_->register_params(params_);
    });
    for (size_t i = 0; i < blocks_.size(); ++i) {
      Block& blk = blocks_[i];
      layer_params(static_cast<int>(i) + 1, [&] {
        blk.ln1->register_params(params_);
        blk.attn->register_params(params_);
        blk.ln2->register_params(params_);
        if (blk.mlp) blk.mlp->register_params(params_);
        if (blk.moe) {
          MoeLayer& m = *blk.moe;
          params_.add(blk.name + ".moe.router", m.router_weight(), m.router_weight_grad(), ParamSharing::kReplicated);
          params_.add(blk.name + ".moe.w1", m.w1(), m.w1_grad(), ParamSharing::kLocal);
          params_.add(blk.name + ".moe.b1", m.b1(), m.b1_grad(), ParamSharing::kLocal);
          params_.add(blk.name + ".moe.w2", m.w2(), m.w2_grad(), ParamSharing::kLocal);
          params_.add(blk.name + ".moe.b2", m.b2(), m.b2_grad(), ParamSharing::kLocal);
        }
      });
    }
    layer_params(t_.layers() + 1, [&] {
      lnf_->register_params(params_);
      head_->register_params(params_);
    });
    expert_load_.resize(blocks_.size());
  }

  int sequence() const { return o_.sequence > 0 ? o_.sequence : t_.max_sequence(); }
  ParamRegistry& params() { return params_; }
  int layer_of_param(size_t i) const { return layer_of_param_[i]; }

  // Starts a step of `micro_batches` micro-batches of `seqs` sequences each, the first of this
  // rank's at global sequence `first`.
  void begin_step(int step, int micro_batches, int64_t seqs, int64_t first) {
    step_ = step;
    micro_batches_ = micro_batches;
    seqs_ = seqs;
    first_ = first;
    loss_sum_ = 0;
    for (std::vector<int64_t>& l : expert_load_) l.clear();
  }
  // The mean loss over this rank's micro-batches; records the step's expert loads.
  double end_step() {
    for (size_t i = 0; i < blocks_.size(); ++i) {
      if (expert_load_[i].empty()) continue;
      trace::ExpertLoad load;
      load.set_layer(static_cast<int>(i) + 1);
      load.set_rank(rec_.rank());
      load.set_step(step_);
      for (int64_t c : expert_load_[i]) load.add_tokens_per_expert(c);
      rec_.add_expert_load(std::move(load));
    }
    return loss_sum_ / micro_batches_;
  }

  // The micro-batch's tokens (the data loader's work, before the embedding op's span opens).
  void load_batch(int micro_batch) {
    const int64_t s = sequence(), tokens = seqs_ * s;
    synthetic_batch(o_.seed, step_, t_.vocab(), static_cast<int>(s), first_ + micro_batch * seqs_, seqs_, ids_, targets_);
    positions_.resize(static_cast<size_t>(tokens));
    for (int64_t i = 0; i < tokens; ++i) positions_[static_cast<size_t>(i)] = static_cast<int32_t>(i % s);
  }

  // Runs one layer op of the schedule (not gradient syncs or the optimizer).
  void run(const ExecOp& e) {
    const int64_t s = sequence(), d = t_.hidden(), tokens = seqs_ * s;
    Block* blk = e.block >= 0 ? &blocks_[static_cast<size_t>(e.block)] : nullptr;
    switch (e.action) {
      case Action::kEmbed:
        if (!e.backward) {
          x_ = residual_add(backend_, tok_->forward(ids_), pos_->forward(positions_));
        } else {
          tok_->backward(dx_);
          pos_->backward(dx_);
        }
        return;
      case Action::kAttn:
        if (!e.backward) {
          Tensor a = blk->attn->forward(blk->ln1->forward(x_).reshaped({seqs_, s, d}));
          x_ = residual_add(backend_, x_, a.reshaped({tokens, d}));
        } else {
          Tensor da = blk->attn->backward(dx_.reshaped({seqs_, s, d}));
          accumulate(backend_, dx_, blk->ln1->backward(da.reshaped({tokens, d})));
        }
        return;
      case Action::kMlp:
        if (!e.backward) x_ = residual_add(backend_, x_, blk->mlp->forward(blk->ln2->forward(x_)));
        else accumulate(backend_, dx_, blk->ln2->backward(blk->mlp->backward(dx_)));
        return;
      case Action::kMoeGate:
        if (!e.backward) {
          MoeForwardOptions options;
          options.step = static_cast<uint64_t>(step_);
          options.tokens_per_rank = seqs_ * sequence();  // every rank's micro-batch: the same sequences
          blk->moe->forward_gate(blk->ln2->forward(x_), options);
        } else {
          accumulate(backend_, dx_, blk->ln2->backward(blk->moe->backward_gate()));
        }
        return;
      case Action::kMoeRoute:
        blk->moe->forward_route();
        return;
      case Action::kMoePermute:
        blk->moe->forward_permute();
        return;
      case Action::kMoeDispatch:
        e.backward ? blk->moe->backward_dispatch() : blk->moe->forward_dispatch();
        return;
      case Action::kMoeExperts:
        if (!e.backward) {
          blk->moe->forward_experts();
          // The routing is decided by now (by the gate with EP = 1, the permutation with EP > 1).
          std::vector<int64_t>& load = expert_load_[static_cast<size_t>(e.block)];
          const std::vector<int64_t>& now = blk->moe->routing_stats().assigned_per_expert;
          load.resize(now.size(), 0);
          for (size_t i = 0; i < now.size(); ++i) load[i] += now[i];
        } else {
          blk->moe->backward_experts();
        }
        return;
      case Action::kMoeCombineA2a:
        e.backward ? blk->moe->backward_combine_exchange() : blk->moe->forward_combine_exchange();
        return;
      case Action::kMoeCombine:
        if (!e.backward) x_ = residual_add(backend_, x_, blk->moe->forward_combine());
        else blk->moe->backward_combine(dx_);  // the residual passes dx through unchanged
        return;
      case Action::kHead:
        if (!e.backward) {
          LossAndGrad loss = cross_entropy(backend_, head_->forward(lnf_->forward(x_)), targets_);
          loss_sum_ += loss.loss;
          dlogits_ = loss.dlogits;
          // The step's loss is the mean over its micro-batches.
          if (micro_batches_ > 1)
            backend_.scale(1.0f / static_cast<float>(micro_batches_), dlogits_.device_f32(), dlogits_.numel());
        } else {
          dx_ = lnf_->backward(head_->backward(dlogits_));
        }
        return;
      default:
        MOESIM_ASSERT(false, "not a layer op");
    }
  }

  // Bytes this rank sends to other EP ranks in an MoE block's dispatch (and the combine sends
  // back): its kept assignments to experts held elsewhere, d fp32 values each.
  double a2a_bytes(int block) const {
    const MoeLayer& m = *blocks_[static_cast<size_t>(block)].moe;
    const std::span<const int32_t> experts = m.chosen_experts();
    const std::span<const uint8_t> kept = m.kept();
    const int first = m.first_local_expert(), last = first + m.local_experts();
    int64_t rows = 0;
    for (size_t i = 0; i < experts.size(); ++i) rows += kept[i] && (experts[i] < first || experts[i] >= last);
    return static_cast<double>(rows) * static_cast<double>(t_.hidden()) * sizeof(float);
  }
  int ep_size(int block) const { return blocks_[static_cast<size_t>(block)].moe->ep_size(); }
  double route_bytes(int block) const { return blocks_[static_cast<size_t>(block)].moe->route_bytes(); }
  MoeLayer::HostTimes take_host_times(int block) { return blocks_[static_cast<size_t>(block)].moe->take_host_times(); }

 private:
  const TrainOptions& o_;
  const model::Transformer& t_;
  Backend& backend_;
  trace::Recorder& rec_;
  std::unique_ptr<Embedding> tok_, pos_;
  std::vector<Block> blocks_;
  std::unique_ptr<LayerNorm> lnf_;
  std::unique_ptr<Linear> head_;
  ParamRegistry params_;
  std::vector<int> layer_of_param_;
  // The running step.
  int step_ = 0, micro_batches_ = 1;
  int64_t seqs_ = 0, first_ = 0;
  double loss_sum_ = 0;
  std::vector<int32_t> ids_, targets_, positions_;
  Tensor x_, dx_, dlogits_;                       // the residual stream and its gradient
  std::vector<std::vector<int64_t>> expert_load_;  // per block, this step's assignments per expert
};

const schedule::RankSchedule* rank_schedule(const schedule::Schedule& sch, int rank) {
  for (const schedule::RankSchedule& rs : sch.ranks())
    if (rs.rank() == rank) return &rs;
  return nullptr;
}

std::vector<std::string> validate_schedule(const TrainOptions& o, int ranks) {
  std::vector<std::string> out;
  if (!o.schedule) return out;
  const schedule::Schedule& sch = *o.schedule;
  if (sch.folded()) out.push_back("the schedule is folded: lower it with every rank (Fold::kNever)");
  if (sch.devices() != ranks)
    out.push_back(fmt::format("the schedule is for {} ranks, {} launched", sch.devices(), ranks));
  const int ep = ep_of(o, ranks);
  for (int r = 0; r < std::min(ranks, sch.devices()); ++r) {
    const schedule::RankSchedule* rs = rank_schedule(sch, r);
    if (rs == nullptr) {
      out.push_back(fmt::format("the schedule has no ops for rank {}", r));
      continue;
    }
    Program p = compile(*rs, o.model.transformer(), ep);
    for (const std::string& problem : p.problems) out.push_back(fmt::format("rank {}: {}", r, problem));
    const int64_t local = ranks > 0 ? o.batch / ranks : 0;
    if (p.problems.empty() && local % p.micro_batches != 0)
      out.push_back(fmt::format("{} sequences per rank do not split into the schedule's {} micro-batches", local,
                                p.micro_batches));
  }
  return out;
}

}  // namespace

std::vector<std::string> validate(const TrainOptions& o, int ranks) {
  std::vector<std::string> out;
  if (!o.model.has_transformer() || o.model.transformer().has_vision()) {
    out.push_back(fmt::format("model {}: the executor trains decoder-only transformers only", o.model.name()));
    return out;
  }
  const model::Transformer& t = o.model.transformer();
  if (t.encoder_layers() > 0) out.push_back("encoder-decoder models are not supported by the executor");
  if (t.attention() != model::MHA || (t.has_kv_heads() && t.kv_heads() != t.heads()))
    out.push_back("the executor's attention is multi-head (MHA): GQA and MLA models are not supported");
  if (t.has_head_dim() && t.head_dim() * t.heads() != t.hidden())
    out.push_back("head_dim x heads must equal hidden for the executor's attention");
  if (t.activation() != model::GELU) out.push_back("the executor's FFNs are GELU MLPs: use activation: GELU");
  if (t.has_moe()) {
    const model::Moe& m = t.moe();
    if (m.has_expert_activation() && m.expert_activation() != model::GELU)
      out.push_back("the executor's experts are GELU MLPs: use expert_activation: GELU");
    if (m.shared_experts() > 0) out.push_back("shared experts are not supported by the executor");
    if (m.has_patch_routing()) out.push_back("patch routing is not supported by the executor");
  }
  const int experts = experts_of(t);
  const int ep = ep_of(o, ranks);
  if (ranks % ep != 0 || experts % ep != 0)
    out.push_back(fmt::format("ep ({}) must divide the ranks ({}) and the experts ({})", ep, ranks, experts));
  if (o.batch <= 0 || o.batch % ranks != 0)
    out.push_back(fmt::format("batch ({} sequences) must be a positive multiple of the ranks ({})", o.batch, ranks));
  const int seq = o.sequence > 0 ? o.sequence : t.max_sequence();
  if (seq <= 1) out.push_back("sequence must be at least 2 tokens (give max_sequence in the model or --sequence)");
  if (o.steps < 1) out.push_back("steps must be at least 1");
  if (!(o.capacity_factor > 0)) out.push_back("capacity factor must be greater than zero");
  if (!(o.lr > 0)) out.push_back("learning rate must be greater than zero");
  if (out.empty())
    for (std::string& problem : validate_schedule(o, ranks)) out.push_back(std::move(problem));
  return out;
}

void synthetic_batch(uint64_t seed, int step, int vocab, int sequence, int64_t first, int64_t count,
                     std::vector<int32_t>& ids, std::vector<int32_t>& targets) {
  ids.resize(static_cast<size_t>(count * sequence));
  targets.resize(ids.size());
  for (int64_t s = 0; s < count; ++s) {
    Rng rng(derive_seed(seed, fmt::format("data.{}.{}", step, first + s)));
    int32_t tok = static_cast<int32_t>(rng.next_u64() % static_cast<uint64_t>(vocab));
    for (int i = 0; i < sequence; ++i) {
      const int32_t next = static_cast<int32_t>((3 * static_cast<int64_t>(tok) + 1) % vocab);
      ids[s * sequence + i] = tok;
      targets[s * sequence + i] = next;
      tok = next;
    }
  }
}

TrainResult train(const TrainOptions& o, Comm* world, Backend& backend) {
  const int ranks = world ? world->size() : 1;
  const int rank = world ? world->rank() : 0;
  if (std::vector<std::string> problems = validate(o, ranks); !problems.empty()) {
    std::string msg = "cannot train:";
    for (const std::string& p : problems) msg += "\n  " + p;
    throw Error(msg);
  }
  const model::Transformer& t = o.model.transformer();
  TrainResult r;
  r.ranks = ranks;
  r.dp = ranks;
  r.ep = ep_of(o, ranks);
  const schedule::RankSchedule own = o.schedule ? *rank_schedule(*o.schedule, rank) : default_schedule(t, rank, ranks, r.ep);
  const Program program = compile(own, t, r.ep);
  MOESIM_ASSERT(program.problems.empty(), "validate() checked the schedule: {}",
                program.problems.empty() ? "" : program.problems[0]);

  // EP groups: consecutive ranks; expert data-parallel groups: the same index in every EP group.
  if (world && ranks > 1 && world->buffer_device() != backend.device())
    throw Error(fmt::format("cannot train on {} over {}: the Comm's engine must take that device's buffers (MPI for "
                            "the CPU, NCCL for CUDA)",
                            backend.name(), world->name()));
  std::unique_ptr<Comm> ep_comm, edp_comm;
  if (world && ranks > 1) {
    ep_comm = world->split(rank / r.ep, rank);
    edp_comm = world->split(rank % r.ep, rank);
  }
  // Every rank's Recorder starts right after one barrier, so the ranks' clocks line up in the
  // merged trace (collectives are measured from the ranks' last arrival: traces/validation.h).
  if (world && ranks > 1) world->barrier();
  trace::Recorder rec(rank, device_label(backend));
  Model model(o, r.ep, backend, ep_comm.get(), rec);
  for (const Param& p : model.params().params())
    r.parameters += p.sharing == ParamSharing::kLocal ? p.value.numel() * r.ep : p.value.numel();
  std::unique_ptr<Optimizer> opt;
  if (o.optimizer == OptimizerKind::kSgd)
    opt = std::make_unique<Sgd>(model.params(), SgdOptions{.lr = o.lr, .momentum = 0.9f}, backend);
  else
    opt = std::make_unique<Adam>(model.params(), AdamOptions{.lr = o.lr}, backend);

  // Gradient syncs: sum a bucket's layers' gradients over the ranks sharing them (dense: all;
  // experts: the expert data-parallel group) in one all-reduce, as the Schedule's bucket is one
  // collective: packed into one buffer and unpacked after (tensor by tensor, moe-tiny's 24 dense
  // tensors paid 24 collectives' latency). Returns the bytes reduced.
  auto sync = [&](const schedule::Op& op, bool experts) {
    Comm* group = experts ? edp_comm.get() : world;
    if (!group || group->size() <= 1) return 0.0;
    std::vector<Tensor> grads;
    int64_t elements = 0;
    std::span<Param> params = model.params().params();
    for (size_t i = 0; i < params.size(); ++i) {
      const bool local = params[i].sharing == ParamSharing::kLocal;
      if (local != experts) continue;
      if (std::find(op.grad_layers().begin(), op.grad_layers().end(), model.layer_of_param(i)) == op.grad_layers().end())
        continue;
      grads.push_back(params[i].grad);
      elements += params[i].grad.numel();
    }
    if (grads.size() == 1) {
      group->all_reduce_sum(grads[0].device_f32(), elements);  // device buffers: NCCL on GPU ranks
    } else if (!grads.empty()) {
      Tensor bucket = Tensor::empty({elements}, DType::kF32, backend.device());
      auto each = [&](bool pack) {
        float* at = bucket.device_f32();
        for (Tensor& g : grads) {
          if (pack) backend.copy(g.device_f32(), at, g.bytes());
          else backend.copy(at, g.device_f32(), g.bytes());
          at += g.numel();
        }
      };
      each(true);
      group->all_reduce_sum(bucket.device_f32(), elements);
      each(false);
    }
    return static_cast<double>(elements) * sizeof(float);
  };

  const int64_t local = o.batch / ranks;
  const int64_t seqs = local / program.micro_batches;
  for (int step = 0; step < o.steps; ++step) {
    rec.set_step(step);
    const auto t0 = std::chrono::steady_clock::now();
    opt->zero_grad();
    model.begin_step(step, program.micro_batches, seqs, rank * local);
    for (const ExecOp& e : program.ops) {
      const schedule::Op& op = *e.op;
      if (e.action == Action::kEmbed && !e.backward) model.load_batch(e.micro_batch);
      trace::StreamId stream{op.stream().kind() == trace::STREAM_KIND_UNSPECIFIED ? trace::COMPUTE : op.stream().kind(),
                             op.stream().index()};
      DeviceSpan span(backend, rec, op.id(), op.kind(), stream);
      span.span().name(op.name());
      if (e.action == Action::kGradSync || e.action == Action::kExpertGradSync) {
        const double bytes = sync(op, e.action == Action::kExpertGradSync);
        Comm* group = e.action == Action::kExpertGradSync ? edp_comm.get() : world;
        if (group && group->size() > 1)
          span.span().collective(group->size(), trace::bus_factor(trace::ALL_REDUCE, group->size()), "ring");
        span.span().bytes(bytes);
      } else if (e.action == Action::kOptimizer) {
        // Summed gradients / dp: the gradient of the global mean loss.
        if (ranks > 1)
          for (Param& p : model.params().params())
            backend.scale(1.0f / static_cast<float>(ranks), p.grad.device_f32(), p.grad.numel());
        opt->step();
      } else {
        model.run(e);
        if ((e.action == Action::kMoeDispatch || e.action == Action::kMoeCombineA2a) && model.ep_size(e.block) > 1) {
          const int n = model.ep_size(e.block);
          span.span().bytes(model.a2a_bytes(e.block) * n);  // the group's total, as nccl-tests counts a2a
          span.span().collective(n, trace::bus_factor(trace::ALL_TO_ALL, n), "direct");
        }
        if (e.action == Action::kMoeGate || e.action == Action::kMoePermute) {
          const MoeLayer::HostTimes h = model.take_host_times(e.block);
          span.span().host_routing(h.routing_s, h.dispatch_s);
        }
        if (e.action == Action::kMoeRoute && model.ep_size(e.block) > 1) {
          const int n = model.ep_size(e.block);
          span.span().bytes(model.route_bytes(e.block));  // the gathered output, as nccl-tests counts all-gather
          span.span().collective(n, trace::bus_factor(trace::ALL_GATHER, n), "ring");
        }
      }
      span.end();
    }
    double loss = model.end_step();
    double global_loss = loss;
    if (world && ranks > 1) {
      float l = static_cast<float>(loss);
      all_reduce_sum_host(*world, &l, 1);
      global_loss = l / ranks;
    }
    backend.synchronize();
    r.steps.push_back({step, global_loss, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()});
  }
  // CPU ranks: the process's peak resident memory; GPU ranks: the most device memory held in tensors.
  rec.note_peak_memory(rank, device_label(backend),
                       backend.device() == Device::kCpu ? peak_rss_bytes()
                                                        : static_cast<double>(detail::cuda_peak_allocated_bytes()));
  trace::RunInfo info;
  info.set_source(trace::MEASURED);
  info.set_model(o.model.name());
  info.set_seed(o.seed);
  info.set_created(trace::utc_now_iso8601());
  r.trace = rec.snapshot(info);
  return r;
}

schedule::RankSchedule default_rank_schedule(const model::Model& model, int rank, int ranks, int ep) {
  return default_schedule(model.transformer(), rank, ranks, ep);
}

}  // namespace moesim::exec
