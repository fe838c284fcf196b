"""Fleet builds: cells per hour against workers, on a real Dask LocalCluster and a real S3 server.

Real cells: QNN compiles of small generated models for two device classes (soc 60/v73, soc 69/v75),
each published (signed) to moto's S3 server on 127.0.0.1, with 1 and 2 Dask worker processes (this
machine has 2 cores) and, beside them, the local engine (one child process per cell) with 1 and 2 jobs.
Simulated cells: the same path (a worker asks the store, then "compiles") with the compile replaced by a
sleep, for 1 to 8 workers: the gap to the ideal rate (workers x 3600 / cost) is the scheduler's and the
store lookup's overhead. Every configuration publishes to a fresh store prefix, so every cell is built.

    python benchmarks/bench_farm.py                       # 8 real cells, 32 simulated cells of 0.5 s
    python benchmarks/bench_farm.py --real-models 6 --sim-cells 64 --sim-cost 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import _common as c

CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
CLASSES = (("sd-60-73", "60", "73"), ("sd-69-75", "69", "75"))


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


def _cells(n_models: int, tag: str) -> list[Any]:
    from ctxcache import farm, models

    d = c.work("farm", "models", tag)
    ms = [models.conv_net(d / f"net{i}.onnx", layers=4, channels=16, seed=100 + i) for i in range(n_models)]
    base = c.qnn_options()
    classes = [farm.this_device(name, c.QNN, dict(base, soc_model=soc, htp_arch=arch)) for name, soc, arch in CLASSES]
    return list(farm.plan(ms, classes).cells)


def _measure(engine: Any, cells: list[Any], job: Any) -> dict[str, Any]:
    from ctxcache import farm

    t = time.perf_counter()
    res = farm.run(cells, job, engine=engine, retries=0)
    seconds = time.perf_counter() - t
    built = res.counts.get("built", 0)
    per_cell = [r.result.seconds for r in res.cells if r.result.status == "built"]
    return {"cells": len(cells), "built": built, "failed": res.counts.get("failed", 0), "seconds": round(seconds, 2),
            "cells_per_hour": round(built / seconds * 3600) if seconds else 0,
            "median_cell_s": round(c.median(per_cell), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-models", type=int, default=4, help="models for the real cells (x 2 classes; default 4)")
    ap.add_argument("--sim-cells", type=int, default=32, help="simulated cells (default 32)")
    ap.add_argument("--sim-cost", type=float, default=0.5, help="seconds a simulated cell 'compiles' (default 0.5)")
    ap.add_argument("--sim-workers", default="1,2,4,8", help="worker counts for simulated cells (default 1,2,4,8)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.update(CREDS)  # the workers (spawned) inherit them

    import boto3
    from distributed import LocalCluster

    import ctxcache
    from ctxcache import farm

    s3 = _S3()
    client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    client.create_bucket(Bucket="farm-bench")
    key = c.work("farm") / "build.pem"
    if not key.exists():
        ctxcache.generate_signing_key(key)
    rows: list[dict[str, Any]] = []
    n = 0

    def job(simulate: float | None = None) -> Any:
        nonlocal n
        n += 1
        return farm.Job(f"s3://farm-bench/run{n}-{int(time.time())}", s3.url, str(key), simulate=simulate)

    try:
        real = _cells(args.real_models, "real")
        sim = _cells(max(1, args.sim_cells // len(CLASSES)), "sim")[: args.sim_cells]
        for workers in (1, 2):
            eng = farm.LocalEngine(jobs=workers)
            try:
                rows.append({"kind": "real QNN", "engine": "local", "workers": workers, **_measure(eng, real, job())})
            finally:
                eng.close()
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as cluster:
                eng2 = farm.DaskEngine(cluster.scheduler_address)
                try:
                    _measure(eng2, real[:workers], job())  # the workers import onnxruntime and QNN once
                    rows.append({"kind": "real QNN", "engine": "dask", "workers": workers, **_measure(eng2, real, job())})
                finally:
                    eng2.close()
        for workers in (int(w) for w in args.sim_workers.split(",")):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as cluster:
                eng3 = farm.DaskEngine(cluster.scheduler_address)
                try:
                    _measure(eng3, sim[:workers], job(args.sim_cost))
                    r = _measure(eng3, sim, job(args.sim_cost))
                finally:
                    eng3.close()
            ideal = workers * 3600 / args.sim_cost
            rows.append({"kind": f"simulated {args.sim_cost:g} s", "engine": "dask", "workers": workers, **r,
                         "ideal_per_hour": round(ideal), "efficiency": round(r["cells_per_hour"] / ideal, 2)})
    finally:
        s3.stop()
    if args.json:
        print(json.dumps({"machine": c.machine(), "rows": rows}, indent=1))
        return 0
    headers = ["cells", "engine", "workers", "cells built", "seconds", "cells/hour", "median cell s", "ideal/hour", "efficiency"]
    print(c.table(headers, [[r["kind"], r["engine"], r["workers"], f"{r['built']}/{r['cells']}", r["seconds"],
                             r["cells_per_hour"], r["median_cell_s"], r.get("ideal_per_hour", "-"), r.get("efficiency", "-")]
                            for r in rows]))
    return 0


if __name__ == "__main__":  # worker processes are spawned: they import this file without running it
    raise SystemExit(main())
