"""Provider selection by policy (SessionOptions.set_provider_selection_policy / ..._delegate).

ORT picks the provider and device when the session is created, from state ctxcache cannot read back out
of a SessionOptions. A key that named anything else than what ORT picks would be wrong, so ctxcache
bypasses with reason ``provider_policy``, hands ORT the app's own options untouched (a copy would lose
the policy) and names the provider ORT picked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from conftest import run_python

import ctxcache


def test_policy_is_a_bypass_that_names_the_pick(conv_model: Path, cache_dir: Path) -> None:
    # A fresh process: once a plugin EP is registered (other tests register QNN), ORT's policies pick it.
    code = f"""
import json, onnxruntime as ort, ctxcache
from ctxcache import models
from _report import report
so = ort.SessionOptions()
so.set_provider_selection_policy(ort.OrtExecutionProviderDevicePolicy.PREFER_CPU)
cache = ctxcache.ContextCache({str(cache_dir)!r})
r = cache.load({str(conv_model)!r}, providers=None, sess_options=so)
out = r.session.run(None, models.random_input(r.session))[0]
report({{"outcome": r.outcome, "code": r.reason.code if r.reason else None,
        "message": r.reason.message if r.reason else "", "shape": list(out.shape),
        "entries": len(cache.entries()),
        "key": cache.key({str(conv_model)!r}, providers=None, sess_options=so) is None}})
"""
    res = run_python(code).result
    assert res["outcome"] == "bypass" and res["code"] == "provider_policy"
    assert "picked CPUExecutionProvider" in res["message"]
    assert res["shape"] == [1, 16, 32, 32]
    assert res["entries"] == 0 and res["key"] is True


def test_the_apps_own_options_reach_onnxruntime(conv_model: Path, cache_dir: Path) -> None:
    """A delegate policy is called by ORT only if ctxcache passed the app's SessionOptions on, not a copy."""
    seen: list[list[str]] = []

    def pick(devices: Any, model_meta: Any, runtime_meta: Any, max_selections: int) -> list[Any]:
        seen.append([d.ep_name for d in devices])
        return [d for d in devices if d.ep_name == "CPUExecutionProvider"]

    so = ort.SessionOptions()
    so.set_provider_selection_policy_delegate(pick)
    r = ctxcache.ContextCache(cache_dir).load(conv_model, providers=None, sess_options=so)
    assert seen, "ORT never consulted the app's selection delegate"
    assert "CPUExecutionProvider" in seen[0]
    assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "provider_policy"


def test_explicit_providers_win_over_a_policy_as_in_onnxruntime(
    conv_model: Path, cache_dir: Path, qnn_providers: list[Any]
) -> None:
    # ORT: "providers specified [to InferenceSession] take precedence" over those in the SessionOptions.
    so = ort.SessionOptions()
    so.set_provider_selection_policy(ort.OrtExecutionProviderDevicePolicy.PREFER_CPU)
    r = ctxcache.ContextCache(cache_dir).load(conv_model, providers=qnn_providers, sess_options=so)
    assert r.outcome == "miss", r
    assert r.providers[0] == "QNNExecutionProvider"


def test_plain_options_without_policy_still_cache(conv_model: Path, cache_dir: Path) -> None:
    so = ort.SessionOptions()
    assert not so.has_providers()
    r = ctxcache.ContextCache(cache_dir).load(conv_model, providers=None, sess_options=so)
    assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "nothing_to_compile"


@pytest.mark.parametrize("policy", ["PREFER_NPU", "MAX_EFFICIENCY"])
def test_policy_errors_are_onnxruntimes_own(policy: str, conv_model: Path, cache_dir: Path) -> None:
    """With the QNN plugin registered, ORT's policies pick QNN (its x86 device is typed CPU) without
    options and fail ("Could not determine default backend path"): ctxcache must neither hide that nor
    turn it into another outcome, because plain ORT raises the same."""
    from ctxcache.providers import get

    get("QNNExecutionProvider").unavailable_reason()  # registers the plugin, as a QNN load would
    so = ort.SessionOptions()
    so.set_provider_selection_policy(getattr(ort.OrtExecutionProviderDevicePolicy, policy))
    try:
        plain: Exception | None = None
        ort.InferenceSession(str(conv_model), sess_options=so)
    except Exception as e:  # ORT's exceptions derive from Exception only
        plain = e
    so2 = ort.SessionOptions()
    so2.set_provider_selection_policy(getattr(ort.OrtExecutionProviderDevicePolicy, policy))
    if plain is None:
        r = ctxcache.ContextCache(cache_dir).load(conv_model, providers=None, sess_options=so2)
        assert r.reason is not None and r.reason.code == "provider_policy"
    else:
        with pytest.raises(type(plain)):
            ctxcache.ContextCache(cache_dir).load(conv_model, providers=None, sess_options=so2)
