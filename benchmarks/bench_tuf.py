"""TUF: pull time of one entry from a remote store with and without TUF verification, side by side.

One process, one entry per model, pulled with ``ctxcache.pull`` into an EMPTY cache each round (what a
new device pays), interleaved round by round:

- ``ed25519``: ``RemoteTier(url)``: the record, its Ed25519 lines, the files (checked against the record);
- ``tuf-new``: ``RemoteTier(url, tuf_root=...)`` on a device that never saw the store (downloads root
  N+1 probe, timestamp, snapshot, targets, then the record by its hash, then the same files and checks);
- ``tuf-known``: the same with the device's TUF state from an earlier launch (snapshot and targets reused
  when the timestamp says they did not change: what a device pays after its first pull).

Stores: moto's S3 server on 127.0.0.1 (a lower bound for a real object store) and a ``file://`` folder.
``--targets N`` also lists N other entries in the targets metadata (a fleet store's size).

    python benchmarks/bench_tuf.py                      # conv + mobilenet, both stores, 15 rounds
    python benchmarks/bench_tuf.py --models conv --stores file --rounds 5 --targets 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import _common as c

KINDS = ("ed25519", "tuf-new", "tuf-known")
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _s3() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=0.5)
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)


def _setup(store: str, endpoint: str | None, models: list[str], extra_targets: int, work: Path) -> dict[str, Any]:
    import ctxcache
    from ctxcache import _tuf_publish

    url = f"s3://bench/{store}" if store == "s3" else (work / "store").as_uri()
    if store == "s3":
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    else:
        (work / "store").mkdir()
    root = ctxcache.RemoteTier(url, endpoint_url=endpoint).tuf_init(work / "tuf-keys")
    build = ctxcache.generate_signing_key(work / "build.pem")
    farm = ctxcache.ContextCache(work / "farm", tiers=[ctxcache.RemoteTier(url, endpoint_url=endpoint, write_back=True,
                                                                          signing_key=build.path, tuf_keys=work / "tuf-keys")])
    keys = {}
    for name in models:
        r = farm.load(c.model(name), providers=[(c.QNN, c.qnn_options())])
        assert r.outcome == "miss", r
        keys[name] = r.key
    if extra_targets:
        objects = ctxcache.RemoteTier(url, endpoint_url=endpoint).tuf_objects()
        fake = {f"{i:032x}": json.dumps({"fake": i}).encode() for i in range(extra_targets)}
        _tuf_publish.publish(objects, _tuf_publish.load_keys(work / "tuf-keys"), url, add=fake)
    return {"url": url, "root": root, "public": build.public_key, "keys": keys}


def _tier(kind: str, env: dict[str, Any], endpoint: str | None) -> Any:
    import ctxcache

    return ctxcache.RemoteTier(env["url"], endpoint_url=endpoint, tuf_root=None if kind == "ed25519" else env["root"])


def _pull(kind: str, tier: Any, env: dict[str, Any], key: str, cache: Path, known: Path | None) -> float:
    """One pull into an empty cache. The tier (its boto3 client) is reused across rounds, as in a running app;
    a TUF tier starts each round with no state in memory (new device) or its state files copied from an
    earlier launch (known device)."""
    import ctxcache
    from ctxcache import _tuf

    dev = ctxcache.ContextCache(cache, trusted_keys=[env["public"]])
    if kind != "ed25519":
        tier._tuf.state = _tuf.State()
    if kind == "tuf-known" and known is not None:
        shutil.copytree(known, cache / "tuf")
    t0 = time.perf_counter()
    res = ctxcache.pull(dev, tier, [key])
    took = time.perf_counter() - t0
    assert list(res.installed) == [key], res
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="conv,mobilenet")
    ap.add_argument("--stores", default="s3,file")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--targets", type=int, default=0, help="other entries listed in the targets metadata")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.getLogger("ctxcache").setLevel(logging.ERROR)
    os.environ.update(CREDS)
    models = args.models.split(",")
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    server = None
    try:
        for store in args.stores.split(","):
            endpoint = None
            if store == "s3":
                server, endpoint = _s3()
            work = c.fresh_dir("tuf", store)
            env = _setup(store, endpoint, models, args.targets, work)
            for name in models:
                key = env["keys"][name]
                primed = work / "primed"
                tiers = {k: _tier(k, env, endpoint) for k in KINDS}
                for k in KINDS:  # warms imports and clients; the first TUF pull gives a device state to copy
                    _pull(k, tiers[k], env, key, primed if k == "tuf-new" else work / f"warm-{k}", None)
                times: dict[str, list[float]] = {k: [] for k in KINDS}
                for i in range(args.rounds):
                    order = KINDS if i % 2 == 0 else tuple(reversed(KINDS))
                    for kind in order:
                        cache = work / f"dev-{name}-{kind}-{i}"
                        times[kind].append(_pull(kind, tiers[kind], env, key, cache, primed / "tuf"))
                        shutil.rmtree(cache, ignore_errors=True)
                results.setdefault(store, {})[name] = times
            if server is not None:
                server.terminate()
                server.wait(10)
                server = None
    finally:
        if server is not None:
            server.terminate()
    if args.json:
        print(json.dumps({s: {m: {k: c.median(v) for k, v in t.items()} for m, t in r.items()} for s, r in results.items()}))
        return 0
    rows = []
    for store, per in results.items():
        for name, t in per.items():
            base = c.median(t["ed25519"])
            new, known = c.median(t["tuf-new"]), c.median(t["tuf-known"])
            rows.append([store, name, c.ms(base), c.ms(new), c.ms(known), f"{new / base:.2f}x", f"{known / base:.2f}x",
                         f"+{c.ms(new - base)}", f"+{c.ms(known - base)}"])
    print(f"pull of one entry into an empty cache, median of {args.rounds} rounds, ms "
          f"(targets listing {args.targets} other entries)")
    print(c.table(["store", "model", "ed25519 only", "TUF, new device", "TUF, known device", "new/ed25519",
                   "known/ed25519", "TUF cost (new)", "TUF cost (known)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
