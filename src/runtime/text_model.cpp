#include "runtime/text_model.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"

namespace hla {

namespace fs = std::filesystem;

TextModel load_text_model(const std::string& dir) {
  TextModel tm;
  tm.model = Model::load(dir);
  tm.stop_ids = tm.model->spec().eos_token_ids;
  if (fs::exists(fs::path(dir) / "tokenizer.json")) {
    tm.tokenizer = Tokenizer::load(dir);
    check(tm.tokenizer->vocab_size() <= tm.model->spec().vocab,
          (fs::path(dir) / "tokenizer.json").string() + ": " + std::to_string(tm.tokenizer->vocab_size()) +
              " tokens, more than the model's vocab_size " + std::to_string(tm.model->spec().vocab));
    if (auto eos = tm.tokenizer->eos_id();
        eos && std::find(tm.stop_ids.begin(), tm.stop_ids.end(), *eos) == tm.stop_ids.end())
      tm.stop_ids.push_back(*eos);
  }
  return tm;
}

const Tokenizer& TextModel::need_tokenizer() const {
  check(tokenizer != nullptr, "this model directory has no tokenizer.json: give token ids instead of text");
  return *tokenizer;
}

std::vector<int64_t> TextModel::encode_prompt(std::string_view text) const {
  const Tokenizer& tok = need_tokenizer();
  std::vector<int64_t> ids;
  if (tok.add_bos() && tok.bos_id()) ids.push_back(*tok.bos_id());
  for (int32_t id : tok.encode(text)) ids.push_back(id);
  return ids;
}

std::vector<int64_t> TextModel::encode_chat(const nlohmann::ordered_json& messages) const {
  const Tokenizer& tok = need_tokenizer();
  // The template writes the special tokens (BOS included) as text; encode() parses them back.
  const std::string prompt = tok.apply_chat_template(messages, true);
  std::vector<int64_t> ids;
  for (int32_t id : tok.encode(prompt)) ids.push_back(id);
  return ids;
}

}  // namespace hla
