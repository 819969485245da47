// ModelSpec: one architecture-neutral description of a model, parsed from a Hugging Face
// config.json. Everything downstream (layers, cache, `hla info`, `hla init`) reads the spec, never
// the JSON, so each architecture's config quirks live in spec.cpp only.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace hla {

enum class Arch { Qwen3Next, Qwen3_5, KimiLinear, DeepseekV32, HlaHybrid };
// hla_hybrid adds Lightning (decay-only linear attention, MiniMax), SlidingAttention and
// SparseAttention (GatedAttention restricted to a window / to the keys a DSA indexer picks).
enum class MixerKind {
  GatedDeltaNet, KimiDeltaAttention, GatedAttention, MLA, SparseMLA, Lightning, SlidingAttention, SparseAttention
};
enum class FfnKind { Dense, MoE };
enum class Router { Softmax, Sigmoid };  // Qwen: softmax over all experts; Kimi/DeepSeek: sigmoid + bias

const char* mixer_name(MixerKind k);
bool mixer_is_linear(MixerKind k);

struct RopeSpec {
  double theta = 10000.0;
  int64_t rot = 0;  // rotated dims per head
  // yarn (DeepSeek-V3.2): inv_freq blending and the attention-scale correction
  bool yarn = false;
  double factor = 1.0, mscale = 1.0, mscale_all_dim = 0.0, beta_fast = 32.0, beta_slow = 1.0;
  int64_t original_max_pos = 4096;
  bool truncate = true;
};

struct ModelSpec {
  std::string model_type;
  Arch arch{};
  std::string weight_prefix = "model.";  // where the text model's tensors live in the checkpoint
  int64_t vocab = 0, hidden = 0, n_layers = 0;
  float norm_eps = 1e-6f;
  bool zero_centered_norm = false;  // Qwen: x·(1+w); Kimi/DeepSeek: x·w
  bool tie_embeddings = false;
  std::vector<MixerKind> mixers;
  std::vector<FfnKind> ffns;
  int64_t intermediate = 0;
  // delta-rule layers (GDN: nk key heads, nv value heads; KDA: nk = nv)
  int64_t lin_nk = 0, lin_nv = 0, lin_dk = 0, lin_dv = 0, conv_kernel = 0;
  // beta = beta_max·sigmoid(b). hla_hybrid's `linear_allow_neg_eigval` makes it 2: the transition
  // I − beta·k·kᵀ then has eigenvalues in [−1, 1], which parity and other state tracking need
  // (Grazzi et al., arXiv 2411.12537); the released architectures use 1.
  float beta_max = 1.0f;
  // softmax attention
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  RopeSpec rope;
  // MLA
  int64_t q_lora_rank = 0, kv_lora_rank = 0, qk_nope = 0, qk_rope = 0, v_head = 0;
  // DeepSeek lightning indexer
  int64_t index_heads = 0, index_dim = 0, index_topk = 0;
  // hla_hybrid sliding-window attention: each query sees itself and the window-1 keys before it
  int64_t sliding_window = 0;
  // hla_hybrid: attention layers (full, sliding, sparse) pass q, k, v through a depthwise causal conv
  // of this kernel + SiLU, as GDN passes its [q|k|v] (H3 and Based put such a short conv in front of
  // every mixer): a key then carries the tokens before it, so recall need not wait for a learned
  // previous-token head. 0: none (plain attention).
  int64_t attn_conv_kernel = 0;
  int64_t attn_conv_channels() const { return (n_heads + 2 * n_kv_heads) * head_dim; }  // [q|k|v]
  // MoE
  int64_t n_experts = 0, top_k = 0, moe_intermediate = 0, shared_intermediate = 0;
  int64_t n_group = 1, topk_group = 1;
  bool norm_topk = true, shared_gate = false;
  double routed_scale = 1.0;
  Router router = Router::Softmax;
  std::vector<int64_t> eos_token_ids;  // generation stops after any of these (generation_config.json wins)

  float mla_scale() const;
  // Bytes the cache holds per token of context (attention layers) and per sequence (linear layers),
  // at the f32 the CPU engine stores.
  int64_t kv_bytes_per_token() const;
  int64_t state_bytes_per_sequence() const;  // (dn+dr)^-0.5, times yarn's mscale²
};

// Reads DIR/config.json (Qwen3.5 vision-language configs: the `text_config` inside). Errors name
// the file and field; unknown architectures are refused.
ModelSpec parse_model_spec(const Config& cfg);
ModelSpec load_model_spec(const std::string& model_dir);

}  // namespace hla
