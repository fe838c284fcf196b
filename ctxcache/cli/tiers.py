"""``ctxcache keygen | export | import | push | pull``: make a signing key, move entries between caches,
bundles, ORT model packages and a remote (S3-compatible) store. Every entry that comes in is verified
and admitted exactly as a tier hit is.

Signing keys are never taken on the command line (they would show in ``ps`` and shell history): they
come from ``$CTXCACHE_SIGNING_KEY`` or ``--signing-key-file``. Public keys are not secret: devices'
trust comes from ``--trusted-key`` or ``$CTXCACHE_TRUSTED_KEYS``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import ctxcache

from ._common import (
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    ProviderConfig,
    UsageError,
    add_command,
    add_key_flags,
    add_provider_flags,
    add_trust_flags,
    emit_json,
    open_cache,
    out,
    table,
)


# -- shared helpers ---------------------------------------------------------------------------------
def _signing_key(args: argparse.Namespace) -> list[Path] | None:
    """Each ``--signing-key-file``, as a path: the library reads it, tells an Ed25519 private key (PEM)
    from an HMAC secret, and names the file in any error. ``None`` lets it read ``$CTXCACHE_SIGNING_KEY``."""
    paths = getattr(args, "signing_key_file", None)
    return [Path(os.path.expanduser(p)) for p in paths] if paths else None


def _cache(args: argparse.Namespace) -> ctxcache.ContextCache:
    return open_cache(args, extra_key=getattr(args, "extra_key", None), embed=getattr(args, "embed", False))


def _filters(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One selection per ``--provider``/``--preset`` (their union is exported), options as the key has them.

    Options go through the provider's own normalisation (QNN's backend_path becomes backend_type), so
    ``--preset qnn-htp`` selects what a load with that preset would have cached.
    """
    configs: list[ProviderConfig] = getattr(args, "providers", None) or []
    if not configs:
        return [{"provider": None, "options": None}]
    out_: list[dict[str, Any]] = []
    for cfg in configs:
        try:
            (check,) = ctxcache.check_providers([cfg.as_tuple()])
            name, opts = check.name, dict(check.binary_options)
        except ctxcache.errors.ProviderOptionError:  # a partial filter (just soc_model) need not be a valid config
            (check,) = ctxcache.check_providers([cfg.name])
            name, opts = check.name, {k: str(v) for k, v in cfg.options.items() if not k.endswith("_path")}
        out_.append({"provider": name, "options": opts or None})
    return out_


def _select(cache: ctxcache.ContextCache, args: argparse.Namespace) -> list[ctxcache.EntryInfo]:
    seen: dict[str, ctxcache.EntryInfo] = {}
    for f in _filters(args):
        for e in cache.select(models=args.model or None, provider=f["provider"], options=f["options"],
                              keys=args.key or None):
            seen[e.key] = e
    return [seen[k] for k in sorted(seen)]


def _add_selection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection", "which entries (all filters given must match; default: every entry)")
    g.add_argument("-m", "--model", action="append", metavar="MODEL", help="entries of this model file (by content; repeatable)")
    g.add_argument("-k", "--key", action="append", metavar="PREFIX", help="entries whose key starts with PREFIX (repeatable)")
    add_provider_flags(p, what="entries compiled for this provider and these binary options; several --provider/--preset "
                               "flags select the union (e.g. soc_model 60 and 69)")


def _add_signing_flag(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--signing-key-file", metavar="FILE", action="append",
                   help=f"{verb}: an Ed25519 private key (`ctxcache keygen`) or an HMAC secret; repeatable (a rotation: "
                        "old and new key sign); default $CTXCACHE_SIGNING_KEY; never pass a key on the command line")


def _add_checking_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--signing-key-file", metavar="FILE", action="append",
                   help="an HMAC secret the entries must carry a valid HMAC of (default: $CTXCACHE_SIGNING_KEY); "
                        "an HMAC is integrity between machines that share the secret, not trust")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="install entries without a trusted signature (you vouch for where they come from); "
                        "a bad or revoked signature is still refused")
    add_trust_flags(p)


def _remote(args: argparse.Namespace) -> ctxcache.RemoteTier:
    if "://" not in args.url:
        raise UsageError(f"a remote is a URL (s3://bucket/prefix, file:///share/ctxcache, ...), not {args.url!r}")
    try:
        return ctxcache.RemoteTier(args.url, endpoint_url=args.endpoint_url, signing_key=_signing_key(args),
                                   timeout=args.timeout, require_signature=not getattr(args, "allow_unsigned", False),
                                   tuf_root=getattr(args, "tuf_root", None), tuf_keys=getattr(args, "tuf_keys", None))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _add_remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="s3://bucket/prefix, or any fsspec URL (file:///mnt/share/ctxcache, gcs://...)")
    p.add_argument("--endpoint-url", metavar="URL", help="an S3-compatible server (MinIO, Ceph...); also $AWS_ENDPOINT_URL")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="connect/read timeout in seconds (default 10)")
    p.add_argument("--tuf-root", metavar="FILE", help="pull: read records only through TUF, trusting this root.json")
    p.add_argument("--tuf-keys", metavar="DIR", help="push: also publish TUF metadata with the keys in DIR (ctxcache tuf init)")


# -- commands ---------------------------------------------------------------------------------------
def cmd_keygen(args: argparse.Namespace) -> int:
    if os.path.lexists(args.file) and not args.force:  # the library's message names overwrite=True, not the flag
        raise UsageError(f"{os.path.abspath(args.file)} already exists; keep it, or replace it with --force: the old "
                         "key's signatures stay valid only where its public key stays trusted")
    try:
        key = ctxcache.generate_signing_key(args.file, overwrite=args.force)
    except ctxcache.errors.SigningKeyError as e:
        raise UsageError(str(e).replace("overwrite=True", "--force")) from None
    if args.format == "json":
        emit_json({"private_key_file": str(key.path), "public_key": key.public_key, "key_id": key.key_id})
        return EXIT_OK
    out(f"private key  {key.path} (owner-only: keep it on the build machine, never ship it)")
    out(f"public key   {key.public_key}")
    out(f"key id       {key.key_id}")
    out("\nsign:   ctxcache export BUNDLE --signing-key-file " + str(key.path))
    out(f"trust:  ContextCache(trusted_keys=[\"{key.public_key}\"]) or CTXCACHE_TRUSTED_KEYS={key.public_key}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    cache = _cache(args)
    entries = _select(cache, args)
    if not entries:
        raise CommandFailed(f"no entry of {cache.root} matches the selection (see `ctxcache ls`)")
    keys = [e.key for e in entries]
    try:
        if args.package:
            res = ctxcache.export_model_package(cache, args.dest, keys=keys, signing_key=_signing_key(args),
                                                compatibility=not args.no_compatibility)
            exported, skipped, signed, signed_by = list(res.variants), res.skipped, res.signed, res.signed_by
        else:
            b = ctxcache.export_bundle(cache, args.dest, keys=keys, signing_key=_signing_key(args), overwrite=args.overwrite)
            exported, skipped, signed, signed_by = list(b.keys), b.skipped, b.signed, b.signed_by
    except ctxcache.errors.BundleError as e:
        if e.code == "exists":  # bad input, as everywhere (exit 2), phrased as the flag
            how = "remove it first (--overwrite does not apply to --package)" if args.package else "replace it (--overwrite)"
            raise UsageError(f"{e.path} already exists; choose another path, or {how}") from None
        raise CommandFailed(str(e)) from None
    by_key = {e.key: e for e in entries}
    if args.format == "json":
        emit_json({"path": os.path.abspath(args.dest), "format": "model-package" if args.package else "bundle",
                   "signed": signed, "signed_by": list(signed_by), "exported": exported, "skipped": skipped})
    else:
        rows = [(k[:12], by_key[k].model_name, _opts(by_key[k])) for k in exported]
        out(table(["key", "model", "options"], rows))
        out(f"\nexported {len(exported)} entr{'y' if len(exported) == 1 else 'ies'} to {os.path.abspath(args.dest)}"
            f"{' (signed by ' + ', '.join(signed_by) + ')' if signed else ' (unsigned)'}")
        for k, why in skipped.items():
            out(f"skipped {k[:12]}: {why}")
    return EXIT_FAILED if skipped else EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    cache = _cache(args)
    try:
        res = ctxcache.import_bundle(cache, args.bundle, signing_key=_signing_key(args), force=args.force,
                                     require_signature=False if args.allow_unsigned else None)
    except ctxcache.errors.BundleError as e:
        raise CommandFailed(str(e)) from None
    if args.format == "json":
        emit_json(res.as_dict())
    else:
        rows = [(k[:12], "installed") for k in res.installed] + [(k[:12], "already present") for k in res.present]
        rows += [(k[:12], f"REFUSED {why}") for k, why in res.refused.items()]
        out(table(["key", "result"], rows))
        out(f"\n{len(res.installed)} installed, {len(res.present)} already present, {len(res.refused)} refused")
    return EXIT_FAILED if res.refused else EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    cache = _cache(args)
    remote = _remote(args)
    entries = _select(cache, args)
    if not entries:
        raise CommandFailed(f"no entry of {cache.root} matches the selection (see `ctxcache ls`)")
    try:
        res = ctxcache.push(cache, remote, keys=[e.key for e in entries], overwrite=args.overwrite,
                            signing_key=_signing_key(args))
    except ctxcache.errors.TierError as e:
        raise CommandFailed(str(e)) from None
    return _report(args, res.results, "pushed")


def cmd_pull(args: argparse.Namespace) -> int:
    cache = _cache(args)
    remote = _remote(args)
    try:
        res = ctxcache.pull(cache, remote, args.key or None, force=args.force)
    except ctxcache.errors.TierError as e:
        raise CommandFailed(f"cannot list {args.url}: {e}") from None
    results = dict.fromkeys(res.installed, "installed")
    results.update(dict.fromkeys(res.present, "present"))
    results.update({k: f"refused: {why}" for k, why in res.refused.items()})
    return _report(args, results, "installed")


def _report(args: argparse.Namespace, results: dict[str, str], ok: str) -> int:
    if args.format == "json":
        emit_json(results)
    else:
        out(table(["key", "result"], [(k[:12], v) for k, v in results.items()]))
        done = sum(1 for v in results.values() if v == ok)
        out(f"\n{done} {ok}, {sum(1 for v in results.values() if v == 'present')} already present, "
            f"{sum(1 for v in results.values() if v not in (ok, 'present'))} failed")
    return EXIT_FAILED if any(v not in (ok, "present") for v in results.values()) else EXIT_OK


def _opts(entry: Any) -> str:
    opts = entry.parts.get("ep_options")
    ep = str(entry.parts.get("ep", "?")).removesuffix("ExecutionProvider")
    return " ".join([ep, *(f"{k}={v}" for k, v in sorted(opts.items()))]) if isinstance(opts, dict) else ep


# -- registration ------------------------------------------------------------------------------------
def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register keygen / export / import / push / pull on the ``ctxcache`` parser."""
    p = add_command(subparsers, "keygen", "make an Ed25519 signing key for bundles and remote entries; prints its public key",
             """
             ctxcache keygen build/ctx-signing.pem
             ctxcache export app/ctx-bundle.tar --signing-key-file build/ctx-signing.pem
             # devices: ContextCache(trusted_keys=["ed25519:..."]) or CTXCACHE_TRUSTED_KEYS=ed25519:...
             """, cmd_keygen, cache=False)
    p.add_argument("file", metavar="FILE", help="where to write the private key (PEM, owner-only)")
    p.add_argument("--force", action="store_true", help="replace an existing key file (its signatures stay valid "
                                                        "only where its public key stays trusted)")

    p = add_command(subparsers, "export",
                    "write cached entries to a bundle folder, a .tar / .tar.gz archive, or an ORT model package",
             """
             ctxcache export app/ctx-bundle.tar --model app/models/net.onnx --preset qnn-htp
             ctxcache export bundle/ -p qnn -o soc_model=60 -p qnn -o soc_model=69 --signing-key-file key.pem
             ctxcache export pkg/ --package --model net.onnx
             """, cmd_export)
    p.add_argument("dest", metavar="DEST", help="a new folder, or DEST.tar / DEST.tar.gz for an archive")
    p.add_argument("--package", action="store_true",
                   help="write an onnxruntime.ModelPackage folder (ORT >= 1.32) instead of a bundle")
    p.add_argument("--no-compatibility", action="store_true",
                   help="with --package: leave out compatibility strings (ORT 1.32 + QNN on x86 crashes validating them)")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    _add_selection_flags(p)
    _add_signing_flag(p, "sign the index (or each package record)")
    add_key_flags(p)

    p = add_command(subparsers, "import", "install a bundle (folder or archive) or an ORT model package into the cache, verified",
             "ctxcache import /opt/myapp/ctx-bundle.tar --cache-dir ~/.local/share/myapp/ctxcache", cmd_import)
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder, .tar / .tar.gz archive, or model package folder")
    p.add_argument("--force", action="store_true", help="replace entries already in the cache")
    _add_checking_flags(p)
    add_key_flags(p)

    p = add_command(subparsers, "push", "upload cached entries to an S3-compatible store (needs ctxcache[remote])",
             "ctxcache push s3://builds/ctxcache --model net.onnx --endpoint-url http://minio:9000", cmd_push)
    _add_remote_flags(p)
    p.add_argument("--overwrite", action="store_true", help="upload even if the remote already has the entry")
    _add_selection_flags(p)
    _add_signing_flag(p, "sign records")
    add_key_flags(p)

    p = add_command(subparsers, "pull",
                    "install entries from an S3-compatible store into the cache, verified (needs ctxcache[remote])",
             "ctxcache pull s3://builds/ctxcache --key 3f2a9c", cmd_pull)
    _add_remote_flags(p)
    p.add_argument("-k", "--key", action="append", metavar="PREFIX", help="only keys starting with PREFIX (repeatable)")
    p.add_argument("--force", action="store_true", help="replace entries already in the cache")
    _add_checking_flags(p)
