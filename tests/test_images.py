"""``service/images.py`` directly: every way a payload can be wrong has its status, kind and a message that
says what to send instead; every way it can be right gives exact pixels."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.images import InputError, check_count, decode_base64, decode_image, from_tensor, to_batch


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


def rgb(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def refused(call: object, *args: object, **kwargs: object) -> InputError:
    with pytest.raises(InputError) as e:
        call(*args, **kwargs)  # type: ignore[operator]
    return e.value


def test_input_error_defaults_to_a_422_bad_request() -> None:
    e = InputError("what is wrong")
    assert (str(e), e.status, e.kind) == ("what is wrong", 422, "bad_request")


def test_base64_strict_with_an_optional_data_url_prefix() -> None:
    png = encode(rgb())
    text = base64.b64encode(png).decode()
    assert decode_base64(text, 0) == png == decode_base64("data:image/png;base64," + text, 0)
    # Only a data URL's first comma ends its prefix; a comma anywhere else makes the text invalid base64.
    for wrong in ("QUJD,REVG", "data:image/png;base64,QUJD,REVG"):
        assert refused(decode_base64, wrong, 0).status == 400
    bad = refused(decode_base64, "not base64!", 3)
    assert bad.status == 400 and str(bad).startswith("image 3: not valid base64 (")
    empty = refused(decode_base64, "data:image/png;base64,", 4)
    assert (empty.status, str(empty)) == (400, "image 4: empty image")


def test_a_header_that_claims_too_many_pixels_is_refused_before_decoding() -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header_only = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0))
                   + chunk(b"IEND", b""))  # 100 million pixels claimed, none sent: Pillow stops at the header
    e = refused(decode_image, header_only, 32, True)
    assert (e.status, e.kind) == (413, "payload_too_large")
    assert str(e).startswith("image 0: too many pixels (")  # the first image unless told otherwise


def test_png_pixels_arrive_exactly_in_channel_first_order() -> None:
    pixels = rgb()
    x = decode_image(encode(pixels), 32, allow_resize=False)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    # bit for bit what training feeds the model (training/data.py: uint8 images, then .float().div_(255))
    assert torch.equal(torch.from_numpy(x), torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def test_a_palette_image_is_converted_to_its_colours() -> None:
    pixels = rgb()
    palette = Image.fromarray(pixels).quantize(16)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    x = decode_image(buf.getvalue(), 32, allow_resize=False)
    expected = np.asarray(palette.convert("RGB"))
    assert torch.equal(torch.from_numpy(x), torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize(("make", "status", "kind", "message"), [
    (lambda: b"", 400, "bad_request", "image 2: empty image"),
    (lambda: b"plain text, no image", 400, "bad_request", "image 2: not a PNG or JPEG image"),
    (lambda: encode(rgb(), "GIF"), 415, "unsupported_media_type", "image 2: GIF is not supported; send PNG or JPEG"),
    (lambda: encode(rgb()[..., 0], mode="L"), 422, "bad_request",
     "image 2: expected 3 channels (8-bit RGB), got 1 (mode L)"),
    (lambda: encode(np.dstack([rgb(), rgb()[..., :1]])), 422, "bad_request",
     "image 2: expected 3 channels (8-bit RGB), got 4 (mode RGBA)"),
    (lambda: encode(rgb(40)), 422, "bad_request",
     "image 2: expected 32x32 pixels, got 40x40 (this server does not resize; SIAM_ALLOW_RESIZE=true enables it)"),
    (lambda: encode(rgb())[:200], 400, "bad_request", "image 2: corrupt or truncated image ("),
])
def test_bad_images_are_refused_with_what_to_send(make: object, status: int, kind: str, message: str) -> None:
    e = refused(decode_image, make(), 32, False, 2)  # type: ignore[operator]
    assert (e.status, e.kind) == (status, kind)
    assert str(e).startswith(message), str(e)


def test_resizing_when_allowed_up_to_the_pixel_limit() -> None:
    small = decode_image(encode(rgb(64), "JPEG"), 32, allow_resize=True, max_pixels=64 * 64)
    assert small.shape == (3, 32, 32) and small.min() >= 0 and small.max() <= 1
    pixels = rgb(40)  # PNG: resized bilinearly, as Pillow does it
    expected = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.equal(torch.from_numpy(decode_image(encode(pixels), 32, allow_resize=True)),
                       torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)
    big = refused(decode_image, encode(rgb(64)), 32, True, 5, max_pixels=64 * 64 - 1)
    assert (big.status, big.kind) == (413, "payload_too_large")
    assert str(big) == "image 5: 64x64 pixels is over this server's limit of 4095 pixels"


def test_decoded_images_become_one_batch_tensor_that_shares_their_order() -> None:
    one, two = decode_image(encode(rgb()), 32, False), decode_image(encode(rgb()[::-1].copy()), 32, False)
    batch = to_batch([one, two])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0], torch.from_numpy(one)) and torch.equal(batch[1], torch.from_numpy(two))
    assert torch.equal(to_batch([two]), torch.from_numpy(two)[None])


def test_tensors_in_both_layouts_and_their_refusals() -> None:
    fp32 = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    assert torch.equal(from_tensor(fp32, "FP32", 32), torch.from_numpy(fp32))
    assert from_tensor(np.zeros((0, 3, 32, 32), np.float32), "FP32", 32).shape == (0, 3, 32, 32)  # no images
    uint8 = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(from_tensor(uint8, "UINT8", 32), torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 255)
    cases = [
        (fp32[:, :, :16], "FP32", "FP32 input must have shape [N, 3, 32, 32], got [2, 3, 16, 32]"),
        (np.where(fp32 > 0.5, np.nan, fp32), "FP32", "FP32 input contains NaN or infinite values"),
        (np.full((1, 3, 32, 32), 0.5, np.float32) + np.eye(32, dtype=np.float32), "FP32",
         "FP32 input must be in [0, 1] (pixels scaled by 1/255), got range [0.5, 1.5]"),
        (np.full((1, 3, 32, 32), -0.5, np.float32) + 0.25 * np.eye(32, dtype=np.float32), "FP32",
         "FP32 input must be in [0, 1] (pixels scaled by 1/255), got range [-0.5, -0.25]"),  # the true range
        (uint8[:, :, :, :1], "UINT8", "UINT8 input must have shape [N, 32, 32, 3], got [2, 32, 32, 1]"),
        (uint8, "INT64", "datatype INT64 is not supported; send FP32 [N,3,32,32] or UINT8 [N,32,32,3]"),
    ]
    for array, layout, message in cases:
        e = refused(from_tensor, array, layout, 32)
        assert e.status == 422 and str(e).startswith(message), str(e)


def test_image_count_between_one_and_the_limit() -> None:
    check_count(1, 4)
    check_count(4, 4)
    none = refused(check_count, 0, 4)
    assert (none.status, str(none)) == (400, "no images in the request")
    many = refused(check_count, 5, 4)
    assert (many.status, many.kind) == (413, "payload_too_large")
    assert str(many) == "5 images in one request; this server takes at most 4"
