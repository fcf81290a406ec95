"""Turning request payloads into model input: ``[N, 3, H, W]`` float32 in [0, 1].

Every way a payload can be wrong raises :class:`InputError` with the HTTP status and a message that
says what is wrong, so the API answers 4xx and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class InputError(ValueError):
    """A client mistake: ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 422, kind: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def decode_base64(text: str, index: int) -> bytes:
    """Strict base64 (a ``data:image/...;base64,`` prefix is allowed)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"image {index}: not valid base64 ({e})", 400) from e
    if not data:
        raise InputError(f"image {index}: empty image", 400)
    return data


# Pillow refuses (DecompressionBombError) images over twice this many pixels at open, before decoding;
# decode_image refuses anything over ``max_pixels`` from the header, so this is only the backstop.
Image.MAX_IMAGE_PIXELS = 4096 * 4096
ACCEPTED_MODES = {"RGB", "P"}  # 8-bit RGB, or a palette that converts to it


def decode_image(data: bytes, size: int, allow_resize: bool, index: int = 0,
                 max_pixels: int = 1024 * 1024) -> np.ndarray:
    """PNG/JPEG bytes to a ``[3, size, size]`` float32 array in [0, 1]; 8-bit RGB (or palette) only.

    Format, mode and size are checked from the header before any pixel is decoded, so a small file that
    claims a huge image (a decompression bomb) costs microseconds and no memory.

    NumPy, not torch: this runs on the event loop, and each torch operation releases the GIL, which under
    load hands it to the model thread for up to a switch interval (5 ms) per operation. The caller makes
    one tensor of the request's images (:func:`to_batch`).
    """
    if not data:
        raise InputError(f"image {index}: empty image", 400)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in {"PNG", "JPEG"}:
                raise InputError(f"image {index}: {img.format} is not supported; send PNG or JPEG", 415,
                                 "unsupported_media_type")
            width, height = img.size
            if img.mode not in ACCEPTED_MODES:
                channels = len(img.getbands())
                raise InputError(f"image {index}: expected 3 channels (8-bit RGB), got {channels} (mode {img.mode})")
            if (width, height) != (size, size):
                if not allow_resize:
                    raise InputError(f"image {index}: expected {size}x{size} pixels, got {width}x{height} "
                                     "(this server does not resize; SIAM_ALLOW_RESIZE=true enables it)")
                if width * height > max_pixels:
                    raise InputError(f"image {index}: {width}x{height} pixels is over this server's limit of "
                                     f"{max_pixels} pixels", 413, "payload_too_large")
                if img.format == "JPEG":
                    img.draft("RGB", (size, size))  # let libjpeg decode at a reduced scale
            img.load()  # raises on truncated data
            if img.mode == "P":
                img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {index}: too many pixels ({e})", 413, "payload_too_large") from e
    except UnidentifiedImageError as e:
        raise InputError(f"image {index}: not a PNG or JPEG image", 400) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {index}: corrupt or truncated image ({e})", 400) from e
    return unit_floats(array.transpose(2, 0, 1))


def unit_floats(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels to C-ordered float32 in [0, 1], as training's ``images.float().div_(255)`` (the same
    float32 division, bit for bit)."""
    floats = pixels.astype(np.float32, order="C")
    floats /= np.float32(255)
    return floats


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """Decoded images to the model's ``[N, 3, H, W]`` input, with a single torch call."""
    return torch.from_numpy(images[0][None] if len(images) == 1 else np.stack(images))


def from_tensor(array: np.ndarray, layout: str, size: int) -> torch.Tensor:
    """A KServe tensor (FP32 ``[N,3,H,W]`` in [0, 1] or UINT8 ``[N,H,W,3]``) to model input."""
    if layout == "FP32":
        if array.ndim != 4 or array.shape[1:] != (3, size, size):
            raise InputError(f"FP32 input must have shape [N, 3, {size}, {size}], got {list(array.shape)}")
        if not np.isfinite(array).all():
            raise InputError("FP32 input contains NaN or infinite values")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise InputError(f"FP32 input must be in [0, 1] (pixels scaled by 1/255), got range [{low:g}, {high:g}]")
        return torch.from_numpy(np.require(array, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
    if layout == "UINT8":
        if array.ndim != 4 or array.shape[1:] != (size, size, 3):
            raise InputError(f"UINT8 input must have shape [N, {size}, {size}, 3], got {list(array.shape)}")
        return torch.from_numpy(unit_floats(array.astype(np.uint8, copy=False).transpose(0, 3, 1, 2)))
    raise InputError(f"datatype {layout} is not supported; send FP32 [N,3,{size},{size}] or UINT8 [N,{size},{size},3]")


def check_count(n: int, limit: int) -> None:
    if n == 0:
        raise InputError("no images in the request", 400)
    if n > limit:
        raise InputError(f"{n} images in one request; this server takes at most {limit}", 413, "payload_too_large")
