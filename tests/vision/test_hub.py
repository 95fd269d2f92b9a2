import json
import os
import pickle
from dataclasses import dataclass, field

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
