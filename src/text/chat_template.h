// A Jinja interpreter for chat templates (tokenizer_config.json's chat_template), matching the
// rendering of @huggingface/jinja, the engine transformers.js uses: for/if/elif/else/set (with
// namespace() and block sets), macros, filters (trim, length, tojson, join, default, ...),
// tests (defined, none, string, ...), string methods (startswith, split, strip, ...),
// loop.index0/first/last/..., `in`, `~`, slices, ternaries, raise_exception. Whitespace control
// follows the engine: trim_blocks and lstrip_blocks on, `-` strips on either side.
#pragma once
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>

namespace hla::text {

class ChatTemplate {
 public:
  // Parses the template; `name` prefixes every error ("<name>: ...").
  ChatTemplate(std::string_view source, std::string name);
  ~ChatTemplate();
  // Renders with the given top-level variables (a JSON object: messages, add_generation_prompt,
  // bos_token, tools, ...). Errors, raise_exception() included, are one hla::Error line.
  std::string render(const nlohmann::ordered_json& vars) const;

  struct Node;

 private:
  std::string name_;
  std::unique_ptr<Node> root_;
};

}  // namespace hla::text
