// Tensor: a typed, strided view over memory that it may share (an mmap'd checkpoint, a heap
// buffer). Compute in hla is done on contiguous f32 tensors; other dtypes are storage formats
// converted with to_f32()/to() at the edges (loading, dumping).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace hla {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 37, 320]"
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // A new zero-filled contiguous tensor.
  static Tensor zeros(DType dt, Shape shape);
  static Tensor f32(Shape shape) { return zeros(DType::F32, std::move(shape)); }
  // A view over memory kept alive by `owner` (strides in elements; empty = contiguous).
  static Tensor view_of(std::shared_ptr<const void> owner, void* data, DType dt, Shape shape,
                        Shape strides = {});

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t dim() const { return int64_t(shape_.size()); }
  int64_t size(int64_t d) const { return shape_.at(d < 0 ? d + dim() : d); }
  int64_t numel() const { return shape_numel(shape_); }
  bool defined() const { return data_ != nullptr || numel() == 0; }
  bool is_contiguous() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void* raw() const { return data_; }
  template <class T>
  T* data() const { return static_cast<T*>(data_); }
  float* f32() const;  // checks dtype F32 and contiguity

  // Element access through strides, converting to double (slow; for tests and small tensors).
  double at(std::initializer_list<int64_t> idx) const;
  double flat(int64_t i) const;  // i-th element in row-major order

  Tensor reshape(Shape shape) const;             // contiguous tensors only; shares memory
  Tensor transpose(int64_t a, int64_t b) const;  // a strided view
  Tensor narrow(int64_t d, int64_t start, int64_t len) const;
  Tensor contiguous() const;                     // copy if needed
  Tensor to(DType dt) const;                     // contiguous copy in dtype dt
  Tensor to_f32() const { return to(DType::F32); }
  Tensor clone() const;

 private:
  std::shared_ptr<const void> owner_;
  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Shape shape_, strides_;
};

}  // namespace hla
