"""A released WeTok.ckpt wherever an app takes a tokenizer: apps.evaluate rfid (vision.metrics' loader),
apps.extract_tokens --tokenizer, apps.train_tokenizer --init (fine-tuning, and --stage 2 from it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers.wetok import WeTok
from vision.cli import UserError

KEYS = json.loads((Path(__file__).resolve().parent.parent / "data" / "wetok_official_keys.json").read_text())


@pytest.fixture(scope="module")
def wetok_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    """WeTok.ckpt as the official Lightning training writes it (pinned key names and shapes; random weights)."""
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(3) if k.endswith("num_batches_tracked") or k == "model_ema.num_updates"
                 else torch.randn(shape, generator=g)) for k, shape in KEYS["checkpoint_tiny"]["keys"].items()}
    path = tmp_path_factory.mktemp("wetok") / "WeTok.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, path)
    return path, state


def _same_as_ema(model, state) -> bool:
    return all(torch.equal(v, state["model_ema." + k.replace(".", "")]) for k, v in model.state_dict().items()
               if "model_ema." + k.replace(".", "") in state)


def test_rfid_loader_takes_the_file(wetok_ckpt):
    from vision.metrics.reconstruction import load_tokenizer

    path, state = wetok_ckpt
    tok = load_tokenizer(path)
    assert isinstance(tok, WeTok) and _same_as_ema(tok, state)


def test_extract_tokens_from_the_file(wetok_ckpt, tmp_path):
    from apps import extract_tokens
    from vision.data.token_cache import TokenCache

    path, _ = wetok_ckpt
    data = tmp_path / "images" / "cls"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    assert extract_tokens.main(["--tokenizer", str(path), "--data", str(tmp_path / "images"), "--image-size", "16",
                                "--out", str(tmp_path / "tokens"), "--quiet"]) == 0
    cache = TokenCache(tmp_path / "tokens")
    assert cache.tokenizer == str(path) and len(cache) == 3 and cache.spec.groups == 2


def _args(*argv):
    from apps import train_tokenizer

    return train_tokenizer.parse(["--data", "mnist5k", "--out", "unused", *argv])


def test_train_tokenizer_init_from_the_file(wetok_ckpt):
    from apps.train_tokenizer import build_model

    path, state = wetok_ckpt
    tuned = build_model(_args("--model", "wetok-tiny-f4", "--init", str(path)))  # stage 1: fine-tune it
    assert isinstance(tuned, WeTok) and not tuned.config.generative and _same_as_ema(tuned, state)
    gd = build_model(_args("--model", "wetok-tiny-f4", "--stage", "2", "--init", str(path)))  # the generative decoder
    assert gd.config.generative and torch.equal(gd.encoder.conv_in.weight, state["model_ema.encoderconv_inweight"])
    z = gd.config.z_channels
    assert torch.equal(gd.decoder.conv_in.weight[:, :z], state["model_ema.decoderconv_inweight"])
    assert not gd.decoder.conv_in.weight[:, z:].any()
    with pytest.raises(UserError, match="is a WeTok, --model vq-tiny-f4 a VQTokenizer"):
        build_model(_args("--model", "vq-tiny-f4", "--init", str(path)))
