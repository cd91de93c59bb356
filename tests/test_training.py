"""detox train: a tiny calibrator learns, checkpoints, and resumes exactly where a killed run stopped."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from detox.artifacts import load_artifact
from detox.config import CalibratorConfig
from detox.tokenizer import special_id
from detox.training import TrainSettings, pack_documents, train_calibrator

from conftest import SAMPLE_TEXT

TINY = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64)


def _settings(**kw):
    base = dict(max_steps=40, batch_size=8, seq_len=32, checkpoint_every=4, warmup_steps=2, lr=3e-3, model=CalibratorConfig(**TINY))
    base.update(kw)
    return TrainSettings(**base)


def test_pack_documents():
    rows = pack_documents([[1, 2, 3], [4, 5]], eos_id=0, seq_len=4)
    assert rows.tolist() == [[0, 1, 2, 3], [0, 4, 5, 0]]
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([[1]], eos_id=0, seq_len=10)


def test_training_learns_and_writes_a_calibrator(tiny_calibrator):
    art = load_artifact(tiny_calibrator)
    m = art.manifest
    assert m.kind == "calibrator" and m.training.steps == 30 and m.training.num_documents == 400
    assert special_id(art.tokenizer) == m.calibrator.eos_token_id
    # eval loss well below the uniform-guess loss log(V): the model learned something
    assert m.training.metrics["eval_loss"] < np.log(m.calibrator.vocab_size) - 0.5


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_training import _settings
from detox.training import train_calibrator
train_calibrator([{data!r}], {out!r}, _settings(), checkpoint_dir={ckpt!r}, resume=True, progress=False)
"""


def test_killed_run_resumes_to_the_same_weights(tmp_path):

    ref = tmp_path / "ref"
    train_calibrator([SAMPLE_TEXT], ref, _settings(), checkpoint_dir=tmp_path / "ref.ckpt", progress=False)

    out, ckpt = tmp_path / "resumed", tmp_path / "resumed.ckpt"
    code = SCRIPT.format(tests=str(SAMPLE_TEXT.parent.parent), data=str(SAMPLE_TEXT), out=str(out), ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        p = ckpt / "progress.json"
        if p.is_file() and json.loads(p.read_text())["step"] >= 8:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed; the test did not exercise resume"
    stopped_at = json.loads((ckpt / "progress.json").read_text())["step"]
    assert 8 <= stopped_at < 40
    train_calibrator([SAMPLE_TEXT], out, _settings(), checkpoint_dir=ckpt, resume=True, progress=False)
    a, b = load_artifact(ref), load_artifact(out)
    assert b.manifest.training.steps == 40
    for k in a.calibrator_state:
        np.testing.assert_allclose(a.calibrator_state[k], b.calibrator_state[k], atol=2e-3)


def test_a_kill_during_a_checkpoint_save_resumes_from_the_last_complete_one(tmp_path):
    """A half-written state folder (a kill mid-save) must never be the one resume loads."""
    ckpt = tmp_path / "run.ckpt"
    settings = _settings(max_steps=8)
    train_calibrator([SAMPLE_TEXT], tmp_path / "first", settings, checkpoint_dir=ckpt, progress=False)
    info = json.loads((ckpt / "progress.json").read_text())
    assert info["step"] == 4 and (ckpt / info["state"]).is_dir()
    # what a kill half-way through the next save leaves behind: a newer folder with truncated files
    torn = ckpt / "state-8"
    shutil.copytree(ckpt / info["state"], torn)
    for f in torn.iterdir():
        f.write_bytes(f.read_bytes()[:10])
    train_calibrator([SAMPLE_TEXT], tmp_path / "resumed", _settings(), checkpoint_dir=ckpt, resume=True, progress=False)
    assert load_artifact(tmp_path / "resumed").manifest.training.steps == 40


def test_refuses_to_overwrite_and_reports_bad_data(tmp_path, tiny_calibrator):
    with pytest.raises(FileExistsError):
        train_calibrator([SAMPLE_TEXT], tiny_calibrator, _settings())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        train_calibrator([bad], tmp_path / "x", _settings())
    # a bad --name fails before any training (it used to fail when the finished model was saved)
    with pytest.raises(ValueError, match=r"artifact name 'a\+b'"):
        train_calibrator([SAMPLE_TEXT], tmp_path / "y", _settings(), name="a+b")
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.ckpt").exists()
