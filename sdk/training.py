"""``detox train``: train the calibration model (tokenizer + LM) on non-toxic text.

Runs on CPU as is and on several GPUs/nodes through ``accelerate launch`` with no code change. Checkpoints
hold the tokenizer, step and accelerate state, so ``resume=True`` continues an interrupted run exactly
where it stopped (same data order, same RNG).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

import detox
from detox.artifacts.cache import load_artifact
from detox.artifacts.manifest import Manifest, check_name_version
from detox.artifacts.store import save_artifact
from detox.calibrator import CalibratorConfig, CalibratorLM
from detox.data import read_texts, sha256_files, write_text_atomic
from detox.tokenizer import special_id, train_tokenizer


@dataclass
class TrainSettings:
    """Hyper-parameters of ``detox train``; CPU-friendly defaults for the shipped calibrator."""

    epochs: float = 3.0
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_fraction: float = 0.02
    checkpoint_every: int = 200
    max_steps: int | None = None
    model: CalibratorConfig = field(default_factory=CalibratorConfig)


def pack_documents(docs_ids: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by EOS) and cut into rows of ``seq_len`` tokens."""
    flat: list[int] = [eos_id]
    for ids in docs_ids:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"training text has only {len(flat)} tokens; need at least seq_len={seq_len}")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_calibrator(
    data_paths: list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: TrainSettings | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    name: str = "calibrator",
    version: str = "0.1.0",
    field_name: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    init_from: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Train a tokenizer and a :class:`CalibratorLM` on ``data_paths`` and save a calibrator artifact.

    ``init_from``: an existing calibrator artifact to continue training from (its tokenizer, architecture and
    weights are kept; ``settings.model`` is ignored). This is how an anti-expert is made: the expert
    fine-tuned on toxic text, so both share a tokenizer and stay close in representation.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_name_version(name, version)
    s = settings or TrainSettings()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass another --out or --overwrite")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out_dir.with_name(out_dir.name + ".ckpt")
    accelerator = Accelerator()
    set_seed(s.seed)

    texts = [text for p in data_paths for text in read_texts(p, field_name)]
    if not texts:
        raise ValueError("no training text found in " + ", ".join(map(str, data_paths)))
    state_file = ckpt / "progress.json"
    init = None
    if init_from is not None:
        init = load_artifact(init_from)
        tokenizer = init.tokenizer
        s = replace(s, model=init.manifest.calibrator)
    elif resume and state_file.is_file():
        tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    else:
        if resume:
            accelerator.print(f"no checkpoint in {ckpt}; starting from scratch")
        tokenizer = train_tokenizer(texts, vocab_size=s.model.vocab_size)
    eos = special_id(tokenizer)
    cfg = s.model.model_copy(update={
        "vocab_size": tokenizer.get_vocab_size(), "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
    })

    rng = random.Random(s.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    n_eval = max(1, int(len(texts) * s.eval_fraction)) if len(texts) > 20 else 0
    eval_docs = [texts[i] for i in order[:n_eval]]
    train_docs = [texts[i] for i in order[n_eval:]]
    encode = lambda docs: [e.ids for e in tokenizer.encode_batch(docs)]  # noqa: E731
    rows = pack_documents(encode(train_docs), eos, s.seq_len)
    eval_rows = pack_documents(encode(eval_docs), eos, min(s.seq_len, 32)) if eval_docs else None

    model = CalibratorLM(cfg)
    if init is not None:
        model.load_state_dict({k: torch.from_numpy(v.astype("float32")) for k, v in init.calibrator_state.items()})
    steps_per_epoch = math.ceil(len(rows) / s.batch_size)
    total = s.max_steps or max(1, int(s.epochs * steps_per_epoch))
    optim = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda st: _lr_lambda(st, s.warmup_steps, total))
    model, optim, sched = accelerator.prepare(model, optim, sched)

    step = 0
    if resume and state_file.is_file():
        progress_info = json.loads(state_file.read_text())
        accelerator.load_state(str(ckpt / progress_info.get("state", "state")))
        step = progress_info["step"]
        accelerator.print(f"resumed from {ckpt} at step {step}/{total}")

    def batches_from(start: int):
        """Deterministic batch stream: epoch e uses permutation seed+e; skip straight to ``start``."""
        epoch, idx = divmod(start, steps_per_epoch)
        while True:
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(s.seed + epoch))
            for i in range(idx, steps_per_epoch):
                yield rows[perm[i * s.batch_size : (i + 1) * s.batch_size]]
            epoch, idx = epoch + 1, 0

    def save_checkpoint() -> None:
        """Crash-safe: write the state into a fresh folder, then point progress.json at it, then drop older ones.

        A run killed mid-save leaves progress.json naming the previous complete state, never a half-written one.
        """
        ckpt.mkdir(parents=True, exist_ok=True)
        state_name = f"state-{step}"
        accelerator.save_state(str(ckpt / state_name))
        if accelerator.is_main_process:
            if not (ckpt / "tokenizer.json").is_file():
                write_text_atomic(ckpt / "tokenizer.json", tokenizer.to_str(pretty=True))
            write_text_atomic(state_file, json.dumps({"step": step, "total": total, "state": state_name}))
            for old in ckpt.glob("state*"):
                if old.is_dir() and old.name != state_name:
                    shutil.rmtree(old, ignore_errors=True)

    model.train()
    bar = tqdm(total=total, initial=step, desc="train calibrator", disable=not progress or not accelerator.is_main_process)
    loss_ema = None
    stream = batches_from(step)
    while step < total:
        batch = next(stream).to(accelerator.device)
        loss = _lm_loss(model, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        if s.checkpoint_every and step % s.checkpoint_every == 0 and step < total:
            save_checkpoint()
    bar.close()

    unwrapped = accelerator.unwrap_model(model)
    metrics: dict[str, float] = {"train_loss": float(loss_ema or 0.0)}
    if eval_rows is not None and len(eval_rows):
        unwrapped.eval()
        with torch.no_grad():
            losses = [_lm_loss(unwrapped, eval_rows[i : i + 32]).item() for i in range(0, len(eval_rows), 32)]
        metrics["eval_loss"] = float(sum(losses) / max(1, len(losses)))
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    manifest = None
    if accelerator.is_main_process:
        manifest = save_artifact(
            out_dir,
            {
                "kind": "calibrator",
                "name": name,
                "version": version,
                "detox_version": detox.__version__,
                "description": f"calibrator trained on {', '.join(Path(p).name for p in data_paths)}"
                + (f", starting from {init.manifest.name}@{init.manifest.version}" if init is not None else ""),
                "calibrator": cfg,
                "training": {
                    "data_sha256": sha256_files(data_paths),
                    "data_files": [Path(p).name for p in data_paths],
                    "num_documents": len(texts),
                    "num_tokens": int(rows.numel()),
                    "steps": step,
                    "seed": s.seed,
                    "metrics": metrics,
                },
            },
            {k: v.cpu() for k, v in unwrapped.state_dict().items()},
            tokenizer,
            overwrite=overwrite,
        )
    accelerator.wait_for_everyone()
    return manifest  # type: ignore[return-value]


def _lm_loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """LM loss through the (possibly DDP-wrapped) forward, so gradients are all-reduced across processes."""
    hidden, _ = model(batch)
    core = model.module if hasattr(model, "module") else model
    logits = core.logits(hidden[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
