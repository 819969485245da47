// hla::Tokenizer — a Hugging Face tokenizer.json (byte-level BPE, as Qwen3, DeepSeek-V3 and most
// current LMs ship) with its tokenizer_config.json: encode, decode, streaming decode, special
// tokens and the chat template.
//
// Encoding follows the fast tokenizers: added tokens are found in the raw text first (leftmost,
// longest; honouring lstrip/rstrip/single_word; `normalized` ones after normalization), the rest
// is normalized (NFC), split by the pre-tokenizer's regexes, mapped to byte-level symbols and
// merged by BPE rank. Regex and whitespace semantics are those of the conformance peer
// (transformers.js on Node), see regex.h. Every bad file or field is one hla::Error naming it.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace hla {

namespace text {
class Regex;
class ChatTemplate;
}

class Tokenizer {
 public:
  // Reads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.
  static std::unique_ptr<Tokenizer> load(const std::string& dir);
  // The same from parsed files; `source` names them in errors.
  Tokenizer(const nlohmann::json& tokenizer, const nlohmann::json& config, const std::string& source);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of UTF-8 text; added/special tokens written in the text become their ids. Nothing
  // is prepended: callers that want the BOS add bos_id() when add_bos() says so (this is what
  // transformers.js's encode() gives for these tokenizers). Lone surrogates in generalized UTF-8
  // (what a JSON "\ud800" escape means to JavaScript) split as such and encode as U+FFFD, as
  // the peer's TextEncoder does. Safe to call from several threads.
  std::vector<int32_t> encode(std::string_view text) const;
  // Text of ids; bytes that do not form UTF-8 become U+FFFD. Out-of-range ids are an error.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // Decodes a growing sequence id by id and returns only text whose UTF-8 is complete, so a
  // character split across tokens appears once its last byte has come. The concatenation of all
  // push() results and finish() equals decode() of all ids.
  class StreamDecoder {
   public:
    explicit StreamDecoder(const Tokenizer& tok, bool skip_special_tokens = false)
        : tok_(tok), skip_special_(skip_special_tokens) {}
    std::string push(int32_t id);
    // Whatever is held back (an incomplete character at the end becomes U+FFFD).
    std::string finish();

   private:
    const Tokenizer& tok_;
    bool skip_special_;
    std::string pending_;
  };

  // Renders tokenizer_config.json's chat_template over messages ([{role, content}, ...]).
  // `extra` adds template variables (tools, enable_thinking, ...). Throws hla::Error when the
  // tokenizer has no template or the template fails (raise_exception included).
  // Objects keep their key order (ordered_json), which `tojson` in templates shows.
  std::string apply_chat_template(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                  const nlohmann::ordered_json* extra = nullptr) const;
  bool has_chat_template() const { return chat_template_ != nullptr; }

  int32_t vocab_size() const { return int32_t(token_bytes_.size()); }
  // The id of a token written as in tokenizer.json (byte-level form for vocab entries, the
  // content for added tokens).
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The bytes a token stands for.
  const std::string& token_bytes(int32_t id) const;
  bool is_special(int32_t id) const;

  // Special tokens named by tokenizer_config.json (absent when it names none).
  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  std::optional<int32_t> pad_id() const { return pad_id_; }
  // tokenizer_config.json's add_bos_token: whether prompts should start with bos_id().
  bool add_bos() const { return add_bos_; }

 private:
  struct AddedToken {
    int32_t id;
    std::string content;
    bool special, lstrip, rstrip, normalized, single_word;
  };
  // A byte trie of added-token contents, for leftmost-longest matching.
  struct Trie {
    struct Node {
      std::vector<std::pair<unsigned char, int32_t>> next;
      int32_t token = -1;  // index into added_ of a token ending here
    };
    std::vector<Node> nodes{Node{}};
    bool first_byte[256] = {};
    void insert(const std::string& s, int32_t token);
    bool empty() const { return nodes.size() == 1; }
  };
  struct Split {
    std::unique_ptr<text::Regex> regex;
    bool invert, remove;
  };
  struct PreStep {  // one step of the pre-tokenizer sequence
    enum { SplitStep, PrefixSpace } kind;
    Split split;
  };
  struct Pieces;

  // Appends the ids of `s`: added tokens first, then the text between them. `normalized` says
  // whether s has been through the normalizer (and so is searched for the normalized tokens).
  void encode_section(std::string_view s, bool normalized, std::vector<int32_t>& out) const;
  void encode_plain(std::string_view s, std::vector<int32_t>& out) const;
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void split_pieces(const Split& split, Pieces& p) const;
  std::string normalize(std::string_view s) const;

  std::string source_;
  std::vector<std::string> token_bytes_;  // by id
  std::vector<uint8_t> special_;          // by id
  std::unordered_map<std::string, int32_t> token_ids_;  // token as written in tokenizer.json
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (left, right) -> (rank, id)
  std::unordered_map<std::string, int32_t> byte_vocab_;  // ignore_merges: word bytes -> id
  int32_t byte_ids_[256];
  bool ignore_merges_ = false;
  bool nfc_ = false;
  std::vector<PreStep> pre_;
  std::vector<AddedToken> added_;
  Trie raw_trie_, normalized_trie_;
  std::optional<int32_t> bos_id_, eos_id_, pad_id_;
  bool add_bos_ = false;
  bool clean_up_spaces_ = false;
  std::unique_ptr<text::ChatTemplate> chat_template_;
  std::unique_ptr<nlohmann::ordered_json> template_vars_;  // bos_token, eos_token, ... for the template

  // Word -> ids: most words repeat, so BPE runs once per distinct word. Looked up by
  // string_view (a transparent hash), so a hit allocates nothing.
  struct WordHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, WordHash, std::equal_to<>> cache_;
};

}  // namespace hla
