"""New entry kinds: a provider's own cache kept under the key, and the smaller QNN entries tried here.

1. OpenVINO's blob cache (``cache_dir``) through ctxcache, in the onnxruntime-openvino venv
   (``$CTXCACHE_OPENVINO_PYTHON`` or ``.venv-openvino``): launch to a ready session, fresh processes,
   interleaved, median of N, for plain onnxruntime-openvino without and with a ``cache_dir`` and for
   ctxcache without and with one (later launches: this host's OpenVINO context never loads, so they are
   ``bypass`` on the original model); and the size of the key's provider-cache folder.
2. QNN smaller entries: the context binary of a multi-SoC compile vs a one-SoC compile (it does not load
   here, so there is no hit time), and whether a weightless compile is accepted.

    python benchmarks/bench_entry_kinds.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

OV_CHILD = """
import json, os, sys, time
t0 = time.perf_counter()
import onnxruntime as ort
variant, model, cache, user = sys.argv[1:5]
opts = {"device_type": "CPU"}
if variant.endswith("cache_dir"):
    opts["cache_dir"] = user
key = None
if variant.startswith("ctxcache"):
    import ctxcache
    r = ctxcache.ContextCache(cache).load(model, providers=[("OpenVINOExecutionProvider", opts)])
    s, outcome, key = r.session, r.outcome, r.key
else:
    s, outcome = ort.InferenceSession(model, providers=[("OpenVINOExecutionProvider", opts)]), "plain"
ready = time.perf_counter() - t0
side = 0
if key is not None:
    from ctxcache._cache import store_of
    folder = store_of(ctxcache.ContextCache(cache)).side_dir(key)
    side = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
print(json.dumps({"ready": ready, "outcome": outcome, "provider": s.get_providers()[0], "side": side}))
"""

QNN_CHILD = """
import json, os, sys, onnxruntime as ort, onnxruntime_qnn
from ctxcache import models
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
model, out, extra, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
so = ort.SessionOptions()
for k, v in config.items():
    so.add_session_config_entry(k, v)
so.add_provider_for_devices(devs, dict(models.qnn_htp_options(), **extra))
try:
    ort.ModelCompiler(so, model, embed_compiled_data_into_model=False,
                      graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL).compile_to_file(out)
    folder = os.path.dirname(out)
    print(json.dumps({"ok": True, "bytes": sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))}))
except Exception as e:
    print(json.dumps({"ok": False, "error": str(e).split(" : ")[-1][:90]}))
"""

VARIANTS = ("plain", "plain+cache_dir", "ctxcache", "ctxcache+cache_dir")


def ov_python() -> Path | None:
    for cand in (os.environ.get("CTXCACHE_OPENVINO_PYTHON"), str(c.ROOT / ".venv-openvino" / "bin" / "python")):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def run(python: Path | str, code: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([str(python), "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=c.child_env(), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result: dict[str, Any] = c.last_json(proc.stdout)
    return result


def openvino(runs: int) -> None:
    python = ov_python()
    if python is None:
        print("OpenVINO: no onnxruntime-openvino venv (.ci/run creates .venv-openvino): skipped")
        return
    rows = []
    for name in ("conv", "mobilenet"):
        model = c.model(name)
        work = c.fresh_dir("entry_kinds", name)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        last: dict[str, dict[str, Any]] = {}
        for v in VARIANTS:  # one warm-up launch each: compiles, caches, records the failed context
            run(python, OV_CHILD, v, str(model), str(work / f"cache-{v}"), str(work / f"user-{v}"))
        for _ in range(runs):
            for v in VARIANTS:
                res = run(python, OV_CHILD, v, str(model), str(work / f"cache-{v}"), str(work / f"user-{v}"))
                times[v].append(res["ready"])
                last[v] = res
        med = {v: c.median(times[v]) for v in VARIANTS}
        rows.append([name, f"{model.stat().st_size / 1e6:.1f}", *(f"{med[v]:.3f}" for v in VARIANTS),
                     f"{med['plain+cache_dir'] / med['plain']:.2f}x", f"{med['ctxcache+cache_dir'] / med['ctxcache']:.2f}x",
                     f"{last['ctxcache+cache_dir']['side'] / 1e3:.0f}", last["ctxcache+cache_dir"]["outcome"]])
    print("OpenVINO CPU (onnxruntime-openvino), later launches, seconds to a ready session (median):")
    print(c.table(["model", "MB", *VARIANTS, "cache_dir / none (plain)", "cache_dir / none (ctxcache)",
                   "provider-cache folder kB", "ctxcache outcome"], rows))


def qnn() -> None:
    model = c.model("conv")
    rows = []
    cases = [("one SoC (60 / v73)", {}, {}), ("multi-SoC (60,69 / v73,v75)", {"soc_model": "60,69", "htp_arch": "73,75"}, {}),
             ("weightless, mode 1", {}, {"ep.enable_weightless_mode": "1", "ep.context_enable": "1",
                                         "ep.context_source_model_path": str(model)}),
             ("weightless, mode 2", {}, {"ep.enable_weightless_mode": "2", "ep.context_enable": "1",
                                         "ep.context_source_model_path": str(model)})]
    for label, extra, config in cases:
        out = c.fresh_dir("entry_kinds", "qnn", label.split()[0].strip(",")) / "ctx.onnx"
        res = run(sys.executable, QNN_CHILD, str(model), str(out), json.dumps(extra), json.dumps(config))
        rows.append([label, f"{res['bytes'] / 1e3:.0f}" if res["ok"] else "-",
                     "loads" if label.startswith("one") else "does not load here" if res["ok"] else res["error"]])
    print("\nQNN context entries for the conv model (bytes of ctx.onnx + .bin):")
    print(c.table(["kind", "entry kB", "here"], rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    print(json.dumps(c.machine()))
    openvino(args.runs)
    qnn()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
