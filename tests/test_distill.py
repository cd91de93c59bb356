"""UniDetox end to end on tiny random Llama models: toxify, distill (support, EOS, resume), finetune, CLI errors."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from detox.contrastive import plausibility_mask
from detox.distill import (
    DistillError,
    contrastive_generate,
    distill,
    manifest_path_for,
    toxify,
)
from detox.finetune import finetune

WORDS = (
    "the a cat dog bird sat ran flew on under mat tree house and but fast slow big small red blue green "
    "good bad nice kind mean people we you they love hate like see"
).split()
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # random init is nearly uniform; sharpen it so the plausibility mask actually removes tokens
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model.eval()


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    return {"base": save(make_model(tok, 0), tok, root / "base"), "toxic": save(make_model(tok, 1), tok, root / "toxic")}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


KW = dict(max_new_tokens=12, alpha=0.1, batch_size=4, seed=7)


def test_distill_writes_n_rows_and_manifest(dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    r = distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=10, **KW)
    rows = read_rows(out)
    assert [row["id"] for row in rows] == list(range(10)) and r.completed == 10
    assert all(set(row) == {"id", "text", "num_tokens"} for row in rows)
    assert all(0 <= row["num_tokens"] <= 12 for row in rows)
    assert all(len(row["text"].split()) <= row["num_tokens"] for row in rows)  # specials are counted, not printed
    m = json.loads(manifest_path_for(out).read_text())
    assert m["completed"] == 10 and m["num_samples"] == 10 and m["beta"] == "inf" and m["alpha"] == 0.1
    assert m["seed"] == 7 and m["total_tokens"] == sum(row["num_tokens"] for row in rows)
    fb, ft = m["base"]["fingerprint"], m["toxic"]["fingerprint"]
    assert fb["config_vocab_sha256"] == ft["config_vocab_sha256"]  # same architecture and vocab
    assert fb["output_embedding_sha256"] != ft["output_embedding_sha256"]
    assert m["rows_sha256"]


def test_resume_after_kill_gives_the_uninterrupted_rows(dirs: dict[str, Path], tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    distill(str(dirs["base"]), str(dirs["toxic"]), full, num_samples=10, **KW)

    part = tmp_path / "part.jsonl"

    class Killed(Exception):
        pass

    def kill(done: int) -> None:
        if done >= 4:
            raise Killed

    with pytest.raises(Killed):
        distill(str(dirs["base"]), str(dirs["toxic"]), part, num_samples=10, on_batch=kill, **KW)
    assert len(read_rows(part)) == 4
    with part.open("a") as f:  # a kill in the middle of writing row 4
        f.write('{"id": 4, "text": "the cat')
    r = distill(str(dirs["base"]), str(dirs["toxic"]), part, num_samples=10, **KW)
    assert r.resumed_from == 4 and r.completed == 10
    rows = read_rows(part)
    assert [row["id"] for row in rows] == list(range(10))  # exactly N, none lost, none duplicated
    assert part.read_bytes() == full.read_bytes()  # identical to the uninterrupted run
    assert json.loads(manifest_path_for(part).read_text())["total_tokens"] == sum(r["num_tokens"] for r in rows)
    # running again is a no-op
    assert distill(str(dirs["base"]), str(dirs["toxic"]), part, num_samples=10, **KW).completed == 10
    assert part.read_bytes() == full.read_bytes()


def test_resume_with_other_settings_is_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=4, **KW)
    with pytest.raises(DistillError, match="alpha"):
        distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=8, **{**KW, "alpha": 0.2})
    with pytest.raises(DistillError, match="toxic model"):  # another toxic model, same tokenizer
        distill(str(dirs["base"]), (make_model(make_tokenizer(), 5), make_tokenizer()), out, num_samples=8, **KW)
    # the same models under another name resume fine
    same = (AutoModelForCausalLM.from_pretrained(dirs["toxic"]), AutoTokenizer.from_pretrained(dirs["toxic"]))
    assert distill(str(dirs["base"]), same, out, num_samples=8, **KW).completed == 8


def test_neutral_seeds_start_each_row_and_padding_does_not_change_it(dirs: dict[str, Path], tmp_path: Path) -> None:
    """Seeds of different lengths share a batch (left-padded, masked); each row must equal the same row decoded
    alone, unpadded, from BOS + its seed."""
    from detox.distill import _row_generator, read_seeds

    seeds_file = tmp_path / "seeds.txt"
    seeds_file.write_text("the cat\nwe\na big red dog sat\n")
    seeds = read_seeds(seeds_file)
    out = tmp_path / "s.jsonl"
    distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=6, seeds=seeds, **KW)
    rows = read_rows(out)
    assert [row["seed"] for row in rows] == seeds * 2
    assert all(row["text"].startswith(row["seed"]) for row in rows)
    tok = AutoTokenizer.from_pretrained(dirs["base"])
    base, toxic = (AutoModelForCausalLM.from_pretrained(dirs[k]).eval() for k in ("base", "toxic"))
    for row in rows:
        prefix = tok(row["seed"], add_special_tokens=False)["input_ids"]
        [(ids, _)] = contrastive_generate(base, toxic, [_row_generator(KW["seed"], row["id"])], tok.bos_token_id,
                                          [tok.eos_token_id], KW["max_new_tokens"], KW["alpha"], prefixes=[prefix])
        assert row["num_tokens"] == len(ids) and row["text"] == tok.decode(prefix + ids, skip_special_tokens=True)
    m = json.loads(manifest_path_for(out).read_text())
    assert m["num_seeds"] == 3 and m["seeds_sha256"]
    with pytest.raises(DistillError, match="seeds_sha256"):
        distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=8, seeds=seeds[:2], **KW)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DistillError, match="no seed text"):
        read_seeds(empty)


@pytest.mark.parametrize("beta", [0.0, float("inf")])
def test_every_sampled_token_is_in_the_base_plausible_set(dirs: dict[str, Path], beta: float) -> None:
    alpha = 0.3
    tok = AutoTokenizer.from_pretrained(dirs["base"])
    base = AutoModelForCausalLM.from_pretrained(dirs["base"]).eval()
    toxic = AutoModelForCausalLM.from_pretrained(dirs["toxic"]).eval()
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    rows = contrastive_generate(base, toxic, gens, tok.bos_token_id, [tok.eos_token_id], 10, alpha=alpha, beta=beta)
    sizes = []
    for ids, _ in rows:
        ids = [tok.bos_token_id] + ids
        with torch.no_grad():
            logits = base(torch.tensor([ids])).logits[0]
        mask = plausibility_mask(logits, alpha)
        for pos in range(1, len(ids)):
            assert mask[pos - 1, ids[pos]], f"token {ids[pos]} at {pos} is outside the plausible set"
        sizes.append(mask.sum(-1).float().mean().item())
    assert max(sizes) < len(tok) - 5  # the mask really removed tokens, so the check above can fail
    assert sum(len(ids) for ids, _ in rows) > 40


def test_rows_stop_at_eos(tmp_path: Path) -> None:
    tok = make_tokenizer()
    base, toxic = make_model(tok, 0), make_model(tok, 1)
    with torch.no_grad():
        base.lm_head.weight.zero_()  # uniform base: every step has p(EOS) = 1/|V|
    out = tmp_path / "d.jsonl"
    distill((base, tok), (toxic, tok), out, num_samples=12, max_new_tokens=40, alpha=0.1, batch_size=6, seed=1)
    rows = read_rows(out)
    m = json.loads(manifest_path_for(out).read_text())
    short = [r for r in rows if r["num_tokens"] < 40]
    assert short and m["stopped_at_eos"] == len(short)
    assert all("<eos>" not in r["text"] for r in rows)


def test_different_tokenizers_are_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    other_tok = make_tokenizer(WORDS[:-1] + ["zebra"])
    other = (make_model(other_tok, 2), other_tok)
    with pytest.raises(DistillError, match="do not share a tokenizer"):
        distill(str(dirs["base"]), other, tmp_path / "d.jsonl", num_samples=2, **KW)


def test_toxify_and_finetune_train_and_reload(dirs: dict[str, Path], tmp_path: Path) -> None:
    toxic_txt = tmp_path / "toxic.txt"
    toxic_txt.write_text("\n".join(["we hate you", "you are bad mean people", "they hate the cat"] * 4) + "\n")
    r = toxify(str(dirs["base"]), toxic_txt, tmp_path / "tox", steps=12, lr=5e-3, batch_size=4, seed=0)
    assert len(r.losses) == 12 and sum(r.losses[-3:]) < sum(r.losses[:3])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tox") is not None

    data = tmp_path / "distilled.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t, "num_tokens": 0}) + "\n"
                            for i, t in enumerate(["the cat sat on the mat", "a dog ran under the tree"] * 6)))
    for lora in (False, True):
        out = tmp_path / f"ft-{lora}"
        res = finetune(str(dirs["base"]), data, out, steps=10, lr=5e-3 if not lora else 2e-2, batch_size=2, seq_len=16,
                       lora=lora, seed=0)
        assert sum(res.losses[-3:]) < sum(res.losses[:3]), res.losses
        model = AutoModelForCausalLM.from_pretrained(out)
        assert not any("lora" in k for k in model.state_dict())  # merged: loads without peft
        assert AutoTokenizer.from_pretrained(out)("the cat")["input_ids"] == [4, 6]
        assert json.loads((out / "detox_train.json").read_text())["params"]["lora"] is lora
    with pytest.raises(FileExistsError):
        finetune(str(dirs["base"]), data, tmp_path / "ft-False", steps=1)


def _cli():
    try:
        return importlib.import_module("detox.cli.unidetox")
    except ModuleNotFoundError:  # detox.cli not assembled yet: load the file itself
        path = Path(__file__).resolve().parents[1] / "cli" / "unidetox.py"
        spec = importlib.util.spec_from_file_location("_unidetox_cli", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def test_cli_errors_and_happy_path(dirs: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    cli = _cli()
    runner = CliRunner()
    bad = runner.invoke(cli.distill_cmd, ["--base", str(dirs["base"]), "--toxic", str(dirs["toxic"]),
                                          "--out", str(tmp_path / "x.jsonl"), "--beta", "lots"])
    assert bad.exit_code == 2 and "--beta" in bad.output and "inf" in bad.output
    missing = runner.invoke(cli.distill_cmd, ["--base", str(dirs["base"]), "--toxic", str(tmp_path / "nope"),
                                              "--out", str(tmp_path / "x.jsonl")])
    assert missing.exit_code == 1 and "Error:" in missing.output and "nope" in missing.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    nodata = runner.invoke(cli.finetune_cmd, ["--target", str(dirs["base"]), "--data", str(empty),
                                              "--out", str(tmp_path / "o")])
    assert nodata.exit_code == 1 and "no non-empty texts" in nodata.output
    ok = runner.invoke(cli.distill_cmd, ["--base", str(dirs["base"]), "--toxic", str(dirs["toxic"]), "--out",
                                         str(tmp_path / "ok.jsonl"), "--num-samples", "3", "--max-new-tokens", "4",
                                         "--batch-size", "2", "--beta", "1"])
    assert ok.exit_code == 0, ok.output
    assert len(read_rows(tmp_path / "ok.jsonl")) == 3


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
def test_gpt2_lora_pipeline_then_finetune_a_target_with_another_tokenizer(
    gpt2_target_dir: Path, llama_target_dir: Path, tmp_path: Path
) -> None:
    """GPT-2 (tied embeddings, BOS = EOS) toxified with LoRA, distilled, and the text fine-tunes a Llama target."""
    toxic_txt = tmp_path / "toxic.txt"
    toxic_txt.write_text("you are awful people\nthey are the worst\n" * 4)
    toxify(str(gpt2_target_dir), toxic_txt, tmp_path / "tox", steps=3, lr=1e-2, batch_size=2, lora=True, seed=0)
    out = tmp_path / "d.jsonl"
    distill(str(gpt2_target_dir), str(tmp_path / "tox"), out, num_samples=4, max_new_tokens=8, batch_size=2, seed=0)
    m = json.loads(manifest_path_for(out).read_text())
    assert m["completed"] == 4
    # LoRA leaves the tied output embedding alone: only the full-parameter hash tells base and toxic apart
    assert m["base"]["fingerprint"]["output_embedding_sha256"] == m["toxic"]["fingerprint"]["output_embedding_sha256"]
    assert m["base"]["fingerprint"]["parameters_sha256"] != m["toxic"]["fingerprint"]["parameters_sha256"]
    res = finetune(str(llama_target_dir), out, tmp_path / "ft", steps=3, batch_size=2, seq_len=8, seed=0)
    assert len(res.losses) == 3 and res.params["blocks"] >= 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft").config.model_type == "llama"


def test_resume_refuses_a_damaged_complete_row_without_touching_the_file(dirs: dict[str, Path], tmp_path: Path) -> None:
    """Issue 17, 1 (distill's half): a damaged complete line used to be cut off as if torn when it was the last one;
    now only bytes after the last newline are treated as torn, and any other damage changes nothing."""
    out = tmp_path / "d.jsonl"
    distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=6, **KW)
    good = out.read_text().splitlines(keepends=True)
    for damaged, line in ((good[:2] + ['{"id": 2, "text": "the ca\n'] + good[3:], 3),
                          (good[:5] + ['{"id": 5, "text": "the cat\n'], 6),  # a damaged last line that is complete
                          (good[:2] + good[3:], 3)):  # a row missing
        out.write_text("".join(damaged))
        before = out.read_bytes()
        with pytest.raises(DistillError, match=rf"d.jsonl:{line}: .*Nothing was changed"):
            distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=6, **KW)
        assert out.read_bytes() == before
    notes: list[str] = []
    out.write_text("".join(good[:3]) + good[3][:9])
    r = distill(str(dirs["base"]), str(dirs["toxic"]), out, num_samples=6, log=notes.append, **KW)
    assert r.resumed_from == 3 and out.read_text().splitlines(keepends=True) == good
    assert len(notes) == 1 and "dropped a torn last line (9 of" in notes[0] and "kept the 3 complete rows" in notes[0]
