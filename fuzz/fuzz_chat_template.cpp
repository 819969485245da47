// libFuzzer target: any chat template source must either parse and render a fixed conversation or
// raise hla::Error (raise_exception included). Never a crash or a hang.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string_view>

#include "core/error.h"
#include "text/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const nlohmann::ordered_json vars = nlohmann::ordered_json::parse(R"({
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b>"},
                 {"role": "assistant", "content": "<think>x</think>Hello"}, {"role": "user", "content": "2+2?"}],
    "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>"})");
  try {
    hla::text::ChatTemplate t(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    (void)t.render(vars);
  } catch (const hla::Error&) {
  }
  return 0;
}
