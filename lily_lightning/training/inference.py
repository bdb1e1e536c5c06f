"""One call from a trained run or an exported file to a model that labels PIL images."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from ..paths import resolve_path
from ..vit.export import load_exported, pretrained_cfg_overlay
from .checkpointing import read_checkpoint
from .module import ViTClassifier


def inference_config(classifier: ViTClassifier) -> dict[str, Any]:
    """The model's eval preprocessing as timm ``pretrained_cfg`` fields: the data module's data config (saved
    with the checkpoint; else the backbone's at the model's input size) plus the model's normalisation."""
    vit = classifier.model
    data_config = classifier.data_config or resolve_data_config({}, model=vit)
    height, width = vit.patch_embed.img_size
    mean, std = ([round(v, 6) for v in t.flatten().tolist()] for t in (classifier.mean, classifier.std))
    return {
        "input_size": (3, height, width),
        "interpolation": data_config["interpolation"],
        "crop_pct": data_config["crop_pct"],
        "crop_mode": data_config["crop_mode"],
        "mean": tuple(mean),
        "std": tuple(std),
    }


class LoadedClassifier(NamedTuple):
    """A timm model in eval mode, the PIL image -> input tensor transform it expects, its class names."""

    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]


def load_classifier(path: str | Path, weights: str | None = None) -> LoadedClassifier:
    """Load a ``fit`` checkpoint or an ``export``-ed ``.safetensors`` file, ready to label images::

        model, transform, class_names = load_classifier("runs/digits/lily/checkpoints/last.ckpt")
        probs = model(transform(image.convert("RGB")).unsqueeze(0)).softmax(-1)
        print(class_names[int(probs.argmax())])

    A checkpoint holds the adapter and head only: the model is rebuilt from its hyper-parameters, the frozen
    backbone from its ``weights`` file (``weights`` replaces it, e.g. when the file moved). The transform is
    the eval preprocessing of the data the model was trained on (timm's ``create_transform``: resize, crop,
    to tensor, the model's normalisation); the model is a plain timm model either way, and its
    ``pretrained_cfg`` holds the class names (``label_names``) and that preprocessing.
    """
    path = resolve_path(path)
    if path.suffix == ".safetensors":
        model = load_exported(path)
    else:
        read_checkpoint(path)  # a missing or damaged file is one clear message
        overrides = {} if weights is None else {"weights": weights}
        with warnings.catch_warnings():  # the frozen backbone is not in the checkpoint, by design
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not")
            classifier = ViTClassifier.load_from_checkpoint(path, map_location="cpu", **overrides)
        model = classifier.model.eval()
        overlay = pretrained_cfg_overlay(classifier.class_names, inference_config(classifier))
        model.pretrained_cfg = {**model.pretrained_cfg, **overlay}
    transform = create_transform(**resolve_data_config(model=model))
    names = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    return LoadedClassifier(model, transform, list(names))
