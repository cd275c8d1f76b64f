"""Image modes convert to RGB (16-bit rescaled, not clipped); checks and loading of files."""

import numpy as np
import pytest
from PIL import Image

from fixtures.data.helpers import make_bomb_png, make_image, make_truncated
from mm_teamlora.data import ImageCheckConfig, ResizeToTensor, check_image, load_image, to_rgb
from mm_teamlora.data.errors import RecordProblem
from mm_teamlora.data.images import resolve_image_path


def test_16_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16).repeat(8, axis=0).repeat(2, axis=1)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL keeps 16 bits
    rgb = np.asarray(load_image(str(path), ImageCheckConfig(min_side=1)))
    assert rgb.shape == (8, 10, 3)
    assert list(rgb[0, ::2, 0]) == [0, 1, 4, 128, 255]  # PIL's own convert would give [0, 255, 255, 255, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_mode_i_is_treated_as_16_bit():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.int32), mode="I")
    assert to_rgb(image).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_converts(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    image = load_image(str(path))
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50


def test_palette_and_palette_with_transparency(tmp_path):
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert load_image(str(tmp_path / "p.png")).getpixel((0, 0)) == (10, 200, 30)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "pt.png", transparency=1)
    assert Image.open(tmp_path / "pt.png").mode == "P"
    assert load_image(str(tmp_path / "pt.png")).getpixel((0, 0)) == (255, 255, 255)


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 8, 16))
    rgba.save(tmp_path / "a.png")
    image = load_image(str(tmp_path / "a.png"))
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == (200, 10, 10) and image.getpixel((12, 2)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (40, 255))).getpixel((0, 0)) == (40, 40, 40)


@pytest.mark.parametrize("mode,color", [("1", 1), ("L", 77), ("YCbCr", (100, 128, 128)), ("RGB", (1, 2, 3))])
def test_other_modes_convert(mode, color):
    assert to_rgb(Image.new(mode, (4, 4), color)).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(str(tmp_path / "o.jpg")).size == (20, 40)


def test_check_limits_and_full_decode(tmp_path):
    good = make_image(tmp_path / "good.png", (64, 48))
    check_image(good, ImageCheckConfig())
    with pytest.raises(RecordProblem, match="image_too_large"):
        check_image(good, ImageCheckConfig(max_pixels=1000))
    with pytest.raises(RecordProblem, match="image_too_small"):
        check_image(good, ImageCheckConfig(min_side=50))
    with pytest.raises(RecordProblem, match="image_extreme_aspect_ratio"):
        check_image(make_image(tmp_path / "tall.png", (8, 300)), ImageCheckConfig())
    with pytest.raises(RecordProblem, match="image_too_large"):
        check_image(make_bomb_png(tmp_path / "bomb.png"), ImageCheckConfig())
    # a truncated JPEG passes the header check and fails the full decode
    jpeg = make_truncated(tmp_path / "cut.jpg", "JPEG")
    check_image(jpeg, ImageCheckConfig())
    with pytest.raises(RecordProblem, match="image_corrupt"):
        check_image(jpeg, ImageCheckConfig(full_decode=True))
    with pytest.raises(RecordProblem, match="image_too_large"):
        load_image(str(tmp_path / "bomb.png"))


def test_resolve_image_path():
    assert resolve_image_path("/data", "coco/train2017/1.jpg") == "/data/coco/train2017/1.jpg"
    assert resolve_image_path("/data", "a/../b.jpg") == "/data/b.jpg"
    for path, reason in [("/abs.jpg", "absolute_image_path"), ("~/x.jpg", "absolute_image_path"),
                         ("..", "image_path_escapes_root"), ("a/../../b.jpg", "image_path_escapes_root")]:
        with pytest.raises(RecordProblem, match=reason):
            resolve_image_path("/data", path)


def test_resize_to_tensor():
    tensor = ResizeToTensor(8)(Image.new("RGB", (30, 10), (255, 0, 0)))
    assert tensor.shape == (3, 8, 8) and float(tensor[0].min()) == 1.0 and float(tensor[1].max()) == 0.0
