#!/usr/bin/env python3
"""`hla serve` end to end with a real HTTP client (the standard library's), for the device machine.

  serve_check.py --hla BIN --model DIR [--device cuda --dtype bf16] [--requests 16] [--prompt-len 64]
                 [--max-tokens 32] [--shared-prefix N] [--check]

Starts the server on a free port, sends --requests greedy completions at once (prompts of token
ids), and prints one JSON line: requests, generated tokens, wall seconds, tokens/s. With --check,
each request's ids must equal `hla generate` of the same prompt on the same device (exit 1 if not).
With --shared-prefix N, every prompt starts with the same N tokens (a system prompt) and one request
goes first alone, so the others can start from the server's prefix cache; the JSON line adds the
server's prefix-cache hits and skipped prompt tokens (from /metrics).
"""
import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hla", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt ids are drawn below this")
    ap.add_argument("--shared-prefix", type=int, default=0)
    ap.add_argument("--max-step-tokens", type=int, default=0, help="passed to hla serve (0: its default)")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    dev = ["--device", a.device, "--dtype", a.dtype]
    port = free_port()
    server = subprocess.Popen([a.hla, "serve", "--model", a.model, "--port", str(port),
                               "--max-slots", str(max(a.requests, 1))] + dev +
                              (["--max-step-tokens", str(a.max_step_tokens)] if a.max_step_tokens else []),
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("server exited: " + server.stderr.read()[-2000:])
                time.sleep(0.5)
        prompts = [[(7 * t + 13 * i + 1) % a.vocab for t in range(a.prompt_len)] for i in range(a.requests)]
        shared = [(5 * t + 3) % a.vocab for t in range(a.shared_prefix)]
        prompts = [shared + p[len(shared):] for p in prompts]
        post(port, {"prompt": [2, 3, 5, 7, 11, 13, 17, 19], "max_tokens": 2, "temperature": 0})  # warm-up
        out = [None] * a.requests
        if a.shared_prefix:  # the first request alone, so that its prefix is cached for the others
            out[0] = post(port, {"prompt": prompts[0], "max_tokens": a.max_tokens, "temperature": 0})

        def one(i):
            out[i] = post(port, {"prompt": prompts[i], "max_tokens": a.max_tokens, "temperature": 0})
        t0 = time.time()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(1 if a.shared_prefix else 0, a.requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.terminate()
        server.wait()
    ids = [o["choices"][0]["token_ids"] for o in out]
    n = sum(len(x) for x in ids[1 if a.shared_prefix else 0:])  # the timed wave's tokens
    res = {"requests": a.requests - (1 if a.shared_prefix else 0), "prompt_len": a.prompt_len, "generated": n, "seconds": round(wall, 3),
           "tokens_per_s": round(n / wall, 1), "device": a.device, "dtype": a.dtype,
           "max_step_tokens": a.max_step_tokens or "default"}
    for line in metrics.splitlines():
        name = line.split(" ")[0]
        if name in ("hla_prefix_cache_hits_total", "hla_prefix_cache_hit_tokens_total"):
            res[name] = int(float(line.split(" ")[1]))
    if a.shared_prefix:
        res["shared_prefix"] = a.shared_prefix
    if a.check:
        bad = 0
        for i, p in enumerate(prompts):
            g = subprocess.run([a.hla, "generate", "--model", a.model, "--prompt-ids", ",".join(map(str, p)),
                                "--max-new-tokens", str(a.max_tokens)] + dev, capture_output=True, text=True)
            want = [int(x) for x in g.stdout.split()]
            if want[:len(ids[i])] != ids[i] or g.returncode != 0:
                bad += 1
                print(f"request {i}: served {ids[i]} generate {want} {g.stderr[-300:]}", file=sys.stderr)
        res["mismatches"] = bad
    print(json.dumps(res))
    sys.exit(1 if res.get("mismatches") else 0)


main()
