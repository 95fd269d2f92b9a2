"""neU-Net: N-D pixel shuffle, forward shapes, wavelet injection, official key layout and import."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segmentation.neunet import NeUNet, NeUNetConfig, _infer_config, from_official
from segmentation.pixel_shuffle import pixel_shuffle_nd, pixel_unshuffle_nd
from vision.hub import from_pretrained, save_pretrained

KEYS = json.loads((Path(__file__).resolve().parents[1] / "data" / "neunet_official_keys.json").read_text())


def _is_alias(k: str) -> bool:
    return ".all_modules." in k or k.startswith("decoder.encoder.")


def _pinned_config(name: str) -> NeUNetConfig:
    a = KEYS[name]["args"]
    return NeUNetConfig(features=tuple(a["features"]), strides=tuple(map(tuple, a["strides"])),
                        kernel_sizes=tuple(map(tuple, a["kernel_sizes"])), num_classes=a["num_classes"])


SMALL = dict(features=(8, 16, 24, 32), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
             kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)), num_classes=4)


# ---------------------------------------------------------------- pixel shuffle


def test_pixel_shuffle_2d_matches_torch():
    x = torch.randn(2, 3 * 9, 4, 5)
    assert torch.equal(pixel_shuffle_nd(x, (3, 3)), F.pixel_shuffle(x, 3))
    y = torch.randn(2, 3, 8, 6)
    assert torch.equal(pixel_unshuffle_nd(y, (2, 2)), F.pixel_unshuffle(y, 2))


def test_pixel_shuffle_3d_hand_computed():
    # channels (c, r_d, r_h, r_w) = (1, 1, 2, 2); input 1x1x2 -> output 1x2x4
    x = torch.arange(8.0).reshape(1, 4, 1, 1, 2)  # channel k holds [2k, 2k+1] along w
    out = pixel_shuffle_nd(x, (1, 2, 2))
    expected = torch.tensor([[0.0, 2.0, 1.0, 3.0],    # h=0: channels 0 (i=0,j=0), 1 (i=0,j=1) per w-block
                             [4.0, 6.0, 5.0, 7.0]])   # h=1: channels 2, 3
    assert out.shape == (1, 1, 1, 2, 4)
    assert torch.equal(out[0, 0, 0], expected)


def test_pixel_shuffle_follows_index_formula_and_inverts():
    f = (2, 1, 3)
    x = torch.randn(2, 2 * 6, 2, 3, 2)
    out = pixel_shuffle_nd(x, f)
    assert out.shape == (2, 2, 4, 3, 6)
    for c, i, j, k in [(0, 1, 0, 2), (1, 0, 0, 1), (1, 1, 0, 0)]:
        for z, y, w in [(0, 0, 0), (1, 2, 1)]:
            assert out[1, c, z * 2 + i, y + j, w * 3 + k] == x[1, c * 6 + i * 3 + k, z, y, w]
    assert torch.equal(pixel_unshuffle_nd(out, f), x)
    y = torch.randn(1, 3, 4, 6, 9)
    assert torch.equal(pixel_shuffle_nd(pixel_unshuffle_nd(y, (2, 3, 3)), (2, 3, 3)), y)
    with pytest.raises(ValueError):
        pixel_shuffle_nd(torch.randn(1, 5, 2, 2, 2), (1, 2, 2))


# ---------------------------------------------------------------- model


def test_forward_shapes_3d_deep_supervision_and_eval():
    torch.manual_seed(0)
    model = NeUNet(NeUNetConfig(**SMALL))
    x = torch.randn(2, 1, 8, 32, 32)
    outs = model.train()(x)
    assert [tuple(o.shape) for o in outs] == [(2, 4, 8, 32, 32), (2, 4, 8, 16, 16), (2, 4, 4, 8, 8)]
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == (2, 4, 8, 32, 32) and torch.isfinite(y).all()
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 8, 30, 32))  # not divisible by the total stride (4, 8, 8)


def test_forward_2d():
    cfg = NeUNetConfig(spatial_dims=2, in_channels=2, num_classes=3, features=(8, 16, 24, 32),
                       strides=((1, 1), (2, 2), (1, 2), (2, 2)), kernel_sizes=None)
    model = NeUNet(cfg).train()
    outs = model(torch.randn(1, 2, 16, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 3, 16, 32), (1, 3, 8, 16), (1, 3, 8, 8)]
    # wavelet convs read in_channels * 2^k sub-bands: 2 channels (ones) then 2 * 4 (a 2x2 stride)
    assert [m.conv.in_channels for m in model.encoder.multiscale_input] == [2, 8]


def test_wavelet_inputs_are_injected():
    torch.manual_seed(0)
    model = NeUNet(NeUNetConfig(**SMALL)).eval()
    x = torch.randn(1, 1, 8, 32, 32)
    waves = model.wavelet_inputs(x)
    assert [tuple(w.shape) for w in waves] == [(1, 1, 8, 32, 32), (1, 4, 8, 16, 16)]
    with torch.no_grad():
        y = model(x)
        assert torch.equal(model([x, *waves]), y)  # the official list input gives the same result
        waves[1] = waves[1] + 1.0
        assert (model([x, *waves]) - y).abs().max() > 1e-3


def test_state_dict_matches_official_synapse_plan_without_aliases():
    entry = KEYS["neunet-synapse-3d_fullres"]
    with torch.device("meta"):
        model = NeUNet(_pinned_config("neunet-synapse-3d_fullres"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {k: s for k, s in entry["keys"].items() if not _is_alias(k)}
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"] == 181_128_813
    # the architecture is fully recoverable from the official weights (no plans needed here)
    meta = {k: torch.empty(s, device="meta") for k, s in entry["keys"].items()}
    cfg = _infer_config(meta, None)
    assert cfg.strides == model.config.strides and cfg.kernel_sizes == model.config.kernel_sizes
    assert cfg.features == model.config.features and cfg.num_classes == 9 and cfg.wavelet_inputs


def _official_checkpoint(entry: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in entry["keys"].items() if not _is_alias(k)}
    for k in entry["keys"]:  # aliases share storage in a real nnU-Net state_dict
        if k.startswith("decoder.encoder."):
            sd[k] = sd[k[len("decoder."):]]
        elif ".all_modules." in k:
            head, _, tail = k.partition(".all_modules.")
            i, _, p = tail.partition(".")
            sd[k] = sd[f"{head}.{'conv' if i == '0' else 'norm'}.{p}"]
    return {"network_weights": {k: sd[k] for k in entry["keys"]}, "current_epoch": 1000}


def test_from_official_loads_every_key():
    entry = KEYS["neunet-small-3d"]
    ckpt = _official_checkpoint(entry)
    model = from_official(ckpt)
    assert model.config.strides == tuple(map(tuple, entry["args"]["strides"]))
    assert model.config.kernel_sizes == tuple(map(tuple, entry["args"]["kernel_sizes"]))
    ours = model.state_dict()
    assert set(ours) == {k for k in entry["keys"] if not _is_alias(k)}
    assert all(torch.equal(ours[k], ckpt["network_weights"][k]) for k in ours)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 8, 32, 32)).shape == (1, 4, 8, 32, 32)


def test_from_official_fails_loudly():
    entry = KEYS["neunet-small-3d"]
    ckpt = _official_checkpoint(entry)
    sd = dict(ckpt["network_weights"])
    sd.pop("decoder.seg_layers.1.bias")
    sd.pop("decoder.encoder.stages.0.0.convs.0.conv.bias", None)
    with pytest.raises(ValueError, match="seg_layers.1.bias"):
        from_official(sd)
    sd = dict(ckpt["network_weights"])
    sd["decoder.encoder.stages.1.0.convs.0.conv.bias"] = sd["decoder.encoder.stages.1.0.convs.0.conv.bias"] + 1
    with pytest.raises(ValueError, match="alias"):
        from_official(sd)
    sd = dict(ckpt["network_weights"])
    sd["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="decoder.extra.weight"):
        from_official(sd)


def test_from_official_reads_strides_from_nnunet_plans():
    # a (2, 1, 2) stride has the same weight shapes as (1, 2, 2): only the plans can tell them apart
    cfg = NeUNetConfig(features=(8, 12, 16, 16), strides=((1, 1, 1), (2, 1, 2), (2, 2, 2), (2, 2, 2)),
                       kernel_sizes=((3, 3, 3),) * 4, num_classes=2)
    torch.manual_seed(0)
    src = NeUNet(cfg).eval()
    plans = {"configurations": {"3d_fullres": {"pool_op_kernel_sizes": [list(s) for s in cfg.strides],
                                               "conv_kernel_sizes": [list(k) for k in cfg.kernel_sizes]}}}
    ckpt = {"network_weights": src.state_dict(), "init_args": {"plans": plans, "configuration": "3d_fullres"}}
    model = from_official(ckpt).eval()
    assert model.config.strides == cfg.strides
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = NeUNet(NeUNetConfig(**SMALL)).eval()
    save_pretrained(model, tmp_path)
    again = from_pretrained(tmp_path).eval()
    assert again.config == model.config
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
