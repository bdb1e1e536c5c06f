"""Fixtures shared by the end-to-end CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lily_lightning.data import write_synthetic_vtab_task

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 4-class VTAB-1k-layout task ``shapes`` at 32 px: 48 + 16 training images, 64 test."""
    root = tmp_path_factory.mktemp("vtab")
    write_synthetic_vtab_task(
        root, "shapes", NUM_CLASSES, n_train800=48, n_val200=16, n_test=64, image_size=32
    )
    return root


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
