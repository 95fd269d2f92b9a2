"""The MNIST classifier: input handling, save/load, the shipped weights' claim, and its training app."""
import json

import pytest
import torch

from vision import hub
from vision.data.mnist import load_mnist5k, mnist5k_split
from vision.metrics.classifier import MNISTClassifier, MNISTClassifierConfig

SHIPPED = "mnist-classifier" in hub.read_index()


def _model(**kw) -> MNISTClassifier:
    torch.manual_seed(0)
    return MNISTClassifier(MNISTClassifierConfig(**kw)).eval()


def test_inputs_uint8_float_rgb_and_28px_agree():
    model = _model()
    digits32, _ = load_mnist5k()
    digits28, _ = load_mnist5k(pad_to=28)
    x = digits32[:6, None]
    with torch.no_grad():
        ref = model.features(x)
        assert ref.shape == (6, 128) and (ref >= 0).all()
        torch.testing.assert_close(model.features(x.float() / 127.5 - 1), ref, rtol=0, atol=0)
        torch.testing.assert_close(model.features(x.expand(-1, 3, -1, -1)), ref, rtol=0, atol=0)
        torch.testing.assert_close(model.features(digits28[:6, None]), ref, rtol=0, atol=0)  # padded like the data
        torch.testing.assert_close(model(x), model.head(ref))  # logits come from the features (eval mode)
    with pytest.raises(ValueError, match="digit images"):
        model(torch.zeros(2, 2, 32, 32))


def test_save_pretrained_round_trip(tmp_path):
    model = _model(widths=(8, 16), feature_dim=24)
    hub.save_pretrained(model, tmp_path / "clf")
    loaded = hub.from_pretrained(tmp_path / "clf")
    x = load_mnist5k()[0][:4, None]
    assert type(loaded) is MNISTClassifier and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and loaded.features(x).shape == (4, 24)


@pytest.mark.skipif(not SHIPPED, reason="mnist-classifier not shipped in weights/")
def test_shipped_classifier_reaches_its_recorded_heldout_accuracy():
    entry = hub.read_index()["mnist-classifier"]
    model = hub.from_pretrained("mnist-classifier")
    (_, _), (x, y) = mnist5k_split()
    with torch.no_grad():
        acc = (model(x[:, None]).argmax(1) == y).double().mean().item()
    assert acc >= 0.97
    assert entry["metrics"]["heldout_accuracy"] == round(acc, 4)
    assert entry["kind"] == "classifier" and entry["trained_with"].startswith("python -m apps.train_classifier ")


def test_train_classifier_learns_and_ships(tmp_path, monkeypatch, capsys):
    from apps.train_classifier import main

    monkeypatch.setattr(hub, "WEIGHTS_DIR", tmp_path / "weights")
    argv = ["--out", str(tmp_path / "run"), "--steps", "40", "--checkpoint-every", "20", "--quiet",
            "--ship", "clf-test"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    printed = float(out.split("held-out accuracy: ")[1].split()[0])
    assert printed > 0.8  # 40 steps of batch 64 from scratch; chance is 0.1
    entry = json.loads((tmp_path / "weights" / "index.json").read_text())["clf-test"]
    assert entry["trained_with"] == "python -m apps.train_classifier " + " ".join(argv)
    assert entry["metrics"]["heldout_accuracy"] == round(printed, 4)
    model = hub._from_index("clf-test", "cpu", tmp_path / "weights")
    (_, _), (x, y) = mnist5k_split()
    with torch.no_grad():
        assert (model(x[:, None]).argmax(1) == y).double().mean().item() == pytest.approx(printed, abs=1e-12)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "heldout_accuracy" in r] == [20, 40]
