"""Write image grids as PNG files with the standard library only.

The demo's one figure is a grayscale grid; encoding it is zlib plus three chunks, which is less than
pulling Pillow or matplotlib into the package's required dependencies for one call.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (rounded, clamped)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images: torch.Tensor, columns: int, padding: int = 2, background: int = 255) -> torch.Tensor:
    """(B, 1, H, W) uint8 -> one (rows*(H+p)+p, columns*(W+p)+p) uint8 image, row-major."""
    count, channels, height, width = images.shape
    if channels != 1:
        raise ValueError(f"grid() writes grayscale images, got {channels} channels")
    rows = -(-count // columns)
    out = torch.full((rows * (height + padding) + padding, columns * (width + padding) + padding), background,
                     dtype=torch.uint8)
    for i in range(count):
        top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
        out[top:top + height, left:left + width] = images[i, 0]
    return out


def side_by_side(panels: list[torch.Tensor], gap: int = 8, background: int = 255) -> torch.Tensor:
    """Join 2-D uint8 images left to right with a gap, padding shorter ones at the bottom."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = torch.full((height, width), background, dtype=torch.uint8)
    left = 0
    for panel in panels:
        out[:panel.shape[0], left:left + panel.shape[1]] = panel
        left += panel.shape[1] + gap
    return out


def write_png(path: str | Path, image: torch.Tensor) -> Path:
    """Save a 2-D uint8 tensor as an 8-bit grayscale PNG."""
    if image.dim() != 2 or image.dtype != torch.uint8:
        raise ValueError(f"write_png needs a 2-D uint8 tensor, got {image.dtype} of shape {tuple(image.shape)}")
    height, width = image.shape
    raw = b"".join(b"\x00" + bytes(row) for row in image.contiguous().numpy())  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))
    return path
