#include "model/params.h"

#include <cmath>

#include "core/error.h"

namespace hla {

Params::Params(uint64_t seed) : rng_(seed) {}

bool Params::has(const std::string& name) const { return ckpt_ ? ckpt_->has(name) : true; }

// Shapes agree when they do after dropping size-1 dims (Kimi stores A_log as [1,1,H,1]).
static bool same_shape(const Shape& a, const Shape& b) {
  Shape x, y;
  for (auto d : a) if (d != 1) x.push_back(d);
  for (auto d : b) if (d != 1) y.push_back(d);
  return x == y;
}

void Params::bind(const std::string& name, const Shape& shape, Tensor* dst, Init init) {
  num_params_ += shape_numel(shape);
  if (ckpt_) {
    Tensor t = ckpt_->get(name);
    check(same_shape(t.shape(), shape), ckpt_->dir() + ": tensor '" + name + "' has shape " + shape_str(t.shape()) +
                                            " but config.json implies " + shape_str(shape));
    check(dtype_is_float(t.dtype()), ckpt_->dir() + ": tensor '" + name + "' has non-float dtype " +
                                         dtype_name(t.dtype()));
    if (materialize_) *dst = t.to_f32().reshape(shape);
    loaded_bytes_ += t.nbytes();
    if (progress_) progress_(loaded_bytes_);
    return;
  }
  if (!materialize_) return;
  Tensor t = Tensor::f32(shape);
  float* p = t.f32();
  const int64_t n = t.numel();
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::normal_distribution<float> embed(0.0f, 2.4f / std::sqrt(float(shape.back())));  // Init::Embed: [vocab, hidden]
  std::uniform_real_distribution<float> unif(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    switch (init) {
      case Init::Normal: p[i] = normal(rng_); break;
      case Init::Ones: p[i] = 1.0f; break;
      case Init::OutNorm: p[i] = 0.1f; break;
      case Init::Embed:
        p[i] = embed(rng_);
        break;
      case Init::Zeros: p[i] = 0.0f; break;
      case Init::ALog: p[i] = std::log(1.0f + 15.0f * unif(rng_)); break;  // A ~ U(1, 16), as FLA
      case Init::DtBias: {  // inverse softplus of dt ~ logU(1e-3, 1e-1)
        const float dt = std::exp(std::log(1e-3f) + unif(rng_) * (std::log(1e-1f) - std::log(1e-3f)));
        p[i] = dt + std::log(-std::expm1(-dt));
        break;
      }
      case Init::Conv: p[i] = (unif(rng_) * 2.0f - 1.0f) / std::sqrt(float(shape.back())); break;
    }
  }
  created_[name] = t;
  *dst = t;
}

}  // namespace hla
