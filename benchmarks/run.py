"""Run every ctxcache benchmark and print (optionally record) the tables.

    python benchmarks/run.py                  # small defaults: a few minutes on 2 cores
    python benchmarks/run.py --big            # more rounds, the 2 GB hashing model
    python benchmarks/run.py --only launch,stampede
    python benchmarks/run.py --write-readme   # replace the results in benchmarks/README.md

Each question is its own script (``bench_<name>.py``, runnable alone with ``--help``); each runs in its
own interpreter, so no benchmark inherits another's loaded libraries or memory. Generated models and
caches go to ``benchmarks/_work/`` (gitignored; ``$CTXCACHE_BENCH_DIR`` moves it).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import _common as c

HERE = Path(__file__).resolve().parent

# name -> (small defaults, --big)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "launch": ([], ["--rounds", "5"]),
    "hit_overhead": ([], ["--rounds", "31", "--import-rounds", "21"]),
    "miss": ([], ["--rounds", "10", "--models", "conv,mobilenet,transformer,resnet50,qdq_int8"]),
    "hashing": ([], ["--size-mb", "2048", "--rounds", "7"]),
    "stampede": ([], ["--rounds", "5"]),
    "memory": ([], ["--rounds", "5", "--models", ",".join(c.MODEL_NAMES)]),
    "scale": ([], ["--rounds", "15"]),
    "verify": ([], ["--rounds", "15"]),
    "first_launch": ([], ["--rounds", "7"]),
    "bypass": ([], ["--rounds", "81"]),
    "launch_cost": ([], ["--rounds", "15", "--hit-rounds", "41"]),
}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def header(command: str, seconds: float, load: str) -> str:
    m = c.machine()
    return "\n".join([
        f"Run {m['date']} with `{command}` ({seconds / 60:.1f} min; load average at start: {load}).",
        "",
        f"- machine: {m['machine']}",
        f"- Python {m['python']}; {m['packages']}",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    ap.add_argument("--big", action="store_true", help="more rounds and the 2 GB hashing model")
    ap.add_argument("--write-readme", action="store_true", help="write the tables into benchmarks/README.md")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    start = time.time()
    log = c.work() / "run.log"
    sections = []
    with open(log, "w") as errs:
        for name in names:
            small, big = BENCHES[name]
            cmd = [sys.executable, str(HERE / f"bench_{name}.py")] + (big if args.big else small)
            print(f"== {name}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
            t = time.time()
            proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=errs, text=True, cwd=HERE, env=c.child_env())
            if proc.returncode != 0:
                sections.append(f"### {name}\n\nFAILED (exit {proc.returncode}); see {log}.")
                print(f"   FAILED; see {log}", file=sys.stderr, flush=True)
                continue
            # QNN's native code prints a line or two on stdout too: keep only the tables.
            text = proc.stdout[proc.stdout.find("### "):].strip()
            sections.append(text)
            print(text + f"\n   ({time.time() - t:.0f} s)\n", flush=True)

    command = "python benchmarks/run.py" + (" --big" if args.big else "") + (f" --only {args.only}" if args.only else "")
    text = header(command, time.time() - start, load) + "\n\n" + "\n\n".join(sections) + "\n"
    (c.work() / "results.md").write_text(text)
    print(f"results: {c.work() / 'results.md'}; stderr of the runs: {log}", file=sys.stderr)
    if args.write_readme:
        readme = HERE / "README.md"
        old = readme.read_text()
        if BEGIN not in old or END not in old:
            print(f"{readme} has no {BEGIN} ... {END} markers; not written", file=sys.stderr)
            return 1
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}{END}", old, flags=re.DOTALL)
        readme.write_text(new)
    return 1 if any("FAILED" in s for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
