#include "model/model.h"

#include <cstdio>
#include <cstring>
#include <memory>

#include "backends/cpu/nn.h"
#include "core/error.h"

namespace hla {

Model::Model(ModelSpec spec, Params& p) : spec_(std::move(spec)) {
  const ModelSpec& s = spec_;
  const std::string pre = s.weight_prefix;
  const Init norm_init = s.zero_centered_norm ? Init::Zeros : Init::Ones;
  p.bind(pre + "embed_tokens.weight", {s.vocab, s.hidden}, &embed_, Init::Embed);
  norm_in_.resize(size_t(s.n_layers));
  norm_post_.resize(size_t(s.n_layers));
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const std::string lp = pre + "layers." + std::to_string(l) + ".";
    p.bind(lp + "input_layernorm.weight", {s.hidden}, &norm_in_[size_t(l)], norm_init);
    p.bind(lp + "post_attention_layernorm.weight", {s.hidden}, &norm_post_[size_t(l)], norm_init);
    mixers_.push_back(make_mixer(s, l, p));
    ffns_.push_back(make_ffn(s, l, p));
  }
  p.bind(pre + "norm.weight", {s.hidden}, &final_norm_, norm_init);
  // Tied embeddings: a checkpoint may still carry lm_head.weight; use it when present.
  if (!s.tie_embeddings || (p.loading() && p.has("lm_head.weight")))
    p.bind("lm_head.weight", {s.vocab, s.hidden}, &lm_head_);
  else
    lm_head_ = embed_;
  num_params_ = p.num_params();
}

std::unique_ptr<Model> Model::load(const std::string& dir) {
  ModelSpec spec = load_model_spec(dir);
  Checkpoint ckpt(dir);
  Params p(&ckpt);
  // Large checkpoints (>= 1 GiB) report their progress on stderr, in quarters.
  size_t total = 0;
  for (const auto& name : ckpt.names()) total += ckpt.get(name).nbytes();
  if (total >= (size_t(1) << 30)) {
    auto shown = std::make_shared<int>(0);
    p.on_progress([total, shown, dir](size_t done) {
      const int quarter = int(4 * done / total);
      if (quarter <= *shown) return;
      *shown = quarter;
      std::fprintf(stderr, "hla: loading %s: %d%% of %.2f GB\n", dir.c_str(), 25 * quarter, double(total) / 1e9);
    });
  }
  return std::unique_ptr<Model>(new Model(std::move(spec), p));
}

std::unique_ptr<Model> Model::random(const ModelSpec& spec, uint64_t seed, std::map<std::string, Tensor>* created) {
  Params p(seed);
  auto m = std::unique_ptr<Model>(new Model(spec, p));
  if (created) *created = p.created();
  return m;
}

int64_t Model::count_params(const ModelSpec& spec, const Checkpoint* ckpt) {
  Params p = ckpt ? Params(ckpt, false) : Params();
  return Model(spec, p).num_params();
}

SequenceCache Model::new_cache() const {
  SequenceCache c;
  c.layers.resize(size_t(spec_.n_layers));
  for (int64_t l = 0; l < spec_.n_layers; ++l) mixers_[size_t(l)]->init_cache(c.layers[size_t(l)]);
  return c;
}

namespace {

void check_ids(const std::vector<int64_t>& ids, int64_t vocab) {
  for (int64_t id : ids)
    check(id >= 0 && id < vocab, "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                     std::to_string(vocab) + ")");
}

// The packed rows whose logits are wanted: every token's, or each sequence's last. Only these go
// through the final norm and the (large) LM head.
std::vector<int64_t> logit_rows(const std::vector<int64_t>& cu_seqlens, bool all_logits) {
  std::vector<int64_t> rows;
  for (size_t i = 0; i + 1 < cu_seqlens.size(); ++i) {
    if (all_logits)
      for (int64_t t = cu_seqlens[i]; t < cu_seqlens[i + 1]; ++t) rows.push_back(t);
    else if (cu_seqlens[i + 1] > cu_seqlens[i])
      rows.push_back(cu_seqlens[i + 1] - 1);
  }
  return rows;
}

}  // namespace

Tensor Model::forward(const std::vector<int64_t>& ids, const SeqBatch& b, bool all_logits) const {
  const ModelSpec& s = spec_;
  const int64_t T = b.tokens(), D = s.hidden;
  check(int64_t(ids.size()) == T, "internal: ids and cu_seqlens disagree");
  check(int64_t(b.cu_seqlens.size()) == b.num_seqs() + 1, "internal: cu_seqlens and caches disagree");
  check_ids(ids, s.vocab);
  std::vector<float> h(size_t(T * D)), x(size_t(T * D)), y(size_t(T * D));
  for (int64_t t = 0; t < T; ++t)
    std::memcpy(h.data() + t * D, embed_.f32() + ids[size_t(t)] * D, sizeof(float) * size_t(D));
  for (int64_t l = 0; l < s.n_layers; ++l) {
    cpu::rms_norm(h.data(), norm_in_[size_t(l)].f32(), x.data(), T, D, s.norm_eps, s.zero_centered_norm);
    mixers_[size_t(l)]->forward(x.data(), y.data(), b, l);
    for (int64_t i = 0; i < T * D; ++i) h[size_t(i)] += y[size_t(i)];
    cpu::rms_norm(h.data(), norm_post_[size_t(l)].f32(), x.data(), T, D, s.norm_eps, s.zero_centered_norm);
    ffns_[size_t(l)]->forward(x.data(), y.data(), T);
    for (int64_t i = 0; i < T * D; ++i) h[size_t(i)] += y[size_t(i)];
  }
  for (int64_t i = 0; i < b.num_seqs(); ++i) b.caches[size_t(i)]->length += b.len(i);
  const std::vector<int64_t> rows = logit_rows(b.cu_seqlens, all_logits);
  const int64_t R = int64_t(rows.size());
  for (int64_t r = 0; r < R; ++r)
    cpu::rms_norm(h.data() + rows[size_t(r)] * D, final_norm_.f32(), x.data() + r * D, 1, D, s.norm_eps,
                  s.zero_centered_norm);
  Tensor logits = Tensor::f32({R, s.vocab});
  cpu::linear(x.data(), lm_head_.f32(), logits.f32(), R, D, s.vocab);
  return logits;
}

void Model::bind_device(Device& dev) {
  dev_.embed = dev.upload_matrix(embed_);
  dev_.lm_head = lm_head_.raw() == embed_.raw() ? dev_.embed : dev.upload_matrix(lm_head_);
  dev_.norm_in.clear(), dev_.norm_post.clear();
  for (int64_t l = 0; l < spec_.n_layers; ++l) {
    dev_.norm_in.push_back(dev.upload_vector(norm_in_[size_t(l)]));
    dev_.norm_post.push_back(dev.upload_vector(norm_post_[size_t(l)]));
    mixers_[size_t(l)]->bind_device(dev);
    ffns_[size_t(l)]->bind_device(dev);
  }
  dev_.final_norm = dev.upload_vector(final_norm_);
  bound_ = &dev;
}

Tensor Model::forward(Device& dev, const std::vector<int64_t>& ids, DevBatch& b, bool all_logits) const {
  int64_t rows = 0;
  const float* logits_d = device_logits(dev, ids, b, all_logits, false, rows);
  Tensor logits = Tensor::f32({rows, spec_.vocab});
  dev.to_host(logits_d, logits.f32(), rows * spec_.vocab);
  return logits;
}

std::vector<int64_t> Model::forward_greedy(Device& dev, const std::vector<int64_t>& ids, DevBatch& b) const {
  int64_t rows = 0;
  const float* logits_d = device_logits(dev, ids, b, false, true, rows);
  int32_t* best_d = dev.scratch_i32(rows);
  dev.argmax_rows(logits_d, rows, spec_.vocab, best_d);
  std::vector<int32_t> best(static_cast<size_t>(rows));
  dev.to_host(best_d, best.data(), rows);
  return std::vector<int64_t>(best.begin(), best.end());
}

const float* Model::device_logits(Device& dev, const std::vector<int64_t>& ids, DevBatch& b, bool all_logits,
                                  bool greedy, int64_t& n_rows) const {
  const ModelSpec& s = spec_;
  check(bound_ == &dev, "internal: the model is not bound to device " + dev.name());
  const int64_t N = b.num_seqs(), T = b.tokens(), D = s.hidden;
  check(int64_t(ids.size()) == T && int64_t(b.cu_seqlens.size()) == N + 1 && int64_t(b.past.size()) == N,
        "internal: ids, cu_seqlens, slots and past disagree");
  check_ids(ids, s.vocab);
  for (int64_t i = 0; i < N; ++i)
    check(b.slots[size_t(i)] >= 0 && b.slots[size_t(i)] < dev.max_slots(), "internal: cache slot out of range");
  bool replayable = b.one_token_each();
  for (int64_t l = 0; l < s.n_layers; ++l)
    replayable = replayable && mixers_[size_t(l)]->replayable_decode() && ffns_[size_t(l)]->replayable_decode();
  // A decode step depends on the batch size only (and on what comes back: logits or greedy ids).
  dev.begin_forward(replayable ? 2 * N + (greedy ? 1 : 0) : -1);
  std::vector<int32_t> ids32(ids.begin(), ids.end()), cu(b.cu_seqlens.begin(), b.cu_seqlens.end()),
      slots(b.slots.begin(), b.slots.end()), pos(static_cast<size_t>(T));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t t = 0; t < b.len(i); ++t) pos[size_t(b.cu_seqlens[size_t(i)] + t)] = int32_t(b.past[size_t(i)] + t);
  b.d_cu = dev.upload_i32(cu), b.d_slots = dev.upload_i32(slots), b.d_pos = dev.upload_i32(pos);
  // The normalised residual stream x that each block reads: in the device's GEMM operand type where
  // it has one (each norm writes it once, no conversion pass per GEMM), and in fp32 where a layer
  // reads it otherwise or the device has no operand type (decode batches, the CPU device).
  void* x_op = dev.operand_rows(T, D);
  bool f32_rows = x_op == nullptr;
  for (int64_t l = 0; l < s.n_layers; ++l)
    f32_rows = f32_rows || mixers_[size_t(l)]->needs_f32_input() || ffns_[size_t(l)]->needs_f32_input();
  float* h = dev.scratch(T * D);
  float* x = f32_rows ? dev.scratch(T * D) : nullptr;
  const DevRows xr{x, D, x_op};
  dev.embed(dev_.embed, dev.upload_i32(ids32), h, T);
  const Device::Mark layer_scratch = dev.scratch_mark();
  // Each block adds its output to h in its last GEMM (no rows of its own that a pass adds back).
  for (int64_t l = 0; l < s.n_layers; ++l) {
    dev.residual_norm(h, dev_.norm_in[size_t(l)], x, x_op, T, D, s.norm_eps, s.zero_centered_norm);
    mixers_[size_t(l)]->forward_device(dev, xr, h, b, l);
    dev.residual_norm(h, dev_.norm_post[size_t(l)], x, x_op, T, D, s.norm_eps, s.zero_centered_norm);
    ffns_[size_t(l)]->forward_device(dev, xr, h, T);
    dev.scratch_release(layer_scratch);
  }
  const std::vector<int64_t> rows = logit_rows(b.cu_seqlens, all_logits);
  const int64_t R = int64_t(rows.size());
  float *picked = dev.scratch(R * D), *last = dev.scratch(R * D);
  dev.gather_rows(h, dev.upload_i32(std::vector<int32_t>(rows.begin(), rows.end())), picked, R, D);
  dev.rms_norm(picked, D, dev_.final_norm, last, D, R, D, s.norm_eps, s.zero_centered_norm);
  float* logits_d = dev.scratch(R * s.vocab);
  dev.linear(last, D, dev_.lm_head, logits_d, R);
  n_rows = R;
  return logits_d;
}

size_t SequenceCache::bytes() const {
  size_t n = 0;
  for (auto& l : layers) n += l.conv.size() + l.state.size() + l.k.size() + l.v.size() + l.index_k.size();
  return n * sizeof(float);
}

}  // namespace hla
