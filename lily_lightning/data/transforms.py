"""Image transforms. All of them end in PILToTensor: uint8 (3, H, W), no normalisation.

The loaders' collate turns whole batches into float32 in [0, 1] (one conversion per batch, not per image);
normalisation lives in the model (``model.normalize``), which knows its backbone's pretrained mean/std.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T


def vtab_transform(image_size: int) -> T.Compose:
    """VTAB-1k train and eval transform alike: squash to ``image_size`` squares (bicubic), no augmentation."""
    resize = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([resize, T.PILToTensor()])


def fgvc_resize_size(image_size: int) -> int:
    # VPT resizes the short side to 256 for 224 crops (438 for 384, 512 for 448): the same 8/7 ratio.
    return image_size * 8 // 7


def fgvc_train_transform(image_size: int) -> T.Compose:
    """VPT's FGVC training transform: short side to 8/7 * image_size, random crop, horizontal flip."""
    return T.Compose(
        [
            T.Resize(fgvc_resize_size(image_size)),
            T.RandomCrop(image_size),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ]
    )


def fgvc_eval_transform(image_size: int) -> T.Compose:
    """VPT's FGVC evaluation transform: short side to 8/7 * image_size, centre crop."""
    return T.Compose([T.Resize(fgvc_resize_size(image_size)), T.CenterCrop(image_size), T.PILToTensor()])


# A timm data config without mean/std (the model normalises): input_size, interpolation, crop_pct, crop_mode.
DataConfig = dict[str, Any]


def timm_eval_transform(data_config: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform for ``data_config`` (resize, centre crop or squash), ending in uint8."""
    # use_prefetcher: timm's flag for "no ToTensor/Normalize, give uint8": our collate converts per batch.
    return create_transform(**data_config, is_training=False, use_prefetcher=True)


def timm_train_transform(data_config: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training augmentation for a small task: random resized crop and horizontal flip, uint8 out.

    Crops cover 50-100 % of the image, milder than timm's ImageNet default (8-100 %): with a few hundred
    photos per class and a pretrained backbone, a crop should keep most of the object. No colour jitter,
    since colour is often what tells a custom task's classes apart.
    """
    return create_transform(
        input_size=data_config["input_size"],
        interpolation=data_config["interpolation"],
        is_training=True,
        use_prefetcher=True,
        scale=(0.5, 1.0),
        hflip=0.5,
        color_jitter=None,
    )


def vtab_data_config(image_size: int) -> DataConfig:
    """:func:`vtab_transform` as a timm data config (squash to a square, bicubic): for predict, export and
    the Python loader, which rebuild the eval transform with timm."""
    return {"input_size": (3, image_size, image_size), "interpolation": "bicubic", "crop_pct": 1.0,
            "crop_mode": "squash"}  # fmt: skip


def fgvc_data_config(image_size: int) -> DataConfig:
    """:func:`fgvc_eval_transform` as a timm data config: timm resizes the short side to
    floor(image_size / crop_pct) = image_size * 8 // 7 (torchvision's default bilinear), then centre-crops."""
    return {"input_size": (3, image_size, image_size), "interpolation": "bilinear", "crop_pct": 7 / 8,
            "crop_mode": "center"}  # fmt: skip
