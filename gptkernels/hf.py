"""Weights to and from Hugging Face ``transformers`` GPT-2 (``GPT2LMHeadModel``).

GPT-2's checkpoints store the projections as ``Conv1D`` weights, (in, out); our ``nn.Linear`` holds (out, in),
so those four matrices are transposed on the way in and out. Everything else maps one-to-one by name.
"""

from __future__ import annotations

import difflib
import os
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


# Activations that are GPT-2's tanh GELU (gelu_fast is the same formula written differently).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Largest |ours - theirs| / max(1, |theirs|) logit difference accepted by the check after loading, by the Hugging
# Face model's dtype: fp32 is the 1e-4; half precision carries its own rounding.
_LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _unsupported(hf_config: Any) -> list[str]:
    """What a GPT-2 config asks for that :class:`GPT` does not compute (empty: everything is supported)."""
    c, problems = hf_config, []
    act = getattr(c, "activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        problems.append(f"activation_function={act!r} (only GPT-2's tanh GELU: {', '.join(_TANH_GELUS)})")
    if not getattr(c, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False (attention scores not divided by sqrt(head size))")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True (scores also divided by the layer number)")
    n_inner = getattr(c, "n_inner", None)
    if n_inner is not None and n_inner != 4 * c.n_embd:
        problems.append(f"n_inner={n_inner} (the MLP is 4 * n_embd = {4 * c.n_embd} wide here)")
    if getattr(c, "add_cross_attention", False):
        problems.append("add_cross_attention=True (an encoder-decoder block)")
    return problems


def config_from_hf(hf_config: Any, **overrides: Any) -> GPTConfig:
    """The :class:`GPTConfig` of a Hugging Face ``GPT2Config``; ``ValueError`` listing every setting of it that
    this model cannot compute (rather than loading it and computing something else)."""
    problems = _unsupported(hf_config)
    if problems:
        raise ValueError("cannot load this GPT-2 exactly; unsupported: " + "; ".join(problems))
    # reorder_and_upcast_attn only changes the eager path's fp32 accumulation order: the same function.
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.n_positions,
        emb_dim=hf_config.n_embd,
        n_heads=hf_config.n_head,
        n_layers=hf_config.n_layer,
        drop_rate=overrides.pop("drop_rate", 0.0),
        qkv_bias=True,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
        layer_norm_eps=hf_config.layer_norm_epsilon,
        **overrides,
    )


def _is_path(name: str) -> bool:
    """A name no hub model can have: ``./x``, ``/x``, ``~/x``, ``a/b/c``, a backslash or a file suffix."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or bool(Path(name).suffix)


def _local_intent(name: str) -> str | None:
    """Why a hub-like ``name`` (``gpt2``, ``owner/name``) that is not in the cache most likely means a local folder
    (``out/`` exists here, or a folder here has a near-identical name), or None."""
    head = name.split("/")[0]
    if "/" in name and Path(head).is_dir():
        return f"{head}/ is a local folder"
    parent = Path(name).parent if "/" in name else Path(".")
    try:
        nearby = [p.name for p in parent.iterdir() if p.is_dir()]
    except OSError:
        nearby = []
    close = difflib.get_close_matches(Path(name).name, nearby, n=1, cutoff=0.8)
    return f"did you mean {parent / close[0]}?" if close else None


def _offline() -> bool:
    return any(
        os.environ.get(v, "") not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _from_pretrained(transformers: Any, name: str) -> Any:
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # a "Loading weights" bar per call would bury the CLIs' one-line output
    try:
        return _load_hf(transformers, name)
    finally:
        if shown:
            logging.enable_progress_bar()


def _load_hf(transformers: Any, name: str) -> Any:
    """``GPT2LMHeadModel.from_pretrained`` for a local folder (never the network) or, for a name that cannot be a
    local folder, a hub name: from the local cache first, then (when online) the hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        weights = [p for p in path.iterdir() if p.name.endswith((".safetensors", ".bin", ".safetensors.index.json"))]
        if not weights:
            raise FileNotFoundError(f"{path}: no weights (model.safetensors or pytorch_model.bin) in the folder")
        try:
            return _complete(transformers, str(path), local_files_only=True)
        except (OSError, KeyError, RuntimeError) as e:
            raise ValueError(f"{path}: cannot load it as a GPT-2: {' '.join(str(e).split())[:300]}") from None
    if path.exists():
        raise NotADirectoryError(f"{path} is a file, not a model folder (config.json + weights)")
    if _is_path(name):
        raise FileNotFoundError(f"no such model folder: {path}")
    try:
        return _complete(transformers, name, local_files_only=True)  # the cache: no network
    except OSError:
        pass
    why_local = _local_intent(name)  # a typo of a folder here must not wait for the network
    if why_local:
        raise FileNotFoundError(f"no such model folder: {path} ({why_local})")
    if _offline():
        raise FileNotFoundError(
            f"{name!r} is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        return _complete(transformers, name)
    except OSError as e:
        raise FileNotFoundError(
            f"{name!r} is not a local folder nor in the Hugging Face cache, and the hub did not provide it (no "
            f"network, or no such model): {' '.join(str(e).split())[:200]}"
        ) from None


def _complete(transformers: Any, name: str, **kwargs: Any) -> Any:
    """``GPT2LMHeadModel.from_pretrained`` that refuses what transformers would fill with random weights: another
    model type, or weights missing from the files."""
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(name, output_loading_info=True, **kwargs)
    model_type = getattr(hf.config, "model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"{name}: a {model_type!r} model, not a GPT-2 (GPT2LMHeadModel)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{name}: weights missing from its files: {', '.join(missing[:3])}{more}")
    return hf


def gpt_from_hf(cls: type[GPT], path_or_model: Any, kernels: str = "auto", **overrides: Any) -> GPT:
    """Build a :class:`GPT` holding the weights of a ``GPT2LMHeadModel`` (object, local folder or hub name).

    The configuration is checked first (settings this model cannot compute are a ``ValueError``), and after
    loading both models' logits on a fixed input must agree (see ``_LOGIT_TOLERANCE``), else ``ValueError``.
    """
    transformers = _require_transformers()
    hf = _from_pretrained(transformers, str(path_or_model)) if isinstance(path_or_model, str | Path) else path_or_model
    model = cls(config_from_hf(hf.config, kernels=kernels, **overrides))
    sd_hf = hf.state_dict()
    sd = model.state_dict()
    for name in sd:
        if name == "lm_head.weight" and model.config.tie_embeddings:
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
    check_same_logits(model, hf)
    return model


@torch.no_grad()
def check_same_logits(model: GPT, hf: Any, length: int = 16) -> float:
    """Run both models on one fixed sequence and return the largest logit difference (relative to the logits'
    size); ``ValueError`` when it exceeds the tolerance of the Hugging Face model's dtype."""
    p = next(hf.parameters())
    n = min(length, model.config.context_length)
    idx = (torch.arange(n, dtype=torch.long) * 7919 + 13) % model.config.vocab_size  # spread over the vocabulary
    idx = idx[None]
    was = model.training, hf.training, model.config.kernels, model.transformer.wte.weight.device
    model.eval(), hf.eval()
    model.set_kernels("torch")  # the check is of the weights and the math, on any device: PyTorch's ops
    try:
        ours = model.to(p.device)(idx.to(p.device)).float()
        theirs = hf(idx.to(p.device)).logits.float()
    finally:
        model.train(was[0]), hf.train(was[1])
        model.set_kernels(was[2]).to(was[3])
    err = float((ours - theirs).abs().max()) / max(1.0, float(theirs.abs().max()))
    tol = _LOGIT_TOLERANCE.get(p.dtype, 1e-1)
    if not err <= tol:  # also catches NaN
        raise ValueError(
            f"the loaded model's logits differ from the Hugging Face model's by {err:.3g} (tolerance {tol:g} for "
            f"{p.dtype}): its config asks for something this GPT does not compute"
        )
    return err


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
        tie_word_embeddings=cfg.tie_embeddings,
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
            if (name == "lm_head.weight" and cfg.tie_embeddings) or name.startswith("loss_fn."):
                continue
            value = value.detach().float().cpu()
            if name.endswith(_CONV1D):
                value = value.t()
            sd_hf[name].copy_(value)
        if not cfg.qkv_bias:
            for i in range(cfg.n_layers):
                sd_hf[f"transformer.h.{i}.attn.c_attn.bias"].zero_()
    folder = Path(folder)
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Writing model shards" bar for a few small files
    try:
        hf.save_pretrained(str(folder))
    finally:
        if shown:
            logging.enable_progress_bar()
    return folder
