"""``ctxcache tuf init | rotate | timestamp | remove | status``: the publisher's TUF key ceremony over a
remote store, and a device-side check. Private keys stay in ``--keys DIR`` (never on the command line);
``root.json`` in that folder is the public trust root to ship with the app."""

from __future__ import annotations

import argparse

import ctxcache

from ._common import EXIT_OK, CommandFailed, UsageError, add_command, emit_json, out


def _store(args: argparse.Namespace) -> ctxcache.RemoteTier:
    if "://" not in args.store:
        raise UsageError(f"--store is a URL (s3://bucket/prefix, file:///share/ctxcache, ...), not {args.store!r}")
    return ctxcache.RemoteTier(args.store, endpoint_url=args.endpoint_url, timeout=args.timeout,
                               tuf_root=getattr(args, "root", None))


def _thresholds(items: list[str] | None) -> dict[str, int]:
    out_: dict[str, int] = {}
    for item in items or ():
        role, _, n = item.partition("=")
        if role not in ("root", "targets", "snapshot", "timestamp") or not n.isdigit() or int(n) < 1:
            raise UsageError(f"--threshold is ROLE=N (root, targets, snapshot or timestamp; N >= 1), not {item!r}")
        out_[role] = int(n)
    return out_


def _done(args: argparse.Namespace, result: dict[str, object], text: str) -> int:
    if args.format == "json":
        emit_json(result)
    else:
        out(text)
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    tier = _store(args)
    expiry = {"timestamp": args.timestamp_expiry} if args.timestamp_expiry else None
    try:
        root = tier.tuf_init(args.keys, thresholds=_thresholds(args.threshold), expiry=expiry)
    except ctxcache.errors.TierError as e:
        raise CommandFailed(str(e)) from None
    return _done(args, {"root": str(root)}, f"TUF root v1 for {args.store}; keys in {args.keys}\n"
                 f"ship {root} with the app: RemoteTier(url, tuf_root=...)\n"
                 "keep the root-*.key files offline; push needs targets, snapshot and timestamp keys")


def cmd_rotate(args: argparse.Namespace) -> int:
    try:
        version = _store(args).tuf_rotate(args.keys, args.role, add=args.add, revoke=args.revoke or (),
                                          threshold=args.threshold)
    except (ctxcache.errors.TierError, ValueError) as e:
        raise CommandFailed(str(e)) from None
    return _done(args, {"root_version": version}, f"root v{version} published (signed by the old and the new root "
                 f"keys); devices follow it at their next refresh. Revoked key files were renamed *.revoked")


def cmd_timestamp(args: argparse.Namespace) -> int:
    try:
        version = _store(args).tuf_timestamp(args.keys)
    except ctxcache.errors.TierError as e:
        raise CommandFailed(str(e)) from None
    return _done(args, {"timestamp_version": version}, f"timestamp v{version}")


def cmd_remove(args: argparse.Namespace) -> int:
    try:
        version = _store(args).tuf_remove(args.keys, args.entry_key)
    except ctxcache.errors.TierError as e:
        raise CommandFailed(str(e)) from None
    return _done(args, {"targets_version": version}, f"targets v{version}: {len(args.entry_key)} entries no longer "
                 "listed; devices stop serving them after their next refresh")


def cmd_status(args: argparse.Namespace) -> int:
    tier = _store(args)
    if args.cache_dir:
        tier.attach(ctxcache.ContextCache(args.cache_dir).root)
    try:
        version = tier.tuf_refresh()
    except ctxcache.errors.TierError as e:
        raise CommandFailed(str(e)) from None
    return _done(args, {"targets_version": version}, f"{args.store}: TUF metadata verified, targets v{version}")


def _flags(p: argparse.ArgumentParser, *, keys: bool = True) -> None:
    p.add_argument("--store", required=True, metavar="URL", help="s3://bucket/prefix or any fsspec URL")
    if keys:
        p.add_argument("--keys", required=True, metavar="DIR", help="the publisher's TUF key folder")
    p.add_argument("--endpoint-url", metavar="URL", help="an S3-compatible server; also $AWS_ENDPOINT_URL")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="connect/read timeout in seconds")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tuf = subparsers.add_parser("tuf", help="TUF metadata over a remote store: keys, rotation, freshness (ctxcache[tuf])",
                                description="TUF metadata over a remote store (README, 'Update security (TUF)')")
    subs = tuf.add_subparsers(dest="tuf_command", metavar="COMMAND", required=True)
    p = add_command(subs, "init", "new TUF keys and root v1 for a store; prints the root.json to ship",
                    "ctxcache tuf init --store s3://builds/ctx --keys tuf-keys --threshold root=2", cmd_init, cache=False)
    _flags(p)
    p.add_argument("--threshold", action="append", metavar="ROLE=N", help="N keys and N signatures for ROLE (default 1)")
    p.add_argument("--timestamp-expiry", type=float, metavar="S", help="seconds a timestamp stays valid (default 86400)")
    p = add_command(subs, "rotate", "new keys for a role (and/or revoke some) in root version N+1",
                    "ctxcache tuf rotate --store s3://builds/ctx --keys tuf-keys --role targets --revoke 3f2a9c", cmd_rotate,
                    cache=False)
    _flags(p)
    p.add_argument("--role", required=True, choices=("root", "targets", "snapshot", "timestamp"))
    p.add_argument("--add", type=int, default=1, metavar="N", help="new keys for the role (default 1)")
    p.add_argument("--revoke", action="append", metavar="KEYID", help="a key id (prefix) to remove (repeatable)")
    p.add_argument("--threshold", type=int, metavar="N", help="signatures the role needs from now on")
    p = add_command(subs, "timestamp", "sign a fresh timestamp (run it more often than it expires, e.g. hourly)",
                    "ctxcache tuf timestamp --store s3://builds/ctx --keys tuf-keys", cmd_timestamp, cache=False)
    _flags(p)
    p = add_command(subs, "remove", "stop listing entries (revocation: devices stop serving them after a refresh)",
                    "ctxcache tuf remove --store s3://builds/ctx --keys tuf-keys 3f2a9c...", cmd_remove, cache=False)
    _flags(p)
    p.add_argument("entry_key", nargs="+", metavar="KEY", help="full entry keys")
    p = add_command(subs, "status", "verify the store's TUF metadata as a device would (and save it in the cache)",
                    "ctxcache tuf status --store s3://builds/ctx --root app/root.json", cmd_status, cache=False)
    _flags(p, keys=False)
    p.add_argument("--root", required=True, metavar="FILE", help="the root.json the app ships")
    p.add_argument("--cache-dir", metavar="DIR", help="keep the verified metadata in this cache")
