"""Pillow work: fitting uploads under a size limit, batch grids, preview thumbnails.

Every function here is CPU-bound and synchronous: call them through ``asyncio.to_thread``
so the event loop keeps relaying progress while an image is re-encoded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image

# Leave room for the multipart envelope and the JSON payload next to the files.
UPLOAD_MARGIN = 64 * 1024


@dataclass(frozen=True, slots=True)
class ImageFile:
    filename: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
    elif fmt == "WEBP":
        img.save(out, "WEBP", quality=quality, method=4)
    else:
        img.save(out, "PNG", optimize=True)
    return out.getvalue()


def _with_suffix(filename: str, suffix: str) -> str:
    return str(PurePosixPath(filename).with_suffix(suffix))


def shrink_to(image: ImageFile, budget: int) -> ImageFile:
    """Re-encode (JPEG, falling quality) then downscale until the file fits ``budget``."""
    if image.size <= budget:
        return image
    img = _open(image.data)
    scale = 1.0
    for _ in range(12):
        work = img
        if scale < 1.0:
            size = (max(8, int(img.width * scale)), max(8, int(img.height * scale)))
            work = img.resize(size, Image.Resampling.LANCZOS)
        for quality in (92, 85, 75):
            data = _encode(work, "JPEG", quality)
            if len(data) <= budget:
                return ImageFile(_with_suffix(image.filename, ".jpg"), data)
        # Pixels scale with the square of the side: aim at the budget, at least -15 %.
        ratio = budget / max(len(data), 1)
        scale *= min(0.85, math.sqrt(ratio) * 0.95)
    raise ValueError("image cannot be made small enough")


def fit_for_upload(images: list[ImageFile], limit: int) -> list[ImageFile]:
    """Make the files fit one message whose total upload limit is ``limit`` bytes.

    Files already small enough are left byte-for-byte untouched; otherwise the largest are
    re-encoded or downscaled, each to a fair share of the budget.
    """
    budget = max(limit - UPLOAD_MARGIN, 32 * 1024)
    if sum(i.size for i in images) <= budget:
        return images
    out = list(images)
    # Shrink the biggest first, each to a fair share of what is left.
    order = sorted(range(len(out)), key=lambda k: out[k].size, reverse=True)
    for position, index in enumerate(order):
        remaining = budget - sum(out[k].size for k in order[position + 1 :])
        share = min(remaining, budget // len(out)) if position < len(out) - 1 else remaining
        if out[index].size > share:
            out[index] = shrink_to(out[index], max(share, 16 * 1024))
    return out


def make_grid(images: list[ImageFile], *, max_side: int = 2048) -> ImageFile:
    """Tile a batch into one image (PNG), at most ``max_side`` pixels wide or high."""
    opened = [_open(i.data).convert("RGB") for i in images]
    cols = math.ceil(math.sqrt(len(opened)))
    rows = math.ceil(len(opened) / cols)
    cell_w = max(i.width for i in opened)
    cell_h = max(i.height for i in opened)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), (16, 16, 16))
    for k, img in enumerate(opened):
        grid.paste(img, ((k % cols) * cell_w, (k // cols) * cell_h))
    if max(grid.size) > max_side:
        grid.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return ImageFile("grid.png", _encode(grid, "PNG"))


def thumbnail(data: bytes, *, max_side: int = 320, quality: int = 70) -> bytes:
    """A small JPEG of a preview frame for the status message."""
    img = _open(data)
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return _encode(img, "JPEG", quality)

