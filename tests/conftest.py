"""Shared fixtures: a tiny trained calibrator and tiny random targets of two architectures/tokenizers.

Everything is built locally from configs; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_TEXT = FIXTURES / "nontoxic_sample.txt"
# the aligned fixtures' calibrator.onnx keeps float32 weights, so the fusion-rule tests compare every backend with a
# float reference at 1e-4; the int8 default is tested on its own (test_onnx_calibrator.py, test_cli.py)
EXACT = "float32"


def _train_target_tokenizer(kind: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = SAMPLE_TEXT.read_text().splitlines()
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # sentencepiece-like: ▁ marks a leading space
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    specials = ["<|endoftext|>", "<unk>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   model_input_names=["input_ids", "attention_mask"])


def _build_target(kind: str, out: Path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0 if kind == "llama" else 1)
    if kind == "llama":
        tok = _train_target_tokenizer("bytelevel", 600)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        tok = _train_target_tokenizer("metaspace", 500)
        cfg = GPT2Config(vocab_size=len(tok), n_embd=40, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = GPT2LMHeadModel(cfg)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: on a shared 2-core machine thread synchronisation costs ~20x more than the arithmetic."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def llama_target_dir(tmp_path_factory) -> Path:
    return _build_target("llama", tmp_path_factory.mktemp("llama_target"))


@pytest.fixture(scope="session")
def gpt2_target_dir(tmp_path_factory) -> Path:
    return _build_target("gpt2", tmp_path_factory.mktemp("gpt2_target"))


@pytest.fixture(scope="session")
def tiny_calibrator(tmp_path_factory) -> Path:
    """A calibrator artifact trained for a few steps on the fixture text (seconds on CPU)."""
    from detox.config import CalibratorConfig
    from detox.training import TrainSettings, train_calibrator

    out = tmp_path_factory.mktemp("cal") / "tiny-cal"
    settings = TrainSettings(max_steps=30, batch_size=8, seq_len=32, checkpoint_every=0, warmup_steps=2, lr=5e-3,
                             model=CalibratorConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64))
    train_calibrator([SAMPLE_TEXT], out, settings, name="tiny-cal", version="0.1.0", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_anti(tiny_calibrator, tmp_path_factory) -> Path:
    """An anti-expert made the way users make one: the tiny calibrator trained further (``init_from``)."""
    from detox.training import TrainSettings, train_calibrator

    out = tmp_path_factory.mktemp("anti") / "tiny-anti"
    settings = TrainSettings(max_steps=10, batch_size=8, seq_len=32, checkpoint_every=0, warmup_steps=1, lr=1e-2, seed=1)
    train_calibrator([SAMPLE_TEXT], out, settings, name="tiny-anti", version="0.1.0", progress=False, init_from=tiny_calibrator)
    return out


@pytest.fixture(scope="session")
def contrast_llama(tiny_calibrator, tiny_anti, llama_target_dir, tmp_path_factory) -> Path:
    """The tiny expert/anti-expert pair aligned to the tiny llama target (contrast fusion)."""
    from detox.alignment import AlignSettings, align_artifact
    from detox.methods.contrast import ContrastConfig

    out = tmp_path_factory.mktemp("aligned") / "tiny-llama-contrast"
    s = AlignSettings(ContrastConfig(top_k=20, plausibility=0.001), onnx_weights=EXACT)
    align_artifact(str(tiny_calibrator), str(llama_target_dir), str(out), settings=s,
                   progress=False, log=lambda m: None, anti_expert=str(tiny_anti))
    return out


@pytest.fixture(scope="session")
def aligned_llama(tiny_calibrator, llama_target_dir, tmp_path_factory) -> Path:
    from detox.alignment import AlignSettings, align_artifact
    from detox.methods.interpolate import InterpolateConfig

    out = tmp_path_factory.mktemp("aligned") / "tiny-llama"
    s = AlignSettings(InterpolateConfig(vocab_epochs=2, context_epochs=1, max_context_docs=60, default_strength=0.4),
                      onnx_weights=EXACT)
    align_artifact(str(tiny_calibrator), str(llama_target_dir), str(out), data=[str(SAMPLE_TEXT)], settings=s,
                   progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def aligned_gpt2(tiny_calibrator, gpt2_target_dir, tmp_path_factory) -> Path:
    from detox.alignment import AlignSettings, align_artifact
    from detox.methods.interpolate import InterpolateConfig

    out = tmp_path_factory.mktemp("aligned") / "tiny-gpt2"
    s = AlignSettings(InterpolateConfig(vocab_epochs=2, context_epochs=1, max_context_docs=60, default_strength=0.4),
                      onnx_weights=EXACT)
    align_artifact(str(tiny_calibrator), str(gpt2_target_dir), str(out), data=[str(SAMPLE_TEXT)], settings=s,
                   progress=False, log=lambda m: None)
    return out


@pytest.fixture
def fusion_threads(monkeypatch) -> list[str]:
    """Names of the threads that run the transformers processor's calibrator work, one entry per call (shows whether
    the fusion really ran on the ``detox-fusion`` worker)."""
    import threading

    from detox.engine import FusionEngine

    threads: list[str] = []
    original = FusionEngine.terms

    def spy(self, input_ids):
        threads.append(threading.current_thread().name)
        return original(self, input_ids)

    monkeypatch.setattr(FusionEngine, "terms", spy)
    return threads
