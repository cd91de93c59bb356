"""Fine-tune any causal LM on (distilled) text: UniDetox's second step, plus the training loop ``toxify`` reuses.

The defaults are UniDetox's one setting for every target (docs/unidetox.md) except ``steps``: 3000 steps of 8 x 256
tokens is days on a 2-core CPU. The data is *text*, tokenized with the target's own tokenizer, so a corpus distilled
from one model family fine-tunes another.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from detox.data import read_texts, sha256_files
from detox.targets import load_hf_target
from detox.unidetox_defaults import DEFAULT_STEPS, PAPER_BATCH_SIZE, PAPER_LR, PAPER_SEQ_LEN

TRAIN_INFO_FILE = "detox_train.json"


@dataclass
class TrainResult:
    """What a training run did; saved as ``detox_train.json`` next to the weights."""

    out_dir: str
    steps: int
    losses: list[float] = dc_field(default_factory=list)
    seconds: float = 0.0
    params: dict[str, Any] = dc_field(default_factory=dict)


def pack_texts(texts: Sequence[str], tokenizer: Any, seq_len: int, end_id: int | None) -> list[list[int]]:
    """Tokenize documents with the tokenizer's own special tokens, join them with ``end_id``, cut into ``seq_len`` blocks.

    The last partial block is kept only when it is the only one (tiny corpora still train).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2; got {seq_len}")
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        stream.extend(ids)
        if end_id is not None and (not ids or ids[-1] != end_id):
            stream.append(end_id)
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    if len(blocks) > 1 and len(blocks[-1]) < seq_len:
        blocks.pop()
    return [b for b in blocks if len(b) >= 2]


def pad_collate(pad_id: int) -> Callable[[list[list[int]]], dict[str, torch.Tensor]]:
    """Right-pad a batch of id lists; padding gets attention 0 and label -100 (no loss on padding)."""

    def collate(batch: list[list[int]]) -> dict[str, torch.Tensor]:
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x, dtype=torch.long) for x in batch], batch_first=True,
                                              padding_value=pad_id)
        attn = (torch.arange(ids.shape[1]) < torch.tensor([len(x) for x in batch])[:, None]).long()
        return {"input_ids": ids, "attention_mask": attn, "labels": ids.masked_fill(attn == 0, -100)}

    return collate


def train_causal_lm(
    model: Any,
    examples: list[list[int]],
    *,
    pad_id: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    lora: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    desc: str = "train",
) -> tuple[Any, list[float]]:
    """Train ``model`` on token-id examples for ``steps`` optimizer steps; return (trained model, losses).

    AdamW with linear decay to 0 and no warm-up (HF Trainer's defaults, as UniDetox used). Runs through
    ``accelerate`` so ``accelerate launch`` spreads it over GPUs; the returned model is unwrapped and, with
    ``lora=True``, has its LoRA weights merged (a plain model that loads without peft).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if not examples:
        raise ValueError("no training examples (is the data file empty?)")
    set_seed(seed)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    accelerator = Accelerator()
    loader = torch.utils.data.DataLoader(
        examples, batch_size=batch_size, shuffle=True, collate_fn=pad_collate(pad_id),
        generator=torch.Generator().manual_seed(seed), drop_last=len(examples) >= batch_size,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    losses: list[float] = []
    bar = tqdm(total=steps, desc=desc, disable=not accelerator.is_local_main_process)
    step = 0
    while step < steps:
        seen = 0
        for batch in loader:
            seen += 1
            out = model(**batch)
            accelerator.backward(out.loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(out.loss.detach())
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower the learning rate")
            losses.append(loss)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step >= steps:
                break
        if seen == 0:
            raise ValueError(f"{len(examples)} examples give no batch on this process; lower --batch-size")
    bar.close()
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if lora:
        model = model.merge_and_unload()
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    return model, losses


def check_out_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse to silently replace a model (hours of CPU) unless asked to."""
    if (Path(out_dir) / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a model; choose another output dir or pass --overwrite")


def read_training_texts(path: str | os.PathLike[str], field: str | None, max_docs: int | None) -> list[str]:
    """The first ``max_docs`` (all if None) documents :func:`detox.data.read_texts` finds in ``path``; an error
    naming the file when there are none."""
    texts = read_texts(path, field=field)[:max_docs]
    if not texts:
        raise ValueError(f"{path} has no non-empty texts to train on")
    return texts


def train_and_save(
    model: Any, tokenizer: Any, examples: list[list[int]], out_dir: str | os.PathLike[str], *, kind: str,
    pad_id: int, steps: int, lr: float, batch_size: int, seed: int, lora: bool, lora_r: int, lora_alpha: int,
    params: dict[str, Any],
) -> TrainResult:
    """The steps ``finetune`` and ``toxify`` share once they have their examples: train (LoRA merged), record the
    settings (``params`` plus the training ones) in ``detox_train.json``, save the model."""
    from accelerate import PartialState

    start = time.time()
    model, losses = train_causal_lm(
        model, examples, pad_id=pad_id, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
        lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, desc=kind,
    )
    result = TrainResult(
        out_dir=str(out_dir), steps=steps, losses=losses, seconds=round(time.time() - start, 1),
        params={"kind": f"detox.{kind}", **params, "lr": lr, "batch_size": batch_size, "lora": lora,
                "lora_r": lora_r if lora else None, "lora_alpha": lora_alpha if lora else None, "seed": seed},
    )
    if PartialState().is_main_process:  # a loadable HF model dir: safetensors, tokenizer, detox_train.json
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / TRAIN_INFO_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return result


def finetune(
    target_spec: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    steps: int = DEFAULT_STEPS,
    lr: float = PAPER_LR,
    batch_size: int = PAPER_BATCH_SIZE,
    seq_len: int = PAPER_SEQ_LEN,
    lora: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    seed: int = 1234,
    field: str | None = None,
    max_docs: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune ``target_spec`` (HF dir, .gguf, ``smollm2``, hub id) on the texts of ``data_path`` and save it.

    ``data_path`` is anything :func:`detox.data.read_texts` reads (the distilled JSONL's ``text`` field, a CSV with
    ``Text`` such as UniDetox's released set, or plain text). Returns the losses and where the model went.
    """
    check_out_dir(out_dir, overwrite)
    texts = read_training_texts(data_path, field, max_docs)
    model, tokenizer = load_hf_target(target_spec)
    # a document ends at the generation config's EOS (what generate stops at), else the tokenizer's: they disagree
    # for GGUF-derived tokenizers (SmolLM2: tokenizer EOS = <|im_start|>, generation EOS = <|im_end|>)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    blocks = pack_texts(texts, tokenizer, seq_len, eos if eos is not None else tokenizer.eos_token_id)
    if not blocks:
        raise ValueError(f"{data_path}: the texts tokenize to fewer than 2 tokens; nothing to train on")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return train_and_save(
        model, tokenizer, blocks, out_dir, kind="finetune", pad_id=pad_id, steps=steps, lr=lr,
        batch_size=batch_size, seed=seed, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        params={"target": str(target_spec), "data": str(data_path), "data_sha256": sha256_files([data_path]),
                "documents": len(texts), "blocks": len(blocks), "seq_len": seq_len},
    )
