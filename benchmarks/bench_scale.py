"""Q7, scale: does a hit or a listing slow down as the cache fills up?

One real entry (the conv net compiled by QNN), then ``--entries`` - 1 synthetic ones: the real entry's
files hard-linked under new random keys with valid manifests (same artifacts, signatures and digests,
other model names and model digests), so the store sees that many usable entries without gigabytes of
copies. Measured at 1 entry, at N entries, and at N entries with ``--events`` extra lines in the stats
log (``events.log`` grows by one line per load, forever): ``load()`` of the real model (a hit, new
ContextCache each time as at a launch), ``entries()`` in process, and ``ctxcache ls`` in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c


def synthesize(root: Path, count: int) -> None:
    from ctxcache._hashing import signature

    entries = root / "v1" / "entries"
    (real,) = [p for p in entries.iterdir() if p.is_dir()]
    manifest = json.loads((real / "manifest.json").read_bytes())
    names = [a["name"] for a in manifest["artifacts"]]
    made = []
    for i in range(count):
        key = secrets.token_hex(16)
        d = entries / key
        d.mkdir(mode=0o700)
        for name in names:
            os.link(real / name, d / name)
        made.append(key)
    # Linking changed the shared inodes' ctime: take the signatures now, for every entry (the real one too).
    sigs = {name: list(signature(os.lstat(real / name))) for name in names}
    for key in [*made, real.name]:
        m = json.loads(json.dumps(manifest))
        if key != real.name:
            m["key"], m["entry_id"] = key, secrets.token_hex(8)
            m["model"]["name"] = f"synthetic-{key[:6]}.onnx"
            m["parts"] = [[label, secrets.token_hex(16) if label == "model" else value] for label, value in m["parts"]]
        for a in m["artifacts"]:
            a["sig"] = sigs[a["name"]]
        (entries / key / "manifest.json").write_text(json.dumps(m, indent=1))


def add_events(root: Path, count: int) -> None:
    keys = os.listdir(root / "v1" / "entries")
    now = time.time()
    with open(root / "v1" / "events.log", "a") as f:
        for i in range(count):
            f.write(json.dumps({"t": round(now, 3), "o": "hit", "k": keys[i % len(keys)], "r": None, "c": 0.0,
                                "s": 0.1}, separators=(",", ":")) + "\n")


def measure(model: Path, root: Path, rounds: int) -> dict[str, float]:
    import ctxcache

    providers = [(c.QNN, c.qnn_options())]
    assert ctxcache.ContextCache(root).load(model, providers=providers).outcome == "hit"  # warm-up
    hit, own, ls_in, ls_cli = [], [], [], []
    n = len(ctxcache.ContextCache(root).entries())
    for _ in range(rounds):
        cache = ctxcache.ContextCache(root)
        t = time.perf_counter()
        r = cache.load(model, providers=providers)
        hit.append(time.perf_counter() - t)
        own.append(r.timings.total - r.timings.load)
        assert r.outcome == "hit", r
        t = time.perf_counter()
        ctxcache.ContextCache(root).entries()
        ls_in.append(time.perf_counter() - t)
    for _ in range(max(3, rounds // 3)):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ctxcache", "ls", "--cache-dir", str(root)], capture_output=True,
                       env=c.child_env(), check=True)
        ls_cli.append(time.perf_counter() - t)
    return {"entries": n, "hit": c.median(hit), "own": c.median(own), "ls": c.median(ls_in), "ls_cli": c.median(ls_cli)}


def run(count: int, events: int, rounds: int) -> dict[str, Any]:
    import ctxcache

    model = c.model("conv")
    root = c.fresh_dir("scale", "cache")
    assert ctxcache.ContextCache(root).load(model, providers=[(c.QNN, c.qnn_options())]).outcome == "miss"
    rows = [dict(measure(model, root, rounds), label="1 entry")]
    synthesize(root, count - 1)
    rows.append(dict(measure(model, root, rounds), label=f"{count} entries"))
    add_events(root, events)
    rows.append(dict(measure(model, root, rounds), label=f"{count} entries + {events} events logged"))
    return {"rows": rows, "rounds": rounds}


def report(res: dict[str, Any]) -> str:
    base = res["rows"][0]
    rows = [[r["label"], r["entries"], f"{c.ms(r['hit'])} ({(r['hit'] - base['hit']) * 1000:+.1f})",
             f"{r['own'] * 1000:.2f} ({(r['own'] - base['own']) * 1000:+.2f})",
             f"{c.ms(r['ls'])} ({(r['ls'] - base['ls']) * 1000:+.1f})",
             f"{c.ms(r['ls_cli'])} ({(r['ls_cli'] - base['ls_cli']) * 1000:+.0f})"] for r in res["rows"]]
    return (
        f"### 7. Scale (ms, median of {res['rounds']}; in brackets: growth over 1 entry)\n\n"
        + c.table(["cache", "entries listed", "load() hit", "its own time (without session creation)",
                   "entries() in process", "`ctxcache ls` process"], rows)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    res = run(args.entries, args.events, args.rounds)
    res["markdown"] = report(res)
    print(res["markdown"], flush=True)
    return res


if __name__ == "__main__":
    main()
