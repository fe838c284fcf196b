"""``python -m ctxcache._worker JOB``: the detached process behind ``on_miss="background"`` and behind the
rebuild of a context ONNX Runtime prefers recompiled. Not an API; started by ``_fill`` through
``_background.start``.

The job carries the app's whole configuration (:meth:`Config.to_json`), so the worker honours every setting
a foreground load honours (``max_size``, ``verify``, ``negative_ttl``, tiers, trust, ``extra_key``...). It
recomputes the load's plan and refuses a job whose key is not the one the app computed: publishing under
another key would leave the app pending at every launch.
"""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("ctxcache")


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    import onnxruntime as ort

    from . import _background, _negative, _sessopts
    from ._cache import ContextCache, store_of
    from ._config import Config

    config = Config.from_json(job["config"])
    # The worker compiles: in its own process, the app's background mode would only start another worker.
    cache = ContextCache.from_config(config.replace(on_miss="compile"))
    store = store_of(cache)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, job["graph_optimization"])
    # After import ctxcache: noted (entries and free-dimension overrides), so the key is the app's.
    _sessopts.apply_config(so, job.get("session_config", {}))
    providers = [(name, options) for name, options in job["providers"]]
    try:
        fp = cache.key(job["model"], providers=providers, sess_options=so)
        if fp is None or fp.key != job["key"]:
            why = (f"the background worker computes key {fp.key[:12] if fp else 'none (a bypass)'} for this job, not "
                   f"{job['key'][:12]}: its environment differs from the app's (another interpreter or library path?)")
            log.warning("%s", why)
            _negative.remember_background_refusal(store.negative_dir, job["key"], why)
            return 1
        if job["mode"] == "rebuild":
            log.info("%s", cache.rebuild(job["model"], providers=providers, sess_options=so))
        else:
            cache.load(job["model"], providers=providers, sess_options=so)
    finally:
        # Reached when the compile finished or its failure was remembered; a worker that is killed or
        # crashes never gets here, and its guard tells a later launch to try again (up to a limit).
        _background.finished(store, job["key"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
