"""Batch-independent evaluation, router-free Lily, and merging the adapters into the frozen weights."""

from __future__ import annotations

import pytest
import torch
from test_inject import randomise_adapters, reference_forward
from tiny_vits import tiny_vit

from lily_lightning import LilyConfig, LoRAConfig, UsageError, inject, merge, unmerge
from lily_lightning.vit.inject import MERGED_KEY

ALL_SITES = ("q", "k", "v", "proj", "fc1", "fc2", "mlp")


def lily_model(variant: str = "layer_scale", **config) -> torch.nn.Module:
    """A tiny injected ViT with random adapters and (for batch routing) random, trained-like running mixes."""
    model = inject(tiny_vit(variant), LilyConfig(rank=4, num_experts=3, lp_stride=2, **config))
    randomise_adapters(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for adapter in model.adapters.values():
            if hasattr(adapter, "running_mix"):
                adapter.running_mix.copy_(torch.randn(adapter.running_mix.shape, generator=g).softmax(-1))
    return model.eval()


def test_batch_eval_routing_depends_on_the_batch_and_running_does_not() -> None:
    images = torch.randn(6, 3, 32, 32)
    others = torch.cat([images[:1], torch.randn(5, 3, 32, 32)])  # the same first image among new ones
    resized = [images[:1], images[:3], others]  # alone, a smaller batch, other companions
    for eval_routing in ("batch", "running"):
        model = lily_model(eval_routing=eval_routing)
        with torch.no_grad():
            whole = model(images)[0]
            permuted = model(images.flip(0))[-1]
            gaps = [(whole - model(batch)[0]).abs().max().item() for batch in resized]
        # A batch mean does not see the order: permuting changes only the float summation order.
        torch.testing.assert_close(permuted, whole, atol=1e-6, rtol=1e-6)
        if eval_routing == "batch":
            assert min(gaps) > 1e-4, gaps  # the batch routes every image: other images, other answer
        else:
            assert max(gaps) < 1e-6, gaps


RUNNING = {"routing": "batch", "eval_routing": "running", "scale": 0.7}
CASES = [(RUNNING, (site,)) for site in ALL_SITES] + [
    (RUNNING, ALL_SITES),
    ({"routing": "uniform"}, ALL_SITES),
    ({"lora": True}, ALL_SITES),
]


@pytest.mark.parametrize(
    ("config", "targets"),
    CASES,
    ids=[f"{c.get('routing', 'lora')}-{'-'.join(t)}" for c, t in CASES],
)
def test_merged_equals_unmerged_and_unmerge_restores_every_tensor(config: dict, targets: tuple) -> None:
    if config.get("lora"):
        model = inject(tiny_vit("layer_scale"), LoRAConfig(rank=2, alpha=3.0, targets=targets))
        randomise_adapters(model)
        model.eval()
    else:
        model = lily_model(targets=targets, **config)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert merge(model) is model
        merged = model(x)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    merged_state = model.state_dict()
    linear = [site for site in targets if site != "mlp"]
    # Marked as merged exactly when a backbone weight holds a delta (an mlp-only merge changes no weight).
    assert (merged_state.pop(MERGED_KEY, None) is not None) == bool(linear)
    changed = {k for k, v in merged_state.items() if not torch.equal(v, original[k])}
    # Each linear site changed its backbone weight (nothing else); the mlp site stayed a side branch.
    assert len(changed) == len({"qkv" if s in "qkv" else s for s in linear}) * len(model.blocks)
    assert all(k.startswith("blocks.") and k.endswith(".base.weight") for k in changed)
    with pytest.raises(UsageError, match="already merged"):
        merge(model)
    assert unmerge(model) is model
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    with pytest.raises(UsageError, match="not merged"):
        unmerge(model)


@pytest.mark.parametrize(
    ("config", "advice"),
    [
        ({"routing": "batch"}, "eval_routing: running"),
        ({"routing": "sample"}, "routing: uniform"),
        ({"routing": "token"}, "routing: uniform"),
    ],
)
def test_input_dependent_routing_refuses_to_merge_and_says_what_to_use(config: dict, advice: str) -> None:
    model = lily_model(**config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=advice):
        merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-merged


def test_uniform_routing_is_the_mean_of_the_bank_in_every_block() -> None:
    model = lily_model(variant="vit", routing="uniform")
    assert not any(
        name.startswith("adapters.") and ".router." in name for name, _ in model.named_parameters()
    )
    x = torch.randn(2, 3, 32, 32)
    mean_bank = {
        site: [[adapter.hp.detach().mean(0)]] * len(model.blocks) for site, adapter in model.adapters.items()
    }
    with torch.no_grad():
        reference = reference_forward(model, x, hp_per_block=mean_bank, stride=2)
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
        model.train()  # no router, no batch statistics: training mode routes the same way
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
