"""``detox align`` without loading the target: streamed fingerprints equal the old whole-matrix ones, a GGUF's
vocabulary comes from its metadata, damaged GGUF files give one line, and unmappable targets are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from detox.fingerprint import MatrixHasher, fingerprint_files, fingerprint_gguf, fingerprint_hf, hash_matrix, \
    make_fingerprint
from detox.gguf_reader import GGUFError, read_gguf
from detox.targets import TargetNotFoundError, load_hf_target, locate_target, packaged_smollm2_gguf

SHIPPED = Path(__file__).resolve().parents[1] / "artifacts" / "shipped" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        return packaged_smollm2_gguf()
    except TargetNotFoundError as err:
        pytest.skip(str(err))


def _whole_matrix_fingerprint(path: Path):
    """What detox computed before streaming: gguf's GGUFReader, the whole tensor de-quantized at once, one hash."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    weight = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    return make_fingerprint(tokens, weight, path.name), tokens, weight


def test_matrix_hash_is_the_same_for_any_chunking():
    w = np.random.default_rng(0).standard_normal((37, 11)).astype(np.float32)
    whole = hash_matrix(w)
    for step in (1, 5, 36, 37):
        h = MatrixHasher(w.shape)
        for i in range(0, len(w), step):
            h.update(w[i : i + step])
        assert h.hexdigest() == whole
    assert hash_matrix(w + np.float32(1e-2)) != whole
    h = MatrixHasher(w.shape)
    h.update(w[:10])
    with pytest.raises(ValueError, match="10 of 37 rows"):
        h.hexdigest()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN scales (random bytes), in worker threads
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K", "Q6_K", "IQ4_XS"])
def test_row_chunks_are_bit_identical_to_the_whole_tensor_for_every_storage_type(qtype, tmp_path):
    """Any bytes are a valid quantized tensor, so random bytes exercise every de-quantizer (NaNs included) on a
    vocabulary of odd size read in ragged chunks; compared bit for bit with gguf's reader de-quantizing it whole."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    qt = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[qt]
    vocab, hidden = 1003, 512
    raw = np.random.default_rng(1).integers(0, 256, (vocab, hidden // block * size), dtype=np.uint8)
    data = {"F32": raw.view(np.float32), "F16": raw.view(np.float16)}.get(qtype, raw)
    tokens = [f"\u0120t{i}" if i % 7 else f"<c{i}>" for i in range(vocab)] + ["é 日本"]
    path = tmp_path / f"{qtype}.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_token_list(tokens)
    w.add_token_types([3 if i % 7 == 0 else 1 for i in range(len(tokens))])
    w.add_tensor("output.weight", data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = GGUFReader(str(path)).tensors[0]
    with np.errstate(all="ignore"):
        whole = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(vocab, hidden)
        gguf = read_gguf(path)
        chunks = list(gguf.output_rows(chunk_elements=100 * hidden + 7))
        streamed = fingerprint_gguf(path)
    assert [len(c) for c in chunks] == [100] * 10 + [3]
    assert np.array_equal(np.concatenate(chunks).view(np.uint32), whole.view(np.uint32))
    assert gguf.tokens() == tokens and gguf.control_tokens() == {t for t in tokens if t.startswith("<c")}
    with np.errstate(all="ignore"):
        assert streamed == make_fingerprint(tokens, whole, path.name)


def test_streamed_gguf_fingerprint_equals_the_whole_matrix_one_and_the_shipped_artifacts(smollm2_gguf):
    reference, tokens, weight = _whole_matrix_fingerprint(smollm2_gguf)
    streamed = fingerprint_gguf(smollm2_gguf)
    assert streamed == reference
    shipped = json.loads((SHIPPED / "manifest.json").read_text())["alignment"]["target"]
    assert streamed.model_dump() == shipped  # the shipped artifact still binds to the packaged SmolLM2
    gguf = read_gguf(smollm2_gguf)
    assert gguf.tokens() == tokens
    chunks = list(gguf.output_rows(chunk_elements=1000 * weight.shape[1]))  # 1000-row chunks, a ragged last one
    assert len(chunks) == -(-weight.shape[0] // 1000)
    assert np.array_equal(np.concatenate(chunks), weight)


def test_gguf_vocabulary_gives_the_shipped_token_map_with_control_tokens_unmapped(smollm2_gguf):
    """The contrast token map built from the GGUF's metadata equals the shipped artifact's, and every CONTROL token of
    the GGUF is special, so unmapped. 3.1.0's map came from transformers' GGUF tokenizer, which marks only
    <|im_start|> and <|endoftext|> special, and sent <|im_end|> (the model's end-of-turn token) and 14 other control
    tokens to the calibrator's "<"; 3.2.0 was aligned from the GGUF's metadata."""
    from detox.token_map import build_token_map
    from detox.runtime import Calibrator

    shipped = Calibrator.load(SHIPPED)
    files = locate_target(smollm2_gguf)
    tokens, special = files.vocabulary()
    token_map, _ = build_token_map(shipped.tokenizer, tokens, special)
    assert np.array_equal(token_map, shipped.alignment_arrays()["token_map"])
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= special and len(special) == 17
    assert (token_map[[tokens.index(t) for t in special]] == -1).all()
    assert (token_map >= 0).sum() > 0.99 * len(tokens)  # everything else reads as calibrator text


def _untied_sharded_bf16_target(out: Path) -> Path:
    """A target whose head is its own tensor (``lm_head.weight``), stored bfloat16 across several safetensors shards."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("kind", ["llama_tied", "gpt2_tied", "untied_sharded_bf16"])
def test_streamed_hf_fingerprint_equals_the_loaded_models(kind, llama_target_dir, gpt2_target_dir, tmp_path):
    from transformers import AutoTokenizer

    if kind == "untied_sharded_bf16":
        target = _untied_sharded_bf16_target(tmp_path / "untied")
        AutoTokenizer.from_pretrained(llama_target_dir).save_pretrained(target)  # 600 tokens; head has 300 rows
    else:
        target = llama_target_dir if kind == "llama_tied" else gpt2_target_dir
    model, tokenizer = load_hf_target(target)
    files = locate_target(str(target))
    streamed, W = fingerprint_files(files, keep_output=True)
    assert streamed == fingerprint_hf(model, tokenizer, name=str(target))
    assert np.array_equal(W, model.get_output_embeddings().weight.detach().numpy())


REALIGN = """
import sys
from detox.alignment import AlignSettings, align_artifact
m = align_artifact(sys.argv[1], sys.argv[2], sys.argv[3], settings=AlignSettings(onnx_weights="float32"),
                   progress=False, log=lambda m: None)
print("IMPORTED", sorted(k for k in ("torch", "transformers") if k in sys.modules), m.alignment.mapped_share)
"""


def test_realigning_a_pair_to_a_gguf_imports_neither_torch_nor_transformers(contrast_llama, smollm2_gguf, tmp_path):
    """Re-aligning a contrast artifact (what ``detox align --target X`` does with the shipped pair) reads the GGUF's
    metadata and output tensor and keeps the pair's graph: transformers (which would load the model) and torch are
    never even imported, and the artifact is bound to the GGUF's fingerprint."""
    out = tmp_path / "aligned"
    r = subprocess.run([sys.executable, "-c", REALIGN, str(contrast_llama), str(smollm2_gguf), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("IMPORTED")][0]
    assert line.startswith("IMPORTED []"), line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["alignment"]["target"] == fingerprint_gguf(smollm2_gguf).model_dump()
    assert 0.9 < manifest["alignment"]["mapped_share"] <= 1.0


def test_realigning_keeps_the_graph_it_would_export_and_exports_another_weight_type(contrast_llama, gpt2_target_dir,
                                                                                   tmp_path, monkeypatch):
    import detox.onnx_calibrator
    from detox.alignment import AlignSettings, align_artifact
    from detox.runtime import Calibrator

    def refuse(*a, **k):
        raise AssertionError("the graph was exported again")

    src = Calibrator.load(contrast_llama).manifest.files["calibrator.onnx"]
    with monkeypatch.context() as m:
        m.setattr(detox.onnx_calibrator, "export_calibrator_onnx", refuse)
        kept = align_artifact(str(contrast_llama), str(gpt2_target_dir), str(tmp_path / "kept"), progress=False,
                              settings=AlignSettings(onnx_weights="float32"), log=lambda m: None)
    assert kept.files["calibrator.onnx"] == src
    other = align_artifact(str(contrast_llama), str(gpt2_target_dir), str(tmp_path / "int8"), progress=False,
                           settings=AlignSettings(onnx_weights="int8"), log=lambda m: None)
    assert other.files["calibrator.onnx"].sha256 != src.sha256
    assert Calibrator.load(tmp_path / "int8").onnx_runner().weights_dtype == "int8"


def test_align_to_a_hf_directory_never_loads_its_weights(tiny_calibrator, tiny_anti, llama_target_dir, tmp_path,
                                                         monkeypatch):
    import transformers

    from detox.alignment import AlignSettings, align_artifact

    def refuse(*a, **k):
        raise AssertionError("the target model was loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    m = align_artifact(str(tiny_calibrator), str(llama_target_dir), str(tmp_path / "a"),
                       settings=AlignSettings(onnx_weights="float32"), anti_expert=str(tiny_anti), progress=False,
                       log=lambda m: None)
    monkeypatch.undo()
    model, tokenizer = load_hf_target(llama_target_dir)
    assert m.alignment.target == fingerprint_hf(model, tokenizer, name=str(llama_target_dir))


# ---------------------------------------------------------------------------------------------------------------
# Damaged GGUF files: one line naming the file, non-zero exit, no traceback (issue 17, item 5).


def _damaged(tmp_path: Path, smollm2_gguf: Path) -> dict[str, Path]:
    head = smollm2_gguf.read_bytes()[: 2 * 1024 * 1024]
    cases = {
        "40 bytes": head[:40],
        "2 MB": head,
        "empty": b"",
        "not gguf": b"PK\x03\x04" + head[4:4096],
        "version 9": head[:4] + (9).to_bytes(4, "little") + head[8:4096],
        "absurd tensor count": head[:8] + (2**62).to_bytes(8, "little") + head[16:4096],
        "absurd string length": head[:24] + (2**62).to_bytes(8, "little") + head[32:4096],
    }
    out = {}
    for name, data in cases.items():
        out[name] = tmp_path / f"{name.replace(' ', '_')}.gguf"
        out[name].write_bytes(data)
    return out


def test_damaged_gguf_headers_raise_one_gguf_error_naming_the_file(smollm2_gguf, tmp_path):
    for name, path in _damaged(tmp_path, smollm2_gguf).items():
        with pytest.raises(GGUFError) as err:
            read_gguf(path)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg, (name, msg)
    assert "truncated" in str(pytest.raises(GGUFError, read_gguf, tmp_path / "2_MB.gguf").value)


@pytest.mark.parametrize("argv", [["generate", "--target", "{f}", "Hi"],
                                  ["generate", "--backend", "llamacpp", "--target", "{f}", "Hi"],
                                  ["align", "--target", "{f}", "--out", "{out}"],
                                  ["artifacts", "verify", "{cal}", "--target", "{f}"]])
@pytest.mark.parametrize("size", [40, 2 * 1024 * 1024])
def test_cli_on_a_truncated_gguf_prints_one_line(argv, size, smollm2_gguf, tiny_calibrator, tmp_path):
    from detox.cli.main import main

    if "llamacpp" in argv:
        pytest.importorskip("llama_cpp")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(smollm2_gguf.read_bytes()[:size])
    args = [a.format(f=trunc, out=tmp_path / "out", cal=tiny_calibrator) for a in argv]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and not isinstance(r.exception, (IndexError, AttributeError)), r.output
    assert "Traceback" not in r.output and str(trunc) in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# A target the calibrator cannot read is refused; a lowered minimum is recorded and warned about (issue 17, item 6).


def _placeholder_target(out: Path, readable: int, placeholders: int) -> Path:
    """A HF target whose vocabulary is ``readable`` words and ``placeholders`` tokens with no text (``<x17>``)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(set((Path(__file__).parent / "fixtures" / "nontoxic_sample.txt").read_text().split()))[:readable]
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    for i in range(placeholders):
        vocab[f"<x{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def test_unmappable_target_is_refused_and_nothing_is_written(tiny_calibrator, tiny_anti, tmp_path):
    from detox.cli.main import main

    target = _placeholder_target(tmp_path / "t", readable=0, placeholders=300)
    for extra in (["--anti-expert", str(tiny_anti)], ["--method", "vocab"]):
        out = tmp_path / f"out{len(extra)}"
        r = CliRunner().invoke(main, ["align", "--target", str(target), "--calibrator", str(tiny_calibrator),
                                      "--out", str(out), *extra])
        assert r.exit_code == 1, r.output
        assert "0.0% of the 301 tokens" in r.output and "--min-mapped-share" in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
        assert not out.exists()


def test_lowered_minimum_is_recorded_and_wrap_warns(tiny_calibrator, tiny_anti, tmp_path):
    import detox
    from detox.cli.main import main

    target = _placeholder_target(tmp_path / "t", readable=90, placeholders=210)
    out = tmp_path / "out"
    args = ["align", "--target", str(target), "--calibrator", str(tiny_calibrator), "--anti-expert", str(tiny_anti),
            "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 1 and not out.exists()
    r = CliRunner().invoke(main, [*args, "--min-mapped-share", "0.2"])
    assert r.exit_code == 0, r.output
    share = json.loads((out / "manifest.json").read_text())["alignment"]["mapped_share"]
    assert share == pytest.approx(90 / 301)
    model, tokenizer = load_hf_target(target)
    with pytest.warns(UserWarning, match=r"reads only 29\.9% of this target's vocabulary"):
        detox.wrap(model, calibrator=str(out), tokenizer=tokenizer)


def test_a_well_mapped_artifact_wraps_without_a_warning(contrast_llama, llama_target_dir):
    import detox

    model, tokenizer = load_hf_target(llama_target_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        detox.wrap(model, calibrator=str(contrast_llama), tokenizer=tokenizer)
    al = detox.Calibrator.load(contrast_llama).manifest.alignment  # 600 tokens, 128 of them single non-ASCII bytes
    assert al.mapped_share == pytest.approx(1 - al.metrics["token_map_unmapped"]) and 0.5 < al.mapped_share < 0.9


HUB = """
import sys
from detox.fingerprint import fingerprint_target
print("FP", fingerprint_target(sys.argv[1]).model_dump_json())
"""


def test_a_hub_id_is_read_from_its_cached_snapshot(llama_target_dir, tmp_path):
    """A hub id resolves to its snapshot in the local cache (offline here) and fingerprints like the directory."""
    import shutil

    snapshot = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(llama_target_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", HUB, "someorg/tiny"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("FP ", 1)[1])
    want = fingerprint_files(locate_target(str(llama_target_dir)))[0].model_dump()
    assert {k: v for k, v in got.items() if k != "name"} == {k: v for k, v in want.items() if k != "name"}
    assert got["name"] == "someorg/tiny"
    r = subprocess.run([sys.executable, "-c", HUB, "someorg/absent"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "could not find target 'someorg/absent'" in r.stderr
