#include "text/regex.h"

#include <memory>

#include "core/error.h"
#include "text/unicode.h"

namespace hla::text {

namespace {
constexpr uint32_t kInf = UINT32_MAX;
constexpr uint32_t kNoRepeat = UINT32_MAX;
bool is_line_terminator(char32_t c) { return c == '\n' || c == '\r' || c == 0x2028 || c == 0x2029; }
bool is_digit(char32_t c) { return c >= '0' && c <= '9'; }
bool is_word(char32_t c) {
  return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
}  // namespace

bool Regex::CharClass::matches_slow(char32_t c) const {
  bool hit = false;
  for (const auto& it : items) {
    bool m = false;
    switch (it.kind) {
      case ClassItem::Range: m = c >= it.lo && c <= it.hi; break;
      case ClassItem::Categories: m = (it.mask >> category(c)) & 1; break;
      case ClassItem::Space: m = is_js_space(c); break;
      case ClassItem::Digit: m = is_digit(c); break;
      case ClassItem::Word: m = is_word(c); break;
    }
    if (m != it.negate) {
      hit = true;
      break;
    }
  }
  return hit != negate;
}

inline bool Regex::CharClass::matches(char32_t c) const {
  if (c < 128) return (ascii[c >> 6] >> (c & 63)) & 1;
  return matches_slow(c);
}

struct Regex::Node {
  enum Kind { Alt, Seq, Char, Class, Any, Repeat, Look, LineStart, LineEnd } kind;
  std::vector<std::unique_ptr<Node>> kids;
  uint32_t value = 0;  // Char: code point; Class: class index
  uint32_t min = 0, max = 0;
  bool flag = false;  // Repeat: greedy; Look: negative

  bool nullable() const {
    switch (kind) {
      case Alt: for (auto& k : kids) if (k->nullable()) return true; return false;
      case Seq: for (auto& k : kids) if (!k->nullable()) return false; return true;
      case Repeat: return min == 0 || kids[0]->nullable();
      case Look: case LineStart: case LineEnd: return true;
      default: return false;
    }
  }
};

class Regex::Parser {
 public:
  Parser(Regex& re, std::string_view pattern) : re_(re) {
    for (size_t i = 0; i < pattern.size();) s_.push_back(decode_utf8(pattern, i));
  }

  std::unique_ptr<Node> parse() {
    auto n = alternation();
    if (i_ < s_.size()) fail("unbalanced ')'");
    return n;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    // The pattern itself stays out: it may hold line breaks, and the caller names its field.
    throw Error("regex error at character " + std::to_string(i_) + ": " + what);
  }
  bool at_end() const { return i_ >= s_.size(); }
  char32_t peek(size_t ahead = 0) const { return i_ + ahead < s_.size() ? s_[i_ + ahead] : 0; }
  bool eat(char32_t c) { return !at_end() && s_[i_] == c ? (++i_, true) : false; }

  static std::unique_ptr<Node> node(Node::Kind k) {
    auto n = std::make_unique<Node>();
    n->kind = k;
    return n;
  }

  std::unique_ptr<Node> alternation() {
    auto alt = node(Node::Alt);
    alt->kids.push_back(sequence());
    while (eat('|')) alt->kids.push_back(sequence());
    return alt->kids.size() == 1 ? std::move(alt->kids[0]) : std::move(alt);
  }

  std::unique_ptr<Node> sequence() {
    auto seq = node(Node::Seq);
    while (!at_end() && peek() != '|' && peek() != ')') {
      auto a = atom();
      seq->kids.push_back(quantified(std::move(a)));
    }
    return seq;
  }

  std::unique_ptr<Node> quantified(std::unique_ptr<Node> a) {
    uint32_t lo, hi;
    if (eat('?')) lo = 0, hi = 1;
    else if (eat('*')) lo = 0, hi = kInf;
    else if (eat('+')) lo = 1, hi = kInf;
    else if (peek() == '{' && is_digit(peek(1))) {
      ++i_;
      lo = hi = number();
      if (eat(',')) hi = is_digit(peek()) ? number() : kInf;
      if (!eat('}') || hi < lo) fail("bad {m,n} quantifier");
    } else {
      return a;
    }
    if (a->kind == Node::Look || a->kind == Node::LineStart || a->kind == Node::LineEnd)
      fail("nothing to repeat");
    auto r = node(Node::Repeat);
    r->min = lo, r->max = hi, r->flag = !eat('?');
    if (hi == kInf && a->nullable()) fail("a repeated part can match empty text");
    r->kids.push_back(std::move(a));
    return r;
  }

  uint32_t number() {
    uint64_t v = 0;
    while (is_digit(peek())) {
      v = v * 10 + (s_[i_++] - '0');
      if (v > 100000) fail("repeat count too large");
    }
    return uint32_t(v);
  }

  std::unique_ptr<Node> atom() {
    const char32_t c = s_[i_++];
    switch (c) {
      case '(': return group();
      case '[': return class_node(bracket());
      case '.': return node(Node::Any);
      case '^': return node(Node::LineStart);
      case '$': return node(Node::LineEnd);
      case '\\': return escape_atom();
      case '*': case '+': case '?': fail("nothing to repeat");
      default: return literal(c);
    }
  }

  std::unique_ptr<Node> group() {
    bool look = false, negative = false, icase = icase_;
    if (eat('?')) {
      if (eat(':')) {
      } else if (eat('=')) {
        look = true;
      } else if (eat('!')) {
        look = negative = true;
      } else if (peek() == 'i' && peek(1) == ':') {
        i_ += 2;
        icase = true;
      } else {
        fail("unsupported group syntax");
      }
    }
    const bool saved = icase_;
    icase_ = icase;
    auto inner = alternation();
    icase_ = saved;
    if (!eat(')')) fail("missing ')'");
    if (!look) return inner;
    auto n = node(Node::Look);
    n->flag = negative;
    n->kids.push_back(std::move(inner));
    return n;
  }

  std::unique_ptr<Node> literal(char32_t c) {
    const char32_t lower = c | 0x20;
    if (icase_ && lower >= 'a' && lower <= 'z') {
      CharClass cls;
      cls.items.push_back({ClassItem::Range, false, lower, lower, 0});
      cls.items.push_back({ClassItem::Range, false, lower - 0x20, lower - 0x20, 0});
      return class_node(std::move(cls));
    }
    auto n = node(Node::Char);
    n->value = c;
    return n;
  }

  std::unique_ptr<Node> class_node(CharClass cls) {
    if (icase_) {
      // ASCII case folding: add the other case of every letter the class holds.
      for (char32_t c = 'A'; c <= 'Z'; ++c) {
        const bool up = cls.matches_slow(c), low = cls.matches_slow(c + 0x20);
        if (up != low) {
          const char32_t other = up ? c + 0x20 : c;
          cls.items.push_back({ClassItem::Range, cls.negate, other, other, 0});
        }
      }
    }
    for (char32_t c = 0; c < 128; ++c)
      if (cls.matches_slow(c)) cls.ascii[c >> 6] |= uint64_t(1) << (c & 63);
    re_.classes_.push_back(std::move(cls));
    auto n = node(Node::Class);
    n->value = uint32_t(re_.classes_.size() - 1);
    return n;
  }

  // An escape outside brackets: a class (\p{L}, \s, ...) or one literal code point.
  std::unique_ptr<Node> escape_atom() {
    CharClass cls;
    if (class_escape(cls.items)) return class_node(std::move(cls));
    return literal(escaped_char());
  }

  // \p{..} \P{..} \s \S \d \D \w \W as class items; false (nothing consumed) for other escapes.
  bool class_escape(std::vector<ClassItem>& items) {
    if (at_end()) fail("trailing backslash");
    const char32_t c = peek();
    ClassItem it{ClassItem::Range, false, 0, 0, 0};
    switch (c) {
      case 's': case 'S': it.kind = ClassItem::Space; break;
      case 'd': case 'D': it.kind = ClassItem::Digit; break;
      case 'w': case 'W': it.kind = ClassItem::Word; break;
      case 'p': case 'P': {
        ++i_;
        if (!eat('{')) fail("expected '{' after \\p");
        std::string name;
        while (!at_end() && peek() != '}') name += char(s_[i_++]);
        if (!eat('}')) fail("missing '}' after \\p{");
        it.kind = ClassItem::Categories;
        it.mask = category_mask(name);
        if (!it.mask) fail("unknown Unicode property '" + name + "'");
        it.negate = c == 'P';
        items.push_back(it);
        return true;
      }
      default: return false;
    }
    ++i_;
    it.negate = c == 'S' || c == 'D' || c == 'W';
    items.push_back(it);
    return true;
  }

  char32_t hex_digits(size_t n) {
    char32_t v = 0;
    for (size_t k = 0; k < n; ++k) {
      const char32_t h = peek();
      const int d = is_digit(h) ? h - '0' : (h | 0x20) >= 'a' && (h | 0x20) <= 'f' ? (h | 0x20) - 'a' + 10 : -1;
      if (d < 0) fail("bad hexadecimal escape");
      v = v * 16 + d, ++i_;
    }
    return v;
  }

  // The code point of a character escape (after the backslash).
  char32_t escaped_char() {
    if (at_end()) fail("trailing backslash");
    const char32_t c = s_[i_++];
    switch (c) {
      case 'n': return '\n';
      case 'r': return '\r';
      case 't': return '\t';
      case 'f': return '\f';
      case 'v': return '\v';
      case '0': return 0;
      case 'x': return hex_digits(2);
      case 'u': {
        if (!eat('{')) return hex_digits(4);
        char32_t v = 0;
        while (!at_end() && peek() != '}') {
          v = v * 16 + hex_digits(1);
          if (v > 0x10FFFF) fail("code point out of range");
        }
        if (!eat('}')) fail("missing '}' in \\u{...}");
        return v;
      }
      default:
        if (c < 128 && (is_word(c) || c == ' ')) fail(std::string("unsupported escape \\") + char(c));
        return c;  // an escaped punctuation character stands for itself
    }
  }

  CharClass bracket() {
    CharClass cls;
    cls.negate = eat('^');
    bool first = true;
    while (true) {
      if (at_end()) fail("missing ']'");
      if (peek() == ']' && !first) {
        ++i_;
        break;
      }
      first = false;
      char32_t lo;
      if (eat('\\')) {
        if (class_escape(cls.items)) continue;
        lo = escaped_char();
      } else {
        lo = s_[i_++];
      }
      char32_t hi = lo;
      if (peek() == '-' && peek(1) != ']' && i_ + 1 < s_.size()) {
        ++i_;
        if (eat('\\')) {
          std::vector<ClassItem> probe;
          if (class_escape(probe)) fail("a class escape cannot end a range");
          hi = escaped_char();
        } else {
          hi = s_[i_++];
        }
        if (hi < lo) fail("range out of order in character class");
      }
      cls.items.push_back({ClassItem::Range, false, lo, hi, 0});
    }
    return cls;
  }

  Regex& re_;
  std::vector<char32_t> s_;
  size_t i_ = 0;
  bool icase_ = false;
};

Regex::Regex(std::string_view pattern) {
  const auto root = Parser(*this, pattern).parse();
  compile(*root);
  emit({Match});
}

uint32_t Regex::emit(Inst i) {
  prog_.push_back(i);
  return uint32_t(prog_.size() - 1);
}

void Regex::compile(const Node& n) {
  switch (n.kind) {
    case Node::Char: emit({Char, false, n.value}); break;
    case Node::Class: emit({Class, false, n.value}); break;
    case Node::Any: emit({Any}); break;
    case Node::LineStart: emit({LineStart}); break;
    case Node::LineEnd: emit({LineEnd}); break;
    case Node::Seq: for (auto& k : n.kids) compile(*k); break;
    case Node::Alt: {
      // split L1, next; L1: a; jmp end; next: split L2, next2; ... last alternative; end:
      std::vector<uint32_t> jumps;
      for (size_t k = 0; k < n.kids.size(); ++k) {
        uint32_t split = 0;
        if (k + 1 < n.kids.size()) split = emit({Split});
        if (k + 1 < n.kids.size()) prog_[split].x = split + 1;
        compile(*n.kids[k]);
        if (k + 1 < n.kids.size()) {
          jumps.push_back(emit({Jmp}));
          prog_[split].y = uint32_t(prog_.size());
        }
      }
      for (uint32_t j : jumps) prog_[j].x = uint32_t(prog_.size());
      break;
    }
    case Node::Look: {
      const uint32_t at = emit({Lookahead, n.flag});
      compile(*n.kids[0]);
      emit({Match});
      prog_[at].y = uint32_t(prog_.size());
      break;
    }
    case Node::Repeat: {
      const Node& k = *n.kids[0];
      if (n.flag && (k.kind == Node::Char || k.kind == Node::Class || k.kind == Node::Any)) {
        // The hot case (\p{L}+, \s*, ...): one instruction that consumes greedily and backs off.
        uint32_t cls;
        if (k.kind == Node::Class) {
          cls = k.value;
        } else {
          CharClass c;
          if (k.kind == Node::Char) {
            c.items.push_back({ClassItem::Range, false, k.value, k.value, 0});
          } else {
            c.negate = true;
            for (char32_t t : {U'\n', U'\r', U'\u2028', U'\u2029'})
              c.items.push_back({ClassItem::Range, false, t, t, 0});
          }
          for (char32_t a = 0; a < 128; ++a)
            if (c.matches_slow(a)) c.ascii[a >> 6] |= uint64_t(1) << (a & 63);
          classes_.push_back(std::move(c));
          cls = uint32_t(classes_.size() - 1);
        }
        Inst r{Repeat, false, cls};
        r.min = n.min, r.max = n.max;
        emit(r);
        break;
      }
      for (uint32_t i = 0; i < n.min; ++i) compile(k);
      if (n.max == kInf) {
        const uint32_t loop = emit({Split, !n.flag});
        prog_[loop].x = loop + 1;
        compile(k);
        emit({Jmp, false, loop});
        prog_[loop].y = uint32_t(prog_.size());
      } else {
        std::vector<uint32_t> splits;
        for (uint32_t i = n.min; i < n.max; ++i) {
          const uint32_t s = emit({Split, !n.flag});
          prog_[s].x = s + 1;
          splits.push_back(s);
          compile(k);
        }
        for (uint32_t s : splits) prog_[s].y = uint32_t(prog_.size());
      }
      break;
    }
  }
}

namespace {
struct Frame {
  uint32_t pc, pos, lo;  // lo != kNoRepeat: a greedy repeat that may back off down to lo
};
thread_local std::vector<Frame> tl_stack;
}  // namespace

bool Regex::run(uint32_t pc, const char32_t* s, size_t begin, size_t end, size_t pos,
                size_t& match_end) const {
  auto& stack = tl_stack;
  const size_t base = stack.size();
  while (true) {
    const Inst& in = prog_[pc];
    bool ok = true;
    switch (in.op) {
      case Char: ok = pos < end && s[pos] == in.x; ++pos, ++pc; break;
      case Class: ok = pos < end && classes_[in.x].matches(s[pos]); ++pos, ++pc; break;
      case Any: ok = pos < end && !is_line_terminator(s[pos]); ++pos, ++pc; break;
      case Split:
        stack.push_back({in.flag ? in.x : in.y, uint32_t(pos), kNoRepeat});
        pc = in.flag ? in.y : in.x;
        break;
      case Jmp: pc = in.x; break;
      case Repeat: {
        const CharClass& cls = classes_[in.x];
        size_t p = pos;
        const size_t limit = in.max == kInf ? end : std::min(end, pos + in.max);
        while (p < limit && cls.matches(s[p])) ++p;
        if (p - pos < in.min) {
          ok = false;
          break;
        }
        const size_t lo = pos + in.min;
        if (p > lo) stack.push_back({pc + 1, uint32_t(p), uint32_t(lo)});
        pos = p, ++pc;
        break;
      }
      case Lookahead: {
        size_t ignored;
        const bool m = run(pc + 1, s, begin, end, pos, ignored);
        ok = m != in.flag;
        pc = in.y;
        break;
      }
      case LineStart: ok = pos == begin; ++pc; break;
      case LineEnd: ok = pos == end; ++pc; break;
      case Match:
        match_end = pos;
        stack.resize(base);
        return true;
    }
    if (ok) continue;
    // Backtrack to the most recent choice point.
    while (true) {
      if (stack.size() == base) return false;
      Frame f = stack.back();
      stack.pop_back();
      if (f.lo == kNoRepeat) {
        pc = f.pc, pos = f.pos;
        break;
      }
      const uint32_t np = f.pos - 1;  // the repeat gives back one more character
      if (np > f.lo) stack.push_back({f.pc, np, f.lo});
      pc = f.pc, pos = np;
      break;
    }
  }
}

bool Regex::find(const char32_t* s, size_t begin, size_t end, size_t from, size_t& match_begin,
                 size_t& match_end) const {
  for (size_t start = from; start <= end; ++start) {
    if (run(0, s, begin, end, start, match_end)) {
      match_begin = start;
      return true;
    }
  }
  return false;
}

}  // namespace hla::text
