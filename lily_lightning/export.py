"""``python -m lily_lightning export``: a trained run as one merged ``.safetensors`` file in timm's format.

The model is built exactly as ``test`` builds it (config files, overrides, the checkpoint's
hyper-parameters), merged (:func:`lily_lightning.merge`) and written with timm's key names. With no ``mlp``
site left the file is a plain timm checkpoint; with one, it also holds that side branch's tensors, and
:func:`load_exported` (or timm plus ``inject``, as the file's metadata says) loads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from lightning.pytorch.cli import LightningArgumentParser
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from .adapters import LilyConfig, LoRAConfig
from .cli import LilyCLI, run_lightning
from .errors import UsageError
from .files import check_writable_folder, write_atomically
from .inject import ADAPTERS_ATTR, adapted_sites, inject, timm_state_dict
from .merge import merge
from .module import ViTClassifier
from .paths import shown_path
from .state import adapter_state_dict, load_adapter_state_dict

FORMAT = "lily_lightning.export/1"
USAGE = (
    "usage: python -m lily_lightning export --config CONFIG.yaml --ckpt_path RUN.ckpt --out FILE [--force]"
)


def _side_sites(vit: nn.Module) -> list[str]:
    """The adapter sites merging left as branches (the whole-MLP site)."""
    return sorted({branch.site for site in adapted_sites(vit) for branch in site.branches})


def _timm_snippet(path: str, name: str, num_classes: int, img_size: int | tuple[int, int]) -> str:
    return (
        f"timm.create_model({name!r}, pretrained=True, num_classes={num_classes}, img_size={img_size!r}, "
        f"pretrained_cfg_overlay=dict(file={path!r}, num_classes={num_classes}))"
    )


def check_out(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse, before any work, an ``--out`` that would lose work (the checkpoint itself; without ``force``,
    any existing file) or cannot be written."""
    if out.is_dir():
        raise UsageError(
            f"--out {shown_path(out)} is a folder; name the file to write: --out {out / 'model.safetensors'}"
        )
    if out.exists() and out.samefile(checkpoint):
        raise UsageError(
            f"--out {out} is the checkpoint being exported (--ckpt_path): writing there would replace it, "
            f"--force or not. Choose another --out, e.g. {out.with_name('model.safetensors')}"
        )
    if out.exists() and not force:
        raise UsageError(f"--out {out} exists: add --force to replace it, or choose another --out")
    check_writable_folder(out.parent, "Choose another --out.")


def export_model(classifier: ViTClassifier, out: Path) -> dict[str, str]:
    """Merge ``classifier`` (in place, eval mode), write its ViT + head to ``out``; return the metadata."""
    classifier.eval()
    merge(classifier)
    vit = classifier.model
    sides = _side_sites(vit)
    tensors = timm_state_dict(vit)
    if sides:
        adapters = adapter_state_dict(vit)
        tensors |= {k: v for k, v in adapters.items() if k.split(".")[1] in sides}
    height, width = vit.patch_embed.img_size
    img_size: int | tuple[int, int] = height if height == width else (height, width)
    name, num_classes = classifier.hparams.backbone, vit.num_classes
    mean, std = ([round(v, 6) for v in t.flatten().tolist()] for t in (classifier.mean, classifier.std))
    if classifier.hparams.normalize == "none":
        inputs = "RGB pixels in [0, 1], not normalised"
    else:
        inputs = f"RGB pixels in [0, 1], then (x - mean) / std with mean={mean}, std={std}"
    metadata = {
        "format": FORMAT,
        "timm_model": name,
        "num_classes": str(num_classes),
        "img_size": json.dumps(img_size),
        "input": f"{img_size} px images: {inputs}",
        "input_mean": json.dumps(mean),
        "input_std": json.dumps(std),
        "side_branches": json.dumps(sides),
    }
    if sides:
        method = classifier.method
        config = classifier.hparams.lily if method == "lily" else classifier.hparams.lora
        # A dataclass when built in Python, a dict when LightningCLI built it.
        fields = asdict(config) if is_dataclass(config) else dict(config)
        metadata["adapter_config"] = json.dumps({"method": method, **fields, "targets": sides})
        metadata["load"] = (
            f"the {'/'.join(sides)} site is a side branch, not a timm tensor: "
            f"lily_lightning.export.load_exported({str(out)!r})"
        )
    else:
        metadata["load"] = "import timm; " + _timm_snippet(str(out), name, num_classes, img_size)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomically(out, save(tensors, metadata=metadata), fix="Free space there or choose another --out.")
    return metadata


def load_exported(path: str | Path) -> nn.Module:
    """The timm model (in eval mode) that :func:`export_model` wrote to ``path``, side branches included."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise UsageError(f"{path} is not a lily_lightning export (format {metadata.get('format')!r})")
    model = timm.create_model(
        metadata["timm_model"],
        pretrained=False,
        num_classes=int(metadata["num_classes"]),
        img_size=json.loads(metadata["img_size"]),
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


class ExportCLI(LilyCLI):
    """The ``test`` command's model building, then :func:`export_model` instead of testing."""

    writes_run_folder = False  # it writes --out alone

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--out", type=str, required=True, help="the .safetensors file to write")
        parser.add_argument("--force", action="store_true", help="replace an existing --out file")

    def test(self, model: ViTClassifier, ckpt_path: str | None = None, **_: Any) -> None:
        # LightningCLI calls a method named after the subcommand instead of the Trainer's.
        if not ckpt_path or not Path(ckpt_path).is_file():
            raise UsageError(f"export needs --ckpt_path of a checkpoint file, got {ckpt_path!r}\n{USAGE}")
        out = Path(self.config["test"]["out"])
        check_out(out, Path(ckpt_path), self.config["test"]["force"])
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.on_load_checkpoint(checkpoint)  # refuses a checkpoint of another model
        model.load_state_dict(
            checkpoint["state_dict"], strict=False
        )  # adapter + head: the backbone is frozen
        metadata = export_model(model, out)
        print(f"EXPORT out={out} side_branches={metadata['side_branches']}\nload: {metadata['load']}")
        print(f"input: {metadata['input']}", flush=True)


def main(args: list[str]) -> int:
    run_lightning(["test", *args], ExportCLI)
    return 0
