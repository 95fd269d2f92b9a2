"""apps.generate with a LlamaGen GPT: SJD's options and the tokenizer check fail with one line (exit 2);
the SJD run writes the grid and reports its forward passes."""
import json

import pytest
import torch
from PIL import Image

from apps import generate
from generators.ar.model import LlamaGenConfig, LlamaGenGPT
from vision.cli import run
from vision.hub import save_pretrained


def small(tokenizer, vocab):
    torch.manual_seed(0)
    return LlamaGenGPT(LlamaGenConfig(tokenizer=tokenizer, num_classes=10, vocab_size=vocab, grid=8, downsample=4,
                                      dim=32, n_layer=1, n_head=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    save_pretrained(small("vq-mnist", 256), root / "mnist")  # speaks the shipped vq-mnist (vocabulary 256)
    save_pretrained(small(None, 64), root / "v64")
    return root


def exit_code(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        run(generate.main, [str(a) for a in argv])
    return e.value.code


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "sjd", "--window", "0"], "error: --window must be >= 1, got 0"),
    (["--sampler", "sjd", "--init", "diagonal"], "error: --init must be one of random, repeat_horizon"),
])
def test_bad_sjd_options_give_one_line(models, tmp_path, capsys, argv, message):
    out = tmp_path / "grid.png"
    assert exit_code("--model", models / "mnist", "--labels", "1", "-o", out, "--quiet", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()


def test_a_tokenizer_with_another_vocabulary_is_refused(models, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert exit_code("--model", models / "v64", "--tokenizer", "vq-mnist", "--labels", "1", "-o", out, "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary 64" in err[0] and "vocabulary 256" in err[0], err
    assert not out.exists()


def test_sjd_writes_the_grid_and_counts_passes(models, tmp_path):
    out, js = tmp_path / "grid.png", tmp_path / "stats.json"
    assert exit_code("--model", models / "mnist", "--sampler", "sjd", "--window", 4, "--init", "vertical",
                     "--labels", "0-3", "--per-label", 2, "-o", out, "--json", js, "--quiet") == 0
    stats = json.loads(js.read_text())
    assert stats["images"] == 8
    # at least one token per pass, at most the window: 64 tokens take 16..64 passes per batch
    assert 16 <= stats["nfe"] <= 64 and 1 <= stats["mean_accepted"] <= 4
    assert Image.open(out).size[0] >= 2 * 32  # two samples per label side by side, 32 px each
