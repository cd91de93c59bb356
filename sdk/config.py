"""Calibrator architecture settings (torch-free, so manifests validate without torch installed)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CalibratorConfig(BaseModel):
    """Architecture hyper-parameters; stored verbatim in every artifact manifest."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, ge=16)
    hidden_size: int = Field(192, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(6, ge=1)
    ffn_size: int = Field(768, ge=8)
    max_positions: int = Field(2048, ge=16)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "CalibratorConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
