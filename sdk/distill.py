"""UniDetox's first step: make a toxic copy of a base LM, then distil detoxifying text by contrastive decoding.

``toxify`` fine-tunes a copy of the base model on toxic text; ``distill`` samples rows from BOS (or neutral seeds) by
:func:`detox.contrastive.contrastive_logits` with both models' KV caches and appends them to a JSONL with a manifest.
Row ``i`` draws from its own RNG seeded from ``(seed, i)`` and always runs in the same batch, so a run killed and
restarted writes exactly the rows of an uninterrupted one. Paper settings and CPU defaults: docs/unidetox.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch

from detox.contrastive import contrastive_logits, sample
from detox.data import (DataFormatError, append_rows, drop_torn_tail, read_json_file, read_resumable_rows,
                        read_texts, sha256_file, sha256_files, write_text_atomic)
from detox.faults import fault_point
from detox.fingerprint import model_fingerprint
from detox.finetune import TrainResult, check_out_dir, read_training_texts, train_and_save
from detox.targets import load_hf_target, stop_token_ids
from detox.unidetox_defaults import (
    DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_DISTILL_BATCH_SIZE, DEFAULT_TOXIFY_MAX_LENGTH, DEFAULT_TOXIFY_STEPS,
    PAPER_MAX_NEW_TOKENS, PAPER_NUM_SAMPLES, PAPER_TOXIC_BATCH_SIZE, PAPER_TOXIC_LR,
)

MANIFEST_FORMAT = "detox.distill/1"
# Settings that change which rows a run writes: a resumed run must match them.
_RESUME_KEYS = ("alpha", "beta", "seed", "temperature", "top_p", "max_new_tokens", "batch_size",
                "start_token_id", "stop_token_ids", "seeds_sha256")

ModelSpec = Union[str, os.PathLike, tuple]


class DistillError(ValueError):
    """Distillation cannot start or resume; the message says what to change."""


# ---------------------------------------------------------------- models and tokens


def _load(spec: ModelSpec) -> tuple[Any, Any, str]:
    """Accept a spec for :func:`detox.targets.load_hf_target` or an already loaded ``(model, tokenizer)`` pair."""
    if isinstance(spec, tuple):
        model, tokenizer = spec
        return model, tokenizer, str(getattr(model, "name_or_path", "") or "<in-memory model>")
    model, tokenizer = load_hf_target(spec)
    return model, tokenizer, str(spec)


def start_token_id(tokenizer: Any) -> int:
    """UniDetox starts every sample from BOS (GPT-2: its EOS, which doubles as BOS)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise DistillError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    return int(tid)


# ---------------------------------------------------------------- toxify


def toxify(
    base_spec: str | os.PathLike[str],
    toxic_data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    steps: int | None = DEFAULT_TOXIFY_STEPS,
    epochs: float | None = None,
    lr: float = PAPER_TOXIC_LR,
    batch_size: int = PAPER_TOXIC_BATCH_SIZE,
    max_length: int = DEFAULT_TOXIFY_MAX_LENGTH,
    lora: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    seed: int = 123,
    field: str | None = None,
    max_docs: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune a copy of ``base_spec`` on toxic text and save it (merged if LoRA) as a HF dir with safetensors.

    Each line becomes one example ``[BOS] + tokens`` (at most ``max_length`` tokens): the toxic model learns
    toxic text *after BOS*, exactly the context distillation starts from. ``epochs`` (the paper's unit), when
    given, overrides ``steps``. The base model on disk is never modified.
    """
    check_out_dir(out_dir, overwrite)
    texts = read_training_texts(toxic_data, field, max_docs)
    if max_length < 2:
        raise DistillError(f"max_length must be >= 2; got {max_length}")
    model, tokenizer, spec = _load(base_spec)
    start = start_token_id(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batch call: the same ids per text
    examples = [[start] + ids[: max_length - 1] for ids in encoded if ids]
    if epochs is not None:
        steps = max(1, math.ceil(epochs * math.ceil(len(examples) / batch_size)))
    if steps is None:
        raise DistillError("pass steps or epochs")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    return train_and_save(
        model, tokenizer, examples, out_dir, kind="toxify", pad_id=pad_id, steps=steps, lr=lr,
        batch_size=batch_size, seed=seed, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
        params={"base": spec, "data": str(toxic_data), "data_sha256": sha256_files([toxic_data]),
                "documents": len(examples), "max_length": max_length, "epochs": epochs, "start_token_id": start},
    )


# ---------------------------------------------------------------- distill


@dataclass
class DistillResult:
    out_path: Path
    manifest_path: Path
    completed: int  # rows in the file now
    resumed_from: int  # rows that were already there
    seconds: float


def manifest_path_for(out_jsonl: str | os.PathLike[str]) -> Path:
    """``x/name.jsonl`` -> ``x/name.manifest.json``."""
    p = Path(out_jsonl)
    return p.with_name(p.stem + ".manifest.json")


def _expected_row(i: int, row: dict) -> str | None:
    """The check of :func:`detox.data.read_resumable_rows` for a distill output: row ``i`` has id ``i``, a text and a
    token count (whether its settings match is the manifest's check)."""
    if row.get("id") != i or isinstance(row.get("id"), bool):
        return f"expected row id {i} here"
    n = row.get("num_tokens")
    if not isinstance(row.get("text"), str) or isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return "not a distill row (a string 'text' and an integer 'num_tokens')"
    return None


def _row_generator(seed: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"detox.distill:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def contrastive_generate(
    base: Any, toxic: Any, generators: list[torch.Generator], start_id: int, stops: set[int] | list[int],
    max_new_tokens: int, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, temperature: float = 1.0,
    top_p: float | None = None, vocab: int | None = None, prefixes: list[list[int]] | None = None,
) -> list[tuple[list[int], bool]]:
    """Sample one row per generator from ``start_id`` with both models' KV caches, one token per step.

    ``prefixes``: per row, token ids fed after ``start_id`` before sampling (neutral seeds); rows of different
    lengths are left-padded and masked. Returns per row (new token ids, without the stop token; whether it stopped
    at a stop token). Rows that stop are dropped from both caches so the rest run on a smaller batch. ``vocab``
    cuts padded logit columns.
    """
    batch = len(generators)
    stops = set(stops)
    models = [(base, next(base.parameters()).device), (toxic, next(toxic.parameters()).device)]
    device = models[0][1]
    rows_in = [[start_id] + list(prefixes[r] if prefixes else []) for r in range(batch)]
    width = max(len(r) for r in rows_in)
    tokens = torch.tensor([[start_id] * (width - len(r)) + r for r in rows_in], dtype=torch.long, device=device)
    # only padded batches carry a mask and positions: an unpadded batch runs exactly as it always did
    mask = None
    if any(len(r) < width for r in rows_in):
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows_in], dtype=torch.long, device=device)
    outs = [m(input_ids=tokens.to(d), use_cache=True, **_padding_kwargs(mask, None, d)) for m, d in models]
    alive = list(range(batch))  # row of each cache slot
    generated: list[list[int]] = [[] for _ in range(batch)]
    stopped = [False] * batch
    for step in range(max_new_tokens):
        lb, lt = (out.logits[:, -1] for out in outs)
        if vocab is not None:
            lb, lt = lb[:, :vocab], lt[:, :vocab]
        scores = contrastive_logits(lb, lt.to(lb.device), alpha, beta).cpu()  # sample on CPU: per-row CPU RNGs
        nxt = sample(scores, [generators[r] for r in alive], temperature, top_p)
        keep = []
        for slot, r in enumerate(alive):
            tok = int(nxt[slot])
            if tok in stops:
                stopped[r] = True
            else:
                generated[r].append(tok)
                keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        caches = [out.past_key_values for out in outs]
        if len(keep) < len(alive) and all(hasattr(c, "batch_select_indices") for c in caches):
            idx = torch.tensor(keep)
            for cache, (_, d) in zip(caches, models):
                cache.batch_select_indices(idx.to(d))
            nxt = nxt[idx]
            alive = [alive[s] for s in keep]
            if mask is not None:
                mask = mask[idx.to(device)]
        # (without batch_select_indices, finished rows keep running; their tokens are ignored)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        outs = [m(input_ids=nxt[:, None].to(d), past_key_values=cache, use_cache=True, **_padding_kwargs(mask, 1, d))
                for (m, d), cache in zip(models, caches)]
    return [(generated[r], stopped[r]) for r in range(batch)]


def _padding_kwargs(mask: torch.Tensor | None, last: int | None, device: Any) -> dict[str, torch.Tensor]:
    """attention_mask and position_ids on ``device`` for a left-padded batch (positions count real tokens only);
    ``last``: only the positions of the last ``last`` columns (a decoding step)."""
    if mask is None:
        return {}
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if last is not None:
        pos = pos[:, -last:]
    return {"attention_mask": mask.to(device), "position_ids": pos.to(device)}


def read_seeds(path: str | os.PathLike[str]) -> list[str]:
    """Neutral seed texts for ``distill(seeds=...)``: a .txt (one per line), .jsonl or .csv file."""
    seeds = read_texts(path)
    if not seeds:
        raise DistillError(f"{path} has no seed text; pass a file with one short neutral seed per line")
    return seeds


def distill(
    base: ModelSpec,
    toxic: ModelSpec,
    out_jsonl: str | os.PathLike[str],
    num_samples: int = PAPER_NUM_SAMPLES,
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    batch_size: int = DEFAULT_DISTILL_BATCH_SIZE,
    top_p: float | None = None,
    temperature: float = 1.0,
    seed: int = 1234,
    on_batch: Callable[[int], None] | None = None,
    device: str | None = None,
    seeds: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> DistillResult:
    """Distil ``num_samples`` detoxifying texts into ``out_jsonl``, resuming whatever a previous run with the same
    settings and models wrote (checked against the manifest).

    ``base``/``toxic``: specs for :func:`detox.targets.load_hf_target` or loaded ``(model, tokenizer)`` pairs sharing
    one tokenizer. ``on_batch(completed_rows)`` runs after each batch is on disk. ``seeds``: row ``i`` starts from
    BOS + ``seeds[i % len(seeds)]`` (default: BOS only, as UniDetox). ``log`` receives the note that a torn last
    line was dropped (default: a warning).
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise DistillError("num_samples, max_new_tokens and batch_size must all be >= 1")
    if seeds is not None and not seeds:
        raise DistillError("seeds is empty; pass at least one seed text or None to start from BOS only")
    out = Path(out_jsonl)
    mpath = manifest_path_for(out)
    try:  # a damaged file is refused before the models load (nothing is changed)
        found = read_resumable_rows(out, _expected_row, "distill run")
    except DataFormatError as err:
        raise DistillError(str(err)) from None
    base_model, base_tok, base_spec = _load(base)
    toxic_model, toxic_tok, toxic_spec = _load(toxic)
    vb, vt = base_tok.get_vocab(), toxic_tok.get_vocab()
    if vb != vt:  # contrastive decoding compares the two models token by token: their vocabularies must be identical
        diff = sorted(set(vb.items()) ^ set(vt.items()))[:5]
        raise DistillError(f"base and toxic models do not share a tokenizer ({len(vb)} vs {len(vt)} tokens; differing "
                           f"entries e.g. {diff}). Make the toxic model from this base with "
                           "`detox toxify --base <base>`.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_model = base_model.to(device).eval()
    toxic_model = toxic_model.to(device).eval()
    width = min(base_model.get_output_embeddings().weight.shape[0], toxic_model.get_output_embeddings().weight.shape[0])
    vocab = min(len(base_tok), width)
    start_id = start_token_id(base_tok)
    stops = stop_token_ids(base_model, base_tok)
    seed_ids = [base_tok(t, add_special_tokens=False)["input_ids"] for t in seeds] if seeds else None

    settings: dict[str, Any] = {
        "alpha": alpha, "beta": "inf" if math.isinf(beta) else beta, "seed": seed, "temperature": temperature,
        "top_p": top_p, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "start_token_id": start_id,
        "stop_token_ids": stops,
        "seeds_sha256": hashlib.sha256(json.dumps(seeds).encode()).hexdigest() if seeds else None,
        "num_seeds": len(seeds) if seeds else 0,
        "base": {"spec": base_spec, "fingerprint": model_fingerprint(base_model, base_tok)},
        "toxic": {"spec": toxic_spec, "fingerprint": model_fingerprint(toxic_model, toxic_tok)},
    }
    done = len(found.rows)
    manifest = _resume_manifest(mpath, settings, done)
    out.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(found, log)  # only now that the run is known to continue this file
    # the rows on disk are the ground truth (a kill can land between a row write and the manifest update); a row
    # shorter than max_new_tokens stopped at EOS
    manifest.update(completed=done, total_tokens=sum(int(r["num_tokens"]) for r in found.rows), num_samples=num_samples,
                    stopped_at_eos=sum(int(r["num_tokens"]) < max_new_tokens for r in found.rows))
    write_text_atomic(mpath, json.dumps(manifest, indent=2) + "\n")
    t0 = time.time()
    prior_seconds = float(manifest.get("wall_seconds", 0.0))

    from tqdm.auto import tqdm

    bar = tqdm(total=num_samples, initial=min(done, num_samples), desc="distill", unit="row")
    for k in range(done // batch_size, math.ceil(num_samples / batch_size)):
        lo, hi = k * batch_size, min((k + 1) * batch_size, num_samples)
        # the whole batch is regenerated even if some of its rows are on disk: same batch -> same numerics
        prefixes = [seed_ids[i % len(seed_ids)] for i in range(lo, hi)] if seed_ids else None
        rows = contrastive_generate(
            base_model, toxic_model, [_row_generator(seed, i) for i in range(lo, hi)], start_id, stops,
            max_new_tokens, alpha, beta, temperature, top_p, vocab, prefixes,
        )
        new_rows = []
        for i, (ids, at_eos) in zip(range(lo, hi), rows):
            if i < done:
                continue
            seed_row = {"seed": seeds[i % len(seeds)]} if seeds else {}
            text = base_tok.decode((prefixes[i - lo] if prefixes else []) + ids, skip_special_tokens=True)
            new_rows.append({"id": i, **seed_row, "text": text, "num_tokens": len(ids)})
            manifest["total_tokens"] += len(ids)
            manifest["stopped_at_eos"] += int(at_eos)
        append_rows(out, new_rows, "distill.rows")
        bar.update(hi - max(lo, done))
        done = hi
        manifest.update(completed=done, wall_seconds=round(prior_seconds + time.time() - t0, 1),
                        updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_text_atomic(mpath, json.dumps(manifest, indent=2) + "\n")
        fault_point("distill.manifest.written")
        if on_batch is not None:
            on_batch(done)
    bar.close()
    manifest["rows_sha256"] = sha256_file(out) if out.exists() else None
    write_text_atomic(mpath, json.dumps(manifest, indent=2) + "\n")
    return DistillResult(out, mpath, done, len(found.rows), round(time.time() - t0, 1))


def _resume_manifest(mpath: Path, settings: dict[str, Any], done: int) -> dict[str, Any]:
    """A fresh manifest, or the existing one after checking that it was made with the same settings."""
    if done == 0:
        return {"format": MANIFEST_FORMAT, **settings, "num_samples": None, "completed": 0, "total_tokens": 0,
                "stopped_at_eos": 0, "wall_seconds": 0.0,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not mpath.exists():
        raise DistillError(f"{done} rows exist but their manifest {mpath} is missing: cannot check the settings "
                           "to resume; move the JSONL away to start over")
    try:
        old = read_json_file(mpath)
    except DataFormatError as err:
        raise DistillError(f"{err}; cannot check the settings to resume: move the JSONL and its manifest away to "
                           "start over") from None
    if not isinstance(old, dict):
        raise DistillError(f"{mpath}: not a distill manifest (a JSON object); move the JSONL and it away to start over")
    changed = [k for k in _RESUME_KEYS if _norm(old.get(k)) != _norm(settings[k])]
    # the models are compared by fingerprint, not by how they were named ("smollm2" vs the GGUF path)
    changed += [f"{k} model" for k in ("base", "toxic")
                if _norm((old.get(k) or {}).get("fingerprint")) != _norm(settings[k]["fingerprint"])]
    if changed:
        raise DistillError(
            f"{mpath} was written with different {', '.join(changed)}; resuming would mix two runs. Rerun with the "
            "original settings (see the manifest) or write to a new --out file."
        )
    return old


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))
