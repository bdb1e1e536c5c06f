"""Where a sweep's runs execute: here, up to ``--parallel`` at a time (this module), or on SLURM
(``studies.slurm``).

Locally each run is a child process forked from a server process that imported the package once
(``multiprocessing``'s forkserver), so a run pays no import time and still starts clean: nothing of one run
(memory, CUDA state, global seeds) reaches the next. With GPUs, each run gets its own ``--gpus-per-run`` of
them through ``CUDA_VISIBLE_DEVICES``; without, ``--parallel`` CPU processes share the cores (each gets
``cores / parallel`` threads unless ``OMP_NUM_THREADS`` is set).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import BaseContext

from lily_lightning.errors import UsageError
from lily_lightning.studies.runs import ChildRunner, Outcome, RunSpec, Say, execute

Job = tuple[RunSpec, Say]  # a run and how to report its progress lines


def visible_gpus() -> list[str]:
    """The GPU ids runs may use: ``CUDA_VISIBLE_DEVICES`` when set, else every CUDA device here."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch  # here only: a sweep on a login node never needs CUDA

    return [str(index) for index in range(torch.cuda.device_count())]


def device_slots(parallel: int, gpus_per_run: int | None, say: Say) -> list[dict[str, str]]:
    """The environment of each run slot: a GPU set per slot, or CPU threads per slot without GPUs."""
    if parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    gpus = visible_gpus()
    if gpus:
        per_run = gpus_per_run or 1
        groups = [gpus[i : i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]
        if not groups:
            raise UsageError(f"--gpus-per-run {per_run}: only {len(gpus)} GPU(s) are visible here")
        if parallel > len(groups):
            say(f"sweep: {len(gpus)} GPU(s), {per_run} per run: {len(groups)} runs at once, not {parallel}")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(group)} for group in groups[:parallel]]
    if gpus_per_run:
        say("sweep: no GPU visible here: --gpus-per-run is ignored, the runs use the CPU")
    if "OMP_NUM_THREADS" in os.environ:
        return [{} for _ in range(parallel)]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(parallel)]


def local_context() -> BaseContext:
    """Forkserver (imports once, each run a clean fork) where the platform has it, else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lily_lightning.studies.runs"])
    return context


class LocalLauncher:
    """Runs up to ``parallel`` runs at once on this machine and waits for them."""

    def __init__(self, parallel: int, gpus_per_run: int | None, rerun: bool, say: Say) -> None:
        self.parallel, self.gpus_per_run, self.rerun, self.say = parallel, gpus_per_run, rerun, say
        self._context: BaseContext | None = None

    def launch(self, jobs: Sequence[Job]) -> list[Outcome]:
        if not jobs:
            return []
        slots: queue.Queue[dict[str, str]] = queue.Queue()
        for slot in device_slots(min(self.parallel, len(jobs)), self.gpus_per_run, self.say):
            slots.put(slot)
        self._context = self._context or local_context()
        runners: list[ChildRunner] = []

        def work(spec: RunSpec, say: Callable[[str], None]) -> Outcome:
            env = slots.get()
            runner = ChildRunner(self._context)
            runners.append(runner)
            try:
                return execute(spec, self.rerun, runner, env, say)
            finally:
                slots.put(env)

        with ThreadPoolExecutor(max_workers=slots.qsize()) as pool:
            futures = [pool.submit(work, spec, say) for spec, say in jobs]
            try:
                return [future.result() for future in futures]
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                for runner in runners:
                    runner.stop(grace_s=10)
                raise
