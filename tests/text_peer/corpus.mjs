// The conformance corpus: fixed samples of many scripts and formats plus seeded random mixtures.
// Deterministic for a given seed, so a failure can be reproduced.

export function rng(seed) {
  let s = seed >>> 0;
  const next = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n) => Math.floor(next() * n);
  return { next, int, pick: (a) => a[int(a.length)] };
}

const SAMPLES = [
  // English, contractions in both cases
  "Hello, world! How's it going?", "I'm sure you'll see they've done it; we'd known, and it's fine.",
  "DON'T SHOUT: IT'S, WE'LL, THEY'VE, I'M, HE'D", "The quick brown fox jumps over the lazy dog.",
  "  leading spaces", "trailing spaces   ", "tab\tseparated\tvalues\t", "line one\nline two\r\nline three\rfour",
  "\n\n\n", "   \n   \n", " \t \n \t ", "a  b   c    d", "end with newline\n", "ellipsis... and — dashes – here",
  "E-mail: someone@example.com, URL: https://example.org/path?q=1&r=2#frag",
  // numbers of many lengths
  "0", "7", "42", "123", "1234", "12345", "1234567", "3.14159", "-273.15", "1,000,000", "6.02e23", "0x1F", "2024-06-01",
  "v1.2.3", "99 bottles", "x1y22z333w4444", "١٢٣ ٤٥٦", "१२३४", "①②③", "Ⅻ", "½ ¾",
  // Chinese, Japanese, Korean
  "你好，世界！今天天气很好。", "人工智能正在改变世界，大型语言模型可以生成文本。", "我爱北京天安门", "繁體中文測試：臺灣、香港",
  "こんにちは、世界！今日はいい天気ですね。", "カタカナとひらがなと漢字を混ぜた文章です。", "ｶﾀｶﾅ半角", "東京スカイツリー634m",
  "안녕하세요, 세계! 오늘 날씨가 좋네요.", "한국어 텍스트와 English mixed 텍스트",
  // other scripts
  "مرحبا بالعالم! كيف حالك اليوم؟", "اللغة العربية جميلة", "नमस्ते दुनिया! आज मौसम अच्छा है।", "हिन्दी में लिखा गया वाक्य",
  "Привет, мир! Как дела?", "Съешь же ещё этих мягких французских булок, да выпей чаю.", "שלום עולם", "Γειά σου Κόσμε",
  "สวัสดีชาวโลก", "Xin chào thế giới, tiếng Việt có dấu", "Ελληνικά και Русский и English", "ქართული ენა", "Հայերեն",
  "தமிழ் மொழி", "বাংলা ভাষা", "ਪੰਜਾਬੀ", "ગુજરાતી", "తెలుగు", "ಕನ್ನಡ", "മലയാളം", "සිංහල", "ພາສາລາວ", "ខ្មែរ", "မြန်မာ",
  "አማርኛ", "ᚠᛇᚻ᛫ᛒᛦᚦ", "𐌰𐌱𐌲 gothic", "𝕳𝖊𝖑𝖑𝖔 𝓦𝓸𝓻𝓵𝓭", "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "ﬁ ﬂ ligatures",
  // combining marks and normalization
  "e\u0301 vs \u00e9", "A\u030A Å Å", "n\u0303o", "\u1100\u1161\u11a8 jamo", "Zalgo: Z\u0351\u0311a\u0323\u0302l\u0300g\u0306o\u0307",
  "o\u0308\u0301 \u01d8", "s\u0323\u0307 \u1e69", "\u0915\u093c \u0958", "\u212b angstrom", "\u2126 ohm", "café naïve résumé",
  "\u0061\u0328\u0301 \u0105\u0301", "\u0b47\u0b3e \u0b4b", "\u09c7\u09be", "\u3071 \u306f\u309a", "\ufb2c hebrew",
  // emoji
  "😀😃😄😁", "👍🏽 👍🏿", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🇺🇸🇯🇵🇩🇪", "1️⃣ keycap", "❤️ heart", "🧑‍💻 coder", "😀 text 😀text😀",
  "emoji in word: hel😀lo", "👩🏾‍🚀👨🏻‍🔬", "🫠🫡🥹", "\u263a\ufe0f \u263a\ufe0e",
  // code
  "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
  "const x = {a: 1, 'b': [2, 3]};\nconsole.log(`x=${x.a}`);", "#include <vector>\nint main() { return 0; }",
  '{"name": "hla", "version": 1, "tags": ["a", "b"]}', "<div class=\"x\">Hello &amp; bye</div>", "SELECT * FROM t WHERE id = 42;",
  "    indented\n\tTabbed\n        deeper", "if x:\n\n    pass\n\n\n", "a=b+c*d/e-f%g^h|i&j~k", "$PATH:/usr/bin;echo $HOME",
  "```python\nprint('hi')\n```", "// comment\n/* block */", "x => x * 2; y != z && w <= v || u >= t",
  // odd whitespace and invisible characters
  "non\u00a0breaking", "ideographic\u3000space", "zero\u200bwidth", "bom\ufeffinside", "nel\u0085line", "line\u2028sep",
  "para\u2029sep", "\u2003em\u2002en\u2009thin", "soft\u00adhyphen", "ctrl\u0001\u0002\u001f chars", "del\u007f",
  "rtl \u202eoverride\u202c", "zwj\u200dzwnj\u200c", "\u180e mongolian", "tab\u000bvt\u000cff",
  // punctuation runs
  "!!!???...", "\"quoted\" 'single' «guillemets» „low“", "(parens) [brackets] {braces} <angles>", "@#$%^&*",
  "a,b;c:d", "--flag=value", "~/.config", "C:\\Windows\\System32", "100% sure!", "'s 't 're 've 'm 'll 'd",
  "it's'S'T'RE'VE'M'LL'D", "'hello' 'World'", "''", "'", "a'b'c", "ſ 'ſ", "'Ǆ",
  // lone surrogates: JavaScript strings can hold them, JSON escapes them as \ud800
  "x\ud800y", "\udc00 alone", "😀\ud83d", "!\ud800!", "a\udfff\ud800b", "1\ud8002",
];

// Special and added tokens written in text, with near misses.
function specialStrings(tokens) {
  const out = [];
  for (const t of tokens) {
    out.push(t, `a${t}b`, ` ${t} `, `${t}${t}`, `\n${t}\n`, `x ${t}\ny`, t.slice(0, -1), t.slice(1));
  }
  for (let i = 0; i + 1 < tokens.length; ++i) out.push(tokens[i] + tokens[i + 1] + "text" + tokens[i]);
  return out;
}

const SCRIPT_RANGES = [
  [0x20, 0x7e], [0xa0, 0x24f], [0x300, 0x36f], [0x370, 0x3ff], [0x400, 0x4ff], [0x530, 0x58f], [0x590, 0x5ff],
  [0x600, 0x6ff], [0x900, 0x97f], [0x980, 0x9ff], [0xe00, 0xe7f], [0x10a0, 0x10ff], [0x1100, 0x11ff],
  [0x1e00, 0x1eff], [0x2000, 0x206f], [0x20a0, 0x20cf], [0x2100, 0x214f], [0x2190, 0x21ff], [0x2200, 0x22ff],
  [0x2500, 0x257f], [0x2600, 0x26ff], [0x2700, 0x27bf], [0x3000, 0x303f], [0x3040, 0x309f], [0x30a0, 0x30ff],
  [0x3400, 0x4dbf], [0x4e00, 0x9fff], [0xa000, 0xa4cf], [0xac00, 0xd7a3], [0xf900, 0xfaff], [0xfb00, 0xfb4f],
  [0xfe00, 0xfe0f], [0xfe30, 0xfe4f], [0xff00, 0xffef], [0x10000, 0x1007f], [0x1d400, 0x1d7ff], [0x1f300, 0x1f5ff],
  [0x1f600, 0x1f64f], [0x1f900, 0x1f9ff], [0x20000, 0x2a6df], [0x2ebf0, 0x2ee5d], [0x31350, 0x323af],
  [0xe0000, 0xe007f], [0xf0000, 0xf00ff], [0x0, 0x1f], [0x80, 0x9f],
];

function randomCodePoints(r, n) {
  let s = "";
  for (let i = 0; i < n; ++i) {
    let c;
    if (r.next() < 0.1) {
      do c = r.int(0x110000); while (c >= 0xd800 && c <= 0xdfff);  // anywhere, unassigned included
    } else {
      const [lo, hi] = r.pick(SCRIPT_RANGES);
      c = lo + r.int(hi - lo + 1);
    }
    s += String.fromCodePoint(c);
  }
  return s;
}

const WHITES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\t\t", "    ", " \t", "\u00a0", "\u3000"];

export function buildCorpus(seed, specialTokens, count) {
  const r = rng(seed);
  const fixed = [...SAMPLES, ...specialStrings(specialTokens)];
  const out = [...fixed];
  const number = () => {
    const len = 1 + r.int(r.next() < 0.2 ? 40 : 8);
    let s = "";
    for (let i = 0; i < len; ++i) s += String(r.int(10));
    return s;
  };
  const fragment = () => {
    switch (r.int(9)) {
      case 0: case 1: case 2: {
        const s = r.pick(SAMPLES);
        const a = r.int(s.length + 1), b = a + r.int(s.length - a + 1);
        // Cut at code point boundaries only, not inside a surrogate pair.
        return Array.from(s).slice(Array.from(s.slice(0, a)).length, Array.from(s.slice(0, b)).length).join("") || s;
      }
      case 3: return number();
      case 4: return r.pick(WHITES).repeat(1 + r.int(4));
      case 5: return randomCodePoints(r, 1 + r.int(12));
      case 6: return specialTokens.length ? r.pick(specialTokens) : "x";
      case 7: return r.pick(["'s", "'S", "'ll", "'LL", "'re", "'Ve", "'d", "'m", "'t", "n't"]);
      default: return r.pick(SAMPLES);
    }
  };
  while (out.length < count) {
    const parts = 1 + r.int(r.next() < 0.1 ? 60 : 8);
    let s = "";
    for (let i = 0; i < parts; ++i) s += fragment() + (r.next() < 0.5 ? r.pick(WHITES) : "");
    out.push(s);
  }
  // A few long documents, to exercise long words and the merge heap.
  out.push("a".repeat(5000), "你".repeat(3000), "😀".repeat(500), " ".repeat(3000) + "x", "1234567890".repeat(300),
           Array.from({ length: 300 }, () => r.pick(SAMPLES)).join(" "), "\n".repeat(1000), "ab".repeat(2000));
  return out;
}

// Conversations for the chat templates.
export function buildChats(seed, count) {
  const r = rng(seed);
  const samples = SAMPLES.filter((s) => s.isWellFormed());  // chat requests carry well-formed text
  const text = () => {
    const parts = 1 + r.int(4);
    let s = "";
    for (let i = 0; i < parts; ++i) s += (i ? r.pick([" ", "\n", "\n\n", ""]) : "") + r.pick(samples);
    return s;
  };
  const toolCall = (i) => ({
    id: `call_${i}`, type: "function",
    function: { name: r.pick(["get_weather", "search", "add"]), arguments: r.next() < 0.5
      ? JSON.stringify({ city: r.pick(["Paris", "東京"]), n: r.int(100) })
      : { city: r.pick(["Paris", "東京"]), n: r.int(100), deep: { list: [1, "two", null, true] } } },
  });
  const tools = [{ type: "function", function: { name: "get_weather", description: "Weather for a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
  const chats = [];
  for (let c = 0; c < count; ++c) {
    const messages = [];
    if (r.next() < 0.5) messages.push({ role: "system", content: text() });
    const turns = 1 + r.int(4);
    for (let t = 0; t < turns; ++t) {
      messages.push({ role: "user", content: r.next() < 0.1 ? "" : text() });
      if (t === turns - 1 && r.next() < 0.5) break;
      const kind = r.int(5);
      if (kind === 0) {
        messages.push({ role: "assistant", content: "<think>\n" + text() + "\n</think>\n\n" + text() });
      } else if (kind === 1) {
        messages.push({ role: "assistant", content: text(), reasoning_content: text() });
      } else if (kind === 2) {
        const calls = Array.from({ length: 1 + r.int(2) }, (_, i) => toolCall(i));
        messages.push({ role: "assistant", content: r.next() < 0.5 ? null : "", tool_calls: calls });
        for (let i = 0; i < calls.length; ++i) messages.push({ role: "tool", content: text() });
        messages.push({ role: "assistant", content: text() });
      } else {
        messages.push({ role: "assistant", content: text() });
      }
    }
    const chat = { messages, add_generation_prompt: r.next() < 0.7 };
    if (r.next() < 0.3) chat.enable_thinking = r.next() < 0.5;
    if (r.next() < 0.2) chat.tools = tools;
    chats.push(chat);
  }
  return chats;
}
