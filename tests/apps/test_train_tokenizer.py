"""python -m apps.train_tokenizer: exact resume (GAN + LeCAM state), 2-process DDP == 1 process, stage 2, bad data."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import run_env

TINY = ["--data", "mnist5k", "--perceptual-weight", "0", "--lr", "1e-3", "--batch-size", "8", "--log-every", "2",
        "--quiet"]


def train(out, *extra, launcher=(sys.executable, "-m")):
    proc = subprocess.run([*launcher, "apps.train_tokenizer", "--out", str(out), *extra], env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.xdist_group("train")
def test_gan_training_resumes_exactly_after_sigkill(tmp_path):
    args = ["--model", "wetok-tiny-f4", *TINY, "--steps", "12", "--checkpoint-every", "4"]
    train(tmp_path / "full", *args)
    assert (tmp_path / "full/recon_0000012.png").is_file()
    cut = subprocess.Popen([sys.executable, "-m", "apps.train_tokenizer", "--out", str(tmp_path / "cut"), *args],
                           env=run_env(), stderr=subprocess.DEVNULL)
    while not (tmp_path / "cut/checkpoints/latest.pt").exists() and cut.poll() is None:
        time.sleep(0.01)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert not (tmp_path / "cut/model").exists()
    train(tmp_path / "cut", *args, "--resume")
    assert_same(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    state = torch.load(tmp_path / "cut/checkpoints/latest.pt", weights_only=True)
    assert state["extra"]["lecam"]["logits_real_ema"] != 0  # LeCAM's EMA travels with the checkpoint


@pytest.mark.xdist_group("train")
@pytest.mark.parametrize("setup", [
    ["--model", "vq-tiny-f4", "--no-gan", "--steps", "6"],
    # The PatchGAN's BatchNorm, GQ's codebook entropy, LeCAM's EMAs and the adaptive GAN weight are
    # batch-level statistics, each taken over the global batch, so two processes train one model.
    # Two steps only: sign quantization is discontinuous, so once rounding has moved a weight, latents
    # near zero flip bits and the runs part ways (as two single-process runs on different BLAS would).
    ["--model", "wetok-tiny-f4", "--gan-weight", "adaptive", "--steps", "2", "--log-every", "1"],
], ids=["vq", "wetok-gan"])
def test_two_process_ddp_equals_one_process(tmp_path, setup):
    args = [*TINY, *setup, "--checkpoint-every", "6"]
    train(tmp_path / "one", *args)
    train(tmp_path / "two", *args, launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", "2", "-m"))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    diff = torch.cat([(one[k].double() - two[k].double()).abs().flatten() for k in one])
    # Adam divides each gradient by its own RMS, so a gradient that is pure rounding noise (~1e-9, next to
    # eps = 1e-8) moves its weight by a random fraction of the learning rate (1e-3). Those are a handful
    # of the ~1e5 weights; every other one agrees to 1 % of a step. (Per-process BatchNorm: ~90 % differ.)
    assert (diff > 1e-5).double().mean() < 1e-4, f"{int((diff > 1e-5).sum())} weights differ"
    lines = [[json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("one", "two")]
    for key in [k for k in lines[0][0] if k.endswith("loss")]:
        assert np.allclose(*[[line[key] for line in run] for run in lines], rtol=1e-5, atol=0), key


@pytest.mark.xdist_group("train")
def test_stage_two_generative_decoder_from_stage_one(tmp_path):
    train(tmp_path / "s1", "--model", "wetok-tiny-f4", *TINY, "--steps", "2", "--checkpoint-every", "2")
    train(tmp_path / "s2", "--model", "wetok-tiny-f4", *TINY, "--steps", "2", "--checkpoint-every", "2",
          "--stage", "2", "--init", str(tmp_path / "s1/model"))
    s1, s2 = weights(tmp_path / "s1"), weights(tmp_path / "s2")
    assert s2["decoder.conv_in.weight"].shape[1] == 2 * s1["decoder.conv_in.weight"].shape[1]
    for k in s1:  # encoder and quantizer frozen in stage 2
        if k.startswith("encoder."):
            assert torch.equal(s1[k], s2[k]), k


def test_corrupt_images_are_skipped_and_missing_data_is_one_line(tmp_path):
    data = tmp_path / "data" / "class0"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "broken.jpg").write_bytes(b"not an image")
    proc = train(tmp_path / "run", "--model", "vq-tiny-f4", "--data", str(tmp_path / "data"), "--image-size", "32",
                 "--perceptual-weight", "0", "--no-gan", "--batch-size", "10", "--steps", "1", "--quiet")
    assert "broken.jpg" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "apps.train_tokenizer", "--model", "vq-tiny-f4", "--data",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "o")], env=run_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --data {tmp_path / 'nope'}: no such folder"
