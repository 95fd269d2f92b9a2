"""Arbitrary-scale latent diffusion through the programs: apps.train_ldm's three stages (frozen decoder during
alignment, exact resume), apps.upscale --method diffusion (exact sizes, seeds), apps.generate --size, bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from apps.generate import main as generate_main
from apps.train_ldm import main as train_main
from apps.upscale import main as upscale_main
from tests.conftest import run_env
from vision.cli import run
from vision.hub import from_pretrained
from vision.train.checkpoint import load_checkpoint

TINY = ["--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--quiet"]


def call(main, capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run(main, [str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def train(capsys, *argv):
    code, err = call(train_main, capsys, *argv, *TINY)
    assert code == 0, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny first stage on photo crops, an SR denoiser on it, and an unconditional MNIST denoiser."""
    root = tmp_path_factory.mktemp("ldm")
    for argv in (["--stage", "first", "--crop", "16", "--repeat", "2", "--steps", "3", "--out", root / "first"],
                 ["--stage", "denoiser", "--task", "sr", "--crop", "16", "--repeat", "2", "--steps", "3",
                  "--first-stage", root / "first" / "model", "--out", root / "sr"],
                 ["--stage", "denoiser", "--task", "generate", "--data", "mnist5k", "--crop", "32", "--steps", "2",
                  "--first-stage", root / "first" / "model", "--out", root / "gen"]):
        with pytest.raises(SystemExit) as e:
            run(train_main, [str(a) for a in argv] + TINY)
        assert e.value.code == 0
    return root


def test_alignment_trains_the_unet_only_and_resumes_exactly(runs, tmp_path, capsys):
    sr = from_pretrained(runs / "sr" / "model")
    args = ["--stage", "align", "--crop", "16", "--repeat", "2", "--init", runs / "sr" / "model", "--checkpoint-every", "2"]
    train(capsys, *args, "--steps", "4", "--out", tmp_path / "straight")
    aligned = from_pretrained(tmp_path / "straight" / "model")
    # the UNet moved (the first stage it decodes through is not part of the model; its staying frozen under the
    # optimizer is tested in tests/generators/test_latent_diffusion.py)
    assert any(not torch.equal(a, b) for a, b in zip(sr.state_dict().values(), aligned.state_dict().values()))
    assert not any(k.startswith("tokenizer") for k in aligned.state_dict())
    assert aligned.config.scale_factor == sr.config.scale_factor != 1.0  # 1/std, measured by the denoiser stage
    # 2 steps, stop, resume to 4: the same weights as 4 straight steps
    train(capsys, *args, "--steps", "2", "--out", tmp_path / "resumed")
    train(capsys, *args, "--steps", "4", "--out", tmp_path / "resumed", "--resume")
    resumed = from_pretrained(tmp_path / "resumed" / "model")
    for key, value in aligned.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "latest.pt")
    assert state["step"] == 4


def test_upscale_diffusion_sizes_and_seeds(runs, tmp_path, capsys):
    src = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(src)
    model = runs / "sr" / "model"
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        code, err = call(upscale_main, capsys, "--method", "diffusion", "--model", model, "--scale", "2.3",
                         "--steps", "3", "--seed", seed, src, "-o", tmp_path / f"{name}.png", "--quiet")
        assert code == 0, err
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert outs["a"].shape == (round(9 * 2.3), round(13 * 2.3), 3)
    assert np.array_equal(outs["a"], outs["b"])  # the same seed repeats
    assert not np.array_equal(outs["a"], outs["c"])  # another seed, another plausible output
    # an alpha channel is a mask: upscaled bicubically, the same whatever the seed
    rgba = np.random.default_rng(1).integers(0, 256, (9, 13, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(13) < 6, 0, 255)[None]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    alphas = []
    for seed in (1, 2):
        code, err = call(upscale_main, capsys, "--method", "diffusion", "--model", model, "--scale", "2", "--steps",
                         "2", "--seed", seed, tmp_path / "a.png", "-o", tmp_path / f"a{seed}.png", "--quiet")
        assert code == 0, err
        alphas.append(np.asarray(Image.open(tmp_path / f"a{seed}.png"))[..., 3])
    assert np.array_equal(*alphas) and alphas[0][:, :8].max() < 40 and alphas[0][:, -8:].min() > 215


@pytest.mark.parametrize("args, message", [
    (["--method", "diffusion", "--steps", "0"], "--steps"),
    (["--method", "diffusion", "--model", "GEN"], "is an unconditional latent diffusion model"),
    (["--method", "diffusion", "--model", "liif-lite"], "needs a diffusion super-resolution model"),
    (["--steps", "5"], "--steps is for --method diffusion"),
    (["--method", "diffusion", "--model", "SR", "--tile", "8"], "--tile is for --method liif"),
    (["--method", "diffusion", "--model", "SR", "--scheduler", "nope"], "unknown scheduler"),
])
def test_upscale_diffusion_bad_arguments(runs, tmp_path, capsys, args, message):
    src = tmp_path / "lr.png"
    Image.new("RGB", (8, 8)).save(src)
    args = [str(runs / "gen" / "model") if a == "GEN" else str(runs / "sr" / "model") if a == "SR" else a
            for a in args]
    code, err = call(upscale_main, capsys, *args, "--scale", "2", src, "-o", tmp_path / "o.png")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_generate_renders_any_size_through_the_implicit_decoder(runs, tmp_path, capsys):
    code, err = call(generate_main, capsys, "--model", runs / "gen" / "model", "--n", "2", "--size", "40x24",
                     "--steps", "2", "--out-dir", tmp_path / "samples", "--quiet")
    assert code == 0, err
    files = sorted((tmp_path / "samples").glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (40, 24)
    code, err = call(generate_main, capsys, "--model", runs / "gen" / "model", "--n", "2", "--size", "0x3",
                     "-o", tmp_path / "g.png")
    assert code == 2 and "--size" in err
    code, err = call(generate_main, capsys, "--model", "ar-mnist", "--labels", "1", "--per-label", "1",
                     "--size", "48x48", "-o", tmp_path / "g.png")
    assert code == 2 and "implicit decoder" in err and not (tmp_path / "g.png").exists()


def test_train_ldm_stage_arguments(tmp_path, capsys):
    for argv, message in ((["--stage", "denoiser"], "--first-stage"), (["--stage", "align"], "--init"),
                          (["--stage", "first", "--task", "sr"], "--task is for"),
                          (["--stage", "first", "--init", "x"], "--init is for")):
        code, err = call(train_main, capsys, *argv, "--out", tmp_path / "r")
        assert code == 2 and message in err, err


def test_two_processes_train_the_denoiser_one_process_trains(runs, tmp_path):
    """torchrun: per-sample seeds (t, noise) and the per-step target size make N processes train what one does."""
    argv = ["--stage", "denoiser", "--task", "sr", "--crop", "16", "--repeat", "2", "--steps", "3",
            "--first-stage", str(runs / "first" / "model"), "--out", str(tmp_path / "two"), *TINY]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "apps.train_ldm", *argv], env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = from_pretrained(runs / "sr" / "model").state_dict()
    two = from_pretrained(tmp_path / "two" / "model").state_dict()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4  # all-reduce rounding only
