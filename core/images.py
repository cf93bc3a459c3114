"""Pillow work: checking untrusted images, fitting uploads under a size limit, batch grids,
preview thumbnails.

Every image here comes from a ComfyUI server the bot does not control, so nothing is decoded
before its header has been read and its pixel count checked: a 480 KiB JPEG can claim
13000x13000 pixels (650 MiB decoded), well under Pillow's own bomb limit (89 M pixels warns,
179 M refuses). Previews are decoded at reduced size (``Image.draft`` lets the JPEG decoder
scale by 1/2..1/8 while decoding) and grids are built from tiles shrunk one at a time.

Every function here is CPU-bound and synchronous: call them through ``asyncio.to_thread``
so the event loop keeps relaying progress while an image is re-encoded.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image

# Leave room for the multipart envelope and the JSON payload next to the files.
UPLOAD_MARGIN = 64 * 1024
# The most pixels the bot decodes at once: 48 M (e.g. 6928x6928, a 4x upscale of a
# 1728 px image; 144 MiB as RGB). Larger outputs are refused, not decoded.
MAX_PIXELS = 48_000_000
# Previews are small (ComfyUI's --preview-size defaults to 512): what is decoded of one,
# after the JPEG decoder's reduction, may have at most this many pixels.
MAX_PREVIEW_PIXELS = 4_000_000
# The formats ComfyUI's savers write (SaveImage: PNG; SaveAnimatedWEBP; "image/jpeg"
# previews); anything else is not posted.
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif"}


class ImageRejected(ValueError):
    """The bytes are not an image the bot posts, or one too large to decode."""


@dataclass(frozen=True, slots=True)
class ImageFile:
    filename: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def suffix(self) -> str:
        return IMAGE_FORMATS[self.format]


def _header(data: bytes | memoryview) -> Image.Image:
    """Open ``data`` lazily (only the header is parsed), without Pillow's own bomb warning:
    the callers check the size themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
            raise ImageRejected("not an image") from exc


def inspect(data: bytes, *, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """What the header of ``data`` says; refuses what is not a PNG/JPEG/WebP/GIF image or
    has more than ``max_pixels`` pixels. Decodes nothing."""
    img = _header(data)
    with img:
        fmt = img.format or ""
        width, height = img.size
    if fmt not in IMAGE_FORMATS:
        raise ImageRejected(f"not an image the bot posts ({fmt or 'unknown format'})")
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ImageRejected(f"too large to decode ({width}×{height} px)")
    return ImageInfo(fmt, width, height)


def _open(data: bytes | memoryview, *, fit: tuple[int, int] | None = None,
          max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data``; with ``fit``, at about that size or a little above (JPEG decodes
    reduced, other formats are reduced right after decoding). The pixel count that will
    really be decoded is checked first."""
    img = _header(data)
    try:
        if fit is not None and img.format == "JPEG":
            img.draft("RGB", fit)  # the decoder scales by 1/2, 1/4 or 1/8
        width, height = img.size
        if img.format not in IMAGE_FORMATS:
            raise ImageRejected(f"not an image the bot posts ({img.format or 'unknown'})")
        if width < 1 or height < 1 or width * height > max_pixels:
            raise ImageRejected(f"too large to decode ({width}×{height} px)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except ImageRejected:
        img.close()
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        img.close()
        raise ImageRejected("a broken image") from exc
    if fit is not None:
        factor = min(img.width // max(fit[0], 1), img.height // max(fit[1], 1))
        if factor >= 2:
            try:
                reduced = img.reduce(factor)
            except ValueError:  # a mode reduce() does not take (e.g. "P"): thumbnail later
                return img
            img.close()
            img = reduced
    return img


def _encode(img: Image.Image, fmt: str, quality: int = 90, *, compact: bool = True) -> bytes:
    """``compact=False``: a baseline JPEG without optimised tables, for the short-lived
    preview thumbnails: 0.4 against 1.2 ms to encode one of 256 px, 10 % more bytes."""
    out = io.BytesIO()
    if fmt == "JPEG":
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(out, "JPEG", quality=quality, optimize=compact, progressive=compact)
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


def make_grid(images: list[ImageFile], *, max_side: int = 2048,
              filename: str = "grid.png") -> ImageFile:
    """Tile a batch into one image (PNG), at most ``max_side`` pixels wide or high.

    Each tile is decoded (reduced where the format allows), shrunk to its cell and let go
    before the next one: the memory is one decoded output plus the grid, whatever the batch.
    """
    infos = [inspect(i.data) for i in images]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(i.width for i in infos)
    cell_h = max(i.height for i in infos)
    scale = min(1.0, max_side / (cols * cell_w), max_side / (rows * cell_h))
    cell = (max(1, int(cell_w * scale)), max(1, int(cell_h * scale)))
    grid = Image.new("RGB", (cols * cell[0], rows * cell[1]), (16, 16, 16))
    for k, image in enumerate(images):
        with _open(image.data, fit=cell) as img:
            tile = img.convert("RGB")
            if tile.size != cell:
                tile.thumbnail(cell, Image.Resampling.LANCZOS)
            grid.paste(tile, ((k % cols) * cell[0], (k // cols) * cell[1]))
            tile.close()
    return ImageFile(filename, _encode(grid, "PNG"))


def thumbnail(data: bytes | memoryview, *, max_side: int = 256, quality: int = 70) -> bytes:
    """A small JPEG of a preview frame for the status message (decoded at reduced size;
    raises ImageRejected for what is not an image or would decode too large).

    256 px: ComfyUI's previews are JPEGs of up to 512 px, which the decoder reduces by
    half as it reads them, so a thumbnail costs a third of what one of 320 px did (2 ms
    against 6 ms of CPU, for every progress edit that shows a new frame). Encoded plain
    (see _encode): 1.3 ms in all."""
    img = _open(data, fit=(max_side, max_side), max_pixels=MAX_PREVIEW_PIXELS)
    with img:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return _encode(img, "JPEG", quality, compact=False)
