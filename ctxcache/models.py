"""Small generated ONNX models for the demo, the tests and the benchmarks.

Random weights, real architectures' shapes: they exercise the real QNN compiler without downloading
anything. Imports onnx and numpy lazily, so importing ctxcache does not pay for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

OPSET = 17


def _save(model: Any, path: Path, external_data: bool) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = 8
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.stem + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def conv_net(path: str | Path, *, layers: int = 4, channels: int = 16, size: int = 32, seed: int = 0,
             external_data: bool = False, batch: int | str = 1) -> Path:
    """A plain conv/relu stack: input ``input`` [batch,3,size,size] -> ``output`` [batch,channels,size,size].
    ``batch="batch"`` makes the batch dimension symbolic (a dynamic-shape model: an NPU compiler needs
    it fixed, e.g. ``add_free_dimension_override_by_name("batch", 1)``); its denotation is DATA_BATCH."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, cin = "input", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, cin, 3, 3)) * (1.0 / (3 * cin) ** 0.5)).astype(np.float32)
        b = (rng.standard_normal((channels,)) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        out = "output" if i == layers - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"c{i}"], [out]))
        prev, cin = out, channels
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])
    if isinstance(batch, str):
        inp.type.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [inp],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, channels, size, size])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), Path(path), external_data)


def mobilenet_like(path: str | Path, *, width: int = 1, seed: int = 0, external_data: bool = False) -> Path:
    """MobileNet-v1-shaped: depthwise + pointwise blocks, global pool, classifier (~14 MB at width 1)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, group: int, name: str) -> str:
        w = (rng.standard_normal((cout, cin // group, k, k)) * (2.0 / (k * k * cin / group)) ** 0.5).astype(np.float32)
        b = np.zeros((cout,), np.float32)
        inits.extend([numpy_helper.from_array(w, name + "_w"), numpy_helper.from_array(b, name + "_b")])
        nodes.append(
            helper.make_node("Conv", [x, name + "_w", name + "_b"], [name], pads=[k // 2] * 4, strides=[stride] * 2, group=group)
        )
        nodes.append(helper.make_node("Relu", [name], [name + "_r"]))
        return name + "_r"

    c = 32 * width
    x = conv("input", 3, c, 3, 2, 1, "stem")
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for i, (cout, stride) in enumerate(plan):
        cout *= width
        x = conv(x, c, c, 3, stride, c, f"dw{i}")
        x = conv(x, c, cout, 1, 1, 1, f"pw{i}")
        c = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"]))
    w = (rng.standard_normal((c, 1000)) * 0.01).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "fc_w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc_w"], ["output"]))
    graph = helper.make_graph(
        nodes,
        "mobilenet_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1000])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), Path(path), external_data)


def transformer_block(path: str | Path, *, d_model: int = 1024, d_ff: int = 4096, seq: int = 128, layers: int = 1,
                      seed: int = 0, external_data: bool = False) -> Path:
    """Pre-norm transformer encoder block(s): attention + MLP (~76 MB per layer at the defaults)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    heads = max(1, d_model // 64)
    dh = d_model // heads

    def weight(name: str, shape: tuple[int, ...], scale: float) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def layernorm(x: str, name: str) -> str:
        g = weight(name + "_g", (d_model,), 0.0)
        inits[-1] = numpy_helper.from_array(np.ones((d_model,), np.float32), g)
        b = weight(name + "_b", (d_model,), 0.0)
        nodes.append(helper.make_node("LayerNormalization", [x, g, b], [name], axis=-1, epsilon=1e-5))
        return name

    x = "input"
    s = d_model ** -0.5
    split_shape = const("split_shape", [1, seq, heads, dh])
    merge_shape = const("merge_shape", [1, seq, d_model])
    for layer in range(layers):
        p = f"l{layer}_"
        h = layernorm(x, p + "ln1")
        qkv = []
        for n in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [h, weight(p + n + "_w", (d_model, d_model), s)], [p + n]))
            nodes.append(helper.make_node("Reshape", [p + n, split_shape], [p + n + "_s"]))
            perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
            nodes.append(helper.make_node("Transpose", [p + n + "_s"], [p + n + "_t"], perm=perm))
            qkv.append(p + n + "_t")
        nodes.append(helper.make_node("MatMul", [qkv[0], qkv[1]], [p + "scores"]))
        inits.append(numpy_helper.from_array(np.array(dh ** -0.5, np.float32), p + "scale"))
        nodes.append(helper.make_node("Mul", [p + "scores", p + "scale"], [p + "scaled"]))
        nodes.append(helper.make_node("Softmax", [p + "scaled"], [p + "probs"], axis=-1))
        nodes.append(helper.make_node("MatMul", [p + "probs", qkv[2]], [p + "ctx"]))
        nodes.append(helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [p + "ctx_t", merge_shape], [p + "ctx_m"]))
        nodes.append(helper.make_node("MatMul", [p + "ctx_m", weight(p + "o_w", (d_model, d_model), s)], [p + "attn"]))
        nodes.append(helper.make_node("Add", [x, p + "attn"], [p + "res1"]))
        h2 = layernorm(p + "res1", p + "ln2")
        nodes.append(helper.make_node("MatMul", [h2, weight(p + "ff1_w", (d_model, d_ff), s)], [p + "ff1"]))
        nodes.append(helper.make_node("Relu", [p + "ff1"], [p + "ff1_r"]))
        nodes.append(helper.make_node("MatMul", [p + "ff1_r", weight(p + "ff2_w", (d_ff, d_model), d_ff ** -0.5)], [p + "ff2"]))
        out = "output" if layer == layers - 1 else p + "out"
        nodes.append(helper.make_node("Add", [p + "res1", p + "ff2"], [out]))
        x = out
    graph = helper.make_graph(
        nodes,
        "transformer_block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, seq, d_model])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, seq, d_model])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), Path(path), external_data)


def random_input(session: Any, seed: int = 0) -> dict[str, Any]:
    """A feed dict of random float32 inputs matching ``session``'s (static) input shapes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        feeds[inp.name] = rng.random(shape, dtype=np.float32)
    return feeds


def qnn_htp_options() -> dict[str, str]:
    """Provider options that compile for a Snapdragon HTP (soc 60 / v73) with the x86 HTP compiler here."""
    import onnxruntime_qnn

    return {
        "backend_path": onnxruntime_qnn.get_qnn_htp_path(),
        "soc_model": "60",
        "htp_arch": "73",
        "enable_htp_fp16_precision": "1",
    }


def plain_qnn_session(model: str | Path | bytes, sess_options: Any = None, options: dict[str, str] | None = None) -> Any:
    """A session on ``model`` with plain ONNX Runtime and the QNN plugin, no ctxcache in between (the
    yardstick the demo, tests and benchmarks compare with): register the plugin library, then add the
    provider for its devices (the classic ``providers=`` form would silently run on CPU)."""
    import onnxruntime as ort
    import onnxruntime_qnn

    if not any(d.ep_name == "QNNExecutionProvider" for d in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    so = sess_options if sess_options is not None else ort.SessionOptions()
    so.add_provider_for_devices(devices, options if options is not None else qnn_htp_options())
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so)
