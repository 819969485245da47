// TextModel: a model directory as people use it — the Model, its tokenizer (when the directory has
// a tokenizer.json), and the ids that end a generation. Shared by `hla generate --prompt`,
// `hla chat` and `hla serve`.
#pragma once
#include <algorithm>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "model/model.h"
#include "text/tokenizer.h"

namespace hla {

struct TextModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the directory has no tokenizer.json
  std::vector<int64_t> stop_ids;         // config/generation_config EOS ids and the tokenizer's eos

  const Tokenizer& need_tokenizer() const;  // hla::Error when there is none
  // A text prompt: BOS first when tokenizer_config.json asks for it, then the text's ids.
  std::vector<int64_t> encode_prompt(std::string_view text) const;
  // The chat template over [{role, content}, ...] with the generation prompt, as ids.
  std::vector<int64_t> encode_chat(const nlohmann::ordered_json& messages) const;
};

TextModel load_text_model(const std::string& dir);

// Text of generated ids as they come (whole UTF-8 characters only), special tokens skipped. The
// stop ids are no text (a byte-level model may stop at "\n"), nor are ids past the tokenizer's
// vocabulary: checkpoints pad vocab_size beyond it (Qwen3: 151936 rows for 151669 tokens) and a
// sampler may still pick one.
class Detokenizer {
 public:
  explicit Detokenizer(const Tokenizer& tok, std::vector<int64_t> stop_ids = {})
      : tok_(tok), stop_(std::move(stop_ids)), stream_(tok, true) {}
  std::string push(int64_t id) {
    const bool text = id < tok_.vocab_size() && std::find(stop_.begin(), stop_.end(), id) == stop_.end();
    return text ? stream_.push(int32_t(id)) : std::string();
  }
  std::string finish() { return stream_.finish(); }

 private:
  const Tokenizer& tok_;
  std::vector<int64_t> stop_;
  Tokenizer::StreamDecoder stream_;
};

}  // namespace hla
