"""Q4, hashing: model digest throughput on a big model with external data, the stat-memo path, memory.

The model is a tiny graph whose one initializer lives in an external-data file of ``--size-mb``
(default 512 MB; ``--size-mb 2048`` for the 2 GB case). With the files in the page cache, ctxcache's
``model_digest`` (no memo) alternates with two raw ``xxhash.xxh3_128`` passes over the same bytes:
over an mmap of each file (no copy: the ceiling in Python) and over ``f.read()`` of each whole file (the
obvious way, one copy, memory = file size). Targets: >= 80 % of raw; the warm path (stat memo) <= 1 ms; peak memory
the same for a small and a big model (each digest runs in its own fresh process).
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

MEMORY_CODE = """
import json, sys
from pathlib import Path
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from ctxcache._hashing import model_digest
before = hwm()
d = model_digest(Path(sys.argv[1]), None)
print(json.dumps({"before_kb": before, "after_kb": hwm(), "size": d.size}))
"""


def make_model(path: Path, size: int) -> Path:
    """A valid ONNX model (Identity of one float initializer) with ``size`` bytes of external data."""
    import numpy as np
    from onnx import TensorProto, helper, save_model

    data = path.with_suffix(".data")
    if path.exists() and data.exists() and data.stat().st_size == size:
        return path
    n = size // 4
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[n], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", data.name), ("offset", "0"), ("length", str(n * 4))):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "big", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [tensor])
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    block = np.random.default_rng(0).bytes(64 << 20)
    with open(data, "wb") as f:
        left = n * 4
        while left:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            left -= len(chunk)
    return path


def raw_digest(files: list[Path]) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for p in files:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            h.update(m)
    return h.hexdigest()


def read_digest(files: list[Path]) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    for p in files:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def throughput(path: Path, rounds: int) -> dict[str, Any]:
    from ctxcache._hashing import model_digest

    files = [path, path.with_suffix(".data")]
    size = sum(p.stat().st_size for p in files)
    raw_digest(files)  # page the files in
    model_digest(path, None)
    fns = {"raw": lambda: raw_digest(files), "read": lambda: read_digest(files), "lib": lambda: model_digest(path, None)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    kinds = list(fns)
    for i in range(rounds):
        for kind in kinds[i % 3 :] + kinds[: i % 3]:
            t = time.perf_counter()
            fns[kind]()
            times[kind].append(time.perf_counter() - t)
    memo_dir = c.fresh_dir("hashing", "memo")
    model_digest(path, memo_dir)  # fills the memo
    memo_s = []
    for _ in range(max(rounds * 10, 50)):
        t = time.perf_counter()
        d = model_digest(path, memo_dir)
        memo_s.append(time.perf_counter() - t)
        assert d.memo_hit
    raw, read, lib = (c.median(times[k]) for k in kinds)
    return {"size": size, "raw_gbs": size / raw / 1e9, "read_gbs": size / read / 1e9, "lib_gbs": size / lib / 1e9,
            "ratio": raw / lib, "ratio_read": read / lib,
            "memo_ms": c.median(memo_s) * 1000, "memo_max_ms": max(memo_s) * 1000}


def peak_memory(path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", MEMORY_CODE, str(path)], capture_output=True, text=True,
                         env=c.child_env(), check=True)
    return c.last_json(out.stdout)  # type: ignore[no-any-return]


def run(size_mb: int, rounds: int) -> dict[str, Any]:
    d = c.work("hashing")
    free = shutil.disk_usage(d).free
    need = (size_mb + 64) * (1 << 20)
    if free < need * 1.2:
        raise SystemExit(f"bench_hashing: {size_mb} MB model needs {need >> 20} MB, only {free >> 20} MB free in {d}")
    small = make_model(d / "small.onnx", 64 << 20)
    big = make_model(d / f"big{size_mb}.onnx", size_mb << 20)
    res = {"rounds": rounds, "big": throughput(big, rounds), "small": throughput(small, rounds)}
    res["mem_small"], res["mem_big"] = peak_memory(small), peak_memory(big)
    for k in ("mem_small", "mem_big"):
        res[k]["grow_mb"] = (res[k]["after_kb"] - res[k]["before_kb"]) / 1024
    return res


def report(res: dict[str, Any]) -> str:
    rows = []
    for k in ("small", "big"):
        r, m = res[k], res["mem_" + k]
        rows.append([f"{r['size'] / 2**20:.0f} MiB", f"{r['raw_gbs']:.2f}", f"{r['read_gbs']:.2f}", f"{r['lib_gbs']:.2f}",
                     f"**{r['ratio'] * 100:.1f} %** ({c.verdict(r['ratio'] >= 0.8)})",
                     f"{r['ratio_read'] * 100:.0f} % ({c.verdict(r['ratio_read'] >= 0.8)})",
                     f"{r['memo_ms']:.3f} (max {r['memo_max_ms']:.2f}; {c.verdict(r['memo_ms'] <= 1)})",
                     f"{m['after_kb'] / 1024:.1f} (+{m['grow_mb']:.1f})"])
    flat = abs(res["mem_big"]["after_kb"] - res["mem_small"]["after_kb"]) / 1024
    return (
        f"### 4. Hashing (page cache warm; median of {res['rounds']})\n\n"
        + c.table(["model + external data", "raw xxh3_128 GB/s: mmap", "raw: f.read()", "ctxcache digest GB/s",
                   "ctxcache / raw mmap", "ctxcache / raw read",
                   "warm path, stat memo (ms)", "peak RSS of a digest process, MiB (growth during digest)"], rows)
        + f"\n\nPeak RSS differs by {flat:.1f} MiB between the two sizes "
        + f"({c.verdict(flat <= 4)}: flat means within 4 MiB)."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mb", type=int, default=512, help="external data size (2048 for the 2 GB case)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    res = run(args.size_mb, args.rounds)
    res["markdown"] = report(res)
    print(res["markdown"], flush=True)
    return res


if __name__ == "__main__":
    main()
