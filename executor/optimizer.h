// Optimizers of the executor: they update the parameters of a ParamRegistry (executor/layers.h)
// from their gradients, holding one state per parameter in registration order. fp32 on the
// parameters' device: the per-element math is kernels::sgd_update / adam_update, run by the
// Backend's sgd_step / adam_step (the CPU back end unless another is given).
//
//   exec::Adam adam(params, {.lr = 3e-4f, .weight_decay = 0.1f});   // AdamW
//   adam.zero_grad();  ...forward, backward, all-reduce the replicated gradients...  adam.step();
//
// An optimizer holds handles to the parameters registered when it was built; parameters added to
// the registry afterwards are not seen.
#pragma once

#include "executor/layers.h"

#include <cstdint>
#include <vector>

namespace moesim::exec {

class Optimizer {
 public:
  // Every parameter must live on `backend`'s device.
  Optimizer(const ParamRegistry& params, float lr, Backend& backend);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update of every parameter from its current gradient (gradients are left as they are).
  virtual void step() = 0;
  void zero_grad();  // every gradient to 0

  float lr() const { return lr_; }
  void set_lr(float lr);  // for schedules; asserts lr >= 0
  int64_t steps_taken() const { return steps_; }

 protected:
  std::vector<Param> params_;
  Backend* backend_;
  float lr_;
  int64_t steps_ = 0;
};

// Stochastic gradient descent with momentum mu, weight decay wd (an L2 term in the gradient) and
// optional Nesterov momentum, as in PyTorch's torch.optim.SGD, with velocity v = 0 at start:
//   g = grad + wd p
//   v = mu v + g
//   p -= lr (g + mu v)  with Nesterov,  p -= lr v  without
// (mu = 0 is plain SGD: p -= lr g.)
struct SgdOptions {
  float lr = 0.01f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
};

class Sgd final : public Optimizer {
 public:
  // Throws exec::Error for lr < 0, momentum outside [0, 1), weight_decay < 0, or Nesterov without momentum.
  Sgd(const ParamRegistry& params, SgdOptions options, Backend& backend = default_cpu_backend());
  void step() override;
  const SgdOptions& options() const { return options_; }
  Tensor velocity(size_t param_index) const { return velocity_.at(param_index); }

 private:
  SgdOptions options_;
  std::vector<Tensor> velocity_;
};

// Adam (Kingma & Ba 2015, algorithm 1) with bias correction, and AdamW's decoupled weight decay
// (Loshchilov & Hutter 2019) or an L2 term, as in PyTorch's torch.optim.Adam / AdamW. At step
// t = 1, 2, ..., with m = v = 0 at start:
//   g = grad (+ wd p when !decoupled_weight_decay)
//   p *= 1 - lr wd                                    when decoupled_weight_decay
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
//   p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
struct AdamOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  bool decoupled_weight_decay = true;  // AdamW; false: Adam with an L2 term
};

class Adam final : public Optimizer {
 public:
  // Throws exec::Error for lr < 0, betas outside [0, 1), eps <= 0 or weight_decay < 0.
  Adam(const ParamRegistry& params, AdamOptions options, Backend& backend = default_cpu_backend());
  void step() override;
  const AdamOptions& options() const { return options_; }
  Tensor first_moment(size_t param_index) const { return m_.at(param_index); }
  Tensor second_moment(size_t param_index) const { return v_.at(param_index); }

 private:
  AdamOptions options_;
  std::vector<Tensor> m_, v_;
};

}  // namespace moesim::exec
