"""The method alone (no timm): configs, routing maths, LoRA maths."""

from __future__ import annotations

import math

import pytest
import torch

from lily_lightning.adapters import LilyAdapter, LilyConfig, LoRAAdapter, LoRAConfig, mix_experts, scaled_mix


def loop_mix(z: torch.Tensor, probs: torch.Tensor, hp: torch.Tensor, routing: str) -> torch.Tensor:
    """Second formulation: explicit loops over samples, tokens and experts."""
    batch, tokens, _ = z.shape
    out = torch.zeros(batch, tokens, hp.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for n in range(tokens):
            if routing == "batch":
                w = probs.mean(dim=(0, 1))
            elif routing == "sample":
                w = probs[b].mean(dim=0)
            else:
                w = probs[b, n]
            for e in range(hp.shape[0]):
                out[b, n] += w[e] * (z[b, n] @ hp[e])
    return out


@pytest.mark.parametrize("routing", ["batch", "sample", "token"])
def test_mix_experts_matches_loops(routing: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(3, 5, 6, generator=g, dtype=torch.float64), -1)
    hp = torch.randn(6, 4, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mix_experts(z, probs, hp, routing), loop_mix(z, probs, hp, routing))


def test_batch_routing_hand_computed() -> None:
    # One token, two experts with p = (0.25, 0.75): HP_mix = 0.25 * HP_0 + 0.75 * HP_1.
    z = torch.tensor([[[1.0, 2.0]]])
    probs = torch.tensor([[[0.25, 0.75]]])
    hp = torch.tensor([[[1.0], [0.0]], [[0.0], [4.0]]])  # HP_0 = [1, 0]^T, HP_1 = [0, 4]^T
    # HP_mix = [0.25, 3.0]^T, z @ HP_mix = 1 * 0.25 + 2 * 3 = 6.25
    assert mix_experts(z, probs, hp, "batch").item() == pytest.approx(6.25)


def test_token_routing_has_no_expert_by_width_intermediate() -> None:
    # The largest tensor token routing builds is (B, N, E * r), never (B, N, E, out).
    z = torch.randn(4, 6, 4)
    probs = torch.softmax(torch.randn(4, 6, 5), -1)
    hp = torch.randn(5, 4, 1000)
    shapes: list[tuple[int, ...]] = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    with Record():
        mix_experts(z, probs, hp, "token")
    # Nothing bigger than the output (4 * 6 * 1000) or the bank itself (5 * 4 * 1000); a per-expert
    # intermediate would hold 4 * 6 * 5 * 1000.
    assert max(torch.Size(s).numel() for s in shapes) == 4 * 6 * 1000


def test_lily_adapter_forward_by_hand() -> None:
    adapter = LilyAdapter(
        3, 2, depth=4, rank=2, num_experts=2, lp_stride=2, scale=0.5, routing="batch", nonlinear=True
    )
    assert len(adapter.lp) == 2 and len(adapter.router) == 4 and adapter.hp.shape == (2, 2, 2)
    with torch.no_grad():
        adapter.lp[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
        adapter.router[3].weight.zero_()  # uniform routing: p = (0.5, 0.5)
        adapter.hp.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 3.0]]]))
    x = torch.tensor([[[2.0, 5.0, 7.0]]])
    # block 3 uses LP 1: z = relu([2, -5]) = [2, 0]; HP_mix = 2 * I; delta = 0.5 * [4, 0]
    torch.testing.assert_close(adapter(x, 3), torch.tensor([[[2.0, 0.0]]]))


def test_lora_adapter_forward_by_hand() -> None:
    adapter = LoRAAdapter(2, 2, depth=1, rank=1, scaling=2.0, dropout=0.0)
    assert torch.count_nonzero(adapter.lora_b[0].weight) == 0
    with torch.no_grad():
        adapter.lora_a[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        adapter.lora_b[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    torch.testing.assert_close(adapter(torch.tensor([[3.0, 4.0]]), 0), torch.tensor([[14.0, -14.0]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ("k", "attn")}, "unknown target"),
        ({"targets": ()}, "empty"),
        ({"targets": ("k", "k")}, "twice"),
        ({"rank": 0}, "rank must be > 0"),
        ({"routing": "expert"}, "unknown routing"),
    ],
)
def test_lily_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LilyConfig(**kwargs)


def test_lily_config_defaults_and_stride() -> None:
    config = LilyConfig(targets=["k", "v"])  # lists (from YAML) become tuples
    assert config.targets == ("k", "v")
    assert (config.rank, config.num_experts, config.scale, config.routing) == (32, 4, 1.0, "batch")
    assert config.resolve_lp_stride(12) == 3  # official: 12 // ne
    with pytest.raises(ValueError, match=r"lp_stride=13 .* depth 12"):
        LilyConfig(lp_stride=13).resolve_lp_stride(12)


def test_lora_config_scaling_and_validation() -> None:
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.5)


def test_running_mix_follows_the_training_mixes_by_hand() -> None:
    adapter = LilyAdapter(
        2,
        2,
        depth=2,
        rank=2,
        num_experts=2,
        lp_stride=1,
        scale=1.0,
        routing="batch",
        nonlinear=False,
        running_momentum=0.5,
    )
    assert torch.equal(adapter.running_mix, torch.full((2, 2), 0.5))  # starts uniform
    assert "running_mix" in adapter.state_dict() and "running_mix" not in dict(adapter.named_parameters())
    with torch.no_grad():
        adapter.lp[1].weight.copy_(torch.eye(2))
        adapter.router[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # Rows z = (ln 3, 0) and (0, 0): softmax (3/4, 1/4) and (1/2, 1/2); batch mix (5/8, 3/8).
    x = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    adapter.train()
    adapter(x, 1)
    # momentum 0.5: (1/2 + 5/8) / 2 = 9/16; block 0 untouched.
    torch.testing.assert_close(adapter.running_mix, torch.tensor([[0.5, 0.5], [9 / 16, 7 / 16]]))
    adapter.eval()
    adapter(x, 1)  # eval never updates the running mix
    torch.testing.assert_close(adapter.running_mix[1], torch.tensor([9 / 16, 7 / 16]))


def test_running_eval_routing_uses_the_stored_mix_and_uniform_has_no_router() -> None:
    kwargs = dict(depth=1, rank=1, num_experts=2, lp_stride=1, scale=1.0, nonlinear=False)
    running = LilyAdapter(1, 1, routing="batch", eval_routing="running", **kwargs)
    uniform = LilyAdapter(1, 1, routing="uniform", **kwargs)
    assert len(uniform.router) == 0 and not hasattr(uniform, "running_mix")
    for adapter, mix in ((running, (0.25, 0.75)), (uniform, (0.5, 0.5))):
        with torch.no_grad():
            adapter.lp[0].weight.fill_(2.0)
            adapter.hp.copy_(torch.tensor([[[1.0]], [[5.0]]]))
            if adapter is running:
                adapter.running_mix.copy_(torch.tensor([[0.25, 0.75]]))
        adapter.eval()
        # delta = 2x * (mix_0 * 1 + mix_1 * 5), whatever else is in the batch
        expected = 2.0 * (mix[0] + 5.0 * mix[1])
        for batch in (torch.tensor([[1.0]]), torch.tensor([[1.0], [-7.0], [30.0]])):
            assert adapter(batch, 0)[0].item() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_routing": "sometimes"}, "unknown eval_routing"),
        ({"routing": "token", "eval_routing": "running"}, "does not depend on the batch"),
        ({"running_momentum": 0.0}, "running_momentum"),
    ],
)
def test_lily_config_rejects_bad_routing_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LilyConfig(**kwargs)


# --- the lean batch / fixed-mix delta against plain autograd ---------------------------------------------


def plain_lily(adapter: LilyAdapter, x: torch.Tensor, block: int, mix: torch.Tensor | None) -> torch.Tensor:
    """Second formulation of one block's delta in plain autograd ops, from the adapter's raw weights."""
    z = x @ adapter.lp[block // adapter.lp_stride].weight.T
    if isinstance(adapter.act, torch.nn.ReLU):
        z = torch.relu(z)
    if mix is None:  # batch routing: the softmax averaged over every row
        mix = torch.softmax(z @ adapter.router[block].weight.T, dim=-1).mean(dim=(0, 1))
    return (z * adapter.scale) @ sum(mix[e] * adapter.hp[e] for e in range(adapter.hp.shape[0]))


@pytest.mark.parametrize("mode", ["batch", "running", "uniform"])
@pytest.mark.parametrize("nonlinear", [False, True])
def test_lean_delta_gradients_equal_plain_autograd(mode: str, nonlinear: bool) -> None:
    torch.manual_seed(0)
    adapter = LilyAdapter(
        6,
        5,
        depth=2,
        rank=3,
        num_experts=4,
        lp_stride=1,
        scale=0.7,
        routing="uniform" if mode == "uniform" else "batch",
        nonlinear=nonlinear,
        eval_routing="running" if mode == "running" else "batch",
    )
    with torch.no_grad():
        adapter.hp.normal_()
        if mode == "running":
            adapter.running_mix.copy_(torch.softmax(torch.randn(2, 4), -1))
    adapter.train(mode != "running")
    mix = {"batch": None, "uniform": torch.full((4,), 0.25)}.get(mode)
    if mode == "running":
        mix = adapter.running_mix[1]
    x = torch.randn(2, 7, 6, requires_grad=True)
    weights = torch.randn(2, 7, 5)  # a loss that weighs every output differently

    grads = {}
    for name, fn in (("lean", lambda: adapter(x, 1)), ("plain", lambda: plain_lily(adapter, x, 1, mix))):
        adapter.zero_grad(set_to_none=True)
        x.grad = None
        out = fn()
        (out * weights).sum().backward()
        grads[name] = {"out": out.detach(), "x": x.grad.clone()}
        grads[name] |= {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    assert (
        grads["lean"].keys() == grads["plain"].keys()
        and "hp" in grads["lean"]
        and "lp.1.weight" in grads["lean"]
    )
    for key, value in grads["plain"].items():
        torch.testing.assert_close(grads["lean"][key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_scaled_mix_passes_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.softmax(torch.randn(3, dtype=torch.float64, generator=g), 0).requires_grad_()
    hp = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: scaled_mix(*a, 0.7), (z, weights, hp))


def test_batch_routing_saves_only_the_input_and_rank_sized_tensors() -> None:
    # What backward keeps of one batch-routed delta: the input x (for the LP gradient), z, the router's
    # softmax and the (E,) mix - no scaled copy of z and no (r, out) mixed bank.
    adapter = LilyAdapter(
        16, 64, depth=1, rank=4, num_experts=2, lp_stride=1, scale=0.5, routing="batch", nonlinear=False
    )
    params = {p.untyped_storage().data_ptr() for p in adapter.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(3, 5, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter(x, 0)
    floats = 3 * 5 * 16 + 3 * 5 * 4 + 3 * 5 * 2 + 2  # x, z, softmax, mix
    assert sum(saved.values()) == 4 * floats


def test_an_empty_training_batch_leaves_the_running_mix_alone() -> None:
    adapter = LilyAdapter(
        3, 3, depth=1, rank=2, num_experts=2, lp_stride=1, scale=1.0, routing="batch", nonlinear=False
    )
    adapter.train()
    assert adapter(torch.zeros(0, 5, 3), 0).shape == (0, 5, 3)
    assert torch.equal(adapter.running_mix, torch.full((1, 2), 0.5))  # not NaN: no image, no update
