"""The one image loader of the project: every reader, task and demo turns an image source into RGB pixels here.

    from unifier.images import load_image, image_to_tensor
    pixels = image_to_tensor(load_image("photo.jpg"), 256)   # (3, 256, 256) float32 in [-1, 1]

A source is a file path (str or Path), the encoded bytes of an image file (OFA's TSV images), a PIL
image, or an H x W (gray) / H x W x 3 (RGB) / H x W x 4 (RGBA) uint8 array (the shapes world).
Whatever the source, `load_image` returns a fully decoded RGB `PIL.Image.Image` that owns its pixels:
EXIF orientation applied, grayscale / palette / CMYK / 16-bit converted to 8-bit RGB, transparency
composited on white. Anything that cannot be turned into pixels raises `ImageLoadError`, whose
message names the file ("<bytes>", "<array>" or "<PIL image>" for in-memory sources).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# PIL's own default (about 89.5 megapixels): larger images are refused as possible decompression bombs.
MAX_IMAGE_PIXELS: int | None = 89_478_485
WHITE = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image source that cannot be decoded; the message names the file (or the in-memory kind)."""


def source_name(source: Any) -> str:
    """How error messages name a source: the path of a file, else "<bytes>", "<array>" or "<PIL image>"."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, np.ndarray):
        return "<array>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return f"<{type(source).__name__}>"


def load_image(source: Any, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `source` into a new RGB image (EXIF orientation applied, alpha composited on white).

    max_pixels: images with more pixels than this are refused before their pixels are decoded
    (None: no limit of ours; PIL still refuses above 2 x PIL.Image.MAX_IMAGE_PIXELS unless that is None).
    Raises ImageLoadError for a missing, truncated, corrupt, oversized or non-image source.
    """
    name = source_name(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    if isinstance(source, Image.Image):
        _check_pixel_count(source.size, max_pixels, name)
        return _decode(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream: Any = io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)):
        stream = source
    else:
        raise ImageLoadError(f"{name}: not an image source (expected a path, bytes, a PIL image or a uint8 array)")
    try:
        with warnings.catch_warnings():
            if max_pixels is None or (Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS):
                # Our own limit replaces PIL's warning; PIL's hard error (2x its limit) still applies.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                _check_pixel_count(image.size, max_pixels, name)
                return _decode(image, name)
    except ImageLoadError:
        raise
    except FileNotFoundError as err:
        raise ImageLoadError(f"{name}: no such image file") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{name}: refused as a possible decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL reports unidentified, truncated and corrupt files as OSError (and a few plugins as the others).
        raise ImageLoadError(f"{name}: cannot decode image ({err})") from err


def _check_pixel_count(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(a possible decompression bomb; raise max_pixels to allow it)"
        )


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Load the pixels (errors surface here for truncated files), orient, and convert to a new RGB image."""
    try:
        image.load()
        oriented = ImageOps.exif_transpose(image)  # a new image, or a copy when there is nothing to do
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{name}: refused as a possible decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, TypeError) as err:
        raise ImageLoadError(f"{name}: cannot decode image ({err})") from err
    return _to_rgb(oriented, name)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _on_white(image.convert("RGBA"))
    if mode == "L" and "transparency" in image.info:
        return _on_white(image.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, HSV
    except ValueError as err:
        raise ImageLoadError(f"{name}: cannot convert image mode {mode!r} to RGB ({err})") from err


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int / float) grayscale to 8 bits by scaling, not clipping as PIL's convert does."""
    values = np.asarray(image).astype(np.float64)
    # 16-bit files (PNG, TIFF) open as I;16* or as I; an I / F image whose values fit in 8 bits is kept as is.
    if image.mode.startswith("I;16") or values.max(initial=0.0) > 255.0:
        values = values / 257.0  # 65535 -> 255
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def _array_to_rgb(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageLoadError(f"<array>: dtype must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageLoadError(f"<array>: shape must be (H, W), (H, W, 3) or (H, W, 4), got {tuple(array.shape)}")
    height, width = array.shape[:2]
    _check_pixel_count((width, height), max_pixels, "<array>")
    # L, RGB or RGBA; the result of _to_rgb never shares memory with the caller's array
    image = Image.fromarray(np.ascontiguousarray(array))
    return _to_rgb(image, "<array>")


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """An image as the model sees it: (3, size, size) float32 in [-1, 1].

    Bicubic resize to size x size without keeping the aspect ratio, then (x / 255 - 0.5) / 0.5, as OFA.
    A non-RGB PIL image (or any other source load_image accepts) goes through load_image first.
    """
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        image = load_image(image)
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())  # (size, size, 3) in [0, 255]
    return (pixels.permute(2, 0, 1) / 255.0 - 0.5) / 0.5


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """The inverse of image_to_tensor's scaling: (3, H, W) in [-1, 1] -> RGB image of H x W (values clamped)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"tensor_to_image: expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
