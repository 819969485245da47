#!/usr/bin/env python3
"""Summarises an `ncu --csv --metrics gpu__time_duration.sum[,dram__bytes_read.sum,dram__bytes_write.sum]`
log of `hla bench` (one row per kernel).

  ncu_kernels.py LOG.csv [--last-step | --first-forward]

--last-step keeps only the last decode step: the last window of p launches that repeats the window
before it (a replayed CUDA-graph step repeats the captured one), p >= 20. --first-forward keeps the
second of the first two identical windows (bench's untimed warm-up forward, then the timed one).
Prints GPU time per kernel name (µs, count, share) and the total; with the DRAM byte metrics in
the log, also each name's DRAM traffic (GB) and bandwidth (TB/s).
"""
import csv
import sys
from collections import defaultdict


SCALE = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1e-3, "ns": 1e-3, "usecond": 1,
         "us": 1, "msecond": 1e3, "ms": 1e3}


def rows(path):
    """[(kernel name, µs, DRAM bytes or None)] in launch order."""
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    launches = {}
    for r in csv.DictReader(lines):
        k = launches.setdefault(r["ID"], {"name": r["Kernel Name"].split("(")[0][:60], "us": 0.0, "bytes": None})
        v = float(r["Metric Value"].replace(",", "")) * SCALE.get(r.get("Metric Unit", "ns"), 1)
        if r.get("Metric Name") == "gpu__time_duration.sum":
            k["us"] = v
        elif r.get("Metric Name", "").startswith("dram__bytes"):
            k["bytes"] = (k["bytes"] or 0) + v
    return [(k["name"], k["us"], k["bytes"]) for _, k in sorted(launches.items(), key=lambda x: int(x[0]))]


def last_step(ks):
    names = [k[0] for k in ks]
    for p in range(20, len(names) // 2 + 1):
        if names[-p:] == names[-2 * p:-p]:
            return ks[-p:]
    return ks


def first_forward(ks):
    names = [k[0] for k in ks]
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
    by = defaultdict(lambda: [0.0, 0, None])
    for n, us, b in ks:
        by[n][0] += us
        by[n][1] += 1
        if b is not None:
            by[n][2] = (by[n][2] or 0) + b
    total = sum(k[1] for k in ks)
    print(f"{len(ks)} kernels, {total:.1f} us GPU time")
    for n, (us, c, b) in sorted(by.items(), key=lambda x: -x[1][0]):
        traffic = f"  {b / 1e9:8.2f} GB {b / us / 1e6:5.2f} TB/s" if b is not None and us > 0 else ""
        print(f"{us:10.1f} us {c:5d}x {100 * us / total:5.1f}%{traffic}  {n}")


main()
