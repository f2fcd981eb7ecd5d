"""Weights to and from Hugging Face ``transformers`` GPT-2 (``GPT2LMHeadModel``).

GPT-2's checkpoints store the projections as ``Conv1D`` weights, (in, out); our ``nn.Linear`` holds (out, in),
so those four matrices are transposed on the way in and out. Everything else maps one-to-one by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import GPTConfig

if TYPE_CHECKING:
    from .model import GPT

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dev/hf extra
        raise ImportError("this needs Hugging Face transformers: pip install 'gptkernels[hf]'") from e
    return transformers


def config_from_hf(hf_config: Any, **overrides: Any) -> GPTConfig:
    act = getattr(hf_config, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"only GPT-2's tanh GELU is supported, the model uses {act!r}")
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.n_positions,
        emb_dim=hf_config.n_embd,
        n_heads=hf_config.n_head,
        n_layers=hf_config.n_layer,
        drop_rate=overrides.pop("drop_rate", 0.0),
        qkv_bias=True,
        layer_norm_eps=hf_config.layer_norm_epsilon,
        **overrides,
    )


def gpt_from_hf(cls: type[GPT], path_or_model: Any, kernels: str = "auto", **overrides: Any) -> GPT:
    """Build a :class:`GPT` holding the weights of a ``GPT2LMHeadModel`` (object, local folder or hub name)."""
    transformers = _require_transformers()
    if isinstance(path_or_model, str | Path):
        path = Path(path_or_model)
        if not path.exists() and (str(path_or_model).startswith((".", "/")) or path.suffix):
            raise FileNotFoundError(f"no such model folder: {path}")
        hf = transformers.GPT2LMHeadModel.from_pretrained(str(path_or_model))  # a folder, or a hub name online
    else:
        hf = path_or_model
    model = cls(config_from_hf(hf.config, kernels=kernels, **overrides))
    sd_hf = hf.state_dict()
    sd = model.state_dict()
    for name in sd:
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if name not in sd_hf:
            raise KeyError(f"Hugging Face state dict has no {name!r}")
        src = sd_hf[name]
        if name.endswith(_CONV1D):
            src = src.t()
        if src.shape != sd[name].shape:
            raise ValueError(f"{name}: shape {tuple(src.shape)} in the HF model, {tuple(sd[name].shape)} here")
        with torch.no_grad():
            sd[name].copy_(src)
    return model


def save_hf(model: GPT, folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads."""
    transformers = _require_transformers()
    cfg = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        layer_norm_epsilon=cfg.layer_norm_eps,
        activation_function="gelu_new",
        resid_pdrop=cfg.drop_rate,
        embd_pdrop=cfg.drop_rate,
        attn_pdrop=cfg.drop_rate,
        bos_token_id=min(50256, cfg.vocab_size - 1),
        eos_token_id=min(50256, cfg.vocab_size - 1),
    )
    hf = transformers.GPT2LMHeadModel(hf_config)
    sd_hf = hf.state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name == "lm_head.weight" or name.startswith("loss_fn."):
                continue
            value = value.detach().float().cpu()
            if name.endswith(_CONV1D):
                value = value.t()
            sd_hf[name].copy_(value)
        if not cfg.qkv_bias:
            for i in range(cfg.n_layers):
                sd_hf[f"transformer.h.{i}.attn.c_attn.bias"].zero_()
    folder = Path(folder)
    hf.save_pretrained(str(folder))
    return folder
