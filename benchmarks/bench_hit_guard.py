"""What the hit guard costs: a session on a cached context with and without
``session.disable_model_compile=1`` (what ctxcache sets on every context session so that a provider that
would compile again fails the session instead of passing for a slow hit).

In process, one anchor session kept alive for the whole run (QNN rebuilds its backend when the last QNN
session of a process goes, which would tax whichever side comes first), the two sides alternating round
by round, both through ctxcache's own session maker on the same ctx.onnx.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import _common as c


def bench(name: str, rounds: int) -> dict[str, Any]:
    import onnxruntime as ort

    import ctxcache
    from ctxcache import _inputs, providers

    path = c.model(name)
    root = c.fresh_dir("hit_guard", name)
    cache = ctxcache.ContextCache(root)
    assert cache.load(path, providers=[(c.QNN, c.qnn_options())]).outcome == "miss"
    anchor = cache.load(path, providers=[(c.QNN, c.qnn_options())])
    assert anchor.outcome == "hit", anchor
    ctx = str(c.context_model(root))
    qnn = providers.get(c.QNN)
    chain = [(qnn, qnn.normalize_options(c.qnn_options()))]

    def one(guard: bool) -> float:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        t = time.perf_counter()
        s = _inputs.session(ctx, chain, so, target=True, context=guard)
        dt = time.perf_counter() - t
        assert c.QNN in s.get_providers()
        return dt

    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds + 1):  # round 0 warms caches; not counted
        for guard in ((True, False) if i % 2 else (False, True)):
            dt = one(guard)
            if i:
                times[guard].append(dt)
    paired = c.median([a - b for a, b in zip(times[True], times[False], strict=False)])
    del anchor
    return {"model": name, "with": c.median(times[True]), "without": c.median(times[False]), "paired": paired,
            "min_with": min(times[True]), "min_without": min(times[False])}


def report(res: dict[str, Any]) -> str:
    rows = [[r["model"], c.ms(r["without"]), c.ms(r["with"]), f"{r['with'] / r['without']:.2f}",
             f"{r['paired'] * 1000:+.2f}", f"{r['min_without'] * 1000:.2f} / {r['min_with'] * 1000:.2f}"]
            for r in res["rows"]]
    return (f"### Hit guard: session on the context, ms (median of {res['rounds']}, alternating, anchor alive)\n\n"
            + c.table(["model", "without", "with disable_model_compile=1", "ratio", "paired difference",
                       "min without / with"], rows))


if __name__ == "__main__":
    c.per_model_main(sys.argv[1:], __doc__, "conv,mobilenet", 30, bench, report)
