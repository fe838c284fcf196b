"""Bad input: a clear CtxCacheError naming the file or option, and nothing in the cache changes."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from conftest import QNN, layout

import ctxcache
from ctxcache import errors


def _cache_is_empty(cache: ctxcache.ContextCache) -> bool:
    return not layout(cache).entries_dir.exists() or not any(layout(cache).entries_dir.iterdir())


def test_missing_model(cache_dir: Path, tmp_path: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    missing = tmp_path / "nope.onnx"
    with pytest.raises(errors.ModelNotFoundError) as info:
        cache.load(missing, providers=qnn_providers)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in str(info.value) and info.value.path == str(missing)
    assert _cache_is_empty(cache)


@pytest.mark.parametrize("content", [b"hello, this is a text file\n", b"", b"\x08\x07\x12\xff\xff"])
def test_not_an_onnx_file(cache_dir: Path, tmp_path: Path, qnn_providers: list[Any], content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    cache = ctxcache.ContextCache(cache_dir)
    with pytest.raises(errors.InvalidModelError) as info:
        cache.load(bad, providers=qnn_providers)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert _cache_is_empty(cache)
    # The same on the bypass path (CPU only), where ctxcache does not hash the model itself.
    with pytest.raises(errors.InvalidModelError):
        cache.load(bad, providers=["CPUExecutionProvider"])


def test_truncated_model(cache_dir: Path, tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(conv_model.read_bytes()[:1000])
    with pytest.raises(errors.InvalidModelError):
        ctxcache.ContextCache(cache_dir).load(bad, providers=qnn_providers)


def test_missing_external_data(cache_dir: Path, tmp_path: Path, qnn_providers: list[Any]) -> None:
    from ctxcache import models

    model = models.conv_net(tmp_path / "x" / "net.onnx", layers=2, external_data=True)
    (model.parent / "net.data").unlink()
    with pytest.raises(errors.ModelNotFoundError) as info:
        ctxcache.ContextCache(cache_dir).load(model, providers=qnn_providers)
    assert "net.data" in str(info.value)


def test_unknown_provider_suggests(cache_dir: Path, conv_model: Path) -> None:
    with pytest.raises(errors.UnknownProviderError) as info:
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=["QNNExecutionProvder"])
    assert "did you mean 'QNNExecutionProvider'" in str(info.value)


def test_misspelt_option_suggests(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str]) -> None:
    opts = dict(qnn_options)
    opts["soc_modell"] = opts.pop("soc_model")
    with pytest.raises(errors.ProviderOptionError) as info:
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=[(QNN, opts)])
    assert info.value.option == "soc_modell" and "soc_model" in str(info.value)


@pytest.mark.parametrize(
    "change",
    [{"soc_model": "sixty"}, {"enable_htp_fp16_precision": "yes"}, {"backend_type": "npu"}, {"backend_path": "/no/such/libQnnHtp.so"},
     {"soc_model": [60]}],
)
def test_bad_option_values(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str], change: dict[str, Any]) -> None:
    opts = dict(qnn_options, **change)
    if "backend_type" in change:
        opts.pop("backend_path")
    with pytest.raises(errors.ProviderOptionError):
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=[(QNN, opts)])


def test_fp16_without_soc_model_is_refused_up_front(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str]) -> None:
    opts = {k: v for k, v in qnn_options.items() if k != "soc_model"}
    with pytest.raises(errors.ProviderOptionError, match="soc_model"):
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=[(QNN, opts)])


def test_malformed_provider_arguments(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    with pytest.raises(errors.ProviderOptionError):
        cache.load(conv_model, providers=QNN)  # type: ignore[arg-type]
    with pytest.raises(errors.ProviderOptionError):
        cache.load(conv_model, providers=[QNN, "CPUExecutionProvider"], provider_options=[qnn_options])
    with pytest.raises(errors.ProviderOptionError):
        cache.load(conv_model, providers=[(QNN, qnn_options, 1)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        cache.load(12345, providers=[QNN])  # type: ignore[arg-type]


def test_bad_constructor_arguments(cache_dir: Path) -> None:
    with pytest.raises(ValueError):
        ctxcache.ContextCache(cache_dir, on_lock_timeout="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ctxcache.ContextCache(cache_dir, verify="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "err",
    [
        errors.ModelNotFoundError("m missing", path="/x/m.onnx"),
        errors.LockTimeoutError("slow", lock_path="/x/l.lock", timeout=1.5),
        errors.CacheFaultError("fault", code="artifact_digest", key="ab" * 16),
        errors.ProviderOptionError("bad", provider=QNN, option="soc_model"),
    ],
)
def test_errors_pickle_with_their_attributes(err: errors.CtxCacheError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert back.attributes == err.attributes and back.attributes
    assert isinstance(back, errors.CtxCacheError)


def test_error_data_is_named_and_checked() -> None:
    """Attributes are the keyword arguments of each class: a misspelt one is an error, not a new attribute."""
    with pytest.raises(TypeError):
        errors.ModelNotFoundError("missing", pathh="/x")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        errors.LockTimeoutError("slow", lock_path="/l")  # type: ignore[call-arg]
    err = errors.TierError("refused", code="tier_digest")
    assert err.attributes == {"code": "tier_digest"} and str(err) == "tier_digest: refused"


def test_tier_errors_are_ctxcache_errors_from_public_calls(tmp_path: Path) -> None:
    """TierError once escaped public calls without being a CtxCacheError."""
    import socket

    import ctxcache

    assert issubclass(errors.TierError, errors.CtxCacheError) and issubclass(errors.BundleError, errors.CtxCacheError)
    with socket.socket() as s:  # a port nobody listens on: a refused connection, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = ctxcache.RemoteTier("s3://bucket/p", endpoint_url=f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(errors.CtxCacheError) as info:
        ctxcache.pull(ctxcache.ContextCache(tmp_path / "c"), remote)
    assert isinstance(info.value, errors.TierError) and info.value.code == "tier_unreachable"
    with pytest.raises(errors.CtxCacheError):
        ctxcache.import_bundle(ctxcache.ContextCache(tmp_path / "c"), tmp_path / "no-such-bundle")
