"""The LightningModule: a timm ViT backbone, Lily / LoRA / the visual-PEFT baselines / any HuggingFace PEFT
config / linear probe / full fine-tuning, a new head."""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MaxMetric, MeanMetric, Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from ..adapters import (
    METHOD_SETTINGS,
    SIZE_KNOBS,
    AdapterConfig,
    AdaptFormerConfig,
    BitFitConfig,
    DoRAConfig,
    FacTTTConfig,
    HFPeftConfig,
    LilyConfig,
    LoRAConfig,
    SequentialAdapterConfig,
    SSFConfig,
    VPTConfig,
    knob_setting,
)
from ..adapters.budget import sized_methods
from ..adapters.hf_peft import EXAMPLE as PEFT_EXAMPLE
from ..errors import UsageError
from ..seeding import configured_seed, epoch_seed, run_seed
from ..vit.budget import sized_to_budget
from ..vit.inject import ADAPTERS_ATTR, accept_empty_batches, inject
from ..vit.state import count_parameters, state_problems
from ..vit.weights import load_backbone_weights
from .checkpointing import DIVERGED_HINT, class_names_problem, non_finite_summary
from .confusion import (
    CONFUSION_CSV,
    CONFUSION_PNG,
    class_accuracy,
    confusion_matrix_figure,
    per_class_table,
    write_confusion_csv,
)
from .evaluation_record import eval_routing, evaluation_key, other_settings
from .results import RESULT_FILE, VALIDATION_FILE, result_folder, write_evaluation, write_result
from .schedule import warmup_cosine_lr

Method = Literal[
    "lily",
    "lora",
    "linear_probe",
    "full",
    "bitfit",
    "vpt_shallow",
    "vpt_deep",
    "adapter",
    "adaptformer",
    "ssf",
    "fact_tt",
    "dora",
    "peft",
]
Normalize = Literal["backbone", "imagenet", "none"]
Report = Literal["final", "best_of_evals"]

# Checkpoint key: the task, validation and test split(s) and evaluation settings of the `fit` that wrote it,
# so `test` can decide whether its validation accuracies are test accuracies (best_of_evals), which run folder
# its result belongs to, and whether it is that run's result (training.evaluation_record).
TRAINED_ON = "trained_on"

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def create_backbone(
    name: str, weights: str | None, pretrained: bool, drop_path_rate: float, img_size: int | None
) -> nn.Module:
    """A timm ViT with its classifier removed; weights from a local file, timm's hub, or random."""
    kwargs: dict[str, Any] = {"num_classes": 0, "drop_path_rate": drop_path_rate}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        raise UsageError(
            f"unknown timm backbone {name!r}; did you mean {' or '.join(close) or 'vit_base_patch16_224'}? "
            "`timm.list_models('vit_*')` lists the ViTs."
        )
    hub = pretrained and weights is None
    try:
        model = timm.create_model(name, pretrained=hub, **kwargs)
    except TypeError as e:  # e.g. `img_size` given to a CNN, which has no such argument
        raise UsageError(
            f"backbone {name!r} cannot be built as a ViT ({e}); lily_lightning adapts timm Vision "
            "Transformers: vit_*, deit_*, eva_* ... (`timm.list_models('vit_*')`)."
        ) from e
    except (OSError, RuntimeError) as e:
        if not hub:
            raise
        raise UsageError(
            f"could not fetch pretrained weights for {name!r} from timm's hub ({type(e).__name__}: {e}). "
            "Without internet, pass a local file: --model.weights /path/to/weights.(safetensors|pth|npz)"
        ) from e
    if weights is not None:
        load_backbone_weights(model, weights)
    return accept_empty_batches(model)


def adapter_config(method: str, settings: dict[str, Any]) -> AdapterConfig | None:
    """The config ``method`` injects (from its setting in ``settings``); None for linear_probe and full."""
    if method not in METHOD_SETTINGS:
        return None
    setting = METHOD_SETTINGS[method]
    if setting is None:
        return BitFitConfig()
    config = settings[setting]
    if setting == "peft":  # a mapping (any PEFT config's fields), checked by HFPeftConfig and vit/peft_bridge
        if config is None:
            raise UsageError(f"model.method peft needs a HuggingFace PEFT config: {PEFT_EXAMPLE}")
        return HFPeftConfig(config)
    if setting == "vpt":  # one `vpt` setting for both methods; the method says shallow or deep
        if config.deep and method == "vpt_shallow":
            raise UsageError("model.vpt.deep is true but model.method is vpt_shallow; use method vpt_deep")
        config = replace(config, deep=method == "vpt_deep")
    return config


def _role_size(datamodule: Any, role: str, default: int) -> int:
    """Images in a role's splits when the data module can say (``SplitDataModule``); else ``default``."""
    dataset = getattr(datamodule, "dataset", None)
    return len(dataset(role)) if callable(dataset) else default


def update(metric: Metric, *values: torch.Tensor) -> None:
    """``metric.update(*values)`` unless the batch is empty (DDP's ragged end; torchmetrics rejects those)."""
    if values[-1].numel():
        metric.update(*values)


class ViTClassifier(L.LightningModule):
    """Fine-tune a frozen timm ViT with Lily (default), LoRA, a linear probe, or fully.

    Args:
        backbone: timm model name, e.g. ``vit_base_patch16_224.orig_in21k`` (the paper's ViT-B/16 IN-21k).
        num_classes: classes of the new head (the CLI links it from the data module).
        weights: local ``.safetensors`` / ``.pth`` / ``.npz`` backbone weights (``cache:`` paths are
            resolved to the user cache, see ``prepare demo``); overrides ``pretrained``.
        pretrained: with no ``weights``, download timm's pretrained weights (needs internet).
        method: ``lily`` / ``lora`` (adapters from ``lily`` / ``lora``), the visual-PEFT baselines
            ``bitfit``, ``vpt_shallow`` / ``vpt_deep`` (config ``vpt``), ``adapter``, ``adaptformer``,
            ``ssf``, ``fact_tt``, ``dora`` (each from the setting of its name), ``peft`` (HuggingFace
            PEFT's own layers, from ``peft``), ``linear_probe`` (head only), ``full`` (every parameter).
        lily: Lily's config (used when ``method: lily``).
        lora: LoRA's config (used when ``method: lora``).
        vpt, adapter, adaptformer, ssf, fact_tt, dora: the configs of those methods (``adapters/``).
        budget: a target count of trainable adapter parameters (head excluded): the method's size knob
            (``adapters.SIZE_KNOBS``: Lily's, LoRA's, DoRA's and FacT's rank, the adapters' bottleneck, VPT's
            length, the sizing field of a PEFT type: ``r``, FourierFT's ``n_frequency``) is set to the value
            whose count on this backbone is closest (ties: the smaller), whatever its config says; the
            hyper-parameters record the value. Methods with a fixed count (and PEFT types without a size
            field, such as OFT) refuse one.
        peft: any HuggingFace PEFT config as a mapping, used when ``method: peft``: ``peft_type`` (``LORA``,
            ``LILY``, ``VERA``, ``LOHA``, ``LOKR``, ``OFT``, ``BOFT``, ``FOURIERFT``, ``HRA``, ...) plus that
            config's fields, its ``target_modules`` naming timm's modules (``qkv``, ``proj``, ``fc1``,
            ``fc2``); on the command line as JSON: ``--model.peft '{"peft_type": "LORA", "r": 8,
            "target_modules": ["qkv"]}'``. Needs the ``peft`` extra. Its runs are named after the type
            (``peft_lora``, ``peft_dora``, ``peft_lily``, ...): RESULT lines, results, run folders.
        img_size: input resolution, if not the backbone's default (the position table is resampled).
        normalize: input normalisation: the backbone's pretrained mean/std, ImageNet's, or none (the
            official Lily ViT code feeds [0, 1] pixels). Data modules yield [0, 1] pixels.
        drop_path_rate: stochastic depth in the frozen backbone (0.1 in the official code).
        label_smoothing: for the cross-entropy loss.
        lr, weight_decay: AdamW on the trainable tensors (paper: 1e-3, 1e-4); lr 0 trains nothing.
        warmup_epochs, warmup_lr, min_lr: the cosine schedule (paper: 10 epochs from 1e-6, down to 1e-5).
        report: the accuracy the results line reports: ``final`` (the final model's test accuracy) or
            ``best_of_evals`` (the best of the validation evaluations and the final test, as the
            official code reports: with ``split_mode: train800val200`` validation runs on the test split).
            Validation on any other split or task is no test accuracy: then best_of_evals is absent and
            ``report: best_of_evals`` is refused.
        compile: ``torch.compile`` the backbone (adapters included) in place; checkpoints are the same
            as an eager model's, so either kind loads the other's. Train and eval mode compile once each.
        class_names: the name of each class id; taken from the data module at ``setup`` when not given
            (and then saved in checkpoints): `test`, `predict`, the Python loader and `export` show them.
            A checkpoint is refused for data whose class names differ.
        predict_top_k: `predict` writes the k most probable classes of each image, with probabilities.
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224.orig_in21k",
        num_classes: int = 1000,
        weights: str | None = None,
        pretrained: bool = True,
        method: Method = "lily",
        lily: LilyConfig = LilyConfig(),  # noqa: B008 - configs are never mutated; a plain (non-Optional)
        lora: LoRAConfig = LoRAConfig(),  # noqa: B008   type lets the CLI report a bad value in one line
        vpt: VPTConfig = VPTConfig(),  # noqa: B008
        adapter: SequentialAdapterConfig = SequentialAdapterConfig(),  # noqa: B008
        adaptformer: AdaptFormerConfig = AdaptFormerConfig(),  # noqa: B008
        ssf: SSFConfig = SSFConfig(),  # noqa: B008
        fact_tt: FacTTTConfig = FacTTTConfig(),  # noqa: B008
        dora: DoRAConfig = DoRAConfig(),  # noqa: B008
        budget: int | None = None,
        peft: dict[str, Any] | None = None,
        img_size: int | None = None,
        normalize: Normalize = "backbone",
        drop_path_rate: float = 0.1,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 10.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        report: Report = "final",
        compile: bool = False,
        class_names: list[str] | None = None,
        predict_top_k: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise UsageError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise UsageError(
                f"model.class_names names {len(class_names)} classes, num_classes is {num_classes} (linked "
                "from the data's classes): give as many names as the data has classes, or leave "
                "model.class_names out (the data's names are taken)."
            )
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("warmup_lr", warmup_lr),
                            ("min_lr", min_lr)):  # fmt: skip
            if not value >= 0:  # NaN too; torch's AdamW would refuse it with a bare ValueError
                raise UsageError(
                    f"model.{name} must be >= 0, got {value}. Typical values: model.lr 1e-3, "
                    "model.weight_decay 1e-4 (the paper's)."
                )
        if not 1 <= predict_top_k <= num_classes:
            raise UsageError(
                f"model.predict_top_k must be in 1..num_classes ({num_classes}), got {predict_top_k}"
            )
        self.save_hyperparameters()
        self.method, self.report = method, report

        self.model = create_backbone(backbone, weights, pretrained, drop_path_rate, img_size)
        self.model.reset_classifier(num_classes)
        self.adapter_parameters = 0
        settings = dict(
            lily=lily,
            lora=lora,
            vpt=vpt,
            adapter=adapter,
            adaptformer=adaptformer,
            ssf=ssf,
            fact_tt=fact_tt,
            dora=dora,
            peft=peft,
        )
        config = adapter_config(method, settings)
        knob = SIZE_KNOBS.get(method)
        if knob is not None and not knob.sizes(config):  # a PEFT type without one (OFT, BOFT, ...)
            knob = None
        if config is not None:
            try:
                if budget is not None and knob is not None:
                    config = self._fit_budget(config, budget)
                inject(self.model, config)
            except ValueError as e:
                raise UsageError(str(e)) from e
            self.adapter_parameters = count_parameters(self.model)
            if isinstance(config, HFPeftConfig):  # one method, many PEFT types: results name the type
                self.method = config.label
        elif method == "linear_probe":
            self.model.requires_grad_(False)
        if budget is not None and knob is None:
            self._refuse_budget(budget)
        # The size knob's value, e.g. {"lora.rank": 22}, for result records (None: a method without one).
        self.size = {knob_setting(method, config): knob.value(config)} if knob else None
        self.model.get_classifier().requires_grad_(True)
        if compile:
            # nn.Module.compile compiles in place: the module tree, and so every state_dict key, stays the
            # eager model's (torch.compile(model) would wrap it and prefix each key with `_orig_mod.`).
            self.model.compile()

        mean, std = self._normalization(normalize)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        # Top-1 over all samples (micro); MulticlassAccuracy's default is a macro average over classes.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()  # per image, so a zero-size or ragged batch weighs what it holds
        self.val_images = SumMetric()  # images counted, over every process (`validate` writes it)
        self.test_images = SumMetric()  # images counted, over every process: the test set size, once each
        self.test_class_acc = MulticlassAccuracy(num_classes, average=None)  # which classes fail
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # The data module's eval preprocessing (a timm data config), saved with checkpoints for the loader.
        self.data_config: dict[str, Any] | None = None
        self.val_acc_best = MaxMetric()
        # {"task": ..., "validation_splits": [...], ...} of the fit that trained this model (TRAINED_ON).
        self.trained_on: dict[str, Any] | None = None
        # Epoch and global step of the checkpoint this model was loaded from (None: trained in this process).
        self.loaded_step: dict[str, Any] | None = None
        # Checkpoints hold only the trainable tensors; the frozen backbone comes from `weights`.
        self.strict_loading = False

    def _fit_budget(self, config: AdapterConfig, budget: int) -> AdapterConfig:
        """``config`` with the method's size knob at the value whose count is closest to ``budget``; the
        hyper-parameters (checkpoints, hparams.yaml) record that value."""
        config, value, count = sized_to_budget(self.model, self.method, config, budget)
        knob, setting = SIZE_KNOBS[self.method], METHOD_SETTINGS[self.method]
        label = config.label if isinstance(config, HFPeftConfig) else self.method
        self.hparams[setting] = knob.sized(self.hparams[setting], value)
        # hparams.yaml is written from Lightning's frozen copy of the arguments (hparams_initial): set it too.
        self._hparams_initial[setting] = knob.sized(self._hparams_initial[setting], value)
        log.info(
            "budget %s: %s %s %d -> %s adapter parameters",
            f"{budget:,}",
            label,
            knob.field_in(config),
            value,
            f"{count:,}",
        )
        return config

    def _refuse_budget(self, budget: int) -> None:
        """A method without a size knob trains a fixed count: say which, rather than ignore the budget."""
        head = {id(p) for p in self.model.get_classifier().parameters()}
        trained = (p for p in self.model.parameters() if p.requires_grad and id(p) not in head)
        fixed = self.adapter_parameters or sum(p.numel() for p in trained)  # full: the whole backbone
        raise UsageError(
            f"--model.budget {budget}: method {self.method} has no size knob, it trains a fixed {fixed:,} "
            f"parameters on {self.hparams.backbone} (head excluded). Leave out --model.budget for it; a "
            f"budget sizes {sized_methods()}."
        )

    def _normalization(self, normalize: Normalize) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if normalize == "backbone":
            cfg = self.model.pretrained_cfg
            return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        if normalize == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    @property
    def trainable_parameters(self) -> int:
        """Adapter + head parameters (shared tensors once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)

    @property
    def class_names(self) -> list[str]:
        """The name of each class id (the ids themselves when nobody named them)."""
        names = self.hparams.class_names
        return list(names) if names is not None else [str(i) for i in range(self.hparams.num_classes)]

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._adopt_class_names(getattr(datamodule, "class_names", None))
        self.data_config = getattr(datamodule, "data_config", None) or self.data_config
        # timm's patch embedding asserts the input size; say which two settings disagree instead.
        data_size = getattr(datamodule, "image_size", None)
        model_size = tuple(getattr(getattr(self.model, "patch_embed", None), "img_size", ()))
        if data_size is not None and model_size and model_size != (data_size, data_size):
            raise UsageError(
                f"the data yields {data_size} px images (data.image_size) but the model expects "
                f"{'x'.join(map(str, model_size))} (model.img_size): set both to the same size."
            )

    def _adopt_class_names(self, data_names: list[str] | None) -> None:
        """Take the data's class names, or refuse data whose classes differ from those the model knows."""
        if data_names is None:
            return
        problem = class_names_problem(self.hparams.class_names, data_names)
        if problem:
            raise UsageError(problem)
        if len(data_names) != self.hparams.num_classes:
            raise UsageError(
                f"the data has {len(data_names)} classes, model.num_classes is {self.hparams.num_classes}"
            )
        self.hparams.class_names = list(data_names)  # saved with the hyper-parameters from now on

    # -- steps -----------------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Stochastic depth draws from the global RNG: restart it from (seed, epoch) at each epoch's first
        # batch, after the loader is set up, so a run resumed from an epoch-end checkpoint continues exactly
        # as an uninterrupted one (the data order is (seed, epoch)-keyed too: data.sampling).
        if batch_idx == 0:
            torch.manual_seed(epoch_seed(run_seed(), self.current_epoch) + 1)  # +1: apart from the data order

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        lr = self.optimizers().param_groups[0]["lr"]
        self._stop_if_diverged(loss, lr)
        update(self.train_acc, logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", lr, prog_bar=False)
        return loss

    def _stop_if_diverged(self, loss: torch.Tensor, lr: float) -> None:
        # A NaN loss would otherwise train on silently, and the next save would write NaN tensors. This costs
        # one host sync (and, under DDP, one boolean all-reduce, so every process stops at the same step).
        diverged = not bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(diverged, all=False):
            return
        raise UsageError(
            f"training diverged: the loss is not finite ({float(loss.detach())} on this process) at epoch "
            f"{self.current_epoch}, step {self.global_step}, learning rate {lr:.3g} (model.lr "
            f"{self.hparams.lr:g}). Stopped; the checkpoint saved before this epoch, if any, is kept. "
            + DIVERGED_HINT
        )

    def on_train_start(self) -> None:
        self.loaded_step = None  # from now on, the model in memory is the one this fit trains
        self.trained_on = {
            "task": self._task(),
            "validation_splits": self._role_splits("val"),
            "test_splits": self._role_splits("test"),
            **self._evaluation_settings(),
        }

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        update(self.val_acc, logits, labels)
        update(self.val_loss, F.cross_entropy(logits, labels, reduction="none"))
        self.val_images.update(labels.numel())
        self.log("val/loss", self.val_loss)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
        images = int(self.val_images.compute())
        self.val_images.reset()
        if self.trainer.state.fn == TrainerFn.VALIDATING and self.trainer.is_global_zero:
            self._write_validation(float(self.val_acc.compute()), images)

    def _write_validation(self, top1: float, images: int) -> None:
        """`validate`'s score as ``<run dir>/validation.json`` (what `sweep --select-on val` ranks by) when it
        is its run's complete validation under the run's own settings, else as a record of its own."""
        expected = _role_size(getattr(self.trainer, "datamodule", None), "val", images)
        partial = images < expected
        record = {
            **self._run_description(),
            **self._evaluation_key("validate", partial),
            "val_top1": top1,
            "images": images,
        }
        why = f"the validation covered {images} of the {expected} images (a partial one)" if partial else ""
        self._record_evaluation("validate", record, VALIDATION_FILE, why)

    def _evaluation_settings(self) -> dict[str, Any]:
        """The settings that change an evaluation's numbers but not the model (evaluation_record)."""
        return {
            "precision": str(self.trainer.precision),
            "eval_routing": eval_routing(self.hparams.lily) if self.method == "lily" else None,
            "eval_batch_size": getattr(getattr(self.trainer, "datamodule", None), "eval_batch_size", None),
        }

    def _evaluation_key(self, kind: str, partial: bool) -> dict[str, Any]:
        trained = self.loaded_step or {"epoch": self.current_epoch, "global_step": self.global_step}
        split = self._role_splits("val" if kind == "validate" else "test")
        return evaluation_key(self.trainer.ckpt_path, trained, split, self._evaluation_settings(), partial)

    def _record_evaluation(self, kind: str, record: dict[str, Any], name: str, why: str) -> Path:
        """Write ``record`` as ``name`` (result.json, validation.json) of the run that trained the checkpoint
        when it is that run's complete evaluation under its own settings, else as a new
        ``evaluations/<kind>-<n>.json`` that replaces nothing, and return the file. ``why``: the caller's
        reason it is not the run's (partial); the checkpoint's run, task and settings are checked here."""
        run_dir = Path(self.trainer.default_root_dir)
        trained_task = (self.trained_on or {}).get("task")
        folder, foreign = result_folder(run_dir, self.trainer.ckpt_path, trained_task, self._task())
        differences = other_settings(kind, record, self.trained_on)
        if differences:
            foreign = foreign or f"it ran with other settings than its run's: {', '.join(differences)}"
        why = foreign or why
        if folder is not None and not why:
            path = write_result(folder, record, name)
            if folder.resolve() != run_dir.resolve():
                log.info("%s written to %s: the run folder that trained the checkpoint.", name, path)
            return path
        path = write_evaluation(folder or run_dir, record, kind)
        log.warning("%s not written: %s. This %s is recorded in %s.", name, why, kind, path)
        return path

    def _run_description(self) -> dict[str, Any]:
        """What tells this run apart from another one in a table: task, method, backbone, protocol, seed."""
        datamodule = getattr(self.trainer, "datamodule", None)
        size = tuple(getattr(getattr(self.model, "patch_embed", None), "img_size", None) or ())
        return {
            "task": self._task(),
            "method": self.method,
            "backbone": self.hparams.backbone,
            "split_mode": getattr(datamodule, "split_mode", None),
            "img_size": list(size) or None,
            "seed": configured_seed(),
            "budget": self.hparams.budget,  # the asked count (None: the method's own size)
            "size": self.size,
        }

    def on_test_start(self) -> None:
        note = self._best_of_evals_note()
        if self.report == "best_of_evals" and note is not None:
            raise UsageError(
                f"--model.report best_of_evals: {note}, so its best is no test accuracy. Use --model.report "
                "final, or train with validation on the test split to report the official protocol's number."
            )

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        for metric in (self.test_acc, self.test_class_acc, self.test_confusion):
            update(metric, logits, labels)
        self.test_images.update(labels.numel())
        self.log("test/acc", self.test_acc)
        self.log("test/images", self.test_images, reduce_fx="sum")

    def on_test_epoch_end(self) -> None:
        final = float(self.test_acc.compute())
        note = self._best_of_evals_note()
        best: float | None = None
        if note is None:
            best = max(final, float(self.val_acc_best.compute())) if self.val_acc_best.update_count else final
            self.log("test/acc_best_of_evals", best)
        images = int(self.test_images.compute())  # summed over every process
        matrix = self.test_confusion.compute().cpu().numpy()
        class_acc = self.test_class_acc.compute()  # torchmetrics says 0 for a class without test images
        for index, name in enumerate(self.class_names):
            if matrix[index].sum():
                self.log(f"test/acc_class/{name}", class_acc[index])
        if self.trainer.is_global_zero:
            self._print_results(final, best, note, images, matrix)

    # -- what the numbers mean -------------------------------------------------------------------------

    def _task(self) -> str:
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "task", None) or getattr(datamodule, "name", "?")

    def _role_splits(self, role: str) -> list[str] | None:
        """The split files the data module reads for ``role`` (None for a data module that does not say)."""
        role_splits = getattr(getattr(self.trainer, "datamodule", None), "role_splits", None)
        return list(role_splits()[role]) if role_splits is not None else None

    def _best_of_evals_note(self) -> str | None:
        """Why the validation accuracies are no test accuracies of this test's task, or None if they are."""
        if not self.val_acc_best.update_count:
            return None  # no validation ran: the one evaluation is this test
        if self.trained_on is None:
            return "the checkpoint does not record which task and split its validation ran on"
        trained_task, validated = self.trained_on["task"], self.trained_on["validation_splits"]
        if trained_task != self._task():
            return f"its validation ran on task {trained_task}, this test is on {self._task()}"
        tested = self._role_splits("test")
        if validated is None or validated != tested:
            return (
                f"its validation ran on {'+'.join(validated or ['an unrecorded split'])}, not on the test "
                f"split {'+'.join(tested or ['?'])} (data.split_mode train800val200 for VTAB-1k and trainval "
                "for FGVC validate on the test split)"
            )
        return None

    def _test_set_size(self) -> int | None:
        """Images in the test set (every loader's dataset; None if a dataset has no length)."""
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        try:
            return sum(len(loader.dataset) for loader in loaders)
        except TypeError:  # an iterable-style dataset
            return None

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(images).softmax(-1)
        confidence, label = probs.topk(self.hparams.predict_top_k, dim=-1)  # (B, k) each, most probable first
        return {"label": label, "confidence": confidence}

    def _print_results(
        self, final: float, best: float | None, note: str | None, images: int, matrix: Any
    ) -> None:
        task = self._task()
        reported = final if self.report == "final" else best  # on_test_start refused best_of_evals if None
        expected = self._test_set_size()
        partial = expected is not None and images < expected
        # One plain, greppable line (no Rich wrapping).
        print(
            f"RESULT task={task} method={self.method} "
            f"trainable_params={self.trainable_parameters} adapter_params={self.adapter_parameters} "
            f"top1={reported:.4f} report={self.report} final={final:.4f} "
            f"best_of_evals={'n/a' if best is None else f'{best:.4f}'} images={images} "
            f"partial={str(partial).lower()}",
            flush=True,
        )
        names = self.class_names
        print(f"per-class top-1:\n{per_class_table(matrix, names)}", flush=True)
        if note is not None:
            log.warning("best_of_evals=n/a: %s.", note)
        if partial:
            log.warning(
                "partial test: %d of the %d test images were evaluated (trainer.limit_test_batches?); the "
                'result is marked partial ("partial": true) and is not the task\'s accuracy.',
                images,
                expected,
            )
        # The same numbers for `python -m lily_lightning report` (and `sweep`, which skips finished runs),
        # plus the head's size so tables can count parameters without the head, as papers do.
        result = {
            **self._run_description(),
            "trainable_params": self.trainable_parameters,
            "adapter_params": self.adapter_parameters,
            "head_params": sum(p.numel() for p in self.model.get_classifier().parameters()),
            "top1": reported,
            "report": self.report,
            "final": final,
            "best_of_evals": best,
            "best_of_evals_note": note,
            "images": images,
            **self._evaluation_key("test", partial),  # partial: fewer images than the test set holds
            "class_names": names,
            "per_class_acc": dict(zip(names, class_accuracy(matrix), strict=True)),  # null: no test image
        }
        why = f"the test covered {images} of the {expected} test images (a partial test)" if partial else ""
        path = self._record_evaluation("test", result, RESULT_FILE, why)
        # The confusion matrix goes with the result it belongs to: beside it, named after it.
        prefix = "" if path.name == RESULT_FILE else f"{path.stem}-"
        csv_path, png_path = path.with_name(prefix + CONFUSION_CSV), path.with_name(prefix + CONFUSION_PNG)
        write_confusion_csv(csv_path, matrix, names)
        confusion_matrix_figure(matrix, names, save=png_path, title=f"{task}, {self.method}")
        log.info("Confusion matrix: %s and %s", csv_path, png_path)

    # -- optimisation ----------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Weight decay on every trainable tensor, as the official code does.
        optimizer = torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad], lr=hp.lr, weight_decay=hp.weight_decay
        )
        # The curve is defined in epochs (as the paper's) and sampled per step; ``max_steps`` only cuts a run
        # short, it does not reshape the curve (so an interrupted and resumed run follows the same one).
        trainer = self.trainer
        trainer.fit_loop.setup_data()  # idempotent; the train loader's length is needed here
        steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            total_epochs = float(trainer.max_epochs)
        else:
            total_epochs = trainer.estimated_stepping_batches / steps_per_epoch

        # LambdaLR scales the optimiser's lr; lr 0 (a grid's do-nothing point) keeps every step at 0.
        per_lr = 1.0 / hp.lr if hp.lr else 0.0

        def factor(step: int) -> float:
            epoch = step / steps_per_epoch
            lr = warmup_cosine_lr(epoch, hp.lr, total_epochs, hp.warmup_epochs, hp.warmup_lr, hp.min_lr)
            return lr * per_lr

        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- adapter-only checkpoints ----------------------------------------------------------------------

    def _saved_keys(self) -> set[str]:
        """The trainable tensors and the adapters' buffers (Lily's running routing mix): what a run learnt."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        adapters = getattr(self.model, ADAPTERS_ATTR, None)
        if adapters is None:
            return trainable
        return trainable | {f"model.{ADAPTERS_ATTR}.{name}" for name, _ in adapters.named_buffers()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._saved_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        summary = non_finite_summary(checkpoint["state_dict"])
        if summary is not None:  # the previous checkpoint file stays as it is
            raise UsageError(
                f"refusing to save a checkpoint: {summary}; training diverged (epoch {self.current_epoch}, "
                f"step {self.global_step}). The checkpoint saved before, if any, is kept. {DIVERGED_HINT}"
            )
        checkpoint["val_acc_best"] = (
            float(self.val_acc_best.compute()) if self.val_acc_best.update_count else None
        )
        checkpoint[TRAINED_ON] = self.trained_on
        if self.data_config is not None:
            checkpoint["data_config"] = self.data_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The model took the data's class names at setup; a checkpoint trained on others would mislabel.
        trained = (checkpoint.get("hyper_parameters") or {}).get("class_names")
        problem = class_names_problem(trained, self.hparams.class_names)
        if problem:
            raise UsageError(f"checkpoint: {problem}")
        if self.hparams.class_names is None and trained is not None:  # e.g. `export` (no data setup)
            self.hparams.class_names = list(trained)
        self.data_config = self.data_config or checkpoint.get("data_config")
        current = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        expected = {k: current[k] for k in self._saved_keys()}
        # Frozen backbone tensors are not in an adapter-only checkpoint, so names we do not save are allowed.
        given = {k: v for k, v in checkpoint["state_dict"].items() if k in current}
        problems = state_problems(expected, given, unexpected=False)
        if problems:
            raise UsageError(
                f"the checkpoint lacks or mis-shapes tensors of this model ({'; '.join(problems)}); was it "
                "written with another method, adapter config, backbone or class count?"
            )
        if checkpoint.get("val_acc_best") is not None:
            self.val_acc_best.update(torch.tensor(checkpoint["val_acc_best"]))
        self.trained_on = checkpoint.get(TRAINED_ON)
        self.loaded_step = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}
