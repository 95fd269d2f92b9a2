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


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), atol=atol, rtol=0), k


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
def test_two_process_ddp_equals_one_process(tmp_path):
    # VQ with no GAN: no BatchNorm and no batch-level statistics in the loss, so the global batch decides
    args = ["--model", "vq-tiny-f4", *TINY, "--no-gan", "--steps", "6", "--checkpoint-every", "6"]
    train(tmp_path / "one", *args)
    train(tmp_path / "two", *args, launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node", "2", "-m"))
    # Losses agree to float rounding; Adam divides each gradient by its own running RMS, which turns the
    # ~1e-7 rounding differences of an all-reduced gradient into up to ~4e-6 on near-zero gradients.
    assert_same(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=2e-5)
    losses = [[json.loads(l)["gen_loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert np.allclose(*losses, rtol=1e-6, atol=0)


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
