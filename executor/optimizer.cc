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
  for (const Param& p : params) states.push_back(Tensor::zeros(p.value.shape()));
  return states;
}

}  // namespace

Optimizer::Optimizer(const ParamRegistry& params, float lr)
    : params_(params.params().begin(), params.params().end()), lr_(lr) {}

void Optimizer::zero_grad() {
  for (Param& p : params_) std::fill_n(p.grad.f32(), p.grad.numel(), 0.0f);
}

void Optimizer::set_lr(float lr) {
  MOESIM_ASSERT(lr >= 0, "learning rate {} < 0", lr);
  lr_ = lr;
}

// ---- SGD -------------------------------------------------------------------------------------

Sgd::Sgd(const ParamRegistry& params, SgdOptions options) : Optimizer(params, options.lr), options_(options) {
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
  const float lr = lr_, mu = options_.momentum, wd = options_.weight_decay;
  for (size_t i = 0; i < params_.size(); ++i) {
    float* p = params_[i].value.f32();
    const float* grad = params_[i].grad.f32();
    float* vel = velocity_[i].f32();
    const int64_t n = params_[i].value.numel();
    for (int64_t j = 0; j < n; ++j) {
      const float g = grad[j] + wd * p[j];
      vel[j] = mu * vel[j] + g;
      p[j] -= lr * (options_.nesterov ? g + mu * vel[j] : vel[j]);
    }
  }
  ++steps_;
}

// ---- Adam ------------------------------------------------------------------------------------

Adam::Adam(const ParamRegistry& params, AdamOptions options) : Optimizer(params, options.lr), options_(options) {
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
  const float b1 = options_.beta1, b2 = options_.beta2, eps = options_.eps, wd = options_.weight_decay;
  // Bias corrections in double: b^t for large t underflows gracefully to 0.
  const auto step_size = static_cast<float>(lr_ / (1.0 - std::pow(static_cast<double>(b1), t)));
  const auto bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(b2), t)));
  const float decay = options_.decoupled_weight_decay ? 1.0f - lr_ * wd : 1.0f;
  const float l2 = options_.decoupled_weight_decay ? 0.0f : wd;
  for (size_t i = 0; i < params_.size(); ++i) {
    float* p = params_[i].value.f32();
    const float* grad = params_[i].grad.f32();
    float* m = m_[i].f32();
    float* v = v_[i].f32();
    const int64_t n = params_[i].value.numel();
    for (int64_t j = 0; j < n; ++j) {
      const float g = grad[j] + l2 * p[j];
      p[j] *= decay;
      m[j] = b1 * m[j] + (1.0f - b1) * g;
      v[j] = b2 * v[j] + (1.0f - b2) * g * g;
      p[j] -= step_size * m[j] / (std::sqrt(v[j]) / bc2_sqrt + eps);
    }
  }
}

}  // namespace moesim::exec
