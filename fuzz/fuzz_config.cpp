// libFuzzer target: any text given as config.json must either yield a ModelSpec or raise hla::Error.
#include <cstdint>
#include <string>

#include "core/config.h"
#include "core/error.h"
#include "model/spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto cfg = hla::Config::parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json");
    auto spec = hla::parse_model_spec(cfg);
    (void)spec.kv_bytes_per_token();
    (void)spec.state_bytes_per_sequence();
  } catch (const hla::Error&) {
  }
  return 0;
}
