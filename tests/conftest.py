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
