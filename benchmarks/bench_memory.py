"""Q6, memory: peak RSS of a ctxcache hit launch versus a raw launch on the context model.

Fresh processes, alternating; peak RSS is the child's own VmHWM read after its first inference (not
``ru_maxrss``, which Linux carries over exec from the parent). Plain ORT JIT is shown for scale.
Target: a hit costs at most 20 MB over the raw context launch.
"""

from __future__ import annotations

import argparse
from typing import Any

import _common as c


def run(models: list[str], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        path = c.model(name)
        warm = c.fresh_dir("memory", name)
        c.launch("ctxcache", path, warm)
        ctx = c.context_model(warm)
        peak: dict[str, list[float]] = {"hit": [], "raw_ctx": [], "jit": []}
        for i in range(rounds):
            for kind in (("hit", "raw_ctx", "jit") if i % 2 else ("raw_ctx", "hit", "jit")):
                if kind == "hit":
                    r = c.launch("ctxcache", path, warm)
                    assert r["outcome"] == "hit", r
                else:
                    r = c.launch(kind, ctx if kind == "raw_ctx" else path)
                peak[kind].append(r["peak_rss_kb"] / 1024)
        med = {k: c.median(v) for k, v in peak.items()}
        rows.append({"model": name, **med, "delta": med["hit"] - med["raw_ctx"]})
    return rows


def report(res: dict[str, Any]) -> str:
    rows = [[r["model"], f"{r['raw_ctx']:.1f}", f"{r['hit']:.1f}", f"{r['delta']:+.1f} ({c.verdict(r['delta'] <= 20)})",
             f"{r['jit']:.1f}"] for r in res["rows"]]
    return (
        f"### 6. Peak RSS of a launch (MiB, fresh processes, median of {res['rounds']}; target: hit <= raw + 20 MB)\n\n"
        + c.table(["model", "raw ctx launch", "ctxcache hit launch", "hit - raw", "plain ORT JIT launch"], rows)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="conv,transformer,resnet50")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"rows": run(args.models.split(","), args.rounds), "rounds": args.rounds}
    res["markdown"] = report(res)
    print(res["markdown"], flush=True)
    return res


if __name__ == "__main__":
    main()
