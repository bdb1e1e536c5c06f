"""Adapter-only state: round trip, file size, mismatch messages."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from tiny_vits import tiny_vit

from lily_lightning import LilyConfig, LoRAConfig, adapter_state_dict, inject, load_adapter_state_dict


@pytest.mark.parametrize(
    "config", [LilyConfig(rank=4, num_experts=2), LoRAConfig(rank=2)], ids=["lily", "lora"]
)
def test_round_trip_reproduces_outputs_bit_for_bit(config) -> None:
    backbone = tiny_vit()
    trained = inject(copy.deepcopy(backbone), config)
    with torch.no_grad():
        for p in trained.adapters.parameters():
            p.add_(torch.randn_like(p))
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(trained), buffer)
    buffer.seek(0)

    fresh = inject(copy.deepcopy(backbone), config)
    load_adapter_state_dict(fresh, torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_vit_b16_file_holds_each_bank_once_and_little_else() -> None:
    model = inject(timm.create_model("vit_base_patch16_224", pretrained=False), LilyConfig())
    state = adapter_state_dict(model)
    assert sorted(k for k in state if k.endswith(".hp")) == [
        "adapters.k.hp",
        "adapters.mlp.hp",
        "adapters.v.hp",
    ]
    assert not any(k.startswith("blocks.") for k in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    param_bytes = 792_576 * 4  # float32
    assert param_bytes <= buffer.getbuffer().nbytes <= param_bytes + 64 * 1024


def test_load_names_every_mismatch() -> None:
    source = inject(tiny_vit(), LilyConfig(rank=4, num_experts=2, targets=("k", "v")))
    target = inject(tiny_vit(), LilyConfig(rank=8, num_experts=2, targets=("k", "mlp")))
    with pytest.raises(ValueError) as err:
        load_adapter_state_dict(target, adapter_state_dict(source))
    message = str(err.value)
    assert "missing ['adapters.mlp.hp'" in message
    assert "unexpected ['adapters.v.hp'" in message
    assert "adapters.k.hp: file (2, 4, 48) vs model (2, 8, 48)" in message


def test_state_functions_need_an_injected_model() -> None:
    with pytest.raises(ValueError, match="no injected adapters"):
        adapter_state_dict(tiny_vit())
