import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vision.data import ImageFolder, center_crop_resize, load_mnist5k, read_image, read_image_uint8, sample_photos
from vision.data.images import ImageReadError, read_image_with_alpha, save_image
from vision.data.mnist import mnist5k_split


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[0, 0] = 255  # top-left red marker
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "o.png", exif=exif.tobytes())
    x = read_image(tmp_path / "o.png")
    assert x.shape == (3, 6, 4)
    assert x[0, 0, -1] == 1.0 and x[0, 0, 0] == -1.0  # marker moved to the top-right corner


def test_modes_rgba_palette_grey_16bit(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img, alpha = read_image_with_alpha(tmp_path / "a.png")
    assert torch.allclose(alpha[0], torch.from_numpy(rgba[..., 3]).float() / 127.5 - 1)
    assert np.array_equal(read_image_uint8(tmp_path / "a.png"), rgba[..., :3])
    Image.fromarray(rgba[..., 0], "L").save(tmp_path / "g.png")
    g = read_image_uint8(tmp_path / "g.png")
    assert g.shape == (5, 7, 3) and np.array_equal(g[..., 1], rgba[..., 0])
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (3, 5, 7)
    deep = (np.arange(35, dtype=np.uint16).reshape(5, 7) * 1800)
    Image.fromarray(deep).save(tmp_path / "d.png")
    d = read_image(tmp_path / "d.png")
    assert torch.allclose(d[0], torch.from_numpy(deep.astype(np.float32) / 65535 * 2 - 1), atol=1e-6)


def test_save_read_round_trip(tmp_path):
    x = torch.rand(3, 9, 11) * 2 - 1
    for ext in ("png", "webp", "tiff"):
        save_image(x, tmp_path / f"x.{ext}")
        assert torch.allclose(read_image(tmp_path / f"x.{ext}"), x, atol=1 / 255 + 1e-6)


def test_unreadable_image_raises(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg")


def test_image_folder_layouts_and_corrupt_files(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "tree" / cls / f"{i}.png")
    (tmp_path / "tree/dog/broken.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolder(tmp_path / "tree")
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert any("broken.jpg" in str(x.message) for x in w)
    assert [lab for _, lab in items] == [0, 0, 1, 1, 0]  # the broken dog (last) is replaced by the next readable, wrapping
    strict = ImageFolder(tmp_path / "tree", on_error="raise")
    with pytest.raises(ImageReadError):
        strict[4]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    assert ImageFolder(flat)[0][1] == 0
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing")


def test_center_crop_resize_matches_torchvision():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(3, 40, 57)
    ours = center_crop_resize(x, 24)
    ref = TF.center_crop(TF.resize(x, 24, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), 24)
    assert ours.shape == (3, 24, 24)
    assert torch.allclose(ours, ref.clamp(0, 1), atol=1e-5)


def test_sample_photos_and_mnist():
    photos = sample_photos()
    assert len(photos) >= 10 and all(p.is_file() for p in photos)
    assert read_image(photos[0]).shape[0] == 3
    x, y = load_mnist5k()
    assert x.shape == (5000, 32, 32) and x.dtype == torch.uint8
    assert x[:, :2].max() == 0 and x[:, :, -2:].max() == 0  # 2-pixel zero border from 28 -> 32
    (xt, yt), (xh, yh) = mnist5k_split()
    assert len(xt) == 4000 and torch.equal(torch.bincount(yh), torch.full((10,), 100))
