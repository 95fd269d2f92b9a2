"""Implicit autoencoder (first stage of Kim & Kim 2024): IND trunk structure and receptive field, exact
any-size rendering, fast path == autograd path, tiling, gradients through a frozen decoder, save/load,
and a tiny training run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.implicit_ae import ImplicitAEConfig, ImplicitAutoencoder
from vision.decoders.ind import GLOBAL_RADIUS, INDConfig, INDTrunk
from vision.decoders.liif import LIIF, LIIFConfig
from vision.errors import ConfigError
from vision.tokens import Decoder, Tokenizer, Tokens, TokenSpec

TINY = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=4, hidden_list=[16, 16])


def tiny(seed: int = 0, **overrides) -> ImplicitAutoencoder:
    torch.manual_seed(seed)
    return ImplicitAutoencoder(ImplicitAEConfig(**{**TINY, **overrides})).eval()


def latents(shape=(2, 3, 6, 5), seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- trunk


def test_trunk_structure_has_no_upsampling_and_keeps_the_latent_resolution():
    model = tiny(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2)
    trunk = model.decoder.encoder
    assert isinstance(trunk, INDTrunk)
    names = {type(m).__name__ for m in model.decoder.modules()}
    assert not names & {"Upsample2D", "Upsample"}, names  # no upsampling anywhere
    assert not hasattr(trunk, "conv_out") and not hasattr(trunk, "conv_norm_out")  # no output tail
    assert len(trunk.mid_block.resnets) == 2 and trunk.mid_block.attentions[0] is None
    assert [len(b.resnets) for b in trunk.up_blocks] == [3, 3, 3]  # num_res_blocks + 1 per level
    assert [b.resnets[-1].conv2.out_channels for b in trunk.up_blocks] == [16, 16, 8]  # deepest level first
    z = latents((2, 3, 7, 4))
    with torch.no_grad():
        feat = trunk(z)
    assert feat.shape == (2, 8, 7, 4) and trunk.out_dim == 8  # ch * ch_mult[0] channels, latent resolution
    # the feature map is the raw output of the last ResnetBlock (no norm/activation after it)
    captured = {}
    trunk.up_blocks[-1].resnets[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    with torch.no_grad():
        assert torch.equal(trunk(z), captured["h"])
    # LIIF MLP input: features (no unfold) + rel coord + rel cell
    assert model.decoder.imnet.layers[0].in_features == 8 + 4
    assert trunk.peak_channels > 5 * 16 and trunk.receptive_radius == GLOBAL_RADIUS


def _frozen_groupnorm(trunk: nn.Module, reference: torch.Tensor) -> None:
    """Make every GroupNorm use the statistics it saw on `reference` (so the trunk is purely local)."""
    stats = {}
    norms = [m for m in trunk.modules() if isinstance(m, nn.GroupNorm)]

    def record(m, inputs, output):
        x = inputs[0].view(inputs[0].shape[0], m.num_groups, -1)
        stats[m] = (x.mean(-1), x.var(-1, unbiased=False))

    hooks = [m.register_forward_hook(record) for m in norms]
    with torch.no_grad():
        trunk(reference)
    for h in hooks:
        h.remove()

    def frozen(m, x):
        mean, var = stats[m]
        b, c = x.shape[:2]
        xg = x.view(b, m.num_groups, -1)
        xg = (xg - mean[..., None]) / torch.sqrt(var[..., None] + m.eps)
        return xg.view_as(x) * m.weight.view(1, c, 1, 1) + m.bias.view(1, c, 1, 1)

    for m in norms:
        m.forward = lambda x, m=m: frozen(m, x)


def test_receptive_field_local_through_convs_global_through_groupnorm():
    model = tiny()
    trunk = model.decoder.encoder
    radius = trunk.conv_radius
    assert radius == 1 + 4 + 2 * 2 * 2  # conv_in, 2 mid ResnetBlocks, 2 levels x 2 ResnetBlocks, 2 convs each
    side = 2 * radius + 7
    z = latents((1, 3, side, side))
    center = side // 2
    bumped = z.clone()
    bumped[0, :, center, center] += 1.0
    with torch.no_grad():
        change = (trunk(bumped) - trunk(z)).abs().amax(dim=(0, 1))
    dist = torch.maximum(*torch.meshgrid((torch.arange(side) - center).abs(), (torch.arange(side) - center).abs(),
                                         indexing="ij"))
    # with real GroupNorm the whole map moves: the receptive field is global, hence GLOBAL_RADIUS
    assert change[dist > radius].min() > 0
    # with GroupNorm statistics frozen, the change stops exactly at conv_radius and reaches it
    _frozen_groupnorm(trunk, z)
    with torch.no_grad():
        local = (trunk(bumped) - trunk(z)).abs().amax(dim=(0, 1))
    assert local[dist > radius].max() == 0
    assert local[dist == radius].max() > 0


# ---------------------------------------------------------------- rendering


def test_exact_output_sizes_and_protocols():
    model = tiny()
    assert isinstance(model, Decoder) and isinstance(model, Tokenizer)
    z = latents()
    with torch.no_grad():
        assert model.decode(z, (17, 23)).shape == (2, 3, 17, 23)  # x2.83 by x4.6: non-integer, non-square
        assert model.decode(z, (1, 1)).shape == (2, 3, 1, 1)
        assert model.decode(z).shape == (2, 3, 12, 10)  # default: latent size times f
        assert model.decode(z, 9).shape == (2, 3, 9, 9)
        tokens = Tokens(TokenSpec("continuous", (6, 5), 2, channels=3), latents=z)
        assert torch.equal(model.decode(tokens, (17, 23)), model.decode(z, (17, 23)))
    assert model.decode(z, (17, 23)).shape == (2, 3, 17, 23)  # autograd path too
    with pytest.raises(ValueError):
        model.decode(z, (0, 4))
    with pytest.raises(ValueError):
        model.decode(z[:, :2])


def test_fast_grid_path_equals_autograd_path():
    model = tiny()
    z = latents()
    for size in [(17, 23), (5, 3), (12, 10), (31, 7)]:
        with torch.no_grad():
            fast = model.decode(z, size)
        slow = model.decode(z, size)
        assert slow.requires_grad
        assert (fast - slow.detach()).abs().max() <= 1e-5, size


def test_scaling_factor_is_divided_out():
    model = tiny(scaling_factor=0.5)
    plain = tiny(scaling_factor=1.0)
    images = torch.rand(1, 3, 16, 12) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model.encode_latents(images), 0.5 * plain.encode_latents(images))
        assert torch.allclose(model.decode(model.encode_latents(images), (9, 7)),
                              plain.decode(plain.encode_latents(images), (9, 7)), atol=1e-6)


def test_tiled_equals_untiled(monkeypatch):
    model = tiny()
    z = latents()
    with torch.no_grad():
        whole = model.decode(z, (17, 23))
        for tile in (1, 2, 3):
            assert (model.decode(z, (17, 23), tile=tile) - whole).abs().max() <= 1e-6
    whole_grad = model.decode(z, (13, 11))
    assert (model.decode(z, (13, 11), tile=2) - whole_grad).abs().max() <= 1e-6
    # control: cropping with only the convolutions' radius is NOT exact (GroupNorm statistics of a crop differ)
    trunk = model.decoder.encoder
    monkeypatch.setattr(type(trunk), "receptive_radius", property(lambda self: self.conv_radius))
    big = latents((1, 3, 40, 40))
    with torch.no_grad():
        assert (model.decode(big, (50, 50), tile=8) - model.decode(big, (50, 50))).abs().max() > 1e-4


def test_mid_attention_decodes_and_matters():
    plain = tiny()
    attn = tiny(mid_attention=True)
    missing, unexpected = attn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".attentions." in k for k in missing)
    assert any(k.startswith("decoder.encoder.mid_block.attentions.0") for k in missing)
    assert any(k.startswith("encoder.0.mid_block.attentions.0") for k in missing)
    z = latents()
    with torch.no_grad():
        out = attn.decode(z, (17, 23))
        assert out.shape == (2, 3, 17, 23) and torch.isfinite(out).all()
        assert (attn.decode(z, (17, 23), tile=2) - out).abs().max() <= 1e-6  # whole latent in every tile
        assert (out - plain.decode(z, (17, 23))).abs().max() > 1e-3  # same other weights: attention changes it
    assert (attn.decode(z, (17, 23)).detach() - out).abs().max() <= 1e-5


def test_gradient_reaches_latents_through_a_frozen_decoder():
    model = tiny()
    model.decoder.requires_grad_(False)
    z = latents().requires_grad_(True)
    out = model.decode(z, (17, 23))
    out.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert (z.grad.abs().sum(dim=(0, 1)) > 0).all()  # every latent position matters
    assert all(p.grad is None for p in model.decoder.parameters())


# ---------------------------------------------------------------- encoding, training interface


def test_encode_spec_and_side_checks():
    model = tiny()
    assert model.downsample == 2 and model.spec.grid == (8, 8) and model.spec.channels == 3
    images = torch.rand(2, 3, 12, 6) * 2 - 1
    tokens = model.encode(images)
    assert tokens.latents.shape == (2, 3, 6, 3) and tokens.spec.grid == (6, 3) and not tokens.latents.requires_grad
    assert model.encode_latents(images).requires_grad
    for bad in (torch.zeros(1, 3, 15, 16), torch.zeros(1, 3, 16, 7), torch.zeros(1, 1, 16, 16)):
        with pytest.raises(ValueError):
            model.encode(bad)
    big = ImplicitAutoencoder(ImplicitAEConfig(**{**TINY, "ch_mult": (1, 2, 2), "image_size": 48}))
    assert big.downsample == 4 and big.spec.grid == (12, 12)


def test_config_validation():
    for bad in (dict(norm_num_groups=3), dict(ch_mult=()), dict(image_size=15), dict(scaling_factor=0.0),
                dict(hidden_list=[]), dict(z_channels=0)):
        with pytest.raises(ConfigError):
            ImplicitAEConfig(**{**TINY, **bad})
    with pytest.raises(ConfigError):
        INDConfig(ch=8, norm_num_groups=3)
    liif = LIIF(LIIFConfig(encoder="ind", encoder_args=dict(ch=8, ch_mult=(1, 2), norm_num_groups=4),
                           feat_unfold=False, hidden_list=[8]))
    assert isinstance(liif.encoder, INDTrunk)


def test_reconstruction_loss_and_target_size():
    model = tiny()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        target = F.interpolate(images, size=(11, 11), mode="bicubic", align_corners=False)
        assert torch.allclose(model.reconstruction_loss(images, 11), (model(images, 11) - target).abs().mean())
        assert torch.allclose(model.reconstruction_loss(images, 16), (model(images, (16, 16)) - images).abs().mean())
    g = torch.Generator().manual_seed(3)
    sizes = [ImplicitAutoencoder.random_target_size(g, 8, 17) for _ in range(400)]
    assert min(sizes) == 8 and max(sizes) == 16  # int(uniform(8, 17)): 17 is never drawn
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert model.random_target_size(g1, 48, 192) == int(48 + 144 * torch.rand((), generator=g2, dtype=torch.float64))
    assert ImplicitAutoencoder.random_target_size(g, 7, 7) == 7
    with pytest.raises(ValueError):
        ImplicitAutoencoder.random_target_size(g, 9, 8)


def test_save_and_load_round_trip(tmp_path):
    from vision.hub import from_pretrained, save_pretrained

    model = tiny(mid_attention=True, scaling_factor=0.7)
    save_pretrained(model, tmp_path / "iae")
    loaded = from_pretrained(tmp_path / "iae")
    assert isinstance(loaded, ImplicitAutoencoder) and loaded.config == model.config
    images = torch.rand(1, 3, 16, 12) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(images).latents, model.encode(images).latents)
        z = model.encode(images).latents
        assert torch.equal(loaded.decode(z, (13, 9)), model.decode(z, (13, 9)))


def test_tiny_training_learns_to_reconstruct():
    """150 Adam steps on 8 16x16 crops (64x64 patches of a photo, area-downscaled) at random target sizes
    8..16. Bounds: the final native-size L1 must be under half the L1 of each crop's own mean colour (what a
    latent without spatial content could give) and under 1.5x the L1 of bicubic upsampling of a 2x
    area-downscale (the same number of values as the 8x8x3 latent; measured: 0.083 vs 0.077 and 0.32)."""
    from vision.data import read_image
    from vision.data.samples import sample_photo

    photo = read_image(sample_photo("astronaut"))
    g = torch.Generator().manual_seed(0)
    crops = []
    for _ in range(8):
        r, c = (int(torch.randint(0, n - 64, (1,), generator=g)) for n in photo.shape[1:])
        crops.append(F.interpolate(photo[None, :, r : r + 64, c : c + 64], size=16, mode="area")[0])
    x = torch.stack(crops)
    bicubic = (F.interpolate(F.interpolate(x, size=8, mode="area"), size=16, mode="bicubic", align_corners=False)
               - x).abs().mean().item()
    constant = (x - x.mean((2, 3), keepdim=True)).abs().mean().item()
    model = tiny(hidden_list=[32, 32]).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        initial = model.reconstruction_loss(x, 16).item()
    for _ in range(150):
        loss = model.reconstruction_loss(x, model.random_target_size(g, 8, 17))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = model.reconstruction_loss(x, 16).item()
        odd = model.reconstruction_loss(x, (11, 13)).item()  # a size never trained on (non-square)
    assert final < 0.5 * constant and final < 1.5 * bicubic and final < 0.3 * initial, (final, constant, bicubic)
    assert odd < 0.5 * constant
