import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from convllava.metrics.grounding import box_to_original
from convllava.processing.image_processing import ConvLlavaImageProcessor, ImageError, load_image, to_rgb


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
    x = proc.transform(Image.new("RGB", size, (10, 20, 30)))
    assert x.shape[0] == 3 and x.shape[1] % 64 == 0 and x.shape[2] % 64 == 0
    if expected:
        assert tuple(x.shape[1:]) == expected
    else:  # bucket: aspect 4:3 kept, token budget (768/64)² = 144 not exceeded
        assert (x.shape[1] // 64) * (x.shape[2] // 64) <= 144
        assert abs(x.shape[2] / x.shape[1] - 4 / 3) < 0.1


def test_square_mode_pads_with_the_mean_colour_which_normalises_to_zero():
    proc = ConvLlavaImageProcessor(resolution=256, mode="square")
    x = proc.transform(Image.new("RGB", (256, 64), (255, 255, 255)))
    assert torch.allclose(x[:, 0, :], torch.zeros(3, 256), atol=0.02)  # top rows are padding
    assert x[:, 128, :].min() > 1.5  # white content in the middle
    placement = proc.target(256, 64)
    assert (placement.content_height, placement.offset_y) == (64, 96)


def expand2square(pil_img, background_color):
    """LLaVA's expand2square (llava/mm_utils.py), verbatim: the released models' `image_aspect_ratio: pad`."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def llava_pad_reference(image: Image.Image, resolution: int) -> torch.Tensor:
    """The released models' pixels. transformers 5.x's `CLIPImageProcessor` is the torchvision backend (tensor
    bicubic, off by a level here and there); `CLIPImageProcessorPil` is the PIL path LLaVA's CLIPImageProcessor ran."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution}
    )
    square = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return torch.from_numpy(np.asarray(processor.preprocess(square)["pixel_values"][0]))


def _reshape(photo: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """The photo at `size` (w, h): the largest centred crop of that aspect ratio, resized; None keeps it as it is."""
    if size is None:
        return photo
    w, h = photo.size
    aspect = size[0] / size[1]
    cw, ch = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    return photo.crop(box).resize(size, Image.Resampling.LANCZOS)


@pytest.mark.parametrize("resolution", [256, 768])
@pytest.mark.parametrize(
    "size",
    [None, (400, 400), (400, 300), (300, 400), (640, 360), (150, 450), (333, 517), (517, 333)],
    ids=["native", "1:1", "4:3", "3:4", "16:9", "1:3", "333x517", "517x333"],
)
def test_square_mode_gives_the_released_models_pixels(photos, size, resolution):
    proc = ConvLlavaImageProcessor(resolution=resolution, mode="square")
    for photo in [p for p in photos if p.name in ("coffee", "chelsea", "rocket")]:
        image = _reshape(load_image(photo.path), size)
        # Through the transformers interface, as AutoProcessor users call it: a (1, 3, R, R) BatchFeature.
        ours, reference = proc(image, return_tensors="pt")["pixel_values"][0], llava_pad_reference(image, resolution)
        assert ours.shape == reference.shape == (3, resolution, resolution)
        # One 8-bit level is 1/(255·std) ≈ 0.0146 normalised, so this bound means identical uint8 pixels.
        diff = (ours - reference).abs().max().item()
        assert diff <= 1 / 255, f"{photo.name} at {image.size}, R={resolution}: max |ours - reference| = {diff:.4f}"


def test_square_fill_is_llavas_truncated_mean_and_other_modes_keep_theirs():
    square = ConvLlavaImageProcessor(resolution=256, mode="square")
    assert square.fill == (122, 116, 104)  # int(mean·255), as LLaVA's expand2square is called
    assert ConvLlavaImageProcessor(resolution=256, mode="bucket").fill == (123, 117, 104)
    resized, _ = square.resize(Image.new("RGB", (300, 100), (255, 255, 255)))
    corner = np.asarray(resized)[:40, :, :].reshape(-1, 3)  # rows far from the content
    assert (corner == (122, 116, 104)).all()


@pytest.mark.parametrize("size", [(300, 100), (301, 100), (100, 301), (517, 333), (64, 64)])
def test_square_placement_locates_the_content_and_maps_boxes_back(size):
    """The placement (the shard's content_box) is where the pasted content lies after resizing, to a pixel,
    and a box around it comes back as the whole original through the grounding frame."""
    r = 256
    proc = ConvLlavaImageProcessor(resolution=r, mode="square")
    w, h = size
    resized, p = proc.resize(Image.new("RGB", size, (255, 255, 255)))
    side = max(w, h)
    assert (p.offset_x, p.offset_y) == (round((side - w) // 2 * r / side), round((side - h) // 2 * r / side))
    white = np.asarray(resized).min(axis=2) > 200
    rows, cols = np.flatnonzero(white.any(axis=1)), np.flatnonzero(white.any(axis=0))
    assert abs(rows[0] - p.offset_y) <= 1 and abs(rows[-1] + 1 - (p.offset_y + p.content_height)) <= 1
    assert abs(cols[0] - p.offset_x) <= 1 and abs(cols[-1] + 1 - (p.offset_x + p.content_width)) <= 1
    box = [p.offset_x / r, p.offset_y / r, (p.offset_x + p.content_width) / r, (p.offset_y + p.content_height) / r]
    back = box_to_original(box, w, h, frame="square")
    assert np.allclose(back, [0, 0, w, h], atol=side / r + 0.5)  # a rounded pixel of the r frame + the ½ of //2


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
    for path, reason in [
        (empty, "empty"),
        (text, "not a readable image"),
        (truncated, "not a readable image"),
        (tmp_path / "missing.png", "not found"),
    ]:
        with pytest.raises(ImageError, match=f"{path.name}.*{reason}"):
            load_image(path)


def test_decompression_bombs_are_refused_before_decoding():
    big = _png(Image.new("L", (4000, 4000)))
    with pytest.raises(ImageError, match="16000000 pixels exceeds the limit 1000000"):
        load_image(big, max_pixels=1_000_000)


def test_real_photos_decode(photos):
    proc = ConvLlavaImageProcessor(resolution=256, mode="bucket")
    for photo in photos:
        x = proc.transform(load_image(photo.path))
        assert x.dtype == torch.float32 and x.shape[1] % 64 == 0 and torch.isfinite(x).all()
