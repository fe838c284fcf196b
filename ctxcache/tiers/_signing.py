"""Who signed what a tier offers, as this device sees it, and the one admission rule (:func:`admit`),
asked again at every hit of an entry a tier brought in (:func:`still_admitted`)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .._trust import (
    SigningKey,
    SigningKeyArg,
    Trust,
    ed25519_keys,
    ed25519_sign,
    ed25519_verify,
    signing_keys,
)
from ..errors import TierError

SignerStatus = Literal["trusted", "invalid", "revoked", "untrusted", "hmac", "unsigned"]


@dataclass(frozen=True)
class Signer:
    """Who signed what a tier offers, as this device sees it.

    ``trusted``: a valid Ed25519 signature by a trusted key (``key_id``). ``invalid``: a signature that
    names a trusted key does not verify (tampered). ``revoked``: signed only by a revoked key.
    ``untrusted``: signed only by keys this device does not know. ``hmac``: no Ed25519 signature, but a
    valid HMAC with the configured secret. ``unsigned``: neither.
    """

    status: SignerStatus = "unsigned"
    key_id: str | None = None
    hmac: bool = False

    @property
    def trusted(self) -> bool:
        return self.status == "trusted"

    def describe(self) -> str:
        if self.key_id is not None:
            return f"ed25519 key {self.key_id} ({self.status})" + (" + hmac" if self.hmac else "")
        return "hmac only" if self.status == "hmac" else "unsigned"


UNSIGNED = Signer()


# -- signing ----------------------------------------------------------------------------------------------
def resolve_signing_keys(key: SigningKeyArg) -> tuple[SigningKey, ...]:
    """Argument, else ``$CTXCACHE_SIGNING_KEY`` (read now, never at import), else none."""
    return signing_keys(key)


def sign(data: bytes, key: bytes) -> bytes:
    """An HMAC signature file's content: ``hmac-sha256:<hex>``."""
    return b"hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest().encode()


def _message(context: str, data: bytes) -> bytes:
    # Domain separation: a signature over a bundle index is never a valid signature over a remote record.
    return b"ctxcache-signature-v1\0" + context.encode("ascii") + b"\0" + data


def sign_ed25519(data: bytes, keys: Iterable[SigningKey], context: str) -> bytes:
    """The Ed25519 signature lines (one per key; several during a key rotation) over ``data``."""
    lines = [f"ed25519:{k.key_id}:{base64.b64encode(ed25519_sign(k, _message(context, data))).decode()}"
             for k in ed25519_keys(keys)]
    return "\n".join(lines).encode() + (b"\n" if lines else b"")


def check_signature(data: bytes, signature: bytes | None, key: bytes | None, what: str) -> None:
    """Refuse ``data`` when an HMAC secret is configured and its signature is missing or wrong.

    Without a secret the HMAC is not checked: a bundle signed for one fleet stays usable by an app that
    does not configure the secret. (An HMAC never makes an entry *trusted*; see :func:`read_signer`.)
    """
    if key is None:
        return
    if signature is None:
        raise TierError(f"{what} is not signed, but a signing key is configured", code="tier_signature")
    if not hmac.compare_digest(signature.strip(), sign(data, key)):
        raise TierError(f"{what}: signature does not match (tampered, or signed with another key)", code="tier_signature")


_MAX_SIGNATURES = 16


def read_signer(data: bytes, blob: bytes | None, context: str, trust: Trust, *, hmac_checked: bool = False,
                own: Iterable[SigningKey] = ()) -> Signer:
    """Who signed ``data``, from its Ed25519 signature lines, as ``trust`` (plus the tier's own signing
    keys, ``own``) sees it. Never raises: whether that is good enough is :func:`admit`'s decision.

    One valid line from a trusted key is enough (during a rotation both keys sign). Unknown lines are
    ignored (a newer ctxcache may add schemes); without ``cryptography`` a line from a trusted key
    cannot be checked, which :func:`admit` reports as such.
    """
    trust = trust.with_signers(own)
    found: dict[SignerStatus, str] = {}
    for line in (blob or b"").decode("ascii", "replace").splitlines()[:_MAX_SIGNATURES]:
        scheme, _, rest = line.strip().partition(":")
        kid, _, b64 = rest.partition(":")
        if scheme != "ed25519" or not kid:
            continue
        kid = kid.lower()
        public = trust.public_key(kid)
        if public is None:
            found.setdefault("revoked" if trust.is_revoked(kid) else "untrusted", kid)
            continue
        try:
            sig = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        if ed25519_verify(public, sig, _message(context, data)):
            return Signer("trusted", kid, hmac_checked)
        found.setdefault("invalid", kid)
    worst: tuple[SignerStatus, ...] = ("invalid", "revoked", "untrusted")
    for status in worst:
        if status in found:
            return Signer(status, found[status], hmac_checked)
    return Signer("hmac" if hmac_checked else "unsigned", None, hmac_checked)


def read_signer_or_refuse(data: bytes, blob: bytes | None, context: str, trust: Trust, what: str, *,
                          hmac_checked: bool = False, own: Iterable[SigningKey] = ()) -> Signer:
    """:func:`read_signer`, with a missing ``cryptography`` turned into a refusal that says what to install."""
    try:
        return read_signer(data, blob, context, trust, hmac_checked=hmac_checked, own=own)
    except ImportError as e:
        raise TierError(f"{what}: cannot check its Ed25519 signature: {e}", code="tier_untrusted") from None


def admit(signer: Signer, required: bool, what: str, trust: Trust | None = None) -> None:
    """Refuse an offer whose signer is not good enough. A signature that fails, or a revoked key, is
    refused everywhere (a forgery is worse than no signature); unsigned, HMAC-only or unknown-key
    entries only where a signature is required."""
    if signer.status == "trusted":
        return
    if signer.status == "invalid":
        raise TierError(f"{what}: the signature by trusted key {signer.key_id} does not match (tampered after signing)",
                        code="tier_signature")
    if signer.status == "revoked":
        raise TierError(f"{what}: signed by revoked key {signer.key_id}", code="tier_untrusted")
    if not required:
        return
    note = f" ({trust.problem})" if trust is not None and trust.problem else ""
    if trust is not None and trust.refused and not trust.problem:
        note = f" (not trusted: {'; '.join(trust.refused)})"  # an anchor others can write was left out
    if signer.status == "untrusted":
        why = f"signed by key {signer.key_id}, which is not a trusted key (trusted_keys= / $CTXCACHE_TRUSTED_KEYS){note}"
    elif signer.status == "hmac":
        why = ("only an HMAC: a shared secret proves integrity between machines that share it, not who built the "
               f"entry; sign with an Ed25519 key (ctxcache keygen) and trust its public key{note}")
    else:
        why = ("not signed; sign it with an Ed25519 key (ctxcache keygen; export/push --signing-key-file) and trust its "
               f"public key, or, for the app's own bundle, name its folder in trusted_dirs={note}")
    raise TierError(f"{what}: {why}", code="tier_untrusted")


def still_admitted(origin: dict[str, Any], trust: Trust) -> str | None:
    """Why an entry a tier put into this cache would not be admitted today (``None``: it would be), from what
    its install recorded: the :func:`admit` rule again, with the signer's status as the device's trust says
    it now. Revoking or removing a leaked key must reach entries it already brought in, not only new
    imports: a revoked key's entries are refused everywhere; a key no longer among the device's trusted
    keys (or a bundle folder no longer among its ``trusted_dirs``) is refused where the device names any.
    Cheap: no file is read."""
    kid = origin.get("signed_by")
    recorded = origin.get("signature")
    admitted = origin.get("admitted")
    if isinstance(kid, str) and kid:
        # A device that names no trusted key at all has no policy to ask again (the entry was admitted by
        # whoever imported it, with theirs); a revoked key is refused everywhere, policy or not.
        names_keys = bool(trust.keys) or trust.problem is not None or any(r.startswith("trusted_keys") for r in trust.refused)
        status: SignerStatus = ("revoked" if trust.is_revoked(kid) else
                                "trusted" if trust.public_key(kid) is not None or not names_keys else "untrusted")
    else:
        status = "unsigned" if recorded not in ("hmac",) else "hmac"
    location = str(origin.get("location", ""))
    if admitted == "trusted_dir":
        # The app names its folders (some may have been refused as unsafe): this one must still be among them.
        names_dirs = bool(trust.dirs) or any(r.startswith("trusted_dirs") for r in trust.refused)
        required = names_dirs and not trust.covers(location)
    elif admitted == "not_required":
        required = False  # the tier itself said so (require_signature=False), at the app's request
    else:
        required = recorded == "trusted" or admitted == "signature"
    try:
        admit(Signer(status, kid if isinstance(kid, str) else None), required, f"{location}:{origin.get('tier', '?')}",
              trust)
    except TierError as e:
        return f"{e}; it was admitted by {admitted or recorded}, and would not be now"
    return None
