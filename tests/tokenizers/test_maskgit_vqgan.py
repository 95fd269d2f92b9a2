"""MaskGIT's VQGAN: the official layout pinned, the quirks of its blocks against hand computations, and
the released file's route through the hub."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizers.maskgit_vqgan import MaskGITVQGAN, MaskGITVQGANConfig, ResBlock, official_config, recognise
from vision.hub import HubError, resolve_model

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = MaskGITVQGANConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, codebook_size=8)


def official_keys() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((DATA / "maskgit_vqgan_keys.json").read_text())["keys"].items()}


def tiny(seed: int = 0) -> MaskGITVQGAN:
    torch.manual_seed(seed)
    model = MaskGITVQGAN(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_official_keys_and_shapes_are_pinned():
    keys = official_keys()
    config = official_config({k: torch.empty(s, device="meta") for k, s in keys.items()}, "vqgan_jax_strongaug.ckpt")
    assert config == MaskGITVQGANConfig()  # ch 128, (1, 1, 2, 2, 4), 2 blocks, z 256, 1024 codes
    with torch.device("meta"):
        model = MaskGITVQGAN(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    assert model.spec.grid == (16, 16) and model.spec.downsample == 16 and model.spec.vocab_size == 1024


def test_resblock_shortcut_is_applied_to_the_output():
    torch.manual_seed(0)
    block = ResBlock(32, 64, 32).eval()
    x = torch.randn(1, 32, 4, 4)
    swish = lambda t: t * torch.sigmoid(t)  # noqa: E731
    h = F.conv2d(swish(block.norm1(x)), block.conv1.weight, padding=1)
    h = F.conv2d(swish(block.norm2(h)), block.conv2.weight, padding=1)
    assert torch.allclose(block(x), h + F.conv2d(h, block.nin_shortcut.weight), atol=1e-6)
    assert block.conv1.bias is None and block.conv2.bias is None


def test_encode_is_nearest_code_of_the_zero_one_image_and_decode_maps_back():
    model = tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    tokens = model.encode(x)
    z = model.encoder((x + 1) / 2)
    codes = model.quantize.embedding.weight
    dist = ((z.movedim(1, -1)[..., None, :] - codes) ** 2).sum(-1)
    assert torch.equal(tokens.ids, dist.argmin(-1)) and tokens.ids.shape == (2, 8, 8)
    with torch.no_grad():
        expected = model.decoder(codes[tokens.ids].movedim(-1, 1)) * 2 - 1
    assert torch.allclose(model.decode(tokens), expected, atol=1e-6)


def test_official_file_loads_through_the_hub(tmp_path):
    model = tiny()
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = resolve_model(path, kind="tokenizer")
    assert isinstance(loaded, MaskGITVQGAN) and loaded.config == MaskGITVQGANConfig(
        image_size=256, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, codebook_size=8)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x).ids, model.encode(x).ids)
    torch.save({"state_dict": {**model.state_dict(), "encoder.extra.weight": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(HubError, match="unexpected"):
        resolve_model(tmp_path / "bad.ckpt", kind="tokenizer")


def test_a_taming_vqgan_is_not_taken_for_maskgits():
    state = dict(tiny().state_dict())
    assert recognise({"state_dict": state})
    assert not recognise({**state, "quant_conv.weight": torch.zeros(1)})
    assert not recognise({**state, "encoder.down.0.block.0.conv1.bias": torch.zeros(1)})
