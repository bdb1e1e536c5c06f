"""A small, learnable image task written in the VTAB-1k layout, for tests, benchmarks and end-to-end runs."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

_STRIPE_PERIODS = (4, 8, 16)  # a second cue, so classes with close hues still differ


def synthetic_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image whose class shows as hue and stripe period, under Gaussian noise and a random phase."""
    hue = (label // len(_STRIPE_PERIODS)) / max(1, -(-num_classes // len(_STRIPE_PERIODS)))
    period = _STRIPE_PERIODS[label % len(_STRIPE_PERIODS)]
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    rows = (np.arange(size) + rng.integers(period)) // (period // 2) % 2  # 0/1 stripes, random phase
    shade = 0.6 + 0.4 * rows[:, None, None]  # (size, 1, 1): dark and light stripes
    pixels = colour * shade * np.ones((size, size, 1)) + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_synthetic_vtab_task(
    root: Path,
    name: str,
    num_classes: int,
    n_train800: int = 80,
    n_val200: int = 20,
    n_test: int = 100,
    image_size: int = 32,
    seed: int = 0,
    image_format: Literal["png", "jpg"] = "png",
) -> Path:
    """Write ``root/name`` as a VTAB-1k task folder and return it.

    Same files as a real task (``train800.txt``, ``val200.txt``, ``train800val200.txt`` = both, ``test.txt``,
    images under ``images/<split>/``). Labels cycle through 0..num_classes-1 in shuffled order, so every
    class is present once a split has ``num_classes`` images. Classes are learnable: each has its own
    hue/stripe-period pair, with per-image noise. ``n_train800=800, n_val200=200`` gives the real sizes.
    """
    rng = np.random.default_rng(seed)
    task_dir = Path(root) / name
    lines: dict[str, list[str]] = {}
    for split, count in (("train800", n_train800), ("val200", n_val200), ("test", n_test)):
        (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        labels = rng.permutation(np.arange(count) % num_classes)
        lines[split] = []
        for index, label in enumerate(labels.tolist()):
            relative = f"images/{split}/{index:05d}.{image_format}"
            synthetic_image(label, num_classes, image_size, rng).save(task_dir / relative)
            lines[split].append(f"{relative} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (task_dir / f"{split}.txt").write_text("".join(f"{line}\n" for line in split_lines))
    return task_dir
