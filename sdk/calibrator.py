"""The calibration model: a compact decoder-only LM with its own tokenizer, independent of any target.

Pre-norm transformer (RMSNorm, rotary positions, GELU MLP, tied embeddings) with an explicit key/value
cache so that incremental decoding costs one token step. The cache is a pair of tensors shaped
``[layers, batch, heads, past, head_dim]`` so the same signature exports cleanly to ONNX.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from detox.config import CalibratorConfig

__all__ = ["CalibratorConfig", "CalibratorLM", "KVCache"]


KVCache = tuple[torch.Tensor, torch.Tensor]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Block(nn.Module):
    def __init__(self, cfg: CalibratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, h * d))
        x = x + self.down(F.gelu(self.up(self.mlp_norm(x))))
        return x, k, v


class CalibratorLM(nn.Module):
    """Causal LM whose final hidden state ``h_cal`` is what gets fused into a target."""

    def __init__(self, config: CalibratorConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def empty_cache(self, batch_size: int = 1) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch_size, c.num_heads, 0, c.head_dim)
        w = self.embed.weight
        return torch.zeros(shape, dtype=w.dtype, device=w.device), torch.zeros(shape, dtype=w.dtype, device=w.device)

    def forward(self, input_ids: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Return ``(hidden [b, t, d] after the final norm, new cache)`` for ``input_ids`` following ``past``."""
        b, t = input_ids.shape
        past_k, past_v = past if past is not None else self.empty_cache(b)
        p = past_k.shape[3]
        pos = torch.arange(p, p + t, device=input_ids.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        # query i (absolute p+i) may attend keys 0..p+i
        q_pos = torch.arange(t, device=input_ids.device)[:, None] + p
        k_pos = torch.arange(p + t, device=input_ids.device)[None, :]
        mask = k_pos <= q_pos
        x = self.embed(input_ids)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, cos.to(x.dtype), sin.to(x.dtype), past_k[i], past_v[i], mask)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), (torch.stack(new_k), torch.stack(new_v))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the calibrator itself (tied embeddings); used for training, not fusion."""
        return hidden @ self.embed.weight.T
