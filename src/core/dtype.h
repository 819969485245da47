// Element types that checkpoints and dumps use, with exact conversions to and from f32.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace hla {

enum class DType { F64, F32, F16, BF16, I64, I32, I8, U8, BOOL };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);            // safetensors spelling: "F32", "BF16", ...
bool dtype_from_name(const std::string& name, DType* out);
bool dtype_is_float(DType dt);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

}  // namespace hla
