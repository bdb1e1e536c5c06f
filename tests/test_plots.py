"""plots: routing weights against a hand-written forward, and every figure renders to a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lily_lightning import LilyConfig, LoRAConfig, inject
from lily_lightning.studies.plots import (
    learning_curves,
    parameter_plot,
    read_metrics,
    results_bar_chart,
    routing_heatmap,
    routing_weights,
)


@pytest.fixture
def lily_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    inject(model, LilyConfig(rank=4, num_experts=3))
    for adapter in model.adapters.values():
        nn.init.normal_(adapter.hp, std=0.5)  # non-zero experts, so each block's input depends on the mix
    return model.eval()


def reference_router_means(model: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """softmax(router_i(act(LP(x_i)))) averaged over images and tokens, by a hand-written pass of timm's
    pre-norm block (x + attn(norm1 x), then + mlp(norm2 x)); no hooks."""
    adapters = model.adapters
    rows: dict[str, list[torch.Tensor]] = {site: [] for site in adapters}

    def probs(site: str, block: int, x: torch.Tensor) -> None:
        adapter = adapters[site]
        z = adapter.lp[block // adapter.lp_stride](x)
        z = F.relu(z) if site == "mlp" else z  # the mlp site has a ReLU (official lily.py)
        rows[site].append(F.softmax(adapter.router[block](z), -1).reshape(-1, adapter.hp.shape[0]).mean(0))

    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for i, block in enumerate(model.blocks):
            h = block.norm1(x)
            probs("k", i, h)
            probs("v", i, h)
            x = x + block.ls1(block.attn(h))
            h = block.norm2(x)
            probs("mlp", i, h)
            x = x + block.ls2(block.mlp(h))
    return {site: torch.stack(r).numpy() for site, r in rows.items()}


def test_routing_weights_match_a_hand_written_forward_and_rows_sum_to_one(lily_vit: nn.Module) -> None:
    images = torch.rand(4, 3, 32, 32)
    weights = routing_weights(lily_vit, [images[:2], (images[2:], torch.zeros(2))])
    # batch routing mixes the experts per batch, so a block's input depends on its batch: one reference per
    # batch, averaged (equal batch sizes)
    halves = [reference_router_means(lily_vit, images[:2]), reference_router_means(lily_vit, images[2:])]
    expected = {site: (halves[0][site] + halves[1][site]) / 2 for site in halves[0]}
    assert list(weights) == ["k", "v", "mlp"]
    for site in expected:
        assert weights[site].shape == (6, 3)
        np.testing.assert_allclose(weights[site], expected[site], atol=1e-5)
        np.testing.assert_allclose(weights[site].sum(1), np.ones(6), atol=1e-6)
    assert not np.allclose(weights["k"], 1 / 3, atol=1e-3)  # a real mix, not the uniform one


def tiny_lily(config: LilyConfig) -> nn.Module:
    return inject(timm.create_model("test_vit", pretrained=False, img_size=32), config)


def test_a_site_without_routers_shows_uniform_weights() -> None:
    model = tiny_lily(LilyConfig(rank=4, num_experts=3, routing="uniform"))
    assert not model.adapters["v"].router  # uniform routing has no routers
    weights = routing_weights(model, [torch.rand(2, 3, 32, 32)])
    for site in ("k", "v", "mlp"):
        np.testing.assert_allclose(weights[site], np.full((6, 3), 1 / 3))


def test_running_eval_routing_shows_the_running_mix() -> None:
    model = tiny_lily(LilyConfig(rank=4, num_experts=3, eval_routing="running"))
    for adapter in model.adapters.values():
        adapter.running_mix.copy_(torch.tensor([0.5, 0.3, 0.2]))  # what eval uses, whatever the input
    weights = routing_weights(model.train(), [torch.rand(2, 3, 32, 32)])
    np.testing.assert_allclose(weights["mlp"], np.tile([0.5, 0.3, 0.2], (6, 1)), atol=1e-7)
    assert model.training  # the mode is restored


def test_lora_has_no_routing() -> None:
    model = inject(timm.create_model("test_vit", pretrained=False, img_size=32), LoRAConfig())
    with pytest.raises(ValueError, match="no Lily sites"):
        routing_weights(model, [torch.rand(1, 3, 32, 32)])


def write_metrics(run_dir: Path, version: int, rows: list[dict[str, float]]) -> None:
    path = run_dir / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    names = ["epoch", "step", "train/loss", "lr", "val/acc", "test/acc"]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, names)
        writer.writeheader()
        writer.writerows(rows)


def test_learning_curves_merge_a_resumed_run_and_render(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "dtd" / "lily"
    write_metrics(run, 0, [{"epoch": 0, "step": s, "train/loss": 2.0 - s / 10, "lr": 1e-3} for s in range(3)])
    # the resumed run repeats step 2 with another value and goes on; `test` logs at step 0 in its own version
    write_metrics(run, 1, [{"epoch": 1, "step": s, "train/loss": 1.0, "lr": 5e-4} for s in (2, 3)])
    write_metrics(run, 2, [{"epoch": 1, "step": 0, "test/acc": 0.75}])
    metrics = read_metrics(run)
    assert metrics["train/loss"] == [(0, 2.0), (1, 1.9), (2, 1.0), (3, 1.0)]
    assert metrics["test/acc"] == [(0, 0.75)]
    fig = learning_curves({"Lily": run}, save=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    acc_ax = fig.axes[1]
    assert acc_ax.lines[-1].get_xdata()[0] == 3  # the test score sits at the end of training
    assert [ax.get_ylabel() for ax in fig.axes] == ["train loss", "top-1 accuracy", "learning rate"]


def test_heatmap_bars_and_parameter_plot_render(tmp_path: Path) -> None:
    weights = {"k": np.full((12, 4), 0.25), "mlp": np.eye(4)[np.arange(12) % 4]}
    routing_heatmap(weights, save=tmp_path / "heatmap.png")
    fig = results_bar_chart({"lily": {"dtd": 0.7}, "lora": {"dtd": 0.6, "svhn": 0.9}}, ["dtd", "svhn"],
                            save=tmp_path / "bars.png")  # fmt: skip
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert heights == [60.0, 70.0, 90.0]  # no zero bar for Lily's missing svhn
    fig = parameter_plot("vit_base_patch16_224", ranks=(8, 32), experts=(4,), save=tmp_path / "params.png")
    lora, lily = (line.get_ydata() for line in fig.axes[0].lines[:2])
    # tests/test_inject.py's ViT-B/16 counts: LoRA r=8 on q, v 294,912; Lily r=32, E=4 792,576
    assert (lora[0], lily[1]) == pytest.approx((0.294912, 0.792576))
    for name in ("heatmap", "bars", "params"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
