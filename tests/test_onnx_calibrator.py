"""The ONNX export of the calibrator computes what the torch module computes, and aligned artifacts carry it."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")  # the export (detox align) needs it
pytest.importorskip("onnxruntime")

from detox.artifacts import ArtifactError, save_artifact  # noqa: E402
from detox.artifacts.manifest import CALIBRATOR_ONNX  # noqa: E402
from detox.onnx_calibrator import OnnxRunner, export_calibrator_onnx  # noqa: E402
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
        np.testing.assert_allclose(s_onnx[0], s_torch[0].numpy(), atol=1e-4, rtol=1e-4)
    assert s_onnx[0].shape[3] == 20


def test_stream_on_onnx_matches_stream_on_torch(exported):
    cal, onnx_runner = exported
    text = "The weather  today is lovely, isn't it? We walked 12 km along the river"
    a, b = cal.stream(onnx_runner), cal.stream()
    for c in list(range(1, len(text) + 1, 4)) + [len(text)]:
        np.testing.assert_allclose(a.hidden_for(text[:c]), b.hidden_for(text[:c]).numpy(), atol=1e-4, rtol=1e-4)
    assert a.tokens_run == b.tokens_run


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
