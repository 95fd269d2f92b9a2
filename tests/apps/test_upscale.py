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


def test_several_inputs_give_the_files_of_one_at_a_time_runs_with_one_model_load(tmp_path, capsys, model_dir,
                                                                                   monkeypatch):
    import apps.upscale as app

    (tmp_path / "in").mkdir()
    photo(tmp_path / "a.png", size=(13, 7))
    photo(tmp_path / "b.jpg", size=(9, 11))
    photo(tmp_path / "in" / "c.png", size=(6, 5), mode="RGBA")
    photo(tmp_path / "in" / "d.tiff", size=(8, 8), mode="L")
    inputs = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "in"]
    (tmp_path / "single").mkdir()
    for src in [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "in" / "c.png", tmp_path / "in" / "d.tiff"]:
        out = tmp_path / "single" / f"{src.stem}_x2.7.png"
        assert upscale(capsys, src, "--scale", 2.7, "--model", model_dir, "-o", out, "--quiet")[0] == 0

    loads = []
    real_load = app.load_upscaler
    monkeypatch.setattr(app, "load_upscaler", lambda *a: loads.append(a) or real_load(*a))
    code, err = upscale(capsys, *inputs, "--scale", 2.7, "--model", model_dir, "-o", tmp_path / "multi", "--tile", 3)
    assert code == 0, err
    assert len(loads) == 1
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "multi").iterdir()) == [
        "a_x2.7.png", "b_x2.7.png", "c_x2.7.png", "d_x2.7.png"]
    for name in names:
        one, many = Image.open(tmp_path / "single" / name), Image.open(tmp_path / "multi" / name)
        assert one.mode == many.mode and np.array_equal(np.asarray(one), np.asarray(many))


def test_folder_outputs_never_land_among_its_inputs(tmp_path, capsys, model_dir):
    (tmp_path / "photos").mkdir()
    for name in ("a.png", "b.jpg"):
        photo(tmp_path / "photos" / name)
    before = sorted(p.name for p in (tmp_path / "photos").iterdir())
    # default: a sibling folder named after the scale
    assert upscale(capsys, tmp_path / "photos", "--scale", 2, "--model", model_dir, "--quiet")[0] == 0
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "photos_x2").iterdir()) == ["a_x2.png", "b_x2.png"]
    # a second run reads the same two inputs (and refuses to clobber without --overwrite)
    code, err = upscale(capsys, tmp_path / "photos", "--scale", 2, "--model", model_dir, "--quiet")
    assert code == 2 and "--overwrite" in err
    # outputs that would land in an input folder are refused: -o that folder, or a file beside it
    for argv in ([tmp_path / "photos", "-o", tmp_path / "photos"],
                 [tmp_path / "photos", tmp_path / "photos" / "a.png"]):
        code, err = upscale(capsys, *argv, "--scale", 3, "--model", model_dir, "--quiet")
        assert code == 2 and "input folder" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "photos_x2"]


@pytest.mark.parametrize("case", ["several-to-image-name", "folder-to-image-name", "several-to-a-file",
                                  "same-output-twice"])
def test_several_inputs_need_an_output_folder(tmp_path, capsys, model_dir, case):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        photo(tmp_path / folder / "p.png")
    (tmp_path / "notes.txt").write_text("a file")
    argv, message = {
        "several-to-image-name": ([tmp_path / "x" / "p.png", tmp_path / "y" / "p.png", "-o", tmp_path / "o.png"],
                                  "looks like an image file"),
        "folder-to-image-name": ([tmp_path / "x", "-o", tmp_path / "big.webp"], "looks like an image file"),
        "several-to-a-file": ([tmp_path / "x" / "p.png", tmp_path / "y", "-o", tmp_path / "notes.txt"], "is a file"),
        "same-output-twice": ([tmp_path / "x" / "p.png", tmp_path / "y" / "p.png", "-o", tmp_path / "out"],
                              "would both be written"),
    }[case]
    code, err = upscale(capsys, *argv, "--scale", 2, "--model", model_dir)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "p.png", "p.png", "x", "y"]


def test_half_runs_where_the_cpu_has_native_bfloat16_and_refuses_elsewhere(tmp_path, capsys, model_dir, monkeypatch):
    import apps.upscale as app

    src = photo(tmp_path / "p.png", size=(16, 12))
    monkeypatch.setattr(app, "cpu_has_native_bf16", lambda: False)
    code, err = upscale(capsys, src, "--scale", 3, "--model", model_dir, "--half", "--device", "cpu")
    assert code == 2 and "--half" in err and "bfloat16" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]

    monkeypatch.setattr(app, "cpu_has_native_bf16", lambda: True)
    for name, extra in (("full.png", []), ("half.png", ["--half"])):
        code, err = upscale(capsys, src, "--scale", 3, "--model", model_dir, "-o", tmp_path / name, "--quiet", *extra)
        assert code == 0, err
    full = np.asarray(Image.open(tmp_path / "full.png")).astype(int)
    half = np.asarray(Image.open(tmp_path / "half.png")).astype(int)
    assert np.abs(full - half).max() <= 1


def test_cuda_tiles_are_sized_from_free_gpu_memory(model_dir, monkeypatch):
    """No GPU needed: torch.cuda.mem_get_info is replaced by fixed numbers."""
    from apps.upscale import Upscaler
    from vision.hub import from_pretrained

    model = from_pretrained(model_dir)
    cuda = torch.device("cuda")
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (3 * 2**20, 8 * 2**20))
    tile, chunk = Upscaler(model, cuda, None, None, None).tile_and_chunk((700, 900), (1400, 1800))
    assert (tile, chunk) == model.render_plan(3 * 2**20, (700, 900), (1400, 1800)) and asked == [cuda]
    assert 16 <= tile < 900
    assert Upscaler(model, cuda, None, 64, None).tile_and_chunk((700, 900), (1400, 1800)) == (64, chunk)
    on_cpu = Upscaler(model, torch.device("cpu"), None, None, None)
    assert on_cpu.tile_and_chunk((700, 900), (1400, 1800)) == (256, None)
