"""Injection into timm ViTs, checked against a hand-written per-block forward of the same maths."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from tiny_vits import VARIANTS, tiny_vit

from lily_lightning import LilyConfig, LoRAConfig, count_parameters, inject
from lily_lightning.vit.inject import timm_state_dict


def randomise_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def lily_delta(h, lp_w, router_w, hps, routing, relu):
    """One block's Lily delta from raw weights, with a per-expert loop (hps: one (r, out) per expert)."""
    z = h @ lp_w.T
    if relu:
        z = torch.relu(z)
    if router_w is None:  # no router: every given expert at full weight
        return sum(z @ hp for hp in hps)
    p = torch.softmax(z @ router_w.T, dim=-1)  # (B, N, E)
    if routing == "batch":
        w = p.mean(dim=(0, 1)).expand_as(p)
    elif routing == "sample":
        w = p.mean(dim=1, keepdim=True).expand_as(p)
    else:
        w = p
    return sum(w[..., e : e + 1] * (z @ hps[e]) for e in range(len(hps)))


def reference_forward(model, x, hp_per_block=None, routing="batch", stride=1):
    """Explicit loop over the timm blocks; attention and MLP written out from the frozen weights.

    ``hp_per_block[site][i]`` optionally replaces the shared bank with a per-block list of expert tensors.
    """
    ad = model.adapters

    def delta(site, i, h):
        hps = hp_per_block[site][i] if hp_per_block else list(ad[site].hp)
        lp_w = ad[site].lp[i // stride].weight
        router_w = ad[site].router[i].weight if len(ad[site].router) else None
        return lily_delta(h, lp_w, router_w, hps, routing, relu=site == "mlp")

    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        h = blk.norm1(x)
        q, k, v = F.linear(h, attn.qkv.base.weight, attn.qkv.base.bias).chunk(3, dim=-1)
        k = k + delta("k", i, h)
        v = v + delta("v", i, h)
        b, n, c = q.shape
        heads = attn.num_heads

        def split(t, b=b, n=n, c=c, heads=heads):
            return t.reshape(b, n, heads, c // heads).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-2, -1) / (c // heads) ** 0.5
        a = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(F.linear(a, attn.proj.weight, attn.proj.bias))
        h2 = blk.norm2(x)
        mlp = blk.mlp.base
        out = F.linear(F.gelu(F.linear(h2, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
        x = x + blk.ls2(out + delta("mlp", i, h2))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "config", [LilyConfig(rank=4, num_experts=2), LoRAConfig(rank=2)], ids=["lily", "lora"]
)
def test_output_equals_backbone_right_after_inject(variant: str, config) -> None:
    backbone = tiny_vit(variant)
    model = inject(copy.deepcopy(backbone), config)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("routing", ["batch", "sample", "token"])
def test_adapted_forward_matches_reference(variant: str, routing: str) -> None:
    model = inject(
        tiny_vit(variant), LilyConfig(rank=4, num_experts=3, lp_stride=2, scale=1.0, routing=routing)
    )
    randomise_adapters(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), reference_forward(model, x, routing=routing, stride=2), atol=1e-5, rtol=1e-5
        )


def test_scale_multiplies_the_delta() -> None:
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for scale in (0.0, 1.0, 2.0):
        model = inject(tiny_vit(), LilyConfig(rank=4, num_experts=2, scale=scale, targets=("mlp",)))
        randomise_adapters(model)
        with torch.no_grad():
            outs[scale] = model.forward_features(x)
    with torch.no_grad():  # s = 0 switches the adapter off whatever its weights
        assert torch.equal(outs[0.0], tiny_vit().forward_features(x))
    assert not torch.allclose(outs[1.0], outs[2.0])


def test_gradients_reach_every_adapter_tensor_and_no_backbone_tensor() -> None:
    model = inject(tiny_vit(depth=4), LilyConfig(rank=4, num_experts=2, lp_stride=2))
    randomise_adapters(model)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("adapters."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_hp_bank_gradient_sums_every_blocks_contribution() -> None:
    depth = 4
    model = inject(tiny_vit(depth=depth), LilyConfig(rank=4, num_experts=2, lp_stride=1))
    randomise_adapters(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()

    # The same loss with one independent leaf copy of each bank per block.
    copies = {
        site: [[hp.detach().clone().requires_grad_() for hp in model.adapters[site].hp] for _ in range(depth)]
        for site in ("k", "v", "mlp")
    }
    reference_forward(model, x, hp_per_block=copies, stride=1).square().mean().backward()
    for site, per_block in copies.items():
        summed = torch.stack([torch.stack([hp.grad for hp in block]) for block in per_block]).sum(0)
        torch.testing.assert_close(model.adapters[site].hp.grad, summed, atol=1e-6, rtol=1e-5)
        # every block contributed something
        assert all(torch.stack([hp.grad for hp in block]).abs().sum() > 0 for block in per_block)


def test_vit_b16_parameter_counts_match_the_paper_layout() -> None:
    dim, depth, r, experts = 768, 12, 32, 4
    groups = depth // (depth // experts)  # lp_stride = 12 // 4 = 3 -> 4 LPs
    kv_site = groups * dim * r + experts * r * dim + depth * r * experts  # 98,304 + 98,304 + 1,536
    mlp_site = groups * dim * 2 * r + experts * 2 * r * dim + depth * 2 * r * experts
    assert (kv_site, mlp_site) == (198_144, 396_288)

    lily = inject(timm.create_model("vit_base_patch16_224", pretrained=False), LilyConfig())
    per_site = {site: sum(p.numel() for p in a.parameters()) for site, a in lily.adapters.items()}
    assert per_site == {"k": kv_site, "v": kv_site, "mlp": mlp_site}
    assert count_parameters(lily) == 792_576

    lora = inject(
        timm.create_model("vit_base_patch16_224", pretrained=False), LoRAConfig(rank=8, targets=("q", "v"))
    )
    assert count_parameters(lora) == depth * 2 * 8 * (dim + dim) == 294_912


def test_inject_freezes_the_backbone_and_keeps_the_bank_single() -> None:
    model = inject(tiny_vit(), LilyConfig(rank=4, num_experts=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    assert sum(n.endswith(".hp") for n in trainable) == 3  # k, v, mlp banks, once each


@pytest.mark.parametrize("site", ["q", "proj", "fc1", "fc2"])
def test_exploration_sites_change_only_their_module(site: str) -> None:
    backbone = tiny_vit()
    model = inject(copy.deepcopy(backbone), LoRAConfig(rank=2, targets=(site,)))
    randomise_adapters(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x), backbone(x))
    path = {"q": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}[site]
    assert type(model.blocks[0].get_submodule(path)).__name__ == "AdaptedSite"


def test_q_site_changes_only_the_query_third() -> None:
    model = inject(tiny_vit(), LoRAConfig(rank=2, targets=("q",)))
    randomise_adapters(model)
    site = model.blocks[0].attn.qkv
    h = torch.randn(2, 5, 48)
    with torch.no_grad():
        out, base = site(h), site.base(h)
    assert not torch.allclose(out[..., :48], base[..., :48])
    assert torch.equal(out[..., 48:], base[..., 48:])


def test_bad_inputs_raise_value_errors_that_name_the_problem() -> None:
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        inject(timm.create_model("resnet18", pretrained=False), LilyConfig())
    with pytest.raises(ValueError, match=r"unknown target site.*'attn'.*valid sites are"):
        inject(tiny_vit(), LilyConfig(targets=("k", "attn")))
    with pytest.raises(ValueError, match=r"lp_stride=5 is larger than the model's depth 4"):
        inject(tiny_vit(depth=4), LilyConfig(lp_stride=5))
    model = inject(tiny_vit(), LilyConfig(rank=2))
    with pytest.raises(ValueError, match="already has adapters"):
        inject(model, LilyConfig(rank=2))


def test_unsupported_block_names_the_missing_module() -> None:
    model = tiny_vit()
    model.blocks[1].attn.qkv = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"block 1 .* no plain `attn.qkv`"):
        inject(model, LilyConfig(rank=2))


def test_timm_state_dict_has_timm_names_even_for_nested_wrappers() -> None:
    backbone = tiny_vit()
    model = inject(
        copy.deepcopy(backbone), LilyConfig(rank=2, targets=("q", "v", "proj", "fc1", "fc2", "mlp"))
    )
    assert "blocks.0.mlp.base.fc1.base.weight" in model.state_dict()  # fc1 wrapped inside the wrapped MLP
    state = timm_state_dict(model)
    expected = backbone.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_dynamic_size_vit_takes_a_batch_of_no_image_as_ddp_evaluation_hands_one() -> None:
    from lily_lightning.vit.inject import accept_empty_batches

    images = torch.rand(2, 3, 32, 32)
    plain = timm.create_model("test_vit", img_size=32, num_classes=3).eval()  # dynamic_img_size=True
    with pytest.raises(RuntimeError, match="ambiguous"):
        plain(images[:0])  # timm's own view(B, -1, C)
    model = inject(accept_empty_batches(copy.deepcopy(plain)), LilyConfig(rank=2)).eval()
    with torch.no_grad():
        assert model(images[:0]).shape == (0, 3)
        # Non-empty batches take timm's own path: the same logits as the model without the wrapper.
        reference = inject(copy.deepcopy(plain), LilyConfig(rank=2)).eval()
        reference.load_state_dict(model.state_dict())
        assert torch.equal(model(images), reference(images))
        twin = copy.deepcopy(model)  # the wrapper binds to the copy, not to the model it was copied from
        assert twin._pos_embed.__self__ is twin and torch.equal(twin(images), model(images))
