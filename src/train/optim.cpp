#include "train/optim.h"

#include <cmath>

#include "core/error.h"

namespace hla::train {

void validate(const OptimConfig& c) {
  auto num = [](double v) { return std::to_string(v); };
  check(std::isfinite(c.lr) && c.lr > 0, "learning rate " + num(c.lr) + " is not a positive number");
  check(std::isfinite(c.weight_decay) && c.weight_decay >= 0, "weight decay " + num(c.weight_decay) + " is negative");
  check(std::isfinite(c.clip) && c.clip >= 0, "gradient clip " + num(c.clip) + " is negative (0 turns it off)");
}

AdamW::AdamW(const OptimConfig& c) : c_(c) { validate(c); }

double lr_at(const OptimConfig& c, int64_t step) {
  if (step < c.warmup) return c.lr * double(step + 1) / double(c.warmup);
  const double span = double(std::max<int64_t>(1, c.total - c.warmup));
  const double progress = std::min(1.0, double(step - c.warmup) / span);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

double AdamW::step(const std::vector<Param<float>*>& params) {
  double ss = 0;
  for (auto* p : params)
    for (float g : p->g) ss += double(g) * double(g);
  const double norm = std::sqrt(ss);
  const double clip = c_.clip > 0 && norm > c_.clip ? c_.clip / norm : 1.0;
  const double lr = lr_at(c_, t_);
  ++t_;
  const double bc1 = 1.0 - std::pow(c_.beta1, double(t_)), bc2 = 1.0 - std::pow(c_.beta2, double(t_));
  for (auto* p : params) {
    auto& m = m_[p->name];
    auto& v = v_[p->name];
    if (m.empty()) m.assign(p->w.size(), 0.0f), v.assign(p->w.size(), 0.0f);
    const float b1 = float(c_.beta1), b2 = float(c_.beta2), sc = float(clip);
    const float wd = p->decay ? float(lr * c_.weight_decay) : 0.0f;
    const float step_size = float(lr / bc1), inv_bc2 = float(1.0 / bc2), eps = float(c_.eps);
    for (size_t i = 0; i < p->w.size(); ++i) {
      const float g = p->g[i] * sc;
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      p->w[i] -= wd * p->w[i] + step_size * m[i] / (std::sqrt(v[i] * inv_bc2) + eps);
    }
  }
  return norm;
}

std::map<std::string, Tensor> AdamW::state() const {
  std::map<std::string, Tensor> st;
  for (const auto* mv : {&m_, &v_})
    for (auto& [name, x] : *mv) {
      Tensor t = Tensor::f32({int64_t(x.size())});
      std::copy(x.begin(), x.end(), t.f32());
      st[(mv == &m_ ? "m." : "v.") + name] = t;
    }
  return st;
}

void AdamW::load_state(const std::map<std::string, Tensor>& st, int64_t steps_done) {
  m_.clear(), v_.clear();
  for (auto& [key, t] : st) {
    check(key.size() > 2 && (key[0] == 'm' || key[0] == 'v') && key[1] == '.', "optimizer state: unexpected tensor '" + key + "'");
    Tensor f = t.to_f32();
    (key[0] == 'm' ? m_ : v_)[key.substr(2)].assign(f.f32(), f.f32() + f.numel());
  }
  t_ = steps_done;
}

}  // namespace hla::train
