"""The VTAB-1k exporter on TFDS's own mock data: ``python tfds_mock_worker.py SPEC.json EXPORTER.py ARGS``.

Runs in the TFDS venv (no lily_lightning there). SPEC.json: ``{"metadata_dir": D, "splits": {"<TFDS dataset
spec>": {"<split>": <examples>, ...}, ...}}``. Each listed dataset gets a ``dataset_info.json`` with those
split sizes, so the exporter resolves its slices against them; a dataset left out has no metadata, as if TFDS
had never prepared it. ``tfds.testing.mock_data`` then fabricates examples from each dataset's real feature
spec (800 per split, whatever the slice: the exporter takes what the slice should hold). Images larger than
64x64 (resisc45, patch_camelyon, eurosat, dmlab, smallnorb) are all zero: TFDS encodes each fake image as
PNG, and noise of 256x256x3 took ~0.1 s an image (resisc45 alone ~100 s); the small ones stay random (the
resume test compares dtd's and clevr's bytes, dsprites' 0/1 pixels test their scaling).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

MOCK_EXAMPLES = 800  # the largest slice the exporter reads (train800)
LARGEST_RANDOM_IMAGE = 64 * 64  # values (height x width x channels); a larger image is all zero


def write_metadata(metadata_dir: Path, splits: dict[str, dict[str, int]]) -> None:
    for dataset, sizes in splits.items():
        builder = tfds.builder(dataset, data_dir=str(metadata_dir))
        infos = [
            tfds.core.SplitInfo(name=name, shard_lengths=[count], num_bytes=0, filename_template=None)
            for name, count in sizes.items()
        ]
        builder.info.set_splits(tfds.core.SplitDict(infos))
        Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)


random_feature = mocking.RandomFakeGenerator._generate_random_obj


def cheap_feature(self: Any, feature: Any, tensor_info: Any, rng: np.random.Generator) -> Any:
    """The mock's random value of one feature, but zeros for a fixed-shape image over the limit."""
    shape = tensor_info.shape
    large = None not in shape and np.prod(shape) > LARGEST_RANDOM_IMAGE
    if isinstance(feature, tfds.features.Image) and large:
        return np.zeros(shape, tensor_info.np_dtype)
    return random_feature(self, feature, tensor_info, rng)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    metadata_dir = Path(spec["metadata_dir"])
    write_metadata(metadata_dir, spec["splits"])
    # The mock fills each unknown dimension with a random 5..49 (10 with constant_dynamic_shape); real CLEVR
    # scenes hold 3..10 objects, which VTAB's 8 count classes assume, so every sequence gets 10 elements.
    defaults = mocking.RandomFakeGenerator.__init__.__defaults__
    constant_shape = (*defaults[:2], True, *defaults[3:])  # (num_sub_examples, max_value, constant, seed)
    # max_value=2: pixels 0/1 keep the mock's images small; class labels still cover their whole range.
    with (
        mock.patch.object(mocking.RandomFakeGenerator.__init__, "__defaults__", constant_shape),
        mock.patch.object(mocking.RandomFakeGenerator, "_generate_random_obj", cheap_feature),
        tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, max_value=2, data_dir=str(metadata_dir)),
    ):
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
