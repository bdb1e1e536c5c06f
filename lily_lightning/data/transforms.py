"""Image transforms. All of them end in PILToTensor: uint8 (3, H, W), no normalisation.

The loaders' collate turns whole batches into float32 in [0, 1] (one conversion per batch, not per image);
normalisation lives in the model (``model.normalize``), which knows its backbone's pretrained mean/std.
"""

from __future__ import annotations

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
