"""apps.extract_tokens + apps.train_generator: caches equal across process counts, exact resume after SIGKILL,
2 processes (DDP and FSDP) == 1 process, bad input."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_env
from vision.data.token_cache import TokenCache

HELPER = ROOT / "tests" / "helpers" / "tiny_generator.py"


def app(*argv, torchrun=0, env=None, check=True):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)] if torchrun else [])
    proc = subprocess.run(cmd + [str(HELPER), *map(str, argv)], env={**run_env(), **(env or {})},
                          capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """vq-mnist tokens of 256 MNIST-5k digits' worth... the whole training split, encoded once."""
    out = tmp_path_factory.mktemp("cache") / "vq"
    app("extract_tokens", "--tokenizer", "vq-mnist", "--data", "mnist5k", "--out", out, "--quiet", "--shard-size", 1500)
    return out


def test_cache_layout_and_two_process_cache_equals_one(tokens, tmp_path):
    cache = TokenCache(tokens)
    assert len(cache) == 4000 and cache.num_classes == 10 and cache.tokenizer == "vq-mnist"
    assert cache.data["ids"].dtype == torch.int64 and tuple(cache.data["ids"].shape) == (4000, 8, 8)
    assert [s["count"] for s in cache.meta["shards"]] == [1500, 1500, 1000]
    two = tmp_path / "two"
    app("extract_tokens", "--tokenizer", "vq-mnist", "--data", "mnist5k", "--out", two, "--quiet",
        "--shard-size", 1500, torchrun=2)
    other = TokenCache(two)
    assert {s["file"][:2] for s in other.meta["shards"]} == {"r0", "r1"}
    for k in cache.data:
        assert torch.equal(cache.data[k], other.data[k]), k


def test_flip_twins(tmp_path):
    out = tmp_path / "flip"
    app("extract_tokens", "--tokenizer", "vq-mnist", "--data", "mnist5k", "--out", out, "--quiet", "--flip")
    cache = TokenCache(out)
    assert cache.meta["flip"] and "ids_flip" in cache.data
    picks = [torch.equal(cache.sample(0, torch.Generator().manual_seed(s))["ids"], cache.data["ids_flip"][0])
             for s in range(40)]
    assert 5 < sum(picks) < 35  # both variants are drawn


def train(tokens, out, *extra, torchrun=0, env=None, check=True):
    return app("train_generator", "--model", "tiny-test", "--tokens", tokens, "--out", out, "--steps", 12,
               "--batch-size", 32, "--checkpoint-every", 3, "--log-every", 1, "--lr", "3e-2", "--quiet", *extra,
               torchrun=torchrun, env=env, check=check)


def weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_loss_falls(tokens, tmp_path):
    train(tokens, tmp_path / "run", "--steps", 60)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # a uniform guess over 256 codes costs log(256) = 5.55 nats; the class-conditional table learns the
    # blank border codes within 60 steps
    assert rows[0]["gen_loss"] > 5.0 and rows[-1]["gen_loss"] < 4.2


def test_sigkill_then_resume_equals_uninterrupted(tokens, tmp_path):
    train(tokens, tmp_path / "whole", "--ema", "0.9")
    killed = train(tokens, tmp_path / "cut", "--ema", "0.9", env={"TINY_KILL_AT_CALL": "8"}, check=False)
    assert killed.returncode == -9
    train(tokens, tmp_path / "cut", "--ema", "0.9", "--resume")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() .count("\n") == 12
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in p.read_text().splitlines()]
    assert strip(tmp_path / "whole" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(tokens, tmp_path, mode):
    train(tokens, tmp_path / "one")
    train(tokens, tmp_path / "two", *(["--fsdp"] if mode == "fsdp" else []), torchrun=2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # two ranks add the gradients in another order: float32 rounding, measured up to 5e-6 relative
        torch.testing.assert_close(a[k], b[k], rtol=2e-5, atol=1e-6)


def test_fsdp_resume_after_sigkill(tokens, tmp_path):
    train(tokens, tmp_path / "whole", "--fsdp", torchrun=2)
    killed = train(tokens, tmp_path / "cut", "--fsdp", torchrun=2, env={"TINY_KILL_AT_CALL": "8"}, check=False)
    assert killed.returncode != 0
    assert list((tmp_path / "cut" / "checkpoints").glob("step_*.dcp"))
    train(tokens, tmp_path / "cut", "--fsdp", "--resume", torchrun=2)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input(tokens, tmp_path):
    cases = {
        ("--model", "nope"): "unknown generator preset",
        ("--tokens", tmp_path): "not a token cache",
        ("--lr", "-1"): "--lr: must be a number > 0",
    }
    for (flag, value), message in cases.items():
        args = ["--model", "tiny-test", "--tokens", tokens, "--out", tmp_path / "x", "--steps", 2, "--quiet"]
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        proc = app("train_generator", *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (flag, proc.stderr[-2000:])
        assert not (tmp_path / "x").exists()


def _hand_made_cache(folder):
    """A 6-item discrete cache in two shards, written with the cache's own writers."""
    from vision.data.token_cache import write_index, write_shard
    from vision.tokens import TokenSpec

    spec = TokenSpec(kind="discrete", grid=(2, 2), downsample=4, vocab_size=16)
    folder.mkdir()
    shards = [write_shard(folder, f"r0-{k:05d}", {"index": torch.arange(3 * k, 3 * k + 3),
                                                    "labels": torch.tensor([0, 1, 0]),
                                                    "ids": torch.randint(0, 16, (3, 2, 2))}, spec)
              for k in range(2)]
    write_index(folder, tokenizer="hand", spec=spec, fields=["ids"], shards=shards, flip=False)
    return folder


def test_truncated_shard_or_index_is_one_line_naming_it(tmp_path):
    cache = _hand_made_cache(tmp_path / "cache")
    assert len(TokenCache(cache)) == 6
    shard = cache / "r0-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"token cache shard {shard} is unreadable"):
        TokenCache(cache)
    proc = app("train_generator", "--model", "tiny-test", "--tokens", cache, "--out", tmp_path / "run", "--steps", 2,
               "--quiet", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: token cache shard {shard} "), \
        proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    index = cache / "index.json"
    index.write_text(index.read_text()[:40])
    with pytest.raises(ValueError, match=f"{index}: not a token cache index"):
        TokenCache(cache)


def test_model_continues_from_a_shipped_generator_but_a_preset_name_wins(tokens):
    """--model ar-mnist (shipped, not a preset) starts from its weights; a preset name builds a fresh model."""
    from apps.train_generator import build_model
    from generators.base import presets
    from vision.hub import from_pretrained

    cache = TokenCache(tokens)
    assert "ar-mnist" not in presets()
    model, shipped = build_model("ar-mnist", cache), from_pretrained("ar-mnist")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), shipped.state_dict().values()))
    fresh = build_model("llamagen-gpt-mnist", cache)
    assert not torch.equal(next(iter(fresh.state_dict().values())), next(iter(shipped.state_dict().values())))
