"""The visual-PEFT baselines and HF PEFT's layers on Lily's footing (issue 25, item 2), through the
LightningModule: adapter-only
checkpoints, resume, bf16 autocast, DDP = one process, and per-image probabilities from ``predict_step``.

Every test runs each baseline in this process on timm's ``test_vit`` at 32 px (or the tiny ViTs), so the
whole file stays fast: in-process Trainers of one or two steps, one forked 2-process gloo group for DDP.
(Forward, start point, counts, merge and raw adapter state: tests/test_methods.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_methods import CONFIGS, perturb
from tiny_vits import tiny_vit
from torch.utils.data import DataLoader, TensorDataset

from lily_lightning import inject
from lily_lightning.adapters import HFPeftConfig, VPTConfig
from lily_lightning.training.checkpointing import AtomicCheckpointIO, LastCheckpoint
from lily_lightning.training.module import ViTClassifier

BASELINES = ("bitfit", "vpt_shallow", "vpt_deep", "adapter", "adaptformer", "ssf", "fact_tt", "dora")
# HuggingFace PEFT's layers through `method: peft` (the names its runs get). PEFT's Lily averages its router
# over the batch in each process, unsynced: neither DDP = one process nor per-image predictions hold for it.
PEFT = {
    "peft_lora": {"peft_type": "LORA", "r": 2, "target_modules": ["qkv", "fc1"]},
    "peft_lily": {"peft_type": "LILY", "r": 4, "stride_A": 2, "num_B": 2, "target_modules": ["qkv", "fc2"]},
}
METHODS = (*BASELINES, *PEFT)
PER_IMAGE = (*BASELINES, "peft_lora")  # each image's output its own, whatever else is in its batch
NUM_CLASSES = 3
g = torch.Generator().manual_seed(0)
IMAGES, LABELS = torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 1])


def classifier(method: str, **kwargs) -> ViTClassifier:
    """The module as `fit` builds it, on a tiny random ViT: the same frozen backbone for every call."""
    torch.manual_seed(0)
    settings = {"vpt": VPTConfig(length=2)} if method.startswith("vpt") else {}
    if method in PEFT:
        method, settings = "peft", {"peft": PEFT[method]}
    return ViTClassifier(
        "test_vit", pretrained=False, img_size=32, num_classes=NUM_CLASSES, method=method,
        warmup_epochs=1, lr=1e-2, **settings, **kwargs,
    )  # fmt: skip


def trainer(root: Path, max_steps: int = -1, checkpoints: Path | None = None) -> L.Trainer:
    """Two one-step epochs (the run's LR curve), no validation, no logger; with ``checkpoints``, the
    run's `last.ckpt` there every epoch (the CLI's callback and checkpoint reader)."""
    callbacks = [] if checkpoints is None else [LastCheckpoint(checkpoints)]
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, max_steps=max_steps, default_root_dir=root,
        logger=False, enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip


def loader() -> DataLoader:
    return DataLoader(TensorDataset(IMAGES, LABELS), batch_size=4)  # one step per epoch, in order


def trained_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Per method, once: an uninterrupted 2-epoch fit, and the same fit stopped after epoch 1 (its
    `last.ckpt`, its module) then resumed from that checkpoint by a fresh module and Trainer."""
    cache: dict[str, dict] = {}

    def run(method: str) -> dict:
        if method not in cache:
            root = tmp_path_factory.mktemp(method)
            whole = classifier(method)
            trainer(root / "whole").fit(whole, loader())
            stopped = classifier(method)
            stopper = trainer(root / "parts", max_steps=1, checkpoints=root / "parts" / "checkpoints")
            stopper.fit(stopped, loader())
            checkpoint = stopper.checkpoint_callback.path
            saved = torch.load(checkpoint, weights_only=False)  # before the resumed run rewrites it
            resumed = classifier(method)
            # weights_only=False: a module built in Python saves its dataclass configs as hyper-parameters
            resumer = trainer(root / "parts", checkpoints=root / "parts" / "checkpoints")
            resumer.fit(resumed, loader(), ckpt_path=checkpoint, weights_only=False)
            cache[method] = {
                "whole": trained_tensors(whole),
                "stopped": stopped,
                "saved": saved,
                "resumed": trained_tensors(resumed),
            }
        return cache[method]

    return run


@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_hold_the_trained_tensors_alone_and_reload_to_equal_logits(method: str, runs) -> None:
    run = runs(method)
    stopped: ViTClassifier = run["stopped"]
    state = run["saved"]["state_dict"]
    trained = trained_tensors(stopped)
    buffers = {f"model.adapters.{k}" for k, _ in stopped.model.adapters.named_buffers()}
    assert set(state) == set(trained) | buffers  # the adapter's (or BitFit's biases) and the head, no more
    assert sum(state[k].numel() for k in trained) == stopped.trainable_parameters
    assert stopped.trainable_parameters < sum(p.numel() for p in stopped.parameters()) / 2  # frozen: left out
    assert all(torch.equal(state[k], v) for k, v in trained.items())

    fresh = classifier(method).eval()
    with torch.no_grad():
        expected = stopped.eval()(IMAGES)
        assert not torch.allclose(fresh(IMAGES), expected)  # one step moved the logits
        fresh.on_load_checkpoint(run["saved"])  # load_trained's steps, on the file read above
        fresh.load_state_dict(run["saved"]["state_dict"], strict=False)
        assert torch.equal(fresh(IMAGES), expected)


@pytest.mark.parametrize("method", METHODS)
def test_a_resumed_run_equals_an_uninterrupted_one(method: str, runs) -> None:
    run = runs(method)
    whole, resumed = run["whole"], run["resumed"]
    assert resumed.keys() == whole.keys()
    stopped = trained_tensors(run["stopped"])
    assert any(not torch.equal(whole[k], stopped[k]) for k in whole)  # epoch 2 trained something
    for key, tensor in whole.items():
        assert torch.equal(resumed[key], tensor), key


# -- bf16 autocast: the float32 step, rounded ------------------------------------------------------------

BF16_U = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)


def tiny_model(method: str) -> torch.nn.Module:
    """A tiny ViT with ``method`` injected, trained-like tensors and a trainable head."""
    config = HFPeftConfig(PEFT[method]) if method in PEFT else CONFIGS[method]
    model = inject(tiny_vit(num_classes=NUM_CLASSES), config)
    model.get_classifier().requires_grad_(True)
    return perturb(model)


def sgd_step(method: str, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """One SGD step in train mode (same dropout draws either way): logits, gradients, updated tensors."""
    model = tiny_model(method).train()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(IMAGES)
        loss = F.cross_entropy(logits, LABELS)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    optimizer.step()
    return logits, grads, {k: p.detach() for k, p in params.items()}


@pytest.mark.parametrize("method", METHODS)
def test_a_bf16_autocast_step_keeps_float32_tensors_and_is_the_float32_step_rounded(method: str) -> None:
    logits, grads, after = sgd_step(method, autocast=True)
    reference_logits, reference_grads, _ = sgd_step(method, autocast=False)
    assert logits.dtype == torch.bfloat16  # autocast ran the matmuls in bf16
    assert all(t.dtype == torch.float32 for t in [*grads.values(), *after.values()])  # master tensors
    error = (logits.float() - reference_logits).norm() / reference_logits.norm()
    assert error <= 40 * BF16_U, error  # tests/test_precision.py's bound: 40 unit roundoffs
    flat, reference = (torch.cat([d[k].flatten() for k in sorted(d)]) for d in (grads, reference_grads))
    assert (flat - reference).norm() / reference.norm() <= 40 * BF16_U  # a dropped gradient is 1 off


# -- DDP: two processes, half a batch each, average to one process's full-batch gradient -----------------


def _ddp_worker(rank: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    grads = {}
    for method in PER_IMAGE:
        model = DistributedDataParallel(tiny_model(method).eval())  # eval: no dropout draw per process
        half = slice(2 * rank, 2 * rank + 2)
        F.cross_entropy(model(IMAGES[half]), LABELS[half]).backward()  # DDP averages over the 2 ranks
        grads[method] = {k: p.grad for k, p in model.module.named_parameters() if p.requires_grad}
    results[rank] = grads
    dist.destroy_process_group()


def test_ddp_on_two_processes_gives_one_process_full_batch_gradient(tmp_path: Path) -> None:
    results = torch.multiprocessing.Manager().dict()
    # Forked, not spawned: a spawned child would import this module (Lightning, timm) again.
    context = torch.multiprocessing.start_processes(
        _ddp_worker, (str(tmp_path / "init"), results), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 300  # a rank missing a collective fails the test instead of hanging it
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process DDP group did not finish in 300 s")
    for method in PER_IMAGE:
        model = tiny_model(method).eval()
        F.cross_entropy(model(IMAGES), LABELS).backward()
        expected = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        for rank in (0, 1):
            got = results[rank][method]
            assert got.keys() == expected.keys()
            for key, grad in expected.items():
                torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-5, msg=f"{method} {key}")


# -- predict ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", PER_IMAGE)
def test_predict_step_gives_each_image_its_own_probabilities(method: str) -> None:
    module = perturb(classifier(method, predict_top_k=NUM_CLASSES)).eval()
    with torch.no_grad():
        out = module.predict_step((IMAGES, LABELS), 0)
        label, confidence = out["label"], out["confidence"]
        assert label.shape == confidence.shape == (len(IMAGES), NUM_CLASSES)
        torch.testing.assert_close(confidence.sum(-1), torch.ones(len(IMAGES)))  # a distribution each
        assert torch.all(confidence[:, :-1] >= confidence[:, 1:])  # most probable first
        assert sorted(label[0].tolist()) == list(range(NUM_CLASSES))
        # Softmax of the logits (by hand), and each image's the same alone as in the batch.
        logits = module(IMAGES)
        by_hand = logits.exp() / logits.exp().sum(-1, keepdim=True)
        torch.testing.assert_close(confidence, by_hand.gather(1, label))
        for i in range(len(IMAGES)):
            alone = module.predict_step(IMAGES[i : i + 1], 0)
            assert torch.equal(alone["label"][0], label[i])
            torch.testing.assert_close(alone["confidence"][0], confidence[i], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(confidence[0], confidence[1])  # not a constant answer
