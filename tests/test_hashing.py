"""Model digests, the stat memo, and the protobuf walker that finds external data without onnx."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
import xxhash
from conftest import layout

from ctxcache import _hashing, _onnxproto, models


def test_digest_matches_streamed_xxh3_of_the_bytes(tmp_path: Path, conv_model: Path) -> None:
    d = _hashing.model_digest(conv_model, None)
    h = xxhash.xxh3_128()
    h.update(b"model\0")
    h.update(conv_model.read_bytes())
    assert d.digest == h.hexdigest() == _hashing.bytes_digest(conv_model.read_bytes())
    assert d.files == (str(conv_model),)


def test_memo_hit_and_invalidation(tmp_path: Path) -> None:
    model = models.conv_net(tmp_path / "m" / "net.onnx", layers=2, external_data=True)
    memo = tmp_path / "memo"
    memo.mkdir()
    first = _hashing.model_digest(model, memo)
    assert not first.memo_hit and len(first.files) == 2
    second = _hashing.model_digest(model, memo)
    assert second.memo_hit and second.digest == first.digest
    # Rewriting the data file with the same bytes changes its ctime/mtime: re-hash, same digest.
    data = model.parent / "net.data"
    data.write_bytes(data.read_bytes())
    third = _hashing.model_digest(model, memo)
    assert not third.memo_hit and third.digest == first.digest
    # Changed content with the old mtime restored: ctime still gives it away.
    st = data.stat()
    blob = bytearray(data.read_bytes())
    blob[0] ^= 1
    data.write_bytes(bytes(blob))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    fourth = _hashing.model_digest(model, memo)
    assert not fourth.memo_hit and fourth.digest != first.digest


def test_walker_finds_external_data_everywhere(tmp_path: Path) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    # An initializer in a subgraph (If branch) with external data must be found too.
    big = numpy_helper.from_array(np.ones((64, 64), np.float32), "w_inner")
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["w_inner"], ["out_then"])], "then", [],
        [helper.make_tensor_value_info("out_then", TensorProto.FLOAT, [64, 64])], [big],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["w_inner"], ["out_else"])], "else", [],
        [helper.make_tensor_value_info("out_else", TensorProto.FLOAT, [64, 64])], [],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(np.ones((64, 64), np.float32), "w_outer")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "sub.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    facts = _onnxproto.read_facts(path)
    assert facts.external_locations == {"w_inner", "w_outer"}
    digest = _hashing.model_digest(path, None)
    assert len(digest.files) == 3


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "a/../../b"])
def test_external_data_may_not_escape_the_model_folder(tmp_path: Path, location: str) -> None:
    from ctxcache import errors

    model = models.conv_net(tmp_path / "net.onnx", layers=1, external_data=True)
    m = onnx.load(str(model), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(model))
    with pytest.raises(errors.InvalidModelError, match="relative"):
        _hashing.model_digest(model, None)


def test_walker_rejects_garbage() -> None:
    for blob in [b"", b"\xff" * 10, b"plain text", os.urandom(64)]:
        with pytest.raises(_onnxproto.WireError):
            _onnxproto.read_facts_from_bytes(blob)


def test_walker_reads_ep_context_nodes(tmp_path: Path, conv_model: Path, qnn_providers: list) -> None:  # type: ignore[type-arg]
    import ctxcache

    cache = ctxcache.ContextCache(tmp_path / "c")
    r = cache.load(conv_model, providers=qnn_providers)
    facts = _onnxproto.read_facts(layout(cache).entry_path(str(r.key)) / "ctx.onnx", ep_context=True)
    [node] = facts.ep_context_nodes
    assert node.embed_mode == 0 and node.cache_context == b"ctx_qnn.bin"
    assert node.source == "QNNExecutionProvider"
    assert facts.metadata["ep_compatibility_info.QNNExecutionProvider"].startswith("v2:")


def test_entry_file_names_and_keys_are_matched_whole() -> None:
    from ctxcache._manifest import KEY_RE as _KEY_RE
    from ctxcache._manifest import safe_name

    assert safe_name("ctx.onnx") and safe_name("ctx_qnn.bin")
    for bad in ["ctx.onnx\n", "../ctx.onnx", ".hidden", "a/b", "", "x" * 200, "a..b"]:
        assert not safe_name(bad), bad
    assert _KEY_RE.fullmatch("0" * 32) and not _KEY_RE.fullmatch("0" * 32 + "\n")
