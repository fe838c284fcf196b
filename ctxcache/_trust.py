"""Keys and trust: who may sign what a device runs, and which signers a device believes.

A context binary is code for the NPU and input to a native parser, so an entry that comes from a bundle,
a model package or a shared store is trusted code. An HMAC cannot say who made it: whoever can check
one can make one, and the secret has to ship inside every app. Ed25519 splits the two: the build host
keeps a private key (``ctxcache keygen``), devices carry only public keys (``trusted_keys=`` /
``$CTXCACHE_TRUSTED_KEYS``), which can check a signature but never make one.

This module holds the key formats, the device's :class:`Trust` policy (built once by the facade and
passed down explicitly to the install path) and the two Ed25519 primitives. The ``cryptography``
package (``ctxcache[sign]``) is imported only inside those primitives and when a private key is read or
made: ``import ctxcache`` and a local hit never load it. Public keys are parsed here without it (their
encoding is fixed), so a malformed trusted key is refused when the cache is configured.

Formats:

- public key: ``ed25519:<base64 of the 32 raw bytes>`` (what ``keygen`` prints), or a PEM
  ``-----BEGIN PUBLIC KEY-----`` block (``openssl pkey -pubout``);
- key id: the first 16 hex digits of SHA-256 over the raw public key; it names the signer in each
  signature line and in revocation lists;
- private key: a PEM PKCS#8 ``-----BEGIN PRIVATE KEY-----`` file (``keygen``, or
  ``openssl genpkey -algorithm ed25519``). Key material that starts with ``-----BEGIN`` must be such a
  key; anything else is an HMAC secret, as before (so existing HMAC users change nothing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from . import _fs
from ._log import log
from ._record import Record
from .errors import SigningKeyError

#: Environment variable holding the build host's signing key: an Ed25519 private key (PEM) or an HMAC secret.
SIGNING_KEY_ENV = "CTXCACHE_SIGNING_KEY"
#: Public keys a device trusts, separated by commas or whitespace (``trusted_keys=`` wins over it).
TRUSTED_KEYS_ENV = "CTXCACHE_TRUSTED_KEYS"
#: Key ids or public keys a device refuses, separated by commas or whitespace (added to ``revoked_keys=``).
REVOKED_KEYS_ENV = "CTXCACHE_REVOKED_KEYS"

PUBLIC_PREFIX = "ed25519:"
SIGN_EXTRA = "ctxcache[sign]"
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_SPLIT_RE = re.compile(r"[\s,]+")
# RFC 8410: the DER SubjectPublicKeyInfo of an Ed25519 key is this fixed prefix + the 32 key bytes.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_MAX_KEY_FILE = 64 << 10

Scheme = Literal["hmac-sha256", "ed25519"]


def key_id(public: bytes) -> str:
    """The short name of a public key (16 hex digits of its SHA-256), as signatures and revocations carry it."""
    import hashlib  # here: OpenSSL's _hashlib costs every launch ~3 ms to import, and hits never sign

    return hashlib.sha256(public).hexdigest()[:16]


def format_public_key(public: bytes) -> str:
    import base64  # key material is handled only where keys are given: not at every launch

    return PUBLIC_PREFIX + base64.b64encode(public).decode("ascii")


def parse_public_key(text: str, where: str) -> bytes:
    """The 32 raw bytes of a public key given as ``ed25519:<base64>`` or a PEM public key block."""
    import base64
    import binascii

    text = text.strip()
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        body = "".join(line for line in text.splitlines() if line and not line.startswith("-----"))
        try:
            der = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
            raise SigningKeyError(f"{where}: the PEM public key is not an Ed25519 key; make one with `ctxcache keygen`",
                                  path=where)
        return der[len(_SPKI_PREFIX):]
    if text.startswith("-----BEGIN"):
        raise SigningKeyError(f"{where}: a private key or certificate, not a public key; give devices the "
                              "'ed25519:...' line `ctxcache keygen` printed (never the private key)", path=where)
    if not text.startswith(PUBLIC_PREFIX):
        hint = f" (to read keys from that file, pass pathlib.Path({text!r}))" if len(text) < 4096 and os.path.isfile(text) else ""
        raise SigningKeyError(f"{where}: {text[:24]!r} is not a public key; expected 'ed25519:<base64>' as "
                              f"`ctxcache keygen` prints it{hint}", path=where)
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise SigningKeyError(f"{where}: the public key is not 32 bytes of base64 after 'ed25519:'; copy the "
                              "whole line `ctxcache keygen` printed", path=where)
    return raw


# -- signing keys (build hosts) ----------------------------------------------------------------------------
class SigningKey(Record):
    """A key that signs: an HMAC secret, or an Ed25519 private key (its 32-byte seed). Never printed."""

    __slots__ = ("public", "scheme", "secret")
    scheme: Scheme
    secret: bytes
    public: bytes  # Ed25519 only: the raw public key

    def __init__(self, scheme: Scheme, secret: bytes, public: bytes = b"") -> None:
        self._set(scheme=scheme, secret=secret, public=public)

    def __repr__(self) -> str:
        return f"SigningKey({self.scheme!r}, key_id={self.key_id!r})"  # never the secret

    @property
    def key_id(self) -> str | None:
        return key_id(self.public) if self.scheme == "ed25519" else None

    @property
    def public_key(self) -> str | None:
        return format_public_key(self.public) if self.scheme == "ed25519" else None


def _need_cryptography(what: str) -> None:
    raise ImportError(f"{what} needs the 'cryptography' package: pip install '{SIGN_EXTRA}'")


def _private_key(raw: bytes, where: str) -> SigningKey:
    text = raw.strip()
    if text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"):
        raise SigningKeyError(f"{where}: a password-protected key; ctxcache reads unencrypted keys (keep the file "
                              "owner-only, as `ctxcache keygen` writes it)", path=where)
    if text.startswith(b"-----BEGIN PUBLIC KEY-----"):
        raise SigningKeyError(f"{where}: a public key; signing needs the private key file `ctxcache keygen` wrote "
                              "(devices get the public key, in trusted_keys=)", path=where)
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
    except ImportError:
        raise SigningKeyError(f"{where}: an Ed25519 key needs the 'cryptography' package: pip install "
                              f"'{SIGN_EXTRA}'", path=where) from None
    try:
        key = load_pem_private_key(text, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{where}: not a readable PEM private key ({e}); make one with `ctxcache keygen`",
                              path=where) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{where}: a {type(key).__name__.removeprefix('_')}, not an Ed25519 private key; make "
                              "one with `ctxcache keygen` or `openssl genpkey -algorithm ed25519`", path=where)
    seed = key.private_bytes_raw()
    return SigningKey("ed25519", seed, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def signing_key(value: str | bytes | bytearray | os.PathLike[Any], where: str = "signing_key") -> SigningKey:
    """One signing key: a ``Path`` is read as a key file; text or bytes starting with ``-----BEGIN`` must be
    an Ed25519 private key (PEM); anything else is an HMAC secret."""
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_KEY_FILE + 1)
        except OSError as e:
            raise SigningKeyError(f"cannot read the signing key file {path}: {e.strerror or e}", path=path) from None
        if len(raw) > _MAX_KEY_FILE:
            raise SigningKeyError(f"{path} is too large to be a key file", path=path)
        raw = raw.rstrip(b"\r\n")
        where = path
    elif isinstance(value, str):
        # A path passed as a str would silently become an HMAC secret equal to the file *name*.
        if len(value) < 4096 and not value.lstrip().startswith("-----BEGIN") and os.path.isfile(value):
            raise SigningKeyError(f"{where}={value!r} names a file; the text is taken as the key itself, so pass "
                                  f"pathlib.Path({value!r}) to read the key from that file", path=value)
        raw = value.encode("utf-8")
    else:
        raw = bytes(value)
    if not raw.strip():
        raise SigningKeyError(f"{where}: an empty signing key would sign nothing; pass a key or leave it unset", path=where)
    if raw.lstrip().startswith(b"-----BEGIN"):
        return _private_key(raw, where)
    return SigningKey("hmac-sha256", raw)


SigningKeyArg = Any  # str | bytes | os.PathLike | SigningKey | a list of these | None


def signing_keys(value: SigningKeyArg) -> tuple[SigningKey, ...]:
    """The keys to sign (or check an HMAC) with: the argument (one key or a list, for a rotation where
    both the old and the new key sign), else ``$CTXCACHE_SIGNING_KEY``, else none. At most one HMAC secret
    (readers compare the whole HMAC file)."""
    if value is None:
        env = os.environ.get(SIGNING_KEY_ENV)
        items: list[Any] = [env] if env else []
        where = f"${SIGNING_KEY_ENV}"
    elif isinstance(value, (list, tuple)):
        items, where = list(value), "signing_key"
    else:
        items, where = [value], "signing_key"
    out: list[SigningKey] = []
    for n, item in enumerate(items):
        label = where if len(items) == 1 else f"{where}[{n}]"
        if isinstance(item, SigningKey):
            out.append(item)
        elif isinstance(item, str) and value is None:
            # From the environment: never probe the file system with a secret.
            raw = item.encode("utf-8")
            out.append(_private_key(raw, label) if raw.lstrip().startswith(b"-----BEGIN") else SigningKey("hmac-sha256", raw))
        elif isinstance(item, (str, bytes, bytearray, os.PathLike)):
            out.append(signing_key(item, label))
        else:
            raise TypeError(f"a signing key is a str, bytes, a pathlib.Path or a list of them, not {type(item).__name__}")
    if sum(1 for k in out if k.scheme == "hmac-sha256") > 1:
        raise SigningKeyError(f"{where}: more than one HMAC secret; sign with one HMAC secret and any number of "
                              "Ed25519 keys", path=where)
    return tuple(out)


def hmac_secret(keys: Iterable[SigningKey]) -> bytes | None:
    return next((k.secret for k in keys if k.scheme == "hmac-sha256"), None)


def ed25519_keys(keys: Iterable[SigningKey]) -> tuple[SigningKey, ...]:
    return tuple(k for k in keys if k.scheme == "ed25519")


class GeneratedKey(Record):
    """What :func:`ctxcache.generate_signing_key` made: the private key file (``path``) and the public key to
    give devices (``public_key``, ``key_id``)."""

    __slots__ = ("key_id", "path", "public_key")
    path: Path
    public_key: str
    key_id: str

    def __init__(self, path: Path, public_key: str, key_id: str) -> None:
        self._set(path=path, public_key=public_key, key_id=key_id)


def generate_signing_key(path: str | os.PathLike[str], *, overwrite: bool = False) -> GeneratedKey:
    """Write a new Ed25519 private key to ``path`` (PEM PKCS#8, owner-only) and return its public key.

    Refuses to replace an existing file unless ``overwrite`` (then the new key replaces it by one rename,
    never leaving a half-written key). Raises :class:`~ctxcache.errors.SigningKeyError`.
    """
    dest = Path(os.path.abspath(os.fspath(path)))
    if os.path.lexists(dest) and not overwrite:
        raise SigningKeyError(f"{dest} already exists; keep it, or replace it with overwrite=True: the old "
                              "key's signatures stay valid only where its public key stays trusted", path=str(dest))
    if not dest.parent.is_dir():
        raise SigningKeyError(f"the folder of {dest} does not exist; create it first", path=str(dest))
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
            PublicFormat,
        )
    except ImportError:
        raise SigningKeyError(f"generating a key needs the 'cryptography' package: pip install '{SIGN_EXTRA}'",
                              path=str(dest)) from None
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    target = tmp if overwrite else dest
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        # O_EXCL + 0o600 at creation: the key is never readable by others, not even for a moment.
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise SigningKeyError(f"{dest} already exists; keep it, or replace it with overwrite=True",
                              path=str(dest)) from None
    except OSError as e:
        raise SigningKeyError(f"cannot create {dest}: {e.strerror or e}", path=str(dest)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(target)
        except OSError:
            pass
        raise
    return GeneratedKey(dest, format_public_key(public), key_id(public))


# -- the primitives (cryptography imported here only) --------------------------------------------------------
def ed25519_sign(key: SigningKey, message: bytes) -> bytes:
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        _need_cryptography("signing with an Ed25519 key")
    return Ed25519PrivateKey.from_private_bytes(key.secret).sign(message)


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s over ``message``. Raises ``ImportError`` without cryptography."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        _need_cryptography("checking an Ed25519 signature")
    if len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- the device's trust policy ---------------------------------------------------------------------------------
class Trust(Record):
    """Which Ed25519 keys a device believes, which it refuses, and which folders are the app's own.

    Built once by :class:`~ctxcache.ContextCache` and handed explicitly to every place that admits a
    tier's entry (``tiers._base.fill`` / ``bring_in``, each tier's ``offer``, ``tier_report``).
    ``problem`` is set when ``$CTXCACHE_TRUSTED_KEYS`` or ``$CTXCACHE_REVOKED_KEYS`` could not be read,
    or a revocation file is one another user can change: then no key is trusted (fail closed: a local
    compile, never a foreign binary). ``refused`` says which trust anchors (a ``trusted_dirs`` folder, a
    ``trusted_keys`` file) were left out because another user can change them (:func:`anchor_problem`).
    """

    __slots__ = ("dirs", "keys", "problem", "refused", "revoked")
    keys: tuple[tuple[str, bytes], ...]  # (key id, raw public key)
    revoked: frozenset[str]  # key ids
    dirs: tuple[str, ...]  # real paths of the app's own install folders
    problem: str | None
    refused: tuple[str, ...]  # "trusted_dirs /x: /x is writable by other users ..." (one per anchor)

    def __init__(self, keys: tuple[tuple[str, bytes], ...] = (), revoked: frozenset[str] = frozenset(),
                 dirs: tuple[str, ...] = (), problem: str | None = None, refused: tuple[str, ...] = ()) -> None:
        self._set(keys=keys, revoked=revoked, dirs=dirs, problem=problem, refused=refused)

    def public_key(self, kid: str) -> bytes | None:
        """The trusted public key with this id, or ``None`` (unknown, revoked, or trust unreadable)."""
        if self.problem is not None or kid in self.revoked:
            return None
        return next((raw for k, raw in self.keys if k == kid), None)

    def is_revoked(self, kid: str) -> bool:
        return kid in self.revoked

    def covers(self, location: str | os.PathLike[str]) -> bool:
        """``location`` lies inside one of the app's own folders (links resolved: a link in there that
        points elsewhere does not count)."""
        if not self.dirs:
            return False
        real = os.path.realpath(os.fspath(location))
        for d in self.dirs:
            try:
                inside = os.path.commonpath([d, real]) == d
            except ValueError:  # another drive on Windows
                continue
            # Checked again at use: a folder that others were given write access to since start-up is
            # no longer the app's own.
            if inside and anchor_problem(d) is None:
                return True
        return False

    def with_signers(self, signers: Iterable[SigningKey]) -> Trust:
        """This policy plus the public keys of the tier's own Ed25519 signing keys (a build host that writes
        back trusts what it signed itself; holding the private key, it could sign anything anyway)."""
        extra = tuple((k.key_id or "", k.public) for k in signers if k.scheme == "ed25519")
        if not extra:
            return self
        have = {kid for kid, _ in self.keys}
        return Trust(self.keys + tuple(e for e in extra if e[0] not in have), self.revoked, self.dirs, self.problem,
                     self.refused)

    def as_dict(self) -> dict[str, Any]:
        return {"trusted_keys": [{"key_id": kid, "public_key": format_public_key(raw)} for kid, raw in self.keys],
                "revoked_keys": sorted(self.revoked), "trusted_dirs": list(self.dirs), "problem": self.problem,
                "refused_anchors": list(self.refused)}


def anchor_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a trust anchor (a ``trusted_dirs`` folder, a key file) must not be believed, or ``None``: the
    cache root's rule (:func:`ctxcache._fs.owner_problem`) for the anchor and every folder above it,
    links resolved (:func:`ctxcache._fs.path_problem`). Whoever can write an anchor can drop an unsigned
    bundle into the app's "own" folder or append a key of their own."""
    return _fs.path_problem(path)


def _items(value: Sequence[str | os.PathLike[str]], where: str,
           refused: list[str] | None = None) -> list[tuple[str, str]]:
    """(text, where) for each key: strings as given, files one key per line (``#`` comments). A file
    another user can change (:func:`anchor_problem`) is left out and named in ``refused``."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    out: list[tuple[str, str]] = []
    for n, item in enumerate(value):
        if isinstance(item, os.PathLike):
            path = os.fspath(item)
            problem = anchor_problem(path) if os.path.lexists(path) else None
            if problem is not None and refused is not None:
                refused.append(f"{where} file {path}: {problem}")
                continue
            try:
                # A regular file only (a FIFO planted there must not block the launch), bounded.
                raw = _fs.read_small(Path(path), _MAX_KEY_FILE)
                text = raw[:_MAX_KEY_FILE].decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise SigningKeyError(f"cannot read the key file {path}: {e}", path=path) from None
            if "-----BEGIN" in text:
                out.append((text, path))
            else:
                lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
                out += [(ln, f"{path}:{i + 1}") for i, ln in enumerate(lines) if ln]
        elif isinstance(item, str):
            out.append((item, f"{where}[{n}]"))
        else:
            raise TypeError(f"{where} items are key strings or pathlib.Path files, not {type(item).__name__}")
    return out


def _env_items(name: str) -> list[tuple[str, str]]:
    text = os.environ.get(name, "")
    return [(t, f"${name} item {i + 1}") for i, t in enumerate(t for t in _SPLIT_RE.split(text) if t)]


def _trusted(items: list[tuple[str, str]]) -> tuple[tuple[str, bytes], ...]:
    keys: dict[str, bytes] = {}
    for text, where in items:
        raw = parse_public_key(text, where)
        keys.setdefault(key_id(raw), raw)
    return tuple(keys.items())


def _revoked(items: list[tuple[str, str]]) -> frozenset[str]:
    out: set[str] = set()
    for text, where in items:
        t = text.strip()
        out.add(t.lower() if _KEY_ID_RE.fullmatch(t.lower()) else key_id(parse_public_key(t, where)))
    return frozenset(out)


def resolve_trust(trusted_keys: Sequence[str | os.PathLike[str]] | None = None,
                  revoked_keys: Sequence[str | os.PathLike[str]] | None = None,
                  trusted_dirs: Sequence[str | os.PathLike[str]] | None = None) -> Trust:
    """The device's policy: ``trusted_keys`` (else ``$CTXCACHE_TRUSTED_KEYS``), ``revoked_keys`` plus
    ``$CTXCACHE_REVOKED_KEYS`` (a revocation only ever removes trust, so both count), ``trusted_dirs``.

    A malformed argument raises :class:`~ctxcache.errors.SigningKeyError` (the app's own code). A malformed
    environment variable does not break the launch: it is logged and no key is trusted until it is fixed.
    """
    problem = None
    trusted: tuple[tuple[str, bytes], ...] = ()
    revoked: frozenset[str] = frozenset()
    refused: list[str] = []
    if trusted_keys is not None:
        trusted = _trusted(_items(trusted_keys, "trusted_keys", refused))
    if revoked_keys is not None:
        unsafe: list[str] = []
        revoked = _revoked(_items(revoked_keys, "revoked_keys", unsafe))
        if unsafe:
            # A revocation list others can edit may have lost a line: believe no key (fail closed).
            refused += unsafe
            problem = f"{unsafe[0]}; no key is trusted until it is fixed"
    try:
        if trusted_keys is None:
            trusted = _trusted(_env_items(TRUSTED_KEYS_ENV))
        revoked = revoked | _revoked(_env_items(REVOKED_KEYS_ENV))
    except SigningKeyError as e:
        problem = f"{e.message}; no key is trusted until it is fixed"
    dirs: list[str] = []
    for d in trusted_dirs or ():
        why = anchor_problem(d)
        if why is not None:
            refused.append(f"trusted_dirs {os.fspath(d)}: {why}")
        else:
            dirs.append(os.path.realpath(os.fspath(d)))
    for r in refused:
        log.warning("not trusted: %s; working without it (a signature is required there)", r)
    if problem is not None:
        log.warning("%s", problem)
    return Trust(trusted, revoked, tuple(dict.fromkeys(dirs)), problem, tuple(refused))
