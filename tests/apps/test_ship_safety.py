"""Every trainer's --ship: a shipped model is replaced only with --replace-shipped (refused when the command
line is parsed, before any work), and data folders are not overwritten without --overwrite."""
import importlib
import json

import pytest
import torch

from vision import cli, hub

TRAINERS = {  # the arguments each trainer needs besides --out and --ship
    "train_classifier": [],
    "train_generator": ["--model", "llamagen-gpt-mnist", "--tokens", "no-such-cache"],
    "train_ldm": ["--stage", "first"],
    "train_segmenter": ["--data", "no-such-folder", "--val", "no-such-folder"],
    "train_tokenizer": ["--model", "wetok-tiny-f4", "--data", "mnist5k"],
    "train_upscaler": [],
    "train_xdecoder": [],
}


def run_app(name, argv, capsys) -> tuple[int, str]:
    main = importlib.import_module(f"apps.{name}").main
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A weights folder whose index has `tok` and `gen`, an entry that names `tok` as its tokenizer."""
    folder = tmp_path / "weights"
    folder.mkdir()
    index = {"tok": {"file": "tok.safetensors", "kind": "tokenizer", "config": {}},
             "gen": {"file": "gen.safetensors", "kind": "generator", "config": {"tokenizer": "tok"}}}
    (folder / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(hub, "WEIGHTS_DIR", folder)
    return folder


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_shipping_over_a_shipped_model_is_refused_before_any_work(name, tmp_path, capsys, weights, monkeypatch):
    def work(*args):
        raise AssertionError("the trainer started working: --ship was not checked while parsing")

    monkeypatch.setattr(importlib.import_module(f"apps.{name}"), "resolve_device", work)
    index = (weights / "index.json").read_text()
    out = tmp_path / "run"
    for ship, words in (("tok", ["'tok' is already shipped", "--replace-shipped"]), ("../x", ["plain name"]),
                        (".x", ["plain name"])):
        code, err = run_app(name, [*TRAINERS[name], "--out", str(out), "--ship", ship], capsys)
        assert code == 2 and err.startswith("error: --ship ") and err.count("\n") == 1, err
        assert all(w in err for w in words), err
    code, err = run_app(name, [*TRAINERS[name], "--out", str(out), "--replace-shipped"], capsys)
    assert code == 2 and err == "error: --replace-shipped only applies with --ship NAME\n"
    assert not out.exists() and (weights / "index.json").read_text() == index
    parse = importlib.import_module(f"apps.{name}").parse
    with pytest.warns(UserWarning, match="tok is the tokenizer of gen; they will decode with the new weights"):
        args = parse([*TRAINERS[name], "--out", str(out), "--ship", "tok", "--replace-shipped"])
    assert args.replace_shipped and args.ship == "tok"


def test_train_classifier_replaces_a_shipped_model_only_when_asked(tmp_path, capsys, monkeypatch):
    """The audit's repro: --ship NAME over a shipped NAME exited 0 and replaced it."""
    from vision.metrics.classifier import MNISTClassifier, MNISTClassifierConfig

    weights = tmp_path / "weights"
    monkeypatch.setattr(hub, "WEIGHTS_DIR", weights)
    torch.manual_seed(0)
    old = MNISTClassifier(MNISTClassifierConfig())
    hub.register_shipped("clf", old, kind="classifier", trained_with="-", data="-", train_time="-", metrics={})
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    argv = ["--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--quiet", "--ship", "clf"]
    code, err = run_app("train_classifier", argv, capsys)
    assert code == 2 and "already shipped" in err and not (tmp_path / "run").exists()
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before
    code, err = run_app("train_classifier", [*argv, "--replace-shipped"], capsys)
    assert code == 0, err
    entry = hub.read_index()["clf"]
    assert entry["file"] == f"clf-{entry['sha256'][:8]}.safetensors"
    assert sorted(p.name for p in weights.iterdir()) == [entry["file"], "index.json"]  # the old file is gone
    new = hub.from_pretrained("clf").state_dict()
    assert any(not torch.equal(v, new[k]) for k, v in old.state_dict().items())


def test_make_phantoms_keeps_an_existing_dataset_json(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text('{"name": "mine"}')
    argv = ["--make-phantoms", str(data), "1", "--phantom-shape", "32,32,16", "--organs", "1", "--lesions", "0"]
    code, err = run_app("train_segmenter", argv, capsys)
    assert code == 2 and err == f"error: {data / 'dataset.json'} exists; pass --overwrite to replace it\n"
    assert sorted(p.name for p in data.iterdir()) == ["dataset.json"]
    assert (data / "dataset.json").read_text() == '{"name": "mine"}'
    assert run_app("train_segmenter", [*argv, "--overwrite"], capsys)[0] == 0
    assert json.loads((data / "dataset.json").read_text())["name"] == "Phantom"
