"""Checkpoints that survive a kill: ``last.ckpt`` rewritten atomically every epoch, ``last`` found only in the
run's own folder, and one clear message for every way a checkpoint can be missing, damaged or not fit.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from .errors import UsageError
from .files import write_atomically
from .paths import resolve_path, shown_path

log = logging.getLogger(__name__)

LAST = "last.ckpt"
EVALUATING = ("validate", "test", "predict")
# Settings that fix the shapes of the trainable tensors: a checkpoint only fits a model built with the same.
_SHAPE_SETTINGS = ("backbone", "method", "num_classes", "img_size")
_ADAPTER_SETTINGS = {"lily": "lily", "lora": "lora"}  # method -> the config whose fields shape its adapters
# Adapter fields that only say how a trained model evaluates: a test command may set them (see cli.py).
_EVAL_ONLY_SETTINGS = frozenset({"lily.eval_routing"})
# What torch.load raises for a file that is not a (complete) torch checkpoint.
_UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile, OSError)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a hidden ``.<name>.partial`` file in the same folder, then renames it over the
    target (``files.write_atomically``): a kill during a save leaves the previous file.

    Lightning 2.6's own ``_atomic_save`` serialises to memory first but then writes the target in place, so a
    kill during the write truncates it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:  # TorchCheckpointIO's own refusal message
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        resume = (
            "Free space or make the folder writable, then resume: the same command plus `--ckpt_path last`."
        )
        write_atomically(Path(path), buffer.getbuffer(), self.write, fix=resume)

    def write(self, file: IO[bytes], data: memoryview) -> None:
        """Write the serialised checkpoint; a separate step so a test can slow it down and kill a save."""
        file.write(data)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location, weights_only=weights_only)


class LastCheckpoint(ModelCheckpoint):
    """Rewrites ``<dirpath>/last.ckpt`` at the end of every training epoch (after its validation) and, with
    ``every_n_train_steps``, every that many optimiser steps; the file is overwritten, never versioned.

    Lightning 2.6's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` only when training
    ends: its epoch-end "last" save follows a top-k save, and there is none with ``save_top_k=0``.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 0) -> None:
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=0,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    @property
    def path(self) -> Path:
        return Path(self.dirpath or ".") / LAST

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Saved even when a step-interval save already wrote this global step: only the epoch-end file
        # records the epoch as complete (and holds its validation result).
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            held = (
                f"{self.path} holds the last completed one"
                if self.path.is_file()
                else "no epoch is saved yet"
            )
            log.warning(
                "Interrupted in epoch %d, which is not saved; %s. Resume with the same command plus "
                "`--ckpt_path last`.",
                trainer.current_epoch,
                held,
            )


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", weights_only: bool | None = True
) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint; a missing, damaged or foreign file is a UsageError naming it."""
    path = Path(path)
    hint = f"Point --ckpt_path at a {LAST} written by `fit` (<run folder>/checkpoints/), or use last."
    if path.is_dir():
        inside = sorted(path.rglob("*.ckpt"))[:3]
        found = f"; checkpoints inside it: {', '.join(map(str, inside))}" if inside else " (no .ckpt inside)"
        raise UsageError(f"--ckpt_path {shown_path(path)} is a folder, not a checkpoint file{found}. {hint}")
    if not path.is_file():
        raise UsageError(f"checkpoint {shown_path(path)} does not exist. {hint}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except _UNREADABLE as e:
        raise UsageError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): it is truncated or damaged (e.g. copied "
            f"or written only in part) or not a checkpoint at all. {hint} To start a new run instead, run "
            "`fit` without --ckpt_path."
        ) from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(f"{path} is a torch file but not a Lightning checkpoint (no state_dict). {hint}")
    return checkpoint


def resolve_checkpoint(subcommand: str, ckpt_path: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint file a subcommand runs from: ``last`` means ``<checkpoint_dir>/last.ckpt`` and nothing
    else (Lightning's own ``last`` may pick the newest ``last-vN.ckpt`` of an unrelated older run).

    ``validate``/``test``/``predict`` need one: every method trains at least a new head, so without a
    checkpoint they would report a random model. ``fit --ckpt_path last`` before any epoch ended starts anew.
    """
    last = checkpoint_dir / LAST
    point = (
        f"Point at a checkpoint with --ckpt_path PATH/{LAST}, or use --ckpt_path last with the config (or "
        "trainer.default_root_dir) of the run that wrote it."
    )
    if ckpt_path is None:
        if subcommand in EVALUATING:
            raise UsageError(
                f"`{subcommand}` needs a trained checkpoint: without --ckpt_path the adapter and head would "
                f"be untrained (random). This config's run folder is {shown_path(checkpoint_dir.parent)}. "
                + point
            )
        return None
    if ckpt_path == "last":
        if last.is_file():
            return last
        if subcommand in EVALUATING:
            raise UsageError(
                f"--ckpt_path last: there is no {shown_path(last)}: no `fit` with this config has finished "
                f"an epoch in the run folder {checkpoint_dir.parent}. {point}"
            )
        log.warning(
            "--ckpt_path last: no %s yet, so no epoch to resume from: training starts at epoch 0.", last
        )
        return None
    return checkpoint_file(ckpt_path)


def checkpoint_file(ckpt_path: str) -> Path:
    """An explicit ``--ckpt_path`` (``~`` and ``cache:`` expanded); Lightning's other keywords are refused."""
    if ckpt_path in ("best", "hpc") or "://" in ckpt_path:
        raise UsageError(
            f"--ckpt_path {ckpt_path}: a run keeps one checkpoint, checkpoints/{LAST}; pass its path or last."
        )
    return resolve_path(ckpt_path)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"lily.rank": 4, ...}`` from hyper-parameters as saved (dicts) or built (dataclasses, Namespaces)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    elif isinstance(value, argparse.Namespace):  # jsonargparse's Namespace subclasses it
        value = vars(value)
    if not isinstance(value, Mapping):
        return {prefix: list(value) if isinstance(value, tuple) else value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def mismatched_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"lily.rank: checkpoint has 4, config says 8"`` for every shape-fixing model setting that differs."""
    keys = [*_SHAPE_SETTINGS]
    adapter = _ADAPTER_SETTINGS.get(str(current.get("method")))
    if adapter is not None:
        keys.append(adapter)
    saved_flat = _flat({k: saved[k] for k in keys if k in saved})
    current_flat = _flat({k: current[k] for k in keys if k in current})
    return [
        f"model.{key}: checkpoint has {saved_flat[key]}, config says {current_flat[key]}"
        for key in sorted(saved_flat.keys() & current_flat.keys() - _EVAL_ONLY_SETTINGS)
        if saved_flat[key] != current_flat[key]
    ]


def check_fits(path: Path, checkpoint: Mapping[str, Any], model_hparams: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose trainable tensors were shaped by other settings than this model's."""
    differences = mismatched_settings(checkpoint.get("hyper_parameters") or {}, model_hparams)
    if not differences:
        return
    classes = any(d.startswith("model.num_classes") for d in differences)
    why = (
        " (num_classes is linked from the data: the checkpoint was trained on another task)"
        if classes
        else ""
    )
    raise UsageError(
        f"checkpoint {path} does not fit this model{why}:\n  "
        + "\n  ".join(differences)
        + "\nUse the settings the checkpoint was trained with, or leave out --ckpt_path (fit: start a new "
        "run, with another trainer.default_root_dir to keep the old one)."
    )
