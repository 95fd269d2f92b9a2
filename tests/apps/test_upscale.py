"""python -m apps.upscale: sizes, formats, modes, metadata, and every bad input -> one line, exit 2, no file."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from apps.upscale import main
from tests.conftest import run_env
from vision.cli import run
from vision.decoders.liif import LIIF, LIIFConfig
from vision.hub import save_pretrained


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LIIF(LIIFConfig(encoder_args=dict(n_resblocks=1, n_feats=8), hidden_list=[16]))
    path = tmp_path_factory.mktemp("model") / "liif"
    save_pretrained(model, path)
    return path


def upscale(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run(main, [str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def photo(path, size=(13, 7), mode="RGB", **save):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path, **save)
    return path


def test_scale_gives_round_h_s_and_default_name(tmp_path, capsys, model_dir):
    src = photo(tmp_path / "p.jpg", size=(13, 7))
    code, err = upscale(capsys, src, "--scale", 3.7, "--model", model_dir, "--quiet")
    assert code == 0, err
    out = Image.open(tmp_path / "p_x3.7.png")
    assert out.size == (round(13 * 3.7), round(7 * 3.7)) and out.mode == "RGB"


@pytest.mark.parametrize("scale", [1.0, 1.37, 12.0])
def test_odd_sizes_and_scales(tmp_path, capsys, model_dir, scale):
    src = photo(tmp_path / "odd.png", size=(5, 3))
    code, err = upscale(capsys, src, "--scale", scale, "--model", model_dir, "-o", tmp_path / "o.png", "--quiet")
    assert code == 0, err
    assert Image.open(tmp_path / "o.png").size == (round(5 * scale), round(3 * scale))


def test_size_webp_tiff_and_tile_invariance(tmp_path, capsys, model_dir):
    src = photo(tmp_path / "a.tiff", size=(20, 11))
    assert upscale(capsys, src, "--size", "37x19", "--model", model_dir, "-o", tmp_path / "a.webp", "--quiet")[0] == 0
    assert Image.open(tmp_path / "a.webp").size == (37, 19)
    upscale(capsys, src, "--size", "37x19", "--model", model_dir, "-o", tmp_path / "t1.png", "--tile", 4, "--quiet")
    upscale(capsys, src, "--size", "37x19", "--model", model_dir, "-o", tmp_path / "t2.png", "--tile", 64, "--quiet")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t1.png")), np.asarray(Image.open(tmp_path / "t2.png")))


def test_grey_rgba_exif_and_icc(tmp_path, capsys, model_dir):
    grey = photo(tmp_path / "g.png", mode="L")
    assert upscale(capsys, grey, "--scale", 2, "--model", model_dir, "--quiet")[0] == 0
    assert Image.open(tmp_path / "g_x2.png").mode == "L"
    rgba = photo(tmp_path / "r.png", mode="RGBA")
    assert upscale(capsys, rgba, "--scale", 2, "--model", model_dir, "--quiet")[0] == 0
    out = Image.open(tmp_path / "r_x2.png")
    assert out.mode == "RGBA" and out.size == (26, 14)
    # EXIF orientation 6 (rotate 90 degrees) and an sRGB ICC profile
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 13, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im.save(tmp_path / "e.jpg", exif=exif.tobytes(), icc_profile=icc)
    assert upscale(capsys, tmp_path / "e.jpg", "--scale", 2, "--model", model_dir, "--quiet")[0] == 0
    out = Image.open(tmp_path / "e_x2.png")
    assert out.size == (14, 26) and out.info.get("icc_profile") == icc


def test_folder_in_folder_out(tmp_path, capsys, model_dir):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.jpg"):
        photo(tmp_path / "in" / name)
    code, err = upscale(capsys, tmp_path / "in", "--scale", 2, "-o", tmp_path / "out", "--model", model_dir, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x2.png", "b_x2.png"]


def test_existing_output_kept_unless_overwrite(tmp_path, capsys, model_dir):
    src = photo(tmp_path / "p.png")
    (tmp_path / "p_x2.png").write_bytes(b"keep me")
    code, err = upscale(capsys, src, "--scale", 2, "--model", model_dir)
    assert code == 2 and "--overwrite" in err and (tmp_path / "p_x2.png").read_bytes() == b"keep me"
    assert upscale(capsys, src, "--scale", 2, "--model", model_dir, "--overwrite", "--quiet")[0] == 0
    assert Image.open(tmp_path / "p_x2.png").size == (26, 14)


def test_official_checkpoint_file_works_directly(tmp_path, capsys, model_dir):
    from vision.hub import from_pretrained

    model = from_pretrained(model_dir)
    args = {"encoder_spec": {"name": "edsr-baseline", "args": {"n_resblocks": 1, "n_feats": 8, "no_upsampling": True}},
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [16]}}}
    torch.save({"model": {"name": "liif", "args": args, "sd": model.state_dict()}}, tmp_path / "liif.pth")
    src = photo(tmp_path / "p.png")
    upscale(capsys, src, "--scale", 2, "--model", model_dir, "-o", tmp_path / "ours.png", "--quiet")
    assert upscale(capsys, src, "--scale", 2, "--model", tmp_path / "liif.pth", "-o", tmp_path / "off.png",
                   "--quiet")[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ours.png")), np.asarray(Image.open(tmp_path / "off.png")))


@pytest.mark.parametrize("args, message", [
    (["--scale", "0"], "--scale must be"),
    (["--scale", "-2"], "--scale must be"),
    (["--scale", "nan"], "--scale must be"),
    (["--size", "10by3"], "--size must be"),
    (["--scale", "100000"], "over the limit"),
    (["--scale", "2", "--model", "no-such-model"], "no model named"),
])
def test_bad_arguments(tmp_path, capsys, model_dir, args, message):
    src = photo(tmp_path / "p.png")
    argv = [src, *args] if "--model" in args else [src, *args, "--model", model_dir]
    code, err = upscale(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_unreadable_inputs_one_line_exit_2_no_traceback(tmp_path, model_dir):
    (tmp_path / "fake.png").write_text("this is not an image")
    (tmp_path / "notes.txt").write_text("hello")
    for src in (tmp_path / "fake.png", tmp_path / "notes.txt", tmp_path / "missing.png"):
        proc = subprocess.run([sys.executable, "-m", "apps.upscale", str(src), "--scale", "2", "--model", str(model_dir)],
                              env=run_env(), capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.png", "notes.txt"]
