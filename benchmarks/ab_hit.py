"""Before / after: the hit path's own time and ``import ctxcache`` of this tree against another git revision.

    python benchmarks/ab_hit.py --base HEAD~3 --rounds 8

Checks the base revision out into a temporary git worktree and runs the same measurement in fresh
processes, alternating the two trees round by round (rotating which goes first). In each process one
anchor session on the context stays alive the whole time (QNN tears its backend down with the last
session of a process, and a torn-down backend would be measured on one side only), then 50 hits are
timed; "own time" is ``timings.total - timings.load`` (everything ``load()`` does but ONNX Runtime's
session creation). Reported: the median over processes of each process's median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as c

ROOT = Path(__file__).resolve().parent.parent

HIT = r"""
import json, statistics, sys
tree, model_name, work = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, tree)
import onnxruntime
import ctxcache
from ctxcache import models
assert ctxcache.__file__.startswith(tree), (ctxcache.__file__, tree)
make = {"conv": lambda p: models.conv_net(p, layers=12, channels=64), "mobilenet": models.mobilenet_like,
        "transformer": lambda p: models.transformer_block(p, d_ff=7168)}[model_name]
model = make(work + "/" + model_name + ".onnx")
providers = [("QNNExecutionProvider", models.qnn_htp_options())]
root = work + "/cache-" + str(abs(hash(tree)))
ctxcache.ContextCache(root).load(model, providers=providers)
anchor = ctxcache.ContextCache(root).load(model, providers=providers)
own = []
for i in range(60):
    r = ctxcache.ContextCache(root).load(model, providers=providers)  # a new cache object, as at a launch
    assert r.outcome == "hit", r
    if i >= 10:
        own.append(r.timings.total - r.timings.load)
print(json.dumps({"value": statistics.median(own)}))
"""

IMPORT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import onnxruntime
t = time.thread_time()
import ctxcache
d = time.thread_time() - t
assert ctxcache.__file__.startswith(sys.argv[1])
print('{"value": %r}' % d)
"""


def _run(code: str, *args: str) -> float:
    env = c.child_env()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return float(c.last_json(out.stdout)["value"])  # not the last line: QNN's '# LIBNATIVE' comes at exit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare this working tree with")
    ap.add_argument("--models", default="conv,mobilenet")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--import-rounds", type=int, default=21)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="ctxcache-ab-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                   capture_output=True)
    try:
        trees = {"base": str(base), "this tree": str(ROOT)}
        work = c.fresh_dir("ab_hit", "work")
        print(f"### Before / after: {args.base} vs the working tree (ms, median over {args.rounds} processes each)\n")
        print("| measure | " + " | ".join(trees) + " |\n|---|---|---|")
        for model in args.models.split(","):
            res: dict[str, list[float]] = {k: [] for k in trees}
            for i in range(args.rounds):
                for name in (list(trees) if i % 2 else list(reversed(trees))):
                    res[name].append(_run(HIT, trees[name], model, str(work)) * 1000)
            print(f"| hit, own time, {model} | " + " | ".join(f"{statistics.median(v):.2f}" for v in res.values()) + " |")
        for name in trees:  # write each tree's bytecode once
            _run(IMPORT, trees[name])
        res = {k: [] for k in trees}
        for i in range(args.import_rounds):
            for name in (list(trees) if i % 2 else list(reversed(trees))):
                res[name].append(_run(IMPORT, trees[name]) * 1000)
        print("| `import ctxcache` after onnxruntime, main-thread CPU | "
              + " | ".join(f"{statistics.median(v):.1f}" for v in res.values()) + " |")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
