"""vision.hub.resolve_model: the one rule every app uses for --model / --tokenizer / --vae."""
import pytest
import torch

from tests.helpers.tiny_generator import TinyConfig, TinyGenerator
from vision.hub import HubError, load_official, register_official, resolve_model, save_pretrained


def test_shipped_name_folder_and_kind(tmp_path):
    tok = resolve_model("vq-mnist", kind="tokenizer")
    assert tok.spec.vocab_size == 256
    with pytest.raises(HubError, match="is a tokenizer, not a generator"):
        resolve_model("vq-mnist", kind="generator")
    model = TinyGenerator(TinyConfig())
    save_pretrained(model, tmp_path / "m")
    again = resolve_model(tmp_path / "m", kind="generator")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_official_files_go_to_the_family_that_recognises_them(tmp_path):
    state = {"tiny.marker": torch.zeros(3)}
    register_official("tiny-test-family", kind="generator", recognise=lambda obj: "tiny.marker" in obj,
                      load=lambda obj, path: TinyGenerator(TinyConfig(num_classes=int(obj["tiny.marker"].numel()))))
    torch.save(state, tmp_path / "ours.pth")
    assert resolve_model(tmp_path / "ours.pth", kind="generator").num_classes == 3
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(HubError, match=r"not a generator checkpoint of any family .*tiny-test-family"):
        load_official(tmp_path / "foreign.pth", kind="generator")


def test_missing_and_unknown(tmp_path):
    with pytest.raises(HubError, match="does not exist"):
        resolve_model(tmp_path / "nope.pth")
    with pytest.raises(HubError, match="no model named 'nope'.*shipped models"):
        resolve_model("nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(HubError, match="expected a save_pretrained folder"):
        resolve_model(tmp_path / "notes.txt")
