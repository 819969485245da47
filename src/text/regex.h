// A small backtracking regular-expression engine over Unicode code points, for the Split
// pre-tokenizers of tokenizer.json. It implements the syntax those patterns use, with the
// semantics of JavaScript's RegExp in its `u` mode (the tokenizer peer's): alternation,
// (?:...) and (?i:...) groups (case folding is ASCII-only), classes with ranges, \p{..} / \P{..}
// general categories, \s \S \d \D \w \W, greedy and lazy quantifiers (? * + {m,n}),
// lookahead (?=...) (?!...), '.', '^' and '$'. Alternatives are tried left to right and the first
// that matches wins (leftmost-first, as in Perl, Oniguruma and JavaScript).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace hla::text {

class Regex {
 public:
  // Throws hla::Error("regex error at character N: <what>") for syntax it does not know.
  explicit Regex(std::string_view pattern);

  // Leftmost match within s[begin, end) that starts at or after `from`; the text outside
  // [begin, end) is invisible (lookahead stops at end). Returns false when there is none.
  bool find(const char32_t* s, size_t begin, size_t end, size_t from, size_t& match_begin,
            size_t& match_end) const;

 private:
  struct ClassItem {
    enum Kind : uint8_t { Range, Categories, Space, Digit, Word } kind;
    bool negate;
    char32_t lo, hi;  // Range
    uint32_t mask;    // Categories
  };
  struct CharClass {
    bool negate = false;
    std::vector<ClassItem> items;
    uint64_t ascii[2] = {0, 0};  // the answer for code points < 128, precomputed
    bool matches(char32_t c) const;
    bool matches_slow(char32_t c) const;
  };
  enum Op : uint8_t { Char, Class, Any, Split, Jmp, Repeat, Lookahead, LineStart, LineEnd, Match };
  struct Inst {
    Op op;
    bool flag = false;   // Split: prefer y; Lookahead: negative
    uint32_t x = 0;      // Char: code point; Class/Repeat: class index; Split/Jmp: target
    uint32_t y = 0;      // Split: second target; Lookahead: end of the sub-program
    uint32_t min = 0, max = 0;  // Repeat (greedy)
  };
  struct Node;
  class Parser;

  void compile(const Node& n);
  uint32_t emit(Inst i);
  bool run(uint32_t pc, const char32_t* s, size_t begin, size_t end, size_t pos,
           size_t& match_end) const;

  std::vector<CharClass> classes_;
  std::vector<Inst> prog_;
};

}  // namespace hla::text
