"""Small timm ViTs for fast tests: plain pre-norm ViT, DINOv2-style layer scale, CLIP-style pre-norm."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

VARIANTS = {
    "vit": {},
    "layer_scale": {"init_values": 1e-1},  # DINOv2 blocks scale each branch by a learned gamma
    "clip_pre_norm": {"pre_norm": True, "class_token": True},  # CLIP ViTs normalise before the blocks
}


def tiny_vit(variant: str = "vit", depth: int = 4, num_classes: int = 5, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=depth,
        num_heads=3,
        mlp_ratio=2.0,
        num_classes=num_classes,
        qkv_bias=True,
        **VARIANTS[variant],
    )
    return model.eval()
