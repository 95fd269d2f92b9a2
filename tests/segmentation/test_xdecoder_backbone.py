"""X-Decoder's image side: the focal_dw backbone and the transformer-encoder FPN pixel decoder.

tests/data/xdecoder_image_parity.npz was recorded by running the official X-Decoder v2.0 code
(microsoft/X-Decoder, `modeling/vision/backbone/focal_dw.py` and
`modeling/vision/encoder/transformer_encoder_fpn.py` with its transformer blocks and
PositionEmbeddingSine, files unchanged; detectron2's Conv2d/get_norm/ShapeSpec and fvcore's
c2_xavier_fill restated in a scratch directory, never imported here). The official modules were
built through their own builders (`get_focal_backbone`, `get_transformer_encoder_fpn`) from a
config dict with the TINY_* sizes below, given the weights of `seeded_state_dict` and run in
eval mode, float32, on the `CASES` inputs. For every output it holds ``<case>/<output>/sample``
(every k-th value of the flattened tensor), ``.../mean``, ``.../std`` and ``.../shape``.

tests/data/xdecoder_focalt_image_keys.json holds the state-dict keys and shapes of the official
modules built with the Focal-T config (configs/xdecoder/focalt_unicl_lang.yaml), under the
prefixes they carry in the released checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmentation.xdecoder_backbone import FocalNetDW
from segmentation.xdecoder_pixel_decoder import PositionEmbeddingSine, TransformerEncoderPixelDecoder

DATA = Path(__file__).resolve().parents[1] / "data"
PARITY = DATA / "xdecoder_image_parity.npz"
KEYS = DATA / "xdecoder_focalt_image_keys.json"

# Per-stage levels and windows differ so that a stage picking another stage's value shows.
TINY_BACKBONE = dict(embed_dim=32, depths=(1, 1, 2, 1), focal_levels=(3, 2, 3, 2), focal_windows=(3, 5, 3, 3))
TINY_DECODER = dict(conv_dim=64, mask_dim=48, enc_layers=2, nheads=4, dim_feedforward=96)
# name -> (input shape, input seed, pixel decoder pre_norm); 50x70 is not a multiple of 32
CASES = {"square": ((2, 3, 64, 64), 1, False), "odd": ((1, 3, 50, 70), 2, False), "prenorm": ((1, 3, 40, 56), 3, True)}
SAMPLES = 160  # about this many values recorded per output


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights from key names and shapes only: fan-in scaled normals, norm weights near 1, small vectors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        t = torch.randn(shape, generator=g)
        if len(shape) > 1:
            t = t / math.sqrt(math.prod(shape[1:]))
        elif key.rsplit(".", 2)[-2].startswith("norm") and key.endswith("weight"):
            t = 1 + 0.2 * t
        else:
            t = 0.2 * t
        out[key] = t
    return out


def case_input(name: str) -> torch.Tensor:
    shape, seed, _ = CASES[name]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def image_outputs(backbone, pixel_decoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    feats = backbone(x)
    mask_features, encoded, multi_scale = pixel_decoder.forward_features(feats)
    return {**feats, "mask_features": mask_features, "encoder": encoded,
            **{f"multi_scale_{i}": m for i, m in enumerate(multi_scale)}}


def build_tiny(pre_norm: bool) -> tuple[FocalNetDW, TransformerEncoderPixelDecoder]:
    backbone = FocalNetDW(**TINY_BACKBONE)
    decoder = TransformerEncoderPixelDecoder(backbone.out_channels, backbone.strides, pre_norm=pre_norm, **TINY_DECODER)
    for seed, m in ((0, backbone), (1, decoder)):
        m.load_state_dict(seeded_state_dict({k: v.shape for k, v in m.state_dict().items()}, seed))
    return backbone.eval(), decoder.eval()


@pytest.fixture(scope="module")
def recorded():
    return np.load(PARITY)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_official_outputs(case, recorded):
    backbone, decoder = build_tiny(CASES[case][2])
    with torch.no_grad():
        outs = image_outputs(backbone, decoder, case_input(case))
    names = sorted({k.split("/")[1] for k in recorded.files if k.startswith(case + "/")})
    assert names == sorted(outs)
    for name in names:
        t = outs[name]
        ref = f"{case}/{name}"
        assert list(t.shape) == recorded[ref + "/shape"].tolist(), name
        flat = t.flatten()
        step = max(1, flat.numel() // SAMPLES)
        np.testing.assert_allclose(flat[::step].numpy(), recorded[ref + "/sample"], rtol=0, atol=3e-5, err_msg=name)
        np.testing.assert_allclose(flat.mean().item(), recorded[ref + "/mean"], rtol=0, atol=3e-5, err_msg=name)
        np.testing.assert_allclose(flat.std().item(), recorded[ref + "/std"], rtol=0, atol=3e-5, err_msg=name)


def test_odd_size_grids_are_ceil_divided():
    backbone, decoder = build_tiny(False)
    with torch.no_grad():
        outs = image_outputs(backbone, decoder, case_input("odd"))
    # 50x70: stem pads to 52x72 -> 13x18; then ceil halves: 7x9, 4x5, 2x3
    assert {k: tuple(outs[k].shape[-2:]) for k in ("res2", "res3", "res4", "res5")} == {
        "res2": (13, 18), "res3": (7, 9), "res4": (4, 5), "res5": (2, 3)}
    assert [tuple(m.shape) for m in (outs["multi_scale_0"], outs["multi_scale_1"], outs["multi_scale_2"])] == [
        (1, 64, 2, 3), (1, 64, 4, 5), (1, 64, 7, 9)]
    assert outs["mask_features"].shape == (1, 48, 13, 18) and outs["encoder"].shape == (1, 64, 2, 3)
    assert backbone.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    assert backbone.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def _pinned_keys() -> dict[str, list[int]]:
    return json.loads(KEYS.read_text())


def test_focalt_state_dict_is_the_official_one():
    pinned = _pinned_keys()
    with torch.device("meta"):
        backbone = FocalNetDW()  # the Focal-T defaults of focalt_unicl_lang.yaml
        decoder = TransformerEncoderPixelDecoder(backbone.out_channels, backbone.strides)
    ours = {f"backbone.{k}": list(v.shape) for k, v in backbone.state_dict().items()}
    ours |= {f"sem_seg_head.pixel_decoder.{k}": list(v.shape) for k, v in decoder.state_dict().items()}
    assert ours == pinned["keys"]
    assert sum(math.prod(s) for s in ours.values()) == pinned["num_parameters"]


def test_position_embedding_against_formula():
    pe = PositionEmbeddingSine(8, normalize=True)
    x = torch.zeros(1, 5, 3, 4)
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # padding on the right: x positions count the 3 valid columns only
    for m in (None, mask):
        pos = pe(x, m)
        assert pos.shape == (1, 16, 3, 4)
        w = 4 if m is None else 3
        for c in range(8):
            freq = 10000 ** (2 * (c // 2) / 8)
            trig = math.sin if c % 2 == 0 else math.cos
            for i in range(3):
                for j in range(4):
                    padded = m is not None and j == 3  # a fully padded column has no y positions
                    y_pos = 0.0 if padded else (i + 1) / (3 + 1e-6) * 2 * math.pi
                    x_pos = (min(j, w - 1) + 1) / (w + 1e-6) * 2 * math.pi
                    assert pos[0, c, i, j].item() == pytest.approx(trig(y_pos / freq), abs=1e-5)  # y channels first
                    assert pos[0, 8 + c, i, j].item() == pytest.approx(trig(x_pos / freq), abs=1e-5)
    raw = PositionEmbeddingSine(4)(x)  # unnormalised: positions are 1-based pixel counts
    assert raw[0, 0, 2, 1].item() == pytest.approx(math.sin(3.0)) and raw[0, 5, 2, 1].item() == pytest.approx(math.cos(2.0))
    with pytest.raises(ValueError):
        PositionEmbeddingSine(4, scale=1.0)


def test_pixel_decoder_convs_follow_detectron2():
    backbone, decoder = build_tiny(False)
    conv = decoder.layer_2
    assert conv.bias is None and isinstance(conv.norm, torch.nn.GroupNorm) and conv.norm.num_groups == 32
    assert decoder.adapter_1.activation is None and decoder.mask_features.norm is None
    assert decoder.mask_features.bias is not None and decoder.input_proj.bias is not None
    x = torch.randn(1, 64, 5, 6)
    with torch.no_grad():
        expected = F.relu(F.group_norm(F.conv2d(x, conv.weight, padding=1), 32, conv.norm.weight, conv.norm.bias))
        assert torch.allclose(conv(x), expected, atol=1e-6)


def test_post_norm_block_and_layerscale():
    # Focal-T: post-LN, layer scale 1e-4 at init; with the modulation and MLP outputs zeroed a
    # block reduces to norm2(y + dw2(y)) with y = norm1(x + dw1(x)).
    torch.manual_seed(0)
    backbone = FocalNetDW(**TINY_BACKBONE).eval()
    block = backbone.layers[0].blocks[0]
    assert torch.equal(block.gamma_1, torch.full((32,), 1e-4))
    with torch.no_grad():
        block.gamma_1.zero_()
        block.gamma_2.zero_()
        x = torch.randn(2, 6, 7, 32)
        cf = x.permute(0, 3, 1, 2)
        y = block.norm1((cf + block.dw1(cf)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        expected = block.norm2((y + block.dw2(y)).permute(0, 2, 3, 1))
        assert torch.allclose(block(x), expected, atol=1e-6)
