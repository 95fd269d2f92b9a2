"""Training toolkit: exact resume after SIGKILL, torn checkpoint writes, 2-process DDP == 1 process, NaN stop."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_env
from vision.train.checkpoint import load_checkpoint

SCRIPT = str(Path(__file__).resolve().parent.parent / "helpers" / "tiny_train.py")


def train(out, *args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], env=run_env(),
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def final(out):
    return torch.load(Path(out) / "final.pt", weights_only=True)


def assert_same_weights(a, b, atol=0.0):
    for part in ("model", "ema"):
        for k in a[part]:
            if atol == 0.0:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                assert torch.allclose(a[part][k], b[part][k], atol=atol, rtol=0), f"{part}.{k} differs"


@pytest.mark.xdist_group("train")
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    train(tmp_path / "full", "--noise", "--steps", "12", "--every", "3")
    killed = train(tmp_path / "cut", "--noise", "--steps", "12", "--every", "3", "--kill-at-step", "7", check=False)
    assert killed.returncode == -9
    assert load_checkpoint(tmp_path / "cut/checkpoints/latest.pt")["step"] == 6
    train(tmp_path / "cut", "--noise", "--steps", "12", "--every", "3", "--resume")
    assert_same_weights(final(tmp_path / "full"), final(tmp_path / "cut"))
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), "metrics lines after the checkpoint must be dropped on resume"
    full_lines = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    cut_lines = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in ls]  # noqa: E731
    assert strip(full_lines) == strip(cut_lines)
    assert (tmp_path / "cut/curves.png").stat().st_size > 1000


@pytest.mark.xdist_group("train")
def test_kill_during_checkpoint_write_keeps_latest_readable(tmp_path):
    # checkpoint every 2 steps: the 3rd write (step 6) is torn by SIGKILL halfway.
    proc = train(tmp_path / "run", "--steps", "12", "--every", "2", "--kill-in-save", "3", check=False)
    assert proc.returncode == -9
    state = load_checkpoint(tmp_path / "run/checkpoints/latest.pt")
    assert state["step"] == 4
    train(tmp_path / "run", "--steps", "12", "--every", "2", "--resume")
    train(tmp_path / "ref", "--steps", "12", "--every", "2")
    assert_same_weights(final(tmp_path / "ref"), final(tmp_path / "run"))


@pytest.mark.xdist_group("train")
def test_two_process_gloo_equals_one_process(tmp_path):
    train(tmp_path / "one", "--steps", "8", "--batch", "8", "--every", "4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
           "--out", str(tmp_path / "two"), "--steps", "8", "--batch", "8", "--every", "4"]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(final(tmp_path / "one"), final(tmp_path / "two"), atol=1e-6)
    # accumulation is the same computation again
    train(tmp_path / "acc", "--steps", "8", "--batch", "8", "--accum", "4", "--every", "4")
    assert_same_weights(final(tmp_path / "one"), final(tmp_path / "acc"), atol=1e-6)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    proc = train(tmp_path / "run", "--steps", "12", "--every", "2", "--nan-at-step", "5", check=False)
    assert proc.returncode != 0
    assert "non-finite at step 6" in proc.stderr
    assert load_checkpoint(tmp_path / "run/checkpoints/latest.pt")["step"] == 4


def test_sampler_shards_cover_the_same_global_batches():
    from vision.train.sampler import ResumableSampler

    one = [i for i, _ in ResumableSampler(50, 8, seed=3)]
    two = [[i for i, _ in ResumableSampler(50, 8, rank=r, world_size=2, seed=3)] for r in range(2)]
    assert len(one) == 48 and sorted(one) == sorted(two[0] + two[1])
    for k in range(6):
        assert set(one[8 * k: 8 * k + 8]) == set(two[0][4 * k: 4 * k + 4] + two[1][4 * k: 4 * k + 4])
    s = ResumableSampler(50, 8, seed=3)
    s.set_position(0, 2)
    assert [i for i, _ in s] == one[16:]


def test_ema_update_formula():
    from torch import nn

    from vision.train.ema import EMA

    m = nn.Linear(2, 1)
    ema = EMA(m, 0.9)
    before = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * (before + 1.0))
