#include "executor/optimizer.h"

#include "common/error.h"
#include "executor/error.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace moesim::exec {

namespace {

// Throws one exec::Error listing every problem, if any.
void throw_if_any(const char* who, const std::vector<std::string>& problems) {
  if (problems.empty()) return;
  std::string msg = fmt::format("{} options:", who);
  for (const std::string& p : problems) msg += " " + p + ";";
  msg.pop_back();
  throw Error(msg);
}

std::vector<Tensor> zero_states(const std::vector<Param>& params) {
  std::vector<Tensor> states;
  states.reserve(params.size());
  for (const Param& p : params) states.push_back(Tensor::zeros(p.value.shape(), DType::kF32, p.value.device()));
  return states;
}

}  // namespace

Optimizer::Optimizer(const ParamRegistry& params, float lr, Backend& backend)
    : params_(params.params().begin(), params.params().end()), backend_(&backend), lr_(lr) {
  for (const Param& p : params_)
    if (p.value.device() != backend.device() || p.grad.device() != backend.device())
      throw Error(fmt::format("optimizer: parameter '{}' is {} but the optimizer runs on {}", p.name,
                              p.value.describe(), backend.name()));
}

void Optimizer::zero_grad() {
  for (Param& p : params_) p.grad.fill_zero();
}

void Optimizer::set_lr(float lr) {
  MOESIM_ASSERT(lr >= 0, "learning rate {} < 0", lr);
  lr_ = lr;
}

// ---- SGD -------------------------------------------------------------------------------------

Sgd::Sgd(const ParamRegistry& params, SgdOptions options, Backend& backend)
    : Optimizer(params, options.lr, backend), options_(options) {
  std::vector<std::string> problems;
  if (!(options.lr >= 0)) problems.push_back(fmt::format("lr = {} is negative", options.lr));
  if (!(options.momentum >= 0 && options.momentum < 1))
    problems.push_back(fmt::format("momentum = {} is outside [0, 1)", options.momentum));
  if (!(options.weight_decay >= 0))
    problems.push_back(fmt::format("weight_decay = {} is negative", options.weight_decay));
  if (options.nesterov && !(options.momentum > 0)) problems.push_back("nesterov needs momentum > 0");
  throw_if_any("sgd", problems);
  velocity_ = zero_states(params_);
}

void Sgd::step() {
  const kernels::SgdHyper h{lr_, options_.momentum, options_.weight_decay, options_.nesterov};
  for (size_t i = 0; i < params_.size(); ++i)
    backend_->sgd_step(params_[i].value.device_f32(), params_[i].grad.device_f32(), velocity_[i].device_f32(),
                       params_[i].value.numel(), h);
  ++steps_;
}

// ---- Adam ------------------------------------------------------------------------------------

Adam::Adam(const ParamRegistry& params, AdamOptions options, Backend& backend)
    : Optimizer(params, options.lr, backend), options_(options) {
  std::vector<std::string> problems;
  if (!(options.lr >= 0)) problems.push_back(fmt::format("lr = {} is negative", options.lr));
  if (!(options.beta1 >= 0 && options.beta1 < 1))
    problems.push_back(fmt::format("beta1 = {} is outside [0, 1)", options.beta1));
  if (!(options.beta2 >= 0 && options.beta2 < 1))
    problems.push_back(fmt::format("beta2 = {} is outside [0, 1)", options.beta2));
  if (!(options.eps > 0)) problems.push_back(fmt::format("eps = {} is not positive", options.eps));
  if (!(options.weight_decay >= 0))
    problems.push_back(fmt::format("weight_decay = {} is negative", options.weight_decay));
  throw_if_any("adam", problems);
  m_ = zero_states(params_);
  v_ = zero_states(params_);
}

void Adam::step() {
  ++steps_;
  const auto t = static_cast<double>(steps_);
  const float b1 = options_.beta1, b2 = options_.beta2, wd = options_.weight_decay;
  kernels::AdamHyper h;
  // Bias corrections in double: b^t for large t underflows gracefully to 0.
  h.step_size = static_cast<float>(lr_ / (1.0 - std::pow(static_cast<double>(b1), t)));
  h.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(b2), t)));
  h.beta1 = b1;
  h.beta2 = b2;
  h.eps = options_.eps;
  h.decay = options_.decoupled_weight_decay ? 1.0f - lr_ * wd : 1.0f;
  h.l2 = options_.decoupled_weight_decay ? 0.0f : wd;
  std::vector<AdamTensor> tensors;
  tensors.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i)
    tensors.push_back({params_[i].value.device_f32(), params_[i].grad.device_f32(), m_[i].device_f32(),
                       v_[i].device_f32(), params_[i].value.numel()});
  backend_->adam_step_many(tensors.data(), tensors.size(), h);
}

}  // namespace moesim::exec
