#include "model/spec.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/error.h"

namespace hla {

const char* mixer_name(MixerKind k) {
  switch (k) {
    case MixerKind::GatedDeltaNet: return "gated_deltanet";
    case MixerKind::KimiDeltaAttention: return "kda";
    case MixerKind::GatedAttention: return "full_attention";
    case MixerKind::MLA: return "mla";
    case MixerKind::SparseMLA: return "sparse_mla";
    case MixerKind::Lightning: return "lightning";
    case MixerKind::SlidingAttention: return "sliding_attention";
    case MixerKind::SparseAttention: return "sparse_attention";
  }
  return "?";
}

bool mixer_is_linear(MixerKind k) {
  return k == MixerKind::GatedDeltaNet || k == MixerKind::KimiDeltaAttention || k == MixerKind::Lightning;
}

static double yarn_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

float ModelSpec::mla_scale() const {
  double s = 1.0 / std::sqrt(double(qk_nope + qk_rope));
  if (rope.yarn && rope.mscale_all_dim != 0) {
    const double m = yarn_mscale(rope.factor, rope.mscale_all_dim);
    s *= m * m;
  }
  return float(s);
}

int64_t ModelSpec::kv_bytes_per_token() const {
  const ModelSpec& s = *this;
  int64_t floats = 0;
  for (auto k : s.mixers) {
    if (k == MixerKind::GatedAttention || k == MixerKind::SparseAttention)  // sliding layers: a constant window
      floats += 2 * s.n_kv_heads * s.head_dim;
    if (k == MixerKind::SparseAttention) floats += s.index_dim;
    if (k == MixerKind::MLA || k == MixerKind::SparseMLA) floats += s.n_heads * (s.qk_nope + s.qk_rope + s.v_head);
    if (k == MixerKind::SparseMLA) floats += s.index_dim;
  }
  return floats * int64_t(sizeof(float));
}

int64_t ModelSpec::state_bytes_per_sequence() const {
  const ModelSpec& s = *this;
  int64_t floats = 0;
  for (auto k : s.mixers)
    if (k == MixerKind::Lightning) {
      floats += s.lin_nv * s.lin_dk * s.lin_dk;
    } else if (mixer_is_linear(k)) {
      const int64_t conv_dim = k == MixerKind::GatedDeltaNet ? 2 * s.lin_nk * s.lin_dk + s.lin_nv * s.lin_dv
                                                              : 3 * s.lin_nv * s.lin_dk;
      floats += s.lin_nv * s.lin_dk * s.lin_dv + conv_dim * (s.conv_kernel - 1);
    } else if (k == MixerKind::GatedAttention || k == MixerKind::SlidingAttention || k == MixerKind::SparseAttention) {
      floats += s.attn_conv_channels() * std::max<int64_t>(s.attn_conv_kernel - 1, 0);  // the conv's last inputs
      if (k == MixerKind::SlidingAttention) floats += (s.sliding_window - 1) * 2 * s.n_kv_heads * s.head_dim;
    }
  return floats * int64_t(sizeof(float));
}

namespace {

// rope_parameters (transformers 5) or rope_theta/rope_scaling at top level (transformers 4).
RopeSpec parse_rope(const Config& c, int64_t head_dim, double default_prf) {
  RopeSpec r;
  Config rp = c.has("rope_parameters") ? c.sub("rope_parameters")
              : c.has("rope_scaling")  ? c.sub("rope_scaling")
                                       : Config();
  r.theta = rp.has("rope_theta") ? rp.get_double("rope_theta") : c.get_double("rope_theta", 10000.0);
  const double prf = rp.has("partial_rotary_factor") ? rp.get_double("partial_rotary_factor")
                                                     : c.get_double("partial_rotary_factor", default_prf);
  r.rot = int64_t(double(head_dim) * prf);
  const std::string type = rp.get_string("rope_type", rp.get_string("type", "default"));
  if (type == "yarn") {
    r.yarn = true;
    r.factor = rp.get_double("factor");
    r.mscale = rp.get_double("mscale", 1.0);
    r.mscale_all_dim = rp.get_double("mscale_all_dim", 0.0);
    r.beta_fast = rp.get_double("beta_fast", 32.0);
    r.beta_slow = rp.get_double("beta_slow", 1.0);
    r.original_max_pos = rp.get_int("original_max_position_embeddings", c.get_int("max_position_embeddings", 4096));
    r.truncate = rp.get_bool("truncate", true);
  } else {
    check(type == "default" || type == "mrope",  // M-RoPE reduces to plain RoPE for text
          c.field_error("rope_parameters.rope_type", "'" + type + "' is not supported (default, mrope, yarn)"));
  }
  return r;
}

int64_t positive(const Config& c, const std::string& key) {
  const int64_t v = c.get_int(key);
  check(v > 0, c.field_error(key, "must be positive"));
  return v;
}
int64_t positive(const Config& c, const std::string& key, int64_t dflt) {
  const int64_t v = c.get_int(key, dflt);
  check(v > 0, c.field_error(key, "must be positive"));
  return v;
}

// eos_token_id: absent, null, one id or a list of ids.
std::vector<int64_t> eos_ids(const Config& c) {
  if (!c.has("eos_token_id")) return {};
  if (c.raw()["eos_token_id"].is_array()) return c.get_int_list("eos_token_id");
  return {c.get_int("eos_token_id")};
}

void parse_common(const Config& c, ModelSpec& s) {
  s.vocab = positive(c, "vocab_size");
  s.hidden = positive(c, "hidden_size");
  s.n_layers = positive(c, "num_hidden_layers");
  check(s.n_layers <= 4096, c.field_error("num_hidden_layers", "is implausibly large"));
  s.norm_eps = float(c.get_double("rms_norm_eps", 1e-6));
  s.tie_embeddings = c.get_bool("tie_word_embeddings", false);
  s.intermediate = c.get_int("intermediate_size", 0);
  const std::string act = c.get_string("hidden_act", "silu");
  check(act == "silu", c.field_error("hidden_act", "'" + act + "' is not supported (silu)"));
  s.eos_token_ids = eos_ids(c);
}

// Explicit layer_types, with the legacy names transformers maps.
bool parse_layer_types(const Config& c, ModelSpec& s, MixerKind linear, MixerKind full) {
  if (!c.has("layer_types")) return false;
  auto types = c.get_string_list("layer_types");
  check(int64_t(types.size()) == s.n_layers,
        c.field_error("layer_types", "has " + std::to_string(types.size()) + " entries for " +
                                         std::to_string(s.n_layers) + " layers"));
  for (auto& t : types) {
    if (t == "linear_attention" || t == "mamba" || t == "conv") s.mixers.push_back(linear);
    else if (t == "full_attention" || t == "attention") s.mixers.push_back(full);
    else throw Error(c.field_error("layer_types", "has unknown layer type '" + t + "'"));
  }
  return true;
}

void parse_qwen(const Config& c, ModelSpec& s) {
  s.zero_centered_norm = true;
  if (!parse_layer_types(c, s, MixerKind::GatedDeltaNet, MixerKind::GatedAttention)) {
    const int64_t interval = positive(c, "full_attention_interval", 4);
    for (int64_t i = 0; i < s.n_layers; ++i)
      s.mixers.push_back((i + 1) % interval == 0 ? MixerKind::GatedAttention : MixerKind::GatedDeltaNet);
  }
  s.n_heads = positive(c, "num_attention_heads");
  s.n_kv_heads = positive(c, "num_key_value_heads", s.n_heads);
  check(s.n_heads % s.n_kv_heads == 0, c.field_error("num_key_value_heads", "must divide num_attention_heads"));
  s.head_dim = positive(c, "head_dim", s.hidden / s.n_heads);
  s.rope = parse_rope(c, s.head_dim, 0.25);
  check(s.rope.rot % 2 == 0 && s.rope.rot <= s.head_dim,
        c.field_error("partial_rotary_factor", "gives an odd or too large rotary dim"));
  s.lin_nk = positive(c, "linear_num_key_heads");
  s.lin_nv = positive(c, "linear_num_value_heads");
  check(s.lin_nv % s.lin_nk == 0, c.field_error("linear_num_value_heads", "must be a multiple of linear_num_key_heads"));
  s.lin_dk = positive(c, "linear_key_head_dim");
  s.lin_dv = positive(c, "linear_value_head_dim");
  s.conv_kernel = positive(c, "linear_conv_kernel_dim", 4);
  if (s.arch == Arch::Qwen3_5) {
    s.ffns.assign(size_t(s.n_layers), FfnKind::Dense);
  } else {
    s.n_experts = c.get_int("num_experts", 0);
    std::vector<int64_t> mlp_only = c.has("mlp_only_layers") ? c.get_int_list("mlp_only_layers") : std::vector<int64_t>{};
    const int64_t step = positive(c, "decoder_sparse_step", 1);
    for (int64_t i = 0; i < s.n_layers; ++i) {
      const bool only = std::find(mlp_only.begin(), mlp_only.end(), i) != mlp_only.end();
      s.ffns.push_back(!only && s.n_experts > 0 && (i + 1) % step == 0 ? FfnKind::MoE : FfnKind::Dense);
    }
    if (s.n_experts > 0) {
      s.top_k = positive(c, "num_experts_per_tok");
      s.moe_intermediate = positive(c, "moe_intermediate_size");
      s.shared_intermediate = c.get_int("shared_expert_intermediate_size", 0);
      s.norm_topk = c.get_bool("norm_topk_prob", true);
      s.router = Router::Softmax;
      s.shared_gate = true;
    }
  }
}

// MLA fields shared by Kimi-Linear and DeepSeek-V3.2 (the config's qk_head_dim is stale: computed).
void parse_mla(const Config& c, ModelSpec& s) {
  s.n_heads = positive(c, "num_attention_heads");
  s.n_kv_heads = s.n_heads;
  s.q_lora_rank = c.get_int("q_lora_rank", 0);
  s.kv_lora_rank = positive(c, "kv_lora_rank");
  s.qk_nope = positive(c, "qk_nope_head_dim");
  s.qk_rope = c.get_int("qk_rope_head_dim", 0);
  s.v_head = positive(c, "v_head_dim");
}

void parse_sigmoid_moe(const Config& c, ModelSpec& s, const char* n_experts, const char* top_k,
                       const char* n_group, const char* renorm, const char* n_shared) {
  s.router = Router::Sigmoid;
  s.n_experts = positive(c, n_experts);
  s.top_k = positive(c, top_k);
  check(s.top_k <= s.n_experts, c.field_error(top_k, "exceeds the number of experts"));
  s.moe_intermediate = positive(c, "moe_intermediate_size");
  s.n_group = positive(c, n_group, 1);
  s.topk_group = positive(c, "topk_group", 1);
  check(s.n_experts % s.n_group == 0 && s.topk_group <= s.n_group,
        c.field_error(n_group, "must divide the experts, with topk_group <= groups"));
  s.norm_topk = c.get_bool(renorm, true);
  s.routed_scale = c.get_double("routed_scaling_factor", 1.0);
  s.shared_intermediate = s.moe_intermediate * c.get_int(n_shared, 0);
}

std::vector<FfnKind> parse_mlp_layer_types(const Config& c, const ModelSpec& s, int64_t first_dense) {
  std::vector<FfnKind> f;
  if (c.has("mlp_layer_types")) {
    auto t = c.get_string_list("mlp_layer_types");
    check(int64_t(t.size()) == s.n_layers, c.field_error("mlp_layer_types", "length differs from num_hidden_layers"));
    for (auto& x : t) {
      check(x == "dense" || x == "sparse", c.field_error("mlp_layer_types", "has unknown entry '" + x + "'"));
      f.push_back(x == "dense" ? FfnKind::Dense : FfnKind::MoE);
    }
  } else {
    for (int64_t i = 0; i < s.n_layers; ++i) f.push_back(i < first_dense ? FfnKind::Dense : FfnKind::MoE);
  }
  return f;
}

void parse_kimi(const Config& c, ModelSpec& s) {
  Config lin = c.has("linear_attn_config") ? c.sub("linear_attn_config") : Config();
  s.lin_nk = s.lin_nv = lin.has("num_heads") ? positive(lin, "num_heads") : positive(c, "linear_num_heads");
  s.lin_dk = s.lin_dv = lin.has("head_dim") ? positive(lin, "head_dim") : positive(c, "linear_head_dim");
  s.conv_kernel = lin.has("short_conv_kernel_size") ? positive(lin, "short_conv_kernel_size")
                                                     : positive(c, "linear_conv_kernel_dim", 4);
  if (!parse_layer_types(c, s, MixerKind::KimiDeltaAttention, MixerKind::MLA)) {
    s.mixers.assign(size_t(s.n_layers), MixerKind::KimiDeltaAttention);
    if (lin.has("full_attn_layers")) {  // 1-indexed
      for (int64_t l : lin.get_int_list("full_attn_layers")) {
        check(l >= 1 && l <= s.n_layers, lin.field_error("full_attn_layers", "has layer " + std::to_string(l) + " out of range (1-indexed)"));
        s.mixers[size_t(l - 1)] = MixerKind::MLA;
      }
    } else {
      for (int64_t i = 0; i < s.n_layers; ++i)
        if (i > 0 && i % 4 == 0) s.mixers[size_t(i)] = MixerKind::MLA;
    }
  }
  parse_mla(c, s);
  s.ffns = parse_mlp_layer_types(c, s, c.get_int("first_k_dense_replace", 1));
  if (std::count(s.ffns.begin(), s.ffns.end(), FfnKind::MoE))
    parse_sigmoid_moe(c, s, "num_experts", c.has("num_experts_per_token") ? "num_experts_per_token" : "num_experts_per_tok",
                      c.has("num_expert_group") ? "num_expert_group" : "n_group",
                      c.has("moe_renormalize") ? "moe_renormalize" : "norm_topk_prob",
                      c.has("num_shared_experts") ? "num_shared_experts" : "n_shared_experts");
}

void parse_deepseek(const Config& c, ModelSpec& s) {
  if (c.has("layer_types")) {
    for (auto& t : c.get_string_list("layer_types"))
      check(t == "deepseek_sparse_attention", c.field_error("layer_types", "has unsupported type '" + t + "'"));
  }
  s.mixers.assign(size_t(s.n_layers), MixerKind::SparseMLA);
  parse_mla(c, s);
  check(s.q_lora_rank > 0, c.field_error("q_lora_rank", "must be set: the indexer reads the q_a output"));
  check(s.qk_rope > 0 && s.qk_rope % 2 == 0, c.field_error("qk_rope_head_dim", "must be positive and even"));
  s.rope = parse_rope(c, s.qk_rope, 1.0);
  s.rope.rot = s.qk_rope;
  s.index_heads = positive(c, "index_n_heads");
  s.index_dim = positive(c, "index_head_dim");
  s.index_topk = positive(c, "index_topk");
  check(s.index_dim >= s.qk_rope, c.field_error("index_head_dim", "must be >= qk_rope_head_dim"));
  s.ffns = parse_mlp_layer_types(c, s, std::min(c.get_int("first_k_dense_replace", 3), s.n_layers));
  if (std::count(s.ffns.begin(), s.ffns.end(), FfnKind::MoE))
    parse_sigmoid_moe(c, s, c.has("n_routed_experts") ? "n_routed_experts" : c.has("num_local_experts") ? "num_local_experts" : "num_experts",
                      "num_experts_per_tok", "n_group", "norm_topk_prob", "n_shared_experts");
}

// hla_hybrid: the layer kinds come from `layer_pattern` (one letter per layer, repeated to fill
// num_hidden_layers) or `layer_types` (one name per layer):
//   K kda   G gdn   L lightning   A attention   W sliding_attention   S sparse_attention
// Each kind's fields are required only when a layer of that kind is present.
void parse_hybrid(const Config& c, ModelSpec& s) {
  s.zero_centered_norm = true;
  static const std::vector<std::pair<std::string, MixerKind>> kinds = {
      {"kda", MixerKind::KimiDeltaAttention},  {"gdn", MixerKind::GatedDeltaNet},
      {"lightning", MixerKind::Lightning},     {"attention", MixerKind::GatedAttention},
      {"sliding_attention", MixerKind::SlidingAttention}, {"sparse_attention", MixerKind::SparseAttention}};
  static const std::string letters = "KGLAWS";  // same order as `kinds`
  if (c.has("layer_types")) {
    auto types = c.get_string_list("layer_types");
    check(int64_t(types.size()) == s.n_layers, c.field_error("layer_types", "has " + std::to_string(types.size()) +
                                                                                " entries for " + std::to_string(s.n_layers) + " layers"));
    for (auto& t : types) {
      auto it = std::find_if(kinds.begin(), kinds.end(), [&](auto& k) { return k.first == t; });
      check(it != kinds.end(), c.field_error("layer_types", "has unknown layer type '" + t +
                                                                "' (kda, gdn, lightning, attention, sliding_attention, sparse_attention)"));
      s.mixers.push_back(it->second);
    }
  } else {
    const std::string pat = c.get_string("layer_pattern");
    check(!pat.empty(), c.field_error("layer_pattern", "is empty"));
    for (int64_t i = 0; i < s.n_layers; ++i) {
      const size_t at = letters.find(pat[size_t(i) % pat.size()]);
      check(at != std::string::npos, c.field_error("layer_pattern", "has letter '" + std::string(1, pat[size_t(i) % pat.size()]) +
                                                                        "' (K kda, G gdn, L lightning, A attention, W sliding, S sparse)"));
      s.mixers.push_back(kinds[at].second);
    }
  }
  auto any = [&](std::initializer_list<MixerKind> ks) {
    for (auto k : s.mixers)
      if (std::find(ks.begin(), ks.end(), k) != ks.end()) return true;
    return false;
  };
  if (any({MixerKind::GatedAttention, MixerKind::SlidingAttention, MixerKind::SparseAttention})) {
    s.n_heads = positive(c, "num_attention_heads");
    s.n_kv_heads = positive(c, "num_key_value_heads", s.n_heads);
    check(s.n_heads % s.n_kv_heads == 0, c.field_error("num_key_value_heads", "must divide num_attention_heads"));
    s.head_dim = positive(c, "head_dim", s.hidden / s.n_heads);
    s.rope = parse_rope(c, s.head_dim, 1.0);
    check(s.rope.rot % 2 == 0 && s.rope.rot <= s.head_dim && !s.rope.yarn,
          c.field_error("partial_rotary_factor", "gives an odd or too large rotary dim (yarn is not supported here)"));
  }
  if (any({MixerKind::SlidingAttention})) s.sliding_window = positive(c, "sliding_window");
  s.attn_conv_kernel = c.get_int("attention_conv_kernel_dim", 0);
  check(s.attn_conv_kernel >= 0, c.field_error("attention_conv_kernel_dim", "must be 0 (none) or positive"));
  if (any({MixerKind::SparseAttention})) {
    s.index_heads = positive(c, "index_n_heads");
    s.index_dim = positive(c, "index_head_dim");
    s.index_topk = positive(c, "index_topk");
  }
  if (any({MixerKind::KimiDeltaAttention, MixerKind::GatedDeltaNet, MixerKind::Lightning})) {
    s.lin_nv = positive(c, "linear_num_value_heads");
    s.lin_nk = positive(c, "linear_num_key_heads", s.lin_nv);
    s.lin_dk = positive(c, "linear_key_head_dim");
    s.lin_dv = positive(c, "linear_value_head_dim", s.lin_dk);
    s.conv_kernel = positive(c, "linear_conv_kernel_dim", 4);
    s.beta_max = c.get_bool("linear_allow_neg_eigval", false) ? 2.0f : 1.0f;
    check(s.lin_nv % s.lin_nk == 0, c.field_error("linear_num_value_heads", "must be a multiple of linear_num_key_heads"));
    // KDA and lightning use lin_nv heads with key and value dims lin_dk (square state).
    check(!any({MixerKind::KimiDeltaAttention, MixerKind::Lightning}) || (s.lin_nk == s.lin_nv && s.lin_dk == s.lin_dv),
          c.field_error("linear_value_head_dim", "must equal linear_key_head_dim (and value heads = key heads) for kda/lightning layers"));
  }
  check(c.get_int("num_experts", 0) == 0, c.field_error("num_experts", "must be 0: hla_hybrid has dense SwiGLU MLPs only"));
  s.intermediate = positive(c, "intermediate_size");
  s.ffns.assign(size_t(s.n_layers), FfnKind::Dense);
}

}  // namespace

ModelSpec parse_model_spec(const Config& root) {
  ModelSpec s;
  Config c = root;
  std::string mt = root.get_string("model_type");
  if (mt == "qwen3_5" && root.has("text_config")) {  // released vision-language checkpoints
    c = root.sub("text_config");
    mt = c.get_string("model_type", "qwen3_5_text");
    s.weight_prefix = "model.language_model.";
  }
  s.model_type = mt;
  if (mt == "qwen3_next") s.arch = Arch::Qwen3Next;
  else if (mt == "qwen3_5_text" || mt == "qwen3_5") s.arch = Arch::Qwen3_5;
  else if (mt == "kimi_linear") s.arch = Arch::KimiLinear;
  else if (mt == "deepseek_v32") s.arch = Arch::DeepseekV32;
  else if (mt == "hla_hybrid") s.arch = Arch::HlaHybrid;
  else
    throw Error(root.field_error("model_type", "'" + mt +
                                                   "' is not a supported architecture (qwen3_next, qwen3_5, kimi_linear, deepseek_v32, hla_hybrid)"));
  parse_common(c, s);
  // Vision-language configs may say tie_word_embeddings only at the top level.
  if (!c.has("tie_word_embeddings")) s.tie_embeddings = root.get_bool("tie_word_embeddings", false);
  if (s.eos_token_ids.empty()) s.eos_token_ids = eos_ids(root);
  switch (s.arch) {
    case Arch::Qwen3Next:
    case Arch::Qwen3_5: parse_qwen(c, s); break;
    case Arch::KimiLinear: parse_kimi(c, s); break;
    case Arch::DeepseekV32: parse_deepseek(c, s); break;
    case Arch::HlaHybrid: parse_hybrid(c, s); break;
  }
  return s;
}

ModelSpec load_model_spec(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  check(std::filesystem::exists(path), path + ": not found (a model directory needs config.json)");
  ModelSpec s = parse_model_spec(Config::load(path));
  const std::string gen = (std::filesystem::path(dir) / "generation_config.json").string();
  if (std::filesystem::exists(gen)) {
    std::vector<int64_t> ids = eos_ids(Config::load(gen));
    if (!ids.empty()) s.eos_token_ids = ids;
  }
  return s;
}

}  // namespace hla
