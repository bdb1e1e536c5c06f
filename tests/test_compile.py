"""``model.compile: true``: the backbone is compiled in place, so checkpoints are an eager model's."""

from __future__ import annotations

import pytest
import torch

from lily_lightning import LilyConfig
from lily_lightning.training.module import ViTClassifier


def tiny(compile: bool, seed: int = 0) -> ViTClassifier:
    torch.manual_seed(seed)
    return ViTClassifier(
        "test_vit",
        num_classes=3,
        pretrained=False,
        img_size=32,
        drop_path_rate=0.0,  # no random stochastic depth: compiled and eager see the same network
        lily=LilyConfig(rank=4, num_experts=2, eval_routing="running"),
        compile=compile,
    )


def test_compiled_model_has_the_eager_models_checkpoint_keys_and_loads_either_way() -> None:
    eager, compiled = tiny(compile=False, seed=0), tiny(compile=True, seed=1)
    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` prefix
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    # Both directions; the adapters' running mix is a buffer and travels too.
    with torch.no_grad():
        compiled.model.adapters.k.running_mix.copy_(torch.tensor([0.3, 0.7]))
    eager.load_state_dict(compiled.state_dict())
    assert torch.equal(eager.model.adapters.k.running_mix[0], torch.tensor([0.3, 0.7]))
    other = tiny(compile=False, seed=2)
    compiled.load_state_dict(other.state_dict())
    assert torch.equal(compiled.model.adapters.k.lp[0].weight, other.model.adapters.k.lp[0].weight)


@pytest.mark.slow
def test_compiled_forward_and_gradients_equal_eager() -> None:
    # Inductor compiles a 6-block ViT for training and for eval: minutes on 2 loaded cores.
    eager, compiled = tiny(compile=False), tiny(compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.rand(4, 3, 32, 32)
    for module in (eager, compiled):
        module.train()
        module(x).square().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(
        compiled.model.adapters.k.running_mix, eager.model.adapters.k.running_mix
    )  # the in-place running-mix update survives compilation
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-4)
