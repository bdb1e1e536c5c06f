"""``python -m lily_lightning``: LightningCLI for fit/validate/test/predict, and prepare, data, export.

The Lightning subcommands take YAML configs (``--config``, layered left to right) and overrides such as
``--data.name dtd --model.lily.rank 16``; ``data.num_classes`` is linked into the model.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from rich.console import Console
from rich.logging import RichHandler

from .errors import UsageError
from .module import ViTClassifier
from .predictions import PredictionCSVWriter

USAGE = """usage: python -m lily_lightning {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]
       python -m lily_lightning prepare demo [--cache-dir DIR] [--force]
       python -m lily_lightning data check --root ROOT [--name TASK]
       python -m lily_lightning export --config CONFIG.yaml --ckpt_path RUN.ckpt --out MODEL.safetensors"""


class LilyCLI(LightningCLI):
    """LightningCLI with the class count linked from the data and per-run defaults for logs and checkpoints.

    Unless the config says otherwise, a run writes to ``runs/<task>/<method>/``: CSV and TensorBoard logs,
    and ``checkpoints/last.ckpt`` (adapter + head + optimiser state, rewritten every epoch) so
    ``fit --ckpt_path last`` resumes an interrupted run.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        # `main` passes the arguments it dispatched on (`export` rewrites them), so Lightning's warning about
        # args next to sys.argv does not apply.
        self.config = parser.parse_args(args)
        # What the command line and its config files set, defaults left out (see _parse_ckpt_path).
        self.explicit_config = parser.parse_args(args, defaults=False)

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

        def wanted(kind: type, switch: str) -> bool:
            # None means "not set" in the parsed config; only an explicit False switches a default off.
            return config.get(switch) is not False and not any(isinstance(c, kind) for c in callbacks)

        if wanted(ModelCheckpoint, "enable_checkpointing"):
            callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0))
        if wanted(ProgressBar, "enable_progress_bar"):
            callbacks.append(RichProgressBar())
        if self.subcommand == "predict":
            callbacks.append(PredictionCSVWriter(run_dir / "predictions.csv"))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


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
        if args[:1] == ["export"]:
            from .export import main as export_main

            return export_main(args[1:])
        # LightningCLI reads sys.argv itself when called from the command line.
        run_lightning(None if argv is None else args)
    except Exception as e:
        usage_error = _find_usage_error(e)
        if usage_error is None:
            raise
        console = Console(stderr=True, soft_wrap=True, highlight=False)
        console.print(f"[bold red]error:[/bold red] {usage_error}")
        return 2
    return 0


def _find_usage_error(error: BaseException | None) -> UsageError | None:
    """The UsageError behind ``error``: jsonargparse re-raises errors from __init__ as its own ValueError."""
    while error is not None:
        if isinstance(error, UsageError):
            return error
        error = error.__cause__ or error.__context__
    return None
