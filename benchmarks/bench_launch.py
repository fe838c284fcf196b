"""Q1, launch speed-up: fresh-process launch to first inference, per model.

Four launches, interleaved round by round: plain ONNX Runtime with the QNN plugin (JIT compile at
session creation), ctxcache on an empty cache (miss: compile + cache + load), ctxcache on a warm cache
(hit) and a raw ONNX Runtime session on the cached context model (the floor a cache can reach).
"""

from __future__ import annotations

import argparse
from typing import Any

import _common as c

KINDS = ("jit", "miss", "hit", "raw_ctx")


def run(models: list[str], rounds: int) -> dict[str, Any]:
    rows = []
    for name in models:
        path = c.model(name)
        warm = c.fresh_dir("launch", name, "warm")
        c.launch("ctxcache", path, warm)  # prime the warm cache (a miss)
        ctx = c.context_model(warm)
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        ready: dict[str, list[float]] = {k: [] for k in KINDS}
        cpu: dict[str, list[float]] = {k: [] for k in KINDS}
        for i in range(rounds):
            order = KINDS[i % 4 :] + KINDS[: i % 4]  # rotate, so no kind always runs right after another
            for kind in order:
                if kind == "miss":
                    r = c.launch("ctxcache", path, c.fresh_dir("launch", name, "cold"))
                    assert r["outcome"] == "miss", r
                elif kind == "hit":
                    r = c.launch("ctxcache", path, warm)
                    assert r["outcome"] == "hit", r
                elif kind == "raw_ctx":
                    r = c.launch("raw_ctx", ctx)
                else:
                    r = c.launch("jit", path)
                times[kind].append(r["seconds"])
                ready[kind].append(r["session_seconds"])
                cpu[kind].append(r["cpu_session"])
        med = {k: c.median(v) for k, v in times.items()}
        rdy = {k: c.median(v) for k, v in ready.items()}
        rows.append({"model": name, "size_mb": round(path.stat().st_size / 1e6, 1), "first_run": med,
                     "ready": rdy,
                     "cpu": {k: c.median(v) for k, v in cpu.items()}})
    return {"rows": rows, "rounds": rounds}


def report(res: dict[str, Any]) -> str:
    out = []
    for what, title in (("first_run", "wall clock, spawn to first inference done"),
                        ("ready", "wall clock, spawn to session ready (before the first inference)"),
                        ("cpu", "CPU time of the launching process (all threads) until session ready: steadier "
                                "than wall clock on a shared machine")):
        rows = [
            [r["model"], r["size_mb"]] + [f"{r[what][k]:.3f}" for k in KINDS]
            + [f"**{r[what]['jit'] / r[what]['hit']:.2f}x**", f"{(r[what]['hit'] - r[what]['raw_ctx']) * 1000:+.0f} ms"]
            for r in res["rows"]
        ]
        out.append(f"{title}; seconds, median of {res['rounds']}:\n\n" + c.table(
            ["model", "MB", "ORT JIT", "ctxcache miss", "ctxcache hit", "raw ctx (floor)", "JIT / hit", "hit - floor"],
            rows))
    return "### 1. Launch speed-up (fresh processes)\n\n" + "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(c.MODEL_NAMES))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    res = run(args.models.split(","), args.rounds)
    res["markdown"] = report(res)
    print(res["markdown"], flush=True)
    return res


if __name__ == "__main__":
    main()
