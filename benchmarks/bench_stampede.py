"""Q5, stampede: 8 processes load the same model at the same moment on an empty cache.

The processes start, import, then wait for a common start time so that their ``load()`` calls collide.
Each reports when its session was ready, then waits until all are ready before running its first
inference (so an early process's inference does not slow down the later ones' loads). Measured: how
many compiled (must be 1), and the time until all 8 had a working session, next to one process alone
on an empty cache (compile + load) and to 8 plain ONNX Runtime JIT sessions at once (no cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

CHILD = """
import json, os, sys, time
from pathlib import Path
model, cache, start_at, out, kind = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
import onnxruntime as ort, onnxruntime_qnn
opts = {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": "60", "htp_arch": "73",
        "enable_htp_fp16_precision": "1"}
if kind == "ctxcache":
    import ctxcache
    c = ctxcache.ContextCache(cache)
time.sleep(max(0.0, start_at - time.time()))
t_start = time.time()
if kind == "ctxcache":
    r = c.load(model, providers=[("QNNExecutionProvider", opts)])
    sess, outcome, timings = r.session, r.outcome, r.timings.__dict__
else:
    ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    so = ort.SessionOptions()
    so.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"], opts)
    sess, outcome, timings = ort.InferenceSession(model, sess_options=so), "jit", {}
ready = time.time()
out.write_text(json.dumps({"ready": ready, "start": t_start, "outcome": outcome, "timings": timings, "providers": sess.get_providers()}))
while not (out.parent / "go").exists():
    time.sleep(0.01)
import numpy as np
feeds = {i.name: np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
         for i in sess.get_inputs()}
sess.run(None, feeds)
out.with_suffix(".ran").write_text("ok")
"""


def stampede(model: Path, n: int, kind: str, tag: str) -> dict[str, Any]:
    d = c.fresh_dir("stampede", tag)
    cache = d / "cache"
    lead = 1.0 + 0.5 * n  # time for n interpreters to start and import on 2 cores
    start_at = time.time() + lead
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(cache), str(start_at), str(d / f"p{i}.json"),
                               kind], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=c.child_env())
             for i in range(n)]
    deadline = time.time() + 900
    while sum(1 for i in range(n) if (d / f"p{i}.json").exists()) < n:
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError("stampede child failed: " + "".join(p.stderr.read().decode()[-2000:] for p in procs if p.stderr))
        time.sleep(0.02)
    (d / "go").write_text("")
    for p in procs:
        p.wait(timeout=900)
    results = [json.loads((d / f"p{i}.json").read_text()) for i in range(n)]
    ran = sum(1 for i in range(n) if (d / f"p{i}.ran").exists())
    outcomes = [r["outcome"] for r in results]
    return {"all_ready": max(r["ready"] for r in results) - start_at, "compiles": outcomes.count("miss"),
            "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))}, "ran": ran, "on_qnn": all(
                c.QNN in r["providers"] for r in results), "start_spread": max(r["start"] for r in results) - start_at}


def run(model_name: str, n: int, rounds: int) -> dict[str, Any]:
    model = c.model(model_name)
    rows: dict[str, list[dict[str, Any]]] = {"one": [], "stampede": [], "jit": []}
    for i in range(rounds):
        rows["one"].append(stampede(model, 1, "ctxcache", "one"))
        rows["stampede"].append(stampede(model, n, "ctxcache", "many"))
        rows["jit"].append(stampede(model, n, "jit", "jit"))
    return {"model": model_name, "n": n, "rounds": rounds, "runs": rows,
            "one": c.median([r["all_ready"] for r in rows["one"]]),
            "stampede": c.median([r["all_ready"] for r in rows["stampede"]]),
            "jit": c.median([r["all_ready"] for r in rows["jit"]]),
            "compiles": [r["compiles"] for r in rows["stampede"]],
            "outcomes": [r["outcomes"] for r in rows["stampede"]],
            "start_spread": max(r["start_spread"] for k in rows for r in rows[k]),
            "all_ran": all(r["ran"] == r_n and r["on_qnn"] for k, r_n in (("stampede", n), ("jit", n), ("one", 1))
                           for r in rows[k])}


def report(res: dict[str, Any]) -> str:
    n = res["n"]
    ok = all(x == 1 for x in res["compiles"])
    rows = [
        ["1 process, empty cache (compile + load)", f"{res['one']:.3f}", "1.00", "1"],
        [f"{n} processes at once, empty cache", f"{res['stampede']:.3f}", f"{res['stampede'] / res['one']:.2f}",
         f"{', '.join(map(str, res['compiles']))} ({c.verdict(ok)})"],
        [f"{n} processes at once, plain ORT JIT (no cache)", f"{res['jit']:.3f}", f"{res['jit'] / res['one']:.2f}",
         f"{n} each"],
    ]
    return (
        f"### 5. Stampede ({res['model']}; seconds from the common start to the last session ready, median of "
        f"{res['rounds']})\n\n"
        + c.table(["scenario", "all sessions ready", "vs one process", "compiles (per round)"], rows)
        + f"\n\nOutcomes per round: {res['outcomes']}; every process ran an inference on QNN: "
        + f"{'yes' if res['all_ran'] else '**NO**'}. The last process began its load "
        + f"{res['start_spread'] * 1000:.0f} ms after the common start."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mobilenet")
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    res = run(args.model, args.processes, args.rounds)
    res["markdown"] = report(res)
    print(res["markdown"], flush=True)
    return res


if __name__ == "__main__":
    main()
