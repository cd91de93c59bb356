"""Calibrator architecture settings (torch-free, so manifests validate without torch installed)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Upper bounds of every size field. A manifest comes from strangers and sets how much memory loading allocates, so
# each field is bounded (docs/security.md lists these), and load_artifact also checks that the declared architecture
# matches the shapes in the safetensors headers before any tensor is read. Generous for a calibrator: the shipped
# one is 8192 tokens x 192 wide x 4 layers.
MAX_VOCAB = 1 << 18  # 262,144 tokens
MAX_HIDDEN = 8192
MAX_LAYERS = 64
MAX_HEADS = 128
MAX_FFN = 32768
MAX_POSITIONS = 1 << 17  # 131,072


class CalibratorConfig(BaseModel):
    """Architecture hyper-parameters; stored verbatim in every artifact manifest."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, ge=16, le=MAX_VOCAB)
    hidden_size: int = Field(192, ge=8, le=MAX_HIDDEN)
    num_layers: int = Field(4, ge=1, le=MAX_LAYERS)
    num_heads: int = Field(6, ge=1, le=MAX_HEADS)
    ffn_size: int = Field(768, ge=8, le=MAX_FFN)
    max_positions: int = Field(2048, ge=16, le=MAX_POSITIONS)
    rope_theta: float = Field(10000.0, gt=0.0, le=1e9, allow_inf_nan=False)
    norm_eps: float = Field(1e-5, gt=0.0, le=0.1, allow_inf_nan=False)
    bos_token_id: int = Field(0, ge=0)
    eos_token_id: int = Field(0, ge=0)
    pad_token_id: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "CalibratorConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, field) >= self.vocab_size:
                raise ValueError(f"{field} {getattr(self, field)} is not a token of the {self.vocab_size}-token vocabulary")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every weight of :class:`~detox.calibrator.CalibratorLM` with this config (torch-free), so
        loaders can compare a weights file's header with the manifest before allocating anything."""
        d, f = self.hidden_size, self.ffn_size
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (self.vocab_size, d), "norm.weight": (d,)}
        for i in range(self.num_layers):
            shapes.update({f"blocks.{i}.attn_norm.weight": (d,), f"blocks.{i}.qkv.weight": (3 * d, d),
                           f"blocks.{i}.out.weight": (d, d), f"blocks.{i}.mlp_norm.weight": (d,),
                           f"blocks.{i}.up.weight": (f, d), f"blocks.{i}.down.weight": (d, f)})
        return shapes
