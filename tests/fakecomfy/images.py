"""Pillow helpers for the fake: real PNG outputs and JPEG latent previews.

Call these through ``asyncio.to_thread``; they are CPU work.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os

from PIL import Image, ImageOps

PREVIEW_SIZE = 512  # ComfyUI's default --preview-size


def color_for(seed: object) -> tuple[int, int, int]:
    digest = hashlib.sha256(str(seed).encode()).digest()
    return digest[0], digest[1], digest[2]


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    """A real RGB PNG of the requested size: a gradient, so it compresses and is cheap."""
    width, height = max(1, width), max(1, height)
    base = Image.new("RGB", (width, height), color)
    overlay = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(base, Image.new("RGB", (width, height), (0, 0, 0)), overlay)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def latent_preview_jpeg(latent_width: int, latent_height: int) -> bytes:
    """Like ComfyUI's latent2rgb preview: latent-sized noise, ``ImageOps.contain``-ed to
    512 (which upscales small latents; a 128x128 render gives 512x512), JPEG quality 95."""
    lw, lh = max(1, latent_width), max(1, latent_height)
    noise = Image.frombytes("RGB", (lw, lh), os.urandom(lw * lh * 3))
    preview = ImageOps.contain(noise, (PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    preview.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def image_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


def transcode(data: bytes, fmt: str, quality: int = 90, channel: str | None = None
              ) -> tuple[bytes, str]:
    """``/view?preview=`` and ``channel=`` (trace 16)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if channel == "a":
            alpha = image.getchannel("A") if "A" in image.getbands() else Image.new(
                "L", image.size, 255)
            out = Image.new("RGBA", image.size, (0, 0, 0, 0))
            out.putalpha(alpha)
            image, fmt = out, "png"
        elif channel == "rgb":
            image, fmt = image.convert("RGB"), "png"
        else:
            image = image.convert("RGB")
        buf = io.BytesIO()
        if fmt == "webp":
            image.save(buf, format="WEBP", quality=quality)
            return buf.getvalue(), "image/webp"
        if fmt == "jpeg":
            image.save(buf, format="JPEG", quality=quality)
            return buf.getvalue(), "image/jpeg"
        image.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
