#include "text/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "text/chat_template.h"
#include "text/regex.h"
#include "text/unicode.h"

namespace hla {

using json = nlohmann::json;
using text::decode_utf8;

namespace {

// GPT-2's byte-level alphabet: byte b is written as the code point kByteChar[b], printable
// bytes as themselves and the others moved to U+0100.. so that no token holds whitespace or
// control characters.
struct ByteAlphabet {
  char32_t byte_char[256];
  int16_t char_byte[324];  // code point -> byte, -1 when the code point is not in the alphabet
  ByteAlphabet() {
    std::fill(std::begin(char_byte), std::end(char_byte), int16_t(-1));
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      byte_char[b] = printable ? char32_t(b) : char32_t(256 + n++);
      char_byte[byte_char[b]] = int16_t(b);
    }
  }
};
const ByteAlphabet kBytes;

// The bytes a byte-level token stands for; nullopt when it has characters outside the alphabet.
std::optional<std::string> byte_level_decode(std::string_view token) {
  std::string out;
  for (size_t i = 0; i < token.size();) {
    const char32_t c = decode_utf8(token, i);
    if (c >= 324 || kBytes.char_byte[c] < 0) return std::nullopt;
    out += char(kBytes.char_byte[c]);
  }
  return out;
}

// The split of GPT-2's ByteLevel pre-tokenizer when its use_regex is on.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

json read_json(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  check(bool(f), p.string() + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw Error(p.string() + ": invalid JSON: " + e.what());
  }
}

// Typed field access that names the file and field in its error.
struct Fields {
  const std::string& file;
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw Error(file + ": " + path + ": " + what);
  }
  const json& get(const json& obj, const std::string& key, const std::string& path) const {
    if (!obj.is_object()) fail(path, "expected an object");
    auto it = obj.find(key);
    if (it == obj.end()) fail(path + "." + key, "missing");
    return *it;
  }
  bool flag(const json& obj, const std::string& key, const std::string& path, bool dflt) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return dflt;
    if (!it->is_boolean()) fail(path + "." + key, "expected true or false");
    return it->get<bool>();
  }
  std::string str(const json& v, const std::string& path) const {
    if (!v.is_string()) fail(path, "expected a string");
    return v.get<std::string>();
  }
};

size_t trim_end_js(std::string_view s) {  // length without trailing whitespace
  size_t end = s.size();
  while (end > 0) {
    size_t b = end - 1;
    while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
    size_t i = b;
    if (!text::is_js_space(decode_utf8(s, i))) break;
    end = b;
  }
  return end;
}

size_t skip_space_js(std::string_view s, size_t i) {  // first non-whitespace at or after i
  while (i < s.size()) {
    size_t j = i;
    if (!text::is_js_space(decode_utf8(s, j))) break;
    i = j;
  }
  return i;
}

bool is_word_char(char32_t c) {
  return c == '_' || ((text::kLetter | text::kNumber) >> text::category(c)) & 1;
}

}  // namespace

// Text being pre-tokenized: its code points and the pieces it has been split into so far.
struct Tokenizer::Pieces {
  std::string buf;
  std::vector<char32_t> cps;
  std::vector<uint32_t> off;  // byte offset of each code point, and of the end
  std::vector<std::pair<uint32_t, uint32_t>> ranges, next;  // [begin, end) in code points

  void set(std::string_view s) {
    buf.assign(s);
    cps.clear(), off.clear();
    for (size_t i = 0; i < buf.size();) off.push_back(uint32_t(i)), cps.push_back(decode_utf8(buf, i));
    off.push_back(uint32_t(buf.size()));
    ranges.assign(1, {0u, uint32_t(cps.size())});
  }
  std::string_view piece(std::pair<uint32_t, uint32_t> r) const {
    return std::string_view(buf).substr(off[r.first], off[r.second] - off[r.first]);
  }
};

void Tokenizer::Trie::insert(const std::string& s, int32_t token) {
  int32_t n = 0;
  for (unsigned char c : s) {
    auto& nx = nodes[n].next;
    auto it = std::find_if(nx.begin(), nx.end(), [c](auto& p) { return p.first == c; });
    if (it != nx.end()) {
      n = it->second;
    } else {
      nodes.push_back({});
      nodes[n].next.push_back({c, int32_t(nodes.size() - 1)});
      n = int32_t(nodes.size() - 1);
    }
  }
  nodes[n].token = token;
  first_byte[static_cast<unsigned char>(s[0])] = true;
}

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& dir) {
  const std::filesystem::path d(dir);
  const auto tok_path = d / "tokenizer.json", cfg_path = d / "tokenizer_config.json";
  check(std::filesystem::exists(tok_path), tok_path.string() + ": not found (the model has no tokenizer)");
  const json tok = read_json(tok_path);
  const json cfg = std::filesystem::exists(cfg_path) ? read_json(cfg_path) : json::object();
  return std::make_unique<Tokenizer>(tok, cfg, d.string());
}

Tokenizer::~Tokenizer() = default;

Tokenizer::Tokenizer(const json& tok, const json& cfg, const std::string& source) : source_(source) {
  const std::string tok_file = source + "/tokenizer.json", cfg_file = source + "/tokenizer_config.json";
  const Fields F{tok_file};
  check(tok.is_object(), tok_file + ": expected a JSON object");

  // Model: byte-level BPE.
  const json& model = F.get(tok, "model", "");
  const std::string type = model.contains("type") ? F.str(model["type"], "model.type") : "BPE";
  if (type != "BPE") F.fail("model.type", "'" + type + "' is not supported (only BPE)");
  if (F.flag(model, "byte_fallback", "model", false)) F.fail("model.byte_fallback", "not supported");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(k) && !model[k].is_null() && model[k] != "")
      F.fail(std::string("model.") + k, "not supported");
  ignore_merges_ = F.flag(model, "ignore_merges", "model", false);
  const json& vocab = F.get(model, "vocab", "model");
  if (!vocab.is_object()) F.fail("model.vocab", "expected an object of token: id");
  int32_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      F.fail("model.vocab[\"" + it.key() + "\"]", "expected a non-negative integer id");
    max_id = std::max(max_id, it.value().get<int32_t>());
  }
  const json& added = tok.contains("added_tokens") && !tok["added_tokens"].is_null() ? tok["added_tokens"] : json::array();
  if (!added.is_array()) F.fail("added_tokens", "expected an array");
  for (size_t i = 0; i < added.size(); ++i) {
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    const json& a = added[i];
    const json& id = F.get(a, "id", path);
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
      F.fail(path + ".id", "expected a non-negative integer");
    const std::string content = F.str(F.get(a, "content", path), path + ".content");
    if (content.empty()) F.fail(path + ".content", "is empty");
    if (text::invalid_utf8_at(content) != std::string_view::npos) F.fail(path + ".content", "is not valid UTF-8");
    added_.push_back({id.get<int32_t>(), content, F.flag(a, "special", path, false), F.flag(a, "lstrip", path, false),
                      F.flag(a, "rstrip", path, false), F.flag(a, "normalized", path, false),
                      F.flag(a, "single_word", path, false)});
    max_id = std::max(max_id, added_.back().id);
  }
  // Ids index dense tables (id -> bytes, special flag); real vocabularies are dense with a few holes.
  // A stray huge id would make those tables gigabytes, so sparse ids are an error, not an allocation.
  const size_t n_tokens = vocab.size() + added_.size();
  if (size_t(max_id) >= 16 * n_tokens + 4096)
    F.fail("model.vocab", "ids are too sparse: largest id " + std::to_string(max_id) + " for " +
                              std::to_string(n_tokens) + " tokens");
  token_bytes_.resize(size_t(max_id) + 1);
  special_.assign(size_t(max_id) + 1, 0);
  token_ids_.reserve(vocab.size() + added_.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = it.value().get<int32_t>();
    // Tokens outside the byte alphabet (a few vocabularies list their special tokens here too)
    // stand for their own UTF-8, as the fast tokenizers decode them.
    auto bytes = byte_level_decode(it.key());
    token_bytes_[id] = bytes ? *bytes : it.key();
    token_ids_[it.key()] = id;
    if (ignore_merges_ && bytes) byte_vocab_[*bytes] = id;
  }
  for (size_t i = 0; i < added_.size(); ++i) {
    const AddedToken& a = added_[i];
    token_bytes_[a.id] = a.content;
    special_[a.id] = a.special;
    token_ids_[a.content] = a.id;
    (a.normalized ? normalized_trie_ : raw_trie_).insert(a.content, int32_t(i));
  }
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    text::append_utf8(ch, kBytes.byte_char[b]);
    auto it = vocab.find(ch);
    if (it == vocab.end()) F.fail("model.vocab", "has no token for byte " + std::to_string(b) + " (not a byte-level BPE vocabulary)");
    byte_ids_[b] = it.value().get<int32_t>();
  }

  // Merges: ["a b", ...] (older files) or [["a", "b"], ...].
  const json& merges = F.get(model, "merges", "model");
  if (!merges.is_array()) F.fail("model.merges", "expected an array");
  merges_.reserve(merges.size() * 2);
  for (size_t r = 0; r < merges.size(); ++r) {
    const std::string path = "model.merges[" + std::to_string(r) + "]";
    const json& m = merges[r];
    std::string left, right;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        F.fail(path, "expected \"left right\"");
      left = s.substr(0, sp), right = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>(), right = m[1].get<std::string>();
    } else {
      F.fail(path, "expected \"left right\" or [\"left\", \"right\"]");
    }
    auto l = vocab.find(left), rr = vocab.find(right), lr = vocab.find(left + right);
    if (l == vocab.end() || rr == vocab.end() || lr == vocab.end())
      F.fail(path, "'" + left + "' + '" + right + "' uses or makes a token not in model.vocab");
    const uint64_t key = (uint64_t(l.value().get<uint32_t>()) << 32) | rr.value().get<uint32_t>();
    merges_.emplace(key, std::pair{int32_t(r), lr.value().get<int32_t>()});  // first rank wins
  }

  // Normalizer: NFC, possibly inside a Sequence.
  std::function<void(const json&, const std::string&)> add_normalizer = [&](const json& n, const std::string& path) {
    if (n.is_null()) return;
    const std::string t = F.str(F.get(n, "type", path), path + ".type");
    if (t == "NFC") {
      nfc_ = true;
    } else if (t == "Sequence") {
      const json& list = F.get(n, "normalizers", path);
      if (!list.is_array()) F.fail(path + ".normalizers", "expected an array");
      for (size_t i = 0; i < list.size(); ++i) add_normalizer(list[i], path + ".normalizers[" + std::to_string(i) + "]");
    } else {
      F.fail(path + ".type", "normalizer '" + t + "' is not supported");
    }
  };
  if (tok.contains("normalizer")) add_normalizer(tok["normalizer"], "normalizer");

  // Pre-tokenizer: Split and ByteLevel steps, possibly inside a Sequence.
  bool byte_level = false;
  std::function<void(const json&, const std::string&)> add_pre = [&](const json& p, const std::string& path) {
    if (p.is_null()) return;
    const std::string t = F.str(F.get(p, "type", path), path + ".type");
    if (t == "Sequence") {
      const json& list = F.get(p, "pretokenizers", path);
      if (!list.is_array()) F.fail(path + ".pretokenizers", "expected an array");
      for (size_t i = 0; i < list.size(); ++i) add_pre(list[i], path + ".pretokenizers[" + std::to_string(i) + "]");
    } else if (t == "Split") {
      const json& pat = F.get(p, "pattern", path);
      std::string re;
      if (pat.is_object() && pat.contains("Regex")) {
        re = F.str(pat["Regex"], path + ".pattern.Regex");
      } else if (pat.is_object() && pat.contains("String")) {
        for (char c : F.str(pat["String"], path + ".pattern.String")) {
          if (std::string_view("\\^$.|?*+()[]{}/-").find(c) != std::string_view::npos) re += '\\';
          re += c;
        }
      } else {
        F.fail(path + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
      }
      const std::string behavior = p.contains("behavior") ? F.str(p["behavior"], path + ".behavior") : "Isolated";
      if (behavior != "Isolated" && behavior != "Removed")
        F.fail(path + ".behavior", "'" + behavior + "' is not supported (Isolated, Removed)");
      PreStep s{PreStep::SplitStep, {nullptr, F.flag(p, "invert", path, false), behavior == "Removed"}};
      try {
        s.split.regex = std::make_unique<text::Regex>(re);
      } catch (const Error& e) {
        F.fail(path + ".pattern", e.what());
      }
      pre_.push_back(std::move(s));
    } else if (t == "ByteLevel") {
      // The prefix space goes in before the regex split (GPT-2's) when both are on.
      byte_level = true;
      if (F.flag(p, "add_prefix_space", path, true)) pre_.push_back({PreStep::PrefixSpace, {}});
      if (F.flag(p, "use_regex", path, true))
        pre_.push_back({PreStep::SplitStep, {std::make_unique<text::Regex>(kGpt2Pattern), false, false}});
    } else {
      F.fail(path + ".type", "pre-tokenizer '" + t + "' is not supported (Split, ByteLevel, Sequence)");
    }
  };
  if (tok.contains("pre_tokenizer")) add_pre(tok["pre_tokenizer"], "pre_tokenizer");
  if (!byte_level) F.fail("pre_tokenizer", "has no ByteLevel step (only byte-level BPE is supported)");
  if (tok.contains("decoder") && !tok["decoder"].is_null()) {
    const std::string t = F.str(F.get(tok["decoder"], "type", "decoder"), "decoder.type");
    if (t != "ByteLevel") F.fail("decoder.type", "'" + t + "' is not supported (ByteLevel)");
  }
  if (tok.contains("post_processor") && !tok["post_processor"].is_null()) {
    const std::string t = F.str(F.get(tok["post_processor"], "type", "post_processor"), "post_processor.type");
    if (t != "ByteLevel") F.fail("post_processor.type", "'" + t + "' is not supported (ByteLevel)");
  }

  // tokenizer_config.json: special tokens, BOS policy, decode clean-up, chat template.
  const Fields C{cfg_file};
  if (!cfg.is_object()) C.fail("", "expected a JSON object");
  template_vars_ = std::make_unique<nlohmann::ordered_json>(nlohmann::ordered_json::object());
  for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    auto it = cfg.find(key);
    if (it == cfg.end() || it->is_null()) continue;
    std::string content;
    if (it->is_string()) content = it->get<std::string>();
    else if (it->is_object() && it->contains("content")) content = C.str((*it)["content"], std::string(key) + ".content");
    else C.fail(key, "expected a string or an AddedToken object");
    if (content.empty()) continue;
    (*template_vars_)[key] = content;
    auto id = token_to_id(content);
    if (!id) C.fail(key, "'" + content + "' is not a token of tokenizer.json");
    if (std::string_view(key) == "bos_token") bos_id_ = id;
    if (std::string_view(key) == "eos_token") eos_id_ = id;
    if (std::string_view(key) == "pad_token") pad_id_ = id;
  }
  add_bos_ = C.flag(cfg, "add_bos_token", "", false) && bos_id_;
  // transformers.js cleans up by default; both real configs turn it off.
  clean_up_spaces_ = C.flag(cfg, "clean_up_tokenization_spaces", "", true);
  if (auto it = cfg.find("chat_template"); it != cfg.end() && !it->is_null()) {
    std::string tpl;
    if (it->is_string()) {
      tpl = it->get<std::string>();
    } else if (it->is_array()) {
      // Named templates: the "default" one serves plain chats.
      for (const auto& t : *it)
        if (t.is_object() && t.value("name", "") == "default" && t.contains("template")) tpl = C.str(t["template"], "chat_template[default].template");
      if (tpl.empty()) C.fail("chat_template", "has no template named \"default\"");
    } else {
      C.fail("chat_template", "expected a string or a list of {name, template}");
    }
    chat_template_ = std::make_unique<text::ChatTemplate>(tpl, cfg_file + ": chat_template");
  }
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  auto it = token_ids_.find(std::string(token));
  if (it == token_ids_.end()) return std::nullopt;
  return it->second;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  check(id >= 0 && id < vocab_size(), "token id " + std::to_string(id) + " is out of range (vocabulary of " +
                                          std::to_string(vocab_size()) + ")");
  return token_bytes_[id];
}

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < vocab_size() && special_[id]; }

std::string Tokenizer::normalize(std::string_view s) const {
  return nfc_ ? text::nfc(s) : std::string(s);
}

std::vector<int32_t> Tokenizer::encode(std::string_view s) const {
  if (size_t bad = text::invalid_utf8_at(s, /*allow_surrogates=*/true); bad != std::string_view::npos)
    throw Error("text to encode is not valid UTF-8 (at byte " + std::to_string(bad) + ")");
  std::vector<int32_t> out;
  out.reserve(s.size() / 3 + 4);
  encode_section(s, false, out);
  return out;
}

void Tokenizer::encode_section(std::string_view s, bool normalized, std::vector<int32_t>& out) const {
  const Trie& trie = normalized ? normalized_trie_ : raw_trie_;
  // Text between added tokens: normalized and then searched for the `normalized` added tokens,
  // or, when it has been already, pre-tokenized and merged.
  auto emit = [&](std::string_view plain) {
    if (plain.empty()) return;
    if (normalized) return encode_plain(plain, out);
    if (normalized_trie_.empty() && !nfc_) return encode_plain(plain, out);
    encode_section(normalize(plain), true, out);
  };
  if (trie.empty()) return emit(s);
  size_t start = 0;
  for (size_t i = 0; i < s.size();) {
    if (!trie.first_byte[static_cast<unsigned char>(s[i])]) {
      ++i;
      continue;
    }
    // Walk the trie; keep every token that ends on the way, the longest acceptable one wins.
    int32_t best = -1;
    size_t best_end = 0;
    int32_t n = 0;
    for (size_t j = i; j < s.size(); ++j) {
      const auto& nx = trie.nodes[n].next;
      const unsigned char c = static_cast<unsigned char>(s[j]);
      auto it = std::find_if(nx.begin(), nx.end(), [c](auto& p) { return p.first == c; });
      if (it == nx.end()) break;
      n = it->second;
      const int32_t t = trie.nodes[n].token;
      if (t < 0) continue;
      if (added_[t].single_word) {
        // Only as a whole word: no letter, digit or '_' right before or after it.
        size_t k = i > 0 ? i - 1 : 0;  // start of the character before the match
        while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
        size_t e = j + 1;
        const bool before = i > 0 && is_word_char(decode_utf8(s, k));
        const bool after = e < s.size() && is_word_char(decode_utf8(s, e));
        if (before || after) continue;
      }
      best = t, best_end = j + 1;
    }
    if (best < 0) {
      ++i;
      continue;
    }
    const AddedToken& a = added_[best];
    std::string_view plain = s.substr(start, i - start);
    if (a.lstrip) plain = plain.substr(0, trim_end_js(plain));
    emit(plain);
    out.push_back(a.id);
    i = a.rstrip ? skip_space_js(s, best_end) : best_end;
    start = i;
  }
  emit(s.substr(start));
}

void Tokenizer::split_pieces(const Split& split, Pieces& p) const {
  p.next.clear();
  const char32_t* cps = p.cps.data();
  for (auto [b, e] : p.ranges) {
    size_t pos = b, prev = b, mb, me;
    while (pos <= e && split.regex->find(cps, b, e, pos, mb, me)) {
      if (split.invert) {
        if (me > mb) p.next.push_back({uint32_t(mb), uint32_t(me)});
      } else {
        if (mb > prev) p.next.push_back({uint32_t(prev), uint32_t(mb)});
        if (me > mb && !split.remove) p.next.push_back({uint32_t(mb), uint32_t(me)});
      }
      prev = me;
      pos = me > mb ? me : mb + 1;  // an empty match moves on by one character
    }
    if (!split.invert && prev < e) p.next.push_back({uint32_t(prev), uint32_t(e)});
  }
  p.ranges.swap(p.next);
}

void Tokenizer::encode_plain(std::string_view s, std::vector<int32_t>& out) const {
  thread_local Pieces p;
  p.set(s);
  for (const PreStep& step : pre_) {
    if (step.kind == PreStep::SplitStep) {
      split_pieces(step.split, p);
      continue;
    }
    // ByteLevel's add_prefix_space: every piece that does not start with a space gets one.
    std::string rebuilt;
    std::vector<size_t> ends;
    for (auto r : p.ranges) {
      const std::string_view piece = p.piece(r);
      if (!piece.starts_with(' ')) rebuilt += ' ';
      rebuilt += piece;
      ends.push_back(rebuilt.size());
    }
    p.set(rebuilt);
    p.ranges.clear();
    uint32_t cp = 0;
    for (size_t e : ends) {
      const uint32_t first = cp;
      while (p.off[cp] < e) ++cp;
      p.ranges.push_back({first, cp});
    }
  }
  for (auto r : p.ranges) {
    if (r.second == r.first) continue;
    std::string_view word = p.piece(r);
    // A lone surrogate (ED A0..BF xx) becomes the bytes of U+FFFD before byte-level BPE.
    std::string fixed;
    for (size_t i = word.find('\xED'); i != std::string_view::npos; i = word.find('\xED', i + 1)) {
      if (static_cast<unsigned char>(word[i + 1]) < 0xA0) continue;
      if (fixed.empty()) fixed = word;
      fixed.replace(i, 3, "\xEF\xBF\xBD");
    }
    bpe(fixed.empty() ? word : std::string_view(fixed), out);
  }
}

void Tokenizer::bpe(std::string_view word, std::vector<int32_t>& out) const {
  constexpr size_t kMaxCachedWord = 256, kMaxCacheEntries = 1 << 18;
  const bool cacheable = word.size() < kMaxCachedWord;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t start = out.size();
  if (ignore_merges_) {
    if (auto it = byte_vocab_.find(std::string(word)); it != byte_vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // Merge the lowest-ranked adjacent pair, leftmost first, until no pair has a merge: symbols
  // in a linked list, candidate pairs in a heap ordered by (rank, position). A popped pair is
  // stale when either side has changed since it was pushed.
  struct Sym { int32_t id, prev, next; };
  struct Cand {
    int32_t rank, left, left_id, right_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  thread_local std::vector<Sym> sym;
  thread_local std::vector<Cand> heap;
  const int32_t n = int32_t(word.size());
  sym.resize(n);
  heap.clear();
  auto push_pair = [&](int32_t l) {
    const int32_t r = sym[l].next;
    auto it = merges_.find((uint64_t(uint32_t(sym[l].id)) << 32) | uint32_t(sym[r].id));
    if (it == merges_.end()) return;
    heap.push_back({it->second.first, l, sym[l].id, sym[r].id});
    std::push_heap(heap.begin(), heap.end(), std::greater<>());
  };
  for (int32_t i = 0; i < n; ++i)
    sym[i] = {byte_ids_[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1};
  for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const Cand c = heap.back();
    heap.pop_back();
    Sym& l = sym[c.left];
    if (l.id != c.left_id || l.next < 0 || sym[l.next].id != c.right_id) continue;
    const int32_t r = l.next;
    l.id = merges_.find((uint64_t(uint32_t(c.left_id)) << 32) | uint32_t(c.right_id))->second.second;
    l.next = sym[r].next;
    if (l.next >= 0) sym[l.next].prev = c.left;
    sym[r].id = -1;
    if (l.prev >= 0) push_pair(l.prev);
    if (l.next >= 0) push_pair(c.left);
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();  // bounded memory on endless input
    cache_.emplace(std::string(word), std::vector<int32_t>(out.begin() + start, out.end()));
  }
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) {
    const std::string& b = token_bytes(id);
    if (!(skip_special_tokens && special_[id])) bytes += b;
  }
  std::string s = text::utf8_lossy(bytes);
  if (!clean_up_spaces_) return s;
  // transformers' clean_up_tokenization: no space before punctuation and English contractions.
  static const std::pair<std::string_view, std::string_view> kRules[] = {
      {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
      {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (auto [from, to] : kRules) {
    std::string r;
    for (size_t i = 0;;) {
      const size_t j = s.find(from, i);
      r.append(s, i, j == std::string::npos ? std::string::npos : j - i);
      if (j == std::string::npos) break;
      r += to;
      i = j + from.size();
    }
    s.swap(r);
  }
  return s;
}

std::string Tokenizer::StreamDecoder::push(int32_t id) {
  const std::string& b = tok_.token_bytes(id);
  if (!(skip_special_ && tok_.special_[id])) pending_ += b;
  const size_t n = text::complete_utf8_prefix(pending_);
  std::string out = text::utf8_lossy(std::string_view(pending_).substr(0, n));
  pending_.erase(0, n);
  return out;
}

std::string Tokenizer::StreamDecoder::finish() {
  std::string out = text::utf8_lossy(pending_);
  pending_.clear();
  return out;
}

std::string Tokenizer::apply_chat_template(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                           const nlohmann::ordered_json* extra) const {
  check(chat_template_ != nullptr, source_ + "/tokenizer_config.json: no chat_template");
  check(messages.is_array(), "chat messages must be a JSON array of {role, content}");
  // The variables transformers.js passes: messages, the generation flag, tools and documents
  // (null unless given), the special tokens, then the caller's extras.
  nlohmann::ordered_json vars = {{"messages", messages}, {"add_generation_prompt", add_generation_prompt},
               {"tools", nullptr}, {"documents", nullptr}};
  for (auto& [k, v] : template_vars_->items()) vars[k] = v;
  if (extra) {
    check(extra->is_object(), "chat template variables must be a JSON object");
    for (auto& [k, v] : extra->items()) vars[k] = v;
  }
  return chat_template_->render(vars);
}

}  // namespace hla
