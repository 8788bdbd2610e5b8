"""The one image loader: every source kind, every mode conversion, and the failures that must name the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from unifier.images import ImageLoadError, image_to_tensor, load_image, tensor_to_image

RED, BLUE = (220, 30, 30), (30, 30, 220)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def close(pixel, expected, tolerance=12) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


def test_exif_orientation_is_applied(tmp_path):
    # 32 x 16, left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to display".
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16], pixels[:, 16:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif.tobytes())

    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 32)  # width and height swapped
    assert close(image.getpixel((8, 4)), RED) and close(image.getpixel((8, 28)), BLUE)  # left half went to the top
    assert 0x0112 not in image.getexif()


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 7), 77, dtype=np.uint8)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (7, 5)
    assert np.all(np.asarray(image) == 77)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (200, 0, 0, 0)  # fully transparent becomes white
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black becomes mid gray
    image = load_image(png_bytes(Image.fromarray(rgba)))
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (200, 0, 0)
    assert tuple(pixels[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in pixels[0, 2])


def test_gray_with_alpha_is_composited_on_white():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (10, 255))
    la.putpixel((1, 0), (10, 0))
    pixels = np.asarray(load_image(png_bytes(la)))
    assert tuple(pixels[0, 0]) == (10, 10, 10) and tuple(pixels[0, 1]) == (255, 255, 255)


def test_palette_images_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    plain = np.asarray(load_image(png_bytes(palette)))
    assert tuple(plain[0, 0]) == (0, 0, 0) and tuple(plain[0, 1]) == (10, 200, 30)

    palette.info["transparency"] = 0  # palette index 0 is transparent -> white
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    transparent = np.asarray(load_image(buffer.getvalue()))
    assert tuple(transparent[0, 0]) == (255, 255, 255) and tuple(transparent[0, 1]) == (10, 200, 30)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)  # pure red in CMYK
    image = load_image(path)
    assert image.mode == "RGB"
    assert close(image.getpixel((4, 4)), (255, 0, 0), tolerance=6)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL opens it as a 16 / 32-bit integer image
    pixels = np.asarray(load_image(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 3, 3)
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def test_truncated_file_error_names_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="<bytes>"):
        load_image(data[: len(data) // 2])


def test_non_image_and_missing_files_name_the_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image at all")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="absent.png"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageLoadError, match="not an image source"):
        load_image(12345)


def test_decompression_bomb_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(ImageLoadError, match=r"big.png.*10000 pixels exceeds the limit of 5000"):
        load_image(path, max_pixels=5000)
    with pytest.raises(ImageLoadError, match="<array>.*exceeds"):
        load_image(np.zeros((100, 100, 3), dtype=np.uint8), max_pixels=5000)
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    assert load_image(path, max_pixels=None).size == (100, 100)


def test_arrays_of_every_shape_and_bad_arrays():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[:, :, None], 3, axis=2))
    image = load_image(rgb)
    rgb[0, 0, 0] = 255  # the loaded image owns its pixels
    assert image.getpixel((0, 0))[0] == 0
    with pytest.raises(ImageLoadError, match="<array>: dtype must be uint8"):
        load_image(rgb.astype(np.float32))
    with pytest.raises(ImageLoadError, match="<array>: shape"):
        load_image(np.zeros((2, 3, 5), dtype=np.uint8))


def test_bytes_and_pil_sources():
    pixels = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    from_bytes = load_image(png_bytes(Image.fromarray(pixels)))
    assert np.array_equal(np.asarray(from_bytes), pixels)
    pil = Image.fromarray(pixels)
    loaded = load_image(pil)
    assert loaded is not pil and np.array_equal(np.asarray(loaded), pixels)
    assert load_image(Image.new("L", (3, 2), 9)).mode == "RGB"


def test_image_to_tensor_scale_shape_and_inverse():
    pixels = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    tensor = image_to_tensor(Image.fromarray(pixels), 8)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert torch.allclose(tensor, torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0, atol=1e-6)
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), pixels)

    resized = image_to_tensor(Image.new("RGB", (30, 10), (255, 0, 128)), 16)  # no aspect keeping
    assert resized.shape == (3, 16, 16) and resized.min() >= -1 and resized.max() <= 1
    assert torch.allclose(resized[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 127.5 - 1.0]), atol=1e-6)
    assert image_to_tensor(Image.new("L", (4, 4), 255), 4).eq(1.0).all()  # non-RGB goes through load_image

    clamped = tensor_to_image(torch.full((3, 2, 2), 3.0))
    assert np.all(np.asarray(clamped) == 255)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        tensor_to_image(torch.zeros(1, 3, 2, 2))
