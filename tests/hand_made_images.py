"""Image files written byte by byte, for what PIL cannot write (16-bit RGB and grey+alpha PNGs) or should
not have to (decompression bombs: a huge declared size in a few dozen bytes)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# PNG colour types (PNG spec, section 11.2.2 IHDR)
GREY, RGB, GREY_ALPHA = 0, 2, 4


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, colour_type: int, bit_depth: int, scanlines: bytes) -> bytes:
    """A PNG whose IDAT is ``scanlines`` compressed (each row: filter byte 0, then the samples)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(scanlines))
        + _chunk(b"IEND", b"")
    )


def write_png16(path: Path, samples: np.ndarray, colour_type: int) -> Path:
    """``samples`` (H, W, channels) 16-bit values as a 16-bit PNG (big-endian samples, as PNG stores them)."""
    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1)
    path.write_bytes(
        png_bytes(width, height, colour_type, 16, b"".join(b"\0" + row.tobytes() for row in rows))
    )
    return path


def write_bomb(path: Path, side: int) -> Path:
    """A 1-bit grey PNG declaring ``side`` x ``side`` pixels, with an empty (tiny) image stream."""
    path.write_bytes(png_bytes(side, side, GREY, 1, b""))
    return path
