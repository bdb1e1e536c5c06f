"""The Lightning commands (fit, validate, test, predict): LightningCLI with this package's run defaults.

A run writes to ``runs/<task>/<method>/`` unless the config says otherwise: CSV and TensorBoard logs, plain
progress lines (``train.log``) off a terminal, and ``checkpoints/last.ckpt`` rewritten atomically every epoch.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..errors import UsageError
from ..files import check_writable_folder
from ..paths import resolve_path, shown_path
from .checkpointing import (
    CHECKPOINTS,
    EVALUATION_SETTINGS,
    LAST,
    AtomicCheckpointIO,
    LastCheckpoint,
    check_finite,
    check_fits,
    check_resumable,
    checkpoint_file,
    flat_settings,
    read_checkpoint,
    resolve_checkpoint,
)
from .module import ViTClassifier
from .predictions import PredictionCSVWriter, predictions_file
from .previous import set_aside_earlier_outputs
from .progress import PlainProgress
from .run_lock import RunLock, RunLockHeartbeat, hold_for_fit


class LilyCLI(LightningCLI):
    """LightningCLI with the class count linked from the data and per-run defaults for logs and checkpoints.

    Unless the config says otherwise, a run writes to ``runs/<task>/<method>/``: CSV and TensorBoard logs,
    and ``checkpoints/last.ckpt`` (adapter + head + optimiser state, rewritten atomically every epoch) so
    ``fit --ckpt_path last`` resumes an interrupted run; ``last`` means that file and no other. `fit` holds
    the run folder's lock (``training.run_lock``) until it ends, so two writers never train one run at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._own_run_lock: RunLock | None = None
        self._checkpoint_class_names: list[str] | None = None  # see _parse_ckpt_path
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self._own_run_lock is not None:
                self._own_run_lock.release()

    # Whether the subcommand writes into the run folder (logs, checkpoints, results), which is checked first.
    writes_run_folder = True
    # The subcommands that write one file the user may name (--out, refused when it exists unless --force):
    # subcommand -> (help, required).
    out_file: ClassVar[dict[str, tuple[str, bool]]] = {
        "predict": (
            "the CSV file to write (default: a new predictions.csv, predictions-2.csv ... in the run folder)",
            False,
        )
    }

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=0,
            help=f"also rewrite checkpoints/{LAST} every this many optimiser steps (0: at epoch ends only)",
        )
        # Under DDP the data modules share out each global batch themselves (data.sampling), without
        # Lightning's padding sampler, so N processes see the batches of one and evaluate each image once.
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        int_before_float(parser)

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in self.out_file:
            what, required = self.out_file[subcommand]
            parser.add_argument("--out", type=str | None, default=None, required=required, help=what)
            parser.add_argument("--force", action="store_true", help="replace an existing --out file")
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        # `main` passes the arguments it dispatched on (`export` rewrites them), so Lightning's warning about
        # args next to sys.argv does not apply.
        self.config = parser.parse_args(args)
        # What the command line and its config files set, defaults left out (see _parse_ckpt_path).
        self.explicit_config = parser.parse_args(args, defaults=False)
        # LightningCLI loads an explicit --ckpt_path right after parsing, for its hyper-parameters: read it
        # first, so a missing or damaged file is one message rather than a stack trace.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last"):
            path = checkpoint_file(ckpt_path)
            read_checkpoint(path)
            self.config[subcommand]["ckpt_path"] = str(path)

    def _parse_ckpt_path(self) -> None:
        # Lightning rebuilds the model from a checkpoint file's hyper-parameters, over the command line and
        # config files. A model setting they set is honoured or refused, never dropped: how a trained model
        # is loaded and evaluated (report, weights, eval_routing ...) is no part of what it learnt, so the
        # command's value wins; `fit` refuses any other that differs, as resuming would not follow it.
        super()._parse_ckpt_path()
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in (None, "last"):  # `last` is checked once the run folder is known
            return
        explicit = self.explicit_config.get(f"{subcommand}.model")
        wanted = flat_settings(explicit.as_dict() if explicit is not None else {})
        for key in EVALUATION_SETTINGS & wanted.keys():
            self.config[f"{subcommand}.model.{key}"] = wanted[key]
        if "class_names" not in wanted:
            # The model is built with the data's class count: a checkpoint trained on other classes is
            # refused by check_fits, which names it and them, rather than by the model's own argument check.
            self._checkpoint_class_names = self.config[f"{subcommand}.model.class_names"]
            self.config[f"{subcommand}.model.class_names"] = None
        if subcommand == "fit" and explicit is not None:
            check_resumable(ckpt_path, self.config[f"{subcommand}.model"].as_dict(), explicit.as_dict())

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        names = self._checkpoint_class_names
        if names is not None and len(names) == self.model.hparams.num_classes:
            self.model.hparams.class_names = list(names)  # as the checkpoint's file rebuild gave them

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        refuse_pure_fp16(config.get("precision"))
        task = getattr(self.datamodule, "task", None) or "task"
        method = getattr(self.model, "method", "model")
        run_dir = Path(config.get("default_root_dir") or Path("runs") / task / method)
        kwargs.setdefault("default_root_dir", str(run_dir))
        if config.get("logger") in (None, True):
            kwargs["logger"] = [
                CSVLogger(run_dir, name="csv"),
                # Ctrl-C joins TensorBoard's writer thread, which can sleep up to flush_secs (default 120)
                # when the interrupt cost it its wake-up: 2 of 24 interrupted fits hung > 60 s under load,
                # 0 of 32 with 10 s (docs/explanation/testing.md).
                TensorBoardLogger(run_dir, name="tensorboard", default_hp_metric=False, flush_secs=10),
            ]
        callbacks = list(config.get("callbacks") or [])

        def wanted(kind: type, switch: str) -> bool:
            # None means "not set" in the parsed config; only an explicit False switches a default off.
            return config.get(switch) is not False and not any(isinstance(c, kind) for c in callbacks)

        if wanted(ModelCheckpoint, "enable_checkpointing"):
            every = self._get(self.config_init, "checkpoint_every_n_steps", default=0) or 0
            callbacks.append(LastCheckpoint(run_dir / CHECKPOINTS, every_n_train_steps=every))
        if wanted(ProgressBar, "enable_progress_bar"):
            callbacks.append(progress_callback(run_dir))
        if self.subcommand == "predict":
            out = self.config_init["predict"].get("out")
            force = bool(self.config_init["predict"].get("force"))
            callbacks.append(
                PredictionCSVWriter(predictions_file(run_dir, resolve_path(out) if out else None, force))
            )
        kwargs["callbacks"] = callbacks
        kwargs["plugins"] = with_atomic_checkpoint_io(config.get("plugins"))
        self._resolve_checkpoint(run_dir / CHECKPOINTS)
        if self.writes_run_folder:
            fix = "Set --trainer.default_root_dir to a folder you can write to (or make this one writable)."
            check_writable_folder(run_dir, fix)
        if self.subcommand == "fit" and rank_zero_only.rank == 0:  # DDP: one process per run takes it
            lock, owned = hold_for_fit(run_dir)
            self._own_run_lock = lock if owned else None
            kwargs["callbacks"].append(RunLockHeartbeat(lock))
            if self.config_init["fit"]["ckpt_path"] is None:  # a new run, in the folder it now holds
                set_aside_earlier_outputs(run_dir)
        return super().instantiate_trainer(**kwargs)

    def _resolve_checkpoint(self, checkpoint_dir: Path) -> None:
        """Point the subcommand at the checkpoint file it runs from, after checking it fits the model."""
        if self.subcommand is None:
            return
        ckpt_path = self._get(self.config_init, "ckpt_path")
        path = resolve_checkpoint(self.subcommand, ckpt_path, checkpoint_dir)
        if path is not None:
            checkpoint = read_checkpoint(path)
            check_finite(path, checkpoint)
            check_fits(path, checkpoint, self.model.hparams, getattr(self.datamodule, "class_names", None))
            if self.subcommand == "fit":
                check_resumable(path, checkpoint.get("hyper_parameters") or {}, self.model.hparams)
        elif self.subcommand == "fit" and (checkpoint_dir / LAST).is_file():
            logging.getLogger("lily_lightning").warning(
                "Starting a new run: %s of an earlier run will be overwritten when this one ends its first "
                "epoch. To continue that run instead, add `--ckpt_path last`.",
                checkpoint_dir / LAST,
            )
        self.config_init[self.subcommand]["ckpt_path"] = None if path is None else str(path)


def int_before_float(parser: LightningArgumentParser) -> None:
    """Parse ``--trainer.limit_test_batches 1`` (and every other int-or-float option) as the int 1: one batch.

    Lightning annotates these ``Union[int, float]``: an int counts batches, a float is a fraction. typing
    caches unions by unordered equality, so when another library built ``Union[float, int]`` first,
    Lightning's annotation is that one and jsonargparse, trying float first, reads ``1`` as 1.0: everything.
    """
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)
        if typing.get_origin(hint) not in (typing.Union, types.UnionType):
            continue
        members = typing.get_args(hint)
        if int in members and float in members and members.index(float) < members.index(int):
            ordered = sorted(members, key=lambda member: member is not int)  # int first, others in order
            action._typehint = functools.reduce(operator.or_, ordered)  # `|` unions are not cached


def refuse_pure_fp16(precision: Any) -> None:
    """Pure float16 (weights and AdamW state in float16, no loss scaling) is refused: the tiny test run's
    loss is NaN at its first step. bf16-true trains (its loss curve follows float32's), so it is allowed."""
    if str(precision) == "16-true":
        raise UsageError(
            "--trainer.precision 16-true (pure float16: weights, gradients and optimiser state in float16, "
            "no loss scaling) is not supported: float16's range overflows and the loss turns NaN within the "
            "first steps. Use --trainer.precision 16-mixed (float16 matmuls, float32 weights, loss scaling) "
            "or bf16-mixed (bf16-true also trains)."
        )


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """The configured Trainer plugins, plus :class:`AtomicCheckpointIO` unless one writes checkpoints."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def progress_callback(run_dir: Path) -> ProgressBar:
    """Rich's live bar on a terminal; plain periodic lines (also in ``train.log``) in a file, pipe or CI."""
    if sys.stdout.isatty():
        return RichProgressBar()
    return PlainProgress(log_file=run_dir / "train.log")


def run_lightning(args: list[str] | None, cli: type[LilyCLI] = LilyCLI) -> LilyCLI:
    return cli(
        ViTClassifier,
        subclass_mode_model=False,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "python -m lily_lightning"},  # what --help shows, not __main__.py
    )


def run_command(args: list[str] | None, config_args: list[str] | None = None) -> int:
    """A Lightning subcommand (``fit``, ``validate``, ``test``, ``predict`` and their arguments) as the
    command line runs it; ``None`` reads ``sys.argv``. ``config_args``: where to find its ``--config`` files
    (``args`` by default), each checked first."""
    check_config_files(config_args if config_args is not None else args or [])
    run_lightning(args)
    return 0


def check_config_files(args: list[str]) -> None:
    """Each ``--config`` file must be a YAML mapping (jsonargparse says "Unexpected config: " for an empty
    one)."""
    files = [value for flag, value in itertools.pairwise(args) if flag in ("--config", "-c")]
    files += [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
    example = "a YAML mapping with trainer:, model: and data: sections, like configs/demo.yaml"
    for name in files:
        path = resolve_path(name)
        if not path.is_file():
            raise UsageError(f"config file {shown_path(path)} does not exist; --config takes {example}.")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UsageError(f"config file {path} is not valid YAML:\n{e}") from e
        if not isinstance(content, dict):
            what = "empty" if content is None else f"a YAML {type(content).__name__}, not a mapping"
            raise UsageError(f"config file {path} is {what}; --config takes {example}.")
