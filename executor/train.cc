#include "executor/train.h"

#include "costmodel/model.h"
#include "executor/cuda_memory.h"
#include "executor/error.h"
#include "executor/layers.h"
#include "executor/optimizer.h"
#include "traces/recorder.h"

#include <fmt/format.h>
#include <sys/resource.h>

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

int default_ep(int ranks, int experts) {
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

    tok_->register_params(params_);
    pos_->register_params(params_);
    for (Block& blk : blocks_) {
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
    }
    lnf_->register_params(params_);
    head_->register_params(params_);
  }

  int sequence() const { return o_.sequence > 0 ? o_.sequence : t_.max_sequence(); }
  ParamRegistry& params() { return params_; }
  const std::vector<Block>& blocks() const { return blocks_; }

  // Forward and backward of one local batch; returns the local mean loss. Gradients accumulate.
  double step(int step, const std::vector<int32_t>& ids, const std::vector<int32_t>& targets, int64_t seqs) {
    const int64_t s = sequence(), d = t_.hidden(), tokens = seqs * s;
    std::vector<int32_t> positions(tokens);
    for (int64_t i = 0; i < tokens; ++i) positions[i] = static_cast<int32_t>(i % s);

    Tensor x;
    {
      DeviceSpan span(backend_, rec_, "embed fwd", trace::OTHER);
      x = residual_add(backend_, tok_->forward(ids), pos_->forward(positions));
    }
    for (Block& blk : blocks_) {
      {
        DeviceSpan span(backend_, rec_, blk.name + ".attn fwd", trace::ATTENTION);
        Tensor a = blk.attn->forward(blk.ln1->forward(x).reshaped({seqs, s, d}));
        x = residual_add(backend_, x, a.reshaped({tokens, d}));
      }
      Tensor h = blk.ln2->forward(x);
      Tensor f = blk.moe ? moe_forward(blk, h, step) : mlp_forward(blk, h);
      x = residual_add(backend_, x, f);
    }
    Tensor logits;
    LossAndGrad loss;
    {
      DeviceSpan span(backend_, rec_, "head fwd", trace::GEMM);
      logits = head_->forward(lnf_->forward(x));
      loss = cross_entropy(backend_, logits, targets);
    }

    Tensor dx;
    {
      DeviceSpan span(backend_, rec_, "head bwd", trace::GEMM);
      dx = lnf_->backward(head_->backward(loss.dlogits));
    }
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      Block& blk = *it;
      Tensor dh = blk.moe ? moe_backward(blk, dx) : mlp_backward(blk, dx);
      accumulate(backend_, dx, blk.ln2->backward(dh));
      DeviceSpan span(backend_, rec_, blk.name + ".attn bwd", trace::ATTENTION);
      Tensor da = blk.attn->backward(dx.reshaped({seqs, s, d}));
      accumulate(backend_, dx, blk.ln1->backward(da.reshaped({tokens, d})));
    }
    {
      DeviceSpan span(backend_, rec_, "embed bwd", trace::OTHER);
      tok_->backward(dx);
      pos_->backward(dx);
    }
    return loss.loss;
  }

 private:
  Tensor mlp_forward(Block& blk, const Tensor& h) {
    DeviceSpan span(backend_, rec_, blk.name + ".mlp fwd", trace::GEMM);
    return blk.mlp->forward(h);
  }
  Tensor mlp_backward(Block& blk, const Tensor& dy) {
    DeviceSpan span(backend_, rec_, blk.name + ".mlp bwd", trace::GEMM);
    return blk.mlp->backward(dy);
  }
  Tensor moe_forward(Block& blk, const Tensor& h, int step) {
    backend_.synchronize();
    const int64_t start = rec_.now_ns();
    MoeForwardOptions options;
    options.step = static_cast<uint64_t>(step);
    Tensor y = blk.moe->forward(h, options);
    record_parts(*blk.moe, blk.name, "fwd", start, blk.moe->forward_times());
    const MoeRoutingStats& st = blk.moe->routing_stats();
    trace::ExpertLoad load;
    load.set_layer(static_cast<int>(&blk - blocks_.data()));
    load.set_rank(rec_.rank());
    load.set_step(step);
    for (int64_t c : st.assigned_per_expert) load.add_tokens_per_expert(c);
    rec_.add_expert_load(std::move(load));
    return y;
  }
  Tensor moe_backward(Block& blk, const Tensor& dy) {
    backend_.synchronize();
    const int64_t start = rec_.now_ns();
    Tensor dx = blk.moe->backward(dy);
    record_parts(*blk.moe, blk.name, "bwd", start, blk.moe->backward_times());
    return dx;
  }
  // Bytes this rank sends to other EP ranks in the dispatch (and the combine sends back): its
  // kept assignments to experts held elsewhere, d fp32 values each.
  double a2a_bytes(const MoeLayer& m) const {
    const std::span<const int32_t> experts = m.chosen_experts();
    const std::span<const uint8_t> kept = m.kept();
    const int first = m.first_local_expert(), last = first + m.local_experts();
    int64_t rows = 0;
    for (size_t i = 0; i < experts.size(); ++i) rows += kept[i] && (experts[i] < first || experts[i] >= last);
    return static_cast<double>(rows) * static_cast<double>(t_.hidden()) * sizeof(float);
  }

  // The layer's parts, one after the other from `start`, with their measured durations; the
  // dispatch and combine carry the bytes this rank sends and algBw/busBw over the EP group.
  void record_parts(const MoeLayer& m, const std::string& layer, const char* pass, int64_t start,
                    const MoePartTimes& t) {
    const std::pair<const char*, double> parts[] = {
        {"gate", t.gate_s}, {"dispatch", t.dispatch_s}, {"experts", t.experts_s}, {"combine", t.combine_s}};
    const trace::OpKind kinds[] = {trace::GATE, trace::DISPATCH, trace::GROUPED_GEMM, trace::COMBINE};
    int64_t at = start;
    for (int i = 0; i < 4; ++i) {
      trace::Span span;
      span.set_op_id(fmt::format("{}.moe.{} {}", layer, parts[i].first, pass));
      span.set_name(parts[i].first);
      span.set_kind(kinds[i]);
      span.set_rank(rec_.rank());
      span.set_device(rec_.device());
      span.mutable_stream()->set_kind(i == 1 || i == 3 ? trace::COMM : trace::COMPUTE);
      span.set_start_ns(at);
      at += static_cast<int64_t>(parts[i].second * 1e9);
      span.set_end_ns(at);
      span.set_step(rec_.step());
      if ((i == 1 || i == 3) && m.ep_size() > 1) {
        const double bytes = a2a_bytes(m) * m.ep_size();  // the group's total, as nccl-tests counts a2a
        const double seconds = parts[i].second;
        span.set_bytes(bytes);
        trace::CollectiveStats* c = span.mutable_collective();
        c->set_ranks(m.ep_size());
        c->set_bus_factor(trace::bus_factor(trace::ALL_TO_ALL, m.ep_size()));
        c->set_alg_bw_bps(seconds > 0 ? bytes / seconds : 0);
        c->set_bus_bw_bps(c->alg_bw_bps() * c->bus_factor());
        c->set_algorithm("direct");
      }
      rec_.add(std::move(span));
    }
  }

  const TrainOptions& o_;
  const model::Transformer& t_;
  Backend& backend_;
  trace::Recorder& rec_;
  std::unique_ptr<Embedding> tok_, pos_;
  std::vector<Block> blocks_;
  std::unique_ptr<LayerNorm> lnf_;
  std::unique_ptr<Linear> head_;
  ParamRegistry params_;
};

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
  const int experts = t.has_moe() ? t.moe().experts() : 1;
  const int ep = o.ep > 0 ? o.ep : default_ep(ranks, experts);
  if (ranks % ep != 0 || experts % ep != 0)
    out.push_back(fmt::format("ep ({}) must divide the ranks ({}) and the experts ({})", ep, ranks, experts));
  if (o.batch <= 0 || o.batch % ranks != 0)
    out.push_back(fmt::format("batch ({} sequences) must be a positive multiple of the ranks ({})", o.batch, ranks));
  const int seq = o.sequence > 0 ? o.sequence : t.max_sequence();
  if (seq <= 1) out.push_back("sequence must be at least 2 tokens (give max_sequence in the model or --sequence)");
  if (o.steps < 1) out.push_back("steps must be at least 1");
  if (!(o.capacity_factor > 0)) out.push_back("capacity factor must be greater than zero");
  if (!(o.lr > 0)) out.push_back("learning rate must be greater than zero");
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
  const int experts = t.has_moe() ? t.moe().experts() : 1;
  TrainResult r;
  r.ranks = ranks;
  r.dp = ranks;
  r.ep = o.ep > 0 ? o.ep : default_ep(ranks, experts);

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
  trace::Recorder rec(rank, device_label(backend));
  Model model(o, r.ep, backend, ep_comm.get(), rec);
  for (const Param& p : model.params().params())
    r.parameters += p.sharing == ParamSharing::kLocal ? p.value.numel() * r.ep : p.value.numel();
  std::unique_ptr<Optimizer> opt;
  if (o.optimizer == OptimizerKind::kSgd)
    opt = std::make_unique<Sgd>(model.params(), SgdOptions{.lr = o.lr, .momentum = 0.9f}, backend);
  else
    opt = std::make_unique<Adam>(model.params(), AdamOptions{.lr = o.lr}, backend);

  const int64_t local = o.batch / ranks;
  std::vector<int32_t> ids, targets;
  for (int step = 0; step < o.steps; ++step) {
    rec.set_step(step);
    const auto t0 = std::chrono::steady_clock::now();
    synthetic_batch(o.seed, step, t.vocab(), model.sequence(), rank * local, local, ids, targets);
    opt->zero_grad();
    double loss = model.step(step, ids, targets, local);
    {
      DeviceSpan span(backend, rec, "grad_all_reduce", trace::ALL_REDUCE, trace::StreamId::comm());
      double bytes = 0;
      for (const Param& p : model.params().params()) {
        Comm* group = p.sharing == ParamSharing::kLocal ? edp_comm.get() : world;
        Tensor g = p.grad;
        if (group && group->size() > 1) {
          group->all_reduce_sum(g.device_f32(), g.numel());  // device buffers: NCCL on GPU ranks
          bytes += static_cast<double>(g.bytes());
        }
        if (ranks > 1) backend.scale(1.0f / static_cast<float>(ranks), g.device_f32(), g.numel());
      }
      if (world && ranks > 1) span.span().collective(ranks, trace::bus_factor(trace::ALL_REDUCE, ranks));
      span.span().bytes(bytes);
      span.end();
    }
    {
      DeviceSpan span(backend, rec, "optimizer", trace::OPTIMIZER);
      opt->step();
    }
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

}  // namespace moesim::exec
