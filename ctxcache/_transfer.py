"""Moving entries between a cache and bundles, ORT model packages and remote stores.

The public doors (``ctxcache.export_bundle`` ...). Every door selects entries with
``_manage.select``, re-verifies each one fully before it leaves (``_servable.entry_problem``), and
brings entries in only through ``tiers._base.bring_in`` (lock, look again, verify, install).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cache import ContextCache, store_of
from ._manifest import Entry, is_key
from ._servable import entry_problem
from ._store import BrokenEntry
from ._trust import SigningKeyArg
from ._version import __version__
from .errors import BundleError, TierError

if TYPE_CHECKING:
    from .tiers._base import Tier
    from .tiers.bundle import ExportResult
    from .tiers.package import PackageExport
    from .tiers.remote import RemoteTier

log = logging.getLogger("ctxcache")


@dataclass(frozen=True)
class ImportResult:
    """What an import or a pull did: keys installed, already present, and refused (with why)."""

    installed: tuple[str, ...] = ()
    present: tuple[str, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def skipped(self) -> tuple[str, ...]:  # the 0.1 name of ``present``
        return self.present

    def as_dict(self) -> dict[str, Any]:
        return {"installed": list(self.installed), "present": list(self.present), "refused": dict(self.refused)}


@dataclass(frozen=True)
class PushResult:
    """What a push did: key -> ``pushed`` / ``present`` / ``failed: <why>``."""

    results: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> dict[str, str]:
        return {k: v for k, v in self.results.items() if v not in ("pushed", "present")}


def _selected(cache: ContextCache, models: Sequence[str | os.PathLike[str]] | None, provider: str | None,
              options: Mapping[str, Any] | None, keys: Sequence[str] | None) -> list[Entry]:
    store = store_of(cache)
    infos = cache.select(models=models, provider=provider, options=options, keys=keys)
    found = []
    for info in infos:
        try:
            entry = store.lookup(info.key)
        except BrokenEntry:  # damaged since it was listed: nothing to move
            continue
        if entry is not None:
            found.append(entry)
    return found


def _verified(cache: ContextCache, entries: Sequence[Entry]) -> tuple[list[Entry], dict[str, str]]:
    store = store_of(cache)
    good, skipped = [], {}
    for entry in entries:
        problem = entry_problem(store, entry, None, digests="all")
        if problem is None:
            good.append(entry)
        else:
            skipped[entry.key] = str(problem)
            log.warning("not exporting %s: %s", entry.key[:12], problem.message)
    return good, skipped


def _destination(dest: str | os.PathLike[str], overwrite: bool | None) -> Path:
    """``overwrite=None``: the writer cannot replace (a model package): the message says so."""
    out = Path(os.path.abspath(os.fspath(dest)))
    if os.path.lexists(out) and not overwrite:
        how = "replace it (overwrite=True)" if overwrite is not None else "remove it first"
        raise BundleError(f"{out} already exists; choose another path, or {how}.", path=str(out), code="exists")
    return out


def _nothing(cache: ContextCache, out: Path, skipped: dict[str, str]) -> BundleError:
    if skipped:
        return BundleError(f"every selected entry failed verification: {skipped}", path=str(out), code="nothing_selected")
    return BundleError(f"no entry of {cache.root} matches the selection; load the model with those providers first "
                       "(or list entries with `ctxcache ls`).", path=str(out), code="nothing_selected")


def export_bundle(cache: ContextCache, dest: str | os.PathLike[str], *,
                  models: Sequence[str | os.PathLike[str]] | None = None, provider: str | None = None,
                  options: dict[str, Any] | None = None, keys: Sequence[str] | None = None,
                  signing_key: SigningKeyArg = None, overwrite: bool = False) -> ExportResult:
    """Write the selected entries of ``cache`` as a bundle folder, or an archive when ``dest`` ends in
    ``.tar``, ``.tar.gz`` or ``.tgz``. Each entry is fully re-verified first; the bundle appears by one rename.

    ``signing_key``: an Ed25519 private key (PEM text or bytes, or a ``pathlib.Path`` to the file
    ``ctxcache keygen`` wrote), an HMAC secret, or a list of keys (a rotation: old and new sign);
    default ``$CTXCACHE_SIGNING_KEY``. Raises :class:`~ctxcache.errors.BundleError` (nothing selected,
    destination exists), :class:`~ctxcache.errors.SigningKeyError` (a key that cannot be used)."""
    from .tiers._base import resolve_signing_keys
    from .tiers.bundle import write_bundle

    signers = resolve_signing_keys(signing_key)  # a bad key fails before anything is written
    out = _destination(dest, overwrite)
    good, skipped = _verified(cache, _selected(cache, models, provider, options, keys))
    if not good:
        raise _nothing(cache, out, skipped)
    res = write_bundle(good, out, signing_keys=signers, version=__version__, skipped=skipped, overwrite=overwrite)
    if not res.keys:
        raise _nothing(cache, out, res.skipped)
    log.info("exported %d entries to %s%s", len(res.keys), out, " (signed)" if res.signed else "")
    return res


def export_model_package(cache: ContextCache, dest: str | os.PathLike[str], *,
                         models: Sequence[str | os.PathLike[str]] | None = None, provider: str | None = None,
                         options: dict[str, Any] | None = None, keys: Sequence[str] | None = None,
                         signing_key: SigningKeyArg = None, package_name: str | None = None,
                         compatibility: bool = True) -> PackageExport:
    """Write the selected entries as an ORT model package folder (ORT >= 1.32; appears by one rename),
    each variant's record signed as :func:`export_bundle` signs an index.

    ``compatibility=False`` leaves out the variants' compatibility strings (ORT 1.32's variant selection
    crashes validating them with the QNN plugin on x86; keep them for devices)."""
    from .tiers._base import resolve_signing_keys
    from .tiers.package import write_package

    signers = resolve_signing_keys(signing_key)
    out = _destination(dest, None)
    good, skipped = _verified(cache, _selected(cache, models, provider, options, keys))
    if not good:
        raise _nothing(cache, out, skipped)
    res = write_package(good, out, signing_keys=signers, version=__version__, skipped=skipped,
                        package_name=package_name, compatibility=compatibility)
    if not res.variants:
        raise _nothing(cache, out, res.skipped)
    return res


def _bring_in_all(cache: ContextCache, tier: Tier, keys: Sequence[str], *, force: bool) -> ImportResult:
    from .tiers._base import bring_in

    store = store_of(cache)
    store.ensure()
    installed, present, refused = [], [], {}
    for key in keys:
        if not is_key(key):
            refused[key] = "tier_record: not a key"
            continue
        try:
            done = bring_in(store, key, tier, force=force, lock_timeout=cache.lock_timeout,
                            stall_after=cache.config.stall_timeout, trust=cache.trust)
        except TierError as e:
            refused[key] = str(e)
            log.warning("refused %s from %s: %s", key[:12], tier.describe(), e)
            continue
        if done == "installed":
            installed.append(key)
        elif done == "present":
            present.append(key)
        else:
            refused[key] = "vanished from the tier"
    return ImportResult(tuple(installed), tuple(present), refused)


def import_bundle(cache: ContextCache, location: str | os.PathLike[str], *, signing_key: SigningKeyArg = None,
                  force: bool = False, require_signature: bool | None = None) -> ImportResult:
    """Install every entry of a bundle or ORT model package into ``cache``, verified and admitted exactly
    as a tier hit is: with the cache's ``trusted_keys`` / ``trusted_dirs``, ``signing_key`` as the HMAC
    secret to require, and ``require_signature`` as for :class:`~ctxcache.Bundle` (``False``: the caller
    vouches for the bundle; an unsigned one is installed).

    Raises :class:`~ctxcache.errors.BundleError` when it is unreadable, unsafe or wrongly signed as a
    whole, :class:`~ctxcache.errors.LockTimeoutError` when another process keeps an entry's lock; a
    single bad entry is reported in ``refused`` and the others are installed.
    """
    from .tiers.bundle import Bundle
    from .tiers.package import ModelPackageTier, is_model_package

    tier: Bundle | ModelPackageTier = (
        ModelPackageTier(location, signing_key=signing_key, require_signature=require_signature)
        if is_model_package(location) else Bundle(location, signing_key=signing_key, require_signature=require_signature))
    try:
        keys = tier.keys()
        return _bring_in_all(cache, tier, keys, force=force)
    except TierError as e:
        raise BundleError(f"cannot import {tier.location}: {e.message}", path=str(tier.location), code=e.code) from None


def push(cache: ContextCache, remote: RemoteTier, *, models: Sequence[str | os.PathLike[str]] | None = None,
         provider: str | None = None, options: Mapping[str, Any] | None = None, keys: Sequence[str] | None = None,
         overwrite: bool = False, signing_key: SigningKeyArg = None) -> PushResult:
    """Upload the selected entries (each fully re-verified first), their records signed with
    ``signing_key`` (as for :func:`export_bundle`; default: the remote's own ``signing_key``, else
    ``$CTXCACHE_SIGNING_KEY``): key -> ``pushed`` / ``present`` / ``failed: <why>``."""
    from .tiers._base import resolve_signing_keys

    signers = resolve_signing_keys(signing_key) if signing_key is not None else None
    good, skipped = _verified(cache, _selected(cache, models, provider, options, keys))
    out = {k: f"failed: {why}" for k, why in skipped.items()}
    for entry in good:
        try:
            out[entry.key] = "pushed" if remote.push(entry, overwrite=overwrite, signing_key=signers) else "present"
        except TierError as e:
            out[entry.key] = f"failed: {e}"
    return PushResult(out)


def pull(cache: ContextCache, remote: RemoteTier, keys: Sequence[str] | None = None, *, force: bool = False) -> ImportResult:
    """Install remote entries into ``cache`` (all, or those whose key starts with one of ``keys``),
    admitted by the cache's trust and the remote's ``require_signature``.
    Raises :class:`~ctxcache.errors.TierError` when the remote cannot be listed."""
    remote.attach(cache.root)  # a TUF remote keeps what it verified in this cache (rollback floor)
    wanted = remote.keys()
    if keys is not None:
        wanted = [k for k in wanted if any(k.startswith(p) for p in keys)]
    return _bring_in_all(cache, remote, wanted, force=force)
