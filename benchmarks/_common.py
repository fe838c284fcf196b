"""Shared helpers for the benchmark scripts: work folder, models, fresh-process launches, tables.

Every script measures the things it compares side by side, interleaved, in one run, and reports
medians and ratios: the machine is shared, so absolute times drift while ratios hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("CTXCACHE_BENCH_DIR", ROOT / "benchmarks" / "_work"))
QNN = "QNNExecutionProvider"
MODEL_NAMES = ("conv", "mobilenet", "transformer", "resnet50", "qdq_int8")


def work(*parts: str) -> Path:
    path = WORK.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_dir(*parts: str) -> Path:
    path = WORK.joinpath(*parts)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


# -- models -------------------------------------------------------------------------------------
def model(name: str) -> Path:
    """Build (once) and return one of the benchmark models under the work folder."""
    from ctxcache import models

    d = work("models")
    if name == "conv":  # the 12-layer conv net of FIELD-NOTES, ~1.7 MB
        path = d / "conv.onnx"
        return path if path.exists() else models.conv_net(path, layers=12, channels=64, size=64)
    if name == "conv10":  # the 10-layer conv net the in-process hit is judged on (issue "launch cost")
        path = d / "conv10.onnx"
        return path if path.exists() else models.conv_net(path, layers=10, channels=32, size=64)
    if name == "tiny":  # a few-kB model: the drop-in's own cost is not hidden behind a session creation
        path = d / "tiny.onnx"
        return path if path.exists() else models.conv_net(path, layers=1, channels=4, size=8)
    if name == "mobilenet":
        path = d / "mobilenet.onnx"
        return path if path.exists() else models.mobilenet_like(path)
    if name == "transformer":  # one pre-norm block, d_model 1024, d_ff 7168: ~75 MB
        path = d / "transformer.onnx"
        return path if path.exists() else models.transformer_block(path, d_ff=7168)
    if name == "resnet50":
        path = d / "light_resnet50.onnx"
        if not path.exists():
            import onnx

            src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
            shutil.copyfile(src, path)
        return path
    if name == "qdq_int8":
        path = d / "mobilenet_qdq_int8.onnx"
        return path if path.exists() else _quantize(model("mobilenet"), path)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def _quantize(src: Path, dst: Path) -> Path:
    """A QDQ model (uint8 activations and weights) from onnxruntime.quantization.quantize_static."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in name.shape]
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name.name: rng.random(shape, dtype=np.float32)} for _ in range(4)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    return dst


# -- fresh-process launches -----------------------------------------------------------------------
# Each launch is a new interpreter, as an app launch is. The child prints the wall-clock time when its
# first inference returned; the parent subtracts the time just before it spawned the child, so a launch
# covers interpreter start, imports, session creation and the first run.
_PRELUDE = """
import json, sys, time
def _hwm_kb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
def _feeds(sess):
    import numpy as np
    rng = np.random.default_rng(0)
    return {i.name: rng.random([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
            for i in sess.get_inputs()}
def _done(sess, **kw):
    t_session, cpu_session = time.time(), time.process_time()
    sess.run(None, _feeds(sess))
    t = time.time()
    print(json.dumps(dict(kw, t_session=t_session, cpu_session=cpu_session, t_end=t, peak_rss_kb=_hwm_kb(),
                          providers=sess.get_providers())))
"""

# The QNN options are the same as models.qnn_htp_options(), spelled out so the raw launches do not
# import ctxcache.
_QNN_OPTS = """
import onnxruntime_qnn
opts = {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), "soc_model": "60", "htp_arch": "73",
        "enable_htp_fp16_precision": "1"}
"""

LAUNCH_CODE = {
    # plain ONNX Runtime: the QNN plugin compiles the model at session creation (JIT)
    "jit": """
import onnxruntime as ort
""" + _QNN_OPTS + """
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
so = ort.SessionOptions()
so.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"], opts)
_done(ort.InferenceSession(MODEL, sess_options=so))
""",
    # ctxcache: a miss on an empty cache, a hit on a warm one
    "ctxcache": """
import ctxcache
""" + _QNN_OPTS + """
r = ctxcache.ContextCache(CACHE).load(MODEL, providers=[("QNNExecutionProvider", opts)])
_done(r.session, outcome=r.outcome, reason=str(r.reason) if r.reason else None, timings=r.timings.__dict__)
""",
}
LAUNCH_CODE["raw_ctx"] = LAUNCH_CODE["jit"]  # the floor: the same code on the cached context model


def child_env() -> dict[str, str]:
    """Environment for child interpreters: ctxcache importable, and bytecode cached (outside the tree).

    An installed package has its .pyc files; without them (PYTHONDONTWRITEBYTECODE=1) every launch
    would recompile ctxcache's sources and inflate its import cost several times over.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONPYCACHEPREFIX=str(work("pycache")))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def launch(kind: str, model_path: Path, cache: Path | None = None, timeout: float = 900) -> dict[str, Any]:
    """One fresh-process launch; returns the child's JSON plus ``seconds`` (spawn to first inference)."""
    code = _PRELUDE + f"MODEL = {str(model_path)!r}\nCACHE = {str(cache)!r}\n" + LAUNCH_CODE[kind]
    env = child_env()
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} launch of {model_path.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = last_json(proc.stdout)
    out["seconds"] = out["t_end"] - t0
    out["session_seconds"] = out["t_session"] - t0
    if QNN not in out["providers"]:
        raise RuntimeError(f"{kind} launch of {model_path.name} did not run on QNN: {out['providers']}")
    return out


def last_json(stdout: str) -> Any:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{stdout[-2000:]}")


def context_model(cache: Path) -> Path:
    """The ctx.onnx of the single entry in ``cache``."""
    entries = [p for p in (cache / "v1" / "entries").iterdir() if p.is_dir()]
    if len(entries) != 1:
        raise RuntimeError(f"expected one entry in {cache}, found {len(entries)}")
    return entries[0] / "ctx.onnx"


def qnn_session(model: Path | str, devices: list[Any], opts: dict[str, str]) -> Any:
    """Plain onnxruntime on ``model`` with the QNN plugin EP on ``devices``: the floor a cached load is
    compared with (callers time it and check ``get_providers()`` after)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_provider_for_devices(devices, opts)
    return ort.InferenceSession(str(model), sess_options=so)


def raw_seconds(model: Path | str, devices: list[Any], opts: dict[str, str]) -> float:
    """Seconds to create :func:`qnn_session` on ``model`` (the provider checked outside the timing)."""
    t = time.perf_counter()
    s = qnn_session(model, devices, opts)
    dt = time.perf_counter() - t
    assert QNN in s.get_providers()
    return dt


def per_model_main(argv: list[str] | None, doc: str | None, models: str, rounds: int,
                   bench: Callable[[str, int], dict[str, Any]], report: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """The command line of a benchmark that runs ``bench(model, rounds)`` per model and prints ``report``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=models)
    ap.add_argument("--rounds", type=int, default=rounds)
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"rows": [bench(m, args.rounds) for m in args.models.split(",")], "rounds": args.rounds}
    res["markdown"] = report(res)
    print(res["markdown"], flush=True)
    return res


def qnn_options() -> dict[str, str]:
    from ctxcache import models

    return models.qnn_htp_options()


# -- the machine ----------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    import importlib.metadata as md

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for dist in ("onnxruntime", "onnxruntime-qnn", "onnx", "xxhash", "numpy", "filelock", "platformdirs"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "-"
    try:
        import onnxruntime_qnn

        versions["QNN SDK"] = onnxruntime_qnn.build_and_package_info.qnn_version
    except Exception:
        pass
    from ctxcache import __version__

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {ram} RAM",
        "python": platform.python_version(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()) + f", ctxcache {__version__}",
    }
