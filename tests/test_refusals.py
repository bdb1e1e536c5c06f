"""Refusals that keep work and results right: what a merged model cannot do, and writes that cannot happen
(export over a file, a read-only or full disk, a file where a folder belongs) as one message, exit 2."""

from __future__ import annotations

import builtins
import errno
import importlib.util
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_cli import tiny_run_config
from test_inject import randomise_adapters
from test_reliability import refused
from tiny_vits import tiny_vit

from lily_lightning import LilyConfig, LoRAConfig, UsageError, inject, merge, unmerge
from lily_lightning.cli import main
from lily_lightning.demo.packages import DEMO_EXTRA_HINT, DEMO_EXTRA_MODULES
from lily_lightning.demo.prepare import demo_paths
from lily_lightning.paths import CACHE_ENV
from lily_lightning.training.checkpointing import AtomicCheckpointIO
from lily_lightning.vit.state import adapter_state_dict, load_adapter_state_dict

ALL_SITES = ("q", "k", "v", "proj", "fc1", "fc2", "mlp")
CONFIGS = {
    "lily": LilyConfig(
        rank=4, num_experts=3, lp_stride=2, scale=0.7, targets=ALL_SITES, eval_routing="running"
    ),
    "lora": LoRAConfig(rank=2, alpha=3.0, targets=ALL_SITES),
}


def trained(name: str, seed: int) -> torch.nn.Module:
    """A tiny injected ViT in eval mode: random adapters and (Lily) random running mixes from ``seed``."""
    model = inject(tiny_vit("layer_scale"), CONFIGS[name])
    randomise_adapters(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapters.values():
            if hasattr(adapter, "running_mix"):
                adapter.running_mix.copy_(torch.randn(adapter.running_mix.shape, generator=g).softmax(-1))
    return model.eval()


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


IMAGES = torch.randn(3, 3, 32, 32)
close = torch.testing.assert_close


# -- merged models --


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_merged_model_refuses_train_mode_and_unmerged_it_trains_its_adapters(name: str) -> None:
    model = trained(name, seed=1)
    reference = logits(model, IMAGES)
    merge(model).train()
    with pytest.raises(UsageError, match=r"unmerge\(model\) before training"):
        model(IMAGES)
    close(logits(model.eval(), IMAGES), reference, atol=1e-5, rtol=1e-5)  # the refusal changed nothing

    unmerge(model).train()
    model(IMAGES).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_in_train_mode_is_refused_and_changes_nothing(name: str) -> None:
    model = trained(name, seed=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=r"model\.eval\(\) before"):
        merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="not merged"):
        unmerge(model)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_merged_state_dict_never_loads_into_an_unmerged_model(name: str) -> None:
    model = trained(name, seed=1)
    reference = logits(model, IMAGES)  # the unmerged model's
    saved = io.BytesIO()
    torch.save(merge(model).state_dict(), saved)  # through a file, as a user keeps it
    saved.seek(0)
    merged_state = torch.load(saved, weights_only=True)
    for strict in (True, False):
        fresh = inject(tiny_vit("layer_scale"), CONFIGS[name]).eval()
        untouched = logits(fresh, IMAGES)
        with pytest.raises(UsageError, match="apply them twice"):
            fresh.load_state_dict(merged_state, strict=strict)
        close(logits(fresh, IMAGES), untouched, atol=0, rtol=0)

    # What the message says to do instead reproduces the unmerged model.
    fresh = inject(tiny_vit("layer_scale"), CONFIGS[name]).eval()
    fresh.load_state_dict(unmerge(model).state_dict())
    close(logits(fresh, IMAGES), reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loading_into_a_merged_model_is_refused_and_unmerge_load_merge_is_right(name: str) -> None:
    model, other = trained(name, seed=1), trained(name, seed=2)
    merged_logits = logits(merge(model), IMAGES)
    with pytest.raises(UsageError, match=r"unmerge\(model\), load, then merge"):
        load_adapter_state_dict(model, adapter_state_dict(other))
    with pytest.raises(UsageError, match=r"unmerge\(model\), load, then merge"):
        model.load_state_dict(other.state_dict())
    close(logits(model, IMAGES), merged_logits, atol=0, rtol=0)

    unmerge(model)
    load_adapter_state_dict(model, adapter_state_dict(other))
    close(logits(merge(model), IMAGES), logits(other, IMAGES), atol=1e-5, rtol=1e-5)


# -- writes that cannot happen --


def _refuse(path: object) -> None:
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], Path]]:
    """Make a folder read-only. Permissions do not stop root, so as root the calls that create files and
    folders (os.open, os.mkdir, open) refuse paths inside it with EACCES, as the kernel does for others."""
    made: list[Path] = []

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
            made.append(folder)
            return folder

        def inside(path: object) -> bool:
            return not isinstance(path, int) and folder in Path(os.fspath(path)).absolute().parents

        real_os_open, real_mkdir, real_open = os.open, os.mkdir, builtins.open
        creates = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def os_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
            if flags & creates and inside(path):
                _refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def mkdir(path: object, *args: object, **kwargs: object) -> None:
            if inside(path):
                _refuse(path)
            real_mkdir(path, *args, **kwargs)

        def open_(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            if set(mode) & set("wax+") and inside(file):
                _refuse(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # pathlib's Path.open
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


def full_disk_after(monkeypatch: pytest.MonkeyPatch, syncs: int) -> None:
    """The disk fills up: every ``os.fsync`` after the first ``syncs`` fails with ENOSPC."""
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) > syncs:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def export_args(fitted: tuple[Path, Path], out: Path, *more: str) -> list[str]:
    config, checkpoint = fitted
    return [
        "export",
        *("--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(out)),
        *("--model.lily.eval_routing", "running", *more),
    ]


def is_export(path: Path) -> bool:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("format") == "lily_lightning.export/1"


def test_export_keeps_the_checkpoint_and_existing_files(
    fitted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = fitted[1]
    kept = checkpoint.read_bytes()
    refused(capsys, export_args(fitted, checkpoint, "--force"), f"--out {checkpoint} is the checkpoint")
    assert checkpoint.read_bytes() == kept

    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier export")
    refused(capsys, export_args(fitted, out), f"--out {out} exists", "--force")
    assert out.read_bytes() == b"an earlier export"
    assert main(export_args(fitted, out, "--force")) == 0 and is_export(out)

    refused(capsys, export_args(fitted, tmp_path), f"--out {tmp_path} is a folder", "--out ")


def test_export_to_a_read_only_folder_or_a_full_disk_is_one_message(
    fitted: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    read_only: Callable[[Path], Path],
) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier export")
    with monkeypatch.context() as patch:
        full_disk_after(patch, syncs=0)
        refused(capsys, export_args(fitted, out, "--force"), str(out), "no space left", "another --out")
    assert out.read_bytes() == b"an earlier export" and sorted(tmp_path.iterdir()) == [out]

    locked = read_only(tmp_path / "locked") / "model.safetensors"
    err = refused(capsys, export_args(fitted, locked), "permission denied", "another --out")
    assert f"cannot write {locked.parent}: permission denied" in err
    assert not locked.exists()


@pytest.mark.parametrize("where", ["read-only runs folder", "a file in the path"])
def test_fit_into_an_unwritable_run_folder_is_one_message(
    where: str,
    fitted: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    read_only: Callable[[Path], Path],
) -> None:
    if where == "a file in the path":
        (tmp_path / "runs").write_text("not a folder")
        run, reason = tmp_path / "runs" / "shapes", "is a file, not a folder"
    else:
        run, reason = read_only(tmp_path / "runs") / "shapes", "permission denied"
    args = ["fit", "--config", str(fitted[0]), "--trainer.default_root_dir", str(run)]
    refused(capsys, args, str(run), reason, "--trainer.default_root_dir")
    assert not run.exists()


def test_a_full_disk_keeps_the_last_checkpoint_and_result(
    fitted: tuple[Path, Path],
    tmp_path: Path,
    data_root: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The one-epoch run resumed for a second epoch, whose save finds the disk full.
    config = tiny_run_config(tmp_path, data_root, epochs=2)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    previous = fitted[1].read_bytes()
    last.write_bytes(previous)
    saves: list[int] = []

    def write_to_full_disk(self: AtomicCheckpointIO, file: io.BufferedWriter, data: memoryview) -> None:
        saves.append(len(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(AtomicCheckpointIO, "write", write_to_full_disk)
        args = ["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.limit_train_batches", "1"]
        args += ["--trainer.limit_val_batches", "0"]
        refused(capsys, args, str(last), "no space left", "ckpt_path last", "previous last.ckpt")
    assert len(saves) == 1 and last.read_bytes() == previous
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left

    # `test`'s result.json: the previous one stays.
    result = tmp_path / "run" / "result.json"
    result.write_text('{"previous": true}\n')
    with monkeypatch.context() as patch:
        full_disk_after(patch, syncs=0)
        args = [
            "test",
            "--config",
            str(config),
            "--ckpt_path",
            str(last),
            "--trainer.limit_test_batches",
            "1",
        ]
        refused(capsys, args, str(result), "no space left")
    assert result.read_text() == '{"previous": true}\n'


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in DEMO_EXTRA_MODULES), reason=DEMO_EXTRA_HINT
)
@pytest.mark.parametrize("cache", ["--cache-dir is a file", f"read-only ${CACHE_ENV}", "full disk"])
def test_prepare_demo_into_an_unwritable_cache_is_one_message(
    cache: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    read_only: Callable[[Path], Path],
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    paths = demo_paths()
    args = ["prepare", "demo"]
    if cache == "--cache-dir is a file":
        (tmp_path / "file").write_text("")
        args += ["--cache-dir", str(tmp_path / "file")]
        expected: tuple[str, ...] = (str(tmp_path / "file"), "is a file, not a folder", "Pass --cache-dir")
    elif cache == "full disk":  # while writing the images, after the (already converted) weights
        paths.weights.parent.mkdir(parents=True)
        paths.weights.write_bytes(b"converted weights")

        def save(*_: object, **__: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(Image.Image, "save", save)
        expected = (str(paths.data_root), "no space left", f"Set {CACHE_ENV} (now {tmp_path / 'cache'})")
    else:
        read_only(tmp_path / "cache")
        expected = (str(paths.weights.parent), "permission denied", f"Set {CACHE_ENV}")
    refused(capsys, args, *expected)
    assert not paths.task_dir.exists() and not list(tmp_path.rglob("*.partial"))  # no partial task
