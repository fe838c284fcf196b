"""``ctxcache demo``: five real app launches against the real QNN compiler, each in a fresh process.

1 miss (compile + cache), 2 hit, then one byte of the cached binary is flipped (size kept: the damage
that runs with silently wrong outputs when nothing checks), 3 fallback (the damage is caught, the app
still gets a working session), 4 miss (recompiled), 5 hit. Outputs are compared with a plain CPU
onnxruntime session. Exit 0 only when that is exactly what happened.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    emit_json,
    err,
    out,
    seconds,
    table,
)

QNN = "QNNExecutionProvider"
EXPECTED = ["miss", "hit", "fallback", "miss", "hit"]
# HTP runs this float model in fp16 (enable_htp_fp16_precision): outputs match CPU float32 to about
# 1e-3 of their scale; a flipped byte in the weights or a wrong binary is far outside this.
_TOLERANCE = 0.02


# -- the child: one app launch ----------------------------------------------------------------------
def _child() -> None:
    """Entry point of a launch process: ``python -c ... MODE MODEL CACHE_DIR OUT_NPY``. Its outputs go to
    ``OUT_NPY`` and its report to ``OUT_NPY`` with ``.json``, files of the demo's own folder: not to its stdout,
    which native libraries share (QNN's simulator prints ``# LIBNATIVE: ...`` there at exit)."""
    start = time.perf_counter()
    mode, model, cache_dir, out_npy = sys.argv[1:5]
    import numpy as np
    import onnxruntime as ort

    from ctxcache import ContextCache, models

    so = ort.SessionOptions()
    so.log_severity_level = 3
    report: dict[str, Any] = {"mode": mode}
    if mode == "cache":
        r = ContextCache(cache_dir).load(model, providers=[(QNN, models.qnn_htp_options())], sess_options=so)
        session = r.session
        report.update(outcome=r.outcome, reason=r.reason.code if r.reason else None,
                      reason_message=r.reason.message if r.reason else None, key=r.key, providers=r.providers,
                      session_s=r.timings.total, compile_s=r.timings.compile)
    else:  # "jit" on the original model, or "raw" on a context file: plain ORT + QNN, no ctxcache checks
        t = time.perf_counter()
        session = models.plain_qnn_session(model, so)
        report.update(outcome="loaded", providers=session.get_providers(), session_s=time.perf_counter() - t)
    y = session.run(None, models.random_input(session, seed=7))[0]
    np.save(out_npy, y)
    report["process_s"] = time.perf_counter() - start
    Path(out_npy).with_suffix(".json").write_text(json.dumps(report))


_CHILD_CODE = "from ctxcache.cli._demo import _child; _child()"


def _launch(mode: str, model: Path, cache_dir: Path, out_npy: Path) -> dict[str, Any]:
    import ctxcache

    env = dict(os.environ)
    # The child imports the very ctxcache this process runs, installed or not.
    pkg_root = str(Path(ctxcache.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["CTXCACHE_STRICT"] = "0"  # the demo shows the fallback; a CI shell's strict mode would turn it into an error
    report = out_npy.with_suffix(".json")
    report.unlink(missing_ok=True)  # a --dir used before holds an older run's reports
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_CODE, mode, str(model), str(cache_dir), str(out_npy)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    wall = time.perf_counter() - t
    if report.is_file():
        data: dict[str, Any] = json.loads(report.read_text())
        data["wall_s"] = wall
        return data
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise CommandFailed(f"demo launch ({mode}) exited with code {proc.returncode}: {tail}")


def _flip_one_byte(path: Path) -> int:
    """Flip one byte in the middle of ``path``, size kept; returns the offset."""
    size = path.stat().st_size
    # An odd offset: with little-endian fp16/fp32 weights that is a byte holding exponent bits, so the
    # damage shows in the outputs of an unchecked load (a low mantissa byte may hardly show).
    offset = (size // 2) | 1
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return offset


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        raise CommandFailed("the demo runs the real QNN compiler: pip install 'ctxcache[qnn]'") from None
    import numpy as np
    import onnxruntime as ort

    from ctxcache import ContextCache, models

    tmp = None
    if args.dir:
        work = Path(args.dir).expanduser().resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="ctxcache-demo-")
        work = Path(tmp)
    cache_dir = work / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # the demo starts cold, whatever ran here before
    json_mode = args.format == "json"

    def say(text: str) -> None:
        if not json_mode:
            err(text)

    try:
        t = time.perf_counter()
        model = models.mobilenet_like(work / "mobilenet_like.onnx")
        say(f"model: {model} ({model.stat().st_size / 1e6:.1f} MB, generated in {seconds(time.perf_counter() - t)}); "
            f"cache: {cache_dir}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        cpu = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
        ref = cpu.run(None, models.random_input(cpu, seed=7))[0]
        scale = float(np.abs(ref).max()) or 1.0

        def diff(npy: Path) -> float:
            return float(np.abs(np.load(npy).astype(np.float64) - ref.astype(np.float64)).max())

        say("launch 0: JIT session on the original model, no cache (the cost every launch pays without ctxcache)")
        jit = _launch("jit", model, cache_dir, work / "out_jit.npy")
        jit["max_diff"] = diff(work / "out_jit.npy")

        rows: list[dict[str, Any]] = []
        raw: dict[str, Any] | None = None
        for i in range(1, 6):
            if i == 3:
                entries = ContextCache(cache_dir).entries()
                bins = sorted(entries[0].path.glob("*.bin")) if entries else []
                if not bins:
                    so_far = [r["outcome"] for r in rows]
                    raise CommandFailed(f"no cached .bin to damage in {cache_dir} (launches so far: {so_far})")
                offset = _flip_one_byte(bins[0])
                say(f"damage: flipped the byte at offset {offset} of {bins[0].name} (size unchanged)")
                # What plain ONNX Runtime does with that context: it loads and runs.
                raw = _launch("raw", entries[0].path / "ctx.onnx", cache_dir, work / "out_raw.npy")
                raw["max_diff"] = diff(work / "out_raw.npy")
            say(f"launch {i}: a fresh process loads the model through ctxcache")
            r = _launch("cache", model, cache_dir, work / f"out_{i}.npy")
            r["launch"] = i
            r["max_diff"] = diff(work / f"out_{i}.npy")
            rows.append(r)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    outcomes = [r["outcome"] for r in rows]
    problems = []
    if outcomes != EXPECTED:
        problems.append(f"outcomes {outcomes}, expected {EXPECTED}")
    if rows[2].get("reason") != "artifact_digest":
        problems.append(f"launch 3 reason {rows[2].get('reason')!r}, expected 'artifact_digest'")
    for r in rows:
        if r["outcome"] in ("hit", "miss") and QNN not in r.get("providers", []):
            problems.append(f"launch {r['launch']} ran on {r.get('providers')}, not on {QNN}")
        if not r["max_diff"] <= _TOLERANCE * scale:
            problems.append(f"launch {r['launch']} output differs from CPU by {r['max_diff']:.3g} (scale {scale:.3g})")
    hits = [r["session_s"] for r in rows if r["outcome"] == "hit"]
    hit_s = min(hits) if hits else None
    speedup = jit["session_s"] / hit_s if hit_s else None
    ok = not problems

    if json_mode:
        emit_json({
            "ok": ok, "dir": str(work) if tmp is None or args.keep else None, "expected": EXPECTED, "outcomes": outcomes,
            "launches": rows, "jit": jit, "raw_damaged_context": raw, "cpu_output_scale": scale,
            "hit_session_seconds": hit_s, "jit_session_seconds": jit["session_s"], "speedup": speedup,
            "problems": problems,
        })
        return EXIT_OK if ok else EXIT_FAILED

    what = {1: "first launch", 2: "second launch", 3: "after the damage", 4: "next launch", 5: "next launch"}
    table_rows = []
    for r in rows:
        reason = r.get("reason") or "-"
        table_rows.append([r["launch"], what[r["launch"]], r["outcome"], reason, seconds(r["session_s"]),
                           seconds(r.get("compile_s") or None) if r.get("compile_s") else "-",
                           seconds(r["wall_s"]), f"{r['max_diff']:.2e}"])
    out(table(["#", "LAUNCH", "OUTCOME", "REASON", "SESSION", "COMPILE", "PROCESS", "MAX|DIFF| VS CPU"],
              table_rows, right=(4, 5, 6, 7)))
    out()
    if raw is not None:
        intact = max(r["max_diff"] for r in rows) or 1e-12
        ratio = raw["max_diff"] / intact
        verdict = f"outputs changed silently ({ratio:.0f}x the error of intact contexts)" if ratio > 2 else "outputs still close"
        out(f"plain onnxruntime on the damaged context: {raw['outcome']} and ran, no error; {verdict}, "
            f"max|diff| vs CPU {raw['max_diff']:.2e}. ctxcache checked the digest and fell back instead.")
    if rows[2].get("reason_message"):
        out(f"launch 3 reason: {rows[2]['reason']}: {rows[2]['reason_message']}")
    if speedup:
        out(f"session creation: JIT on the original {seconds(jit['session_s'])}, cached context {seconds(hit_s)} "
            f"-> {speedup:.1f}x faster")
    if tmp is None or args.keep:
        out(f"files kept in {work}")
    if ok:
        out("demo OK: miss, hit, fallback (damage caught), miss (recompiled), hit")
        return EXIT_OK
    for p in problems:
        out(f"problem: {p}")
    return EXIT_FAILED
