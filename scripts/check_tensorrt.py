"""Real TensorRT check: compile, hit, damage -> fallback -> heal, issue 6455, and engine caches kept per key, on an NVIDIA GPU.

It cannot run on the development machines or in CI (no GPU, and the CPU onnxruntime wheel); run it on a
machine with an NVIDIA GPU and driver, in a venv with::

    pip install onnxruntime-gpu tensorrt-cu12      # (or tensorrt-cu13 with a CUDA 13 build)
    pip install --no-deps -e . && pip install onnx platformdirs filelock xxhash numpy
    python scripts/check_tensorrt.py [--workdir DIR] [--fp16]

Each launch runs in a fresh process, as an app launch would. Prints one line per step and a Markdown
table of timings for benchmarks/README.md; exits 0 when every check passed, 1 when one failed, 2 when the
machine cannot run it (and says why).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRT = "TensorrtExecutionProvider"

LAUNCH = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import ctxcache
    from ctxcache import models
    cache_dir, model, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    r = ctxcache.ContextCache(cache_dir).load(model, providers=[("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"])
    out = r.session.run(None, models.random_input(r.session, seed=7))[0]
    print(json.dumps({"outcome": r.outcome, "reason": str(r.reason) if r.reason else None, "key": r.key,
                      "providers": r.providers, "total": r.timings.total, "compile": r.timings.compile,
                      "load": r.timings.load, "entry": str(r.entry_path) if r.entry_path else None,
                      "out": out.astype(np.float64).ravel().tolist()}))
    """
)

REFERENCE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, onnxruntime as ort
    from ctxcache import models
    model = sys.argv[1]
    # JSON has no tuples; ORT takes (name, options) tuples only
    providers = [p if isinstance(p, str) else tuple(p) for p in json.loads(sys.argv[2])]
    t = time.perf_counter()
    s = ort.InferenceSession(model, providers=providers)
    created = time.perf_counter() - t
    out = s.run(None, models.random_input(s, seed=7))[0]
    print(json.dumps({"providers": s.get_providers(), "total": created, "out": out.astype(np.float64).ravel().tolist()}))
    """
)


def run(code: str, *args: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise RuntimeError(f"no result line in:\n{proc.stdout[-2000:]}")


def close(a: list[float], b: list[float], tol: float) -> bool:
    import numpy as np

    x, y = np.asarray(a), np.asarray(b)
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=tol, atol=tol))


def preflight() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    from ctxcache.providers import get

    return get(TRT).unavailable_reason() or (
        None if "CUDAExecutionProvider" in ort.get_available_providers() else "no CUDA provider in this onnxruntime"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--fp16", action="store_true", help="build fp16 engines (compare with a looser tolerance)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    why = preflight()
    if why is not None:
        print(f"cannot run the TensorRT check here: {why}")
        return 2
    from ctxcache import models
    from ctxcache.providers import _nvidia

    info = _nvidia.driver_info()
    print(f"GPU {info.gpus[0].name} (sm {info.gpus[0].compute_capability}), driver {info.driver_version}, "
          f"CUDA {info.cuda_driver}, TensorRT {_nvidia.tensorrt_library()[0]}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ctxcache-trt-"))
    opts = {"trt_fp16_enable": "1"} if args.fp16 else {}
    tol = 5e-2 if args.fp16 else 1e-3
    failures: list[str] = []
    rows: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("PASS " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    cases = {
        "conv_net": models.conv_net(work / "m" / "conv.onnx", layers=12, channels=32, size=64),
        "mobilenet_like": models.mobilenet_like(work / "m" / "mobilenet.onnx"),
        "transformer_block": models.transformer_block(work / "m" / "transformer.onnx"),
    }
    for name, model in cases.items():
        cache = work / f"cache-{name}"
        ref = run(REFERENCE, str(model), json.dumps(["CPUExecutionProvider"]))
        jit = run(REFERENCE, str(model), json.dumps([[TRT, opts], "CPUExecutionProvider"]))
        miss = run(LAUNCH, str(cache), str(model), json.dumps(opts))
        check(miss["outcome"] == "miss" and miss["providers"][0] == TRT, f"{name}: first launch compiles ({miss['outcome']}, {miss['reason']})")
        check(close(miss["out"], ref["out"], tol), f"{name}: compiled outputs match CPU")
        hits = [run(LAUNCH, str(cache), str(model), json.dumps(opts)) for _ in range(3)]
        check(all(h["outcome"] == "hit" for h in hits), f"{name}: later launches hit")
        check(all(close(h["out"], ref["out"], tol) for h in hits), f"{name}: hit outputs match CPU")
        hit_t = sorted(h["total"] for h in hits)[1]
        rows.append(f"| {name} | {miss['compile']:.2f} | {jit['total']:.2f} | {hit_t:.3f} | {jit['total'] / hit_t:.1f}x |")
        entry = Path(hits[0]["entry"])
        print("   entry files:", sorted(p.name for p in entry.iterdir()))
        check(any(p.suffix == ".timing" for p in entry.iterdir()), f"{name}: timing cache kept inside the entry")
        engines = [p for p in entry.iterdir() if p.name not in ("ctx.onnx", "manifest.json") and p.suffix != ".timing"]
        if engines:
            blob = bytearray(engines[0].read_bytes())
            blob[len(blob) // 2] ^= 0xFF
            engines[0].write_bytes(bytes(blob))
            fb = run(LAUNCH, str(cache), str(model), json.dumps(opts))
            check(fb["outcome"] == "fallback" and close(fb["out"], ref["out"], tol),
                  f"{name}: one flipped engine byte -> fallback with right outputs ({fb['reason']})")
            healed = run(LAUNCH, str(cache), str(model), json.dumps(opts))
            check(healed["outcome"] == "miss", f"{name}: next launch recompiles")
        shutil.rmtree(cache, ignore_errors=True)

    # onnxruntime issue 6455: two different models with one file name must never share an engine.
    a = models.conv_net(work / "a" / "model.onnx", seed=1)
    b = models.conv_net(work / "b" / "model.onnx", seed=2)
    cache = work / "cache-6455"
    ra, rb = run(LAUNCH, str(cache), str(a), json.dumps(opts)), run(LAUNCH, str(cache), str(b), json.dumps(opts))
    refb = run(REFERENCE, str(b), json.dumps(["CPUExecutionProvider"]))
    check(ra["key"] != rb["key"] and rb["outcome"] == "miss", "6455: same file name, other weights -> own entry")
    check(close(rb["out"], refb["out"], tol), "6455: the second model runs with its own weights")

    # The engine and timing caches an app turns on (onnxruntime#6455, #32254: ORT keys engines on the graph
    # name): one shared path given by both apps, one folder per key under ctxcache's root, right outputs each.
    shared = work / "shared-engines"
    side_opts = dict(opts, trt_engine_cache_enable="1", trt_engine_cache_path=str(shared),
                     trt_timing_cache_enable="1", trt_timing_cache_path=str(shared))
    cache = work / "cache-side"
    sa = [run(LAUNCH, str(cache), str(m), json.dumps(side_opts)) for m in (a, b, a, b)]
    check(sa[0]["key"] != sa[1]["key"] and sa[0]["key"] == sa[2]["key"], "engine cache: one key per model")
    check(close(sa[1]["out"], refb["out"], tol) and close(sa[3]["out"], refb["out"], tol),
          "engine cache: the second model runs with its own weights, first launch and later")
    check(not shared.exists(), "engine cache: nothing written at the path the app gave")
    folders = [cache / "v1" / "side" / str(r["key"]) for r in sa[:2]]
    for f in folders:
        print("   side folder:", f, sorted(str(p.relative_to(f)) for p in f.rglob("*") if p.is_file()) if f.exists() else "-")
    check(all(f.is_dir() for f in folders), "engine cache: a side folder per key")
    import ctxcache

    listed = {e.key: e.side_size for e in ctxcache.ContextCache(cache).entries()}
    check(all(listed.get(str(r["key"]), -1) >= 0 for r in sa[:2]), f"engine cache: entries list their side sizes {listed}")

    print("\n| model | compile s | TensorRT JIT session s | session on cached context s | launch speed-up |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(failures)} failed" if failures else "\nall TensorRT checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
