#include "core/dtype.h"

#include <cmath>

namespace hla {

namespace {
struct DTypeInfo {
  DType dt;
  const char* name;
  size_t size;
  bool is_float;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8, true}, {DType::F32, "F32", 4, true},  {DType::F16, "F16", 2, true},
    {DType::BF16, "BF16", 2, true}, {DType::I64, "I64", 8, false}, {DType::I32, "I32", 4, false},
    {DType::I8, "I8", 1, false},  {DType::U8, "U8", 1, false},   {DType::BOOL, "BOOL", 1, false},
};
const DTypeInfo& info(DType dt) { return kDTypes[int(dt)]; }
}  // namespace

size_t dtype_size(DType dt) { return info(dt).size; }
const char* dtype_name(DType dt) { return info(dt).name; }
bool dtype_is_float(DType dt) { return info(dt).is_float; }

bool dtype_from_name(const std::string& name, DType* out) {
  for (const auto& d : kDTypes)
    if (name == d.name) {
      *out = d.dt;
      return true;
    }
  return false;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      float f = std::ldexp(float(mant), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00);
  if (a < 6.103515625e-05f) {  // subnormal half: round to multiple of 2^-24
    return uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t au = u & 0x7fffffffu;
  au += 0xfffu + ((au >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return uint16_t(sign | (((au >> 23) - 112) << 10) | ((au >> 13) & 0x3ff));
}

}  // namespace hla
