"""Model configuration: one dataclass, the classic dict form, and GPT-2's named sizes."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

KERNEL_CHOICES = ("auto", "triton", "torch")

# Keys that "build an LLM from scratch" dicts carry but that describe training, not the model.
NON_MODEL_KEYS = frozenset({"max_length", "batch_size", "output_dimension"})

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 sizes as released by OpenAI (all: vocab 50257, context 1024, biases everywhere).
    "gpt2": dict(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": dict(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": dict(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": dict(emb_dim=1600, n_heads=25, n_layers=48),
    # The small model of "build an LLM from scratch" courses: trains in minutes on a laptop CPU.
    "tiny": dict(context_length=128, emb_dim=64, n_heads=8, n_layers=8, drop_rate=0.1, qkv_bias=False),
}


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024  # longest sequence the position embedding covers
    emb_dim: int = 768  # width of the residual stream
    n_heads: int = 12  # attention heads; head size is emb_dim // n_heads
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.0  # dropout on embeddings, attention probabilities and residual branches
    qkv_bias: bool = True  # bias in the fused q/k/v projection (GPT-2 has one; many from-scratch models do not)
    tie_embeddings: bool = True  # the LM head is the token embedding (GPT-2); False: its own weight
    layer_norm_eps: float = 1e-5
    kernels: str = "auto"  # "torch": PyTorch ops; "triton": fused kernels; "auto": kernels where they can run

    def __post_init__(self) -> None:
        # Every field's type is checked, so that a config read from YAML/JSON/a checkpoint cannot carry a
        # string where a bool belongs ("no" is truthy) or a float where a size belongs.
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("drop_rate", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"GPTConfig.{name} must be a finite number, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= float(self.drop_rate) < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not isinstance(self.kernels, str) or self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"GPTConfig.kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build a config from a plain dict such as ``{"vocab_size": 50257, "emb_dim": 64, ...}``.

        Keys describing training rather than the model (``max_length``, ``batch_size``, ``output_dimension``)
        are ignored with a warning; any other unknown key is a ``ValueError`` naming it.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in NON_MODEL_KEYS:
                warnings.warn(f"GPTConfig.from_dict: ignoring {key!r}, which is not a model setting", stacklevel=2)
            else:
                raise ValueError(f"GPTConfig.from_dict: unknown key {key!r}; valid keys: {sorted(fields)}")
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named size: ``gpt2`` (124M), ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` or ``tiny``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
