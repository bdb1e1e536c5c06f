"""Running routing statistics through the CLI (fit -> checkpoint -> test), and the exported merged model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_cli import trainable_tensors

from lily_lightning import LilyConfig, unmerge
from lily_lightning.cli import main
from lily_lightning.training.export_command import ExportCLI, export_model
from lily_lightning.training.lightning_cli import run_lightning
from lily_lightning.training.module import ViTClassifier
from lily_lightning.vit.export import load_exported

SITES = ("k", "v", "mlp")


def test_running_statistics_survive_fit_checkpoint_test_and_eval_routing_is_switchable(
    fitted: tuple[Path, Path], tmp_path: Path
) -> None:
    config, checkpoint = fitted
    saved = trainable_tensors(checkpoint)
    for site in SITES:  # three training steps moved every block's mix off its uniform start
        assert not torch.allclose(saved[f"model.adapters.{site}.running_mix"], torch.tensor(0.5))
    # The same run as if fit had said eval_routing: running (the checkpoint's hyper-parameters say so).
    stored = torch.load(checkpoint, weights_only=False)
    stored["hyper_parameters"]["lily"]["eval_routing"] = "running"
    running_checkpoint = tmp_path / "running.ckpt"
    torch.save(stored, running_checkpoint)

    # The checkpoint's value unless the test command sets one: that wins either way.
    for ckpt, override, expected in (
        (checkpoint, "running", "running"),
        (running_checkpoint, None, "running"),
        (running_checkpoint, "batch", "batch"),
    ):
        args = [
            "test",
            "--config",
            str(config),
            "--ckpt_path",
            str(ckpt),
            "--trainer.limit_test_batches",
            "1",
        ]
        cli = run_lightning(args + (["--model.lily.eval_routing", override] if override else []))
        for site in SITES:
            adapter = cli.model.model.adapters[site]
            assert adapter.eval_routing == expected
            assert torch.equal(adapter.running_mix, saved[f"model.adapters.{site}.running_mix"])


def test_export_cli_refuses_batch_routing_and_writes_the_mlp_side_branch(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, checkpoint = fitted
    out = tmp_path / "model.safetensors"
    args = ["export", "--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(out)]
    assert main(args) == 2
    assert "eval_routing running" in capsys.readouterr().err and not out.exists()
    # Built as `export` builds it; kept to compare with after unmerging it.
    exported = run_lightning(["test", *args[1:], "--model.lily.eval_routing", "running"], ExportCLI).model
    with safe_open(str(out), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert json.loads(metadata["side_branches"]) == ["mlp"] and "load_exported" in metadata["load"]
    assert {k.split(".")[1] for k in keys if k.startswith("adapters.")} == {"mlp"}  # k, v: merged

    images = torch.rand(5, 3, 32, 32)
    mean, std = (torch.tensor(json.loads(metadata[k])).view(1, 3, 1, 1) for k in ("input_mean", "input_std"))
    with torch.no_grad():
        torch.testing.assert_close(
            load_exported(out)((images - mean) / std), unmerge(exported)(images), atol=1e-5, rtol=1e-5
        )


TIMM_ONLY = """
import json, sys
import timm, torch
from safetensors import safe_open

path, data = sys.argv[1:]
with safe_open(path, "pt") as f:
    metadata = f.metadata()
statement, expression = metadata["load"].split("; ", 1)
assert statement == "import timm"
model = eval(expression).eval()  # the file's own instructions
data = torch.load(data)
mean, std = (torch.tensor(json.loads(metadata[k])).view(1, 3, 1, 1) for k in ("input_mean", "input_std"))
with torch.no_grad():
    logits = model((data["images"] - mean) / std)
torch.testing.assert_close(logits, data["logits"], atol=1e-5, rtol=1e-5)
assert "lily_lightning" not in sys.modules
print("reproduced", tuple(logits.shape))
"""


def test_exported_linear_sites_are_a_plain_timm_checkpoint(tmp_path: Path) -> None:
    lily = LilyConfig(
        rank=4, num_experts=2, targets=("q", "k", "v", "proj", "fc1", "fc2"), eval_routing="running"
    )
    model = ViTClassifier(
        "test_vit", num_classes=3, pretrained=False, img_size=32, lily=lily, normalize="imagenet"
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.requires_grad:  # adapters and head
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
        for adapter in model.model.adapters.values():
            adapter.running_mix.copy_(torch.rand(adapter.running_mix.shape, generator=g).softmax(-1))
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        logits = model.eval()(images)
    out = tmp_path / "model.safetensors"
    export_model(model, out)
    torch.save({"images": images, "logits": logits}, tmp_path / "data.pt")
    with safe_open(str(out), "pt") as f:
        assert not any(".base." in k or k.startswith("adapters.") for k in f.keys())  # noqa: SIM118 - a safe_open handle is no dict
    run = subprocess.run(
        [sys.executable, "-c", TIMM_ONLY, str(out), str(tmp_path / "data.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "reproduced (4, 3)" in run.stdout
