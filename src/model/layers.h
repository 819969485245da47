// The layers of the four architectures, on packed f32 activations x [T, D] (T = all tokens of a
// SeqBatch). Each layer binds its weights through Params (load or random init) in its constructor.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/cache.h"
#include "backends/device.h"
#include "model/params.h"
#include "model/spec.h"

namespace hla {

class Mixer {
 public:
  virtual ~Mixer() = default;
  // out [T, D] = mixer(x [T, D]); reads and advances caches[i]->layers[layer].
  virtual void forward(const float* x, float* out, const SeqBatch& b, int64_t layer) const = 0;
  virtual void init_cache(LayerCache& c) const = 0;
  // The same layer on a Device: bind_device() uploads the weights once; forward_device() adds the
  // mixer's output to the residual stream h [T, D] (its output projection writes there, with no
  // rows of its own in between), reading and advancing the cache slots of b.slots in dev. Layers
  // without a device form refuse both.
  virtual void bind_device(Device& dev);
  virtual void forward_device(Device& dev, const DevRows& x, float* h, const DevBatch& b, int64_t layer) const;
  // Does a one-token-per-sequence step read positions only on the device (the DevBatch arrays), so
  // the device may record it once and replay it (Device::begin_forward)?
  virtual bool replayable_decode() const { return false; }
  // Does forward_device read x.f32 (beyond linear_rows, swiglu_mlp and a delta mixer's projection,
  // which read the operand rows where given)? Only then does the model keep fp32 rows beside them.
  virtual bool needs_f32_input() const { return true; }
};

class Ffn {
 public:
  virtual ~Ffn() = default;
  virtual void forward(const float* x, float* out, int64_t T) const = 0;
  virtual void bind_device(Device& dev) = 0;
  virtual void forward_device(Device& dev, const DevRows& x, float* h, int64_t T) const = 0;  // h += ffn(x)
  virtual bool replayable_decode() const = 0;            // as Mixer's
  virtual bool needs_f32_input() const { return true; }  // as Mixer's
};

// The mixer and FFN of layer `layer`, with the checkpoint names of its architecture.
std::unique_ptr<Mixer> make_mixer(const ModelSpec& s, int64_t layer, Params& p);
std::unique_ptr<Ffn> make_ffn(const ModelSpec& s, int64_t layer, Params& p);

// Rows of several matrices (each [rows, cols], same cols) stacked into one, so a device runs one
// GEMM where the CPU form runs several: {tensor, first row, row count} per slice.
struct RowSlice {
  const Tensor* t;
  int64_t row0, rows;
};

// SwiGLU MLP down(silu(gate(x)) ⊙ up(x)), shared by dense layers, experts and shared experts.
struct SwiGLU {
  Tensor gate, up, down;  // [I, D], [I, D], [D, I]
  int64_t D = 0, I = 0;
  void bind(Params& p, const std::string& prefix, int64_t D, int64_t I, const char* gate_name = "gate_proj",
            const char* up_name = "up_proj", const char* down_name = "down_proj");
  void forward(const float* x, float* out, int64_t T) const;
  DevMatrix gate_up_d, down_d;  // gate and up rows interleaved [2I, D], and down, on the bound device
  std::vector<RowSlice> gate_up_rows() const;  // gate row i, then up row i, for i < I
  void bind_device(Device& dev);
  void forward_device(Device& dev, const DevRows& x, float* out, int64_t T, bool add) const;  // out = or += mlp(x)
};

Tensor stack_rows(const std::vector<RowSlice>& slices);
// A host vector as a 1-D f32 tensor (RoPE frequencies to upload).
Tensor vector_tensor(const std::vector<float>& v);

}  // namespace hla
