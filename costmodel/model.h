// The model zoo's arithmetic: parameters, FLOPs, activation bytes and kernels, layer by layer.
//
//   cost::ModelSpec m = cost::load_model("configs/models/deepseek-v3.textproto");
//   cost::ModelCost c = cost::analyze(m.spec(), {.sequence = 4096});
//   c.total_params;          // 671.0e9
//   c.layers[3].moe;         // true: DeepSeek-V3's first MoE layer
//
// Conventions (the ones published parameter and FLOP counts use):
//   - A linear layer d_in -> d_out has d_in*d_out weights (+ d_out biases when the model has
//     biases) and costs 2*d_in*d_out FLOPs per token forward. Backward costs twice the forward
//     (the data-gradient and the weight-gradient GEMM).
//   - Model FLOPs count matrix work only (GEMMs, convolutions, attention scores and values);
//     norms and activation functions are memory-bound kernels with bytes but no FLOPs counted,
//     as in the ResNet-50 "4.09 GMACs" figure and the 6N training rule.
//   - Attention core per query token: 2*ctx*heads*(qk_head_dim + v_head_dim) FLOPs, where ctx is
//     the number of keys it attends to: the sequence for bidirectional (encoder, ViT) attention,
//     (sequence+1)/2 on average for causal decoder attention (what a causal kernel computes).
//   - total_params counts every parameter, embeddings included (Mixtral's 46.7B and DeepSeek-V3's
//     671B do). active_params are those one token uses: everything except the routed experts it
//     is not sent to (top_k of E per MoE layer), embedding tables in full.
//   - MoE FLOPs per token: router 2*d*E + (top_k + shared) experts; with capacity drops a token
//     can use fewer (the routing model accounts for that, not this table).
//   - Activation bytes (what a layer keeps for its backward pass, per token, 16-bit tensors,
//     flash-style attention so no sequence^2 score matrix): the inputs of every GEMM, norm and
//     activation function that backward needs. For a GELU MLP transformer with ffn = 4d this is
//     32*d bytes per token per layer: Korthikanti et al. 2022 ("Reducing Activation Recomputation
//     in Large Transformer Models", eq. 1: 34*s*b*h + 5*a*s^2*b) without the two s*b*h dropout
//     masks and without the score term that flash attention does not store.
//     Recompute SELECTIVE keeps what the GEMMs' weight gradients need and recomputes the rest, as
//     Megatron-core's selective modules and DeepSeek-V3 (sec. 3.2.3) do: norm outputs (from
//     their inputs), the attention core's output (flash attention re-run; for MLA also q, k and v
//     from the latents), activation-function outputs, and routed experts' outputs (the down
//     projection re-run). For the GELU layer above it keeps 18*d bytes per token.
//     FULL keeps only each layer's input (d*2 bytes per token).
//   - Vision and CNN models count per sample (image): FLOPs per image, activations per image.
#pragma once

#include "common/config.h"
#include "costmodel/model.pb.h"
#include "costmodel/ops.h"

#include <string>
#include <vector>

namespace moesim::cost {

// FLOPs per output element of an activation function: GELU's tanh form
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) is 8 multiplies and adds around one tanh
// (SiLU/SwiGLU about the same around one exp), counted as 8.
inline constexpr double kActivationFlops = 8;
// The loss over the vocabulary per logit: max, subtract, exp, sum, and the gradient (softmax minus
// one-hot, scaled), counted as 8 like an activation.
inline constexpr double kLossFlopsPerLogit = 8;
// An optimizer step's arithmetic per parameter updated: Adam(W) keeps two moments (5), corrects
// their bias (2), takes a square root and a quotient (3) and applies the update with weight
// decay (4): 14; SGD with momentum 4.
inline constexpr double kAdamFlopsPerParameter = 14;
inline constexpr double kSgdFlopsPerParameter = 4;

enum class LayerKind {
  kEmbedding,     // token embedding (and learned positions)
  kPatchEmbed,    // ViT patch embedding (a stride-p convolution) + class token + positions
  kTransformer,   // attention + dense FFN or MoE
  kHead,          // final norm + output projection (LM head or classifier)
  kConv,          // ResNet stem (conv + norm + pool)
  kResBlock,      // a residual block
  kClassifier,    // linear classifier on pooled features
  kDiscriminator, // ReID camera discriminator MLP
};
const char* layer_kind_name(LayerKind k);

// Activation bytes per token (sample) of one layer, split by how tensor parallelism shares them.
struct ActivationBytes {
  double sharded = 0;     // tensors split over TP ranks (head- or ffn-partitioned)
  double replicated = 0;  // full-width tensors (norm inputs, layer input): split only with sequence parallelism
  double expert = 0;      // routed experts' tensors (top_k copies per token): scale with the capacity factor
  double total() const { return sharded + replicated + expert; }
};

struct Layer {
  std::string name;          // "embed", "L3", "head", "stem", "stage2.block1", "main.id_classifier"
  LayerKind kind = LayerKind::kTransformer;
  std::string network;       // ReID: "main", "aux", "discriminator"; else empty
  double sample_share = 1;   // fraction of the batch's samples that pass through this layer (ReID aux: 0.5)
  bool encoder = false;      // encoder-decoder models: an encoder layer

  // Parameters.
  double dense_params = 0;   // used by every token: attention, norms, dense FFN, router, shared experts
  double expert_params = 0;  // all routed experts of the layer together
  double embedding_params = 0;  // part of dense_params that is an embedding table (lookup, no FLOPs)
  double params() const { return dense_params + expert_params; }
  double active_params = 0;  // used by one token

  // MoE (moe == false: the rest is zero).
  bool moe = false;
  int experts = 0;
  int top_k = 0;              // routed experts per token, rounded up
  double routed_per_token = 0;  // exact: top_k, or experts*l/n for pMoE patch routing
  double expert_params_each = 0;
  double expert_flops_per_token = 0;  // forward FLOPs of one expert for one token

  // Per token (or sample), forward. Backward FLOPs = 2x (see above), minus nothing.
  double flops_fwd = 0;
  double flops_bwd = 0;
  ActivationBytes act_none;       // no recompute
  ActivationBytes act_selective;  // selective recompute
  double act_full = 0;            // full recompute: the layer's input only (replicated)
  double kv_cache_bytes = 0;      // per token of context, 16-bit (inference); 0 for non-attention layers

  // Forward kernels for `ModelOptions::tokens` tokens (samples for CNNs).
  std::vector<Op> ops;
};

struct ModelOptions {
  int sequence = 0;     // tokens per sequence; 0 = the model's max_sequence (transformers only)
  double tokens = 0;    // tokens (samples) the ops' shapes are built for; 0 = one sequence (one sample)
  double act_elem_bytes = 2;  // bytes per activation element (16-bit)
};

struct ModelCost {
  std::string name;
  bool per_token = true;      // false: vision/CNN models, counted per sample (image)
  int sequence = 0;           // tokens per sample (vision: patches + class token)
  double tokens = 0;          // the ops' shape basis
  int hidden = 0;             // model width (transformers), 0 for CNNs
  std::vector<Layer> layers;

  double total_params = 0;
  double active_params = 0;
  double embedding_params = 0;  // input embedding tables (and learned positions)
  double expert_params = 0;     // routed experts, all layers
  double flops_fwd = 0;         // per token (or per sample)
  double flops_bwd = 0;
  int moe_layers = 0;
};

// Parses and validates a model config (every problem at once, FILE:LINE: field: message).
model::Model load_model(const std::string& path);
model::Model load_model_text(const std::string& text, const std::string& name);
// Validates a model message given its file's locations (used when a model is inlined elsewhere).
void validate_model(const ConfigScope& scope);

// Whether transformer layer `layer` (from 0, encoder layers first) is an MoE layer under the
// model's `moe` rules (model.proto); false when the rules are not usable (every_n_layers < 1).
bool is_moe_layer(const model::Transformer& transformer, int layer);

// Whether SELECTIVE recompute re-runs this forward kernel before its layer's backward (see the
// counting rules above): norms, the attention core, activation functions, routed experts' down
// projections.
bool recomputed_selectively(const Op& op);

// The per-layer breakdown. `model` must have been validated.
ModelCost analyze(const model::Model& model, const ModelOptions& options = {});

// The sequence length a transformer uses when none is given (max_sequence, else 2048); the patch
// count (+ class token) for a ViT; 1 for CNNs.
int default_sequence(const model::Model& model);

}  // namespace moesim::cost
