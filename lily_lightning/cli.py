"""``python -m lily_lightning``: LightningCLI for fit/validate/test/predict, plus ``prepare``, ``data``,
``sweep``, ``report`` and ``export``.

The Lightning subcommands take YAML configs (``--config``, layered left to right) and overrides such as
``--data.name dtd --model.lily.rank 16``; ``data.num_classes`` is linked into the model.
"""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from .checkpointing import (
    LAST,
    AtomicCheckpointIO,
    LastCheckpoint,
    check_fits,
    checkpoint_file,
    read_checkpoint,
    resolve_checkpoint,
)
from .errors import UsageError, usage_message
from .module import ViTClassifier
from .paths import resolve_path, shown_path
from .predictions import PredictionCSVWriter
from .progress import PlainProgress
from .training.run_lock import RunLock, RunLockHeartbeat, hold_for_fit

USAGE = """usage: python -m lily_lightning {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]
       python -m lily_lightning prepare demo [--cache-dir DIR] [--force]
       python -m lily_lightning data check --root ROOT [--name TASK]
       python -m lily_lightning sweep --config CONFIG.yaml --tasks vtab|fgvc|TASK... [--methods lily lora]
       python -m lily_lightning report RUNS_DIR [--out DIR]
       python -m lily_lightning export --config CONFIG.yaml --ckpt_path RUN.ckpt --out MODEL.safetensors"""


class LilyCLI(LightningCLI):
    """LightningCLI with the class count linked from the data and per-run defaults for logs and checkpoints.

    Unless the config says otherwise, a run writes to ``runs/<task>/<method>/``: CSV and TensorBoard logs,
    and ``checkpoints/last.ckpt`` (adapter + head + optimiser state, rewritten atomically every epoch) so
    ``fit --ckpt_path last`` resumes an interrupted run; ``last`` means that file and no other. `fit` holds
    the run folder's lock (``training.run_lock``) until it ends, so two writers never train one run at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._own_run_lock: RunLock | None = None
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self._own_run_lock is not None:
                self._own_run_lock.release()

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
        # Lightning rebuilds the model from the checkpoint's hyper-parameters, over the command line. How a
        # trained model evaluates is no part of what it learnt: an eval_routing the command sets wins.
        super()._parse_ckpt_path()
        key = f"{self.config.get('subcommand')}.model.lily.eval_routing"
        eval_routing = self.explicit_config.get(key)
        if eval_routing is not None:
            self.config[key] = eval_routing

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        task = getattr(self.datamodule, "task", None) or "task"
        method = getattr(self.model, "method", "model")
        run_dir = Path(config.get("default_root_dir") or Path("runs") / task / method)
        kwargs.setdefault("default_root_dir", str(run_dir))
        if config.get("logger") in (None, True):
            kwargs["logger"] = [
                CSVLogger(run_dir, name="csv"),
                TensorBoardLogger(run_dir, name="tensorboard", default_hp_metric=False),
            ]
        callbacks = list(config.get("callbacks") or [])
        if self.subcommand == "fit" and rank_zero_only.rank == 0:  # DDP: one process per run takes it
            lock, owned = hold_for_fit(run_dir)
            self._own_run_lock = lock if owned else None
            callbacks.append(RunLockHeartbeat(lock))

        def wanted(kind: type, switch: str) -> bool:
            # None means "not set" in the parsed config; only an explicit False switches a default off.
            return config.get(switch) is not False and not any(isinstance(c, kind) for c in callbacks)

        if wanted(ModelCheckpoint, "enable_checkpointing"):
            every = self._get(self.config_init, "checkpoint_every_n_steps", default=0) or 0
            callbacks.append(LastCheckpoint(run_dir / "checkpoints", every_n_train_steps=every))
        if wanted(ProgressBar, "enable_progress_bar"):
            callbacks.append(progress_callback(run_dir))
        if self.subcommand == "predict":
            callbacks.append(PredictionCSVWriter(run_dir / "predictions.csv"))
        kwargs["callbacks"] = callbacks
        kwargs["plugins"] = with_atomic_checkpoint_io(config.get("plugins"))
        self._resolve_checkpoint(run_dir / "checkpoints")
        return super().instantiate_trainer(**kwargs)

    def _resolve_checkpoint(self, checkpoint_dir: Path) -> None:
        """Point the subcommand at the checkpoint file it runs from, after checking it fits the model."""
        if self.subcommand is None:
            return
        ckpt_path = self._get(self.config_init, "ckpt_path")
        path = resolve_checkpoint(self.subcommand, ckpt_path, checkpoint_dir)
        if path is not None:
            check_fits(path, read_checkpoint(path), self.model.hparams)
        elif self.subcommand == "fit" and (checkpoint_dir / LAST).is_file():
            logging.getLogger("lily_lightning").warning(
                "Starting a new run: %s of an earlier run will be overwritten when this one ends its first "
                "epoch. To continue that run instead, add `--ckpt_path last`.",
                checkpoint_dir / LAST,
            )
        self.config_init[self.subcommand]["ckpt_path"] = None if path is None else str(path)


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
    )


def _show_package_logs() -> None:
    """Our INFO lines (an inferred class count, cache building) reach the console, like Lightning's own."""
    logger = logging.getLogger("lily_lightning")
    if not logger.handlers:
        logger.addHandler(RichHandler(show_path=False, show_time=False))
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _show_package_logs()
    try:
        if args[:1] == ["prepare"]:
            if args[1:2] != ["demo"]:
                raise UsageError(f"unknown `prepare` target {args[1:2]}; the one target is `demo`\n{USAGE}")
            from .demo import main as prepare_demo_main

            return prepare_demo_main(args[2:])
        if args[:1] == ["data"]:
            if args[1:2] != ["check"]:
                raise UsageError(f"unknown `data` command {args[1:2]}; the one command is `check`\n{USAGE}")
            from .data.check import main as data_check_main

            return data_check_main(args[2:])
        if args[:1] == ["sweep"]:
            from .sweep import main as sweep_main

            return sweep_main(args[1:])
        if args[:1] == ["report"]:
            from .report import main as report_main

            return report_main(args[1:])
        check_config_files(args)
        if args[:1] == ["export"]:
            from .export import main as export_main

            return export_main(args[1:])
        # LightningCLI reads sys.argv itself when called from the command line.
        run_lightning(None if argv is None else args)
    except KeyboardInterrupt:
        # Ctrl-C before or after Lightning's own handler (which exits 1 itself): no stack trace either.
        _print_error("interrupted (Ctrl-C).")
        return 130
    except Exception as e:
        message = _user_message(e)
        if message is None:
            raise
        _print_error(message)
        return 2
    return 0


def _print_error(message: str) -> None:
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print("[bold red]error:[/bold red]", Text(message))


def _user_message(error: BaseException) -> str | None:
    """The one message for an error the user can fix, or None for a bug (shown with its traceback)."""
    usage_error = _find_usage_error(error)
    if usage_error is not None:
        return usage_message(usage_error)
    if isinstance(
        error, MisconfigurationException
    ):  # Lightning's word for a trainer setting that cannot work
        return (
            f"the trainer cannot be set up: {error}\nCheck trainer.accelerator, devices, strategy, precision "
            "(`--print_config` shows them); e.g. `--trainer.accelerator cpu` on a machine without a GPU."
        )
    return None


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


def _find_usage_error(error: BaseException | None) -> UsageError | None:
    """The UsageError behind ``error``: jsonargparse re-raises errors from __init__ as its own ValueError."""
    while error is not None:
        if isinstance(error, UsageError):
            return error
        error = error.__cause__ or error.__context__
    return None
