# The peer side of bench_delta_rule: flash-linear-attention (Triton) on the same shapes, inputs drawn
# as ../shared/anchors/anchor_bench.py draws them (bf16; k L2-normalised; g = logsigmoid clamped at -5,
# fp32 for KDA, bf16 for GDN; beta bf16). Needs FLA_PATH = a folder holding a copy of FLA's fla/
# package (never committed). Prints CSV rows: op,shape,dtype,us (median of triton's do_bench).
# *_chunk_fwdbwd rows: the forward then autograd's backward with a random dout (what a training
# step of the op costs), on the training shapes; *_chunk_fwd_layer rows the forward with the
# layer transforms inside (layer_kwargs). --only= and --shape= keep the rows whose op
# name / shape contains the given text (FLA's autotuning makes a full run take many minutes).
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.environ["FLA_PATH"])
from triton.testing import do_bench  # noqa: E402
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule  # noqa: E402
from fla.ops.kda import chunk_kda, fused_recurrent_kda  # noqa: E402

dev, dt = "cuda", torch.bfloat16
quick = "--quick" in sys.argv
only = next((a[7:] for a in sys.argv if a.startswith("--only=")), "")  # substring of the op name
shape_only = next((a[8:] for a in sys.argv if a.startswith("--shape=")), "")  # substring of the shape


def inputs(T, H, D, kda, B=1):
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device=dev, dtype=dt)
    k = F.normalize(torch.randn(B, T, H, D, device=dev, dtype=torch.float32), dim=-1).to(dt)
    v = torch.randn(B, T, H, D, device=dev, dtype=dt)
    g = F.logsigmoid(torch.randn((B, T, H, D) if kda else (B, T, H), device=dev, dtype=torch.float32)).clamp_min(-5)
    beta = torch.rand(B, T, H, device=dev, dtype=torch.float32).sigmoid().to(dt)
    return q, k, v, (g if kda else g.to(dt)), beta


def row(op, shape, ms):
    print(f"fla_{op},{shape},bf16,{ms * 1000:.1f}", flush=True)


print(f"# device: {torch.cuda.get_device_name()}", flush=True)
print("op,shape,dtype,us", flush=True)
fixed = [(1, 4096, 32), (1, 16384, 32), (4, 4096, 32), (1, 65536, 16), (8, 2048, 64), (1, 8192, 96)]
varlen = [1300, 547, 2048, 963, 271, 3063]
rep = 30 if quick else 100


def layer_kwargs(H, kda):
    """*_chunk_fwd_layer rows: the layer transforms inside the op, as bench_delta_rule's rows of that
    name (q/k L2 norm, beta sigmoid, the gate from its raw input with A_log and dt_bias zero: GDN's
    softplus form, KDA's lower-bound form with safe_gate, FLA's faster path for that gate)."""
    kw = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, use_gate_in_kernel=True,
              A_log=torch.zeros(H, device=dev, dtype=torch.float32),
              dt_bias=torch.zeros(H * (128 if kda else 1), device=dev, dtype=torch.float32))
    if kda:
        kw.update(lower_bound=-5.0, safe_gate=True)
    return kw


for name, fn, kda in [("gdn", chunk_gated_delta_rule, False), ("kda", chunk_kda, True)]:
    for op in (f"{name}_chunk_fwd", f"{name}_chunk_fwd_layer"):
        if only not in op:
            continue
        for B, T, H in fixed:
            if shape_only not in f"B{B} T{T} H{H} D128":
                continue
            try:
                q, k, v, g, beta = inputs(T, H, 128, kda, B)
                kw = layer_kwargs(H, kda) if op.endswith("_layer") else {}
                with torch.inference_mode():
                    ms = do_bench(lambda: fn(q, k, v, g, beta, output_final_state=True, **kw), warmup=25, rep=rep,
                                  return_mode="median")
                row(op, f"B{B} T{T} H{H} D128", ms)
            except Exception as e:  # report and go on: one failing shape must not hide the others
                print(f"# fla_{op} B{B} T{T} H{H} error {repr(e)[:200]}", flush=True)
    if only not in f"{name}_chunk_fwd" or shape_only not in "varlen[1300 547 2048 963 271 3063] H64 D128":
        continue
    try:
        q, k, v, g, beta = inputs(sum(varlen), 64, 128, kda)
        cu = torch.tensor([0] + list(torch.tensor(varlen).cumsum(0)), device=dev, dtype=torch.int32)
        with torch.inference_mode():
            ms = do_bench(lambda: fn(q, k, v, g, beta, output_final_state=True, cu_seqlens=cu), warmup=25, rep=rep,
                          return_mode="median")
        row(f"{name}_chunk_fwd", "varlen[1300 547 2048 963 271 3063] H64 D128", ms)
    except Exception as e:
        print(f"# fla_{name} varlen error {repr(e)[:200]}", flush=True)
for name, fn, kda in [("gdn", fused_recurrent_gated_delta_rule, False), ("kda", fused_recurrent_kda, True)]:
    if only not in f"{name}_decode":
        continue
    for B in (1, 64, 256):
        if shape_only not in f"B{B} H32 D128":
            continue
        q, k, v, g, beta = inputs(1, 32, 128, kda, B)
        h0 = torch.randn(B, 32, 128, 128, device=dev, dtype=torch.float32) * 0.01
        with torch.inference_mode():
            ms = do_bench(lambda: fn(q, k, v, g, beta, initial_state=h0, output_final_state=True), warmup=25, rep=rep,
                          return_mode="median")
        row(f"{name}_decode", f"B{B} H32 D128", ms)

train = [(1, 16384, 32), (4, 4096, 32), (1, 65536, 16), (8, 2048, 64)]
for name, fn, kda in [("gdn", chunk_gated_delta_rule, False), ("kda", chunk_kda, True)]:
    if only not in f"{name}_chunk_fwdbwd":
        continue
    cases = [(f"B{B} T{T} H{H} D128", T, H, B, None) for B, T, H in train]
    cases.append(("varlen[1300 547 2048 963 271 3063] H64 D128", sum(varlen), 64, 1, varlen))
    for shape, T, H, B, lens in cases:
        if shape_only not in shape:
            continue
        try:
            q, k, v, g, beta = inputs(T, H, 128, kda, B)
            xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, beta)]
            do = torch.randn_like(v)
            kw = {}
            if lens is not None:
                kw["cu_seqlens"] = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=dev, dtype=torch.int32)

            def step():
                o, _ = fn(*xs, output_final_state=False, **kw)
                torch.autograd.backward(o, do)

            ms = do_bench(step, warmup=5, rep=rep, grad_to_none=xs, return_mode="median")
            row(f"{name}_chunk_fwdbwd", shape, ms)
        except Exception as e:  # FLA's GDN backward may refuse Hopper with some Triton versions: record it
            print(f"# fla_{name}_chunk_fwdbwd {shape} error {repr(e)[:300]}", flush=True)
