"""Images: every mode users have works like the official convert("RGB"), bad files give one line
naming the file, and preprocessing matches fixed reference values."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4 import images
from minigpt4.errors import UserError
from minigpt4.images import CLIP_MEAN, CLIP_STD, load_image, load_pixels, preprocess


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    """A deterministic RGB test picture: red grows with x, green with y, blue with both."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x * 5, y * 7, (x + y) * 3], -1).astype(np.uint8), "RGB")


def rgb_at(image: Image.Image, xy) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


# ---- modes ------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)
    top, bottom = rgb_at(upright, (10, 5)), rgb_at(upright, (10, 35))
    assert top[0] > 200 and top[2] < 60  # red on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_grey_and_alpha_modes_become_rgb(tmp_path):
    cases = {
        "L": (Image.new("L", (8, 8), 77), (77, 77, 77)),
        "LA": (Image.new("LA", (8, 8), (77, 0)), (77, 77, 77)),
        # alpha is dropped, not composited onto white: the official convert("RGB")
        "RGBA": (Image.new("RGBA", (8, 8), (200, 10, 30, 0)), (200, 10, 30)),
    }
    for mode, (image, expected) in cases.items():
        path = tmp_path / f"{mode}.png"
        image.save(path)
        assert rgb_at(load_image(path), (3, 3)) == expected, mode


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.info["transparency"] = 1  # the used colour is fully transparent
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)
    assert Image.open(path).info.get("transparency") == 1
    assert rgb_at(load_image(path), (2, 2)) == (10, 200, 30)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    r, g, b = rgb_at(load_image(path), (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    row = [rgb_at(load_image(path), (x, 0))[0] for x in range(4)]
    assert row == [0, 64, 128, 255]


# ---- bad files: one line naming the file --------------------------------------------------------
def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    gradient(256, 256).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bad_files(tmp_path):
    jpeg = _jpeg_bytes()
    files = {
        "truncated": ("cut.jpg", jpeg[: len(jpeg) // 2], "unreadable or truncated"),
        "corrupt": ("noise.png", bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)), "not an image file"),
        "text": ("notes.jpg", b"these are my holiday notes\n" * 20, "not an image file"),
        "png header only": ("header.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image "),
    }
    out = {}
    for kind, (name, data, message) in files.items():
        (tmp_path / name).write_bytes(data)
        out[kind] = (tmp_path / name, message)
    out["missing"] = (tmp_path / "absent.jpg", "no such file")
    return out


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "text", "png header only", "missing"])
def test_bad_files_give_one_line_naming_the_file(tmp_path, kind):
    path, message = bad_files(tmp_path)[kind]
    with pytest.raises(UserError) as err:
        load_pixels([gradient(), path], size=64)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"image {path}: ") and message in text


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(UserError) as err:
        load_image(path)
    assert str(err.value) == f"image {path}: 40x30 pixels is over the 1,000-pixel limit (decompression bomb?)"
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 10)
    with pytest.raises(UserError, match="file is larger than"):
        load_image(path)


# ---- preprocessing ----------------------------------------------------------------------------
def numpy_normalise(image: Image.Image) -> np.ndarray:
    """Independent reference for an image that needs no resizing: [0,1], CLIP mean/std, CHW."""
    arr = np.asarray(image, dtype=np.float64) / 255.0
    return ((arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


def test_preprocess_without_resize_matches_numpy():
    image = gradient(224, 224)
    pixels = preprocess(image, 224)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    np.testing.assert_allclose(pixels.numpy(), numpy_normalise(image), atol=1e-6)


# Computed once with PIL's bicubic resize (the official transform) and frozen here: a change
# in interpolation (antialiasing, torch resize, aspect keeping) shows up as a failure.
REFERENCE = {
    224: {(0, 0): (-1.792263, -1.752097, -1.48022), (112, 74): (-0.668184, -0.11625, -0.157754),
          (223, 223): (1.652966, 1.519596, 1.847276), (17, 200): (1.302604, -1.541988, 0.411049)},
    64: {(0, 0): (-1.792263, -1.752097, -1.48022), (32, 21): (-0.653585, -0.101243, -0.143534),
         (63, 63): (1.638368, 1.519596, 1.847276), (17, 8): (-1.368908, -0.881647, -0.868757)},
}


@pytest.mark.parametrize("size", [224, 64])
def test_preprocess_reference_values(size):
    pixels = preprocess(gradient(), size)
    assert pixels.shape == (3, size, size)
    for (i, j), expected in REFERENCE[size].items():
        assert pixels[:, i, j].tolist() == pytest.approx(expected, abs=1e-5), (i, j)
    # corners of an upscaled gradient keep their exact source colours (cross-check with numpy)
    corner = numpy_normalise(gradient())[:, 0, 0]
    assert pixels[:, 0, 0].numpy() == pytest.approx(corner, abs=1e-5)


def test_load_pixels_accepts_paths_bytes_and_images(tmp_path):
    image = gradient()
    path = tmp_path / "g.png"
    image.save(path)
    batch = load_pixels([path, path.read_bytes(), image, image.convert("RGBA")], size=64)
    assert batch.shape == (4, 3, 64, 64)
    assert all(torch.equal(batch[0], batch[i]) for i in range(1, 4))
    assert load_pixels([], size=64).shape == (0, 3, 64, 64)
