"""End to end through the real CLI entry point: fit -> test -> predict, adapter-only checkpoints, resume."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import NUM_CLASSES

from lily_lightning import LilyConfig, UsageError
from lily_lightning.cli import main
from lily_lightning.training.module import ViTClassifier


def tiny_run_config(
    tmp_path: Path, data_root: Path, epochs: int, method: str = "lily", backbone: str = "test_vit"
) -> Path:
    """A real config file, as a user writes one: timm's smallest registered ViT (`test_vit`: 6 blocks of width
    64) at 32 px, the paper's curve shortened."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  max_epochs: {epochs}
  accelerator: cpu
  devices: 1
  deterministic: true
  log_every_n_steps: 1
  check_val_every_n_epoch: 1
  enable_progress_bar: false
  default_root_dir: {tmp_path / "run"}
model:
  backbone: {backbone}
  pretrained: false
  img_size: 32
  method: {method}
  lily: {{rank: 4, num_experts: 2}}
  lora: {{rank: 2, alpha: 2}}
  drop_path_rate: 0.1
  lr: 3.0e-3
  warmup_epochs: 1
  min_lr: 1.0e-4
data:
  class_path: lily_lightning.data.VTAB1kDataModule
  init_args:
    root: {data_root}
    name: shapes
    batch_size: 16
    eval_batch_size: 64
    num_workers: 0
    image_size: 32
"""
    )
    return config


def result_line(text: str) -> dict[str, str]:
    line = next(line for line in text.splitlines() if line.startswith("RESULT "))
    return dict(re.findall(r"(\w+)=(\S+)", line))


def trainable_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=False, map_location="cpu")["state_dict"]


def test_fit_then_test_learns_and_checkpoints_only_trainable_tensors(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=6)
    assert main(["fit", "--config", str(config)]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    state = trainable_tensors(checkpoint)
    # Exactly the adapter (with its running routing mixes) and the new head: each shared bank once, no
    # frozen backbone tensor.
    assert {k for k in state if k.endswith(".hp")} == {f"model.adapters.{s}.hp" for s in ("k", "v", "mlp")}
    assert all(k.startswith(("model.adapters.", "model.head.")) for k in state)
    assert state["model.head.weight"].shape[0] == NUM_CLASSES  # linked from the data, never typed
    dim, depth, rank, experts = 64, 6, 4, 2
    groups = depth // (depth // experts)
    kv = groups * dim * rank + experts * rank * dim + depth * rank * experts
    mlp = groups * dim * 2 * rank + experts * 2 * rank * dim + depth * 2 * rank * experts
    running = {k: v for k, v in state.items() if k.endswith(".running_mix")}
    assert set(running) == {f"model.adapters.{s}.running_mix" for s in ("k", "v", "mlp")}
    for mix in running.values():  # each block's running average of its training mixes: a distribution
        assert mix.shape == (depth, experts) and torch.allclose(mix.sum(-1), torch.ones(depth))
    trained = sum(v.numel() for k, v in state.items() if k not in running)
    assert trained == 2 * kv + mlp + NUM_CLASSES * (dim + 1)

    capsys.readouterr()
    assert main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)]) == 0
    result = result_line(capsys.readouterr().out)
    assert result["task"] == "shapes" and result["method"] == "lily"
    assert float(result["top1"]) >= 0.6  # chance is 0.25 on four balanced classes

    assert main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint)]) == 0
    assert main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint)]) == 0
    rows = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,file,label,class,confidence" and len(rows) == 1 + 64
    assert rows[1].startswith("0,images/test/00000.png,")


def test_resume_from_last_matches_an_uninterrupted_run(tmp_path: Path, data_root: Path) -> None:
    whole = tiny_run_config(tmp_path / "whole", data_root, epochs=3)
    assert main(["fit", "--config", str(whole)]) == 0

    # Interrupted after 2 of 3 epochs (64 images / batch 16 = 4 steps each), resumed with `--ckpt_path last`.
    parts = tiny_run_config(tmp_path / "parts", data_root, epochs=3)
    assert main(["fit", "--config", str(parts), "--trainer.max_steps", "8"]) == 0
    assert main(["fit", "--config", str(parts), "--ckpt_path", "last"]) == 0

    expected = trainable_tensors(tmp_path / "whole" / "run" / "checkpoints" / "last.ckpt")
    resumed = trainable_tensors(tmp_path / "parts" / "run" / "checkpoints" / "last.ckpt")
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), key


@pytest.mark.parametrize("method", ["lora", "linear_probe", "full"])
def test_baselines_train_the_right_tensors(tmp_path: Path, data_root: Path, method: str) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=1, method=method)
    assert main(["fit", "--config", str(config), "--trainer.limit_train_batches", "1"]) == 0
    state = trainable_tensors(tmp_path / "run" / "checkpoints" / "last.ckpt")
    if method == "lora":
        assert all(k.startswith(("model.adapters.q.", "model.adapters.v.", "model.head.")) for k in state)
        assert sum(v.numel() for v in state.values()) == 6 * 2 * 2 * (64 + 64) + NUM_CLASSES * 65
    elif method == "linear_probe":
        assert set(state) == {"model.head.weight", "model.head.bias"}
    else:
        assert "model.blocks.0.attn.qkv.weight" in state


def test_missing_data_folder_is_one_clear_message(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    assert main(["fit", "--config", str(config), "--data.root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Expected layout" in err
    assert "Traceback" not in err


def test_unknown_backbone_and_bad_target_are_one_clear_message(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    assert main(["fit", "--config", str(config), "--model.backbone", "vit_tiny_patch99"]) == 2
    assert "unknown timm backbone 'vit_tiny_patch99'" in capsys.readouterr().err
    assert main(["fit", "--config", str(config), "--model.lily.targets", "[k, qkv]"]) == 2
    assert "valid sites are" in capsys.readouterr().err


def test_checkpoint_from_another_method_is_refused(tmp_path: Path, data_root: Path) -> None:
    # Through the CLI a checkpoint's own hyper-parameters rebuild the model; in Python, a mismatch is refused.
    config = tiny_run_config(tmp_path, data_root, epochs=1, method="linear_probe")
    assert main(["fit", "--config", str(config), "--trainer.limit_train_batches", "1"]) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    lily = ViTClassifier("test_vit", num_classes=NUM_CLASSES, pretrained=False, img_size=32)
    with pytest.raises(UsageError, match=r"lacks .* tensors of this model"):
        lily.on_load_checkpoint(checkpoint)


@pytest.mark.slow
def test_compiled_fit_resume_and_test_write_eager_checkpoints(tmp_path: Path, data_root: Path) -> None:
    # model.compile: true through the CLI (inductor, a minute on 2 cores): fit 1 epoch, resume to 2, test;
    # the checkpoint has the eager model's keys and loads into an eager model. No validation passes during
    # fit: each would compile the eval graph once more (test_compile.py compares eval outputs).
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    config.write_text(config.read_text().replace("  method: lily\n", "  method: lily\n  compile: true\n"))
    no_validation = ["--trainer.limit_val_batches", "0"]
    assert main(["fit", "--config", str(config), *no_validation]) == 0
    config.write_text(config.read_text().replace("max_epochs: 1", "max_epochs: 2"))
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", *no_validation]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)]) == 0
    saved = trainable_tensors(checkpoint)
    eager = ViTClassifier(
        "test_vit",
        num_classes=NUM_CLASSES,
        pretrained=False,
        img_size=32,
        lily=LilyConfig(rank=4, num_experts=2),
    )
    assert set(saved) == eager._saved_keys()
    eager.load_state_dict(saved, strict=False)
    assert all(torch.equal(eager.state_dict()[key], value) for key, value in saved.items())
