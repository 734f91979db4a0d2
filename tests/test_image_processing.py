import io

import numpy as np
import pytest
import torch
from PIL import Image

from convllava.image_processing import ConvLlavaImageProcessor, ImageError, load_image, to_rgb


def _png(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [("square", (640, 480), (768, 768)), ("bucket", (640, 480), None), ("short-side", (640, 480), (768, 1024))],
)
def test_modes_give_stride_aligned_sizes(mode, size, expected):
    proc = ConvLlavaImageProcessor(resolution=768, mode=mode)
    x = proc(Image.new("RGB", size, (10, 20, 30)))
    assert x.shape[0] == 3 and x.shape[1] % 64 == 0 and x.shape[2] % 64 == 0
    if expected:
        assert tuple(x.shape[1:]) == expected
    else:  # bucket: aspect 4:3 kept, token budget (768/64)² = 144 not exceeded
        assert (x.shape[1] // 64) * (x.shape[2] // 64) <= 144
        assert abs(x.shape[2] / x.shape[1] - 4 / 3) < 0.1


def test_square_mode_pads_with_the_mean_colour_which_normalises_to_zero():
    proc = ConvLlavaImageProcessor(resolution=256, mode="square")
    x = proc(Image.new("RGB", (256, 64), (255, 255, 255)))
    assert torch.allclose(x[:, 0, :], torch.zeros(3, 256), atol=0.02)  # top rows are padding
    assert x[:, 128, :].min() > 1.5  # white content in the middle
    placement = proc.target(256, 64)
    assert (placement.content_height, placement.offset_y) == (64, 96)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (100, 200)


def test_every_pil_mode_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0))[0] > 200
    sixteen = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16).reshape(8, 8))
    sixteen.putpixel((0, 0), 0)
    rgb16 = to_rgb(sixteen)
    assert rgb16.mode == "RGB" and rgb16.getpixel((1, 1)) == (255, 255, 255) and rgb16.getpixel((0, 0)) == (0, 0, 0)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    palette.info["transparency"] = 0
    assert to_rgb(palette, background=(1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)
    assert to_rgb(Image.new("LA", (4, 4), (200, 255))).getpixel((0, 0)) == (200, 200, 200)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    assert load_image(buf.getvalue()).getpixel((0, 0))[0] > 200


def test_bad_files_raise_image_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(_png(Image.new("RGB", (256, 256), (1, 2, 3)), "JPEG")[:300])
    for path, reason in [(empty, "empty"), (text, "not a readable image"), (truncated, "not a readable image"),
                         (tmp_path / "missing.png", "not found")]:  # fmt: skip
        with pytest.raises(ImageError, match=f"{path.name}.*{reason}"):
            load_image(path)


def test_decompression_bombs_are_refused_before_decoding():
    big = _png(Image.new("L", (4000, 4000)))
    with pytest.raises(ImageError, match="16000000 pixels exceeds the limit 1000000"):
        load_image(big, max_pixels=1_000_000)


def test_real_photos_decode(photos):
    proc = ConvLlavaImageProcessor(resolution=256, mode="bucket")
    for photo in photos:
        x = proc(load_image(photo.path))
        assert x.dtype == torch.float32 and x.shape[1] % 64 == 0 and torch.isfinite(x).all()
