#!/usr/bin/env python3
"""Summarises an `ncu --csv --metrics gpu__time_duration.sum` log of `hla bench` (one row per kernel).

  ncu_kernels.py LOG.csv [--last-step | --first-forward]

--last-step keeps only the last decode step: the last window of p launches that repeats the window
before it (a replayed CUDA-graph step repeats the captured one), p >= 20. --first-forward keeps the
second of the first two identical windows (bench's untimed warm-up forward, then the timed one).
Prints GPU time per kernel name (µs, count, share) and the total.
"""
import csv
import sys
from collections import defaultdict


def rows(path):
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    out = []
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        us = v / 1000 if unit == "nsecond" or unit == "ns" else v if unit in ("usecond", "us") else v * 1000
        out.append((r["Kernel Name"].split("(")[0][:60], us))
    return out


def last_step(ks):
    names = [k for k, _ in ks]
    for p in range(20, len(names) // 2 + 1):
        if names[-p:] == names[-2 * p:-p]:
            return ks[-p:]
    return ks


def first_forward(ks):
    names = [k for k, _ in ks]
    for p in range(20, len(names) // 2 + 1):
        if names[:p] == names[p:2 * p]:
            return ks[p:2 * p]
    return ks


def main():
    ks = rows(sys.argv[1])
    if "--last-step" in sys.argv:
        ks = last_step(ks)
    if "--first-forward" in sys.argv:
        ks = first_forward(ks)
    by = defaultdict(lambda: [0.0, 0])
    for n, us in ks:
        by[n][0] += us
        by[n][1] += 1
    total = sum(us for _, us in ks)
    print(f"{len(ks)} kernels, {total:.1f} us GPU time")
    for n, (us, c) in sorted(by.items(), key=lambda x: -x[1][0]):
        print(f"{us:10.1f} us {c:5d}x {100 * us / total:5.1f}%  {n}")


main()
