"""Artifacts round-trip, and anything tampered, malformed or misplaced is refused before use."""

import json
import shutil

import numpy as np
import pytest

from detox.artifacts import ArtifactError, load_artifact, read_manifest
from detox.artifacts.manifest import FORMAT_VERSION
from detox.runtime import Calibrator


@pytest.fixture
def copy_of(tmp_path, aligned_llama):
    dst = tmp_path / "art"
    shutil.copytree(aligned_llama, dst)
    return dst


def test_round_trip(aligned_llama, tmp_path):
    art = load_artifact(aligned_llama)
    m = art.manifest
    assert m.kind == "aligned" and m.format_version == FORMAT_VERSION
    assert set(m.files) == {"calibrator.safetensors", "tokenizer.json", "alignment.safetensors", "calibrator.onnx"}
    assert m.alignment.target.vocab_size > 0 and len(m.training.data_sha256) == 64
    # re-save what was loaded and load again: identical tensors and manifest content
    from detox.artifacts import save_artifact

    fields = m.model_dump(exclude={"files", "format_version"})
    save_artifact(tmp_path / "again", fields, art.calibrator_state, art.tokenizer, alignment=art.alignment)
    again = load_artifact(tmp_path / "again")
    for k, v in art.calibrator_state.items():
        np.testing.assert_array_equal(again.calibrator_state[k], v)
    for k, v in art.alignment.items():
        np.testing.assert_array_equal(again.alignment[k], v)
    assert again.manifest.model_dump(exclude={"files"}) == m.model_dump(exclude={"files"})
    # the loaded calibrator runs
    cal = Calibrator.load(tmp_path / "again")
    assert cal.stream().hidden_for("hello world").shape == (m.calibrator.hidden_size,)


def test_tampered_weights_are_refused(copy_of):
    p = copy_of / "alignment.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="alignment.safetensors.*sha256"):
        load_artifact(copy_of)


@pytest.mark.parametrize("field,value,match", [
    ("version", "1.2", "semantic versioning"),
    ("kind", "mystery", "kind"),
    ("name", "Bad Name!", "name"),
    ("format_version", FORMAT_VERSION + 1, "newer than this detox supports"),
    ("format_version", 0, "old artifact format"),
])
def test_manifest_with_a_wrong_field_is_refused(copy_of, field, value, match):
    mpath = copy_of / "manifest.json"
    raw = json.loads(mpath.read_text())
    raw[field] = value
    mpath.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=match):
        load_artifact(copy_of)


def test_unknown_manifest_keys_are_refused(copy_of):
    mpath = copy_of / "manifest.json"
    raw = json.loads(mpath.read_text())
    raw["alignment"]["target"]["surprise"] = 1
    mpath.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="surprise"):
        read_manifest(copy_of)


def test_missing_and_extra_files_are_refused(copy_of, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(copy_of, other)
    (copy_of / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(copy_of)
    (other / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ArtifactError, match="unexpected"):
        load_artifact(other)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        load_artifact(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="manifest.json"):
        load_artifact(tmp_path)


def test_interrupted_write_leaves_nothing_visible(aligned_llama, tmp_path, monkeypatch):
    from detox.artifacts import save_artifact, store

    art = load_artifact(aligned_llama)
    fields = art.manifest.model_dump(exclude={"files", "format_version"})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "sha256_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(tmp_path / "out", fields, art.calibrator_state, art.tokenizer, alignment=art.alignment)
    assert list(tmp_path.iterdir()) == []
