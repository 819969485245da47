#include "text/unicode.h"

#include <algorithm>
#include <memory>
#include <vector>

namespace hla::text {

namespace {

struct CategoryRun { uint32_t first; uint8_t cat; };
struct Range { uint32_t lo, hi; };
struct CombiningClass { uint32_t cp; uint8_t rank; };
struct Decomposition { uint32_t cp; uint16_t offset; uint8_t length; };
struct Composition { uint32_t first, second, composite; };

#include "text/unicode_data.inc"

constexpr char32_t kMaxCp = 0x110000;
constexpr char32_t kReplacement = 0xFFFD;

// Hangul syllables compose and decompose by arithmetic (Unicode §3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
              kSCount = kLCount * kNCount;

// Flat per-code-point tables, expanded once from the compact generated ones: a lookup is one load.
struct Tables {
  std::vector<uint8_t> cat = std::vector<uint8_t>(kMaxCp);
  std::vector<uint8_t> ccc = std::vector<uint8_t>(kMaxCp);
  // Code points NFC may change or combine with what precedes them; text without any is NFC.
  std::vector<bool> nfc_maybe = std::vector<bool>(kMaxCp);
  std::vector<bool> space = std::vector<bool>(kMaxCp);

  Tables() {
    const size_t nruns = std::size(kCategoryRuns);
    for (size_t r = 0; r < nruns; ++r) {
      const uint32_t end = r + 1 < nruns ? kCategoryRuns[r + 1].first : kMaxCp;
      std::fill(cat.begin() + kCategoryRuns[r].first, cat.begin() + end, kCategoryRuns[r].cat);
    }
    for (const auto& r : kSpaceRanges)
      for (uint32_t c = r.lo; c <= r.hi; ++c) space[c] = true;
    for (const auto& c : kCombiningClasses) ccc[c.cp] = c.rank, nfc_maybe[c.cp] = true;
    for (const auto& d : kDecompositions) nfc_maybe[d.cp] = true;
    for (const auto& c : kCompositions) nfc_maybe[c.second] = true;
    for (char32_t c = kVBase; c < kVBase + kVCount; ++c) nfc_maybe[c] = true;
    for (char32_t c = kTBase + 1; c < kTBase + kTCount; ++c) nfc_maybe[c] = true;
  }
};

const Tables& tables() {
  static const auto* t = new Tables();  // never freed: used until exit, also from static objects
  return *t;
}

void decompose(char32_t c, std::vector<char32_t>& out) {
  if (c >= kSBase && c < kSBase + kSCount) {
    const int s = c - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const auto* end = std::end(kDecompositions);
  const auto* d = std::lower_bound(std::begin(kDecompositions), end, c,
                                   [](const Decomposition& x, char32_t v) { return x.cp < v; });
  if (d == end || d->cp != c) {
    out.push_back(c);
    return;
  }
  out.insert(out.end(), kDecompositionData + d->offset, kDecompositionData + d->offset + d->length);
}

// The primary composite of (a, b), or 0.
char32_t compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto* end = std::end(kCompositions);
  const auto* it = std::lower_bound(std::begin(kCompositions), end, std::pair{a, b},
                                    [](const Composition& x, std::pair<char32_t, char32_t> v) {
                                      return x.first != v.first ? x.first < v.first : x.second < v.second;
                                    });
  return it != end && it->first == a && it->second == b ? it->composite : 0;
}

}  // namespace

Category category(char32_t c) { return c < kMaxCp ? Category(tables().cat[c]) : Cn; }

bool is_js_space(char32_t c) { return c < kMaxCp && tables().space[c]; }

uint32_t category_mask(std::string_view name) {
  static const std::pair<std::string_view, uint32_t> kGroups[] = {
      {"L", kLetter}, {"Letter", kLetter}, {"M", kMark}, {"Mark", kMark}, {"N", kNumber},
      {"Number", kNumber}, {"P", kPunct}, {"Punctuation", kPunct}, {"S", kSymbol},
      {"Symbol", kSymbol}, {"Z", kSeparator}, {"Separator", kSeparator}, {"C", kOther},
      {"Other", kOther}, {"LC", cat_bit(Lu) | cat_bit(Ll) | cat_bit(Lt)}};
  static const std::string_view kNames[] = {"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me",
                                            "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi",
                                            "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl",
                                            "Zp", "Cc", "Cf", "Cs", "Co", "Cn"};
  if (name.starts_with("gc=")) name.remove_prefix(3);
  else if (name.starts_with("General_Category=")) name.remove_prefix(17);
  for (const auto& [n, m] : kGroups)
    if (n == name) return m;
  for (int i = 0; i < kNumCategories; ++i)
    if (kNames[i] == name) return 1u << i;
  return 0;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += char(c);
  } else if (c < 0x800) {
    out += char(0xC0 | (c >> 6));
    out += char(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += char(0xE0 | (c >> 12));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  } else {
    out += char(0xF0 | (c >> 18));
    out += char(0x80 | ((c >> 12) & 0x3F));
    out += char(0x80 | ((c >> 6) & 0x3F));
    out += char(0x80 | (c & 0x3F));
  }
}

namespace {

// The shape of a UTF-8 sequence from its lead byte: how many continuation bytes follow and the
// bounds of the first one (which excludes overlong forms, surrogates and values past U+10FFFF).
struct Lead { int need; unsigned char lo, hi; };
Lead lead_of(unsigned char b) {
  if (b >= 0xC2 && b <= 0xDF) return {1, 0x80, 0xBF};
  if (b == 0xE0) return {2, 0xA0, 0xBF};
  if (b == 0xED) return {2, 0x80, 0x9F};
  if (b >= 0xE1 && b <= 0xEF) return {2, 0x80, 0xBF};
  if (b == 0xF0) return {3, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {3, 0x80, 0xBF};
  if (b == 0xF4) return {3, 0x80, 0x8F};
  return {-1, 0, 0};
}

// Bytes of the sequence at s[i] that are valid so far (1 for a bad lead), and whether it is whole.
std::pair<size_t, bool> scan_sequence(std::string_view s, size_t i, bool allow_surrogates = false) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return {1, true};
  Lead l = lead_of(b);
  if (allow_surrogates && b == 0xED) l.hi = 0xBF;
  if (l.need < 0) return {1, false};
  size_t j = i + 1;
  for (int k = 0; k < l.need; ++k, ++j) {
    if (j >= s.size()) return {j - i, false};
    const auto c = static_cast<unsigned char>(s[j]);
    if (c < (k == 0 ? l.lo : 0x80) || c > (k == 0 ? l.hi : 0xBF)) return {j - i, false};
  }
  return {j - i, true};
}

}  // namespace

size_t invalid_utf8_at(std::string_view s, bool allow_surrogates) {
  for (size_t i = 0; i < s.size();) {
    const auto [n, whole] = scan_sequence(s, i, allow_surrogates);
    if (!whole) return i;
    i += n;
  }
  return std::string_view::npos;
}

size_t complete_utf8_prefix(std::string_view s) {
  // Only the last sequence can be unfinished, and it starts at most 3 bytes from the end.
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const size_t i = s.size() - back;
    const auto b = static_cast<unsigned char>(s[i]);
    if ((b & 0xC0) == 0x80) continue;  // a continuation byte: the lead is further back
    const auto [n, whole] = scan_sequence(s, i);
    return !whole && i + n == s.size() && lead_of(b).need >= 0 ? i : s.size();
  }
  return s.size();
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto [n, whole] = scan_sequence(s, i);
    if (whole) out.append(s.substr(i, n));
    else append_utf8(out, kReplacement);
    i += n;
  }
  return out;
}

std::string nfc(std::string_view s) {
  const Tables& t = tables();
  bool plain = true;
  for (size_t i = 0; i < s.size() && plain;) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    plain = !t.nfc_maybe[decode_utf8(s, i)];
  }
  if (plain) return std::string(s);

  std::vector<char32_t> d;
  d.reserve(s.size());
  for (size_t i = 0; i < s.size();) decompose(decode_utf8(s, i), d);
  // Canonical order: each run of non-starters sorted stably by combining class.
  for (size_t i = 0; i < d.size(); ++i) {
    if (!t.ccc[d[i]]) continue;
    size_t j = i;
    while (j < d.size() && t.ccc[d[j]]) ++j;
    std::stable_sort(d.begin() + i, d.begin() + j,
                     [&](char32_t a, char32_t b) { return t.ccc[a] < t.ccc[b]; });
    i = j;
  }
  // Canonical composition: a mark joins the last starter unless something between blocks it.
  std::vector<char32_t> out;
  out.reserve(d.size());
  size_t starter = SIZE_MAX;
  int last_class = -1;  // class of the last character kept after the starter; -1: none yet
  for (char32_t c : d) {
    const int cc = t.ccc[c];
    if (starter != SIZE_MAX && (last_class == -1 || last_class < cc)) {
      if (char32_t comp = compose(out[starter], c)) {
        out[starter] = comp;
        continue;
      }
    }
    if (cc == 0) starter = out.size(), last_class = -1;
    else last_class = cc;
    out.push_back(c);
  }
  std::string r;
  r.reserve(s.size());
  for (char32_t c : out) append_utf8(r, c);
  return r;
}

}  // namespace hla::text
