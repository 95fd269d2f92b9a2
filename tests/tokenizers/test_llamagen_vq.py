"""LlamaGen's VQ tokenizer: official key layout, the l2-normalised nearest-code rule, and the importer."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizers.llamagen_vq import (
    LlamaGenVQ,
    LlamaGenVQConfig,
    NormalizedVectorQuantizer,
    from_official,
    llamagen_vq_config,
    official_config,
    recognise_official,
)
from vision.hub import HubError, from_pretrained, load_official, save_pretrained
from vision.tokens import DiscreteTokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = LlamaGenVQConfig(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=64,
                        codebook_embed_dim=4, norm_groups=4)
# the smallest layout an official file can have: GroupNorm(32) is not in the file, so widths are multiples of 32
OFFICIAL_TINY = LlamaGenVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, codebook_size=64,
                                 codebook_embed_dim=4)


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((DATA / f"llamagen_{name}_keys.json").read_text())["keys"].items()}


def tiny_model(config: LlamaGenVQConfig = TINY, seed: int = 0) -> LlamaGenVQ:
    torch.manual_seed(seed)
    model = LlamaGenVQ(config).eval()
    with torch.no_grad():  # spread-out codes and non-trivial norms, so every test sees many distinct ids
        model.quantize.embedding.weight.normal_()
    return model


def official_state(model: LlamaGenVQ) -> dict:
    """What an official file holds for `model`: its weights plus the training-time usage log."""
    return {**model.state_dict(), "quantize.codebook_used": torch.zeros(65536)}


# ------------------------------------------------------------------------------- official layout


@pytest.mark.parametrize("name", ["vq16", "vq8"])
def test_official_keys_and_shapes_are_pinned(name):
    with torch.device("meta"):
        model = LlamaGenVQ(llamagen_vq_config(f"llamagen-vq-ds{name[2:]}"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_keys(name)
    assert expected.pop("quantize.codebook_used") == (65536,)  # the one official key Tessera drops
    assert list(ours) == list(expected)  # same names in the same order
    assert ours == expected
    assert expected["quantize.embedding.weight"] == (16384, 8)


def test_a_state_dict_made_from_the_pinned_keys_loads_with_the_preset():
    keys = official_keys("vq16")
    state = {k: torch.zeros(s) for k, s in keys.items()}
    state["quantize.embedding.weight"] = torch.randn(16384, 8)
    model = from_official({"model": state})
    assert model.config == llamagen_vq_config("llamagen-vq-ds16")
    assert model.spec.grid == (16, 16) and model.spec.downsample == 16 and model.spec.vocab_size == 16384
    assert torch.equal(model.quantize.embedding.weight, state["quantize.embedding.weight"])
    assert not model.training


def test_the_ds8_preset_is_inferred_from_the_keys():
    state = {k: torch.empty(s, device="meta") for k, s in official_keys("vq8").items()}
    assert official_config(state) == llamagen_vq_config("llamagen-vq-ds8")


# ------------------------------------------------------------------------------- the tokenizer


def test_spec_shapes_and_protocol():
    model = tiny_model()
    assert isinstance(model, DiscreteTokenizer)
    assert model.spec.kind == "discrete" and model.spec.grid == (8, 8) and model.spec.downsample == 2
    x = torch.rand(2, 3, 16, 24) * 2 - 1  # not the native size: the Tokens carry its grid
    tokens = model.encode(x)
    assert tokens.ids.shape == (2, 8, 12) and tokens.ids.dtype == torch.int64
    assert tokens.spec.grid == (8, 12) and tokens.spec.vocab_size == 64
    assert model.decode(tokens).shape == (2, 3, 16, 24)
    assert llamagen_vq_config("llamagen-vq-ds16").downsample == 16
    assert llamagen_vq_config("llamagen-vq-ds8").downsample == 8
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 15, 16))


def test_ids_are_the_nearest_l2_normalised_code():
    """Reference: argmax of the cosine between the encoder latent and each raw code, in float64."""
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = model.encode(x).ids
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).double().movedim(1, -1)
    codes = model.quantize.embedding.weight.double()
    cosine = F.normalize(z, dim=-1) @ F.normalize(codes, dim=-1).T
    assert torch.equal(ids, cosine.argmax(-1))
    assert ids.unique().numel() > 10


def test_quantizer_round_trips_and_ignores_latent_scale():
    torch.manual_seed(0)
    q = NormalizedVectorQuantizer(64, 4).eval()
    with torch.no_grad():
        q.embedding.weight.mul_(torch.rand(64, 1) * 5 + 0.1)  # raw codes of any norm
    z = torch.randn(2, 4, 5, 6)
    out = q(z)
    codes = q.ids_to_latents(out.ids)
    assert torch.equal(out.quantized, codes)  # quantized is exactly the looked-up code
    assert torch.allclose(codes.norm(dim=1), torch.ones(2, 5, 6), atol=1e-6)  # on the unit sphere
    assert torch.equal(q(codes).ids, out.ids)  # a code quantizes to itself
    assert torch.equal(q(z * 7.5).ids, out.ids)  # only the direction of z matters
    every = torch.arange(64).view(1, 8, 8)
    assert torch.equal(q(q.ids_to_latents(every)).ids, every)


def test_decode_of_ids_is_the_reconstruction_and_encode_is_stable_on_it():
    model = tiny_model()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        recon, q = model(x)
        tokens = model.encode(x)
        assert torch.equal(q.quantized, model.ids_to_latents(tokens.ids))
        assert torch.equal(model.decode(tokens), recon)


def test_training_pass_losses_and_straight_through_gradients():
    model = tiny_model().train()
    recon, q = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert set(q.losses) == {"codebook", "commitment"}
    assert torch.allclose(q.losses["commitment"], 0.25 * q.losses["codebook"])  # same distance, weighted
    (recon.square().mean() + q.loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    loaded = from_pretrained(save_pretrained(model, tmp_path / "m"))
    assert isinstance(loaded, LlamaGenVQ) and loaded.config == TINY
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x).ids, model.encode(x).ids)


# ------------------------------------------------------------------------------- official files


def test_official_file_loads_through_the_hub(tmp_path):
    model = tiny_model(OFFICIAL_TINY)
    path = tmp_path / "vq_tiny.pt"
    torch.save({"model": official_state(model)}, path)
    loaded = load_official(path, kind="tokenizer")
    assert isinstance(loaded, LlamaGenVQ)
    assert loaded.config == OFFICIAL_TINY
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a plain state dict (no {"model": ...} wrapper) is taken too, and half-precision weights become float32
    half = from_official({k: v.half() for k, v in official_state(model).items()})
    assert {p.dtype for p in half.parameters()} == {torch.float32}
    assert torch.equal(half.quantize.embedding.weight, model.quantize.embedding.weight.half().float())


def test_recognise_is_specific():
    state = official_state(tiny_model(OFFICIAL_TINY))
    assert recognise_official({"model": state}) and recognise_official(state)
    taming_like = {"encoder.conv_in.weight": torch.zeros(1), "encoder.down.0.block.0.conv1.weight": torch.zeros(1),
                   "quantize.embedding.weight": torch.zeros(16, 4), "quant_conv.weight": torch.zeros(1)}
    assert not recognise_official({"state_dict": taming_like}) and not recognise_official(taming_like)
    assert not recognise_official([1, 2]) and not recognise_official({"model": 3})


def test_garbage_file_is_a_hub_error(tmp_path):
    path = tmp_path / "vq_ds16_c2i.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(HubError):
        from_official(path)
    with pytest.raises(HubError, match="does not exist"):
        from_official(tmp_path / "missing.pt")


def test_one_wrong_key_or_shape_is_a_hub_error_naming_it():
    state = official_state(tiny_model(OFFICIAL_TINY))
    renamed = dict(state)
    renamed["decoder.mid.1.q.weight_"] = renamed.pop("decoder.mid.1.q.weight")
    with pytest.raises(HubError, match=r"decoder\.mid\.1\.q\.weight"):
        from_official({"model": renamed})
    missing = {k: v for k, v in state.items() if k != "post_quant_conv.bias"}
    with pytest.raises(HubError, match="post_quant_conv.bias"):
        from_official({"model": missing})
    misshapen = {**state, "decoder.conv_in.weight": torch.zeros(64, 32, 1, 1)}
    with pytest.raises(HubError, match="decoder.conv_in.weight"):
        from_official({"model": misshapen})
    with pytest.raises(HubError):
        from_official({"model": {"something": torch.zeros(1)}})
    with pytest.raises(HubError, match="not a tensor"):
        from_official({"model": {**state, "steps": 5}})
