import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from vision import hub


@dataclass
class InnerConfig:
    depth: int = 2
    ratios: tuple[float, ...] = (1.0, 2.0)


@dataclass
class ToyConfig:
    width: int = 4
    scales: tuple[int, int] = (3, 5)
    hidden: list[int] = field(default_factory=lambda: [8, 8])
    inner: InnerConfig = field(default_factory=InnerConfig)
    name: str | None = None
    lr: float = 1.0


@hub.register_model("test-toy")
class Toy(nn.Module):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.width, config.hidden[0])
        self.register_buffer("running", torch.arange(3.0))


def test_config_round_trip_is_exact():
    cfg = ToyConfig(width=6, scales=(1, 2), hidden=[3], inner=InnerConfig(3, (0.5,)), name="x", lr=2)
    back = hub.config_from_dict(ToyConfig, json.loads(json.dumps(hub.config_to_dict(cfg))))
    assert back == cfg and isinstance(back.scales, tuple) and isinstance(back.inner, InnerConfig)
    assert isinstance(back.lr, float)


def test_save_load_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    m = Toy(ToyConfig(width=5, hidden=[7]))
    hub.save_pretrained(m, tmp_path / "toy")
    assert sorted(os.listdir(tmp_path / "toy")) == ["config.json", "model.safetensors"]
    back = hub.from_pretrained(tmp_path / "toy")
    assert type(back) is Toy and back.config == m.config
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


def test_shipped_name_resolution_and_tamper_refusal(tmp_path):
    m = Toy(ToyConfig())
    hub.register_shipped("toy-small", m, kind="decoder", trained_with="none", data="none", train_time="0s",
                         metrics={"x": 1.0}, weights_dir=tmp_path)
    back = hub._from_index("toy-small", "cpu", weights_dir=tmp_path)
    assert torch.equal(back.lin.weight, m.lin.weight)
    with pytest.raises(hub.HubError, match="no model named"):
        hub._from_index("nope", "cpu", weights_dir=tmp_path)
    blob = bytearray((tmp_path / "toy-small.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "toy-small.safetensors").write_bytes(bytes(blob))
    with pytest.raises(hub.HubError, match="sha256"):
        hub._from_index("toy-small", "cpu", weights_dir=tmp_path)


class _RunsCode:
    """Unpickling this would call os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        return (os.system, ("touch " + str(_RunsCode.marker),))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(2)}, "payload": _RunsCode()}, f)
    torch.save({"sd": {"w": torch.zeros(2)}, "payload": _RunsCode()}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(hub.HubError, match="refusing to unpickle"):
            hub.load_official_state_dict(p)
    assert not _RunsCode.marker.exists()


def test_plain_official_checkpoint_loads(tmp_path):
    obj = {"model": {"name": "x", "args": {"a": [1, 2]}, "sd": {"w": torch.ones(2)}}, "epoch": 3}
    torch.save(obj, tmp_path / "ok.pth")
    back = hub.load_official_state_dict(tmp_path / "ok.pth")
    assert back["epoch"] == 3 and torch.equal(back["model"]["sd"]["w"], torch.ones(2))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(hub.HubError):
        hub.load_official_state_dict(tmp_path / "junk.pth")


def test_missing_keys_are_refused(tmp_path):
    m = Toy(ToyConfig())
    hub.save_pretrained(m, tmp_path / "toy")
    from safetensors.torch import save_file

    save_file({"lin.weight": m.lin.weight.detach().contiguous()}, str(tmp_path / "toy/model.safetensors"))
    with pytest.raises(hub.HubError, match="missing keys"):
        hub.from_pretrained(tmp_path / "toy")


# ---------------------------------------------------------------- shipping: never by accident, crash-safe


@dataclass
class ToyGenConfig:
    tokenizer: str = "toy-tok"


@hub.register_model("test-toy-gen")
class ToyGen(nn.Module):
    config_class = ToyGenConfig

    def __init__(self, config: ToyGenConfig):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(2, 2)


def ship(name, model, weights_dir, **kw):
    return hub.register_shipped(name, model, kind="tokenizer", trained_with="t", data="d", train_time="0s",
                                metrics={}, weights_dir=weights_dir, **kw)


def test_shipping_an_existing_name_needs_replace_and_keeps_files_consistent(tmp_path):
    torch.manual_seed(0)
    old, new = Toy(ToyConfig()), Toy(ToyConfig())
    ship("toy-tok", old, tmp_path)
    ship("gen", ToyGen(ToyGenConfig("toy-tok")), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(hub.HubError, match=r"'toy-tok' is already shipped .*--replace-shipped"):
        ship("toy-tok", new, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.warns(UserWarning, match="the tokenizer of gen"):
        entry = ship("toy-tok", new, tmp_path, replace=True)
    # the new weights have a file of their own (loading follows the entry's "file"); the old file is gone
    assert entry["file"] == f"toy-tok-{entry['sha256'][:8]}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.safetensors", "index.json", entry["file"]]
    assert torch.equal(hub._from_index("toy-tok", "cpu", weights_dir=tmp_path).lin.weight, new.lin.weight)
    # replaced again: back to the plain name, which no entry uses any more
    with pytest.warns(UserWarning, match="the tokenizer of gen"):
        assert ship("toy-tok", old, tmp_path, replace=True)["file"] == "toy-tok.safetensors"
    assert torch.equal(hub._from_index("toy-tok", "cpu", weights_dir=tmp_path).lin.weight, old.lin.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.safetensors", "index.json", "toy-tok.safetensors"]


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "a\\b"])
def test_ship_name_must_be_a_plain_name(tmp_path, name):
    with pytest.raises(hub.HubError, match="plain name"):
        ship(name, Toy(ToyConfig()), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_kill_before_the_index_is_written_keeps_the_old_model_loadable(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old = Toy(ToyConfig())
    ship("toy", old, tmp_path)
    real = hub.atomic_path

    def killed_at_index(path, **kw):
        if Path(path).name == "index.json":
            raise KeyboardInterrupt  # the weights file is written; index.json is not
        return real(path, **kw)

    monkeypatch.setattr(hub, "atomic_path", killed_at_index)
    with pytest.raises(KeyboardInterrupt):
        ship("toy", Toy(ToyConfig()), tmp_path, replace=True)
    monkeypatch.undo()
    back = hub._from_index("toy", "cpu", weights_dir=tmp_path)  # the sha256 still matches its file
    assert torch.equal(back.lin.weight, old.lin.weight)


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "truncated"])
@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_a_damaged_saved_model_is_one_hub_error_naming_the_file(tmp_path, file, how):
    hub.save_pretrained(Toy(ToyConfig()), tmp_path / "toy")
    _damage(tmp_path / "toy" / file, how)
    with pytest.raises(hub.HubError) as e:
        hub.from_pretrained(tmp_path / "toy")
    message = str(e.value)
    assert str(tmp_path / "toy" / file) in message and "\n" not in message
    assert ("is empty" if how == "empty" else "truncated or damaged") in message


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_index_is_one_hub_error_naming_it(tmp_path, how):
    ship("toy", Toy(ToyConfig()), tmp_path)
    _damage(tmp_path / "index.json", how)
    for call in (lambda: hub.read_index(tmp_path), lambda: hub._from_index("toy", "cpu", weights_dir=tmp_path)):
        with pytest.raises(hub.HubError, match=f"{tmp_path / 'index.json'}.* (is empty|truncated or damaged)"):
            call()
