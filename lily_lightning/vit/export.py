"""A merged adapted ViT as one ``.safetensors`` file in timm's format, and the loader for such files.

:func:`export_vit` merges (:func:`lily_lightning.merge`) and writes with timm's key names. With no ``mlp``
site left the file is a plain timm checkpoint; with one, it also holds that side branch's tensors, and
:func:`load_exported` (or timm plus ``inject``, as the file's metadata says) loads it. The ``export``
command (``training/export_command.py``) builds the trained model and calls :func:`export_vit`.

The metadata also holds the class names and the eval preprocessing as timm's own ``pretrained_cfg`` fields
(``label_names``, ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``), so a
model loaded by plain timm (the ``load`` line) or :func:`load_exported` names its classes
(``model.pretrained_cfg["label_names"]``) and ``timm.data.create_transform(**timm.data.resolve_data_config(
model=model))`` is its eval transform.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..adapters import LilyConfig, LoRAConfig
from ..errors import UsageError
from ..files import write_atomically
from ..paths import shown_path
from .inject import ADAPTERS_ATTR, adapted_sites, inject, timm_state_dict
from .merge import merge
from .state import adapter_state_dict, load_adapter_state_dict

FORMAT = "lily_lightning.export/1"


def _side_sites(vit: nn.Module) -> list[str]:
    """The adapter sites merging left as branches (the whole-MLP site)."""
    return sorted({branch.site for site in adapted_sites(vit) for branch in site.branches})


def _timm_snippet(
    path: str, name: str, num_classes: int, img_size: int | tuple[int, int], overlay: dict[str, Any]
) -> str:
    fields = "".join(f", {key}={value!r}" for key, value in overlay.items())
    return (
        f"timm.create_model({name!r}, pretrained=True, num_classes={num_classes}, img_size={img_size!r}, "
        f"pretrained_cfg_overlay=dict(file={path!r}, num_classes={num_classes}{fields}))"
    )


def pretrained_cfg_overlay(class_names: list[str], preprocessing: dict[str, Any]) -> dict[str, Any]:
    """timm ``pretrained_cfg`` fields naming the classes and describing the eval preprocessing."""
    return {"label_names": list(class_names), **preprocessing}


def export_vit(
    vit: nn.Module,
    out: Path,
    timm_name: str,
    class_names: list[str],
    preprocessing: dict[str, Any],
    normalized: bool,
    adapter_config: dict[str, Any] | None,
) -> dict[str, str]:
    """Merge the injected ``vit`` (in place, eval mode) and write it with its head to ``out``; return the
    metadata. ``preprocessing``: the eval transform as timm ``pretrained_cfg`` fields (``input_size``,
    ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``); ``normalized``: whether the model
    applies ``mean``/``std`` to [0, 1] pixels; ``adapter_config``: ``method`` plus the config's fields.
    """
    vit.eval()
    merge(vit)
    sides = _side_sites(vit)
    tensors = timm_state_dict(vit)
    if sides:
        adapters = adapter_state_dict(vit)
        tensors |= {k: v for k, v in adapters.items() if k.split(".")[1] in sides}
    height, width = vit.patch_embed.img_size
    img_size: int | tuple[int, int] = height if height == width else (height, width)
    num_classes = vit.num_classes
    mean, std = list(preprocessing["mean"]), list(preprocessing["std"])
    if normalized:
        inputs = f"RGB pixels in [0, 1], then (x - mean) / std with mean={mean}, std={std}"
    else:
        inputs = "RGB pixels in [0, 1], not normalised"
    metadata = {
        "format": FORMAT,
        "timm_model": timm_name,
        "num_classes": str(num_classes),
        "img_size": json.dumps(img_size),
        "input": f"{img_size} px images: {inputs}",
        "input_mean": json.dumps(mean),
        "input_std": json.dumps(std),
        "side_branches": json.dumps(sides),
        "class_names": json.dumps(class_names),
        "data_config": json.dumps(preprocessing),
    }
    if sides:
        if adapter_config is None:
            raise ValueError("a model with side branches needs its adapter_config to be exported")
        metadata["adapter_config"] = json.dumps({**adapter_config, "targets": sides})
        metadata["load"] = (
            f"the {'/'.join(sides)} site is a side branch, not a timm tensor: "
            f"lily_lightning.vit.export.load_exported({str(out)!r})"
        )
    else:
        overlay = pretrained_cfg_overlay(class_names, preprocessing)
        metadata["load"] = "import timm; " + _timm_snippet(
            str(out), timm_name, num_classes, img_size, overlay
        )
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomically(out, save(tensors, metadata=metadata), fix="Free space there or choose another --out.")
    return metadata


def load_exported(path: str | Path) -> nn.Module:
    """The timm model (in eval mode) that :func:`export_vit` wrote to ``path``, side branches included.

    Its ``pretrained_cfg`` names the classes (``label_names``) and holds the eval preprocessing, as the
    plain-timm ``load`` line's does: ``timm.data.resolve_data_config(model=model)`` gives it back.
    """
    if not Path(path).is_file():
        raise UsageError(f"{shown_path(path)} does not exist (or is a folder): give the file `export` wrote.")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as err:
        raise UsageError(
            f"{path} is not a readable .safetensors file ({err}): it is damaged, cut off or of another "
            "format. Export the run again (python -m lily_lightning export ... --out FILE), or load the "
            "run's checkpoint (checkpoints/last.ckpt) instead."
        ) from err
    if metadata.get("format") != FORMAT:
        raise UsageError(f"{path} is not a lily_lightning export (format {metadata.get('format')!r})")
    overlay = {}
    if "class_names" in metadata:  # exports from before class names have neither
        overlay = pretrained_cfg_overlay(
            json.loads(metadata["class_names"]), json.loads(metadata["data_config"])
        )
    model = timm.create_model(
        metadata["timm_model"],
        pretrained=False,
        num_classes=int(metadata["num_classes"]),
        img_size=json.loads(metadata["img_size"]),
        pretrained_cfg_overlay=overlay,
    )
    tensors = load_file(str(path))
    adapters = {k: v for k, v in tensors.items() if k.startswith(f"{ADAPTERS_ATTR}.")}
    model.load_state_dict({k: v for k, v in tensors.items() if k not in adapters})
    if json.loads(metadata["side_branches"]):
        config = json.loads(metadata["adapter_config"])
        method = config.pop("method")
        inject(model, LilyConfig(**config) if method == "lily" else LoRAConfig(**config))
        load_adapter_state_dict(model, adapters)
    return model.eval()
