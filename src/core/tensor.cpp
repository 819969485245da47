#include "core/tensor.h"

#include <cstring>

#include "core/error.h"

namespace hla {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

static Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t acc = 1;
  for (int64_t i = int64_t(shape.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

Tensor Tensor::zeros(DType dt, Shape shape) {
  for (auto d : shape) check(d >= 0, "negative tensor dimension in " + shape_str(shape));
  size_t bytes = size_t(shape_numel(shape)) * dtype_size(dt);
  auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[bytes ? bytes : 1]());
  Tensor t;
  t.data_ = buf.get();
  t.owner_ = std::shared_ptr<const void>(buf, buf.get());
  t.dtype_ = dt;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::view_of(std::shared_ptr<const void> owner, void* data, DType dt, Shape shape,
                       Shape strides) {
  Tensor t;
  t.owner_ = std::move(owner);
  t.data_ = data;
  t.dtype_ = dt;
  t.strides_ = strides.empty() ? contiguous_strides(shape) : std::move(strides);
  t.shape_ = std::move(shape);
  return t;
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

float* Tensor::f32() const {
  check(dtype_ == DType::F32 && is_contiguous(), "internal: expected a contiguous f32 tensor");
  return static_cast<float*>(data_);
}

static double load_as_double(const void* p, DType dt) {
  switch (dt) {
    case DType::F64: return *static_cast<const double*>(p);
    case DType::F32: return *static_cast<const float*>(p);
    case DType::F16: return f16_to_f32(*static_cast<const uint16_t*>(p));
    case DType::BF16: return bf16_to_f32(*static_cast<const uint16_t*>(p));
    case DType::I64: return double(*static_cast<const int64_t*>(p));
    case DType::I32: return *static_cast<const int32_t*>(p);
    case DType::I8: return *static_cast<const int8_t*>(p);
    case DType::U8:
    case DType::BOOL: return *static_cast<const uint8_t*>(p);
  }
  return 0;
}

static void store_from_double(void* p, DType dt, double v) {
  switch (dt) {
    case DType::F64: *static_cast<double*>(p) = v; break;
    case DType::F32: *static_cast<float*>(p) = float(v); break;
    case DType::F16: *static_cast<uint16_t*>(p) = f32_to_f16(float(v)); break;
    case DType::BF16: *static_cast<uint16_t*>(p) = f32_to_bf16(float(v)); break;
    case DType::I64: *static_cast<int64_t*>(p) = int64_t(v); break;
    case DType::I32: *static_cast<int32_t*>(p) = int32_t(v); break;
    case DType::I8: *static_cast<int8_t*>(p) = int8_t(v); break;
    case DType::U8:
    case DType::BOOL: *static_cast<uint8_t*>(p) = uint8_t(v); break;
  }
}

double Tensor::at(std::initializer_list<int64_t> idx) const {
  check(int64_t(idx.size()) == dim(), "internal: Tensor::at rank mismatch");
  int64_t off = 0, d = 0;
  for (auto i : idx) off += i * strides_[d++];
  return load_as_double(static_cast<const uint8_t*>(data_) + off * dtype_size(dtype_), dtype_);
}

double Tensor::flat(int64_t i) const {
  int64_t off = 0;
  for (int64_t d = dim() - 1; d >= 0; --d) {
    off += (i % shape_[d]) * strides_[d];
    i /= shape_[d];
  }
  return load_as_double(static_cast<const uint8_t*>(data_) + off * dtype_size(dtype_), dtype_);
}

Tensor Tensor::reshape(Shape shape) const {
  int64_t infer = -1, known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) infer = int64_t(i);
    else known *= shape[i];
  }
  if (infer >= 0 && known > 0) shape[infer] = numel() / known;
  check(shape_numel(shape) == numel(), "internal: reshape " + shape_str(shape_) + " to " + shape_str(shape));
  check(is_contiguous(), "internal: reshape of a non-contiguous tensor");
  return view_of(owner_, data_, dtype_, std::move(shape));
}

Tensor Tensor::transpose(int64_t a, int64_t b) const {
  Tensor t = *this;
  std::swap(t.shape_.at(a), t.shape_.at(b));
  std::swap(t.strides_.at(a), t.strides_.at(b));
  return t;
}

Tensor Tensor::narrow(int64_t d, int64_t start, int64_t len) const {
  check(start >= 0 && len >= 0 && start + len <= size(d), "internal: narrow out of range");
  Tensor t = *this;
  t.shape_[d] = len;
  t.data_ = static_cast<uint8_t*>(data_) + start * strides_[d] * dtype_size(dtype_);
  return t;
}

Tensor Tensor::to(DType dt) const {
  Tensor out = zeros(dt, shape_);
  int64_t n = numel();
  if (dt == dtype_ && is_contiguous()) {
    std::memcpy(out.data_, data_, nbytes());
  } else if (dt == DType::F32 && dtype_ == DType::BF16 && is_contiguous()) {
    auto* src = static_cast<const uint16_t*>(data_);
    float* dst = out.data<float>();
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
  } else {
    size_t es = dtype_size(dt);
    for (int64_t i = 0; i < n; ++i)
      store_from_double(static_cast<uint8_t*>(out.data_) + i * es, dt, flat(i));
  }
  return out;
}

Tensor Tensor::contiguous() const { return is_contiguous() ? *this : to(dtype_); }
Tensor Tensor::clone() const { return to(dtype_); }

}  // namespace hla
