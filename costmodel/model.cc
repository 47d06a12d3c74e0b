#include "costmodel/model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string_view>

namespace moesim::cost {
namespace {

constexpr int kDefaultSequence = 2048;
constexpr double kWeightBytes = 2;  // 16-bit weights as the kernels read them

bool gated(model::Activation a) { return a == model::SWIGLU || a == model::GEGLU; }

// Accumulates one layer's parameters, FLOPs and kernels for `tokens` rows.
class LayerBuilder {
 public:
  LayerBuilder(Layer* layer, double tokens, double elem_bytes, bool bias)
      : l_(layer), tokens_(tokens), e_(elem_bytes), bias_(bias) {}

  // x[rows, d_in] W[d_in, d_out]: parameters, FLOPs and one GEMM kernel (fused projections such
  // as QKV are one wide matrix). `rows` defaults to the layer's tokens.
  void linear(const std::string& name, double d_in, double d_out, double rows = -1) {
    if (rows < 0) rows = tokens_;
    l_->dense_params += d_in * d_out + (bias_ ? d_out : 0);
    gemm(name, rows, d_in, d_out, 1);
  }
  void gemm(const std::string& name, double m, double k, double n, int64_t groups, OpKind kind = OpKind::kGemm) {
    Op op{name, kind, m, n, k, groups, 2 * m * n * k * groups,
          groups * ((m * k + m * n) * e_ + k * n * kWeightBytes), false, false};
    l_->flops_fwd += op.flops;
    l_->ops.push_back(std::move(op));
  }
  void norm(const std::string& name, double width, model::Norm kind, double rows = -1) {
    if (rows < 0) rows = tokens_;
    l_->dense_params += kind == model::RMS_NORM ? width : 2 * width;
    memory_op(name, OpKind::kNorm, 2 * rows * width * e_);
  }
  void memory_op(const std::string& name, OpKind kind, double bytes) {
    Op op;
    op.name = name;
    op.kind = kind;
    op.bytes = bytes;
    l_->ops.push_back(std::move(op));
  }
  // A row gather (cost::gather_op) and its backward's kernel.
  void gather(const std::string& name, double source, double written, GatherKernel kernel,
              GatherKernel backward_kernel) {
    l_->ops.push_back(gather_op(name, source, written, kernel, backward_kernel));
  }
  // An activation function over `elements` outputs: memory-bound on GPUs, but its arithmetic
  // (kActivationFlops per output) bounds it on CPUs, so it carries those FLOPs (not counted in
  // the model's FLOPs, which are the matrix multiplies').
  void activation(const std::string& name, double elements, double bytes) {
    memory_op(name, OpKind::kElementwise, bytes);
    l_->ops.back().flops = kActivationFlops * elements;
  }
  void attention(const std::string& name, double queries_per_seq, double keys, double heads, double qk_dim,
                 double v_dim) {
    const double seqs = tokens_ / queries_per_seq;
    Op op;
    op.name = name;
    op.kind = OpKind::kAttention;
    op.m = queries_per_seq;
    op.n = keys;
    op.k = qk_dim;
    op.groups = static_cast<int64_t>(std::max(1.0, std::round(heads * seqs)));
    op.flops = 2 * tokens_ * keys * heads * (qk_dim + v_dim);
    op.bytes = tokens_ * heads * (2 * qk_dim + 2 * v_dim) * e_;
    op.softmax_elements = tokens_ * keys * heads;
    l_->flops_fwd += op.flops;
    l_->ops.push_back(std::move(op));
  }

 private:
  Layer* l_;
  double tokens_;
  double e_;
  bool bias_;
};

// ---------------------------------------------------------------------------------------------
// Transformers.

struct TransformerDims {
  double h = 0, heads = 0, kv_heads = 0, head_dim = 0;
  double qk_dim = 0, v_dim = 0;  // per head
  int total_layers = 0;
};

TransformerDims dims_of(const model::Transformer& t) {
  TransformerDims d;
  d.h = t.hidden();
  d.heads = t.heads();
  d.kv_heads = t.has_kv_heads() ? t.kv_heads() : t.heads();
  d.head_dim = t.has_head_dim() ? t.head_dim() : d.h / d.heads;
  if (t.attention() == model::MLA) {
    d.qk_dim = t.mla().qk_nope_head_dim() + t.mla().qk_rope_head_dim();
    d.v_dim = t.mla().v_head_dim();
  } else {
    d.qk_dim = d.v_dim = d.head_dim;
  }
  d.total_layers = t.encoder_layers() + t.layers();
  return d;
}

// Self- or cross-attention sublayer. Returns activation bytes per token.
ActivationBytes attention_block(LayerBuilder& b, const model::Transformer& t, const TransformerDims& d,
                                const std::string& prefix, double seq, bool causal, bool cross, double e,
                                Layer* l, ActivationBytes* saving) {
  ActivationBytes act;
  b.norm(prefix + ".norm", d.h, t.norm());
  act.replicated += 2 * d.h * e;  // norm input and the projections' input (the norm's output)
  saving->replicated += d.h * e;
  const double keys = causal ? (seq + 1) / 2 : seq;
  if (t.attention() == model::MLA && !cross) {
    const model::Mla& mla = t.mla();
    if (mla.q_lora_rank() > 0) {
      b.linear(prefix + ".q_down", d.h, mla.q_lora_rank());
      b.norm(prefix + ".q_norm", mla.q_lora_rank(), t.norm());
      b.linear(prefix + ".q_up", mla.q_lora_rank(), d.heads * d.qk_dim);
      act.replicated += 2 * mla.q_lora_rank() * e;
      saving->replicated += mla.q_lora_rank() * e;
    } else {
      b.linear(prefix + ".q", d.h, d.heads * d.qk_dim);
    }
    b.linear(prefix + ".kv_down", d.h, mla.kv_lora_rank() + mla.qk_rope_head_dim());
    b.norm(prefix + ".kv_norm", mla.kv_lora_rank(), t.norm());
    b.linear(prefix + ".kv_up", mla.kv_lora_rank(), d.heads * (mla.qk_nope_head_dim() + d.v_dim));
    act.replicated += (2 * mla.kv_lora_rank() + mla.qk_rope_head_dim()) * e;
    act.sharded += d.heads * (2 * d.qk_dim + d.v_dim) * e;  // q, k, v: recomputed from the latents
    saving->replicated += mla.kv_lora_rank() * e;
    saving->sharded += d.heads * (2 * d.qk_dim + d.v_dim) * e;
    l->kv_cache_bytes = (mla.kv_lora_rank() + mla.qk_rope_head_dim()) * e;
  } else {
    const double q_out = d.heads * d.qk_dim;
    const double kv_out = d.kv_heads * (d.qk_dim + d.v_dim);
    b.linear(prefix + (cross ? ".q" : ".qkv"), d.h, cross ? q_out : q_out + kv_out);
    if (cross) b.linear(prefix + ".kv", d.h, kv_out);  // over the encoder's output
    act.sharded += (q_out + kv_out) * e;
    if (!cross) l->kv_cache_bytes = kv_out * e;
  }
  b.attention(prefix + ".core", seq, keys, d.heads, d.qk_dim, d.v_dim);
  b.linear(prefix + ".out", d.heads * d.v_dim, d.h);
  act.sharded += d.heads * d.v_dim * e;  // attention output: the out projection's input
  saving->sharded += d.heads * d.v_dim * e;
  return act;
}

// Dense FFN or MoE sublayer.
ActivationBytes ffn_block(LayerBuilder& b, const model::Transformer& t, const TransformerDims& d,
                          const std::string& prefix, bool moe, double tokens, double sequence, double e, Layer* l,
                          ActivationBytes* selective_saving) {
  ActivationBytes act;
  b.norm(prefix + ".norm", d.h, t.norm());
  act.replicated += 2 * d.h * e;
  selective_saving->replicated += d.h * e;
  if (!moe) {
    const double f = t.ffn_hidden();
    const double up = gated(t.activation()) ? 2 * f : f;
    b.linear(prefix + ".up", d.h, up);
    b.activation(prefix + ".act", tokens * f, tokens * (up + f) * e);
    b.linear(prefix + ".down", f, d.h);
    act.sharded += (up + f) * e;
    selective_saving->sharded += f * e;
    return act;
  }
  const model::Moe& m = t.moe();
  const double E = m.experts();
  const double fe = m.has_expert_ffn_hidden() ? m.expert_ffn_hidden() : t.ffn_hidden();
  const model::Activation ea = m.has_expert_activation() ? m.expert_activation() : t.activation();
  const double up = gated(ea) ? 2 * fe : fe;
  const double each = d.h * up + fe * d.h + (t.bias() ? up + d.h : 0);

  // Routed copies per token: top_k, or for pMoE patch routing experts*l/n of an image's n patches.
  double k = m.top_k();
  if (m.has_patch_routing()) k = E * m.patch_routing().patches_per_expert() / sequence;

  b.linear(prefix + ".router", d.h, E);
  if (!t.bias() && m.router_bias()) l->dense_params += E;
  b.memory_op(prefix + ".topk", OpKind::kElementwise, tokens * E * 4);
  l->ops.back().routing_choices = tokens * k;
  // The router's softmax over the experts (max, subtract, exp, sum, divide per logit), counted as
  // a loss's per logit: an exponential per token and expert, 7 ns an element on a CPU, hidden
  // under the memory time on GPUs. Its gradient is the top-k backward's host term.
  l->ops.back().flops = kLossFlopsPerLogit * tokens * E;
  act.replicated += E * 4;  // router probabilities, fp32

  const double shared = m.shared_experts();
  if (shared > 0) {
    b.linear(prefix + ".shared.up", d.h, shared * up);
    b.activation(prefix + ".shared.act", tokens * shared * fe, tokens * shared * (up + fe) * e);
    b.linear(prefix + ".shared.down", shared * fe, d.h);
    act.sharded += shared * (up + fe) * e;
    selective_saving->sharded += shared * fe * e;
  }
  const double rows = tokens * k / E;  // tokens per expert, balanced
  b.gather(prefix + ".dispatch", tokens * d.h * e, tokens * k * d.h * e,  // each token's row to its k slots
           GatherKernel::kCopy, GatherKernel::kSumBackward);
  // The capacity decision and the send layout, host work over every assignment of the EP group
  // (the lowering scales these to the group).
  l->ops.back().dispatch_choices = tokens * k;
  l->ops.back().dispatch_tokens = tokens;  // sorted under batch priority (on_ep_rank)
  b.gemm(prefix + ".experts.up", rows, d.h, up, static_cast<int64_t>(E), OpKind::kGroupedGemm);
  b.activation(prefix + ".experts.act", tokens * k * fe, tokens * k * (up + fe) * e);
  b.gemm(prefix + ".experts.down", rows, fe, d.h, static_cast<int64_t>(E), OpKind::kGroupedGemm);
  b.gather(prefix + ".combine", tokens * k * d.h * e, tokens * d.h * e,  // k rows summed into each token's
           GatherKernel::kSum, GatherKernel::kCombineBackward);
  // Expert inputs, up outputs, activation outputs and expert outputs (combine needs them for the
  // gate-probability gradient), k copies per token.
  act.expert += k * (2 * d.h + up + fe) * e;
  selective_saving->expert += k * (fe + d.h) * e;  // activation outputs; outputs by re-running down

  l->moe = true;
  l->experts = m.experts();
  l->top_k = static_cast<int>(std::ceil(k - 1e-9));
  l->routed_per_token = k;
  l->expert_params_each = each;
  l->expert_params = E * each;
  l->expert_flops_per_token = 2 * (d.h * up + fe * d.h);
  // The grouped GEMMs' FLOPs were added to flops_fwd by gemm(); the parameters go to experts.
  return act;
}

void add(ActivationBytes& a, const ActivationBytes& b) {
  a.sharded += b.sharded;
  a.replicated += b.replicated;
  a.expert += b.expert;
}

void analyze_transformer(const model::Transformer& t, const ModelOptions& o, ModelCost* c) {
  const TransformerDims d = dims_of(t);
  const bool vision = t.has_vision();
  const double e = o.act_elem_bytes;
  const double seq = c->sequence;
  const double tokens = c->tokens;
  c->hidden = t.hidden();

  if (vision) {
    const model::VisionInput& v = t.vision();
    const double hgt = v.has_image_size() ? v.image_size() : v.image_height();
    const double wid = v.has_image_size() ? v.image_size() : v.image_width();
    const double patches = (hgt / v.patch_size()) * (wid / v.patch_size());
    const double images = tokens / seq;
    Layer l;
    l.name = "patch_embed";
    l.kind = LayerKind::kPatchEmbed;
    LayerBuilder b(&l, tokens, e, /*bias=*/true);
    b.linear("patch_embed.proj", double(v.patch_size()) * v.patch_size() * v.channels(), d.h, images * patches);
    const double extra = (v.class_token() ? d.h : 0) + seq * d.h;  // class token, learned positions
    l.dense_params += extra;
    l.embedding_params = extra;
    c->layers.push_back(std::move(l));
  } else {
    Layer l;
    l.name = "embed";
    l.kind = LayerKind::kEmbedding;
    LayerBuilder b(&l, tokens, e, false);
    l.dense_params = double(t.vocab()) * d.h + (t.learned_positions() ? double(t.max_sequence()) * d.h : 0);
    l.embedding_params = l.dense_params;
    b.gather("embed.lookup", std::min(tokens, double(t.vocab())) * d.h * e, tokens * d.h * e, GatherKernel::kLookup,
             GatherKernel::kScatterAdd);
    if (t.learned_positions()) {  // a second lookup, added to the first
      b.gather("embed.positions", seq * d.h * e, tokens * d.h * e, GatherKernel::kLookup, GatherKernel::kScatterAdd);
      b.memory_op("embed.add", OpKind::kElementwise, tokens * d.h * e * 3);
      l.ops.back().fused_backward = true;  // its gradient passes through to both lookups
    }
    c->layers.push_back(std::move(l));
  }

  for (int i = 0; i < d.total_layers; ++i) {
    const bool encoder = i < t.encoder_layers();
    const bool decoder_of_encdec = !encoder && t.encoder_layers() > 0;
    const bool causal = !vision && !encoder;
    const bool moe = is_moe_layer(t, i);
    Layer l;
    l.name = fmt::format("L{}", i);
    l.kind = LayerKind::kTransformer;
    l.encoder = encoder;
    LayerBuilder b(&l, tokens, e, t.bias());
    ActivationBytes saving;
    // Each sublayer's residual add (two reads, one write) with its sublayer, as the executor runs
    // it: the attention's in the attention op, the MLP's or MoE's in the MLP or the combine.
    ActivationBytes act = attention_block(b, t, d, l.name + ".attn", seq, causal, false, e, &l, &saving);
    b.memory_op(l.name + ".attn.residual", OpKind::kElementwise, tokens * d.h * e * 3);
    if (decoder_of_encdec) {
      add(act, attention_block(b, t, d, l.name + ".cross", seq, false, true, e, &l, &saving));
      b.memory_op(l.name + ".cross.residual", OpKind::kElementwise, tokens * d.h * e * 3);
    }
    add(act, ffn_block(b, t, d, l.name + (moe ? ".moe" : ".mlp"), moe, tokens, seq, e, &l, &saving));
    b.memory_op(l.name + ".residual", OpKind::kElementwise, tokens * d.h * e * 3);
    l.act_none = act;
    l.act_selective = {act.sharded - saving.sharded, act.replicated - saving.replicated, act.expert - saving.expert};
    l.act_full = d.h * e;
    c->layers.push_back(std::move(l));
  }

  Layer l;
  l.name = "head";
  l.kind = LayerKind::kHead;
  LayerBuilder b(&l, tokens, e, false);
  b.norm("head.norm", d.h, t.norm());
  if (vision) {
    const int classes = t.vision().classes();
    const double images = tokens / seq;
    if (classes > 0) {
      LayerBuilder hb(&l, tokens, e, /*bias=*/true);
      hb.linear("head.classifier", d.h, classes, images);
    }
    l.act_none.replicated = 2 * d.h * e;
  } else {
    b.gemm("head.logits", tokens, d.h, t.vocab(), 1);
    // Softmax cross-entropy over the vocabulary and its gradient in one kernel, as fused loss
    // kernels compute them (sampling when serving): the forward's and the gradient's work.
    b.activation("head.loss", 2 * tokens * t.vocab(), 4 * tokens * t.vocab() * e);
    l.ops.back().fused_backward = true;
    if (!t.tied_embeddings()) l.dense_params += double(t.vocab()) * d.h;
    l.act_none.replicated = 2 * d.h * e;
    l.act_none.sharded = double(t.vocab()) * e;  // logits for the loss
  }
  l.act_selective = l.act_none;
  l.act_full = l.act_none.total();
  c->layers.push_back(std::move(l));
}

// ---------------------------------------------------------------------------------------------
// CNNs: a convolution is its GEMM equivalent, m = out_h*out_w per image, k = c_in*kh*kw, n = c_out.

struct Spatial {
  int h = 0, w = 0;
};

int conv_out(int in, int kernel, int stride) { return (in + 2 * (kernel / 2) - kernel) / stride + 1; }

class CnnBuilder {
 public:
  CnnBuilder(ModelCost* c, double images, double e, const std::string& network, double share)
      : c_(c), images_(images), e_(e), network_(network), share_(share) {}

  Layer& begin(const std::string& name, LayerKind kind) {
    Layer l;
    l.name = network_.empty() ? name : network_ + "." + name;
    l.kind = kind;
    l.network = network_;
    l.sample_share = share_;
    c_->layers.push_back(std::move(l));
    return c_->layers.back();
  }
  // conv + batch norm (+ ReLU): returns the output size. Keeps the conv input and the BN input.
  Spatial conv_bn(Layer& l, const std::string& name, Spatial in, int c_in, int c_out, int kernel, int stride) {
    const Spatial out{conv_out(in.h, kernel, stride), conv_out(in.w, kernel, stride)};
    const double m = double(out.h) * out.w;
    LayerBuilder b(&l, images_, e_, false);
    l.dense_params += double(kernel) * kernel * c_in * c_out + 2.0 * c_out;  // weights, BN scale and shift
    b.gemm(l.name + "." + name, images_ * m, double(kernel) * kernel * c_in, c_out, 1);
    b.memory_op(l.name + "." + name + ".bn", OpKind::kNorm, images_ * m * c_out * e_ * 2);
    l.act_none.sharded += (double(in.h) * in.w * c_in + m * c_out) * e_;
    return out;
  }
  void linear(Layer& l, const std::string& name, double d_in, double d_out) {
    LayerBuilder b(&l, images_, e_, true);
    b.linear(l.name + "." + name, d_in, d_out, images_);
    l.act_none.sharded += d_in * e_;
  }

 private:
  ModelCost* c_;
  double images_;
  double e_;
  std::string network_;
  double share_;
};

// Adds the backbone's layers; returns the pooled feature width.
int add_resnet(const model::ResNet& r, CnnBuilder& cb, bool classifier, double o_elem) {
  Spatial s{r.input_height(), r.input_width()};
  Layer& stem = cb.begin("stem", LayerKind::kConv);
  s = cb.conv_bn(stem, "conv", s, r.channels(), r.stem_width(), 7, 2);
  s = {conv_out(s.h, 3, 2), conv_out(s.w, 3, 2)};  // max pool 3x3/2
  int in = r.stem_width();
  const int expansion = r.bottleneck() ? 4 : 1;
  for (int st = 0; st < r.stage_size(); ++st) {
    const model::ResNetStage& stage = r.stage(st);
    int stride = stage.has_stride() ? stage.stride() : (st == 0 ? 1 : 2);
    if (st == r.stage_size() - 1 && r.has_last_stride()) stride = r.last_stride();
    const int w = stage.width();
    for (int bl = 0; bl < stage.blocks(); ++bl) {
      Layer& l = cb.begin(fmt::format("stage{}.block{}", st + 1, bl), LayerKind::kResBlock);
      const int str = bl == 0 ? stride : 1;
      const Spatial block_in = s;
      const int in_before = in;
      Spatial t;
      if (r.bottleneck()) {
        t = cb.conv_bn(l, "conv1", s, in, w, 1, 1);
        t = cb.conv_bn(l, "conv2", t, w, w, 3, str);
        t = cb.conv_bn(l, "conv3", t, w, w * expansion, 1, 1);
      } else {
        t = cb.conv_bn(l, "conv1", s, in, w, 3, str);
        t = cb.conv_bn(l, "conv2", t, w, w, 3, 1);
      }
      if (str != 1 || in != w * expansion) cb.conv_bn(l, "downsample", block_in, in, w * expansion, 1, str);
      s = t;
      in = w * expansion;
      l.act_full = double(block_in.h) * block_in.w * in_before * o_elem;
    }
  }
  if (classifier && r.classes() > 0) {
    Layer& fc = cb.begin("fc", LayerKind::kClassifier);
    cb.linear(fc, "fc", in, r.classes());
  }
  return in;
}

void analyze_cnn(const model::Model& m, const ModelOptions& o, ModelCost* c) {
  const double images = c->tokens;
  if (m.has_resnet()) {
    CnnBuilder cb(c, images, o.act_elem_bytes, "", 1);
    add_resnet(m.resnet(), cb, true, o.act_elem_bytes);
    return;
  }
  const model::ReidRecipe& r = m.reid();
  const double batch = double(r.virtual_images()) + r.real_images();
  const double real_share = r.real_images() / batch;
  CnnBuilder main(c, images, o.act_elem_bytes, "main", 1);
  const int feat = add_resnet(r.backbone(), main, false, o.act_elem_bytes);
  Layer& id = main.begin("id_classifier", LayerKind::kClassifier);
  main.linear(id, "fc", feat, double(r.virtual_identities()) + r.real_identities());
  {
    CnnBuilder real(c, images, o.act_elem_bytes, "main", real_share);
    Layer& rc = real.begin("real_classifier", LayerKind::kClassifier);
    real.linear(rc, "fc", feat, r.real_identities());
  }
  // The discriminator runs twice per sample: its own update (L_cam) and the adversarial pass (L_cfs).
  CnnBuilder disc(c, images, o.act_elem_bytes, "discriminator", 2);
  Layer& dl = disc.begin("mlp", LayerKind::kDiscriminator);
  double width = feat;
  for (int i = 0; i < r.discriminator_hidden_size(); ++i) {
    disc.linear(dl, fmt::format("fc{}", i), width, r.discriminator_hidden(i));
    width = r.discriminator_hidden(i);
  }
  disc.linear(dl, "out", width, r.real_cameras() + 1.0);
  if (r.auxiliary_network()) {
    CnnBuilder aux(c, images, o.act_elem_bytes, "aux", real_share);
    add_resnet(r.backbone(), aux, false, o.act_elem_bytes);
    Layer& ac = aux.begin("classifier", LayerKind::kClassifier);
    aux.linear(ac, "fc", feat, r.real_identities());
  }
}

}  // namespace

bool is_moe_layer(const model::Transformer& t, int i) {
  if (!t.has_moe() || t.moe().every_n_layers() < 1) return false;
  const model::Moe& m = t.moe();
  return i >= m.first_k_dense() && (i - m.first_k_dense()) % m.every_n_layers() == m.moe_layer_offset();
}

const char* layer_kind_name(LayerKind k) {
  switch (k) {
    case LayerKind::kEmbedding: return "embedding";
    case LayerKind::kPatchEmbed: return "patch_embed";
    case LayerKind::kTransformer: return "transformer";
    case LayerKind::kHead: return "head";
    case LayerKind::kConv: return "conv";
    case LayerKind::kResBlock: return "res_block";
    case LayerKind::kClassifier: return "classifier";
    case LayerKind::kDiscriminator: return "discriminator";
  }
  return "?";
}

int default_sequence(const model::Model& m) {
  if (!m.has_transformer()) return 1;
  const model::Transformer& t = m.transformer();
  if (t.has_vision()) {
    const model::VisionInput& v = t.vision();
    const int h = v.has_image_size() ? v.image_size() : v.image_height();
    const int w = v.has_image_size() ? v.image_size() : v.image_width();
    return (h / v.patch_size()) * (w / v.patch_size()) + (v.class_token() ? 1 : 0);
  }
  return t.has_max_sequence() ? t.max_sequence() : kDefaultSequence;
}

ModelCost analyze(const model::Model& m, const ModelOptions& o) {
  ModelCost c;
  c.name = m.name();
  const bool vision = m.has_transformer() && m.transformer().has_vision();
  c.per_token = m.has_transformer() && !vision;
  c.sequence = vision || !m.has_transformer() || o.sequence <= 0 ? default_sequence(m) : o.sequence;
  c.tokens = o.tokens > 0 ? o.tokens : c.sequence;
  if (m.has_transformer()) {
    analyze_transformer(m.transformer(), o, &c);
  } else {
    analyze_cnn(m, o, &c);
  }

  // Per-token (per-sample) figures from the kernels built for c.tokens rows.
  const double units = c.per_token ? c.tokens : c.tokens / c.sequence;
  for (Layer& l : c.layers) {
    l.flops_fwd /= units;
    l.flops_bwd = 2 * l.flops_fwd;
    l.active_params = l.dense_params + l.routed_per_token * l.expert_params_each;
    if (l.kind != LayerKind::kTransformer) {
      if (l.act_selective.total() == 0) l.act_selective = l.act_none;
      if (l.act_full == 0) l.act_full = l.act_none.total();
    }
    c.total_params += l.params();
    c.active_params += l.active_params;
    c.embedding_params += l.embedding_params;
    c.expert_params += l.expert_params;
    c.flops_fwd += l.flops_fwd * l.sample_share;
    c.flops_bwd += l.flops_bwd * l.sample_share;
    c.moe_layers += l.moe ? 1 : 0;
  }
  return c;
}

bool recomputed_selectively(const Op& op) {
  const std::string& n = op.name;
  auto ends = [&](std::string_view suffix) { return n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0; };
  return op.kind == OpKind::kNorm || ends(".core") || ends(".act") || ends("experts.down");
}

}  // namespace moesim::cost
