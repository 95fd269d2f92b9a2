"""HBFormer: window rule, pseudo-HDR input, forward shape, official key layout and checkpoint import."""
import json
import re
from pathlib import Path

import pytest
import timm
import torch

from segmentation.hbformer import HBFormer, HBFormerConfig, from_official, pseudo_hdr, swin_window_size

PINNED = json.loads((Path(__file__).resolve().parents[1] / "data" / "hbformer_official_keys.json").read_text())
ENTRY = PINNED["hbformer-synapse-256"]


def test_window_rule_is_first_divisor_of_grid():
    # first of (7, 8, 6, 5, 4) dividing img/4
    assert [swin_window_size(s) for s in (224, 256, 512, 64, 96, 120, 20, 16, 168)] == [7, 8, 8, 8, 8, 6, 5, 4, 7]
    for bad in (44, 36 * 4 + 4):  # grids 11 and 37
        with pytest.raises(ValueError):
            swin_window_size(bad)
    with pytest.raises(ValueError):
        HBFormerConfig(img_size=66)


def test_pseudo_hdr_channels():
    x = torch.rand(2, 1, 5, 6) * 1.1
    y = pseudo_hdr(x)
    assert y.shape == (2, 3, 5, 6)
    assert torch.equal(y[:, 0], x[:, 0])
    assert torch.equal(y[:, 1], torch.clamp(1.2 * x[:, 0], 0, 1))
    # zero-padded 3x3 mean, padding counted (F.avg_pool2d defaults): the corner averages 4 pixels / 9
    assert torch.allclose(y[:, 2, 0, 0], x[:, 0, :2, :2].sum((-1, -2)) / 9)
    assert torch.allclose(y[:, 2, 2, 3], x[:, 0, 1:4, 2:5].mean((-1, -2)))


def test_small_config_forward_shape_and_window():
    torch.manual_seed(0)
    model = HBFormer(HBFormerConfig(img_size=64, num_classes=5)).eval()
    blk = model.MWAencoder.backbone.layers[0].blocks[1]
    assert model.config.window_size == 8 and tuple(blk.window_size) == (8, 8) and tuple(blk.shift_size) == (4, 4)
    assert blk.attn.relative_position_bias_table.shape == (15 * 15, 3)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        feats = model.MWAencoder(model.input_proj(pseudo_hdr(x)))
        y = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 96, 16, 16), (2, 192, 8, 8), (2, 384, 4, 4), (2, 768, 2, 2)]
    assert y.shape == (2, 5, 64, 64) and torch.isfinite(y).all()


def test_state_dict_is_the_official_one():
    with torch.device("meta"):
        model = HBFormer(HBFormerConfig(img_size=256, num_classes=9))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ENTRY["keys"]
    assert sum(p.numel() for p in model.parameters()) == ENTRY["num_parameters"] == 36_712_129


def _fake_official(generator_seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(generator_seed)
    return {k: torch.randn(s, generator=g) if s else torch.tensor(3) for k, s in ENTRY["keys"].items()}


def test_from_official_loads_every_key():
    sd = _fake_official()
    # DataParallel prefix inside a {'state_dict': ...} wrapper, as the official test loader accepts
    model = from_official({"state_dict": {"module." + k: v for k, v in sd.items()}})
    assert model.config.img_size == 256 and model.config.num_classes == 9 and model.config.feature_size == 48
    ours = model.state_dict()
    assert set(ours) == set(sd) and all(torch.equal(ours[k], sd[k]) for k in sd)


def test_from_official_accepts_original_swin_layout():
    # timm < 0.9 / Microsoft layout: patch merging at the end of the previous stage, persistent index buffers
    sd = _fake_official(1)
    old = {}
    for k, v in sd.items():
        m = re.match(r"MWAencoder\.backbone\.layers\.(\d+)\.downsample\.(.*)", k)
        old[f"MWAencoder.backbone.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    old["MWAencoder.backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(64, 64, dtype=torch.long)
    model = from_official(old, HBFormerConfig(img_size=256))
    key = "MWAencoder.backbone.layers.2.downsample.reduction.weight"
    assert torch.equal(model.state_dict()[key], sd[key])


def test_from_official_fails_loudly():
    sd = _fake_official()
    bad = dict(sd)
    bad.pop("MFF_decoder2.Med_DSPP.fuse.weight")
    with pytest.raises(ValueError, match="missing keys"):
        from_official(bad)
    bad = dict(sd, **{"MFF_decoder1.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="MFF_decoder1.extra.weight"):
        from_official(bad)
    bad = dict(sd, **{"out.1.weight": torch.zeros(9, 48, 3, 3)})
    with pytest.raises(ValueError, match="out.1.weight"):
        from_official(bad, HBFormerConfig(img_size=256))


def test_backbone_weights_from_an_original_swin_file(tmp_path):
    # an ImageNet Swin-T file in Microsoft's layout: {'model': ...}, stage-end patch merging, `head.`,
    # persistent index buffers; window 7 weights loaded into a window-8 model get resized tables
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10)
    state = {}
    for k, v in src.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k.replace("head.fc.", "head.")
        state[k] = v
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state}, path)

    same = HBFormer(HBFormerConfig(img_size=224), backbone_weights=path).MWAencoder.backbone.state_dict()
    ref = src.state_dict()
    assert all(torch.equal(same[k], ref[k]) for k in same)

    resized = HBFormer(HBFormerConfig(img_size=64), backbone_weights=path).MWAencoder.backbone.state_dict()
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert resized[table].shape == (15 * 15, 3)
    assert torch.equal(resized["layers.1.downsample.reduction.weight"], ref["layers.1.downsample.reduction.weight"])
    # the 13x13 table resized to 15x15 keeps its centre value (zero offset) close
    centre = ref[table].view(13, 13, 3)[6, 6]
    assert torch.allclose(resized[table].view(15, 15, 3)[7, 7], centre, atol=0.05 * centre.abs().max() + 1e-3)
