// libFuzzer target: any text given as tokenizer.json must either load (and then encode and decode
// a fixed mix of scripts without failing) or raise hla::Error. Never a crash or a hang.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (j.is_discarded()) return 0;  // not JSON: the loader's own JSON error, covered elsewhere
  try {
    hla::Tokenizer tok(j, nlohmann::json::object(), "fuzz/tokenizer.json");
    const auto ids = tok.encode("Hello, world! 你好 123  \n\t émoji 🙂 <|endoftext|>");
    (void)tok.decode(ids);
  } catch (const hla::Error&) {
  }
  return 0;
}
