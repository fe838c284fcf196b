"""CPU: does a cached graph-optimized model launch faster than the original?

The CPU provider compiles nothing, but ORT can save the model after its graph optimizations
(``SessionOptions.optimized_model_filepath``), as ONNX or as ORT format. A cached copy would be worth
offering only if a session on it is ready sooner than one on the original. Each variant is timed in
fresh processes, interleaved, median of N: session creation, and spawn-to-first-inference.

    python benchmarks/bench_cpu_optimized.py [--runs 5] [--models conv,mobilenet,transformer,resnet50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

CHILD = """
import json, sys, time
t0 = time.time()
import numpy as np, onnxruntime as ort
path, variant = sys.argv[1], sys.argv[2]
so = ort.SessionOptions()
if variant != "original":
    # Already optimized: running the optimizers again would only repeat the work being measured.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
if variant == "ort_format":
    so.add_session_config_entry("session.load_model_format", "ORT")
t1 = time.time()
s = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
t2 = time.time()
rng = np.random.default_rng(0)
# Only the first input: old-IR models (light_resnet50) also list their initializers as inputs.
i = s.get_inputs()[0]
feeds = {i.name: rng.random([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)}
out = s.run(None, feeds)[0]
t3 = time.time()
print(json.dumps({"session": t2 - t1, "import": t1 - t0, "first_run": t3 - t2, "t_end": t3,
                  "sum": float(np.float64(out.astype(np.float64).sum()))}))
"""


def save_optimized(src: Path, dst: Path, ort_format: bool) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(dst)
    if ort_format:
        so.add_session_config_entry("session.save_model_format", "ORT")
    t = time.perf_counter()
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    return time.perf_counter() - t


def launch(path: Path, variant: str) -> dict[str, Any]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(path), variant], capture_output=True,
                          text=True, env=c.child_env(), timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} launch of {path.name} failed:\n{proc.stderr[-2000:]}")
    out = c.last_json(proc.stdout)
    out["launch"] = out["t_end"] - t0
    return out  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--models", default="conv,mobilenet,transformer,resnet50")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        src = c.model(name)
        d = c.fresh_dir("cpu_optimized", name)
        variants = {"original": src, "optimized_onnx": d / "opt.onnx", "ort_format": d / "opt.ort"}
        save_s = {
            "optimized_onnx": save_optimized(src, variants["optimized_onnx"], False),
            "ort_format": save_optimized(src, variants["ort_format"], True),
        }
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        broken: dict[str, str] = {}
        for _ in range(args.runs):
            for v, p in variants.items():  # interleaved: drift on a shared machine hits all alike
                if v in broken:
                    continue
                try:
                    results[v].append(launch(p, v))
                except RuntimeError as e:
                    # A saved optimized model that no longer runs is a finding, not a crash of the benchmark.
                    broken[v] = str(e).strip().splitlines()[-1][:90]
        base_session = c.median([r["session"] for r in results["original"]])
        base_launch = c.median([r["launch"] for r in results["original"]])
        ref = results["original"][0]["sum"]
        for v, rs in results.items():
            if v in broken:
                rows.append([name, v, f"{variants[v].stat().st_size / 1e6:.1f}", c.ms(save_s.get(v, 0.0)),
                             "-", "-", "-", "-", f"**does not run**: {broken[v][:60]}..."])
                continue
            sess, lau = c.median([r["session"] for r in rs]), c.median([r["launch"] for r in rs])
            same = all(abs(r["sum"] - ref) <= 1e-3 * max(1.0, abs(ref)) for r in rs)
            size = variants[v].stat().st_size / 1e6
            rows.append([name, v, f"{size:.1f}", c.ms(save_s.get(v, 0.0)) if v in save_s else "-", c.ms(sess),
                         f"{base_session / sess:.2f}x", c.ms(lau), f"{base_launch / lau:.2f}x", "yes" if same else "NO"])
        print(json.dumps({"model": name, "done": True}), file=sys.stderr)
    print(c.table(["model", "variant", "MB", "save ms", "session ms", "session speed-up", "launch ms",
                   "launch speed-up", "same outputs"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
