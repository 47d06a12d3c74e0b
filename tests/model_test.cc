// The model zoo against published parameter and FLOP counts, and the per-layer arithmetic
// against closed forms.
#include "costmodel/compute.h"
#include "costmodel/model.h"
#include "costmodel/setup.h"

#include <catch2/catch.hpp>

#include <string>

namespace moesim::cost {
namespace {

ModelCost zoo(const std::string& name, ModelOptions o = {}) {
  return analyze(load_model(std::string(MOESIM_SOURCE_DIR) + "/configs/models/" + name + ".textproto"), o);
}

// A published figure given as `published` rounded to `unit`: the true value lies within half a
// unit, or within 1% when that is wider (the issue's acceptance rule).
void check_published(double value, double published, double unit) {
  const double tol = std::max(0.5 * unit, 0.01 * published);
  INFO("value " << value << " vs published " << published << " +- " << tol);
  CHECK(std::abs(value - published) <= tol);
}

TEST_CASE("Mixtral 8x7B: 46.7B total, 12.9B active") {
  // Mistral AI, "Mixtral of Experts" (arXiv:2401.04088): 46.7B total, 12.9B active parameters.
  const ModelCost c = zoo("mixtral-8x7b");
  check_published(c.total_params, 46.7e9, 0.1e9);
  check_published(c.active_params, 12.9e9, 0.1e9);
  CHECK(c.moe_layers == 32);
  // Exactly: 2 embeddings + 32 x (attention + 8 SwiGLU experts + router + 2 RMSNorms) + final norm.
  const double attn = 4096.0 * (4096 + 2 * 1024) + 4096.0 * 4096;
  const double expert = 3.0 * 4096 * 14336;
  const double layer = attn + 8 * expert + 4096.0 * 8 + 2 * 4096;
  CHECK(c.total_params == Approx(2 * 32000.0 * 4096 + 32 * layer + 4096).epsilon(1e-12));
}

TEST_CASE("DeepSeek-V3: 671B total, 37B activated") {
  // DeepSeek-V3 Technical Report (arXiv:2412.19437): 671B total, 37B activated per token, main
  // model without the MTP module. Its total counts both embedding tables (input and output,
  // 0.93B each: 670.1B without the input one would round to 670B). Its "37B" matches the count
  // without the input embedding table, a lookup rather than a matrix product: 36.6B; with it the
  // count is 37.55B, so DeepSeek's two figures count the input table differently.
  const ModelCost c = zoo("deepseek-v3");
  check_published(c.total_params, 671e9, 1e9);
  check_published(c.active_params - c.embedding_params, 37e9, 1e9);
  CHECK(c.embedding_params == 129280.0 * 7168);
  CHECK(c.moe_layers == 58);
  // The first MoE layer is layer 3; layers 0-2 are dense.
  CHECK_FALSE(c.layers[1 + 2].moe);
  CHECK(c.layers[1 + 3].moe);
  CHECK(c.layers[1 + 3].experts == 256);
  CHECK(c.layers[1 + 3].expert_params_each == 3.0 * 7168 * 2048);
}

TEST_CASE("GLaM 64B/64E: 1.2T total, 96.6B activated") {
  // Du et al., GLaM (ICML 2022), Table 4.
  const ModelCost c = zoo("glam-1.2t");
  check_published(c.total_params, 1.2e12, 0.1e12);
  check_published(c.active_params, 96.6e9, 0.1e9);
  CHECK(c.moe_layers == 32);
}

TEST_CASE("ResNet-50: 25.56M parameters, 4.09 GMACs at 224x224") {
  // torchvision's ResNet50_Weights.IMAGENET1K_V1 card: 25,557,032 parameters, 4.09 GFLOPS
  // counted as multiply-accumulates.
  const ModelCost c = zoo("resnet50");
  CHECK(c.total_params == 25557032);
  CHECK_FALSE(c.per_token);
  check_published(c.flops_fwd / 2, 4.09e9, 0.01e9);
  CHECK(c.flops_bwd == 2 * c.flops_fwd);
}

TEST_CASE("ViT-B/16: about 86M parameters") {
  // Dosovitskiy et al. 2021, Table 1: ViT-Base 86M. With the 1000-class head: 86,567,656.
  const ModelCost c = zoo("vit-b16");
  check_published(c.total_params, 86e6, 1e6);
  CHECK(c.sequence == 197);
  // Per image: 12 layers x 197 tokens x (2 x 7.08M weights) + attention (197 keys, 12 heads x 64 x 2).
  const double per_token_layer = 2 * (3 * 768.0 * 768 + 768.0 * 768 + 2 * 768.0 * 3072) + 2 * 197.0 * 768 * 2;
  const double patch = 2 * 196.0 * 768 * 768;
  CHECK(c.flops_fwd == Approx(12 * 197 * per_token_layer + patch + 2 * 768.0 * 1000).epsilon(1e-9));
}

TEST_CASE("V-MoE-B/16 has MoE in the odd blocks, 32 experts, top-2") {
  const ModelCost v = zoo("vmoe-b16");
  const ModelCost dense = zoo("vit-b16");
  CHECK(v.moe_layers == 6);
  for (const Layer& l : v.layers)
    if (l.kind == LayerKind::kTransformer) CHECK(l.moe == (l.name == "L1" || l.name == "L3" || l.name == "L5" ||
                                                          l.name == "L7" || l.name == "L9" || l.name == "L11"));
  // Each MoE block holds 32 copies of the MLP; a token uses 2 of them (+ a 768x32 router).
  const double mlp = 2 * 768.0 * 3072 + 3072 + 768;
  CHECK(v.total_params == Approx(dense.total_params + 6 * (31 * mlp + 768 * 32 + 32)).epsilon(1e-12));
  CHECK(v.active_params == Approx(dense.total_params + 6 * (mlp + 768 * 32 + 32)).epsilon(1e-12));
}

TEST_CASE("An MoE layer's gathers and host routing, and the embedding's lookups") {
  ModelOptions o;
  o.tokens = 256;
  const ModelCost c = zoo("moe-tiny", o);  // 4 experts top-2, d 64, learned positions
  auto op = [&](const std::string& layer, const std::string& name) -> const Op& {
    for (const Layer& l : c.layers)
      for (const Op& x : l.ops)
        if (l.name == layer && x.name == name) return x;
    FAIL("no op " << name);
    return c.layers[0].ops[0];
  };
  // The top-k's and the dispatch's choices: the rank's 256 tokens x 2 each (the lowering scales the
  // dispatch's to its EP group). The dispatch reads each of the 256 tokens' rows of 64 (fp32 by
  // default here: o.act_elem_bytes) once and writes 512; the combine reads 512 and writes 256.
  CHECK(op("L0", "L0.moe.topk").routing_choices == 512);
  CHECK(op("L0", "L0.moe.topk").dispatch_choices == 0);
  CHECK(op("L0", "L0.moe.dispatch").dispatch_choices == 512);
  CHECK(op("L0", "L0.moe.dispatch").routing_choices == 0);
  // The tokens its decision goes over; none sorted until the lowering knows the policy.
  CHECK(op("L0", "L0.moe.dispatch").dispatch_tokens == 256);
  CHECK(op("L0", "L0.moe.dispatch").priority_sort_tokens == 0);
  CHECK(op("L0", "L0.moe.combine").dispatch_tokens == 0);
  // The router's softmax over 4 experts, counted as a loss's per logit; its gradient is the
  // backward's host term, with no FLOPs of its own.
  CHECK(op("L0", "L0.moe.topk").flops == kLossFlopsPerLogit * 256 * 4);
  const std::vector<Op> topk_bwd = backward_ops(op("L0", "L0.moe.topk"));
  REQUIRE(topk_bwd.size() == 1);
  CHECK(topk_bwd[0].flops == 0);
  CHECK(topk_bwd[0].routing_choices == 512);
  const double row = 64 * o.act_elem_bytes;
  for (const char* name : {"L0.moe.dispatch", "L0.moe.combine"}) {
    CHECK(op("L0", name).kind == OpKind::kEmbedding);
    CHECK(op("L0", name).bytes == (256 + 512) * row);
  }
  CHECK(op("L0", "L0.moe.dispatch").gather_source_bytes == 256 * row);
  CHECK(op("L0", "L0.moe.combine").gather_source_bytes == 512 * row);
  // Their kernels (the profile's gather_kernel factors), forward and backward, as the executor
  // runs them: the dispatch copies and its backward sums each token's k rows; the combine sums,
  // its backward scales and dots; the lookups copy table rows and add into them backward.
  CHECK(op("L0", "L0.moe.dispatch").gather_kernel == GatherKernel::kCopy);
  CHECK(op("L0", "L0.moe.dispatch").gather_backward_kernel == GatherKernel::kSumBackward);
  CHECK(op("L0", "L0.moe.combine").gather_kernel == GatherKernel::kSum);
  CHECK(op("L0", "L0.moe.combine").gather_backward_kernel == GatherKernel::kCombineBackward);
  for (const char* name : {"embed.lookup", "embed.positions"}) {
    CHECK(op("embed", name).gather_kernel == GatherKernel::kLookup);
    CHECK(op("embed", name).gather_backward_kernel == GatherKernel::kScatterAdd);
  }
  // Their backward adds the gathered rows' gradient back: the written rows read, the source's
  // read and written.
  const std::vector<Op> combine_bwd = backward_ops(op("L0", "L0.moe.combine"));
  REQUIRE(combine_bwd.size() == 1);
  CHECK(combine_bwd[0].bytes == (256 + 2 * 512) * row);
  // The lookups read each of the vocabulary's 64 rows and the sequence's 32 positions once for
  // the 256 tokens' rows written.
  CHECK(op("embed", "embed.lookup").bytes == (64 + 256) * row);
  CHECK(op("embed", "embed.positions").bytes == (32 + 256) * row);
  // Learned positions: a second lookup and the add, whose gradient passes through.
  CHECK(op("embed", "embed.positions").kind == OpKind::kEmbedding);
  CHECK(op("embed", "embed.add").fused_backward);
  CHECK(op("embed", "embed.add").bytes == 3 * 256 * 64 * o.act_elem_bytes);
  // Each sublayer's residual add (two rows read, one written per token) with its sublayer: the
  // attention's named under it, the MoE's at the layer's end (the lowering puts it in the
  // combine, where the executor adds it, and its gradient's sum in the gate's backward).
  CHECK(op("L0", "L0.attn.residual").bytes == 3 * 256 * row);
  CHECK(op("L0", "L0.residual").bytes == 3 * 256 * row);
}

TEST_CASE("pMoE: each expert takes l of n patches") {
  const ModelCost c = zoo("pmoe-vit-s16");
  for (const Layer& l : c.layers) {
    if (!l.moe) continue;
    // 8 experts x 49 patches over 196 patches + class token.
    CHECK(l.routed_per_token == Approx(8.0 * 49 / 197));
  }
}

TEST_CASE("ReID recipe: two ResNet-50 backbones, the auxiliary one on the real half") {
  const ModelCost c = zoo("resnet50-reid");
  const ModelCost r50 = zoo("resnet50");
  // Backbone without the ImageNet FC: 25,557,032 - (2048 x 1000 + 1000).
  const double backbone = 25557032.0 - 2049000;
  const double classifiers = 2049.0 * 9041 + 2049.0 * 1041 + 2049.0 * 1041;
  const double disc = 2049.0 * 1024 + 1025.0 * 16;
  CHECK(c.total_params == Approx(2 * backbone + classifiers + disc).epsilon(1e-12));
  // At 256x128 the backbone does 256*128/(224*224) of the 224x224 work (conv output sizes scale
  // exactly: both are multiples of 32); per batch image: main 1x, aux 0.5x.
  const double r50_backbone_flops = r50.flops_fwd - 2 * 2048.0 * 1000;
  const double scale = 256.0 * 128 / (224 * 224);
  double backbone_flops = 0;
  for (const Layer& l : c.layers)
    if (l.kind == LayerKind::kConv || l.kind == LayerKind::kResBlock) backbone_flops += l.flops_fwd * l.sample_share;
  CHECK(backbone_flops == Approx(1.5 * scale * r50_backbone_flops).epsilon(1e-9));
}

TEST_CASE("Activation bytes per token match Korthikanti et al. for a GPT-style layer") {
  // GPT-3-like layer, d = 1024, 16 heads, GELU MLP of 4d: 34*d bytes per token (eq. 1 of
  // Korthikanti et al. 2022 without the a*s term) minus the two d-sized dropout masks = 32*d.
  const model::Model m = load_model_text(R"pb(
      name: "gpt" transformer { layers: 2 hidden: 1024 heads: 16 ffn_hidden: 4096 activation: GELU vocab: 1000 })pb",
                                         "gpt.textproto");
  const ModelCost c = analyze(m, {.sequence = 128});
  const Layer& l = c.layers[1];
  CHECK(l.act_none.total() == 32 * 1024);
  // Selective recompute drops the two norm outputs (d each), the attention output (d) and the
  // GELU output (4d): 7d elements of 2 bytes.
  CHECK(l.act_selective.total() == 32 * 1024 - 14 * 1024);
  CHECK(l.act_full == 2 * 1024);
  // FLOPs: 2 x 12 d^2 weights + causal attention over (s+1)/2 keys: 2 * 2 * d * (s+1)/2.
  CHECK(l.flops_fwd == Approx(24.0 * 1024 * 1024 + 2.0 * 1024 * 129).epsilon(1e-12));
  CHECK(l.kv_cache_bytes == 2 * 1024 * 2);
}

TEST_CASE("Encoder-decoder models add cross-attention to decoder layers") {
  const ModelCost c = zoo("switch-base-128");
  int encoder = 0, decoder = 0;
  for (const Layer& l : c.layers)
    if (l.kind == LayerKind::kTransformer) (l.encoder ? encoder : decoder)++;
  CHECK(encoder == 12);
  CHECK(decoder == 12);
  CHECK(c.moe_layers == 12);
  // Hugging Face google/switch-base-128: about 7.4B parameters.
  check_published(c.total_params, 7.4e9, 0.1e9);
}

}  // namespace
}  // namespace moesim::cost
