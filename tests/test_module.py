"""The LightningModule's pieces: LR curve against timm's scheduler, metrics, normalisation, methods."""

from __future__ import annotations

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from lily_lightning import UsageError
from lily_lightning.training.module import IMAGENET_MEAN, ViTClassifier
from lily_lightning.training.schedule import warmup_cosine_lr


def test_lr_curve_matches_timm_cosine_scheduler_at_epoch_boundaries() -> None:
    # The official code: CosineLRScheduler(opt, t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6).
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    timm_sched = CosineLRScheduler(opt, t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6)
    for epoch in range(0, 101):
        timm_sched.step(epoch)
        ours = warmup_cosine_lr(epoch, 1e-3, total_epochs=100, warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), epoch


def test_lr_curve_hand_values() -> None:
    kwargs = {"lr": 1.0, "total_epochs": 10, "warmup_epochs": 2, "warmup_lr": 0.0, "min_lr": 0.0}
    assert warmup_cosine_lr(1.0, **kwargs) == pytest.approx(0.5)  # halfway through warm-up
    assert warmup_cosine_lr(5.0, **kwargs) == pytest.approx(0.5)  # cos(pi / 2) = 0
    assert warmup_cosine_lr(10.0, **kwargs) == pytest.approx(0.0)


def tiny(**kwargs) -> ViTClassifier:
    return ViTClassifier("test_vit", pretrained=False, img_size=32, num_classes=3, **kwargs)


def test_accuracy_is_micro_averaged() -> None:
    module = tiny()
    # 3 of class 0 all right, 1 of class 1 wrong: micro = 3/4, a macro average would be (1 + 0) / 2.
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]])
    labels = torch.tensor([0, 0, 0, 1])
    assert module.test_acc(logits, labels).item() == pytest.approx(0.75)


def test_normalisation_choices() -> None:
    x = torch.full((1, 3, 32, 32), 0.5)
    assert torch.equal(tiny(normalize="none").mean.flatten(), torch.zeros(3))
    imagenet = tiny(normalize="imagenet")
    torch.testing.assert_close(imagenet.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    # test_vit's pretrained config uses mean = std = 0.5: 0.5 pixels map to 0
    backbone = tiny(normalize="backbone")
    torch.testing.assert_close(((x - backbone.mean) / backbone.std), torch.zeros_like(x))


@pytest.mark.parametrize(
    ("method", "trainable"),
    [("linear_probe", 64 * 3 + 3), ("full", None), ("lora", 6 * 2 * 8 * (64 + 64) + 64 * 3 + 3)],
)
def test_methods_train_what_they_say(method: str, trainable: int | None) -> None:
    module = tiny(method=method)
    if trainable is None:
        trainable = sum(p.numel() for p in module.parameters())
    assert module.trainable_parameters == trainable


def test_bad_model_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown timm backbone"):
        ViTClassifier(backbone="not_a_vit", pretrained=False)
    with pytest.raises(UsageError, match="num_classes must be >= 2"):
        ViTClassifier("test_vit", pretrained=False, num_classes=1)
    with pytest.raises(UsageError, match="pretrained weights not found"):
        ViTClassifier(backbone="test_vit", weights="/nonexistent/w.safetensors", num_classes=3)
