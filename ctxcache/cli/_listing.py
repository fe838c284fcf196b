"""``ctxcache ls`` (filter, sort, limit) and ``ctxcache rm MODEL|KEY``: what ``pip cache`` / ``hf cache`` users expect.

A MODEL is a model file (its entries are found by content, wherever the file is now) or a model name as
``ls`` shows it; a KEY is a key prefix of 4+ hex digits. ``rm`` shows a plan and removes exactly it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import ctxcache

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    UsageError,
    add_command,
    add_confirm_flags,
    confirm,
    emit_json,
    err,
    human_size,
    human_time,
    open_cache,
    out,
    provider_name,
    table,
    why_not_removed,
)

_KEY_RE = re.compile(r"[0-9a-fA-F]{4,}")
SORTS: dict[str, tuple[Callable[[Any], Any], bool]] = {  # name -> (sort key, largest/newest first)
    "used": (lambda e: e.last_used, True),
    "created": (lambda e: e.created, True),
    "size": (lambda e: e.size, True),
    "hits": (lambda e: e.hits, True),
    "name": (lambda e: (e.model_name.lower(), e.key), False),
}


def _options_text(parts: dict[str, Any]) -> str:
    opts = parts.get("ep_options")
    if not isinstance(opts, dict):
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "-"


def _model_keys(cache: ctxcache.ContextCache, target: str, infos: Sequence[ctxcache.EntryInfo]) -> set[str] | None:
    """Keys of the entries of a model file (by content) or model name; ``None``: ``target`` is neither."""
    if os.path.isfile(target):
        return {e.key for e in cache.select(models=[target])}
    named = {e.key for e in infos if e.model_name == target or e.model_name == os.path.basename(target)}
    if named:
        return named
    if os.sep in target or target.lower().endswith(".onnx"):
        raise UsageError(f"{os.path.abspath(target)} does not exist, and no entry is of a model named "
                         f"{os.path.basename(target)!r} (see `ctxcache ls`)")
    return None


def _select(cache: ctxcache.ContextCache, infos: list[ctxcache.EntryInfo], *, models: Sequence[str] = (),
            keys: Sequence[str] = (), provider: str | None = None) -> list[ctxcache.EntryInfo]:
    chosen = infos
    if models:
        wanted: set[str] = set()
        for m in models:
            found = _model_keys(cache, m, infos)
            if found is None:
                raise UsageError(f"{m!r} is neither a model file nor a model name of an entry (see `ctxcache ls`)")
            wanted |= found
        chosen = [e for e in chosen if e.key in wanted]
    if keys:
        chosen = [e for e in chosen if any(e.key.startswith(k.lower()) for k in keys)]
    if provider:
        full = provider_name(provider)
        chosen = [e for e in chosen if e.provider == full]
    return chosen


# -- ls ---------------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    cache = open_cache(args, must_exist=True)
    every = cache.entries(include_broken=args.all)
    infos = _select(cache, every, models=args.model or (), keys=args.key or (), provider=args.provider)
    sort_key, newest_first = SORTS[args.sort]
    infos.sort(key=sort_key, reverse=newest_first != args.reverse)
    matched = len(infos)
    if args.limit is not None:
        infos = infos[:args.limit]
    if args.format == "json":
        verdicts = cache.verdicts()
        emit_json({"cache_dir": str(cache.root), "matched": matched, "total": len(every),
                   "entries": [dict(e.as_dict(), compatibility=verdicts.get(e.key)) for e in infos]})
        return EXIT_OK
    if not infos:
        out(f"no entries in {cache.root}" if not every else
            f"no entry of the {len(every)} in {cache.root} matches")
        return EXIT_OK
    rows = []
    for e in infos:
        rows.append([
            e.model_name, e.provider.removesuffix("ExecutionProvider"), e.key[:12], human_size(e.size),
            human_time(e.created), human_time(e.last_used), e.hits,
            e.broken if e.broken else _options_text(e.parts),
        ])
    out(table(["MODEL", "PROVIDER", "KEY", "SIZE", "CREATED", "LAST USED", "HITS", "OPTIONS"], rows, right=(3, 6)))
    shown = f"{len(infos)} of {matched} matching" if len(infos) < matched else f"{len(infos)}"
    if matched < len(every) and len(infos) == matched:
        shown += f" of {len(every)}"
    out(f"\n{shown} entr{'y' if len(infos) == 1 else 'ies'}, {human_size(sum(e.size for e in infos))} in {cache.root}")
    return EXIT_OK


# -- rm ---------------------------------------------------------------------------------------------
def cmd_rm(args: argparse.Namespace) -> int:
    cache = open_cache(args, must_exist=True)
    every = cache.entries(include_broken=True)
    chosen: dict[str, ctxcache.EntryInfo] = {}
    for target in args.targets:
        if _KEY_RE.fullmatch(target) and not os.path.exists(target):
            found = [e for e in every if e.key.startswith(target.lower())]
        else:
            keys = _model_keys(cache, target, every)
            if keys is None:
                raise UsageError(f"{target!r} is neither a model file, a model name of an entry, nor a key prefix "
                                 "of 4+ hex digits (see `ctxcache ls`)")
            found = [e for e in every if e.key in keys]
        if not found:
            raise CommandFailed(f"no entry of {cache.root} matches {target!r} (see `ctxcache ls`); nothing removed")
        chosen.update((e.key, e) for e in found)
    plan = ctxcache.plan_remove(cache, list(chosen.values()))
    n, size = len(plan.items), plan.freed
    what = f"{n} entr{'y' if n == 1 else 'ies'} ({human_size(size)})"
    if not args.dry_run and not confirm(f"remove {what} from {cache.root}?", yes=args.yes):
        err("nothing removed")
        return EXIT_OK
    report = plan.report() if args.dry_run else plan.execute()
    gone = set(report.removed)
    failed = [i for i in plan.items if not args.dry_run and i.key not in gone]
    if args.format == "json":
        emit_json({"cache_dir": str(cache.root), **report.as_dict()})
        return EXIT_FAILED if failed else EXIT_OK
    rows = [[i.model_name, i.key[:12], human_size(i.size), human_time(i.last_used),
             "would remove" if args.dry_run else ("removed" if i.key in gone else "NOT removed")] for i in plan.items]
    out(table(["MODEL", "KEY", "SIZE", "LAST USED", "ACTION"], rows, right=(2,)))
    if args.dry_run:
        out(f"would remove {what} from {cache.root}")
    else:
        freed = sum(i.size for i in plan.items if i.key in gone)
        out(f"removed {len(gone)} entr{'y' if len(gone) == 1 else 'ies'} ({human_size(freed)}) from {cache.root}")
    if failed:
        err(f"not removed: {len(failed)} entr{'y' if len(failed) == 1 else 'ies'} ({why_not_removed(cache)})")
        return EXIT_FAILED
    return EXIT_OK


def add_parsers(subs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(subs, "ls", "list cached entries; filter by model, provider or key, sort, limit",
                    "ctxcache ls\nctxcache ls --sort size --limit 5\nctxcache ls --model net.onnx --provider qnn\n"
                    "ctxcache ls --all --format json", cmd_ls)
    p.add_argument("--all", action="store_true", help="include damaged entries")
    p.add_argument("-m", "--model", action="append", metavar="MODEL",
                   help="entries of this model: a file (by content) or a name as ls shows it (repeatable)")
    p.add_argument("-p", "--provider", metavar="NAME", help="entries compiled for this provider (qnn, QNNExecutionProvider...)")
    p.add_argument("-k", "--key", action="append", metavar="PREFIX", help="entries whose key starts with PREFIX (repeatable)")
    p.add_argument("--sort", choices=tuple(SORTS), default="used",
                   help="used (default), created, size, hits: largest / most recent first; name: A to Z")
    p.add_argument("--reverse", action="store_true", help="the other way round")
    p.add_argument("-n", "--limit", type=_positive, metavar="N", help="show the first N entries")

    p = add_command(subs, "rm", "remove the entries of a model (all its provider configurations) or a key",
                    "ctxcache rm app/models/net.onnx --dry-run\nctxcache rm net.onnx --yes\nctxcache rm 3f2a9c1e --yes",
                    cmd_rm)
    p.add_argument("targets", nargs="+", metavar="MODEL|KEY",
                   help="a model file (its entries, by content), a model name as `ctxcache ls` shows it, or a key "
                        "prefix of 4+ hex digits")
    add_confirm_flags(p, "only show what would be removed")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return n
