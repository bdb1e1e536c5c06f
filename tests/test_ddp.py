"""DDP on CPU (gloo, 127.0.0.1): N processes give the answer of one.

References are one-process runs of the same command: trained tensors (sync_routing), test top-1 and the
number of images counted, predictions. Every launch is a real `python -m lily_lightning` (or `torchrun`)
subprocess with a timeout, so a hang (a rank missing a collective) fails instead of blocking.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import result_line, tiny_run_config, trainable_tensors
from torch.utils.data import DistributedSampler

from lily_lightning import UsageError
from lily_lightning.cli import main
from lily_lightning.data import write_synthetic_vtab_task
from lily_lightning.data.sampling import GlobalBatchSampler

TIMEOUT = 300  # seconds per launch; a healthy one takes ~20-40 s on a loaded 2-core machine
N_TEST = 49  # 3 global eval batches of 16 + 1 image: not a multiple of 2, and one rank's last share is empty
# Per process: batch 8 and eval batch 8 on 2 processes vs 16 and 16 on one (32 training images: 2 steps).
# Ragged evaluation shares leave a rank an empty batch, which timm's test_vit (the tiny runs' backbone) takes
# only through vit.inject.accept_empty_batches: its position table follows the input size (dynamic_img_size).
ONE = ["--data.init_args.batch_size", "16", "--data.init_args.eval_batch_size", "16"]
TWO = ["--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8"]
# Drop-path off (it draws per process); a progress bar on, so the plain progress lines are exercised.
COMMON = [
    "--model.drop_path_rate",
    "0",
    "--trainer.deterministic",
    "false",
    "--trainer.enable_progress_bar",
    "true",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run one launch to completion; its stdout (stderr on failure)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def cli(subcommand: str, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lily_lightning", subcommand, "--config", str(config), *COMMON, *args]


def ddp(devices: int = 2) -> list[str]:
    return ["--trainer.strategy", "ddp", "--trainer.devices", str(devices)]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max())


def joined(shares: tuple[list[int], ...]) -> list[int]:
    return [index for share in shares for index in share]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if not k.endswith("running_mix"))


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    write_synthetic_vtab_task(root, "shapes", 4, n_train800=24, n_val200=8, n_test=N_TEST, image_size=32)
    return root


@pytest.fixture(scope="module")
def one_process(task: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 2 epochs (4 steps) of one process with batch 16; returns its run folder."""
    config = tiny_run_config(tmp_path_factory.mktemp("one"), task, epochs=2)
    assert main(["fit", "--config", str(config), *COMMON, *ONE]) == 0
    return config.parent


def test_global_batches_are_shared_out_and_eval_counts_each_image_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order = [5, 3, 9, 0, 7, 1, 8, 2, 6, 4, 10]

    def shares(world: int, batch_size: int, drop_last: bool) -> list[list[list[int]]]:
        per_rank = []
        for rank in range(world):
            monkeypatch.setattr("lily_lightning.data.sampling.process_group", lambda r=rank: (r, world))
            sampler = GlobalBatchSampler(order, batch_size, drop_last)
            per_rank.append(list(sampler))
            assert len(per_rank[-1]) == len(sampler)
        return per_rank

    # Training: step k of 3 processes x 2 is, as a set, step k of one process x 6 (here the ragged end drops).
    three = shares(3, 2, drop_last=True)
    assert [sorted(joined(step)) for step in zip(*three, strict=True)] == [sorted(order[:6])]
    # Evaluation: every rank takes the same number of steps (empty shares included), each image once.
    four = shares(4, 2, drop_last=False)
    assert {len(r) for r in four} == {2}
    assert [joined(step) for step in zip(*four, strict=True)] == [order[:8], order[8:]]
    assert sorted(len(share) for share in [step[-1] for step in four]) == [0, 1, 1, 1]
    # Lightning's own distributed sampler on top would shard twice: refused, with what to do.
    with pytest.raises(UsageError, match="use_distributed_sampler=False"):
        GlobalBatchSampler(DistributedSampler(order, num_replicas=2, rank=0), 2, drop_last=False)


def test_two_processes_train_like_one_with_sync_routing_and_resume(task: Path, one_process: Path) -> None:
    expected = trainable_tensors(one_process / "run" / "checkpoints" / "last.ckpt")
    config = tiny_run_config(one_process.parent / "two", task, epochs=2)
    # Stopped after the first epoch (a killed run), then resumed under DDP with `--ckpt_path last`.
    first = launch(cli("fit", config, *TWO, *ddp(), "--trainer.max_steps", "2"), config.parent)
    launch(cli("fit", config, *TWO, *ddp(), "--ckpt_path", "last"), config.parent)
    resumed = trainable_tensors(config.parent / "run" / "checkpoints" / "last.ckpt")
    assert_same_tensors(resumed, expected)
    # Plain progress lines (stdout is a pipe), once (rank 0), also in the run folder's train.log.
    assert first.count("epoch 1/2 step 2/2 (global 2/2) loss") == 1
    assert "epoch 1/2 step 2/2" in (config.parent / "run" / "train.log").read_text()


def test_without_sync_routing_two_processes_train_another_model(task: Path, one_process: Path) -> None:
    expected = trainable_tensors(one_process / "run" / "checkpoints" / "last.ckpt")
    config = tiny_run_config(one_process.parent / "local", task, epochs=2)
    launch(cli("fit", config, *TWO, *ddp(), "--model.lily.sync_routing", "false"), config.parent)
    local = trainable_tensors(config.parent / "run" / "checkpoints" / "last.ckpt")
    assert max_difference(local, expected) > 1e-4


def test_two_nodes_by_torchrun_train_like_one_process(task: Path, one_process: Path) -> None:
    expected = trainable_tensors(one_process / "run" / "checkpoints" / "last.ckpt")
    config = tiny_run_config(one_process.parent / "nodes", task, epochs=2)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
             "-m", "lily_lightning", "fit", "--config", str(config), *COMMON, *TWO,
             "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"],
            cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # Lightning sets 1 per process for its own launcher
        )
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_tensors(trainable_tensors(config.parent / "run" / "checkpoints" / "last.ckpt"), expected)


def test_ddp_test_counts_each_image_once_and_scores_like_one_process(
    task: Path, one_process: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Batch routing at eval: each batch of 16 images is routed on its own mix. Two processes route their
    # 8 + 8 (the last: 0 + 1) on the mix of the global batch, so they score exactly as one process does.
    checkpoint = str(one_process / "run" / "checkpoints" / "last.ckpt")
    config = one_process / "tiny.yaml"
    capsys.readouterr()
    assert main(["test", "--config", str(config), *COMMON, *ONE, "--ckpt_path", checkpoint]) == 0
    single = result_line(capsys.readouterr().out)
    double = result_line(launch(cli("test", config, *TWO, *ddp(), "--ckpt_path", checkpoint), one_process))
    assert single["images"] == double["images"] == str(N_TEST)
    assert double["top1"] == single["top1"]


def test_ddp_predict_writes_each_image_once_in_order(task: Path, one_process: Path) -> None:
    checkpoint = str(one_process / "run" / "checkpoints" / "last.ckpt")
    config = one_process / "tiny.yaml"
    csv_path = one_process / "run" / "predictions.csv"
    assert main(["predict", "--config", str(config), *COMMON, *ONE, "--ckpt_path", checkpoint]) == 0
    single = list(csv.DictReader(csv_path.open()))
    csv_path.unlink()
    out = launch(cli("predict", config, *TWO, *ddp(), "--ckpt_path", checkpoint), one_process)
    assert out.count(f"predictions for {N_TEST} images written") == 1  # rank 0 only
    double = list(csv.DictReader(csv_path.open()))
    listed = [line.split()[0] for line in (task / "shapes" / "test.txt").read_text().splitlines()]
    assert [row["index"] for row in double] == [str(i) for i in range(N_TEST)]
    assert [row["file"] for row in double] == listed
    assert [row["label"] for row in double] == [row["label"] for row in single]
    assert all(row["class"] == row["label"] for row in double)  # VTAB-1k lists name no classes
    for a, b in zip(single, double, strict=True):
        assert abs(float(a["confidence"]) - float(b["confidence"])) < 1e-5


def _global_mean_worker(rank: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    from lily_lightning.adapters.sync import global_mean

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = torch.arange(6.0).reshape(3, 2)[: 3 * (1 - rank)].requires_grad_()  # 3 rows on rank 0, none on 1
    weight = torch.tensor([[1.0, 2.0], [3.0, 5.0]])[rank]
    mix = global_mean(rows, sync=True)
    (mix * weight).sum().backward()
    results[rank] = (mix.detach(), rows.grad)
    dist.destroy_process_group()


def test_global_mean_averages_every_ranks_rows_and_gradients(tmp_path: Path) -> None:
    results = torch.multiprocessing.Manager().dict()
    # Forked, not spawned: a spawned child would import this module (Lightning, timm) again.
    torch.multiprocessing.start_processes(
        _global_mean_worker, (str(tmp_path / "init"), results), nprocs=2, start_method="fork"
    )
    # Hand-computed: rows [[0, 1], [2, 3], [4, 5]] all on rank 0 -> mean [2, 3] on both ranks; every rank's
    # loss reaches rank 0's rows: d/drow (w0 + w1) . mean = ([1, 2] + [3, 5]) / 3 per row.
    assert torch.equal(results[0][0], torch.tensor([2.0, 3.0])) and torch.equal(results[1][0], results[0][0])
    assert torch.allclose(results[0][1], torch.tensor([[4.0, 7.0]] * 3) / 3)
