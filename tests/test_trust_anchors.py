"""Trust anchors others can write are refused (reliability guarantee 16).

A ``trusted_dirs`` folder or a ``trusted_keys`` / ``revoked_keys`` file that another user can change (mode
1777 / 0666, group-writable by a group that is not the user's own, owned by another user, below such a
folder, or reached through a link in such a folder) gets the cache root's rule: it is left out, the log
and ``doctor`` say why, and loads keep working without it (a local compile instead of the tier's entry).
Real files and modes; another user is uid 65534, made with ``os.chown`` (the suite runs as root here).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import QNN

import ctxcache
from ctxcache import _fs, models

pytest.importorskip("cryptography", reason="signatures need the 'sign' extra: pip install -e '.[sign,test]'")

PROVIDERS = [(QNN, models.qnn_htp_options())]
OTHER = 65534

if not hasattr(os, "getuid") or os.getuid() != 0:  # pragma: no cover - the suite runs as root in CI here
    pytestmark = pytest.mark.skip(reason="making a file owned by another user needs root (os.chown to uid 65534)")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, conv_model: Path) -> ctxcache.ContextCache:
    cache = ctxcache.ContextCache(tmp_path_factory.mktemp("anchors") / "src")
    assert cache.load(conv_model, providers=PROVIDERS).outcome == "miss"
    return cache


def _mode(mode: int) -> Callable[[Path], Path]:
    def make(p: Path) -> Path:
        os.chmod(p, mode)
        return p
    return make


def _owner(p: Path) -> Path:
    os.chown(p, OTHER, OTHER)
    return p


def _group(p: Path) -> Path:
    os.chown(p, 0, 100)  # "users": not root's own group
    os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IWGRP)
    return p


# Each makes the anchor at ``p`` changeable by another user; returns the path the app is given.
def _parent_open(p: Path) -> Path:
    os.chmod(p.parent, 0o777)
    return p


def _link_in_open_folder(p: Path) -> Path:
    hop = p.parent / "open"
    hop.mkdir()
    os.chmod(hop, 0o777)
    link = hop / "link"
    link.symlink_to(p)
    return link


def _link_to_open_place(p: Path) -> Path:
    # The app's path is a link in a private folder, but what it points at lives below a folder others can write.
    elsewhere = p.parent.parent / "elsewhere"
    elsewhere.mkdir()
    os.chmod(elsewhere, 0o777)
    target = elsewhere / p.name
    os.rename(p, target)
    p.symlink_to(target)
    return p


DIR_CASES: dict[str, Callable[[Path], Path]] = {
    "1777": _mode(0o1777), "0777": _mode(0o777), "other_owner": _owner, "group_writable": _group,
    "parent_writable": _parent_open, "link_in_open_folder": _link_in_open_folder,
    "link_to_open_place": _link_to_open_place,
}
FILE_CASES: dict[str, Callable[[Path], Path]] = {
    "0666": _mode(0o666), "0622": _mode(0o622), "other_owner": _owner, "group_writable": _group,
    "parent_writable": _parent_open, "link_in_open_folder": _link_in_open_folder,
    "link_to_open_place": _link_to_open_place,
}


def _app(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir(mode=0o755)
    app = base / "app"
    app.mkdir(mode=0o755)
    return app


def test_a_safe_own_folder_serves_its_unsigned_bundle(source: ctxcache.ContextCache, tmp_path: Path,
                                                      conv_model: Path) -> None:
    """The control: what the refusals below take away is real."""
    app = _app(tmp_path)
    bundle = ctxcache.export_bundle(source, app / "bundle").path
    cache = ctxcache.ContextCache(tmp_path / "dev", tiers=[bundle], trusted_dirs=[app])
    assert cache.trust.refused == () and cache.trust.dirs == (str(app),)
    r = cache.load(conv_model, providers=PROVIDERS)
    assert (r.outcome, r.tier) == ("hit", "bundle")


@pytest.mark.parametrize("case", sorted(DIR_CASES))
def test_a_trusted_dir_others_can_write_is_refused(case: str, source: ctxcache.ContextCache, tmp_path: Path,
                                                   conv_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = _app(tmp_path)
    bundle = ctxcache.export_bundle(source, app / "bundle").path  # unsigned: trusted only inside an own folder
    given = DIR_CASES[case](app)
    assert _fs.path_problem(given) is not None
    with caplog.at_level(logging.WARNING, logger="ctxcache"):
        cache = ctxcache.ContextCache(tmp_path / "dev", tiers=[given / "bundle"], trusted_dirs=[given])
    assert cache.trust.dirs == () and len(cache.trust.refused) == 1 and str(given) in cache.trust.refused[0]
    assert any("not trusted" in rec.getMessage() and str(given) in rec.getMessage() for rec in caplog.records)
    # explain (before the load) says why the tier's entry would be refused, naming the refused anchor.
    (answer,) = cache.explain(conv_model, providers=PROVIDERS).tiers
    assert answer.refused and "not trusted" in answer.refused and str(given) in answer.refused, answer
    r = cache.load(conv_model, providers=PROVIDERS)
    assert (r.outcome, r.tier) == ("miss", None)  # compiled locally: the unsigned bundle is not believed
    assert r.session.get_providers()[0] == QNN
    diag = ctxcache.diagnose(cache)
    assert any("not trusted" in p and str(given) in p for p in diag.problems), diag.problems
    del bundle


def test_a_trusted_dir_opened_to_others_after_start_up_stops_counting(
        source: ctxcache.ContextCache, tmp_path: Path, conv_model: Path) -> None:
    app = _app(tmp_path)
    ctxcache.export_bundle(source, app / "bundle")
    cache = ctxcache.ContextCache(tmp_path / "dev", tiers=[app / "bundle"], trusted_dirs=[app])
    assert cache.trust.dirs == (str(app),)
    os.chmod(app, 0o777)
    r = cache.load(conv_model, providers=PROVIDERS)
    assert (r.outcome, r.tier) == ("miss", None)


@pytest.mark.parametrize("case", ["control", *sorted(FILE_CASES)])
def test_a_trusted_keys_file_others_can_write_is_refused(case: str, source: ctxcache.ContextCache, keys: dict[str, Any],
                                                         tmp_path: Path, conv_model: Path) -> None:
    bundle = ctxcache.export_bundle(source, tmp_path / "signed", signing_key=keys["a"].path).path
    app = _app(tmp_path)
    key_file = app / "trusted.keys"
    key_file.write_text(f"# the vendor's key\n{keys['a'].public_key}\n")
    os.chmod(key_file, 0o644)
    given = key_file if case == "control" else FILE_CASES[case](key_file)
    cache = ctxcache.ContextCache(tmp_path / "dev", tiers=[bundle], trusted_keys=[given])
    r = cache.load(conv_model, providers=PROVIDERS)
    if case == "control":
        assert cache.trust.refused == () and [k for k, _ in cache.trust.keys] == [keys["a"].key_id]
        assert (r.outcome, r.tier) == ("hit", "bundle")
        return
    assert cache.trust.keys == () and len(cache.trust.refused) == 1 and str(given) in cache.trust.refused[0]
    assert (r.outcome, r.tier) == ("miss", None)
    assert any("not trusted" in p for p in ctxcache.diagnose(cache).problems)


def test_a_revocation_file_others_can_write_trusts_no_key(source: ctxcache.ContextCache, keys: dict[str, Any],
                                                          tmp_path: Path, conv_model: Path) -> None:
    """Fail closed: a revocation list someone else can edit may have lost the line that mattered."""
    bundle = ctxcache.export_bundle(source, tmp_path / "signed", signing_key=keys["a"].path).path
    revoked = tmp_path / "revoked.keys"
    revoked.write_text(f"{keys['evil'].key_id}\n")
    os.chmod(revoked, 0o666)
    cache = ctxcache.ContextCache(tmp_path / "dev", tiers=[bundle], trusted_keys=[keys["a"].public_key],
                                  revoked_keys=[revoked])
    assert cache.trust.problem is not None and str(revoked) in cache.trust.problem
    r = cache.load(conv_model, providers=PROVIDERS)
    assert (r.outcome, r.tier) == ("miss", None)


def test_a_fifo_as_key_file_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ctxcache.errors.SigningKeyError):
        ctxcache.ContextCache(tmp_path / "dev", trusted_keys=[fifo])


def test_one_rule_for_the_cache_root_and_the_anchors(tmp_path: Path) -> None:
    """The cache root's folder rule and the anchor rule are one function (_fs.owner_problem)."""
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    st = os.lstat(d)
    assert _fs.folder_problem(st, d) is not None and _fs.owner_problem(st, d) is not None
    assert _fs.path_problem(d) == _fs.owner_problem(st, str(d))
    cache = ctxcache.ContextCache(d)
    assert cache.load(models.conv_net(tmp_path / "m.onnx", layers=2, channels=8), providers=PROVIDERS).reason.code == "cache_insecure"  # type: ignore[union-attr]
