"""``python -m ctxcache._worker JOB``: the detached process behind ``on_miss="background"`` and behind the
rebuild of a context ONNX Runtime prefers recompiled. Not an API; started by ``_background.start``."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    import onnxruntime as ort

    from . import _background
    from ._cache import ContextCache, store_of

    cache = ContextCache(job["root"], on_miss="compile", **job["settings"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, job["graph_optimization"])
    for k, v in job.get("config", {}).items():  # after import ctxcache: noted, so the key is the app's
        so.add_session_config_entry(k, v)
    providers = [(name, options) for name, options in job["providers"]]
    try:
        if job["mode"] == "rebuild":
            cache._loader.rebuild(job["model"], providers, so)
        else:
            cache.load(job["model"], providers=providers, sess_options=so)
    finally:
        # Reached when the compile finished or its failure was remembered; a worker that is killed or
        # crashes never gets here, and its guard tells a later launch to try again (up to a limit).
        _background.finished(store_of(cache), job["key"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
