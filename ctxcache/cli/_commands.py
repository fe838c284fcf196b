"""The inspection and maintenance commands: explain, verify, prune, clear, stats, doctor (ls and rm: _listing).

Each is one function taking the parsed arguments and returning an exit code; the library does the
work and returns objects, these functions only render them.
"""

from __future__ import annotations

import argparse
from typing import Any

import ctxcache

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    confirm,
    emit_json,
    err,
    human_size,
    human_time,
    open_cache,
    out,
    providers_or_default,
    seconds,
    shown,
    table,
    why_not_removed,
)


# -- explain ----------------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    cache = open_cache(args, extra_key=args.extra_key, embed=args.embed)
    configs = providers_or_default(args.providers)
    provider_list = [c.as_tuple() for c in configs]
    ex = cache.explain(args.model, providers=provider_list)
    # A local miss that a tier would serve is still a hit for the application (outcome "hit", tier set).
    served_by = ex.served_by
    hit = ex.would_hit
    if args.format == "json":
        emit_json({"cache_dir": str(cache.root), "providers": [c.as_dict() for c in configs], **ex.as_dict()})
        return EXIT_OK if hit else EXIT_FAILED
    out(f"model     {shown(ex.model)}" + (f"  (content {ex.model_digest[:12]})" if ex.model_digest else ""))
    out(f"provider  {' / '.join(c.label() for c in configs)}")
    if ex.key:
        out(f"key       {ex.key}")
    if ex.compatibility:
        out(f"device    {ex.compatibility}")
    if ex.side_cache:
        out(f"provider cache  {', '.join(sorted(ex.side_cache['caches']))} in {ex.side_cache['folder']} "
            f"({human_size(ex.side_cache['size'])})")
    out(f"verdict   {shown(ex.summary())}")
    if ex.verdict == "miss":
        if not ex.nearest:
            k = ex.other_entries
            others = f" ({k} entr{'y' if k == 1 else 'ies'} of other models)" if k else ""
            out(f"nearest   none: no entry of this model in {cache.root}{others}; a load would compile")
        for n in ex.nearest:
            what = "same content" if n.same_content else "same file name, other content"
            out(f"nearest   {n.key[:12]} ({shown(n.model_name)}, {what}, created {human_time(n.created)}) "
                f"differs in {len(n.differences)} part{'s' if len(n.differences) != 1 else ''}:")
            for d in n.differences:
                out(f"            {d}")
    for t in ex.tiers:
        line = f"tier      {t.tier}: {t.has or 'no entry for this key'}"
        if t.signature is not None:
            line += f", {_signed_text(t)}"
        if t.refused:
            line += f"; REFUSED {t.refused}"
        out(line + ("  -> a load would fetch it from here instead of compiling" if t is served_by else ""))
    return EXIT_OK if hit else EXIT_FAILED


# -- verify -----------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    cache = open_cache(args, must_exist=True)
    results = cache.verify_entries(fix=args.fix)
    bad = [r for r in results if not r.ok]
    kept = [r for r in bad if args.fix and not r.quarantined]  # --fix asked, and the entry is still there
    if args.format == "json":
        emit_json({"cache_dir": str(cache.root), "checked": len(results), "damaged": len(bad), "fixed": args.fix,
                   "quarantined": sum(1 for r in bad if r.quarantined), "not_quarantined": len(kept),
                   "entries": [r.as_dict() for r in results]})
        return EXIT_FAILED if bad else EXIT_OK
    if results:
        rows = []
        for r in results:
            status = "ok" if r.problem is None else f"{r.problem.code}: {r.problem.message}"
            action = "quarantined" if r.quarantined else ("-" if r.ok or not args.fix else "NOT quarantined")
            rows.append([r.model_name, r.key[:12], human_size(r.size), status, (r.compatibility or "-").split(":")[0], action])
        out(table(["MODEL", "KEY", "SIZE", "STATUS", "DEVICE VERDICT", "ACTION"], rows, right=(2,)))
    if not bad:
        out(f"{len(results)} entr{'y' if len(results) == 1 else 'ies'} checked, all intact ({cache.root})")
        return EXIT_OK
    if not args.fix:
        out(f"{len(bad)} of {len(results)} entries damaged: run `ctxcache verify --fix` to quarantine them")
    elif not kept:
        out(f"{len(bad)} of {len(results)} entries damaged: quarantined; the next load recompiles them")
    else:
        out(f"{len(bad)} of {len(results)} entries damaged: {len(bad) - len(kept)} quarantined, {len(kept)} NOT "
            f"({why_not_removed(cache)}); loads still refuse a damaged entry and use the original model")
    return EXIT_FAILED


# -- prune ------------------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace) -> int:
    cache = open_cache(args, must_exist=True)
    # One plan: the one shown (and confirmed) is the one executed.
    plan = cache.plan_prune(max_size=args.max_size, older_than=args.older_than, other_environments=not args.keep_other_env)
    if plan.items and not args.dry_run and not confirm(
            f"remove {len(plan.items)} entries ({human_size(plan.freed)}) from {cache.root}?", yes=args.yes):
        err("nothing removed")
        return EXIT_OK
    # Without --dry-run the plan is executed even when empty, so the report says "removed 0", not "would remove".
    report = plan.report() if args.dry_run else plan.execute()
    if args.format == "json":
        emit_json({"cache_dir": str(cache.root), **report.as_dict()})
        return EXIT_FAILED if report.failed else EXIT_OK
    if report.items:
        rows = [[i.model_name, i.key[:12], human_size(i.size), human_time(i.last_used), i.why.replace("_", " "), i.detail]
                for i in report.items]
        out(table(["MODEL", "KEY", "SIZE", "LAST USED", "WHY", "DETAIL"], rows, right=(2,)))
    verb = "would free" if report.dry_run else "freed"
    n = len(report.items) if report.dry_run else len(report.removed)
    out(f"{'would remove' if report.dry_run else 'removed'} {n} entr{'y' if n == 1 else 'ies'}, {verb} "
        f"{human_size(report.freed)}; {human_size(report.size_after)} left in {cache.root}")
    why = why_not_removed(cache) if report.failed else ""
    for item in report.failed:
        err(f"not removed: {item.key[:12]} ({shown(item.model_name)}): {why}")
    return EXIT_FAILED if report.failed else EXIT_OK


# -- clear ------------------------------------------------------------------------------------------
def cmd_clear(args: argparse.Namespace) -> int:
    cache = open_cache(args, must_exist=True)
    infos = cache.entries(include_broken=True)
    size = sum(e.size for e in infos)
    if args.dry_run:
        if args.format == "json":
            emit_json({"cache_dir": str(cache.root), "dry_run": True, "removed": 0, "would_remove": len(infos), "freed": 0,
                       "would_free": size})
        else:
            out(f"would remove {len(infos)} entries ({human_size(size)}) from {cache.root}")
        return EXIT_OK
    if infos and not confirm(f"remove all {len(infos)} entries ({human_size(size)}) from {cache.root}?", yes=args.yes):
        err("nothing removed")
        return EXIT_OK
    n = cache.clear()
    left = cache.entries(include_broken=True)
    freed = max(0, size - sum(e.size for e in left))
    if args.format == "json":
        emit_json({"cache_dir": str(cache.root), "removed": n, "freed": freed, "not_removed": len(left)})
    else:
        out(f"removed {n} entr{'y' if n == 1 else 'ies'} ({human_size(freed)}) from {cache.root}")
    if left:
        err(f"not removed: {len(left)} entr{'y' if len(left) == 1 else 'ies'} ({why_not_removed(cache)})")
        return EXIT_FAILED
    return EXIT_OK


# -- stats ------------------------------------------------------------------------------------------
def cmd_stats(args: argparse.Namespace) -> int:
    cache = open_cache(args, must_exist=True)
    st = cache.stats()
    data = st.as_dict()
    if args.format == "json":
        emit_json({"cache_dir": str(cache.root), **data, "reset": args.reset})
    else:
        reasons = ", ".join(f"{k} {v}" for k, v in data["reasons"].items()) or "-"
        # The application's launches first; what `ctxcache warm` (or ContextCache.warm) did apart, so that
        # the warm-up's compiles do not read as launches that waited for one.
        # Each indented group adds up to the line above it (tested): app loads = hits + misses + pending +
        # fallbacks + bypasses; warm-up loads = compiled + hit + fell back + bypassed.
        rows: list[list[Any]] = [
            ["app loads", st.app_loads],
            ["  hits", st.app_hits],
            ["    fetched from a tier", ", ".join(f"{k} {v}" for k, v in data["tier_hits"].items()) or "-"],
            ["  misses (compiled)", st.app_misses],
            ["  pending (background)", st.pendings],
            ["  fallbacks", st.app_fallbacks],
            ["  bypasses", st.app_bypasses],
            ["warm-up loads", st.warm_loads],  # an intact entry costs a warm-up no load, so no count
            ["  compiled", st.warm_compiles],
            ["  hit", st.warm_hits],
            ["  fell back", st.warm_fallbacks],
            ["  bypassed", st.warm_bypasses],
            ["reasons (all loads)", reasons],
            ["compile time spent", seconds(st.compile_seconds)],
            ["compile time saved", seconds(st.saved_seconds)],
            ["since", human_time(st.since)],
        ]
        out(table(["", ""], rows).split("\n", 2)[2])
        out(f"({cache.root})")
    if args.reset:
        cache.reset_stats()
        if cache.stats().loads and cache.read_only():  # a load counted meanwhile is no failure; a refusal is
            err(f"counters NOT reset: the cache folder is read-only ({cache.root})")
            return EXIT_FAILED
        if args.format != "json":
            out("counters reset")
    return EXIT_OK


# -- doctor -----------------------------------------------------------------------------------------
def _doctor_data(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    cache = open_cache(args)
    source = "--cache-dir" if args.cache_dir else None
    configs, missing = _doctor_providers(args)
    d = ctxcache.diagnose(cache, [c.as_tuple() for c in configs], source=source)
    for k, cfg in zip(d.data["key_parts"], configs, strict=False):
        k["provider"] = cfg.label()
    problems = list(d.problems)
    if missing:
        problems.insert(0, missing)
        d.data["problems"] = problems
    return d.data, problems


def _doctor_providers(args: argparse.Namespace) -> tuple[list[Any], str | None]:
    """The configurations to show key parts for, and the problem when the default preset cannot run."""
    if args.providers:
        return list(args.providers), None
    try:
        return providers_or_default(None), None
    except UsageError as e:  # no onnxruntime-qnn: what `warm` and `explain` use without --provider cannot run
        return [], f"the default preset (qnn-htp, used when no --provider is given) cannot run: {e}"


def cmd_doctor(args: argparse.Namespace) -> int:
    data, problems = _doctor_data(args)
    if args.format == "json":
        emit_json(data)
        return EXIT_FAILED if problems else EXIT_OK
    out(f"python        {data['python']}")
    out("packages      " + ", ".join(f"{k} {v}" for k, v in data["packages"].items()))
    o = data["onnxruntime"]
    out(f"onnxruntime   {o['version']} at {o['path']}")
    out(f"              providers: {', '.join(o['available_providers'])}")
    q = data["onnxruntime_qnn"]
    a = data.get("architecture", {})
    out(f"architecture  Python {a.get('python')} on {a.get('native')}" + (" (EMULATED)" if a.get("emulated") else ""))
    out(f"onnxruntime-qnn {q['version']} (QNN SDK {q['qnn_sdk']}): {data['qnn']}" if q else
        "onnxruntime-qnn not installed (pip install 'ctxcache[qnn]')")
    devs = data["ep_devices"]
    if isinstance(devs, list):
        for d in devs:
            out(f"ep device     {d['ep']} on {d['type']} ({d['device_vendor'] or d['vendor']})")
    else:
        out(f"ep devices    {devs}")
    c = data["cache"]
    out(f"cache         {c['dir']} ({c['source']}; {'exists' if c['exists'] else 'not created yet'}, "
        f"{'writable' if c['writable'] else 'NOT writable'}, "
        f"{human_size(c['free_bytes']) if c['free_bytes'] is not None else '?'} free)")
    out(f"              {c['entries']} entries, {human_size(c['size'])}")
    counts = data.get("verdicts", {}).get("entries", {})
    if counts:
        out("device        verdicts on the entries here: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for k in data["key_parts"]:
        if k["parts"] is None:
            out(f"key here      {k['provider']}: unavailable ({k['unavailable']})")
            continue
        out(f"key here      {k['provider']}:")
        for label, value in k["parts"].items():
            out(f"                {label:<13} {_compact(value)}")
    trust = data["trust"]
    keys = ", ".join(k["key_id"] for k in trust["trusted_keys"]) or "none"
    out(f"trust         trusted keys: {keys}; revoked: {', '.join(trust['revoked_keys']) or 'none'}"
        + (f"; own folders: {', '.join(trust['trusted_dirs'])}" if trust["trusted_dirs"] else ""))
    for t in data["tiers"]:
        need = "signature required" if t["signature_required"] else "unsigned allowed"
        signed = f", index {_signed_text(t)}" if t["signature"] is not None else ""
        refused = f"; a load would refuse it: {t['refused']}" if t["refused"] else ""
        out(f"tier          {t['tier']} ({t['kind']}, match {t['match']}, {need}{signed}){refused}")
    for p in problems:
        out(f"problem       {p}")
    if not problems:
        out("no problems found")
    return EXIT_FAILED if problems else EXIT_OK


def _signed_text(t: Any) -> str:
    """``signed by ed25519 key 3f2a... (trusted)``, from a TierAnswer or its dict."""
    get = t.get if isinstance(t, dict) else lambda k: getattr(t, k)
    status, kid = get("signature"), get("signed_by")
    if kid:
        return f"signed by ed25519 key {kid} ({status})"
    return "HMAC only (not a trusted signature)" if status == "hmac" else "unsigned"


def _compact(value: Any) -> str:
    import json

    def canonical_json(v: Any) -> str:
        return json.dumps(v, sort_keys=True, separators=(",", ":"))

    if isinstance(value, dict):
        return ", ".join(f"{k} {_compact(v) if not isinstance(v, str) else (v[:12] if len(v) == 32 else v)}"
                         for k, v in value.items()) or "-"
    if isinstance(value, list):
        return f"{len(value)} device(s): " + "; ".join(
            " ".join(str(d.get(k)) for k in ("type", "vendor") if isinstance(d, dict)) for d in value
        ) if value else "none"
    text = value if isinstance(value, str) else canonical_json(value)
    return text
