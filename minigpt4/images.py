"""Open, validate and preprocess images exactly as the official evaluation does.

Official: PIL open -> convert("RGB") (alpha dropped, not composited) -> bicubic resize to SxS
(aspect not kept) -> [0,1] -> normalise with the CLIP mean/std. We add what users hit in
practice: EXIF orientation, 16-bit and exotic modes, and one-line errors for bad files.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from minigpt4.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000  # beyond this a file is treated as a decompression bomb
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredImage:
    """A picture kept inside another file (a benchmark's TSV or parquet), read only when it is
    needed: the rows of a 1 GB benchmark file hold these, not the pictures. `read` returns the
    encoded bytes (or raises a UserError naming `name`, e.g. for bad base64)."""

    name: str  # how messages name it, e.g. "MME.tsv:12"
    read: Callable[[], bytes]


ImageSource = str | os.PathLike | bytes | Image.Image | StoredImage


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: scale to 8 bits instead of clipping everything above 255 to white.
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(source: ImageSource, name: str | None = None, exif_transpose: bool = True) -> Image.Image:
    """Any supported input -> an RGB PIL image; a bad file raises a one-line UserError."""
    if isinstance(source, Image.Image):
        image = source
        label = name or "<image>"
    else:
        if isinstance(source, StoredImage):
            name, source = name or source.name, source.read()
        if isinstance(source, bytes):
            label, fp = name or "<bytes>", io.BytesIO(source)
            if len(source) > MAX_FILE_BYTES:
                raise UserError(f"image {label}: larger than {MAX_FILE_BYTES // 2**20} MB")
        else:
            path = Path(source)
            label = name or str(path)
            if path.is_dir():
                raise UserError(f"image {label} is a directory; give an image file in it")
            if not path.is_file():
                raise UserError(f"image {label}: no such file")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise UserError(f"image {label}: file is larger than {MAX_FILE_BYTES // 2**20} MB")
            fp = path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(fp)
                if image.width * image.height > MAX_PIXELS:
                    raise UserError(
                        f"image {label}: {image.width}x{image.height} pixels is over the "
                        f"{MAX_PIXELS:,}-pixel limit (decompression bomb?)"
                    )
                image.load()
        except UserError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise UserError(f"image {label}: too many pixels ({err})") from None
        except UnidentifiedImageError:
            raise UserError(f"image {label}: not an image file (or a format Pillow cannot read)") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"image {label}: unreadable or truncated ({err})") from None
    if exif_transpose:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block is not worth failing the image for
            pass
    return _to_rgb(image)


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """RGB PIL image -> normalised pixels [3,size,size] (float32)."""
    resized = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (arr - mean) / std


def load_pixels(sources: list[ImageSource], size: int = 224, exif_transpose: bool = True) -> torch.Tensor:
    """Paths or images -> [N,3,size,size]; the first bad file raises a UserError naming it."""
    if not sources:
        return torch.zeros(0, 3, size, size)
    return torch.stack([preprocess(load_image(s, exif_transpose=exif_transpose), size) for s in sources])


# Truncated files must raise, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
