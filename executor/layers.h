// Dense layers of the executor, the llm.c way (../shared/DESIGN.md, "Executor"): each layer owns its
// parameters and their gradients, keeps what its backward needs from the last forward, and its
// backward returns dX and accumulates (+=) the parameter gradients. No autograd, no graph.
//
//   exec::Embedding tok(backend, "tok", vocab, d_model, seed);
//   exec::CausalSelfAttention attn(backend, "block0.attn", d_model, n_heads, seed);
//   exec::Linear head(backend, "head", d_model, vocab, seed);
//   exec::ParamRegistry params;
//   tok.register_params(params);
//   attn.register_params(params);
//   head.register_params(params);
//
//   Tensor x = tok.forward(ids).reshaped({B, S, d_model});
//   Tensor h = exec::residual_add(backend, x, attn.forward(x));
//   exec::LossAndGrad out = exec::cross_entropy(backend, head.forward(h), targets);
//   Tensor dh = head.backward(out.dlogits);
//   Tensor dx = attn.backward(dh);
//   exec::accumulate(backend, dx, dh);                  // the residual branch
//   tok.backward(dx.reshaped({B * S, d_model}));
//
// Tensors are fp32, row-major, on the back end's device (CPU or CUDA): a layer allocates its
// parameters, gradients and outputs there and takes inputs there (else exec::Error). Every tensor
// op goes through the Backend (GEMMs, layer norms, softmax and its backward, the causal mask, head
// permutations, gathers and scatters, bias adds and sums, the loss), so the same layer code runs
// on both back ends. Host data: token ids and targets (checked on the host, then copied to the
// device) and the loss, whose per-row values come back to the host to be summed.
//
// A forward keeps *handles* to its inputs (Tensor copies share their buffer): an input must not be
// overwritten between a layer's forward and its backward. Layers move but do not copy (a copy
// would share its parameters' buffers with the original).
//
// Parameters are initialised from an explicit seed: each parameter draws from its own stream,
// seeded by derive_seed(seed, parameter name), so a model is bit-identical on every rank and run,
// and a parameter's values do not depend on the order layers are built in or on which rank builds
// them (expert e gets the same weights whatever the expert-parallel layout).
#pragma once

#include "executor/backend.h"
#include "executor/tensor.h"

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moesim::exec {

// ---- Randomness ------------------------------------------------------------------------------

// A 64-bit seed for the stream `name` under `seed`: splitmix64(seed ^ splitmix64(fnv1a64(name))).
// Integer arithmetic only, so the same on every platform.
uint64_t derive_seed(uint64_t seed, std::string_view name);

// std::mt19937_64 (its output sequence is fixed by the C++ standard) with our own transforms to
// uniform and normal numbers; std::uniform_real_distribution and std::normal_distribution are
// implementation-defined and differ between standard libraries.
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}

  uint64_t next_u64() { return engine_(); }
  // Uniform on [0, 1): the top 53 bits of one draw, times 2^-53 (exact in a double).
  double uniform();
  // Standard normal by Box-Muller: with u1 in (0, 1] and u2 in [0, 1) from two uniform draws,
  //   r = sqrt(-2 ln u1),  z0 = r cos(2 pi u2),  z1 = r sin(2 pi u2);
  // z0 is returned now and z1 on the next call. Rounded to fp32 by the fill functions, the values
  // agree between C libraries unless their log/cos differ across an fp32 rounding boundary.
  double normal();

  // Fill a CPU fp32 tensor, element by element in memory order (layers draw on the host and then
  // copy to their device).
  void fill_uniform(Tensor& t, float lo, float hi);    // lo + (hi - lo) u
  void fill_normal(Tensor& t, float mean, float std);  // mean + std z

 private:
  std::mt19937_64 engine_;
  bool has_spare_normal_ = false;
  double spare_normal_ = 0;
};

// ---- Parameter registry ----------------------------------------------------------------------

// How a parameter is held across data-parallel ranks, which decides what the trainer does with
// its gradient.
enum class ParamSharing {
  kReplicated,  // the same on every data-parallel rank (dense layers): gradients are all-reduced
  kLocal,       // held by this rank alone (an expert under expert parallelism): gradients stay local
};
const char* param_sharing_name(ParamSharing s);  // "replicated", "local"

// One trainable tensor. value and grad are handles aliasing the layer's own buffers, so the
// registry stays valid when the layer object moves (layers never reallocate their parameters).
struct Param {
  std::string name;  // "block0.attn.qkv.weight"
  Tensor value;
  Tensor grad;  // same shape as value; backward passes accumulate into it
  ParamSharing sharing = ParamSharing::kReplicated;
};

// Every parameter of a model, in registration order (which is also the order an optimizer keeps
// its states in and the order a trainer should reduce gradients in, identical on every rank).
//
//   for (exec::Param& p : params.params())
//     if (p.sharing == exec::ParamSharing::kReplicated) dp->all_reduce_sum(p.grad.f32(), p.grad.numel());
class ParamRegistry {
 public:
  // Asserts a unique name and a grad of the value's shape.
  void add(std::string name, Tensor value, Tensor grad, ParamSharing sharing);

  std::span<Param> params() { return params_; }
  std::span<const Param> params() const { return params_; }
  const Param* find(std::string_view name) const;  // nullptr when absent
  size_t size() const { return params_.size(); }
  int64_t numel() const;                     // elements of all parameters
  int64_t numel(ParamSharing sharing) const;  // elements of the parameters held that way

  void zero_grad();  // every gradient to 0

 private:
  std::vector<Param> params_;
};

// ---- Layers ----------------------------------------------------------------------------------

struct LinearOptions {
  bool bias = true;
  float init_std = 0.02f;  // weight ~ N(0, init_std^2) (GPT-2's 0.02); bias starts at 0
};

// y = x W + b over the last dimension: x [..., in], W [in, out], b [out], y [..., out].
// Backward, with X and dY viewed as [rows, in] and [rows, out]:
//   dX = dY W^T,  dW += X^T dY,  db += sum over rows of dY.
class Linear {
 public:
  Linear(Backend& backend, std::string name, int64_t in_features, int64_t out_features, uint64_t seed,
         LinearOptions options = {});

  Linear(const Linear&) = delete;
  Linear& operator=(const Linear&) = delete;
  Linear(Linear&&) = default;
  Linear& operator=(Linear&&) = default;

  Tensor forward(const Tensor& x);
  Tensor backward(const Tensor& dy);
  // "<name>.weight", "<name>.bias".
  void register_params(ParamRegistry& registry, ParamSharing sharing = ParamSharing::kReplicated);

  const std::string& name() const { return name_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  bool has_bias() const { return has_bias_; }
  // Handles to the layer's buffers (write through them to set values; the layer keeps its own).
  Tensor weight() const { return weight_; }
  Tensor bias() const { return bias_; }  // empty without a bias
  Tensor weight_grad() const { return dweight_; }
  Tensor bias_grad() const { return dbias_; }

 private:
  Backend* backend_;
  std::string name_;
  int64_t in_, out_;
  bool has_bias_;
  Tensor weight_, bias_, dweight_, dbias_;
  Tensor x_;  // the last forward's input
};

// Token ids -> rows of a table: y[t] = E[ids[t]], E [vocab, dim], y [T, dim] (reshape to [B, S, dim]
// as needed). Backward scatter-adds: dE[ids[t]] += dy[t] for every t, so a repeated id collects
// the sum of its rows. Ids outside [0, vocab) throw exec::Error.
class Embedding {
 public:
  Embedding(Backend& backend, std::string name, int64_t vocab, int64_t dim, uint64_t seed,
            float init_std = 0.02f);

  Embedding(const Embedding&) = delete;
  Embedding& operator=(const Embedding&) = delete;
  Embedding(Embedding&&) = default;
  Embedding& operator=(Embedding&&) = default;

  Tensor forward(std::span<const int32_t> ids);
  void backward(const Tensor& dy);  // dy [T, dim] (or any shape of T * dim elements)
  // "<name>.weight".
  void register_params(ParamRegistry& registry, ParamSharing sharing = ParamSharing::kReplicated);

  const std::string& name() const { return name_; }
  int64_t vocab() const { return vocab_; }
  int64_t dim() const { return dim_; }
  Tensor weight() const { return table_; }
  Tensor weight_grad() const { return dtable_; }

 private:
  Backend* backend_;
  std::string name_;
  int64_t vocab_, dim_;
  Tensor table_, dtable_;
  // The last forward's ids (rows_ of them), then, where the back end reads one, their ScatterPlan's
  // packed array (groups_ groups; -1: none), i32 on the device.
  Tensor ids_;
  int64_t rows_ = 0, groups_ = -1;
};

// Layer normalisation over the last dimension (Backend::layernorm; the math is in
// executor/kernels.h): y = gamma (x - mean) / sqrt(var + eps) + beta, gamma = 1, beta = 0 at start.
class LayerNorm {
 public:
  LayerNorm(Backend& backend, std::string name, int64_t dim, float eps = 1e-5f);

  LayerNorm(const LayerNorm&) = delete;
  LayerNorm& operator=(const LayerNorm&) = delete;
  LayerNorm(LayerNorm&&) = default;
  LayerNorm& operator=(LayerNorm&&) = default;

  Tensor forward(const Tensor& x);  // x [..., dim]
  Tensor backward(const Tensor& dy);
  // "<name>.weight" (gamma), "<name>.bias" (beta).
  void register_params(ParamRegistry& registry, ParamSharing sharing = ParamSharing::kReplicated);

  const std::string& name() const { return name_; }
  int64_t dim() const { return dim_; }
  Tensor weight() const { return gamma_; }
  Tensor bias() const { return beta_; }
  Tensor weight_grad() const { return dgamma_; }
  Tensor bias_grad() const { return dbeta_; }

 private:
  Backend* backend_;
  std::string name_;
  int64_t dim_;
  float eps_;
  Tensor gamma_, beta_, dgamma_, dbeta_;
  Tensor x_, mean_, rstd_;  // the last forward's input and row statistics
};

struct AttentionOptions {
  float init_std = 0.02f;       // the QKV projection's weights
  float proj_init_std = 0.02f;  // the output projection's (GPT-2 scales it by 1/sqrt(2 n_layers))
  bool bias = true;
};

// Causal multi-head self-attention over a batch of B sequences of S tokens each, x [B, S, D],
// H heads of size d = D / H (Vaswani et al. 2017, sec. 3.2):
//   [Q | K | V] = x Wqkv + bqkv                      (Linear D -> 3D; head h of Q is columns h d .. h d + d - 1)
//   A_h = softmax(Q_h K_h^T / sqrt(d) + M)            per sequence, M[t][u] = -inf for u > t, else 0
//   O = [A_1 V_1 | ... | A_H V_H],  y = O Wo + bo     (Linear D -> D)
// so position t of a sequence sees positions <= t of the same sequence only. Backward, per head,
// with dA = dO_h V_h^T:
//   dV_h = A_h^T dO_h,  dS = A_h * (dA - rowsum(A_h * dA)),  dQ_h = dS K_h / sqrt(d),  dK_h = dS^T Q_h / sqrt(d).
// Keeps Q, K, V ([3, B, H, S, d], one buffer) and A ([B, H, S, S]) for the backward.
class CausalSelfAttention {
 public:
  CausalSelfAttention(Backend& backend, std::string name, int64_t d_model, int64_t n_heads, uint64_t seed,
                      AttentionOptions options = {});

  CausalSelfAttention(const CausalSelfAttention&) = delete;
  CausalSelfAttention& operator=(const CausalSelfAttention&) = delete;
  CausalSelfAttention(CausalSelfAttention&&) = default;
  CausalSelfAttention& operator=(CausalSelfAttention&&) = default;

  Tensor forward(const Tensor& x);  // x [B, S, D] -> y [B, S, D]
  Tensor backward(const Tensor& dy);
  // "<name>.qkv.weight", "<name>.qkv.bias", "<name>.proj.weight", "<name>.proj.bias".
  void register_params(ParamRegistry& registry, ParamSharing sharing = ParamSharing::kReplicated);

  const std::string& name() const { return name_; }
  int64_t d_model() const { return d_model_; }
  int64_t n_heads() const { return n_heads_; }
  Linear& qkv() { return qkv_; }
  Linear& proj() { return proj_; }
  Tensor attention_probs() const { return att_; }  // [B, H, S, S] of the last forward

 private:
  Backend* backend_;
  std::string name_;
  int64_t d_model_, n_heads_, head_dim_;
  Linear qkv_, proj_;
  int64_t batch_ = 0, seq_ = 0;
  Tensor qkv_heads_, att_;
};

// ---- Residual connections --------------------------------------------------------------------

// y = a + b (same shapes): a residual connection. Its backward passes dy unchanged to both a and
// b, so a caller sums the two branches' input gradients with accumulate().
Tensor residual_add(Backend& backend, const Tensor& a, const Tensor& b);
// dst += src (same element counts).
void accumulate(Backend& backend, Tensor& dst, const Tensor& src);

// ---- Loss ------------------------------------------------------------------------------------

struct LossAndGrad {
  double loss = 0;  // mean over the rows
  Tensor dlogits;   // d loss / d logits, the logits' shape
};

// Softmax cross-entropy with mean reduction over the T rows of logits [..., V] (T = numel / V):
//   loss = (1/T) sum_t (log sum_v exp(z_tv) - z_t,y_t),   dz_tv = (softmax(z_t)_v - [v == y_t]) / T
// The log-sum-exp subtracts the row maximum and sums in double. Targets outside [0, V) throw
// exec::Error. Under data parallelism each rank's loss is its local mean: averaging the
// all-reduced gradients over equal-sized local batches gives the global mean's gradient.
// Backend::cross_entropy computes the rows on the device; their losses are summed on the host.
LossAndGrad cross_entropy(Backend& backend, const Tensor& logits, std::span<const int32_t> targets);
// The same for CPU logits, on default_cpu_backend().
LossAndGrad cross_entropy(const Tensor& logits, std::span<const int32_t> targets);

}  // namespace moesim::exec
