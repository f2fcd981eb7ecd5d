"""A GPT-2 in one readable file.

Every layer that a kernel replaces (LayerNorm, bias+GELU, attention, LM-head cross-entropy) is a module from
:mod:`gptkernels.nn`, whose ``kernels`` setting picks the Triton kernel or the PyTorch op; the parameters and
their names (GPT-2's: ``transformer.wte``, ``transformer.h.0.attn.c_attn``, ...) do not depend on it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig
from .nn import CausalSelfAttention, KVCache, LayerNorm, LinearGELU, LMHeadLoss, set_kernels


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = LinearGELU(config.emb_dim, 4 * config.emb_dim, kernels=config.kernels)  # Linear → GELU(tanh)
        self.c_proj = nn.Linear(4 * config.emb_dim, config.emb_dim)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(·))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        k = config.kernels
        self.ln_1 = LayerNorm(config.emb_dim, eps=config.layer_norm_eps, kernels=k)
        self.attn = CausalSelfAttention(config.emb_dim, config.n_heads, config.drop_rate, config.qkv_bias, kernels=k)
        self.ln_2 = LayerNorm(config.emb_dim, eps=config.layer_norm_eps, kernels=k)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        a = self.attn(self.ln_1(x), kv_cache)
        x, h = self.ln_2.forward_add(a, x)  # residual add fused with the second LayerNorm
        return x + self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.emb_dim),
                wpe=nn.Embedding(config.context_length, config.emb_dim),
                drop=nn.Dropout(config.drop_rate),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layers)]),
                ln_f=LayerNorm(config.emb_dim, eps=config.layer_norm_eps, kernels=config.kernels),
            )
        )
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.loss_fn = LMHeadLoss(kernels=config.kernels)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream does not grow.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_caches: list[KVCache] | None = None,
        return_logits: bool = True,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """Logits for ``idx``, and the loss when ``targets`` are given.

        Args:
            idx: (B, T) int64 token ids, T <= context_length (with ``kv_caches``: only the new tokens).
            targets: (B, T) int64 next-token ids; -100 is ignored.
            kv_caches: one :class:`KVCache` per layer for incremental decoding.
            return_logits: with targets, False skips the (B, T, vocab) logits so that the fused LM-head loss
                never holds them (training); the first returned item is then None.
            last_only: without targets, only the last position's logits, (B, 1, vocab) (generation).
        Returns:
            logits (B, T, vocab_size) without targets; ``(logits, loss)`` with targets.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be a (B, T) tensor of token ids, got {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        start = kv_caches[0].length if kv_caches is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence length {start + T} exceeds the model's context_length {self.config.context_length}"
            )
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)  # (B, T or 1, vocab)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        loss = self.loss_fn(x, self.lm_head.weight, targets)
        logits = self.lm_head(x) if return_logits else None
        return logits, loss

    # ---------------------------------------------------------------------------------------------------
    def set_kernels(self, kernels: str) -> GPT:
        """Switch every fused layer to ``kernels`` ("auto" | "triton" | "torch"); parameters are unchanged."""
        set_kernels(self, kernels)
        self.config.kernels = kernels
        return self

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied LM head counted once); ``non_embedding`` leaves out position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6·N plus attention's 12·L·T·C (PaLM appendix B)."""
        cfg = self.config
        t = cfg.context_length if seq_len is None else seq_len
        return 6.0 * self.num_params(non_embedding=True) + 12.0 * cfg.n_layers * t * cfg.emb_dim

    def new_kv_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        cfg, p = self.config, self.transformer.wte.weight
        n = cfg.context_length if max_len is None else max_len
        return [
            KVCache(batch, cfg.n_heads, n, cfg.head_dim, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)
        ]

    # ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor | None = None, max_new_tokens: int | None = None, **kwargs: Any):
        """Sample continuations; see :func:`gptkernels.generation.generate`.

        ``model.generate(idx, max_new_tokens, temperature=..., top_k=..., top_p=..., seed=...)`` returns
        token ids (B, T + new); ``model.generate(prompt="text", max_length=100, ...)`` returns a string.
        """
        from .generation import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_model: Any, kernels: str = "auto", **config_overrides: Any) -> GPT:
        """Load a Hugging Face ``GPT2LMHeadModel`` (a local folder, a model object, or a hub name).

        A config this model would compute differently is a ``ValueError``; after loading, the logits are checked
        against the Hugging Face model's (see :func:`gptkernels.hf.gpt_from_hf`)."""
        from .hf import gpt_from_hf

        return gpt_from_hf(cls, path_or_model, kernels=kernels, **config_overrides)

    def save_hf(self, folder: str | Path) -> Path:
        """Write a folder that ``transformers.GPT2LMHeadModel.from_pretrained(folder)`` loads."""
        from .hf import save_hf

        return save_hf(self, folder)

    def configure_optimizer(self, lr: float, weight_decay: float, betas=(0.9, 0.95), fused: bool | None = None):
        """AdamW with weight decay on matrices only (not biases, LayerNorm or embeddings)."""
        decay, no_decay = [], []
        embeddings = {id(self.transformer.wte.weight), id(self.transformer.wpe.weight)}
        for _, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if fused is None:
            fused = self.transformer.wte.weight.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Implicit shifting (Hugging Face style): ``labels == input_ids`` → next-token targets."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)
