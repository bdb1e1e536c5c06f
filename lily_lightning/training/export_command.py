"""``python -m lily_lightning export``: a trained run as one merged ``.safetensors`` file in timm's format.

The model is built exactly as ``test`` builds it (``run_lightning``: config files, overrides, the checkpoint's
hyper-parameters, the same checkpoint checks), loaded with :func:`load_trained`, then merged and written by
:func:`lily_lightning.vit.export.export_vit` instead of being tested.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

from lightning.pytorch.cli import LightningArgumentParser

from ..errors import UsageError
from ..files import check_out_file
from ..paths import shown_path
from ..vit.export import export_vit
from .checkpointing import load_trained
from .inference import inference_config
from .lightning_cli import LilyCLI, check_config_files, run_lightning
from .module import ViTClassifier

SUFFIX = ".safetensors"
USAGE = (
    "usage: python -m lily_lightning export --config CONFIG.yaml --ckpt_path RUN.ckpt --out FILE [--force]"
)


def check_out(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse, before any work, an ``--out`` that would lose work (the checkpoint itself; without ``force``,
    any existing file), cannot be written, or would not load as what it is.

    A name without ``.safetensors`` is refused rather than given the suffix: timm's ``load_checkpoint``
    reads any other name as a pickle, so the printed load line would fail on it, and a file written under
    another name than the one asked for would be missed by whatever looks for that name.
    """
    if out.exists() and not out.is_dir() and out.samefile(checkpoint):
        raise UsageError(
            f"--out {out} is the checkpoint being exported (--ckpt_path): writing there would replace it, "
            f"--force or not. Choose another --out, e.g. {out.with_name('model.safetensors')}"
        )
    check_out_file(out, force, out / "model.safetensors")
    if out.suffix != SUFFIX:
        raise UsageError(
            f"--out {shown_path(out)} does not end in {SUFFIX}: timm loads a file as safetensors only by "
            f"that suffix (any other name it unpickles, which fails for this file). Use --out {out}{SUFFIX}"
        )


def export_model(classifier: ViTClassifier, out: Path) -> dict[str, str]:
    """Merge ``classifier``'s ViT (in place, eval mode) and write it with its head to ``out``."""
    hparams = classifier.hparams
    adapter_config = None
    if classifier.method in ("lily", "lora"):
        config = hparams.lily if classifier.method == "lily" else hparams.lora
        # A dataclass when built in Python, a dict when LightningCLI built it.
        fields = asdict(config) if is_dataclass(config) else dict(config)
        adapter_config = {"method": classifier.method, **fields}
    classifier.eval()
    return export_vit(
        classifier.model,
        out,
        timm_name=hparams.backbone,
        class_names=classifier.class_names,
        preprocessing=inference_config(classifier),
        normalized=hparams.normalize != "none",
        adapter_config=adapter_config,
    )


class ExportCLI(LilyCLI):
    """The ``test`` command's model building, then :func:`export_model` instead of testing."""

    writes_run_folder = False  # it writes --out alone
    out_file: ClassVar[dict[str, tuple[str, bool]]] = {"test": ("the .safetensors file to write", True)}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        # `export` runs as LightningCLI's `test`: its --help must name `export`, not `test`.
        super()._add_subcommands(parser, **kwargs)
        test_parser = parser._subcommands_action._name_parser_map["test"]
        test_parser.prog = USAGE.removeprefix("usage: ").split(" --")[0]
        test_parser.description = __doc__.split("\n\n")[0].strip("`").replace("``", "")

    def test(self, model: ViTClassifier, ckpt_path: str | None = None, **_: Any) -> None:
        # LightningCLI calls a method named after the subcommand instead of the Trainer's.
        if not ckpt_path or not Path(ckpt_path).is_file():
            raise UsageError(f"export needs --ckpt_path of a checkpoint file, got {ckpt_path!r}\n{USAGE}")
        out = Path(self.config["test"]["out"])
        check_out(out, Path(ckpt_path), self.config["test"]["force"])
        load_trained(model, Path(ckpt_path))
        metadata = export_model(model, out)
        print(f"EXPORT out={out} side_branches={metadata['side_branches']}\nload: {metadata['load']}")
        print(f"input: {metadata['input']}", flush=True)


def main(args: list[str]) -> int:
    check_config_files(args)
    run_lightning(["test", *args], ExportCLI)
    return 0
