// Unicode for the tokenizer: UTF-8, general categories, JavaScript's whitespace and NFC.
// The tables (unicode_data.inc) come from the Unicode database of the tokenizer peer's runtime
// (Node), see gen_unicode_data.mjs; they do not depend on the machine hla runs on.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace hla::text {

// General categories, in the order of the generated tables.
enum Category : uint8_t {
  Lu, Ll, Lt, Lm, Lo, Mn, Mc, Me, Nd, Nl, No, Pc, Pd, Ps, Pe, Pi, Pf, Po,
  Sm, Sc, Sk, So, Zs, Zl, Zp, Cc, Cf, Cs, Co, Cn, kNumCategories
};

// Bit masks of categories, e.g. kLetter for \p{L}.
constexpr uint32_t cat_bit(Category c) { return 1u << c; }
constexpr uint32_t kLetter = cat_bit(Lu) | cat_bit(Ll) | cat_bit(Lt) | cat_bit(Lm) | cat_bit(Lo);
constexpr uint32_t kMark = cat_bit(Mn) | cat_bit(Mc) | cat_bit(Me);
constexpr uint32_t kNumber = cat_bit(Nd) | cat_bit(Nl) | cat_bit(No);
constexpr uint32_t kPunct = cat_bit(Pc) | cat_bit(Pd) | cat_bit(Ps) | cat_bit(Pe) | cat_bit(Pi) |
                            cat_bit(Pf) | cat_bit(Po);
constexpr uint32_t kSymbol = cat_bit(Sm) | cat_bit(Sc) | cat_bit(Sk) | cat_bit(So);
constexpr uint32_t kSeparator = cat_bit(Zs) | cat_bit(Zl) | cat_bit(Zp);
constexpr uint32_t kOther = cat_bit(Cc) | cat_bit(Cf) | cat_bit(Cs) | cat_bit(Co) | cat_bit(Cn);

Category category(char32_t c);
// JavaScript's \s and String.prototype.trim's whitespace (not Unicode's White_Space: it has
// U+FEFF and lacks U+0085). The peers (transformers.js, @huggingface/jinja) use it.
bool is_js_space(char32_t c);

// Mask for a property name as written in \p{...}: "L", "Letter", "Lu", "N", "P", ...;
// 0 when unknown.
uint32_t category_mask(std::string_view name);

// UTF-8. decode_utf8 reads one code point at s[i] and advances i; the text must be valid.
inline char32_t decode_utf8(std::string_view s, size_t& i) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return ++i, b;
  const int n = b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : 1;
  char32_t c = b & (0x3F >> n);
  for (int k = 1; k <= n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n + 1;
  return c;
}
void append_utf8(std::string& out, char32_t c);
// Byte offset of the first invalid UTF-8 sequence, or npos when the text is valid. With
// allow_surrogates, lone UTF-16 surrogates written as 3-byte sequences (generalized UTF-8, as
// JavaScript strings can hold them) count as valid.
size_t invalid_utf8_at(std::string_view s, bool allow_surrogates = false);
// Length of the longest prefix of s that holds only complete, valid sequences or invalid bytes
// that no further byte could complete; the rest is a sequence that may still be completed.
size_t complete_utf8_prefix(std::string_view s);
// Bytes to text as a WHATWG TextDecoder (and Rust's from_utf8_lossy) does: each maximal invalid
// subsequence becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

// Unicode canonical composition (NFC).
std::string nfc(std::string_view utf8);

}  // namespace hla::text
