"""fp16 ONNX (``sdrt export --fp16``): the ops that overflow fp16 stay fp32 in the graph, the image stays close
to fp32's, and attention scores beyond fp16's range do not turn into NaN (the black-image case)."""
from __future__ import annotations

import numpy as np
import pytest

import sdrt
from sdrt.errors import InvalidRequest
from sdrt.runtimes import BuildOptions

pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sdrt.exporters.onnx import FP32_OPS, to_fp16  # noqa: E402

KW = dict(width=64, height=64, steps=8, seed=3, sampler="Euler a", negative_prompt="blurry")


def typed_graph(path):
    """The graph with shape inference run, and the element type of every tensor in it."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return g, types


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_sensitive_ops_are_fp32_in_the_graph(tiny_fp16_export, name):
    graph, types = typed_graph(tiny_fp16_export / f"{name}.onnx")
    producer = {out: node for node in graph.node for out in node.output}
    kept = [n for n in graph.node if n.op_type in (*FP32_OPS, "Sin", "Cos")]
    assert kept, "the graph has no softmax or normalization to keep"
    for node in kept:
        floats = [types[t] for t in (*node.input, *node.output) if types.get(t) != TensorProto.INT64]
        assert set(floats) == {TensorProto.FLOAT}, (node.name, floats)
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        scores = producer[softmax.input[0]]                 # Q·Kᵀ (+ CLIP's causal mask), no Cast between
        while scores.op_type == "Add":
            scores = producer[scores.input[0]]
        assert scores.op_type == "MatMul" and {types[t] for t in scores.input} == {TensorProto.FLOAT}
    weights = [t.data_type for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert weights.count(TensorProto.FLOAT16) > 0.5 * len(weights)       # the rest is fp16


def test_fp16_image_is_close_to_fp32(tiny_fp16_export, tiny_export):
    half = sdrt.load(tiny_fp16_export, runtime="onnxruntime", progress=False).txt2img("a cat", **KW)
    full = sdrt.load(tiny_export, runtime="onnxruntime", progress=False).txt2img("a cat", **KW)
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (half, full))
    # measured here (onnxruntime 1.32, tiny model, 64x64, 8 steps Euler a): mean 0.09/255, max 1/255
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 4
    assert a.std() > 10                     # an image, not a flat (black) one


def attention_graph(path, d: int = 16) -> dict[str, np.ndarray]:
    """Save x -> softmax((x Wq)(x Wk)ᵀ) (x Wv) -> GroupNorm-as-InstanceNormalization, as the exporter emits them,
    to ``path``; returns the weights."""
    rng = np.random.default_rng(0)
    values = {n: rng.standard_normal((d, d)).astype(np.float32) for n in ("wq", "wk", "wv")}
    weights = [numpy_helper.from_array(v, n) for n, v in values.items()]
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("groups", [1, 2, -1]),
                                                                             ("back", [1, 8, d]))]
    norm = [numpy_helper.from_array(np.full(2, v, np.float32), n) for n, v in (("gamma", 1.0), ("beta", 0.0))]
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]], name=w[1]) for w in ("wq", "wk", "wv")]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
              helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v"], ["a"], name="attend"),
              helper.make_node("Reshape", ["a", "groups"], ["g"], name="to_groups"),
              helper.make_node("InstanceNormalization", ["g", "gamma", "beta"], ["n"], name="norm"),
              helper.make_node("Reshape", ["n", "back"], ["y"], name="from_groups")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])],
                              weights + consts + norm)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return values


def test_attention_scores_beyond_fp16_range_stay_finite(tmp_path):
    w = attention_graph(tmp_path / "attention.onnx")
    x = (np.random.default_rng(1).standard_normal((1, 8, 16)) * 30).astype(np.float16).astype(np.float32)
    scores = (x[0] @ w["wq"]) @ (x[0] @ w["wk"]).T
    assert np.abs(scores).max() > 2 * float(np.finfo(np.float16).max)   # inf if rounded to fp16 on the way
    fp32 = ort.InferenceSession(str(tmp_path / "attention.onnx"), providers=["CPUExecutionProvider"])
    half = ort.InferenceSession(to_fp16(tmp_path / "attention.onnx").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    out = half.run(None, {"x": x.astype(np.float16)})[0]
    assert out.dtype == np.float16 and np.isfinite(out).all()
    np.testing.assert_allclose(out.astype(np.float32), fp32.run(None, {"x": x})[0], atol=0.02)


def test_openvino_keeps_an_fp16_export_fp16(tiny_fp16_export):
    pytest.importorskip("openvino")
    with pytest.raises(InvalidRequest, match="this export is fp16"):
        sdrt.build(tiny_fp16_export, BuildOptions(precision="fp32"), progress=False)


def test_openvino_build_of_an_fp16_export_stores_compressed_weights(tiny_fp16_export, tiny_export):
    """`sdrt build` widens an fp16 export's graphs to f32 and stores the weights fp16 with decompression marks, as
    OpenVINO's own fp16 IR does (the CPU plugin would otherwise materialise f32 copies beside them): same weights,
    the initializer names kept for LoRA, and the image of the fp32 export."""
    ov = pytest.importorskip("openvino")
    entry = sdrt.build(tiny_fp16_export, BuildOptions(backend="openvino"), progress=False)
    model = ov.Core().read_model(str(entry / "unet.xml"))
    assert {p.get_element_type() for p in model.get_parameters()} == {ov.Type.f32}
    ops = model.get_ordered_ops()
    assert not [op for op in ops if op.get_type_name() == "Convert" and op.get_output_element_type(0) == ov.Type.f16]
    weights = [op for op in ops if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f16]
    marked = [i.get_node() for op in weights for i in op.output(0).get_target_inputs()]   # rt_info reads back as
    assert weights and all(n.get_type_name() == "Convert" and any(k.startswith("decompression")   # decompression_0
                                                                   for k in n.get_rt_info().keys()) for n in marked)
    source = onnx.load(str(tiny_fp16_export / "unet.onnx"))
    named = {op.output(0).get_any_name(): op.get_data() for op in weights if op.output(0).get_names()}
    initializers = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer if t.data_type == TensorProto.FLOAT16}
    assert set(initializers) <= set(named)
    assert all(np.array_equal(named[k], v) for k, v in initializers.items())
    built = sdrt.load(tiny_fp16_export, runtime="openvino", progress=False).txt2img("a cat", **KW)
    full = sdrt.load(tiny_export, runtime="onnxruntime", progress=False).txt2img("a cat", **KW)
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (built, full))
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 4
