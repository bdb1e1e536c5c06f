"""Mixed precision (``torch.autocast`` bf16 / fp16, Lightning's ``bf16-mixed``): the float32 answer, rounded.

References are the same computation in float32, and for the custom autograd function plain autograd in
the same autocast region. Tolerances are in unit roundoffs ``u`` of the autocast dtype (bf16: 2^-8, its 8
significant bits; fp16: 2^-11). Measured over 6 seeds x every config below x both dtypes against float32:
the loss, the eval logits and the running mixes are at most 9 u off, the whole step (every adapter
gradient as one vector) at most 26 u; the bound is 40 u. A single small tensor can be far more off: a
router gradient comes out of a softmax Jacobian that subtracts nearly equal terms, and the ``mlp`` site's
ReLU flips for inputs that round across zero, so one tensor was up to 0.36 off (relative, in norm; plain
autograd in the same dtype is the same). Per tensor the bound is 0.5, which a dropped, doubled or
sign-flipped gradient (1 or more off) still fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_benchmarks import step_time
from test_cli import result_line, tiny_run_config, trainable_tensors
from test_inject import randomise_adapters
from tiny_vits import tiny_vit

from lily_lightning import LilyConfig, LoRAConfig, inject, merge, unmerge
from lily_lightning.adapters import LilyAdapter, scaled_mix
from lily_lightning.cli import main

ALL_SITES = ("q", "k", "v", "proj", "fc1", "fc2", "mlp")


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


TOLERANCE_U = 40


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether CPU autocast runs a linear in ``dtype`` (fp16 needs torch >= 2.4; older ones fall back)."""
    with torch.autocast("cpu", dtype=dtype):
        return F.linear(torch.ones(1, 1), torch.ones(1, 1)).dtype == dtype


DTYPES = [
    torch.bfloat16,
    pytest.param(
        torch.float16,
        marks=pytest.mark.skipif(
            not cpu_autocast_supports(torch.float16), reason="this torch has no fp16 autocast on CPU"
        ),
    ),
]
LILY = {"rank": 4, "num_experts": 3, "lp_stride": 2, "scale": 0.5, "targets": ALL_SITES}
CONFIGS = {
    "batch": LilyConfig(**LILY),
    "batch-running": LilyConfig(**LILY, eval_routing="running"),
    "batch-unsynced": LilyConfig(**LILY, sync_routing=False),
    "sample": LilyConfig(**LILY, routing="sample"),
    "token": LilyConfig(**LILY, routing="token"),
    "uniform": LilyConfig(**LILY, routing="uniform"),
    "lora": LoRAConfig(rank=2, alpha=3.0, targets=ALL_SITES),
}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm())


def start_trained(model: torch.nn.Module, seed: int = 1) -> None:
    """Adapters as after some training: the zero-initialised HP banks and LoRA B matrices drawn small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            if name.endswith(".hp") or ".lora_b." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def training_step(name: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One step of a tiny injected ViT: loss, adapter gradients, the SGD update, then an eval forward.

    fp16 scales the loss as Lightning's ``16-mixed`` does (a ``GradScaler``; 2^10 here, so its first step
    is neither skipped for an overflow nor loses the ~1e-6 router gradients to underflow). SGD, not AdamW:
    its update differs by lr x the gradients' difference, where Adam's first step (lr x sign(g)) turns the
    rounding of a near-zero gradient into a whole lr.
    """
    model = inject(tiny_vit(), CONFIGS[name]).train()
    start_trained(model)
    params = dict(model.adapters.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=dtype is torch.float16)
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
    autocast = {"device_type": "cpu", "dtype": dtype or torch.bfloat16, "enabled": dtype is not None}
    with torch.autocast(**autocast):
        loss = F.cross_entropy(model(images), labels)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    state = {"loss": loss.detach()} | {f"grad/{k}": p.grad for k, p in params.items()}
    state |= {f"update/{k}": p.detach() - before[k] for k, p in params.items()}
    state |= {f"buffer/{k}": b.clone() for k, b in model.adapters.named_buffers()}
    model.eval()
    with torch.no_grad(), torch.autocast(**autocast):
        state["eval"] = model(images)
    return state


def flat(state: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in sorted(state.items()) if k.startswith(prefix)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_an_autocast_training_step_is_the_float32_step_rounded(name: str, dtype: torch.dtype) -> None:
    reference, mixed = training_step(name, None), training_step(name, dtype)
    assert mixed.keys() == reference.keys()
    assert any(key.endswith("running_mix") for key in mixed) == name.startswith("batch")
    # Trained tensors, their gradients, running mixes and the loss stay float32; only the logits are not.
    assert all(value.dtype == torch.float32 for key, value in mixed.items() if key != "eval")
    bound = TOLERANCE_U * unit_roundoff(dtype)
    for key in ("loss", "eval", *(k for k in reference if k.startswith("buffer/"))):
        assert relative_error(mixed[key], reference[key]) <= bound, key
    step_error = relative_error(flat(mixed, "update/"), flat(reference, "update/"))
    assert step_error <= bound, (step_error, bound)
    for key in (k for k in reference if k.startswith("grad/")):
        assert relative_error(mixed[key], reference[key]) <= 0.5, key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scaled_mix_gradients_are_plain_autograds_under_autocast(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    lp = torch.randn(4, 8, generator=g, requires_grad=True)
    logits = torch.randn(3, generator=g, requires_grad=True)
    hp = torch.randn(3, 4, 6, generator=g, requires_grad=True)
    upstream = torch.randn(2, 5, 6, generator=g).to(dtype)

    def gradients(mix) -> tuple[torch.Tensor, ...]:
        with torch.autocast("cpu", dtype=dtype):
            z = F.linear(x, lp)  # in the autocast dtype, as an LP's output is
            out = mix(z, torch.softmax(logits, 0), hp)
        assert out.dtype == dtype
        return (out, *torch.autograd.grad(out, (lp, logits, hp), upstream))

    lean = gradients(lambda z, w, hp: scaled_mix(z, w, hp, 0.7))
    plain = gradients(lambda z, w, hp: z @ (torch.tensordot(w, hp, dims=1) * 0.7))
    # The same matmuls in the same dtype; only d hp differs: w_e x G in float32 here, a bf16 product there.
    for name, a, b in zip(("out", "d lp", "d logits", "d hp"), lean, plain, strict=True):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=2 * unit_roundoff(dtype), atol=1e-6, msg=name)


def test_the_running_mix_stays_float32_and_averages_float32_softmaxes() -> None:
    # Momentum 0.5, so a bf16 softmax (~1e-3 off) would move the mix ~100x beyond the tolerance.
    adapter = LilyAdapter(8, 6, depth=1, rank=4, num_experts=3, lp_stride=1, scale=1.0, routing="batch",
                          nonlinear=False, running_momentum=0.5).train()  # fmt: skip
    expected = torch.full((3,), 1 / 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 7, 8, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            adapter(x, 0)
            logits = adapter.router[0](adapter.lp[0](x))  # the bf16 logits the router produced
        batch_mix = torch.softmax(logits.double(), -1).reshape(-1, 3).mean(0)  # by hand, in float64
        expected = 0.5 * expected + 0.5 * batch_mix.float()
        assert adapter.running_mix.dtype == torch.float32
        torch.testing.assert_close(adapter.running_mix[0], expected, atol=1e-6, rtol=0)


MERGEABLE = {name: CONFIGS[name] for name in ("batch-running", "uniform", "lora")}


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_and_unmerge_under_autocast_and_in_a_bf16_model(name: str) -> None:
    def model() -> torch.nn.Module:
        vit = inject(tiny_vit(), MERGEABLE[name])
        randomise_adapters(vit)
        for adapter in vit.adapters.values():
            if hasattr(adapter, "running_mix"):
                adapter.running_mix.copy_(torch.softmax(torch.randn(adapter.running_mix.shape), -1))
        return vit.eval()

    images = torch.randn(4, 3, 32, 32)
    bound = TOLERANCE_U * unit_roundoff(torch.bfloat16)
    plain, autocast = model(), model()
    original = {k: v.clone() for k, v in autocast.state_dict().items()}
    with torch.no_grad():
        reference = plain(images)
        merge(plain)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unmerged = autocast(images)
            merge(autocast)  # folds in float32: an autocast region does not round the merged weights
            merged = autocast(images)
        assert all(torch.equal(a, plain.state_dict()[k]) for k, a in autocast.state_dict().items())
        assert relative_error(merged, reference) <= bound and relative_error(unmerged, reference) <= bound
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unmerge(autocast)
        assert all(torch.equal(v, original[k]) for k, v in autocast.state_dict().items())

        bf16 = model().to(torch.bfloat16)  # the whole model in bf16, no autocast
        unmerged = bf16(images.bfloat16())
        merge(bf16)
        merged = bf16(images.bfloat16())
        assert merged.dtype == torch.bfloat16
        assert relative_error(merged, reference) <= bound and relative_error(unmerged, reference) <= bound


def test_step_time_benchmark_runs_lily_under_bf16_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["lora", "lily-batch", "lily-sample", "lily-token"]
    step_time.main(["--quick", "--amp", "bf16", "--repeats", "1", "--rows", *rows])
    out = capsys.readouterr().out
    assert "amp bf16" in out
    table = out.split("## training step")[1].split("## eval throughput")[0]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == rows


def test_fit_test_and_sweep_with_bf16_mixed_through_the_cli(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_run_config(tmp_path, data_root, epochs=1)
    bf16 = ["--trainer.precision", "bf16-mixed", "--trainer.limit_train_batches", "2"]
    assert main(["fit", "--config", str(config), *bf16]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = trainable_tensors(checkpoint)
    # float32 master weights and running mixes, trained away from their start (HP starts at zero)
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())
    assert all(saved[f"model.adapters.{site}.hp"].abs().sum() > 0 for site in ("k", "v", "mlp"))
    assert all(
        not torch.equal(saved[f"model.adapters.{s}.running_mix"], torch.full((12, 2), 0.5)) for s in "kv"
    )
    capsys.readouterr()
    test = [
        "test",
        "--config",
        str(config),
        "--trainer.precision",
        "bf16-mixed",
        "--ckpt_path",
        str(checkpoint),
    ]
    assert main(test) == 0
    result = result_line(capsys.readouterr().out)
    assert result["images"] == "64" and 0.0 <= float(result["top1"]) <= 1.0

    # The sweep passes what follows `--` to every run's fit and test (each run a child process of its own).
    runs = tmp_path / "runs"
    command = ["sweep", "--config", str(config), "--tasks", "shapes", "--runs-dir", str(runs), "--"]
    assert main([*command, *bf16]) == 0
    assert "[1/1] shapes lily: done top1=" in capsys.readouterr().out
    log = (runs / "shapes" / "lily" / "sweep_run.log").read_text()
    assert "--trainer.precision bf16-mixed" in log and "bfloat16 Automatic Mixed Precision" in log
    assert result_line(log)["images"] == "64"
