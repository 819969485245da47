#!/usr/bin/env python3
"""transformers (+ FLA's kernels when importable) on the model an hla config.json describes,
random weights, bf16, on the GPU: the peer side of `hla bench` for configs that
../shared/anchors/e2e_anchor.py does not cover (e.g. configs/qwen3_next-moe-2b.json).

  FLA_PATH=DIR OUT=DIR e2e_peer.py CONFIG [--prefill 1024,8192] [--batches 1,16] [--new 32]

Prints and writes OUT/e2e_peer.json: prefill tokens/s (one forward, logits of the last token, after
one untimed forward), greedy decode tokens/s after a 512-token prompt (`generate`, after a short
untimed one), peak GPU memory.
"""
import argparse
import json
import os
import sys
import time

import torch
import transformers

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--prefill", default="1024,8192")
ap.add_argument("--batches", default="1,16")
ap.add_argument("--new", type=int, default=32)
a = ap.parse_args()
sys.path.insert(0, os.environ["FLA_PATH"])  # a copy of FLA's fla/ package, never committed
OUT = os.environ.get("OUT", "/tmp")
res = {}


def log(k, v):
    res[k] = v
    print(json.dumps({k: v}), flush=True)
    json.dump(res, open(f"{OUT}/e2e_peer.json", "w"), indent=1)


try:
    import fla  # noqa: F401
    log("fla_importable", True)
except Exception as e:  # the peer still runs, on transformers' own code paths
    log("fla_importable", repr(e)[:100])
spec = json.load(open(a.config))
spec.pop("architectures", None)
cfg = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
torch.manual_seed(0)
with torch.device("cuda"):
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
log("model", os.path.basename(a.config))
log("params_B", round(sum(p.numel() for p in m.parameters()) / 1e9, 3))
V = cfg.vocab_size
for T in map(int, a.prefill.split(",")):
    ids = torch.randint(0, V, (1, T), device="cuda")
    with torch.no_grad():
        m(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        t0 = time.time()
        m(ids, logits_to_keep=1)
        torch.cuda.synchronize()
    log(f"prefill_T{T}_tok_per_s", round(T / (time.time() - t0), 1))
for B in map(int, a.batches.split(",")):
    ids = torch.randint(0, V, (B, 512), device="cuda")
    with torch.no_grad():
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.time()
        m.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False)
        torch.cuda.synchronize()
        dt = time.time() - t0
    log(f"decode_B{B}_prompt512_new{a.new}_tok_per_s", round(B * a.new / dt, 1))
log("peak_mem_GB", round(torch.cuda.max_memory_allocated() / 1e9, 2))
