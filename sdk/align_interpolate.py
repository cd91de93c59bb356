"""Interpolate alignment, the torch half of :mod:`detox.methods.interpolate`: learn the map ``A`` and the LayerNorm.

Two stages, the target frozen (docs/method.md): ``vocab``, the paper's InfoNCE over the token strings both
vocabularies share, and ``context`` (default, on top), which trains ``A`` and the LayerNorm so that the fusion term
predicts the target's next token from the calibrator's contextual states on shared text. Its own module so that the
method's config and head (and a contrast pair's alignment) never import torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from detox.token_map import shared_token_pairs

if TYPE_CHECKING:
    from detox.methods.interpolate import InterpolateConfig
    from detox.runtime import Calibrator


class AlignmentMap(nn.Module):
    """``LayerNorm(h_cal · A)``: the learned piece of the fusion, stored in aligned artifacts."""

    def __init__(self, d_cal: int, d_target: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(d_cal, d_target) / math.sqrt(d_cal))
        self.ln = nn.LayerNorm(d_target, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln(h @ self.A)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "A": self.A.detach().float().numpy(),
            "ln_weight": self.ln.weight.detach().float().numpy(),
            "ln_bias": self.ln.bias.detach().float().numpy(),
        }


def train_vocab_alignment(amap: AlignmentMap, cal_emb: torch.Tensor, tgt_emb: torch.Tensor, pairs: list[tuple[int, int]],
                          s: InterpolateConfig, progress: bool = True, seed: int = 0) -> dict[str, float]:
    """The paper's InfoNCE over shared tokens: positive = own target row, ``n`` random shared negatives."""
    g = torch.Generator().manual_seed(seed)
    cal_ids = torch.tensor([p[0] for p in pairs])
    tgt_ids = torch.tensor([p[1] for p in pairs])
    X = cal_emb[cal_ids]
    Y = tgt_emb[tgt_ids]
    opt = torch.optim.Adam([amap.A], lr=s.vocab_lr)
    n = len(pairs)
    steps = s.vocab_epochs * math.ceil(n / s.vocab_batch_size)
    bar = tqdm(total=steps, desc="align (vocab InfoNCE)", disable=not progress)
    loss = torch.tensor(0.0)
    for _ in range(s.vocab_epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, s.vocab_batch_size):
            idx = perm[i : i + s.vocab_batch_size]
            neg = torch.randint(0, n - 1, (len(idx), s.vocab_negatives), generator=g)
            neg = neg + (neg >= idx[:, None]).long()  # never sample the positive itself
            q = X[idx] @ amap.A  # [b, d_t]
            cands = torch.cat([Y[idx][:, None], Y[neg]], dim=1)  # [b, 1+n, d_t]
            logits = torch.einsum("bd,bkd->bk", q, cands)
            loss = F.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    with torch.no_grad():  # retrieval accuracy of the mapping over all shared tokens (chunked)
        correct = 0
        for i in range(0, n, 1024):
            sims = (X[i : i + 1024] @ amap.A) @ Y.T
            correct += (sims.argmax(-1) == torch.arange(i, min(i + 1024, n))).sum().item()
    return {"vocab_shared_tokens": float(n), "vocab_final_loss": float(loss.item()), "vocab_top1": correct / max(1, n)}


def context_examples(calibrator: Calibrator, target_tokenizer: Any, texts: list[str], progress: bool = True,
                     batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrator states and the target's next token at target-token boundaries that are calibrator-token boundaries.

    The calibrator reads ``<bos> + text`` in its own tokens; the state after its token ending at character
    ``c`` is the state the generation-time stream has when the target has produced exactly ``text[:c]``.
    Documents are run in right-padded batches (causal attention: padding never affects earlier positions).
    """
    model = calibrator.torch_model()
    bos = calibrator.manifest.calibrator.bos_token_id
    cal_enc = calibrator.tokenizer.encode_batch(texts, add_special_tokens=False)
    tgt_enc = target_tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    states, labels = [], []
    for b in tqdm(range(0, len(texts), batch_size), desc="calibrator states", disable=not progress):
        docs = list(range(b, min(b + batch_size, len(texts))))
        seqs = [[bos] + cal_enc[i].ids for i in docs]
        width = max(len(x) for x in seqs)
        ids = torch.tensor([x + [bos] * (width - len(x)) for x in seqs])
        with torch.inference_mode():
            hidden, _ = model(ids)
        rows, cols = [], []
        for r, i in enumerate(docs):
            if not cal_enc[i].ids or len(tgt_enc["input_ids"][i]) < 2:
                continue
            end_to_pos = {end: k + 1 for k, (_, end) in enumerate(cal_enc[i].offsets)}  # +1: bos at position 0
            end_to_pos[0] = 0
            for tok_id, (start, _) in zip(tgt_enc["input_ids"][i], tgt_enc["offset_mapping"][i]):
                pos = end_to_pos.get(start)
                if pos is not None:
                    rows.append(r)
                    cols.append(pos)
                    labels.append(tok_id)
        if rows:
            states.append(hidden[torch.tensor(rows), torch.tensor(cols)].clone())
    if not states:
        raise ValueError("no aligned positions found in the alignment text; pass more (or longer) --data text")
    return torch.cat(states), torch.tensor(labels)


def train_context_alignment(amap: AlignmentMap, W_out: torch.Tensor, states: torch.Tensor, labels: torch.Tensor,
                            s: InterpolateConfig, progress: bool = True, seed: int = 0) -> dict[str, float]:
    """Cross-entropy of the target's next token under ``W_out·LayerNorm(h_cal·A)``; held-out CE before and after."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    perm = torch.randperm(n, generator=g)
    n_eval = max(1, int(n * s.eval_fraction))
    ev, tr = perm[:n_eval], perm[n_eval:]

    def held_out() -> tuple[float, float]:
        with torch.no_grad():
            tot, acc = 0.0, 0
            for i in range(0, n_eval, 1024):
                idx = ev[i : i + 1024]
                logits = amap(states[idx]) @ W_out.T
                tot += F.cross_entropy(logits, labels[idx], reduction="sum").item()
                acc += (logits.argmax(-1) == labels[idx]).sum().item()
            return tot / n_eval, acc / n_eval

    before_ce, before_acc = held_out()
    opt = torch.optim.Adam(amap.parameters(), lr=s.context_lr)
    steps = s.context_epochs * math.ceil(len(tr) / s.context_batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.context_lr, total_steps=max(1, steps), pct_start=0.1)
    bar = tqdm(total=steps, desc="align (contextual)", disable=not progress)
    for _ in range(s.context_epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), s.context_batch_size):
            idx = order[i : i + s.context_batch_size]
            loss = F.cross_entropy(amap(states[idx]) @ W_out.T, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    after_ce, after_acc = held_out()
    return {
        "context_positions": float(n),
        "heldout_ce_vocab_only": before_ce,
        "heldout_top1_vocab_only": before_acc,
        "heldout_ce": after_ce,
        "heldout_top1": after_acc,
    }


def align(calibrator: Calibrator, W_out: Any, target_tokenizer: Any, texts: list[str] | None,
          vocabulary: tuple[list[str | None], set[str]], s: InterpolateConfig, seed: int = 0, progress: bool = True,
          log: Callable[[str], None] = lambda m: None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Learn the alignment of ``calibrator`` to a frozen target, given by its output matrix ``W_out``
    (``[vocab, hidden]``, numpy or torch), tokenizer and ``vocabulary`` (its token strings and special tokens, see
    :meth:`detox.targets.TargetFiles.vocabulary`); returns ``(arrays, metrics)``."""
    torch.manual_seed(seed)
    W_out = torch.as_tensor(W_out).detach().float()
    cal_model = calibrator.torch_model()
    cal_emb = cal_model.embed.weight.detach().float()
    cal_tokens = [calibrator.tokenizer.id_to_token(i) for i in range(calibrator.tokenizer.get_vocab_size())]
    tgt_tokens, special = vocabulary
    pairs = shared_token_pairs(cal_tokens, tgt_tokens, special)
    if len(pairs) < 2 * s.vocab_negatives:
        raise ValueError(f"the calibrator and target share only {len(pairs)} token strings; alignment needs more")
    log(f"{len(pairs)} token strings shared by both vocabularies")
    amap = AlignmentMap(cal_model.config.hidden_size, W_out.shape[1], eps=s.ln_eps)
    metrics = train_vocab_alignment(amap, cal_emb, W_out[: len(tgt_tokens)], pairs, s, progress, seed)
    if s.method == "vocab+context":
        if not texts:
            raise ValueError("contextual alignment needs text: pass --data FILE (or use --method vocab)")
        texts = texts[: s.max_context_docs]
        states, labels = context_examples(calibrator, target_tokenizer, texts, progress)
        metrics.update(train_context_alignment(amap, W_out, states, labels, s, progress, seed))
    return amap.arrays(), metrics
