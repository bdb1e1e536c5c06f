"""Checkpoints that survive a kill: ``last.ckpt`` rewritten atomically every epoch, ``last`` found only in the
run's own folder, and one clear message for every way a checkpoint can be missing, damaged or not fit.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from ..adapters import METHOD_SETTINGS, SIZE_KNOBS, knob_setting
from ..errors import UsageError
from ..files import write_atomically
from ..paths import resolve_path, shown_path

log = logging.getLogger(__name__)

LAST = "last.ckpt"
CHECKPOINTS = "checkpoints"  # <run folder>/checkpoints/last.ckpt
EVALUATING = ("validate", "test", "predict")
# Settings that fix the shapes of the trainable tensors: a checkpoint only fits a model built with the same.
_SHAPE_SETTINGS = ("backbone", "method", "num_classes", "img_size")
# method -> the config whose fields shape its adapters
_ADAPTER_SETTINGS = {method: setting for method, setting in METHOD_SETTINGS.items() if setting}
# How a trained model is loaded and evaluated, not what it learnt (the frozen backbone is not in a
# checkpoint): the command's values win over a checkpoint's (cli.LilyCLI._parse_ckpt_path) and may change
# on resume.
EVALUATION_SETTINGS = frozenset(
    {"report", "weights", "pretrained", "compile", "lily.eval_routing", "predict_top_k"}
)
DIVERGED_HINT = (
    "Train again with a lower --model.lr, a longer warm-up (--model.warmup_epochs), or in full precision "
    "(--trainer.precision 32-true) if it ran in 16-mixed or bf16-mixed."
)
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


def non_finite_summary(state: Mapping[str, Any]) -> str | None:
    """``"3 of 53 tensors hold NaN or inf values (a, b, c)"``, or None when every tensor is finite."""
    bad = [
        name
        for name, tensor in state.items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if not bad:
        return None
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"{len(bad)} of {len(state)} tensors hold NaN or inf values ({shown})"


def check_finite(path: Path, checkpoint: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of a diverged run: every number computed from it would be meaningless."""
    summary = non_finite_summary(checkpoint["state_dict"])
    if summary is not None:
        raise UsageError(
            f"checkpoint {path} is unusable: {summary}; the run that wrote it diverged. {DIVERGED_HINT}"
        )


def flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"lily.rank": 4, ...}`` from hyper-parameters as saved (dicts) or built (dataclasses, Namespaces)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    elif isinstance(value, argparse.Namespace):  # jsonargparse's Namespace subclasses it
        value = vars(value)
    if not isinstance(value, Mapping):
        return {prefix: list(value) if isinstance(value, tuple) else value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flat_settings(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    keys: Iterable[str],
    ignore: frozenset[str] = frozenset(),
) -> list[str]:
    """``"model.lily.rank: checkpoint has 4, config says 8"`` for each setting under ``keys`` that differs
    (evaluation settings and ``ignore`` aside); a setting missing on either side is not compared."""
    saved_flat = flat_settings({k: saved[k] for k in keys if k in saved})
    current_flat = flat_settings({k: current[k] for k in keys if k in current})
    return [
        f"model.{key}: checkpoint has {saved_flat[key]}, config says {current_flat[key]}"
        for key in sorted(saved_flat.keys() & current_flat.keys() - EVALUATION_SETTINGS - ignore)
        if saved_flat[key] != current_flat[key]
    ]


def budget_sized(settings: Mapping[str, Any]) -> frozenset[str]:
    """The knob a budget sets (``{"lora.rank"}``) when ``settings`` give one: the configs' value of it is
    replaced by the budget's (and the checkpoint records that), so it is no difference of its own."""
    method = str(settings.get("method"))
    knob, config = SIZE_KNOBS.get(method), settings.get(METHOD_SETTINGS.get(method) or "")
    if settings.get("budget") is None or knob is None or config is None or not knob.sizes(config):
        return frozenset()
    return frozenset({knob_setting(method, config)})


def mismatched_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The shape-fixing model settings that differ (see :func:`_differences`)."""
    adapter = _ADAPTER_SETTINGS.get(str(current.get("method")))
    return _differences(saved, current, [*_SHAPE_SETTINGS, *([adapter] if adapter else [])])


def check_resumable(path: str | Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume with other model settings than the checkpoint's (evaluation settings aside).

    A resumed run keeps the checkpoint's AdamW state and the scheduler's saved base learning rate, so a new
    ``lr`` or schedule would be written into the hyper-parameters but not followed (nor would one run
    follow any single config if it were): the honest choices are the old settings or a new run.
    """
    method = str(current.get("method", saved.get("method")))
    # The other method's config is unused; class names come from the data and check_fits compares them.
    skipped = set(_ADAPTER_SETTINGS.values()) - {_ADAPTER_SETTINGS.get(method)} | {"class_names"}
    keys = [key for key in current if key not in skipped]
    differences = _differences(saved, current, keys, budget_sized(current))
    if differences:
        raise UsageError(
            f"`fit --ckpt_path` would resume {path} with other settings than it was trained with:\n  "
            + "\n  ".join(differences)
            + "\nA resumed run keeps the checkpoint's optimiser state and learning-rate curve, so these "
            "would be recorded but not followed. Resume with the checkpoint's settings, or train anew with "
            "the new ones: leave out --ckpt_path (and set another trainer.default_root_dir to keep this run)."
        )


def check_fits(
    path: Path,
    checkpoint: Mapping[str, Any],
    model_hparams: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
) -> None:
    """Refuse a checkpoint whose trainable tensors were shaped by other settings than this model's, or
    that was trained on other classes than ``class_names`` (the data's)."""
    saved = checkpoint.get("hyper_parameters") or {}
    differences = mismatched_settings(saved, model_hparams)
    if not differences:
        problem = class_names_problem(saved.get("class_names"), class_names)
        if problem:
            raise UsageError(f"checkpoint {path}: {problem}")
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


def load_trained(model: L.LightningModule, path: Path) -> None:
    """Load what a run learnt (adapter + head; the backbone is frozen) from checkpoint ``path`` into
    ``model``, through the model's own checks, as Lightning's restore does for `test` and `predict`."""
    checkpoint = read_checkpoint(path)
    model.on_load_checkpoint(checkpoint)  # refuses a checkpoint of another model
    model.load_state_dict(checkpoint["state_dict"], strict=False)


def class_names_problem(
    trained: Sequence[str] | None, given: Sequence[str] | None, given_what: str = "the data"
) -> str | None:
    """Why a model trained on classes ``trained`` cannot be used with ``given``'s, naming the classes that
    differ; None when they are the same (or one side has no names: checkpoints from before class names)."""
    if trained is None or given is None or list(trained) == list(given):
        return None
    only_trained = [name for name in trained if name not in set(given)]
    only_given = [name for name in given if name not in set(trained)]
    if not only_trained and not only_given:
        return (
            f"the model was trained on the same classes as {given_what} has, but in another order (its class "
            f"ids would mean other classes): trained {list(trained)}, {given_what} {list(given)}."
        )
    return (
        f"the model was trained on other classes than {given_what} has: only in the model's: "
        f"{', '.join(only_trained) or '-'}; only in {given_what}: {', '.join(only_given) or '-'}. Use the "
        "classes it was trained on (e.g. the same class folders), or train a new model on these."
    )
