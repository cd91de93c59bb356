"""The fusion-method registry (detox.methods): unknown names are refused clearly, and each method's defaults and
strength range come from its config alone (the CLI, the manifest, the heads and check_strength read them there)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from detox.artifacts.manifest import AlignmentInfo, Manifest
from detox.cli.core import align_cmd
from detox.cli.main import main
from detox.methods import METHODS, get_method
from detox.methods.contrast import ContrastConfig, ContrastHead
from detox.methods.interpolate import InterpolateConfig
from detox.runtime import Calibrator


def test_the_registry_names_the_shipped_methods_and_refuses_an_unknown_one():
    assert set(METHODS) == {"interpolate", "contrast"}
    assert all(get_method(name).name == name for name in METHODS)
    with pytest.raises(ValueError, match=r"unknown fusion method 'sparse'; this detox knows 'interpolate', 'contrast'"):
        get_method("sparse")


def test_a_manifest_with_an_unknown_fusion_method_is_refused(aligned_llama):
    raw = json.loads((aligned_llama / "manifest.json").read_text())
    Manifest.model_validate(raw)
    raw["alignment"]["fusion"] = "sparse"
    with pytest.raises(ValueError, match="unknown fusion method 'sparse'"):
        Manifest.model_validate(raw)


@pytest.mark.parametrize("name", ["interpolate", "contrast"])
def test_align_options_take_their_defaults_from_the_method_config(name):
    method = get_method(name)
    defaults = method.config()
    params = {p.name: p for p in align_cmd.params}
    for opt in method.cli_options:
        if not opt.files:
            assert params[opt.name].default == getattr(defaults, opt.name), opt.flags
    strength = next(p for p in align_cmd.params if p.name == "strength")
    assert strength.default is None and f"{defaults.default_strength:g} {name}" in strength.help


def test_strength_ranges_come_from_the_method_config():
    for method in METHODS.values():
        top = method.config.max_strength
        assert method.config.check_strength(top) == top
        with pytest.raises(ValueError, match=rf"{method.name} fusion must be in \[0, {top:g}\]"):
            method.config.check_strength(top + 0.5)
        with pytest.raises(ValueError, match=rf"default_strength: .*\[0, {top:g}\]"):
            method.config.parse({"default_strength": top + 0.5})
    assert (InterpolateConfig.max_strength, ContrastConfig.max_strength) == (1.0, 20.0)


def test_contrast_defaults_live_in_its_config():
    """The manifest's format-1 fields and a head built without settings use ContrastConfig's defaults."""
    defaults = ContrastConfig()
    for field in ("top_k", "plausibility", "suppress_only"):
        assert AlignmentInfo.model_fields[field].default == getattr(defaults, field)
    assert ContrastHead(np.zeros(3, np.int64), np.zeros((3, 2)), np.zeros((3, 2))).config == defaults
    with pytest.raises(ValueError, match="contrast fusion setting top_k: Input should be greater than or equal to 1"):
        ContrastConfig.parse({"top_k": 0})


def test_an_artifact_gives_back_the_config_it_was_aligned_with(aligned_llama, contrast_llama):
    """What align_artifact wrote (conftest: top_k 20 for the pair; default_strength 0.4, 2 vocab epochs for the
    interpolate map) is what the head is built with."""
    pair = Calibrator.load(contrast_llama)
    assert pair.manifest.alignment.fusion_config() == ContrastConfig(top_k=20)
    head = pair.fusion_head(np.zeros((pair.alignment_arrays()["token_map"].shape[0], 4), np.float32))
    assert isinstance(head, ContrastHead) and head.config.top_k == 20
    single = Calibrator.load(aligned_llama)
    config = single.manifest.alignment.fusion_config()
    assert isinstance(config, InterpolateConfig)
    assert (config.default_strength, config.vocab_epochs, config.context_epochs) == (0.4, 2, 1)


def test_align_fusion_must_fit_the_anti_expert(tmp_path, llama_target_dir, tiny_calibrator, tiny_anti):
    """--fusion chooses the method; one that needs an anti-expert without one (or the reverse) is refused before
    the target is read, and nothing is written."""
    base = ["align", "--target", str(llama_target_dir), "--calibrator", str(tiny_calibrator), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, base + ["--fusion", "contrast"])
    assert r.exit_code == 1 and "contrast fusion needs an anti-expert: pass --anti-expert" in r.output, r.output
    r = CliRunner().invoke(main, base + ["--fusion", "interpolate", "--anti-expert", str(tiny_anti)])
    assert r.exit_code == 1 and "interpolate fusion uses no anti-expert" in r.output, r.output
    r = CliRunner().invoke(main, base + ["--fusion", "sparse"])
    assert r.exit_code == 2 and "'sparse' is not one of 'contrast', 'interpolate'" in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_method_options_are_unique_across_methods():
    """`detox align` shows every method's options at once: two methods declaring one option would clash."""
    names = [o.name for m in METHODS.values() for o in m.cli_options]
    flags = [f for m in METHODS.values() for o in m.cli_options for f in o.flags.split("/")]
    assert len(names) == len(set(names)) and len(flags) == len(set(flags))


def test_each_method_names_the_alignment_arrays_it_needs(aligned_llama, contrast_llama):
    """The store checks alignment.safetensors' header against the artifact's method before reading any array."""
    from detox.artifacts.store import ArtifactError, _check_alignment_shapes, safetensors_shapes

    shapes, manifests = {}, {}
    for art in (aligned_llama, contrast_llama):
        manifests[art] = Calibrator.load(art).manifest
        shapes[art] = safetensors_shapes(art / "alignment.safetensors")
        _check_alignment_shapes(shapes[art], manifests[art], "here")  # as align_artifact wrote them
    d_cal, d_tgt = shapes[aligned_llama]["A"]
    m = manifests[aligned_llama]
    with pytest.raises(ArtifactError, match=rf"here: A is \[{d_tgt}, {d_cal}\], but .* need \[{d_cal}, {d_tgt}\]; re-run"):
        _check_alignment_shapes({**shapes[aligned_llama], "A": (d_tgt, d_cal)}, m, "here")
    with pytest.raises(ArtifactError, match="here: has no 'ln_bias' tensor, which interpolate fusion needs"):
        _check_alignment_shapes({k: v for k, v in shapes[aligned_llama].items() if k != "ln_bias"}, m, "here")
    with pytest.raises(ArtifactError, match="here: has no 'token_map' tensor, which contrast fusion needs"):
        _check_alignment_shapes(shapes[aligned_llama], manifests[contrast_llama], "here")
    v = manifests[contrast_llama].alignment.target.vocab_size
    with pytest.raises(ArtifactError, match=rf"token_map is \[{v + 1}\], but the target has {v} tokens"):
        _check_alignment_shapes({"token_map": (v + 1,)}, manifests[contrast_llama], "here")
    with pytest.raises(ArtifactError, match=rf"token_scale is \[{v - 1}\], but token_map is \[{v}\]"):
        _check_alignment_shapes({"token_map": (v,), "token_scale": (v - 1,)}, manifests[contrast_llama], "here")


def test_token_scale_outside_zero_one_is_refused_at_load(contrast_llama):
    from detox.artifacts.store import ArtifactError, _check_token_map

    m = Calibrator.load(contrast_llama).manifest
    tm = np.zeros(4, np.int64)
    _check_token_map({"token_map": tm, "token_scale": np.array([0, 0.5, 1, 1], np.float32)}, m, "here")
    for bad in ([0, 1.5, 1, 1], [0, float("nan"), 1, 1], [-0.1, 1, 1, 1]):
        with pytest.raises(ArtifactError, match="here: token_scale holds values outside"):
            _check_token_map({"token_map": tm, "token_scale": np.array(bad, np.float32)}, m, "here")
