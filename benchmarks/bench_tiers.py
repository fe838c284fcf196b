"""Tiers: launch time of a hit filled from a bundle, an ORT model package or a remote S3 store, versus
a local hit and a compile (miss), in fresh processes, interleaved round by round.

Every tier launch starts on an EMPTY local cache (the first launch on a new device or a new install),
so it pays for copying + SHA-256-verifying + publishing the entry, then loads it; the local hit is the
second launch onwards. The remote is moto's S3 server on 127.0.0.1 (no network latency: a lower
bound for a real object store).

    python benchmarks/bench_tiers.py                      # conv, mobilenet, transformer; 5 rounds
    python benchmarks/bench_tiers.py --models conv --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import _common as c

KINDS = ("compile", "local_hit", "bundle_dir", "bundle_tar", "package", "remote")
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}

_LAUNCH = """
import ctxcache
""" + c._QNN_OPTS + """
tiers = []
if KIND in ("bundle_dir", "bundle_tar"):
    tiers = [ctxcache.Bundle(TIER)]
elif KIND == "package":
    tiers = [ctxcache.ModelPackageTier(TIER)]
elif KIND == "remote":
    tiers = [ctxcache.RemoteTier(TIER, endpoint_url=ENDPOINT)]
# The default a device runs with: signed tiers, the build key trusted (its check is part of the fetch time).
r = ctxcache.ContextCache(CACHE, tiers=tiers, trusted_keys=[PUBLIC]).load(MODEL, providers=[("QNNExecutionProvider", opts)])
_done(r.session, outcome=r.outcome, tier=r.tier, timings=r.timings.__dict__)
"""


def _launch(kind: str, model: Path, cache: Path, tier: str | None = None, endpoint: str | None = None,
            public: str | None = None) -> dict[str, Any]:
    code = c._PRELUDE + (f"KIND = {kind!r}\nMODEL = {str(model)!r}\nCACHE = {str(cache)!r}\n"
                         f"TIER = {tier!r}\nENDPOINT = {endpoint!r}\nPUBLIC = {public!r}\n") + _LAUNCH
    env = dict(c.child_env(), **CREDS)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = c.last_json(proc.stdout)
    out["seconds"] = out["t_end"] - t0
    out["ready"] = out["t_session"] - t0
    expected = ("miss", None) if kind == "compile" else ("hit", None) if kind == "local_hit" else \
        ("hit", "remote" if kind == "remote" else "package" if kind == "package" else "bundle")
    if (out["outcome"], out["tier"]) != expected:
        raise RuntimeError(f"{kind}: expected {expected}, got {(out['outcome'], out['tier'])}")
    if c.QNN not in out["providers"]:
        raise RuntimeError(f"{kind} did not run on QNN: {out['providers']}")
    return out


class _S3:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=0.5)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def run(models: list[str], rounds: int) -> dict[str, Any]:
    import ctxcache
    from ctxcache import RemoteTier, push

    os.environ.update(CREDS)
    kinds = list(KINDS)
    s3: _S3 | None = None
    try:
        import boto3
        import moto.server  # noqa: F401

        s3 = _S3()
        boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket="bench")
    except ImportError:
        kinds.remove("remote")
    rows = []
    try:
        for name in models:
            path = c.model(name)
            base = c.fresh_dir("tiers", name)
            warm = base / "warm"
            cache = ctxcache.ContextCache(warm)
            first = cache.load(path, providers=[(c.QNN, c.qnn_options())])
            assert first.outcome == "miss", first
            (entry,) = cache.entries()
            key = ctxcache.generate_signing_key(base / "sign.pem")
            tiers: dict[str, str] = {
                "bundle_dir": str(ctxcache.export_bundle(cache, base / "bundle", signing_key=key.path).path),
                "bundle_tar": str(ctxcache.export_bundle(cache, base / "bundle.tar", signing_key=key.path).path),
                "package": str(ctxcache.export_model_package(cache, base / "pkg", compatibility=False,
                                                             signing_key=key.path).path),
            }
            if s3 is not None:
                remote = RemoteTier(f"s3://bench/{name}", endpoint_url=s3.url)
                push(cache, remote, keys=[entry.key], signing_key=key.path)
                tiers["remote"] = f"s3://bench/{name}"
            size = entry.size
            times: dict[str, list[float]] = {k: [] for k in kinds}
            ready: dict[str, list[float]] = {k: [] for k in kinds}
            fetch: dict[str, list[float]] = {k: [] for k in kinds}
            for i in range(rounds):
                order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]
                for kind in order:
                    if kind == "local_hit":
                        r = _launch(kind, path, warm, public=key.public_key)
                    else:
                        empty = c.fresh_dir("tiers", name, "run", kind)
                        r = _launch(kind, path, empty, tiers.get(kind), s3.url if s3 else None, key.public_key)
                    times[kind].append(r["seconds"])
                    ready[kind].append(r["ready"])
                    fetch[kind].append(r["timings"].get("fetch", 0.0))
            med = {k: c.median(v) for k, v in times.items()}
            rows.append({"model": name, "size_mb": round(path.stat().st_size / 1e6, 1),
                         "entry_mb": round(size / 1e6, 1), "seconds": med,
                         "ready": {k: c.median(v) for k, v in ready.items()},
                         "fetch": {k: c.median(v) for k, v in fetch.items()}})
    finally:
        if s3 is not None:
            s3.stop()
    return {"rows": rows, "rounds": rounds, "kinds": kinds, "machine": c.machine()}


def report(res: dict[str, Any]) -> str:
    kinds = res["kinds"]
    labels = {"compile": "compile (miss)", "local_hit": "local hit", "bundle_dir": "bundle folder",
              "bundle_tar": "bundle .tar", "package": "ORT model package", "remote": "remote (S3, loopback)"}
    out = []
    for what, title in (("ready", "spawn to session ready"), ("seconds", "spawn to first inference done")):
        rows = [[r["model"], r["size_mb"]] + [f"{r[what][k]:.3f}" for k in kinds] for r in res["rows"]]
        out += [f"{title}, seconds, median of {res['rounds']} fresh processes per cell:\n",
                c.table(["model", "MB"] + [labels[k] for k in kinds], rows), ""]
    rows = []
    for r in res["rows"]:
        s, f = r["ready"], r["fetch"]
        rows.append([r["model"]] + [f"{s[k] / s['local_hit']:.2f}x / {s['compile'] / s[k]:.2f}x / {f[k] * 1000:.0f} ms"
                                    for k in kinds if k not in ("compile", "local_hit")])
    out += ["per tier, session ready: time vs a local hit / speed-up vs compiling / fetch (copy + verify + publish):\n",
            c.table(["model"] + [labels[k] for k in kinds if k not in ("compile", "local_hit")], rows)]
    m = res["machine"]
    out += ["", f"{m['date']}; {m['machine']}; Python {m['python']}; {m['packages']}"]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["conv", "mobilenet", "transformer"], choices=c.MODEL_NAMES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    args = ap.parse_args()
    res = run(args.models, args.rounds)
    print(report(res))
    if args.json:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
