"""Moving entries between a cache and bundles, ORT model packages and remote stores.

The public doors (``ctxcache.export_bundle`` ...). Every door selects entries with
``_manage.select``, re-verifies each one fully before it leaves (``_servable.entry_problem``), and
brings entries in only through ``tiers._base.bring_in`` (lock, look again, verify, install).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
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

#: ``progress(phase, done, total)``: bytes of entries handled so far in a phase (``verify`` and ``write``
#: for an export, ``import`` for an import or a pull), for a command line to show; called often, keep it cheap.
Progress = Callable[[str, int, int], None]


class _Meter:
    """Bytes done in one phase, reported to ``progress`` (never more than ``total``)."""

    def __init__(self, progress: Progress | None, phase: str, total: int) -> None:
        self.progress, self.phase, self.total, self.done = progress, phase, max(0, total), 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.phase, min(self.done, self.total), self.total)

    def reach(self, n: int) -> None:
        """At least ``n`` done (an entry finished: its bytes count even if they were not all read here)."""
        if n > self.done:
            self.add(n - self.done)


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
    """What a push did: key -> ``pushed``, ``present`` (already there, signed by the signing keys if any),
    ``signed`` (already there; the signing keys' signatures were added), or ``failed: <why>``."""

    results: dict[str, str] = field(default_factory=dict)
    #: the Ed25519 key ids that signed what was pushed or signed (``hmac-sha256`` for an HMAC); empty: unsigned
    signed_by: tuple[str, ...] = ()

    @property
    def failed(self) -> dict[str, str]:
        return {k: v for k, v in self.results.items() if v not in ("pushed", "present", "signed")}


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


def _verified(cache: ContextCache, entries: Sequence[Entry],
              progress: Progress | None = None) -> tuple[list[Entry], dict[str, str]]:
    store = store_of(cache)
    good, skipped = [], {}
    meter = _Meter(progress, "verify", sum(e.size for e in entries))
    for entry in entries:
        problem = entry_problem(store, entry, None, digests="all")
        meter.add(entry.size)
        if problem is None:
            good.append(entry)
        else:
            skipped[entry.key] = str(problem)
            log.warning("not exporting %s: %s", entry.key[:12], problem.message)
    return good, skipped


def _destination(dest: str | os.PathLike[str], overwrite: bool | None) -> Path:
    """``overwrite=None``: the writer cannot replace (a model package): the message says so."""
    from .tiers.bundle import unsupported_archive

    out = Path(os.path.abspath(os.fspath(dest)))
    suffix = unsupported_archive(out)
    if suffix is not None:
        raise BundleError(f"{out}: ctxcache does not write {suffix} archives; name it .tar or .tar.gz for an archive, "
                          "or give a folder name", path=str(out), code="bad_destination")
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
                  signing_key: SigningKeyArg = None, overwrite: bool = False,
                  progress: Progress | None = None) -> ExportResult:
    """Write the selected entries of ``cache`` as a bundle folder, or an archive when ``dest`` ends in
    ``.tar``, ``.tar.gz`` or ``.tgz``. Each entry is fully re-verified first; the bundle appears by one rename.

    ``signing_key``: an Ed25519 private key (PEM text or bytes, or a ``pathlib.Path`` to the file
    ``ctxcache keygen`` wrote), an HMAC secret, or a list of keys (a rotation: old and new sign);
    default ``$CTXCACHE_SIGNING_KEY``. Raises :class:`~ctxcache.errors.BundleError` (nothing selected,
    destination exists, or an archive format other than .tar / .tar.gz), :class:`~ctxcache.errors.SigningKeyError`
    (a key that cannot be used). ``progress``: see :data:`Progress`."""
    from .tiers._base import resolve_signing_keys
    from .tiers.bundle import is_archive, write_bundle

    signers = resolve_signing_keys(signing_key)  # a bad key fails before anything is written
    out = _destination(dest, overwrite)
    good, skipped = _verified(cache, _selected(cache, models, provider, options, keys), progress)
    if not good:
        raise _nothing(cache, out, skipped)
    # Copying, then (an archive) archiving: each byte passes twice.
    meter = _Meter(progress, "write", sum(e.size for e in good) * (2 if is_archive(out) else 1))
    res = write_bundle(good, out, signing_keys=signers, version=__version__, skipped=skipped, overwrite=overwrite,
                       on_write=meter.add if progress is not None else None)
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


def _bring_in_all(cache: ContextCache, tier: Tier, keys: Sequence[str], *, force: bool,
                  meter: _Meter | None = None, sizes: Mapping[str, int] | None = None) -> ImportResult:
    from .tiers._base import bring_in

    store = store_of(cache)
    store.ensure()
    installed, present, refused = [], [], {}
    behind = 0
    for key in keys:
        if meter is not None:  # whatever happened to the previous entry, its bytes are behind us
            meter.reach(behind)
            behind += (sizes or {}).get(key, 0)
        if not is_key(key):
            refused[key] = "tier_record: not a key"
            continue
        try:
            done = bring_in(store, key, tier, force=force, lock_timeout=cache.lock_timeout,
                            stall_after=cache.config.stall_timeout, trust=cache.trust)
        except TierError as e:
            refused[key] = str(e)
            # INFO, not WARNING: the refusal is the caller's result (``refused``), which it reports itself;
            # a warning as well printed every refusal twice on the command line.
            log.info("refused %s from %s: %s", key[:12], tier.describe(), e)
            continue
        if done == "installed":
            installed.append(key)
        elif done == "present":
            present.append(key)
        else:
            refused[key] = "vanished from the tier"
    if meter is not None:
        meter.reach(behind)
    return ImportResult(tuple(installed), tuple(present), refused)


def _not_a_bundle(location: str | os.PathLike[str]) -> BundleError | None:
    """A path that cannot be a bundle, said as what it is (an ONNX model, a missing path) and what to do."""
    from .tiers.bundle import is_archive

    path = os.path.abspath(os.fspath(location))
    if not os.path.lexists(path):
        return BundleError(f"{path} does not exist; give a bundle folder, a .tar / .tar.gz bundle or an ORT model "
                           "package folder", path=path, code="tier_unreachable")
    if os.path.isfile(path) and not is_archive(path):
        if path.lower().endswith(".onnx"):
            return BundleError(f"{path} is an ONNX model, not a bundle; to cache it, load it or run "
                               f"`ctxcache warm {os.fspath(location)}`", path=path, code="not_a_bundle")
        return BundleError(f"{path} is not a bundle (a folder, or a .tar / .tar.gz archive made by `ctxcache export`)",
                           path=path, code="not_a_bundle")
    return None


def import_bundle(cache: ContextCache, location: str | os.PathLike[str], *, signing_key: SigningKeyArg = None,
                  force: bool = False, require_signature: bool | None = None,
                  progress: Progress | None = None) -> ImportResult:
    """Install every entry of a bundle or ORT model package into ``cache``, verified and admitted exactly
    as a tier hit is: with the cache's ``trusted_keys`` / ``trusted_dirs``, ``signing_key`` as the HMAC
    secret to require, and ``require_signature`` as for :class:`~ctxcache.Bundle` (``False``: the caller
    vouches for the bundle; an unsigned one is installed).

    Raises :class:`~ctxcache.errors.BundleError` when it is missing, not a bundle (an ONNX model: code
    ``not_a_bundle``), unreadable, unsafe or wrongly signed as a whole,
    :class:`~ctxcache.errors.LockTimeoutError` when another process keeps an entry's lock; a single bad
    entry is reported in ``refused`` and the others are installed. ``progress``: see :data:`Progress`.
    """
    from .tiers.bundle import Bundle
    from .tiers.package import ModelPackageTier, is_model_package

    wrong = _not_a_bundle(location)
    if wrong is not None:
        raise wrong
    tier: Bundle | ModelPackageTier = (
        ModelPackageTier(location, signing_key=signing_key, require_signature=require_signature)
        if is_model_package(location) else Bundle(location, signing_key=signing_key, require_signature=require_signature))
    if progress is not None and isinstance(tier, Bundle):  # listing a .tar.gz reads it whole: say so
        tier.on_scan = _scan_reporter(progress, tier.location)
    try:
        keys, sizes = _keys_and_sizes(tier)
        meter = _Meter(progress, "import", sum(sizes.values())) if progress is not None else None
        if meter is not None and isinstance(tier, Bundle):
            tier.on_read = meter.add
        return _bring_in_all(cache, tier, keys, force=force, meter=meter, sizes=sizes)
    except TierError as e:
        raise BundleError(f"cannot import {tier.location}: {e.message}", path=str(tier.location), code=e.code) from None


def _scan_reporter(progress: Progress | None, location: Path) -> Callable[[int], None] | None:
    """``read`` progress over an archive's bytes, each time it is listed (for a progress line; never a decision)."""
    try:
        total = os.path.getsize(location) if os.path.isfile(location) else 0
    except OSError:
        total = 0
    if progress is None or not total:
        return None
    return lambda pos: progress("read", min(pos, total), total)


def _keys_and_sizes(tier: Any) -> tuple[list[str], dict[str, int]]:
    """The tier's keys and, for a bundle, each key's recorded bytes (a progress total), from one opening."""
    from .tiers.bundle import Bundle

    if not isinstance(tier, Bundle):
        return tier.keys(), {}
    sizes = tier.sizes()
    return sorted(sizes), sizes


def push(cache: ContextCache, remote: RemoteTier, *, models: Sequence[str | os.PathLike[str]] | None = None,
         provider: str | None = None, options: Mapping[str, Any] | None = None, keys: Sequence[str] | None = None,
         overwrite: bool = False, signing_key: SigningKeyArg = None) -> PushResult:
    """Upload the selected entries (each fully re-verified first), their records signed with
    ``signing_key`` (as for :func:`export_bundle`; default: the remote's own ``signing_key``, else
    ``$CTXCACHE_SIGNING_KEY``): key -> ``pushed`` / ``present`` / ``signed`` / ``failed: <why>``.

    An entry the remote already has is signed in place (``signed``) when it lacks a signature by a
    signing key and its record is exactly the one this entry would upload: the keys vouch only for
    bytes verified here. A record that differs (another build) is left alone (``failed``; ``overwrite``
    replaces it)."""
    from .tiers._base import resolve_signing_keys
    from .tiers.bundle import signer_names

    signers = resolve_signing_keys(signing_key) if signing_key is not None else None
    effective = signers if signers is not None else remote.signing_keys()  # a bad key fails before any upload
    good, skipped = _verified(cache, _selected(cache, models, provider, options, keys))
    out = {k: f"failed: {why}" for k, why in skipped.items()}
    for entry in good:
        try:
            if remote.push(entry, overwrite=overwrite, signing_key=signers):
                out[entry.key] = "pushed"
                continue
            # Already there: make sure it carries this key's signature (an entry pushed before a key was
            # configured would otherwise stay unsigned, and refused by every device, for good).
            done = remote.sign_present(entry, signing_key=signers)
            out[entry.key] = ("failed: the remote entry differs from this one (another build of the key); "
                              "--overwrite replaces it with this one, signed") if done == "differs" else done
        except TierError as e:
            out[entry.key] = f"failed: {e}"
    return PushResult(out, signer_names(effective))


def pull(cache: ContextCache, remote: RemoteTier, keys: Sequence[str] | None = None, *, force: bool = False) -> ImportResult:
    """Install remote entries into ``cache`` (all, or those whose key starts with one of ``keys``),
    admitted by the cache's trust and the remote's ``require_signature``.
    Raises :class:`~ctxcache.errors.TierError` when the remote cannot be listed."""
    remote.attach(cache.root)  # a TUF remote keeps what it verified in this cache (rollback floor)
    wanted = remote.keys()
    if keys is not None:
        wanted = [k for k in wanted if any(k.startswith(p) for p in keys)]
    return _bring_in_all(cache, remote, wanted, force=force)
