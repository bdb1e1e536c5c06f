"""Test-only: a checkpoint writer that stalls half-way through each write, so a test can kill a save."""

from __future__ import annotations

import time
from typing import IO

from lily_lightning.training.checkpointing import AtomicCheckpointIO


class SlowCheckpointIO(AtomicCheckpointIO):
    """:class:`AtomicCheckpointIO` that writes half the bytes, flushes them, and sleeps ``stall_s``."""

    def __init__(self, stall_s: float = 1.0) -> None:
        super().__init__()
        self.stall_s = stall_s

    def write(self, file: IO[bytes], data: memoryview) -> None:
        half = len(data) // 2
        file.write(data[:half])
        file.flush()
        time.sleep(self.stall_s)
        file.write(data[half:])
