#include "text/chat_template.h"

#include <charconv>
#include <cmath>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>

#include "core/error.h"
#include "text/unicode.h"

namespace hla::text {

namespace {

// ---------------------------------------------------------------------------------------------
// Values. Arrays, objects and namespaces are shared by reference, as in the JavaScript engine
// whose output we match (a namespace changed in a loop is the same namespace outside it).

struct RenderError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] void fail(const std::string& what) { throw RenderError(what); }

// Bounds of one render. A template is code, from a checkpoint or a user: whatever it does, a
// render returns its text or an error, never a crash, a hang or an exhausted memory (each bound
// answers a libFuzzer finding: a stack overflow, an out-of-memory, a hang). They sit far above
// what chat templates do: loops over the messages, macros recursing a few levels for tool
// schemas, prompts of a few MiB.
constexpr int64_t kMaxRange = 100000;            // range()'s length: Jinja's sandbox bound (MAX_RANGE)
constexpr size_t kMaxString = size_t(16) << 20;  // bytes of one string, the output included
constexpr size_t kMaxArray = size_t(1) << 20;    // elements of one array
constexpr int64_t kMaxSteps = 1'000'000;         // loop iterations and macro calls
constexpr size_t kMaxWork = size_t(1) << 30;     // bytes of the strings and arrays built
constexpr int kMaxEvalDepth = 400;               // nested evaluations: macro recursion
constexpr size_t kMaxValueDepth = 1000;          // values printed or passed in: arrays in arrays ...
// What the render running on this thread has spent (none outside render(): parsing builds
// constants freely).
struct RenderBudget {
  int64_t steps = 0;
  size_t work = 0;
  int depth = 0;
};
thread_local RenderBudget* t_budget = nullptr;
void charge_step() {
  if (t_budget && ++t_budget->steps > kMaxSteps) fail("template ran more than 1000000 loop iterations and macro calls");
}
void charge_work(size_t bytes) {
  if (t_budget && (t_budget->work += bytes) > kMaxWork) fail("template built more than 1 GiB of strings and arrays");
}
// A string of `bytes` is about to be built (checked before the allocation where the size is known).
void check_string(size_t bytes) {
  if (bytes > kMaxString) fail("string longer than 16 MiB");
}

struct Value;
struct Env;
using Array = std::vector<Value>;
using Object = std::vector<std::pair<std::string, Value>>;  // insertion order, as JSON objects
using Func = std::function<Value(std::vector<Value>&, Env&)>;

enum class T { Undefined, Null, Bool, Int, Float, Str, Array, Object, Namespace, Func };

struct Value {
  T t = T::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<Array> arr;
  std::shared_ptr<Object> obj;  // Object and Namespace
  std::shared_ptr<Func> fn;
  bool kwargs = false;  // an Object holding a call's keyword arguments

  static Value null() { Value v; v.t = T::Null; return v; }
  static Value boolean(bool x) { Value v; v.t = T::Bool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.t = T::Int; v.i = x; return v; }
  static Value real(double x) { Value v; v.t = T::Float; v.f = x; return v; }
  static Value str(std::string x) {
    check_string(x.size());
    charge_work(x.size());
    Value v;
    v.t = T::Str;
    v.s = std::move(x);
    return v;
  }
  static Value array(Array a = {});
  static Value object(Object o = {}, T t = T::Object);
  static Value func(Func f) { Value v; v.t = T::Func; v.fn = std::make_shared<Func>(std::move(f)); return v; }

  bool is_number() const { return t == T::Int || t == T::Float; }
  double num() const { return t == T::Int ? double(i) : t == T::Float ? f : t == T::Bool ? double(b) : NAN; }
  const Value* get(std::string_view key) const {
    for (auto& [k, v] : *obj)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    for (auto& [k, old] : *obj)
      if (k == key) return void(old = std::move(v));
    obj->emplace_back(key, std::move(v));
  }
};

// Freeing a container frees what it holds, so a chain of arrays nested a million deep (grown in a
// loop) would free itself a million calls deep. Containers are therefore freed by `release`: what
// they hold is moved to a list that the outermost release empties, one level at a time.
struct Graveyard {
  std::vector<Value> pending;
  bool draining = false;
};
thread_local Graveyard t_graveyard;
Value& held(Value& x) { return x; }  // what an array's or an object's slot holds
Value& held(std::pair<std::string, Value>& x) { return x.second; }
template <class C>
void release(C* c) {
  for (auto& x : *c)
    if (held(x).arr || held(x).obj) t_graveyard.pending.push_back(std::move(held(x)));
  delete c;
  if (t_graveyard.draining) return;
  t_graveyard.draining = true;
  while (!t_graveyard.pending.empty()) {
    Value v = std::move(t_graveyard.pending.back());
    t_graveyard.pending.pop_back();
  }  // each v freed here may release more into the list
  t_graveyard.draining = false;
}

// A container's bill: the strings copied into it, and an array's slots (an array is what a loop
// can grow by copying it again and again).
template <class C>
size_t container_bytes(const C& c) {
  size_t n = 0;
  for (auto& x : c) {
    if constexpr (std::is_same_v<C, Array>)
      n += sizeof(Value) + x.s.size();
    else
      n += x.first.size() + x.second.s.size();
  }
  return n;
}
// A whole number as an integer where int64 holds it, else as a float (JavaScript's numbers are
// all doubles; a C++ cast of an out-of-range double is undefined).
Value int_or_real(double x) {
  return std::isfinite(x) && x >= -9223372036854775808.0 && x < 9223372036854775808.0 ? Value::integer(int64_t(x))
                                                                                      : Value::real(x);
}

Value Value::array(Array a) {
  if (a.size() > kMaxArray) fail("array longer than 1048576 elements");
  charge_work(container_bytes(a));
  Value v;
  v.t = T::Array;
  v.arr = std::shared_ptr<Array>(new Array(std::move(a)), release<Array>);
  return v;
}
Value Value::object(Object o, T t) {
  charge_work(container_bytes(o));
  Value v;
  v.t = t;
  v.obj = std::shared_ptr<Object>(new Object(std::move(o)), release<Object>);
  return v;
}

const char* type_name(T t) {
  switch (t) {
    case T::Undefined: return "UndefinedValue";
    case T::Null: return "NullValue";
    case T::Bool: return "BooleanValue";
    case T::Int: return "IntegerValue";
    case T::Float: return "FloatValue";
    case T::Str: return "StringValue";
    case T::Array: return "ArrayValue";
    case T::Object: return "ObjectValue";
    case T::Namespace: return "NamespaceValue";
    case T::Func: return "FunctionValue";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.t) {
    case T::Undefined: case T::Null: return false;
    case T::Bool: return v.b;
    case T::Int: return v.i != 0;
    case T::Float: return v.f != 0 && !std::isnan(v.f);
    case T::Str: return !v.s.empty();
    case T::Array: return !v.arr->empty();
    case T::Object: return !v.obj->empty();
    case T::Namespace: case T::Func: return true;
  }
  return false;
}

// JavaScript's Number.prototype.toString: shortest round-trip digits, plain notation for
// exponents in [-6, 21), otherwise d.ddde+X.
std::string js_number(double x) {
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x == 0) return "0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // -d.ddde+XX
  std::string sign;
  if (sci[0] == '-') sign = "-", sci.erase(0, 1);
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, 1) + (e > 2 ? sci.substr(2, e - 2) : "");
  const int n = std::stoi(sci.substr(e + 1)) + 1;  // position of the decimal point
  const int k = int(digits.size());
  if (k <= n && n <= 21) return sign + digits + std::string(n - k, '0');
  if (0 < n && n <= 21) return sign + digits.substr(0, n) + "." + digits.substr(n);
  if (-6 < n && n <= 0) return sign + "0." + std::string(-n, '0') + digits;
  const int exp = n - 1;
  return sign + digits.substr(0, 1) + (k > 1 ? "." + digits.substr(1) : "") + "e" + (exp < 0 ? "-" : "+") +
         std::to_string(std::abs(exp));
}

// JSON.stringify of a string: escapes quotes, backslashes and control characters only.
void json_string(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  out += '"';
}

struct JsonStyle {
  int indent = 0;
  bool ensure_ascii = false, sort_keys = false;
  std::string item_sep = ", ", key_sep = ": ";
  bool custom_separators = false;
  bool undefined_as_null = true;
};

std::string ascii_escape(const std::string& s) {  // \uXXXX for everything past U+007E
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const char32_t c = decode_utf8(s, i);
    auto put = [&](unsigned u) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", u);
      out += buf;
    };
    if (c < 0x7F) out += char(c);
    else if (c < 0x10000) put(unsigned(c));
    else put(0xD800 + ((c - 0x10000) >> 10)), put(0xDC00 + ((c - 0x10000) & 0x3FF));
  }
  return out;
}

// `open`: the containers being written around v. A namespace can hold itself, so a value can be
// cyclic; JavaScript's JSON.stringify refuses those with this message.
void to_json(std::string& out, const Value& v, const JsonStyle& st, std::vector<const void*>& open) {
  switch (v.t) {
    case T::Null: out += "null"; return;
    case T::Undefined: out += st.undefined_as_null ? "null" : "undefined"; return;
    case T::Bool: out += v.b ? "true" : "false"; return;
    case T::Int: out += std::to_string(v.i); return;
    case T::Float: out += std::isfinite(v.f) ? js_number(v.f) : "null"; return;
    case T::Str: {
      std::string s;
      json_string(s, v.s);
      out += st.ensure_ascii ? ascii_escape(s) : s;
      return;
    }
    case T::Array: case T::Object: case T::Namespace: {
      const void* self = v.t == T::Array ? static_cast<const void*>(v.arr.get()) : v.obj.get();
      if (std::find(open.begin(), open.end(), self) != open.end()) fail("Converting circular structure to JSON");
      if (open.size() >= kMaxValueDepth) fail("value nested too deeply to convert to JSON");
      open.push_back(self);
      const size_t depth = open.size() - 1;
      check_string(out.size() + size_t(st.indent) * (depth + 1));  // a shared value printed 2^40 times ends here
      const std::string pad = st.indent ? "\n" + std::string(size_t(st.indent) * depth, ' ') : "";
      const std::string child_pad = st.indent ? pad + std::string(st.indent, ' ') : "";
      const bool is_array = v.t == T::Array;
      const size_t n = is_array ? v.arr->size() : v.obj->size();
      out += is_array ? '[' : '{';
      std::vector<size_t> order(n);
      for (size_t k = 0; k < n; ++k) order[k] = k;
      if (!is_array && st.sort_keys)
        std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return (*v.obj)[a].first < (*v.obj)[b].first; });
      for (size_t k = 0; k < n; ++k) {
        if (k) out += st.item_sep;
        out += child_pad;
        if (is_array) {
          to_json(out, (*v.arr)[k], st, open);
        } else {
          std::string key;
          json_string(key, (*v.obj)[order[k]].first);
          out += st.ensure_ascii ? ascii_escape(key) : key;
          out += st.key_sep;
          to_json(out, (*v.obj)[order[k]].second, st, open);
        }
      }
      if (n) out += pad;
      out += is_array ? ']' : '}';
      open.pop_back();
      return;
    }
    case T::Func: fail("Cannot convert to JSON: FunctionValue");
  }
}

std::string json_of(const Value& v, JsonStyle st = {}) {
  if (st.indent && !st.custom_separators) st.item_sep = ",";  // as Python's json.dumps
  std::string out;
  std::vector<const void*> open;
  to_json(out, v, st, open);
  return out;
}

// What `{{ v }}` prints.
std::string display(const Value& v) {
  switch (v.t) {
    case T::Undefined: case T::Null: return "";
    case T::Bool: return v.b ? "true" : "false";
    case T::Int: return std::to_string(v.i);
    case T::Float:
      if (v.f == 0 && std::signbit(v.f)) return "-0.0";
      return std::isfinite(v.f) && v.f == std::floor(v.f) && std::abs(v.f) < 1e21 ? js_number(v.f) + ".0" : js_number(v.f);
    case T::Str: return v.s;
    case T::Array: case T::Object: case T::Namespace: {
      JsonStyle st;
      st.undefined_as_null = false;
      return json_of(v, st);
    }
    case T::Func: return "function";
  }
  return "";
}

// What `~`, string `+` and `join` make of a value: JavaScript's String() of the engine's
// underlying value. A mapping is a Map there ("[object Map]"); an array joins its elements'
// own renderings with ",".
std::string concat_text(const Value& v) {
  switch (v.t) {
    case T::Int: return std::to_string(v.i);
    case T::Float: return js_number(v.f);
    case T::Bool: return v.b ? "true" : "false";
    case T::Str: return v.s;
    case T::Object: case T::Namespace: return "[object Map]";
    case T::Func: return "function";
    case T::Array: {
      std::string out;
      for (size_t k = 0; k < v.arr->size(); ++k) {
        const Value& e = (*v.arr)[k];
        out += k ? "," : "";
        out += e.t == T::Null ? "null" : e.t == T::Undefined ? "undefined" : display(e);
      }
      return out;
    }
    default: return "";
  }
}

// JavaScript's == on the engine's underlying values.
double js_to_number(const Value& v) {
  if (v.t != T::Str) return v.num();
  size_t b = 0, e = v.s.size();
  while (b < e && is_js_space(static_cast<unsigned char>(v.s[b]))) ++b;
  while (e > b && is_js_space(static_cast<unsigned char>(v.s[e - 1]))) --e;
  if (b == e) return 0;
  double d;
  auto r = std::from_chars(v.s.data() + b, v.s.data() + e, d);
  return r.ec == std::errc() && r.ptr == v.s.data() + e ? d : NAN;
}
bool loose_equal(const Value& a, const Value& b) {
  const bool an = a.t == T::Null || a.t == T::Undefined, bn = b.t == T::Null || b.t == T::Undefined;
  if (an || bn) return an && bn;
  if (a.t == T::Str && b.t == T::Str) return a.s == b.s;
  const bool ap = a.t == T::Str || a.t == T::Bool || a.is_number(), bp = b.t == T::Str || b.t == T::Bool || b.is_number();
  if (ap && bp) return js_to_number(a) == js_to_number(b);
  if (a.t != b.t) return false;
  if (a.t == T::Array) return a.arr == b.arr;
  if (a.t == T::Func) return a.fn == b.fn;
  return a.obj == b.obj;
}
// JavaScript's === on underlying values (used by `in` over arrays and `unique`).
bool strict_equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.num() == b.num();
  if (a.t != b.t) return false;
  switch (a.t) {
    case T::Undefined: case T::Null: return true;
    case T::Bool: return a.b == b.b;
    case T::Str: return a.s == b.s;
    case T::Array: return a.arr == b.arr;
    case T::Func: return a.fn == b.fn;
    default: return a.obj == b.obj;
  }
}

// ---------------------------------------------------------------------------------------------
// Strings, with the engine's (JavaScript's) notion of whitespace.

std::string_view trim_js(std::string_view s, bool left, bool right) {
  if (left) {
    size_t i = 0;
    while (i < s.size()) {
      size_t j = i;
      if (!is_js_space(decode_utf8(s, j))) break;
      i = j;
    }
    s.remove_prefix(i);
  }
  if (right) {
    while (!s.empty()) {
      size_t b = s.size() - 1;
      while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
      size_t k = b;
      if (!is_js_space(decode_utf8(s, k))) break;
      s.remove_suffix(s.size() - b);
    }
  }
  return s;
}

std::vector<char32_t> code_points(std::string_view s) {
  std::vector<char32_t> out;
  for (size_t i = 0; i < s.size();) out.push_back(decode_utf8(s, i));
  return out;
}

int64_t utf16_length(std::string_view s) {
  int64_t n = 0;
  for (size_t i = 0; i < s.size();) n += decode_utf8(s, i) >= 0x10000 ? 2 : 1;
  return n;
}

// Case mapping of ASCII letters only; other characters are kept.
std::string ascii_case(std::string s, bool upper) {
  for (char& c : s)
    if (upper ? (c >= 'a' && c <= 'z') : (c >= 'A' && c <= 'Z')) c ^= 0x20;
  return s;
}

bool is_word_byte(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

std::string title_case(std::string s) {  // the first letter of every \w run upper-cased
  for (size_t i = 0; i < s.size(); ++i)
    if (is_word_byte(s[i]) && (i == 0 || !is_word_byte(s[i - 1])) && s[i] >= 'a' && s[i] <= 'z') s[i] ^= 0x20;
  return s;
}

std::vector<std::string> split_str(const std::string& s, const std::string& sep) {
  std::vector<std::string> out;
  for (size_t i = 0;;) {
    const size_t j = s.find(sep, i);
    out.push_back(s.substr(i, j == std::string::npos ? std::string::npos : j - i));
    if (j == std::string::npos) return out;
    i = j + sep.size();
  }
}

std::string replace_str(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
  if (count == 0) return s;
  std::string out;
  int64_t left = count < 0 ? INT64_MAX : count;
  if (from.empty()) {  // inserts between code points, as a global empty regex does
    size_t i = 0;
    while (i <= s.size()) {
      check_string(out.size() + to.size() + 4);  // 4: the code point after it
      if (left-- > 0) out += to;
      if (i == s.size()) break;
      const size_t j = i;
      decode_utf8(s, i);
      out.append(s, j, i - j);
    }
    return out;
  }
  size_t i = 0;
  for (; left > 0; --left) {
    const size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    out.append(s, i, j - i);
    check_string(out.size() + to.size() + s.size() - j);
    out += to;
    i = j + from.size();
  }
  out.append(s, i);
  return out;
}

// Python-style slicing with the engine's clamping.
template <class Seq>
Seq slice_seq(const Seq& a, std::optional<int64_t> start, std::optional<int64_t> stop, int64_t step) {
  const int64_t n = int64_t(a.size());
  Seq out;
  if (step == 0) fail("slice step cannot be zero");
  int64_t b, e;
  if (step > 0) {
    b = !start ? 0 : *start < 0 ? std::max(n + *start, int64_t(0)) : std::min(*start, n);
    e = !stop ? n : *stop < 0 ? std::max(n + *stop, int64_t(0)) : std::min(*stop, n);
    for (int64_t i = b; i < e; i += step) out.push_back(a[size_t(i)]);
  } else {
    b = !start ? n - 1 : *start < 0 ? std::max(n + *start, int64_t(-1)) : std::min(*start, n - 1);
    e = !stop ? -1 : *stop < -1 ? std::max(n + *stop, int64_t(-1)) : std::min(*stop, n - 1);
    for (int64_t i = b; i > e; i += step) out.push_back(a[size_t(i)]);
  }
  return out;
}

Value from_json(const nlohmann::ordered_json& j, size_t depth = 0) {
  if (depth > kMaxValueDepth) fail("variables nested deeper than 1000 levels");
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::null();
    case nlohmann::json::value_t::boolean: return Value::boolean(j.get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: return Value::integer(int64_t(j.get<uint64_t>()));
    case nlohmann::json::value_t::number_float: {
      // JavaScript has one number type: integral floats are integers to the engine.
      const double d = j.get<double>();
      return d == std::floor(d) && std::abs(d) < 9007199254740992.0 ? Value::integer(int64_t(d)) : Value::real(d);
    }
    case nlohmann::json::value_t::string: return Value::str(j.get<std::string>());
    case nlohmann::json::value_t::array: {
      Array a;
      for (auto& x : j) a.push_back(from_json(x, depth + 1));
      return Value::array(std::move(a));
    }
    case nlohmann::json::value_t::object: {
      Object o;
      for (auto& [k, x] : j.items()) o.emplace_back(k, from_json(x, depth + 1));
      return Value::object(std::move(o));
    }
    default: fail("unsupported JSON value in chat template variables");
  }
}

// Scopes: a for loop and a macro call open one; set writes into the innermost.
struct Env {
  Env* parent = nullptr;
  std::unordered_map<std::string, Value> vars;
  Value lookup(const std::string& name) const {
    for (const Env* e = this; e; e = e->parent)
      if (auto it = e->vars.find(name); it != e->vars.end()) return it->second;
    return {};
  }
};

// ---------------------------------------------------------------------------------------------
// Lexer.

enum class Tok { Text, OpenStmt, CloseStmt, OpenExpr, CloseExpr, Comment, Number, String, Name,
                 Equals, LParen, RParen, LBracket, RBracket, LBrace, RBrace, Comma, Dot, Colon,
                 Pipe, Compare, Additive, Multiplicative, Power, Unary };

struct Token {
  Tok type;
  std::string value;
  int line;
};

// The source as the engine sees it: one trailing newline dropped, then lstrip_blocks (spaces and
// tabs before a block tag at the start of a line go) and trim_blocks (the newline after a block
// tag goes).
std::string preprocess(std::string s) {
  if (!s.empty() && s.back() == '\n') s.pop_back();
  std::string a;
  a.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const bool line_start = i == 0 || s[i - 1] == '\n' || s[i - 1] == '\r' ||
                            (i >= 3 && s.compare(i - 3, 2, "\xE2\x80") == 0 && (s[i - 1] == '\xA8' || s[i - 1] == '\xA9'));
    if (line_start) {
      size_t j = i;
      while (j < s.size() && (s[j] == ' ' || s[j] == '\t')) ++j;
      if (j > i && j + 1 < s.size() && s[j] == '{' && (s[j + 1] == '#' || s[j + 1] == '%' || s[j + 1] == '-')) {
        i = j;
        continue;
      }
    }
    a += s[i++];
  }
  std::string b;
  b.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    b += a[i];
    if (a[i] == '}' && i > 0 && (a[i - 1] == '#' || a[i - 1] == '%' || a[i - 1] == '-') && i + 1 < a.size() &&
        a[i + 1] == '\n')
      ++i;
  }
  return b;
}

std::vector<Token> lex(const std::string& source) {
  const std::string src = preprocess(source);
  std::vector<Token> toks;
  size_t p = 0;
  int line = 1;
  int curly = 0;
  auto is_space_at = [&](size_t i, size_t& next) {
    if (i >= src.size()) return false;
    next = i;
    return is_js_space(decode_utf8(src, next));
  };
  auto skip_space = [&] {
    size_t nx;
    while (is_space_at(p, nx)) {
      line += std::count(src.begin() + p, src.begin() + nx, '\n');
      p = nx;
    }
  };
  auto strip_trailing = [&] {  // `{%-` and friends: the text before loses its trailing space
    if (!toks.empty() && toks.back().type == Tok::Text) {
      toks.back().value = std::string(trim_js(toks.back().value, false, true));
      if (toks.back().value.empty()) toks.pop_back();
    }
  };
  auto starts = [&](std::string_view t) { return src.compare(p, t.size(), t) == 0; };
  auto push = [&](Tok t, std::string v) { toks.push_back({t, std::move(v), line}); };
  auto lex_fail = [&](const std::string& what) { throw RenderError("line " + std::to_string(line) + ": " + what); };

  while (p < src.size()) {
    const Tok last = toks.empty() ? Tok::Text : toks.back().type;
    if (toks.empty() || last == Tok::CloseStmt || last == Tok::CloseExpr || last == Tok::Comment) {
      size_t q = p;
      while (q < src.size() && !(src[q] == '{' && q + 1 < src.size() && (src[q + 1] == '%' || src[q + 1] == '{' || src[q + 1] == '#'))) ++q;
      if (q > p) {
        push(Tok::Text, src.substr(p, q - p));
        line += std::count(src.begin() + p, src.begin() + q, '\n');
        p = q;
        continue;
      }
    }
    if (starts("{#")) {
      p += 2;
      const bool strip_before = p < src.size() && src[p] == '-';
      if (strip_before) ++p;
      const size_t end = src.find("#}", p);
      if (end == std::string::npos) lex_fail("missing end of comment tag");
      std::string body = src.substr(p, end - p);
      const bool strip_after = !body.empty() && body.back() == '-';
      if (strip_before) strip_trailing();
      line += std::count(body.begin(), body.end(), '\n');
      push(Tok::Comment, "");
      p = end + 2;
      if (strip_after) skip_space();
      continue;
    }
    if (starts("{%-")) {
      strip_trailing();
      push(Tok::OpenStmt, "{%");
      p += 3;
      continue;
    }
    if (starts("{{-")) {
      strip_trailing();
      push(Tok::OpenExpr, "{{");
      curly = 0;
      p += 3;
      continue;
    }
    skip_space();
    if (p >= src.size()) break;
    if (starts("-%}")) {
      push(Tok::CloseStmt, "%}");
      p += 3;
      skip_space();
      continue;
    }
    if (starts("-}}")) {
      push(Tok::CloseExpr, "}}");
      p += 3;
      skip_space();
      continue;
    }
    const char c = src[p];
    auto is_digit = [&](size_t i) { return i < src.size() && src[i] >= '0' && src[i] <= '9'; };
    if (c == '-' || c == '+') {
      const Tok lt = toks.empty() ? Tok::Text : toks.back().type;
      if (lt == Tok::Text) lex_fail(std::string("unexpected character: ") + c);
      if (lt != Tok::Name && lt != Tok::Number && lt != Tok::String && lt != Tok::RParen && lt != Tok::RBracket) {
        // A sign: part of a number literal, or a unary operator.
        ++p;
        std::string num;
        while (is_digit(p)) num += src[p++];
        if (!num.empty() && p < src.size() && src[p] == '.' && is_digit(p + 1)) {
          num += src[p++];
          while (is_digit(p)) num += src[p++];
        }
        push(num.empty() ? Tok::Unary : Tok::Number, std::string(1, c) + num);
        continue;
      }
    }
    static const std::pair<std::string_view, Tok> kOps[] = {
        {"{%", Tok::OpenStmt}, {"%}", Tok::CloseStmt}, {"{{", Tok::OpenExpr}, {"}}", Tok::CloseExpr},
        {"(", Tok::LParen}, {")", Tok::RParen}, {"{", Tok::LBrace}, {"}", Tok::RBrace},
        {"[", Tok::LBracket}, {"]", Tok::RBracket}, {",", Tok::Comma}, {".", Tok::Dot}, {":", Tok::Colon},
        {"|", Tok::Pipe}, {"<=", Tok::Compare}, {">=", Tok::Compare}, {"==", Tok::Compare},
        {"!=", Tok::Compare}, {"<", Tok::Compare}, {">", Tok::Compare}, {"+", Tok::Additive},
        {"-", Tok::Additive}, {"~", Tok::Additive}, {"**", Tok::Power}, {"*", Tok::Multiplicative},
        {"//", Tok::Multiplicative}, {"/", Tok::Multiplicative}, {"%", Tok::Multiplicative}, {"=", Tok::Equals}};
    bool matched = false;
    for (auto [seq, type] : kOps) {
      if (seq == "}}" && curly > 0) continue;  // inside an object literal
      if (!starts(seq)) continue;
      push(type, std::string(seq));
      if (type == Tok::OpenExpr) curly = 0;
      else if (type == Tok::LBrace) ++curly;
      else if (type == Tok::RBrace) --curly;
      p += seq.size();
      matched = true;
      break;
    }
    if (matched) continue;
    if (c == '\'' || c == '"') {
      ++p;
      std::string str;
      while (true) {
        if (p >= src.size()) lex_fail("unexpected end of input in a string literal");
        const char d = src[p];
        if (d == c) break;
        if (d == '\\') {
          if (++p >= src.size()) lex_fail("unexpected end of input");
          const char e = src[p++];
          if (e == 'x' || e == 'u') {
            const size_t len = e == 'x' ? 2 : 4;
            const std::string hex = src.substr(p, len);
            unsigned v = 0;
            if (hex.size() != len || std::from_chars(hex.data(), hex.data() + len, v, 16).ptr != hex.data() + len)
              lex_fail("invalid hexadecimal escape sequence");
            append_utf8(str, v);
            p += len;
            continue;
          }
          static const std::pair<char, char> kEsc[] = {{'n', '\n'}, {'t', '\t'}, {'r', '\r'}, {'b', '\b'}, {'f', '\f'},
                                                       {'v', '\v'}, {'\'', '\''}, {'"', '"'}, {'\\', '\\'}};
          auto it = std::find_if(std::begin(kEsc), std::end(kEsc), [e](auto& x) { return x.first == e; });
          if (it == std::end(kEsc)) lex_fail(std::string("unexpected escaped character: ") + e);
          str += it->second;
          continue;
        }
        if (d == '\n') ++line;
        str += d;
        ++p;
      }
      ++p;
      push(Tok::String, std::move(str));
      continue;
    }
    if (is_digit(p)) {
      std::string num;
      while (is_digit(p)) num += src[p++];
      if (!toks.empty() && toks.back().type != Tok::Dot && p < src.size() && src[p] == '.' && is_digit(p + 1)) {
        num += src[p++];
        while (is_digit(p)) num += src[p++];
      }
      push(Tok::Number, std::move(num));
      continue;
    }
    if (is_word_byte(c)) {
      std::string w;
      while (p < src.size() && is_word_byte(src[p])) w += src[p++];
      push(Tok::Name, std::move(w));
      continue;
    }
    lex_fail(std::string("unexpected character: ") + c);
  }
  return toks;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Syntax tree.

struct ChatTemplate::Node {
  enum Kind {
    // statements
    Block, Text, Output, If, For, Set, Macro, Break, Continue,
    // expressions
    Literal, Name, Member, Slice, Call, Filter, Test, Unary, Binary, Ternary, Select, ArrayLit, TupleLit, ObjectLit,
  } kind;
  int line = 0;
  std::string str;  // Text; Name; operator; filter, test or macro name
  Value lit;
  std::unique_ptr<Node> x, y, z;          // operands / condition and branches
  std::vector<std::unique_ptr<Node>> list;  // statements, arguments, items
  std::vector<std::unique_ptr<Node>> alt;   // else-branch statements; object values
  std::vector<std::string> names;           // keyword names of arguments ("" = positional)
  bool flag = false;                        // Test: negated; Filter: called with arguments
};

using Node = ChatTemplate::Node;
using NodePtr = std::unique_ptr<Node>;

namespace {

NodePtr make(Node::Kind k, int line) {
  auto n = std::make_unique<Node>();
  n->kind = k;
  n->line = line;
  return n;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  NodePtr program() {
    auto root = make(Node::Block, 1);
    while (p_ < t_.size()) root->list.push_back(any());
    return root;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    const int line = p_ < t_.size() ? t_[p_].line : t_.empty() ? 1 : t_.back().line;
    throw RenderError("line " + std::to_string(line) + ": " + what);
  }
  bool is(Tok t, size_t ahead = 0) const { return p_ + ahead < t_.size() && t_[p_ + ahead].type == t; }
  bool is_name(std::string_view n, size_t ahead = 0) const { return is(Tok::Name, ahead) && t_[p_ + ahead].value == n; }
  bool is_stmt(std::initializer_list<std::string_view> names) const {
    if (!is(Tok::OpenStmt) || !is(Tok::Name, 1)) return false;
    for (auto n : names)
      if (t_[p_ + 1].value == n) return true;
    return false;
  }
  const Token& expect(Tok t, const char* what) {
    if (!is(t)) error(std::string("expected ") + what);
    return t_[p_++];
  }
  void expect_name(std::string_view n) {
    if (!is_name(n)) error("expected '" + std::string(n) + "'");
    ++p_;
  }
  int line() const { return p_ < t_.size() ? t_[p_].line : 0; }

  // Real templates nest a handful of levels; the bound keeps hostile input ("[[[[…", "not not …")
  // from overflowing the stack here, in rendering and in freeing the tree.
  static constexpr int kMaxNesting = 128;
  struct Nest {
    int& depth;
    explicit Nest(Parser& p) : depth(p.depth_) {
      if (++depth > kMaxNesting) p.error("nesting deeper than " + std::to_string(kMaxNesting) + " levels");
    }
    ~Nest() { --depth; }
  };

  NodePtr any() {
    if (p_ >= t_.size()) error("unexpected end of template");
    switch (t_[p_].type) {
      case Tok::Comment: {
        ++p_;
        return make(Node::Block, line());
      }
      case Tok::Text: {
        auto n = make(Node::Text, line());
        n->str = t_[p_++].value;
        return n;
      }
      case Tok::OpenStmt: return statement();
      case Tok::OpenExpr: {
        ++p_;
        auto n = make(Node::Output, line());
        n->x = expression();
        expect(Tok::CloseExpr, "'}}'");
        return n;
      }
      default: error("unexpected token '" + t_[p_].value + "'");
    }
  }

  // Statements until one of `ends` (not consumed).
  std::vector<NodePtr> body(std::initializer_list<std::string_view> ends) {
    std::vector<NodePtr> out;
    while (!is_stmt(ends)) {
      if (p_ >= t_.size()) error("missing {% " + std::string(*ends.begin()) + " %}");
      out.push_back(any());
    }
    return out;
  }
  void end_tag(std::string_view name) {
    expect(Tok::OpenStmt, "'{%'");
    expect_name(name);
    expect(Tok::CloseStmt, "'%}'");
  }

  NodePtr statement() {
    Nest nest(*this);
    expect(Tok::OpenStmt, "'{%'");
    if (!is(Tok::Name)) error("expected a statement name");
    const std::string name = t_[p_++].value;
    const int ln = line();
    if (name == "set") {
      auto n = make(Node::Set, ln);
      n->x = sequence(false);
      if (is(Tok::Equals)) {
        ++p_;
        n->y = sequence(false);
      } else {
        expect(Tok::CloseStmt, "'%}'");
        n->list = body({"endset"});
        expect(Tok::OpenStmt, "'{%'");
        expect_name("endset");
      }
      expect(Tok::CloseStmt, "'%}'");
      return n;
    }
    if (name == "if") {
      auto n = if_rest(ln);
      end_tag("endif");
      return n;
    }
    if (name == "for") {
      auto n = make(Node::For, ln);
      n->x = sequence(true);
      if (n->x->kind != Node::Name && n->x->kind != Node::TupleLit) error("expected a loop variable");
      expect_name("in");
      n->y = expression();
      expect(Tok::CloseStmt, "'%}'");
      n->list = body({"endfor", "else"});
      if (is_stmt({"else"})) {
        p_ += 2;
        expect(Tok::CloseStmt, "'%}'");
        n->alt = body({"endfor"});
      }
      end_tag("endfor");
      return n;
    }
    if (name == "macro") {
      auto n = make(Node::Macro, ln);
      n->str = expect(Tok::Name, "a macro name").value;
      arguments(*n);
      expect(Tok::CloseStmt, "'%}'");
      n->alt = body({"endmacro"});
      end_tag("endmacro");
      return n;
    }
    if (name == "break" || name == "continue") {
      expect(Tok::CloseStmt, "'%}'");
      return make(name == "break" ? Node::Break : Node::Continue, ln);
    }
    error("unsupported statement '" + name + "'");
  }

  NodePtr if_rest(int ln) {
    auto n = make(Node::If, ln);
    n->x = expression();
    expect(Tok::CloseStmt, "'%}'");
    n->list = body({"elif", "else", "endif"});
    if (is_stmt({"elif"})) {
      p_ += 2;
      n->alt.push_back(if_rest(line()));
    } else if (is_stmt({"else"})) {
      p_ += 2;
      expect(Tok::CloseStmt, "'%}'");
      n->alt = body({"endif"});
    }
    return n;
  }

  // a, b, c — a tuple when there is a comma.
  NodePtr sequence(bool primary_only) {
    auto first = primary_only ? primary() : expression();
    if (!is(Tok::Comma)) return first;
    auto tup = make(Node::TupleLit, line());
    tup->list.push_back(std::move(first));
    while (is(Tok::Comma)) {
      ++p_;
      tup->list.push_back(primary_only ? primary() : expression());
    }
    return tup;
  }

  NodePtr expression() {
    Nest nest(*this);
    auto a = logic_or();
    if (!is_name("if")) return a;
    ++p_;
    auto cond = logic_or();
    if (is_name("else")) {
      ++p_;
      auto n = make(Node::Ternary, line());
      n->x = std::move(cond), n->y = std::move(a), n->z = expression();
      return n;
    }
    auto n = make(Node::Select, line());  // `items if cond` (a filtered for loop)
    n->x = std::move(cond), n->y = std::move(a);
    return n;
  }

  NodePtr binary(std::string op, NodePtr l, NodePtr r) {
    auto n = make(Node::Binary, line());
    n->str = std::move(op), n->x = std::move(l), n->y = std::move(r);
    return n;
  }

  NodePtr logic_or() {
    auto l = logic_and();
    while (is_name("or")) ++p_, l = binary("or", std::move(l), logic_and());
    return l;
  }
  NodePtr logic_and() {
    auto l = logic_not();
    while (is_name("and")) ++p_, l = binary("and", std::move(l), logic_not());
    return l;
  }
  NodePtr logic_not() {
    if (!is_name("not")) return comparison();
    ++p_;
    Nest nest(*this);
    auto n = make(Node::Unary, line());
    n->str = "not", n->x = logic_not();
    return n;
  }
  NodePtr comparison() {
    auto l = additive();
    while (true) {
      std::string op;
      if (is_name("not") && is_name("in", 1)) op = "not in", p_ += 2;
      else if (is_name("in")) op = "in", ++p_;
      else if (is(Tok::Compare)) op = t_[p_++].value;
      else break;
      l = binary(op, std::move(l), additive());
    }
    return l;
  }
  NodePtr additive() {
    auto l = multiplicative();
    while (is(Tok::Additive)) {
      const std::string op = t_[p_++].value;
      l = binary(op, std::move(l), multiplicative());
    }
    return l;
  }
  NodePtr multiplicative() {
    auto l = power();
    while (is(Tok::Multiplicative)) {
      const std::string op = t_[p_++].value;
      l = binary(op, std::move(l), power());
    }
    return l;
  }
  NodePtr power() {
    auto l = test();
    while (is(Tok::Power)) ++p_, l = binary("**", std::move(l), test());
    return l;
  }
  NodePtr test() {
    auto operand = filter();
    while (is_name("is")) {
      ++p_;
      auto n = make(Node::Test, line());
      if (is_name("not")) ++p_, n->flag = true;
      n->str = expect(Tok::Name, "a test name").value;
      n->x = std::move(operand);
      operand = std::move(n);
    }
    return operand;
  }
  NodePtr filter() {
    auto operand = unary_sign();
    while (is(Tok::Pipe)) {
      ++p_;
      auto n = make(Node::Filter, line());
      n->str = expect(Tok::Name, "a filter name").value;
      if (is(Tok::LParen)) n->flag = true, arguments(*n);
      n->x = std::move(operand);
      operand = std::move(n);
    }
    return operand;
  }
  NodePtr unary_sign() {
    if ((is(Tok::Unary) || is(Tok::Additive)) && (t_[p_].value == "-" || t_[p_].value == "+")) {
      Nest nest(*this);
      auto n = make(Node::Unary, line());
      n->str = t_[p_++].value;
      n->x = unary_sign();
      return n;
    }
    auto m = member(primary());
    while (is(Tok::LParen)) {
      auto c = make(Node::Call, line());
      c->x = std::move(m);
      arguments(*c);
      m = member(std::move(c));
    }
    return m;
  }

  // (a, b, key=value) into n.list / n.names.
  void arguments(Node& n) {
    expect(Tok::LParen, "'('");
    while (!is(Tok::RParen)) {
      auto a = expression();
      std::string key;
      if (is(Tok::Equals)) {
        if (a->kind != Node::Name) error("expected an identifier before '='");
        key = a->str;
        ++p_;
        a = expression();
      }
      n.list.push_back(std::move(a));
      n.names.push_back(key);
      if (is(Tok::Comma)) ++p_;
      else if (!is(Tok::RParen)) error("expected ',' or ')'");
    }
    ++p_;
  }

  NodePtr member(NodePtr obj) {
    while (is(Tok::Dot) || is(Tok::LBracket)) {
      const bool computed = t_[p_++].type == Tok::LBracket;
      auto n = make(Node::Member, line());
      n->x = std::move(obj);
      if (!computed) {
        auto prop = primary();
        if (prop->kind == Node::Name) {
          prop->kind = Node::Literal;
          prop->lit = Value::str(prop->str);
        } else if (!(prop->kind == Node::Literal && prop->lit.t == T::Int)) {
          error("expected an identifier or integer after '.'");
        }
        n->y = std::move(prop);
      } else {
        // [expr] or a slice [a:b:c]
        std::vector<NodePtr> parts;
        bool is_slice = false;
        while (!is(Tok::RBracket)) {
          if (p_ >= t_.size()) error("missing ']'");
          if (is(Tok::Colon)) {
            parts.push_back(nullptr);
            ++p_;
            is_slice = true;
          } else {
            parts.push_back(expression());
            if (is(Tok::Colon)) ++p_, is_slice = true;
          }
        }
        ++p_;
        if (parts.empty()) error("expected an index");
        if (is_slice) {
          if (parts.size() > 3) error("a slice has at most 3 parts");
          n->kind = Node::Slice;
          parts.resize(3);
          n->list = std::move(parts);
        } else {
          n->y = std::move(parts[0]);
        }
      }
      obj = std::move(n);
    }
    return obj;
  }

  NodePtr primary() {
    if (p_ >= t_.size()) error("unexpected end of template");
    const Token& tk = t_[p_++];
    auto n = make(Node::Literal, tk.line);
    switch (tk.type) {
      case Tok::Number: {
        long long v = 0;
        const char* end = tk.value.data() + tk.value.size();
        if (tk.value.find('.') == std::string::npos && std::from_chars(tk.value.data(), end, v).ptr == end) {
          n->lit = Value::integer(v);
        } else {  // a fraction, or an integer past 64 bits: a double, as JavaScript reads every number
          n->lit = Value::real(std::strtod(tk.value.c_str(), nullptr));
        }
        return n;
      }
      case Tok::String: {
        std::string s = tk.value;
        while (is(Tok::String)) s += t_[p_++].value;  // adjacent literals join
        n->lit = Value::str(std::move(s));
        return n;
      }
      case Tok::Name:
        n->kind = Node::Name;
        n->str = tk.value;
        return n;
      case Tok::LParen: {
        auto e = sequence(false);
        expect(Tok::RParen, "')'");
        return e;
      }
      case Tok::LBracket: {
        n->kind = Node::ArrayLit;
        while (!is(Tok::RBracket)) {
          if (p_ >= t_.size()) error("missing ']'");
          n->list.push_back(expression());
          if (is(Tok::Comma)) ++p_;
        }
        ++p_;
        return n;
      }
      case Tok::LBrace: {
        n->kind = Node::ObjectLit;
        while (!is(Tok::RBrace)) {
          if (p_ >= t_.size()) error("missing '}'");
          n->list.push_back(expression());
          expect(Tok::Colon, "':'");
          n->alt.push_back(expression());
          if (is(Tok::Comma)) ++p_;
        }
        ++p_;
        return n;
      }
      default: --p_; error("unexpected '" + tk.value + "'");
    }
  }

  std::vector<Token> t_;
  size_t p_ = 0;
  int depth_ = 0;  // current nesting of statements and expressions (see Nest)
};

// ---------------------------------------------------------------------------------------------
// Interpreter.

struct BreakSignal {};
struct ContinueSignal {};

class Interpreter {
 public:
  std::string block(const std::vector<NodePtr>& stmts, Env& env) {
    std::string out;
    for (auto& s : stmts) exec(*s, env, out);
    return out;
  }

 private:
  int depth_ = 0;  // nested evaluations (see eval)

  static void append(std::string& out, const std::string& piece) {
    check_string(out.size() + piece.size());
    charge_work(piece.size());
    out += piece;
  }
  void exec(const Node& n, Env& env, std::string& out) {
    switch (n.kind) {
      case Node::Block:
        return append(out, block(n.list, env));
      case Node::Text:
        return append(out, n.str);
      case Node::Output:
        return append(out, display(eval(*n.x, env)));
      case Node::If:
        return append(out, block(truthy(eval(*n.x, env)) ? n.list : n.alt, env));
      case Node::For: return exec_for(n, env, out);
      case Node::Set: return exec_set(n, env);
      case Node::Macro: return define_macro(n, env);
      case Node::Break: throw BreakSignal{};
      case Node::Continue: throw ContinueSignal{};
      default:
        return append(out, display(eval(n, env)));
    }
  }

  static void bind(const Node& target, const Value& v, Env& env) {
    if (target.kind == Node::Name) return void(env.vars[target.str] = v);
    if (v.t != T::Array) fail(std::string("Cannot unpack non-iterable type: ") + type_name(v.t));
    if (v.arr->size() != target.list.size())
      fail(std::string("Too ") + (target.list.size() > v.arr->size() ? "few" : "many") + " items to unpack");
    for (size_t k = 0; k < target.list.size(); ++k) {
      if (target.list[k]->kind != Node::Name) fail("Cannot unpack to a non-identifier");
      env.vars[target.list[k]->str] = (*v.arr)[k];
    }
  }

  void exec_for(const Node& n, Env& env, std::string& out) {
    Env scope{&env, {}};
    const Node* iter = n.y.get();
    const Node* cond = nullptr;
    if (iter->kind == Node::Select) cond = iter->x.get(), iter = iter->y.get();
    Value it = eval(*iter, scope);
    if (it.t == T::Object) {
      Array keys;
      for (auto& [k, v] : *it.obj) keys.push_back(Value::str(k));
      it = Value::array(std::move(keys));
    }
    if (it.t != T::Array) fail(std::string("Expected iterable or object type in for loop: got ") + type_name(it.t));
    Array items;
    for (const Value& v : *it.arr) {
      if (cond) {
        Env probe{&scope, {}};
        bind(*n.x, v, probe);
        if (!truthy(eval(*cond, probe))) continue;
      }
      items.push_back(v);
    }
    charge_work(container_bytes(items));
    const int64_t len = int64_t(items.size());
    for (int64_t i = 0; i < len; ++i) {
      charge_step();
      Object loop = {{"index", Value::integer(i + 1)},       {"index0", Value::integer(i)},
                     {"revindex", Value::integer(len - i)},  {"revindex0", Value::integer(len - i - 1)},
                     {"first", Value::boolean(i == 0)},      {"last", Value::boolean(i == len - 1)},
                     {"length", Value::integer(len)},        {"previtem", i > 0 ? items[i - 1] : Value{}},
                     {"nextitem", i < len - 1 ? items[i + 1] : Value{}}};
      scope.vars["loop"] = Value::object(std::move(loop));
      bind(*n.x, items[i], scope);
      try {
        append(out, block(n.list, scope));
      } catch (const ContinueSignal&) {
        continue;
      } catch (const BreakSignal&) {
        break;
      }
    }
    if (items.empty()) append(out, block(n.alt, scope));
  }

  void exec_set(const Node& n, Env& env) {
    Value v = n.y ? eval(*n.y, env) : Value::str(block(n.list, env));
    const Node& target = *n.x;
    if (target.kind == Node::Member) {
      Value obj = eval(*target.x, env);
      if (obj.t != T::Namespace) fail("cannot assign attribute on non-namespace object");
      if (!target.y || target.y->kind != Node::Literal || target.y->lit.t != T::Str)
        fail("Cannot assign to member with non-identifier property");
      obj.set(target.y->lit.s, std::move(v));
      return;
    }
    if (target.kind != Node::Name && target.kind != Node::TupleLit) fail("Invalid left-hand side of set");
    bind(target, v, env);
  }

  void define_macro(const Node& n, Env& env) {
    const Node* def = &n;
    env.vars[n.str] = Value::func([this, def](std::vector<Value>& args, Env& caller) {
      charge_step();
      Env scope{&caller, {}};
      Object kw;
      if (!args.empty() && args.back().kwargs) kw = *args.back().obj, args.pop_back();
      if (args.size() > def->list.size())
        fail("macro '" + def->str + "' takes not more than " + std::to_string(def->list.size()) + " argument(s)");
      std::vector<const Node*> defaults;
      for (size_t k = 0; k < def->list.size(); ++k) {
        const std::string& name = def->names[k].empty() ? def->list[k]->str : def->names[k];
        Value v;
        bool have = k < args.size();
        if (have) v = args[k];
        for (auto it = kw.begin(); !have && it != kw.end(); ++it)
          if (it->first == name) v = it->second, kw.erase(it), have = true;
        if (!have && !def->names[k].empty()) defaults.push_back(def->list[k].get());
        scope.vars[name] = have ? v : Value{};
      }
      if (!kw.empty()) fail("macro '" + def->str + "' takes no keyword argument '" + kw[0].first + "'");
      for (size_t k = 0, d = 0; k < def->list.size(); ++k) {
        const std::string& name = def->names[k].empty() ? def->list[k]->str : def->names[k];
        if (d < defaults.size() && defaults[d] == def->list[k].get()) scope.vars[name] = eval(*defaults[d++], scope);
      }
      return Value::str(block(def->alt, scope));
    });
  }

  // Positional arguments, then one trailing kwargs object when there are keyword arguments.
  std::vector<Value> call_args(const Node& n, Env& env, Object* kwargs_out = nullptr) {
    std::vector<Value> args;
    Object kw;
    for (size_t k = 0; k < n.list.size(); ++k) {
      if (n.names[k].empty()) args.push_back(eval(*n.list[k], env));
    }
    for (size_t k = 0; k < n.list.size(); ++k) {
      if (n.names[k].empty()) continue;
      for (auto& [key, v] : kw)
        if (key == n.names[k]) fail("Got multiple values for keyword argument '" + key + "'");
      kw.emplace_back(n.names[k], eval(*n.list[k], env));
    }
    if (kwargs_out) {
      *kwargs_out = std::move(kw);
    } else if (!kw.empty()) {
      Value k = Value::object(std::move(kw));
      k.kwargs = true;
      args.push_back(std::move(k));
    }
    return args;
  }

 public:
  Value eval(const Node& n, Env& env) {
    // Nested evaluations (a macro calling itself) end in an error, not a stack overflow; 400
    // levels, 120-deep expressions at each, fit an 8 MiB stack in fuzz_chat_template's
    // AddressSanitizer build.
    struct Level {
      int& depth;
      explicit Level(int& d) : depth(d) {
        if (++depth > kMaxEvalDepth) --depth, fail("template recursion deeper than 400 levels");
      }
      ~Level() { --depth; }
    } level(depth_);
    switch (n.kind) {
      case Node::Literal: return n.lit;
      case Node::Name: return env.lookup(n.str);
      case Node::ArrayLit: case Node::TupleLit: {
        Array a;
        for (auto& x : n.list) a.push_back(eval(*x, env));
        return Value::array(std::move(a));
      }
      case Node::ObjectLit: {
        Value o = Value::object();
        for (size_t k = 0; k < n.list.size(); ++k) {
          Value key = eval(*n.list[k], env);
          if (key.t != T::Str) fail(std::string("Object keys must be strings: got ") + type_name(key.t));
          o.set(key.s, eval(*n.alt[k], env));
        }
        return o;
      }
      case Node::Member: return member(eval(*n.x, env), eval(*n.y, env));
      case Node::Slice: return slice(n, env);
      case Node::Call: {
        auto args = call_args(n, env);
        Value f = eval(*n.x, env);
        if (f.t != T::Func) fail(std::string("Cannot call something that is not a function: got ") + type_name(f.t));
        return (*f.fn)(args, env);
      }
      case Node::Filter: return filter(n, eval(*n.x, env), env);
      case Node::Test: {
        const bool r = test(n.str, eval(*n.x, env));
        return Value::boolean(n.flag ? !r : r);
      }
      case Node::Unary: {
        Value v = eval(*n.x, env);
        if (n.str == "not") return Value::boolean(!truthy(v));
        const double sign = n.str == "-" ? -1 : 1;
        if (v.t == T::Float) return Value::real(sign * v.f);
        if (v.t == T::Int) return Value::integer(int64_t(sign) * v.i);
        if (v.t == T::Bool) return Value::integer(int64_t(sign) * v.b);
        fail("Unknown operator \"" + n.str + "\" for " + type_name(v.t));
      }
      case Node::Binary: return binary(n, env);
      case Node::Ternary: return truthy(eval(*n.x, env)) ? eval(*n.y, env) : eval(*n.z, env);
      case Node::Select: return truthy(eval(*n.x, env)) ? eval(*n.y, env) : Value{};
      default: fail("statement used as an expression");
    }
  }

 private:
  Value slice(const Node& n, Env& env) {
    Value obj = eval(*n.x, env);
    std::optional<int64_t> part[3];
    for (int k = 0; k < 3; ++k) {
      if (!n.list[k]) continue;
      Value v = eval(*n.list[k], env);
      if (v.t == T::Undefined) continue;
      if (v.t != T::Int) fail("Slice indices must be integers");
      part[k] = v.i;
    }
    const int64_t step = part[2].value_or(1);
    if (obj.t == T::Array) return Value::array(slice_seq(*obj.arr, part[0], part[1], step));
    if (obj.t == T::Str) {
      std::string s;
      for (char32_t c : slice_seq(code_points(obj.s), part[0], part[1], step)) append_utf8(s, c);
      return Value::str(std::move(s));
    }
    fail("Slice object must be an array or string");
  }

  // Python-style methods of strings and mappings.
  Value builtin(const Value& self, const std::string& name) {
    if (self.t == T::Str) {
      if (name == "length") return Value::integer(utf16_length(self.s));
      static const char* kMethods[] = {"upper", "lower", "strip", "title", "capitalize", "rstrip", "lstrip",
                                       "startswith", "endswith", "split", "replace"};
      if (std::find(std::begin(kMethods), std::end(kMethods), name) == std::end(kMethods)) return {};
      const std::string s = self.s;
      return Value::func([s, name](std::vector<Value>& args, Env&) -> Value {
        // The engine's strip/lstrip/rstrip take no characters: they trim whitespace whatever is passed.
        if (name == "upper" || name == "lower") return Value::str(ascii_case(s, name == "upper"));
        if (name == "strip") return Value::str(std::string(trim_js(s, true, true)));
        if (name == "lstrip") return Value::str(std::string(trim_js(s, true, false)));
        if (name == "rstrip") return Value::str(std::string(trim_js(s, false, true)));
        if (name == "title") return Value::str(title_case(s));
        if (name == "capitalize") {
          std::string r = s;
          if (!r.empty() && r[0] >= 'a' && r[0] <= 'z') r[0] ^= 0x20;
          return Value::str(r);
        }
        if (name == "startswith" || name == "endswith") {
          if (args.empty()) fail(name + "() requires at least one argument");
          auto test = [&](const std::string& p) { return name == "startswith" ? s.starts_with(p) : s.ends_with(p); };
          if (args[0].t == T::Str) return Value::boolean(test(args[0].s));
          if (args[0].t == T::Array) {
            for (auto& p : *args[0].arr) {
              if (p.t != T::Str) fail(name + "() tuple elements must be strings");
              if (test(p.s)) return Value::boolean(true);
            }
            return Value::boolean(false);
          }
          fail(name + "() argument must be a string or tuple of strings");
        }
        if (name == "split") {
          const Value sep = args.size() > 0 ? args[0] : Value::null();
          const Value max = args.size() > 1 ? args[1] : Value::integer(-1);
          if (sep.t != T::Str && sep.t != T::Null) fail("sep argument must be a string or null");
          if (max.t != T::Int) fail("maxsplit argument must be a number");
          Array parts;
          if (sep.t == T::Null) {
            // Runs of whitespace separate; none at either end makes an empty part.
            const std::string_view rest = trim_js(s, true, false);
            size_t i = 0;
            while (i < rest.size()) {
              const size_t b = rest.size() - trim_js(rest.substr(i), true, false).size();
              if (b >= rest.size()) break;
              if (max.i != -1 && int64_t(parts.size()) >= max.i) {
                parts.push_back(Value::str(std::string(rest.substr(b))));
                break;
              }
              size_t e = b;
              while (e < rest.size()) {
                size_t k = e;
                if (is_js_space(decode_utf8(rest, k))) break;
                e = k;
              }
              parts.push_back(Value::str(std::string(rest.substr(b, e - b))));
              i = e;
            }
          } else {
            if (sep.s.empty()) fail("empty separator");
            auto pieces = split_str(s, sep.s);
            if (max.i != -1 && int64_t(pieces.size()) > max.i) {
              std::string tail = pieces[size_t(max.i)];
              for (size_t k = size_t(max.i) + 1; k < pieces.size(); ++k) tail += sep.s + pieces[k];
              pieces.resize(size_t(max.i));
              pieces.push_back(tail);
            }
            for (auto& p : pieces) parts.push_back(Value::str(p));
          }
          return Value::array(std::move(parts));
        }
        // replace(old, new[, count])
        if (args.size() < 2) fail("replace() requires at least two arguments");
        if (args[0].t != T::Str || args[1].t != T::Str) fail("replace() arguments must be strings");
        Value count = Value::null();
        if (args.size() > 2) {
          if (args[2].kwargs) {
            if (auto* c = args[2].get("count")) count = *c;
          } else {
            count = args[2];
          }
        }
        if (count.t != T::Int && count.t != T::Null) fail("replace() count argument must be a number or null");
        return Value::str(replace_str(s, args[0].s, args[1].s, count.t == T::Int ? count.i : -1));
      });
    }
    if (self.t == T::Array) return name == "length" ? Value::integer(int64_t(self.arr->size())) : Value{};
    if (self.t != T::Object) return {};
    const Value obj = self;
    if (name == "get") {
      return Value::func([obj](std::vector<Value>& args, Env&) -> Value {
        if (args.empty() || args[0].t != T::Str) fail("Object key must be a string");
        if (auto* v = obj.get(args[0].s)) return *v;
        return args.size() > 1 ? args[1] : Value::null();
      });
    }
    if (name == "items" || name == "keys" || name == "values") {
      return Value::func([obj, name](std::vector<Value>&, Env&) {
        Array out;
        for (auto& [k, v] : *obj.obj) {
          if (name == "items") out.push_back(Value::array({Value::str(k), v}));
          else out.push_back(name == "keys" ? Value::str(k) : v);
        }
        return Value::array(std::move(out));
      });
    }
    return {};
  }

  Value member(const Value& obj, const Value& prop) {
    if (obj.t == T::Object || obj.t == T::Namespace) {
      if (prop.t != T::Str) fail(std::string("Cannot access property with non-string: got ") + type_name(prop.t));
      if (auto* v = obj.get(prop.s)) return *v;
      return obj.t == T::Object ? builtin(obj, prop.s) : Value{};
    }
    if (obj.t == T::Array || obj.t == T::Str) {
      if (prop.t == T::Int) {
        if (obj.t == T::Array) {
          const int64_t n = int64_t(obj.arr->size()), k = prop.i < 0 ? n + prop.i : prop.i;
          return k >= 0 && k < n ? (*obj.arr)[size_t(k)] : Value{};
        }
        const auto cps = code_points(obj.s);
        const int64_t n = int64_t(cps.size()), k = prop.i < 0 ? n + prop.i : prop.i;
        if (k < 0 || k >= n) return {};
        std::string c;
        append_utf8(c, cps[size_t(k)]);
        return Value::str(c);
      }
      if (prop.t == T::Str) return builtin(obj, prop.s);
      fail(std::string("Cannot access property with non-string/non-number: got ") + type_name(prop.t));
    }
    if (prop.t != T::Str) fail(std::string("Cannot access property with non-string: got ") + type_name(prop.t));
    return {};
  }

  static int compare(const Value& a, const Value& b, bool case_sensitive) {
    if (a.t == T::Null && b.t == T::Null) return 0;
    if (a.t == T::Undefined && b.t == T::Undefined) return 0;
    const bool an = a.is_number() || a.t == T::Bool, bn = b.is_number() || b.t == T::Bool;
    if (an && bn) return a.num() < b.num() ? -1 : a.num() > b.num() ? 1 : 0;
    if (a.t != b.t) fail(std::string("Cannot compare ") + type_name(a.t) + " with " + type_name(b.t));
    if (a.t != T::Str) fail(std::string("Cannot compare type: ") + type_name(a.t));
    const std::string x = case_sensitive ? a.s : ascii_case(a.s, false), y = case_sensitive ? b.s : ascii_case(b.s, false);
    return x < y ? -1 : x > y ? 1 : 0;
  }

  static bool test(const std::string& name, const Value& v) {
    if (name == "defined") return v.t != T::Undefined;
    if (name == "undefined") return v.t == T::Undefined;
    if (name == "none") return v.t == T::Null;
    if (name == "boolean") return v.t == T::Bool;
    if (name == "true") return v.t == T::Bool && v.b;
    if (name == "false") return v.t == T::Bool && !v.b;
    if (name == "string") return v.t == T::Str;
    if (name == "number") return v.is_number();
    if (name == "integer") return v.t == T::Int;
    if (name == "iterable") return v.t == T::Array || v.t == T::Str;
    if (name == "mapping") return v.t == T::Object;
    if (name == "sequence") return v.t == T::Array || v.t == T::Object || v.t == T::Str;
    if (name == "callable") return v.t == T::Func;
    if (name == "lower" || name == "upper") return v.t == T::Str && v.s == ascii_case(v.s, name == "upper");
    if (name == "odd" || name == "even") {
      if (v.t != T::Int) fail("cannot " + name + " on " + type_name(v.t));
      return (v.i % 2 != 0) == (name == "odd");
    }
    fail("Unknown test: " + name);
  }

  Value filter(const Node& n, const Value& v, Env& env) {
    const std::string& f = n.str;
    if (f == "safe") return v;
    if (f == "tojson") {
      JsonStyle st;
      if (n.flag) {
        Object kw;
        call_args(n, env, &kw);
        for (auto& [k, x] : kw) {
          if (k == "indent") {
            if (x.t != T::Int && x.t != T::Null) fail("If set, indent must be a number");
            // A negative indent indents as 0 does; past the longest string, the first pad fails.
            st.indent = x.t == T::Int ? int(std::clamp<int64_t>(x.i, 0, int64_t(kMaxString) + 1)) : 0;
          } else if (k == "ensure_ascii" || k == "sort_keys") {
            if (x.t != T::Bool) fail("If set, " + k + " must be a boolean");
            (k == "ensure_ascii" ? st.ensure_ascii : st.sort_keys) = x.b;
          } else if (k == "separators") {
            if (x.t != T::Array || x.arr->size() != 2 || (*x.arr)[0].t != T::Str || (*x.arr)[1].t != T::Str)
              fail("separators must be a tuple of two strings");
            st.item_sep = (*x.arr)[0].s, st.key_sep = (*x.arr)[1].s, st.custom_separators = true;
          }
        }
      }
      return Value::str(json_of(v, st));
    }
    if (f == "default") {
      Object kw;
      const auto args = n.flag ? call_args(n, env, &kw) : std::vector<Value>{};
      const Value dflt = args.empty() ? Value::str("") : args[0];
      const Value* boolean = args.size() > 1 ? &args[1] : nullptr;
      for (auto& [k, x] : kw)
        if (k == "boolean" && !boolean) boolean = &x;
      if (boolean && boolean->t != T::Bool) fail("`default` filter flag must be a boolean");
      return v.t == T::Undefined || (boolean && boolean->b && !truthy(v)) ? dflt : v;
    }
    std::vector<Value> args;
    Object kw;
    if (n.flag) args = call_args(n, env, &kw);
    auto arg = [&](size_t k, const char* key) -> const Value* {
      if (k < args.size()) return &args[k];
      for (auto& [name, x] : kw)
        if (name == key) return &x;
      return nullptr;
    };
    if (v.t == T::Array) {
      const Array& a = *v.arr;
      if (f == "list") return v;
      if (f == "first") return a.empty() ? Value{} : a.front();
      if (f == "last") return a.empty() ? Value{} : a.back();
      if (f == "length") return Value::integer(int64_t(a.size()));
      if (f == "reverse") return Value::array(Array(a.rbegin(), a.rend()));
      if (f == "join") {
        const Value* sep = arg(0, "separator");
        if (sep && sep->t != T::Str) fail("separator must be a string");
        std::string out;
        for (size_t k = 0; k < a.size(); ++k) {
          const std::string piece = concat_text(a[k]);
          check_string(out.size() + (k && sep ? sep->s.size() : 0) + piece.size());
          out += (k && sep ? sep->s : "") + piece;
        }
        return Value::str(out);
      }
      if (f == "string") {
        JsonStyle st;
        st.undefined_as_null = false;
        return Value::str(json_of(v, st));
      }
      if (f == "unique") {
        Array out;
        for (auto& x : a)
          if (std::none_of(out.begin(), out.end(), [&](const Value& y) { return strict_equal(x, y); })) out.push_back(x);
        return Value::array(std::move(out));
      }
      if (f == "sort") {
        const Value* rev = arg(0, "reverse");
        const Value* cs = arg(1, "case_sensitive");
        const Value* attr = arg(2, "attribute");
        Array out = a;
        auto key = [&](const Value& x) { return attr && attr->t == T::Str ? attribute(x, attr->s) : x; };
        std::stable_sort(out.begin(), out.end(), [&](const Value& x, const Value& y) {
          const int c = compare(key(x), key(y), cs && cs->t == T::Bool && cs->b);
          return rev && rev->t == T::Bool && rev->b ? c > 0 : c < 0;
        });
        return Value::array(std::move(out));
      }
      if (f == "selectattr" || f == "rejectattr") {
        if (args.empty() || args[0].t != T::Str) fail("arguments of `" + f + "` must be strings");
        Array out;
        for (auto& x : a) {
          if (x.t != T::Object && x.t != T::Namespace) fail("`" + f + "` can only be applied to array of objects");
          const Value* attr = x.get(args[0].s);
          bool r = false;
          if (attr) r = args.size() > 1 ? (args[1].s == "equalto" || args[1].s == "eq"
                                                ? args.size() > 2 && strict_equal(*attr, args[2])
                                                : test(args[1].s, *attr))
                                        : truthy(*attr);
          if (r == (f == "selectattr")) out.push_back(x);
        }
        return Value::array(std::move(out));
      }
      if (f == "map") {
        const Value* attr = arg(99, "attribute");
        if (!attr) fail("`map` expressions without `attribute` set are not currently supported.");
        if (attr->t != T::Str) fail("attribute must be a string");
        const Value* dflt = arg(99, "default");
        Array out;
        for (auto& x : a) {
          if (x.t != T::Object && x.t != T::Namespace) fail("items in map must be an object");
          Value y = attribute(x, attr->s);
          out.push_back(y.t == T::Undefined && dflt ? *dflt : y);
        }
        return Value::array(std::move(out));
      }
      fail("Unknown ArrayValue filter: " + f);
    }
    if (v.t == T::Str) {
      if (f == "length") return Value::integer(utf16_length(v.s));
      if (f == "upper" || f == "lower") return Value::str(ascii_case(v.s, f == "upper"));
      if (f == "title") return Value::str(title_case(v.s));
      if (f == "capitalize") {
        std::vector<Value> none;
        return (*builtin(v, "capitalize").fn)(none, env);
      }
      if (f == "trim") return Value::str(std::string(trim_js(v.s, true, true)));
      if (f == "string") return v;
      if (f == "join") {
        const Value* sep = arg(0, "separator");
        std::string out;
        bool first = true;
        for (char32_t c : code_points(v.s)) {
          check_string(out.size() + (sep ? sep->s.size() : 0) + 4);  // 4: one code point's bytes
          if (!first && sep) out += sep->s;
          append_utf8(out, c), first = false;
        }
        return Value::str(out);
      }
      if (f == "int" || f == "float") {
        const char* b = v.s.c_str();
        char* e;
        if (f == "int") {
          const int64_t i = std::strtoll(b, &e, 10);  // clamped to int64, never through a double
          if (e != b) return Value::integer(i);
        } else {
          const double d = std::strtod(b, &e);
          if (e != b) return Value::real(d);
        }
        const Value* dflt = arg(0, "default");
        return dflt ? *dflt : f == "int" ? Value::integer(0) : Value::real(0);
      }
      if (f == "indent") {
        const Value* w = arg(0, "width");
        if (w && w->t != T::Int) fail("width must be a number");
        const Value* first = arg(1, "first");
        const Value* blank = arg(2, "blank");
        auto lines = split_str(v.s, "\n");
        const int64_t width = w ? std::max<int64_t>(w->i, 0) : 4;  // Python's ' ' * width: none when negative
        if (uint64_t(width) > kMaxString / lines.size()) fail("indent width would make a string longer than 16 MiB");
        const std::string pad(size_t(width), ' ');
        std::string out;
        for (size_t k = 0; k < lines.size(); ++k) {
          if (k) out += '\n';
          const bool skip = (k == 0 && !(first && truthy(*first))) || (lines[k].empty() && !(blank && truthy(*blank)));
          out += (skip ? "" : pad) + lines[k];
        }
        return Value::str(out);
      }
      if (f == "replace") {
        std::vector<Value> a = args;
        if (!kw.empty()) {
          Value k = Value::object(kw);
          k.kwargs = true;
          a.push_back(k);
        }
        return (*builtin(v, "replace").fn)(a, env);
      }
      fail("Unknown StringValue filter: " + f);
    }
    if (v.is_number()) {
      if (f == "abs") return v.t == T::Int ? Value::integer(std::llabs(v.i)) : Value::real(std::fabs(v.f));
      if (f == "int") return v.t == T::Int ? v : Value::integer(int64_t(std::floor(v.f)));
      if (f == "float") return Value::real(v.num());
      if (f == "string") return Value::str(display(v));
      fail("Unknown NumericValue filter: " + f);
    }
    if (v.t == T::Object) {
      if (f == "items" || f == "keys" || f == "values") {
        std::vector<Value> none;
        return (*builtin(v, f).fn)(none, env);
      }
      if (f == "length") return Value::integer(int64_t(v.obj->size()));
      fail("Unknown ObjectValue filter: " + f);
    }
    if (v.t == T::Bool) {
      if (f == "bool") return v;
      if (f == "int") return Value::integer(v.b);
      if (f == "float") return Value::real(v.b);
      if (f == "string") return Value::str(v.b ? "true" : "false");
      fail("Unknown BooleanValue filter: " + f);
    }
    fail("Cannot apply filter \"" + f + "\" to type: " + type_name(v.t));
  }

  static Value attribute(const Value& x, const std::string& path) {  // "a.b.0"
    Value cur = x;
    for (const std::string& part : split_str(path, ".")) {
      if (cur.t == T::Object || cur.t == T::Namespace) {
        const Value* v = cur.get(part);
        if (!v) return {};
        cur = *v;
      } else if (cur.t == T::Array) {
        int64_t k = -1;
        std::from_chars(part.data(), part.data() + part.size(), k);
        if (k < 0 || k >= int64_t(cur.arr->size())) return {};
        cur = (*cur.arr)[size_t(k)];
      } else {
        return {};
      }
    }
    return cur;
  }

  Value binary(const Node& n, Env& env) {
    const std::string& op = n.str;
    Value l = eval(*n.x, env);
    if (op == "and") return truthy(l) ? eval(*n.y, env) : l;
    if (op == "or") return truthy(l) ? l : eval(*n.y, env);
    Value r = eval(*n.y, env);
    if (op == "==") return Value::boolean(loose_equal(l, r));
    if (op == "!=") return Value::boolean(!loose_equal(l, r));
    if (l.t == T::Undefined || r.t == T::Undefined) {
      if (r.t == T::Undefined && (op == "in" || op == "not in")) return Value::boolean(op == "not in");
      fail("Cannot perform operation " + op + " on undefined values");
    }
    if (l.t == T::Null || r.t == T::Null) fail("Cannot perform operation on null values");
    if (op == "~") return Value::str(concat_text(l) + concat_text(r));
    const bool ln = l.is_number() || l.t == T::Bool, rn = r.is_number() || r.t == T::Bool;
    if (op == "**" && ln && rn) {
      const double a = l.num(), b = r.num();
      if (a == 0 && b < 0) fail("0.0 cannot be raised to a negative power");
      const double res = std::pow(a, b);
      if (!std::isfinite(res)) fail("Exponentiation result is not a finite real number");
      return l.t == T::Float || r.t == T::Float || b < 0 ? Value::real(res) : int_or_real(res);
    }
    if (l.is_number() && r.is_number()) {
      const bool fl = l.t == T::Float || r.t == T::Float;
      auto num = [&](double x) { return fl ? Value::real(x) : int_or_real(x); };
      if (!fl && (op == "+" || op == "-" || op == "*")) {
        int64_t x;
        const bool over = op == "+"   ? __builtin_add_overflow(l.i, r.i, &x)
                          : op == "-" ? __builtin_sub_overflow(l.i, r.i, &x)
                                      : __builtin_mul_overflow(l.i, r.i, &x);
        if (!over) return Value::integer(x);  // else the double result, as JavaScript computes it
      }
      const double a = l.num(), b = r.num();
      if (op == "+") return num(a + b);
      if (op == "-") return num(a - b);
      if (op == "*") return num(a * b);
      if (op == "/") return Value::real(a / b);
      if (op == "//") return num(std::floor(a / b));
      if (op == "%") return fl ? Value::real(std::fmod(a, b)) : Value::integer(r.i == 0 || r.i == -1 ? 0 : l.i % r.i);
      if (op == "<") return Value::boolean(a < b);
      if (op == ">") return Value::boolean(a > b);
      if (op == "<=") return Value::boolean(a <= b);
      if (op == ">=") return Value::boolean(a >= b);
    } else if (l.t == T::Array && r.t == T::Array) {
      if (op == "+") {
        Array a = *l.arr;
        a.insert(a.end(), r.arr->begin(), r.arr->end());
        return Value::array(std::move(a));
      }
    } else if (r.t == T::Array) {
      const bool found = std::any_of(r.arr->begin(), r.arr->end(), [&](const Value& x) { return strict_equal(x, l); });
      if (op == "in") return Value::boolean(found);
      if (op == "not in") return Value::boolean(!found);
    }
    if ((l.t == T::Str || r.t == T::Str) && op == "+") return Value::str(concat_text(l) + concat_text(r));
    if (l.t == T::Str && r.t == T::Str && (op == "in" || op == "not in"))
      return Value::boolean((r.s.find(l.s) != std::string::npos) == (op == "in"));
    if (l.t == T::Str && r.t == T::Object && (op == "in" || op == "not in"))
      return Value::boolean((r.get(l.s) != nullptr) == (op == "in"));
    fail("Unknown operator \"" + op + "\" between " + type_name(l.t) + " and " + type_name(r.t));
  }
};

Value make_namespace(std::vector<Value>& args) {
  Value ns = Value::object({}, T::Namespace);
  Object kw;
  if (!args.empty() && args.back().kwargs) kw = *args.back().obj, args.pop_back();
  if (args.size() > 1) fail("namespace expected at most 1 argument, got " + std::to_string(args.size()));
  if (args.size() == 1) {
    if (args[0].t == T::Object) {
      for (auto& [k, v] : *args[0].obj) ns.set(k, v);
    } else if (args[0].t == T::Array) {
      for (auto& pair : *args[0].arr) {
        if (pair.t != T::Array || pair.arr->size() != 2 || (*pair.arr)[0].t != T::Str)
          fail("namespace expected an object or an iterable of [key, value] pairs");
        ns.set((*pair.arr)[0].s, (*pair.arr)[1]);
      }
    } else {
      fail(std::string("'") + type_name(args[0].t) + "' object is not iterable");
    }
  }
  for (auto& [k, v] : kw) ns.set(k, v);
  return ns;
}

}  // namespace

ChatTemplate::ChatTemplate(std::string_view source, std::string name) : name_(std::move(name)) {
  // The lexer walks code points; JSON strings are valid UTF-8 already, raw bytes may not be.
  if (const size_t bad = invalid_utf8_at(source); bad != std::string_view::npos)
    throw Error(name_ + ": invalid UTF-8 at byte " + std::to_string(bad));
  try {
    root_ = Parser(lex(std::string(source))).program();
  } catch (const RenderError& e) {
    throw Error(name_ + ": " + e.what());
  }
}

ChatTemplate::~ChatTemplate() = default;

std::string ChatTemplate::render(const nlohmann::ordered_json& vars) const {
  Env globals;
  // A namespace is the one value a template can change (`set ns.x = ...`), so the one way to a
  // reference cycle (`set ns.self = ns`), which shared_ptr never frees: every namespace this
  // render made is emptied when it ends, however it ends (libFuzzer's leak check found it).
  std::vector<std::shared_ptr<Object>> namespaces;
  struct EmptyAtEnd {
    std::vector<std::shared_ptr<Object>>& all;
    ~EmptyAtEnd() {
      for (auto& ns : all) ns->clear();
    }
  } empty_at_end{namespaces};
  RenderBudget budget;
  struct Billed {  // this thread's renders are billed to `budget` until this one ends
    RenderBudget* outer = t_budget;
    explicit Billed(RenderBudget* b) { t_budget = b; }
    ~Billed() { t_budget = outer; }
  } billed(&budget);
  globals.vars["true"] = globals.vars["True"] = Value::boolean(true);
  globals.vars["false"] = globals.vars["False"] = Value::boolean(false);
  globals.vars["none"] = globals.vars["None"] = Value::null();
  globals.vars["namespace"] = Value::func([&namespaces](std::vector<Value>& a, Env&) {
    Value ns = make_namespace(a);
    namespaces.push_back(ns.obj);
    return ns;
  });
  globals.vars["raise_exception"] = Value::func([](std::vector<Value>& a, Env&) -> Value {
    fail(a.empty() ? std::string("raise_exception") : concat_text(a[0]));
  });
  globals.vars["range"] = Value::func([](std::vector<Value>& a, Env&) {
    if (a.empty() || a.size() > 3) fail("range expected 1 to 3 arguments");
    for (auto& x : a)
      if (x.t != T::Int) fail("range arguments must be integers");
    const int64_t start = a.size() > 1 ? a[0].i : 0, stop = a.size() > 1 ? a[1].i : a[0].i,
                  step = a.size() > 2 ? a[2].i : 1;
    if (step == 0) fail("range() step must not be zero");
    const __int128 span = step > 0 ? __int128(stop) - start : __int128(start) - stop,
                   by = step > 0 ? step : -__int128(step);
    const __int128 n = span > 0 ? (span + by - 1) / by : 0;
    if (n > kMaxRange) fail("range() of more than 100000 numbers");
    Array out;
    for (int64_t k = 0; k < int64_t(n); ++k) out.push_back(Value::integer(int64_t(start + __int128(k) * step)));
    return Value::array(std::move(out));
  });
  if (!vars.is_object()) throw Error(name_ + ": variables must be a JSON object");
  try {
    for (auto& [k, v] : vars.items()) globals.vars[k] = from_json(v);
    Interpreter in;
    return in.block(root_->list, globals);
  } catch (const RenderError& e) {
    throw Error(name_ + ": " + e.what());
  } catch (const BreakSignal&) {
    throw Error(name_ + ": break outside a loop");
  } catch (const ContinueSignal&) {
    throw Error(name_ + ": continue outside a loop");
  }
}

}  // namespace hla::text
