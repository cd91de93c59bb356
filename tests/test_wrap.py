"""``detox.wrap(model)`` with no other argument: the tokenizer found where transformers loaded the model from (a local
directory, the hub cache, a GGUF file), the shipped calibrator picked by fingerprint; and a wrapper that refuses to
be re-wrapped or to have its calibrator swapped behind its back (issue 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import detox
from detox.fingerprint import hf_vocab_tokens

PROMPT = "The weather today is"


def _greedy_ids(model, tok, new=6):
    batch = tok([PROMPT], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0].tolist()


def test_wrap_finds_the_tokenizer_of_a_local_directory(llama_target_dir, aligned_llama, one_torch_thread):
    model = AutoModelForCausalLM.from_pretrained(llama_target_dir).eval()
    wrapped = detox.wrap(model, calibrator=aligned_llama, strength=0.7)
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    assert hf_vocab_tokens(wrapped.tokenizer) == hf_vocab_tokens(tok)
    explicit = detox.wrap(model, calibrator=aligned_llama, strength=0.7, tokenizer=tok)
    assert _greedy_ids(wrapped, tok) == _greedy_ids(explicit, tok)


def test_one_liner_on_the_packaged_smollm2_gguf_loaded_by_plain_transformers():
    """The project's default model through transformers' own GGUF loader: no tokenizer, no calibrator argument."""
    from detox.targets import packaged_smollm2_gguf

    gguf = packaged_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    wrapped = detox.wrap(model)  # the shipped pair, aligned to this exact model
    assert wrapped.calibrator.manifest.name.startswith("smollm2")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert hf_vocab_tokens(wrapped.tokenizer) == hf_vocab_tokens(tok)
    assert len(_greedy_ids(wrapped, tok, new=3)) == len(tok(PROMPT)["input_ids"]) + 3


_HUB_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
import detox
tiny_repo, aligned, gguf_repo, gguf_name = sys.argv[1:5]
out = {}
model = AutoModelForCausalLM.from_pretrained(tiny_repo)
out["tiny_vocab"] = len(detox.wrap(model, calibrator=aligned).tokenizer)
model = AutoModelForCausalLM.from_pretrained(gguf_repo, gguf_file=gguf_name, dtype=torch.float32)
wrapped = detox.wrap(model)
out["gguf_calibrator"] = wrapped.calibrator.manifest.name
out["gguf_vocab"] = len(wrapped.tokenizer)
print(json.dumps(out))
"""


def _fake_hub_repo(hub: Path, repo_id: str, files: dict[str, Path]) -> None:
    """A repository in the hub cache's own layout (what ``from_pretrained(repo_id)`` leaves behind after a download)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        os.symlink(src, snap / name)


def test_one_liner_on_models_loaded_from_the_hub_cache_offline(llama_target_dir, aligned_llama, tmp_path):
    """Hub ids, offline: a repository with tokenizer files, and a GGUF-only repository loaded with gguf_file=."""
    from detox.targets import packaged_smollm2_gguf

    gguf = packaged_smollm2_gguf()
    hub = tmp_path / "hub"
    _fake_hub_repo(hub, "detox-test/tiny-llama", {p.name: p for p in llama_target_dir.iterdir() if p.is_file()})
    _fake_hub_repo(hub, "detox-test/smollm2-gguf", {gguf.name: gguf})
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, "detox-test/tiny-llama", str(aligned_llama),
                          "detox-test/smollm2-gguf", gguf.name], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tiny_vocab"] == len(AutoTokenizer.from_pretrained(llama_target_dir))
    assert got["gguf_calibrator"].startswith("smollm2") and got["gguf_vocab"] == 49152


def _gguf_with_vocab(path: Path, tokens: list[str]) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list(tokens)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_without_a_findable_tokenizer_the_error_says_what_to_pass(llama_target_dir, aligned_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_target_dir).eval()
    bare = tmp_path / "no-tokenizer"
    model.save_pretrained(bare)  # weights and config, no tokenizer files
    model = AutoModelForCausalLM.from_pretrained(bare).eval()
    with pytest.raises(ValueError, match=r"could not find the tokenizer .*detox\.wrap\(model, tokenizer=AutoTokenizer\.from_pretrained\('.*no-tokenizer'\)\)"):
        detox.wrap(model, calibrator=aligned_llama)
    # two GGUF files of this vocabulary size but different vocabularies: which one transformers read is unknown
    n = model.config.vocab_size
    _gguf_with_vocab(bare / "a.gguf", [f"a{i}" for i in range(n)])
    _gguf_with_vocab(bare / "b.gguf", [f"b{i}" for i in range(n)])
    _gguf_with_vocab(bare / "c.gguf", [f"c{i}" for i in range(n - 1)])  # another size: not a candidate
    with pytest.raises(ValueError, match=r"different vocabularies of this size \(a\.gguf, b\.gguf\).*gguf_file=NAME\.gguf"):
        detox.wrap(model, calibrator=aligned_llama)


def test_a_wrapped_model_cannot_be_wrapped_again_or_have_its_calibrator_swapped(llama_target_dir, aligned_llama,
                                                                               contrast_llama):
    tok = AutoTokenizer.from_pretrained(llama_target_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_target_dir).eval()
    wrapped = detox.wrap(model, calibrator=aligned_llama, tokenizer=tok, strength=0.5)
    with pytest.raises(TypeError, match=r"already wrapped by detox .*detox\.wrap\(wrapped\.model, calibrator=\.\.\.\)"):
        detox.wrap(wrapped, calibrator=contrast_llama, tokenizer=tok)
    other = detox.Calibrator.load(contrast_llama)
    for name, value in (("calibrator", other), ("tokenizer", tok), ("model", model)):
        with pytest.raises(AttributeError, match=rf"\.{name} is set when wrapping .*detox\.wrap\(wrapped\.model"):
            setattr(wrapped, name, value)
    assert wrapped.calibrator.path == detox.Calibrator.load(aligned_llama).path
    assert not hasattr(model, "calibrator")  # nothing was set on the inner model
    wrapped.strength = 0.2  # the wrapper's own settings stay settable
    wrapped.detox_test_flag = 3  # and other attributes are the model's
    assert model.detox_test_flag == 3 and wrapped.strength == 0.2
    np.testing.assert_array_equal(wrapped.get_output_embeddings().weight.detach(), model.get_output_embeddings().weight.detach())
