"""Fixtures shared by the end-to-end CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lily_lightning.cli import main
from lily_lightning.data import write_synthetic_vtab_task

NUM_CLASSES = 4

# The suite runs as two pytest-xdist workers (scripts/test: -n 2) on CI's two cores: one thread each, and in
# the processes they start (OMP_NUM_THREADS), or four threads fight over two cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 4-class VTAB-1k-layout task ``shapes`` at 32 px: 48 + 16 training images, 64 test.
    One for the whole session, so a fit on it can be shared too: never write into it."""
    root = tmp_path_factory.mktemp("vtab")
    write_synthetic_vtab_task(
        root, "shapes", NUM_CLASSES, n_train800=48, n_val200=16, n_test=64, image_size=32
    )
    return root


@pytest.fixture(scope="session")
def fitted(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, Path]:
    """(config, checkpoint) of a short Lily fit with batch routing (the paper's, and the default): three
    steps, no validation. Shared by every test that only reads it (export, refusals)."""
    from test_cli import tiny_run_config

    tmp = tmp_path_factory.mktemp("fit")
    config = tiny_run_config(tmp, data_root, epochs=1)
    args = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "0"]
    assert main(["fit", "--config", str(config), *args]) == 0
    return config, tmp / "run" / "checkpoints" / "last.ckpt"


def one_epoch_config(path: Path, data_root: Path, trainer: str, model: str) -> Path:
    """A one-epoch CPU config at 32 px for generated tasks under ``data_root`` (batch 8), with extra
    ``trainer:`` and ``model:`` lines (indented YAML), for the sweep and study tests."""
    path.write_text(
        f"""
seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
{trainer}
model:
  pretrained: false
  img_size: 32
  drop_path_rate: 0.0
{model}
data:
  class_path: lily_lightning.data.VTAB1kDataModule
  init_args:
    root: {data_root}
    name: alpha
    batch_size: 8
    eval_batch_size: 16
    num_workers: 0
    image_size: 32
"""
    )
    return path
