"""The ONNX export of the calibrator computes what the torch module computes, and aligned artifacts carry it."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")  # the export (detox align) needs it
pytest.importorskip("onnxruntime")

from detox.artifacts import ArtifactError, save_artifact  # noqa: E402
from detox.artifacts.manifest import CALIBRATOR_ONNX  # noqa: E402
from detox.onnx_calibrator import OnnxRunner, export_calibrator_onnx, export_tolerance  # noqa: E402
from detox.runtime import Calibrator, TorchRunner  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_calibrator, tmp_path_factory):
    cal = Calibrator.load(tiny_calibrator)
    path = export_calibrator_onnx(cal.torch_model(), tmp_path_factory.mktemp("onnx") / CALIBRATOR_ONNX)
    return cal, OnnxRunner(path)


def test_onnx_runner_matches_torch_over_an_incremental_run(exported):
    cal, onnx_runner = exported
    torch_runner = TorchRunner(cal.torch_model())
    s_onnx, s_torch = onnx_runner.empty_state(), torch_runner.empty_state()
    rng = np.random.default_rng(0)
    for n in (1, 5, 1, 3, 1, 1, 8):  # chunks of varying length on a growing cache
        ids = rng.integers(0, cal.manifest.calibrator.vocab_size, n).tolist()
        h_onnx, s_onnx = onnx_runner.run(ids, s_onnx)
        h_torch, s_torch = torch_runner.run(ids, s_torch)
        assert isinstance(h_onnx, np.ndarray)
        np.testing.assert_allclose(h_onnx, h_torch.numpy(), atol=1e-4, rtol=1e-4)
        for layer in range(cal.manifest.calibrator.num_layers):  # onnx: (key_0, value_0, key_1, ...) per layer
            np.testing.assert_allclose(s_onnx[2 * layer], s_torch[0][layer].numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(s_onnx[2 * layer + 1], s_torch[1][layer].numpy(), atol=1e-4, rtol=1e-4)
    assert s_onnx[0].shape[2] == 20


def test_stream_on_onnx_matches_stream_on_torch(exported):
    cal, onnx_runner = exported
    text = "The weather  today is lovely, isn't it? We walked 12 km along the river"
    a, b = cal.stream(onnx_runner), cal.stream()
    for c in list(range(1, len(text) + 1, 4)) + [len(text)]:
        np.testing.assert_allclose(a.hidden_for(text[:c]), b.hidden_for(text[:c]).numpy(), atol=1e-4, rtol=1e-4)
    assert a.tokens_run == b.tokens_run


def _export_pair(contrast_artifact, tmp_path_factory, weights_dtype):
    """The expert/anti-expert pair of a contrast artifact exported as one graph."""
    cal = Calibrator.load(contrast_artifact)
    path = export_calibrator_onnx(cal.torch_model(), tmp_path_factory.mktemp("onnx") / CALIBRATOR_ONNX,
                                  anti=cal.torch_model("anti"), weights_dtype=weights_dtype)
    return cal, OnnxRunner(path)


@pytest.fixture(scope="module")
def exported_pair(contrast_llama, tmp_path_factory):
    return _export_pair(contrast_llama, tmp_path_factory, "float32")


def _pair_log_ratio(cal, hidden):
    """What contrast fusion reads from the pair: log p_expert − log p_anti over the calibrator vocabulary."""
    expert, anti = (h @ cal.torch_model(w).embed.weight.detach().T for h, w in zip(hidden, ("expert", "anti")))
    return (expert.log_softmax(-1) - anti.log_softmax(-1)).numpy()


def test_pair_graph_gives_the_log_ratio_of_the_two_torch_models(exported_pair):
    cal, runner = exported_pair
    assert runner.gives_log_ratio and runner.models == 2
    torch_pair = cal.torch_runner()
    s_onnx, s_torch = runner.empty_state(), torch_pair.empty_state()
    rng = np.random.default_rng(0)
    for n in (1, 5, 1, 3, 1, 8):
        ids = rng.integers(0, cal.manifest.calibrator.vocab_size, n).tolist()
        got, s_onnx = runner.run(ids, s_onnx)
        hidden, s_torch = torch_pair.run(ids, s_torch)
        assert got.shape == (cal.manifest.calibrator.vocab_size,)
        np.testing.assert_allclose(got, _pair_log_ratio(cal, hidden), atol=1e-4, rtol=1e-4)
        for layer in range(cal.manifest.calibrator.num_layers):  # row 0: the expert's cache, row 1: the anti-expert's
            for row, cache in enumerate(s_torch):
                np.testing.assert_allclose(s_onnx[2 * layer][row], cache[0][layer][0].numpy(), atol=1e-4, rtol=1e-4)
    head = cal.fusion_head(np.zeros((cal.alignment_arrays()["token_map"].shape[0], 4), np.float32))
    np.testing.assert_allclose(head.prepare(hidden.numpy()), got, atol=1e-4, rtol=1e-4)  # the head would compute it


def _optimized_operators(path, tmp_path):
    """The operators ONNX Runtime runs for a graph (after its load-time folding), without the constant Casts."""
    import onnx

    from detox.onnx_calibrator import session_options

    opts = session_options()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    import onnxruntime as ort

    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_export_uses_fused_operators(exported, exported_pair, tmp_path):
    """The step's cost is per operator (it runs on cold caches at every target step): the graph must stay fused, and
    the pair must cost one model's operators plus its log-ratio head, not two models'."""
    for (cal, runner), head_ops in ((exported, 0), (exported_pair, 6)):  # pair: ids offset + 5 for the log-ratio
        ops = _optimized_operators(runner.path, tmp_path)
        layers = cal.manifest.calibrator.num_layers
        assert ops.count("MultiHeadAttention") == ops.count("Gelu") == layers
        assert len(ops) <= 11 * layers + 4 + head_ops, ops


def _graph_of_another_layout(path):
    """A valid ONNX file that is not a calibrator export of this detox's layout (as an older detox wrote them)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["hidden"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "t"])],
                              [helper.make_tensor_value_info("hidden", TensorProto.INT64, [1, "t"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_runner_refuses_a_graph_of_another_layout(tmp_path):
    with pytest.raises(ValueError, match="older detox.*detox artifacts reexport-onnx"):
        OnnxRunner(_graph_of_another_layout(tmp_path / "old.onnx"))


def test_runner_stops_at_the_rotary_table_with_a_clear_error(exported):
    _, runner = exported
    state = runner.empty_state()
    shape = list(state[0].shape)
    shape[2] = runner.max_positions - 1
    full = tuple(np.zeros(shape, np.float32) for _ in state)
    hidden, _ = runner.run([1], full)  # the last position still fits
    assert np.isfinite(hidden).all()
    with pytest.raises(ValueError, match=f"at most {runner.max_positions} tokens"):
        runner.run([1, 2], full)


def test_export_keeps_float16_exact_weights_small(exported):
    _, runner = exported
    import onnx

    model = onnx.load(str(runner.path))
    f16 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert f16, "artifact weights are float16 values: they should be stored as float16"


def test_aligned_artifacts_carry_the_onnx_calibrator(aligned_llama, tmp_path):
    cal = Calibrator.load(aligned_llama)
    assert CALIBRATOR_ONNX in cal.manifest.files
    runner = cal.onnx_runner()
    assert runner is cal.onnx_runner()  # built once
    assert runner.weights_dtype == cal.manifest.alignment.settings["onnx_weights"]  # what alignment asked for
    ids = [cal.manifest.calibrator.bos_token_id, 5, 6, 7]
    h_onnx, _ = runner.run(ids, runner.empty_state())
    with torch.inference_mode():
        h_torch = cal.torch_model()(torch.tensor([ids]))[0][0, -1]
    np.testing.assert_allclose(h_onnx, h_torch.numpy(), atol=1e-4, rtol=1e-4)

    # an aligned artifact written without it (an older detox) is refused with the fix
    m = cal.manifest
    fields = m.model_dump(exclude={"files", "format_version"})
    save_artifact(tmp_path / "old", fields, cal.artifact.calibrator_state, cal.tokenizer, alignment=cal.artifact.alignment)
    with pytest.raises(ArtifactError, match="detox align"):
        Calibrator.load(tmp_path / "old").onnx_runner()


def test_reexport_onnx_brings_an_older_export_up_to_date(aligned_llama, tmp_path):
    """An artifact whose calibrator.onnx this detox refuses is re-exported from its own weights, as a new version."""
    from click.testing import CliRunner

    from detox.cli.main import main

    cal = Calibrator.load(aligned_llama)
    old_graph = _graph_of_another_layout(tmp_path / "old.onnx")
    fields = cal.manifest.model_dump(exclude={"files", "format_version"})
    save_artifact(tmp_path / "older", fields, cal.artifact.calibrator_state, cal.tokenizer,
                  alignment=cal.artifact.alignment, extra_files={CALIBRATOR_ONNX: old_graph})
    with pytest.raises(ValueError, match="reexport-onnx"):
        Calibrator.load(tmp_path / "older").onnx_runner()

    cli = CliRunner()
    done = cli.invoke(main, ["artifacts", "reexport-onnx", str(tmp_path / "older"), "--out", str(tmp_path / "new")])
    assert done.exit_code == 0, done.output
    new = Calibrator.load(tmp_path / "new")
    major, minor, patch = cal.manifest.version.split(".")
    assert new.manifest.version == f"{major}.{minor}.{int(patch) + 1}"
    for name, entry in cal.manifest.files.items():  # the same weights, tokenizer and alignment; only the graph differs
        if name != CALIBRATOR_ONNX:
            assert new.manifest.files[name] == entry
    ids = [cal.manifest.calibrator.bos_token_id, 5, 6]
    h_new, _ = new.onnx_runner().run(ids, new.onnx_runner().empty_state())
    h_ref, _ = cal.onnx_runner().run(ids, cal.onnx_runner().empty_state())  # the fixture's float32 graph
    assert new.onnx_runner().weights_dtype == new.manifest.alignment.settings["onnx_weights"] == "int8"  # the default
    assert 0 < np.abs(h_new - h_ref).max() <= export_tolerance(h_ref, "int8")

    exact = cli.invoke(main, ["artifacts", "reexport-onnx", str(tmp_path / "older"), "--out", str(tmp_path / "f32"),
                              "--onnx-weights", "float32"])
    assert exact.exit_code == 0, exact.output
    f32 = Calibrator.load(tmp_path / "f32")
    assert f32.manifest.alignment.settings["onnx_weights"] == f32.onnx_runner().weights_dtype == "float32"
    h_f32, _ = f32.onnx_runner().run(ids, f32.onnx_runner().empty_state())
    with torch.inference_mode():
        h_torch = cal.torch_model()(torch.tensor([ids]))[0][0, -1].numpy()
    np.testing.assert_allclose(h_f32, h_torch, atol=1e-4, rtol=1e-4)

    same = cli.invoke(main, ["artifacts", "reexport-onnx", str(tmp_path / "new"), "--out", str(tmp_path / "again"),
                             "--version", new.manifest.version])
    assert same.exit_code == 1 and "new version" in same.output and not (tmp_path / "again").exists()


def test_a_contrast_artifact_whose_graph_holds_one_model_is_refused_with_the_fix(contrast_llama, exported, tmp_path):
    """Its anti-expert would be silently ignored on ONNX Runtime and llama.cpp: refused instead, naming the re-export."""
    cal = Calibrator.load(contrast_llama)
    _, single = exported  # a one-model graph of the current layout
    fields = cal.manifest.model_dump(exclude={"files", "format_version"})
    save_artifact(tmp_path / "mixed", fields, cal.artifact.calibrator_state, cal.tokenizer, alignment=cal.artifact.alignment,
                  anti_state=cal.artifact.anti_state, extra_files={CALIBRATOR_ONNX: single.path})
    with pytest.raises(ArtifactError, match="holds one model but the artifact has an anti-expert.*reexport-onnx"):
        Calibrator.load(tmp_path / "mixed").onnx_runner()


@pytest.fixture(scope="module")
def exported_pair_int8(contrast_llama, tmp_path_factory):
    return _export_pair(contrast_llama, tmp_path_factory, "int8")


def test_int8_pair_graph_stays_within_the_export_tolerance_over_an_incremental_run(exported_pair_int8):
    cal, runner = exported_pair_int8
    assert runner.gives_log_ratio and runner.weights_dtype == "int8"
    torch_pair = cal.torch_runner()
    s_onnx, s_torch = runner.empty_state(), torch_pair.empty_state()
    rng = np.random.default_rng(1)
    errors = []
    for n in (1, 5, 1, 3, 1, 8):
        ids = rng.integers(0, cal.manifest.calibrator.vocab_size, n).tolist()
        got, s_onnx = runner.run(ids, s_onnx)
        hidden, s_torch = torch_pair.run(ids, s_torch)
        expected = _pair_log_ratio(cal, hidden)
        errors.append(np.abs(got - expected).max())
        assert errors[-1] <= export_tolerance(expected, "int8")
    assert s_onnx[0].shape[2] == 19
    assert max(errors) > 1e-6  # the weights really are quantized (a float graph is exact to rounding)


def test_int8_graph_runs_every_product_on_8_bit_weights(exported_pair_int8, tmp_path):
    """Every product (4 per layer and the log-ratio head, for each model) reads 8-bit blocks, so a step reads under
    0.3 of the float32 weight bytes (a byte per weight, plus a float32 scale and a zero point per 32); the rest of
    the graph stays fused."""
    import onnx

    cal, runner = exported_pair_int8
    layers = cal.manifest.calibrator.num_layers
    ops = _optimized_operators(runner.path, tmp_path)
    assert "MatMul" not in ops and ops.count("MatMulNBits") == 2 * (4 * layers + 1)
    assert ops.count("MultiHeadAttention") == ops.count("Gelu") == layers

    model = onnx.load(str(runner.path))
    sizes = {i.name: len(i.raw_data) for i in model.graph.initializer}
    products = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    int8_bytes = sum(sizes[name] for n in products for name in n.input[1:])
    shapes = [{a.name: a.i for a in n.attribute} for n in products]
    float_bytes = sum(4 * shape["K"] * shape["N"] for shape in shapes)
    assert int8_bytes < 0.3 * float_bytes


def test_an_unknown_weights_dtype_is_refused_before_anything_is_written(aligned_llama, tmp_path):
    from detox.alignment import reexport_onnx

    with pytest.raises(ValueError, match="onnx_weights must be one of int8, float32, got 'int4'"):
        reexport_onnx(str(aligned_llama), str(tmp_path / "out"), onnx_weights="int4")
    assert not (tmp_path / "out").exists()
