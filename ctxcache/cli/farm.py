"""``ctxcache farm device | plan | run | report``: the fleet build farm (README, "Fleet builds").

``device`` (on a device) writes its class: provider, options, the key parts it reports. ``plan`` turns
models x classes into keyed cells and leaves out what the store holds. ``run`` builds the cells on
local processes or a Dask cluster and publishes them, signed, to the store. ``report`` (on a device)
writes what it had to compile itself, for the next ``plan --reports``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import ctxcache
from ctxcache import farm

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    UsageError,
    add_command,
    add_key_flags,
    add_provider_flags,
    emit_json,
    human_size,
    open_cache,
    out,
    providers_or_default,
    table,
)


def _write_json(path: str | None, data: Any) -> None:
    """``path`` (a new file, written whole then renamed in), or stdout."""
    if not path or path == "-":
        emit_json(data)
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, target)


def _remote(url: str, endpoint_url: str | None) -> ctxcache.RemoteTier:
    if "://" not in url:
        raise UsageError(f"a store is a URL (s3://bucket/prefix, file:///share/ctxcache, ...), not {url!r}")
    try:
        return ctxcache.RemoteTier(url, endpoint_url=endpoint_url, match="portable")
    except ValueError as e:
        raise UsageError(str(e)) from None


# -- commands ---------------------------------------------------------------------------------------
def _usage_on_bad_input(func: Any) -> Any:
    """A farm input that cannot be used (a devices file, a plan, a report, an engine setting) is a usage
    error (exit 2) that names the file, like a bad model or provider option."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except farm.FarmError as e:
            raise UsageError(str(e)) from None

    wrapped.__name__ = func.__name__
    return wrapped


@_usage_on_bad_input
def cmd_device(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    classes = []
    configs = providers_or_default(args.providers)
    for i, cfg in enumerate(configs):
        name = args.name if args.name and len(configs) == 1 else (f"{args.name}-{i}" if args.name else None)
        classes.append(farm.this_device(name, cfg.name, cfg.options, cache))
    doc = farm.devices_document(classes)
    if args.out and args.out != "-" and os.path.exists(args.out) and args.append:
        old = farm.load_devices([args.out])
        doc = farm.devices_document([*[c for c in old if c.name not in {n.name for n in classes}], *classes])
    _write_json(args.out, doc)
    if args.out and args.out != "-":
        for c in classes:
            out(f"{c.name}: {c.provider} {' '.join(f'{k}={v}' for k, v in sorted(c.options.items()))} -> {args.out}")
    return EXIT_OK


@_usage_on_bad_input
def cmd_plan(args: argparse.Namespace) -> int:
    classes = farm.load_devices(args.devices or [])
    reports = farm.read_reports(args.reports or [])
    remote = _remote(args.store, args.endpoint_url) if args.store else None
    try:
        p = farm.plan(args.models, classes, remote=remote, reports=reports,
                      settings=farm.Settings(embed=args.embed, extra_key=args.extra_key))
    except ctxcache.errors.TierError as e:
        raise CommandFailed(f"cannot read the store: {e}") from None
    doc = p.as_dict(include_done=args.all)
    if args.out:
        _write_json(args.out, doc)
    if args.format == "json" and not args.out:
        emit_json(doc)
        return EXIT_OK
    for c in p.classes:
        for why in c.why:
            out(f"new class {c.name}: {why}")
    rows = [(c.model_name, c.device_class, c.key[:12], c.state + (f" ({c.held})" if c.held else ""))
            for c in (p.cells if args.all else p.todo)]
    if rows:
        out(table(["MODEL", "CLASS", "KEY", "STATE"], rows))
    out(f"{len(p.todo)} of {len(p.cells)} cells to build" + (f" (the store holds {len(p.cells) - len(p.todo)})"
                                                            if remote is not None else " (no --store: none checked)")
        + (f"; plan written to {args.out}" if args.out else ""))
    return EXIT_OK


class _ProgressLine:
    """One line on stderr, rewritten in place on a terminal; a line per change otherwise (logs)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, p: farm.Progress) -> None:
        text = (f"farm: {p.done}/{p.total} cells  built {p.built}  present {p.present}  failed {p.failed}  "
                f"left {p.running}" + (f"  retried {p.retrying}" if p.retrying else ""))
        if text == self.last and not self.tty:
            return  # a log gets a line per change, a terminal a clock too
        self.last = text
        text += f"  {p.elapsed:.0f} s"
        sys.stderr.write(("\r" + text + "\x1b[K") if self.tty else text + "\n")
        sys.stderr.flush()

    def end(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")


@_usage_on_bad_input
def cmd_run(args: argparse.Namespace) -> int:
    p = farm.read_plan(args.plan)
    store = args.store or p.store
    if not store:
        raise UsageError("no store: pass --store s3://bucket/prefix (the plan names none)")
    _remote(store, args.endpoint_url)  # a bad URL fails here, not in every worker
    key_file = args.signing_key_file
    if key_file is not None:
        key_file = os.path.abspath(os.path.expanduser(key_file))  # workers run in other folders
        if not os.path.isfile(key_file):
            raise UsageError(f"the signing key file {key_file} does not exist (make one with `ctxcache keygen`)")
    elif not os.environ.get("CTXCACHE_SIGNING_KEY"):
        raise UsageError("entries must be signed: pass --signing-key-file (ctxcache keygen) or set $CTXCACHE_SIGNING_KEY")
    job = farm.Job(store, args.endpoint_url, key_file, p.settings.embed, p.settings.extra_key)
    engine = farm.make_engine(args.engine, scheduler=args.scheduler, jobs=args.jobs, timeout=args.cell_timeout)
    line = _ProgressLine()
    try:
        res = farm.run(p.cells, job, engine=engine, retries=args.retries, progress=None if args.quiet else line)
    except ctxcache.errors.TierError as e:
        raise CommandFailed(f"cannot read the store: {e}") from None
    finally:
        line.end()
        engine.close()
    if args.format == "json":
        emit_json(res.as_dict())
    else:
        rows = [(r.cell.model_name, r.cell.device_class, r.cell.key[:12], r.result.status,
                 human_size(r.result.size) if r.result.size else None, f"{r.result.seconds:.1f}" if r.attempts else None,
                 r.attempts, r.result.error) for r in res.cells]
        out(table(["MODEL", "CLASS", "KEY", "STATUS", "SIZE", "SECONDS", "TRIES", "ERROR"], rows, right=(4, 5, 6)))
        c = res.counts
        hours = res.seconds / 3600
        rate = f", {c.get('built', 0) / hours:.0f} cells/hour" if c.get("built") and hours > 0 else ""
        out(f"{c.get('built', 0)} built, {c.get('present', 0)} already in the store, {c.get('failed', 0)} failed "
            f"in {res.seconds:.1f} s on {res.engine}{rate}")
    return EXIT_OK if res.ok else EXIT_FAILED


@_usage_on_bad_input
def cmd_report(args: argparse.Namespace) -> int:
    cache = open_cache(args)
    doc = farm.device_report(cache, limit=args.limit)
    _write_json(args.out, doc)
    if args.out and args.out != "-":
        out(f"{len(doc['items'])} entries compiled on this device (none served by a tier) -> {args.out}")
    return EXIT_OK


def add_parsers(subs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``farm`` and its commands on the ``ctxcache`` parser."""
    group = subs.add_parser("farm", help="the fleet build farm: plan models x device classes, build on local processes or "
                                         "a Dask cluster, publish to the store; device classes and field reports",
                            description="The fleet build farm (README, 'Fleet builds').")
    fs = group.add_subparsers(dest="farm_command", metavar="COMMAND", title="farm commands")

    def usage(_: argparse.Namespace) -> int:
        group.print_help(sys.stderr)
        return 2

    group.set_defaults(func=usage, verbose=0)

    p = add_command(fs, "device", "on a device: write its class (provider, options, the key parts it reports)",
                    """
                    ctxcache farm device --name sd8g3 --preset qnn-htp -o soc_model=60 -o htp_arch=73 --out devices.json
                    ctxcache farm device --name sd8e -p qnn -o soc_model=69 -o htp_arch=79 --out devices.json --append
                    """, cmd_device)
    p.add_argument("--name", help="the class name (default: provider, options and a digest of the key parts)")
    p.add_argument("--out", metavar="FILE", help="write the devices file here (default: stdout)")
    p.add_argument("--append", action="store_true", help="add to (or replace by name in) an existing --out file")
    add_provider_flags(p, what="the configuration the app loads with on this device (default: --preset qnn-htp)")

    p = add_command(fs, "plan", "models x device classes -> keyed cells, leaving out what the store holds",
                    """
                    ctxcache farm plan models/*.onnx --devices devices.json --store s3://builds/ctx --out plan.json
                    ctxcache farm plan models/*.onnx --devices devices.json --reports field/*.json --store s3://builds/ctx
                    """, cmd_plan, cache=False)
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files")
    p.add_argument("--devices", action="append", metavar="FILE",
                   help="device classes: a `farm device` file or `doctor --format json` output from a device (repeatable)")
    p.add_argument("--reports", action="append", metavar="FILE",
                   help="`farm report` files from devices: each target seen there that no class covers becomes a class")
    p.add_argument("--store", metavar="URL", help="the remote store (s3://bucket/prefix or fsspec URL): cells it holds are done")
    p.add_argument("--endpoint-url", metavar="URL", help="an S3-compatible server (MinIO, Ceph...); also $AWS_ENDPOINT_URL")
    p.add_argument("--out", metavar="FILE", help="write the plan (JSON) here")
    p.add_argument("--all", action="store_true", help="list and write the cells the store holds too")
    add_key_flags(p)

    p = add_command(fs, "run", "build a plan's cells and publish them, signed, to the store",
                    """
                    ctxcache farm run plan.json --store s3://builds/ctx --signing-key-file build.pem --jobs 2
                    ctxcache farm run plan.json --store s3://builds/ctx --signing-key-file build.pem \\
                        --engine dask --scheduler tcp://10.0.0.5:8786
                    """, cmd_run, cache=False)
    p.add_argument("plan", metavar="PLAN", help="a plan written by `ctxcache farm plan --out`")
    p.add_argument("--store", metavar="URL", help="the remote store (default: the plan's)")
    p.add_argument("--endpoint-url", metavar="URL", help="an S3-compatible server (MinIO, Ceph...); also $AWS_ENDPOINT_URL")
    p.add_argument("--signing-key-file", metavar="FILE",
                   help="the Ed25519 private key (ctxcache keygen) workers sign with; default $CTXCACHE_SIGNING_KEY")
    p.add_argument("--engine", choices=("local", "dask"), default="local",
                   help="local: child processes here (default); dask: a Dask distributed scheduler "
                        "(pip install 'ctxcache[farm]')")
    p.add_argument("--scheduler", metavar="ADDRESS", help="with --engine dask: the scheduler, tcp://HOST:PORT")
    p.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                   help="local engine: cells at once (0: one per CPU; default 1)")
    p.add_argument("--retries", type=int, default=2, metavar="N", help="tries after a failed one, per cell (default 2)")
    p.add_argument("--cell-timeout", type=float, default=None, metavar="S",
                   help="local engine: give up an attempt after S seconds")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")

    p = add_command(fs, "report", "on a device: what it compiled itself (no tier had it), for `farm plan --reports`",
                    "ctxcache farm report --out report.json --cache-dir ~/.local/share/myapp/ctxcache", cmd_report)
    p.add_argument("--out", metavar="FILE", help="write the report here (default: stdout)")
    p.add_argument("--limit", type=int, default=256, metavar="N", help="at most N entries, newest first (default 256)")
