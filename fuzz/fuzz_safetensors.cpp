// libFuzzer target: any byte string given to the safetensors reader must either parse into tensors
// whose views lie inside the buffer, or raise hla::Error. Never a crash, a hang or an OOB read.
#include <cstdint>
#include <cstring>
#include <memory>

#include "core/error.h"
#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Copy into an exactly-sized heap buffer so ASan catches any read past the end.
  auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[size ? size : 1]);
  if (size) std::memcpy(buf.get(), data, size);
  try {
    auto f = hla::SafeTensorsFile::from_bytes(std::shared_ptr<const void>(buf, buf.get()), buf.get(), size, "fuzz");
    for (const auto& name : f.names()) {
      hla::Tensor t = f.get(name);
      if (t.numel() > 0 && t.numel() < (1 << 16)) (void)t.to_f32();  // touch every byte of small tensors
    }
  } catch (const hla::Error&) {
  }
  return 0;
}
