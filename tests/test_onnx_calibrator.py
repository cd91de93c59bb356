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


def _int8_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ONNX Runtime's int8 ``MatMulNBits`` kernels (``accuracy_level=4``, every x86 path: AVX2, AVX2-VNNI,
    AVX-512, AVX-512 VNNI) hand it to the integer dot products: each block of ``QUANT_BLOCK`` inputs rounded (half
    to even) to int8 steps of ``max|x_block| / 127``."""
    from detox.onnx_calibrator import QUANT_BLOCK

    k = x.shape[-1]
    blocks = torch.nn.functional.pad(x, (0, -k % QUANT_BLOCK)).reshape(*x.shape[:-1], -1, QUANT_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse).clamp(-127, 127) * (amax / 127)).reshape(*x.shape[:-1], -1)[..., :k]


def _pair_as_the_int8_graph_holds_it(cal, int8_activations: bool):
    """The expert/anti-expert pair with the int8 graph's own weights: each product's weight quantized exactly as the
    export quantizes it (RMSNorm scales folded in first, as the graph folds them) and dequantized, so float math on
    them differs from the graph only by how its kernels treat the activations. With ``int8_activations`` every
    product's input is also rounded as ONNX Runtime's int8 kernels round it (:func:`_int8_activations`); without,
    it is what a float kernel computes (ONNX Runtime's fallback where a build has no int8 kernel).

    Returns a function ``(ids, state) -> (log-ratio [vocab], state)``."""
    import copy

    from detox.onnx_calibrator import QUANT_BLOCK
    from test_quantization import dequantize

    from detox.quantization import quantize_blockwise

    def round_trip(weight: torch.Tensor) -> torch.Tensor:  # [in, out] through the export's int8 blocks
        return torch.from_numpy(dequantize(quantize_blockwise(weight.numpy(), QUANT_BLOCK)))

    models, heads = [], []
    for which in ("expert", "anti"):
        model = copy.deepcopy(cal.torch_model(which))
        with torch.no_grad():
            for block in model.blocks:
                for linear, norm in ((block.qkv, block.attn_norm), (block.out, None), (block.up, block.mlp_norm),
                                     (block.down, None)):
                    weight = linear.weight.detach().T.float()
                    if norm is not None:
                        weight = weight * norm.weight[:, None]
                        norm.weight.fill_(1.0)
                    linear.weight.copy_(round_trip(weight).T)
                    if int8_activations:
                        linear.register_forward_pre_hook(lambda module, args: (_int8_activations(args[0]),))
        models.append(model)
        heads.append(round_trip(model.embed.weight.detach().T.float()).T)  # the log-ratio head's int8 table; ids stay float

    runners = [TorchRunner(m) for m in models]

    def run(ids, state):
        logp, new_state = [], []
        for one, head, s in zip(runners, heads, state):
            h, s = one.run(ids, s)
            h = _int8_activations(h) if int8_activations else h
            logp.append((h @ head.T).log_softmax(-1))
            new_state.append(s)
        return (logp[0] - logp[1]).numpy(), tuple(new_state)

    return run, tuple(one.empty_state() for one in runners)


def test_int8_pair_graph_computes_its_quantized_weights_over_an_incremental_run(exported_pair_int8):
    """The int8 graph against float math on the very weights it holds, so that only the kernels' treatment of the
    activations is left: every x86 kernel of ONNX Runtime either keeps them float (a build without int8 kernels:
    the graph must match the float reference at float rounding, 1e-3) or rounds them to int8 per block (AVX2 and up:
    it must match the int8 reference). Against the int8 reference a few roundings may still go the other way: the
    graph's inputs to a product differ from torch's in the last bits, so a value within that of a rounding tie can
    land on the other int8 step. Each such flip moves one activation by one step, a small part of the whole
    rounding effect ``spread`` (the two references' difference, which sums up to half a step over every
    activation): allowed, a quarter of it.

    (It used to be compared with the unquantized torch pair at 5 % of the output's magnitude, which mixed the
    weights' rounding with the activations' and depended on the CPU: error 0.18 > 0.07 on an AVX-512 VNNI machine.)
    """
    cal, runner = exported_pair_int8
    assert runner.gives_log_ratio and runner.weights_dtype == "int8"
    references = {name: _pair_as_the_int8_graph_holds_it(cal, int8) for name, int8 in (("float", False), ("int8", True))}
    states = {name: state for name, (_, state) in references.items()}
    unquantized = cal.torch_runner()
    s_onnx, s_torch = runner.empty_state(), unquantized.empty_state()
    rng = np.random.default_rng(1)
    errors: dict[str, list[float]] = {name: [] for name in references}
    spreads = []
    for n in (1, 5, 1, 3, 1, 8):
        ids = rng.integers(0, cal.manifest.calibrator.vocab_size, n).tolist()
        got, s_onnx = runner.run(ids, s_onnx)
        expected = {}
        for name, (run, _) in references.items():
            expected[name], states[name] = run(ids, states[name])
            errors[name].append(float(np.abs(got - expected[name]).max()))
        spreads.append(float(np.abs(expected["int8"] - expected["float"]).max()))
        hidden, s_torch = unquantized.run(ids, s_torch)
        assert np.abs(got - _pair_log_ratio(cal, hidden)).max() > 1e-6  # the weights really are quantized
    assert s_onnx[0].shape[2] == 19
    float_kernel = all(e <= 1e-3 for e in errors["float"])
    int8_kernel = all(e <= 1e-3 + 0.25 * spread for e, spread in zip(errors["int8"], spreads))
    assert float_kernel or int8_kernel, (errors, spreads)


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
    from detox.artifact_onnx import reexport_onnx

    with pytest.raises(ValueError, match="onnx_weights must be one of int8, float32, got 'int4'"):
        reexport_onnx(str(aligned_llama), str(tmp_path / "out"), onnx_weights="int4")
    assert not (tmp_path / "out").exists()
