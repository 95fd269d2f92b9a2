"""generators/latent_diffusion: the CompVis schedule, the losses (per-sample SNR alignment through a frozen first
stage), scheduler swaps, seeding, padding, SR output sizes, a short training run and the GeneratorModel API."""
from __future__ import annotations

import math

import pytest
import torch

import generators.latent_diffusion.model as ldm_module
from generators.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from tokenizers.implicit_ae import ImplicitAEConfig, ImplicitAutoencoder
from vision.tokens import Tokens

C, S = 3, 8  # latent channels, latent side


def tiny(condition: str = "none", **kw) -> LatentDiffusion:
    torch.manual_seed(0)
    cfg = dict(latent_channels=C, latent_size=S, downsample=2, condition=condition, block_out_channels=(8, 16),
               norm_num_groups=4)
    cfg.update(kw)
    return LatentDiffusion(LatentDiffusionConfig(**cfg))


def first_stage() -> ImplicitAutoencoder:
    torch.manual_seed(1)
    return ImplicitAutoencoder(ImplicitAEConfig(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=3,
                                                norm_num_groups=4, hidden_list=[16]))


def bound(model: LatentDiffusion) -> LatentDiffusion:
    model.bind_tokenizer(first_stage())
    model.freeze_first_stage()
    return model


def seeded(**tensors) -> dict:
    B = next(iter(tensors.values())).shape[0]
    return {**tensors, "seed": torch.arange(100, 100 + B)}


# ---------------------------------------------------------------------- schedule


def test_beta_schedule_is_compvis_linear():
    """diffusers' scaled_linear == CompVis make_beta_schedule('linear') (util.py L21-25), written out here."""
    m = tiny()
    T, b0, b1 = 1000, 0.0015, 0.0155
    compvis = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
    betas = m.noise_scheduler.betas.double()
    assert betas.shape == (T,)
    torch.testing.assert_close(betas, compvis, rtol=1e-6, atol=1e-9)
    abar = torch.cumprod(1 - compvis, 0)
    torch.testing.assert_close(m.noise_scheduler.alphas_cumprod.double(), abar, rtol=1e-5, atol=1e-8)
    assert abs(float(abar[0]) - 0.9985) < 1e-9 and abs(float(abar[-1]) - 6.7e-4) < 0.1e-4  # spec section 3
    # diffusers' plain "linear" is NOT the CompVis one (the trap this config avoids)
    plain = torch.linspace(b0, b1, T, dtype=torch.float64)
    assert (plain - compvis).abs().max() > 1e-3
    assert m.noise_scheduler.config.clip_sample is False


# ---------------------------------------------------------------------- losses


def test_loss_shapes_finite_and_condition_checks():
    z = torch.randn(3, C, S, S)
    loss, metrics = tiny().loss(seeded(latents=z))
    assert loss.ndim == 0 and torch.isfinite(loss) and set(metrics) >= {"mse", "t_mean"}
    sr = tiny("concat")
    assert sr.unet.config.in_channels == 2 * C and sr.unet.config.out_channels == C
    loss, _ = sr.loss(seeded(latents=z, cond=torch.randn_like(z)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="cond"):
        sr.loss({"latents": z})
    with pytest.raises(ValueError, match="unconditional"):
        tiny().loss(seeded(latents=z, cond=torch.randn_like(z)))


def test_loss_is_per_sample_seeded():
    """Each sample draws t and noise from its own seed: a batch's loss is the mean of its halves' (DDP == 1 process)."""
    m = tiny()
    z = torch.randn(4, C, S, S)
    seeds = torch.tensor([5, 6, 7, 8])
    full, _ = m.loss({"latents": z, "seed": seeds})
    a, _ = m.loss({"latents": z[:2], "seed": seeds[:2]})
    b, _ = m.loss({"latents": z[2:], "seed": seeds[2:]})
    torch.testing.assert_close(full, (a + b) / 2, rtol=1e-5, atol=1e-6)
    again, _ = m.loss({"latents": z, "seed": seeds})
    assert torch.equal(full, again)


def _fixed_t_draw(ts: list[int], C: int, h: int, w: int, T: int = 1000):
    """A per_sample_rand replacement whose first normal maps to the given timesteps through the normal CDF."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(len(ts), C * h * w, generator=g)
    first = torch.special.ndtri((torch.tensor(ts, dtype=torch.float64) + 0.5) / T).float()

    def fake(batch, *shape, normal=False, device=None):
        assert normal and shape == (1 + C * h * w,)
        return torch.cat([first[:, None], noise], dim=1).to(device)

    return fake, noise.reshape(len(ts), C, h, w)


def test_alignment_loss_weights_each_sample_by_its_own_snr(monkeypatch):
    """Hand computation on a batch of 2 with t = (10, 600): mean_b(L_dm[b] + SNR[b] L_img[b]), SNR from the CompVis
    schedule written out; the official broadcasting (mean SNR x mean L_img) gives a clearly different number."""
    m = bound(tiny())
    ts = [10, 600]
    fake, eps = _fixed_t_draw(ts, C, S, S)
    monkeypatch.setattr(ldm_module, "per_sample_rand", fake)
    torch.manual_seed(4)
    z0 = torch.randn(2, C, S, S)
    images = torch.rand(2, 3, 13, 11) * 2 - 1  # any target size (non-square)
    images[1] += 3  # the low-SNR sample far off: per-sample and batch-mean weighting then disagree clearly
    loss, metrics = m.alignment_loss({"latents": z0, "images": images})

    betas = torch.linspace(0.0015 ** 0.5, 0.0155 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[ts].float()
    snr = abar / (1 - abar)
    a = abar.view(2, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        eps_hat = m.unet(z_t, torch.tensor(ts)).sample
        x0_hat = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
        dec = m.tokenizer.decode(x0_hat, size=(13, 11))
    l_dm = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))
    l_img = ((dec - images) ** 2).mean(dim=(1, 2, 3))
    expected = (l_dm + snr * l_img).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert metrics["img_mse"] == pytest.approx(float(l_img.mean()), rel=1e-4)
    official_quirk = l_dm.mean() + snr.mean() * l_img.mean()
    assert float(official_quirk) > 2 * float(expected)
    # x0_hat's latent error is exactly the eps error rescaled: SNR ||x0_hat - z0||^2 == ||eps_hat - eps||^2 (official L_lat)
    torch.testing.assert_close((snr * ((x0_hat - z0) ** 2).mean(dim=(1, 2, 3))), l_dm, rtol=1e-3, atol=1e-5)


def test_alignment_trains_the_unet_only_through_the_frozen_decoder():
    m = bound(tiny("concat"))
    tok = m.tokenizer
    assert all(not p.requires_grad for p in tok.parameters())
    assert not any(p is q for p in m.parameters() for q in tok.parameters())  # the tokenizer is outside the module tree
    tok_before = {k: v.clone() for k, v in tok.state_dict().items()}
    unet_before = {k: v.clone() for k, v in m.unet.state_dict().items()}
    torch.manual_seed(5)
    z = torch.randn(2, C, S, S)
    batch = seeded(latents=z, cond=torch.randn_like(z), images=torch.rand(2, 3, 16, 16) * 2 - 1)

    # the decoder term's gradient reaches the UNet: the alignment gradient differs from the plain loss's
    def grads(fn):
        m.zero_grad()
        fn(batch)[0].backward()
        return torch.cat([p.grad.flatten() for p in m.unet.parameters()])

    g_align, g_plain = grads(m.alignment_loss), grads(m.loss)
    assert torch.isfinite(g_align).all()
    assert (g_align - g_plain).norm() > 1e-3 * g_plain.norm()
    assert all(p.grad is None for p in tok.parameters())

    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for step in range(3):
        opt.zero_grad()
        loss, _ = m.alignment_loss({**batch, "seed": batch["seed"] + step})
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    for k, v in tok.state_dict().items():
        assert torch.equal(v, tok_before[k]), k
    assert any(not torch.equal(v, unet_before[k]) for k, v in m.unet.state_dict().items())


# ---------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm", "euler", "PNDMScheduler", "UniPCMultistepScheduler"])
def test_scheduler_swap(name):
    m = tiny()
    z = m.sample_latents(2, steps=4, scheduler=name, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, C, S, S) and torch.isfinite(z).all()


def test_seeded_sampling_repeats_and_differs():
    m = tiny()
    for name, eta in (("ddim", 1.0), ("ddpm", 0.0), ("euler", 0.0)):
        run = lambda seed: m.sample_latents(2, steps=4, scheduler=name, eta=eta,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed))
        a, b, c = run(0), run(0), run(1)
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name


def test_eta_reaches_ddim_only():
    m = tiny()
    run = lambda name, eta: m.sample_latents(1, steps=4, scheduler=name, eta=eta,  # noqa: E731
                                             generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(run("ddim", 0.0), run("ddim", 1.0))
    assert torch.equal(run("dpm", 0.0), run("dpm", 1.0))


def test_unknown_scheduler_is_refused():
    m = tiny()
    for bad in ("nope", "UNet2DModel", "Scheduler"):
        with pytest.raises(ValueError, match="ddim, ddpm, dpm, euler"):
            m.sample_latents(1, steps=2, scheduler=bad)
    with pytest.raises(ValueError, match="unknown scheduler"):
        m.generate(None, batch_size=1, steps=2, scheduler="nope")


def test_grid_other_than_training_size_is_padded_and_cropped():
    m = tiny()  # two levels: sides must be even
    g = torch.Generator().manual_seed(0)
    assert m.multiple == 2
    assert m.sample_latents(2, grid=(5, 7), steps=2, generator=g).shape == (2, C, 5, 7)
    assert m.sample_latents(1, grid=12, steps=2, generator=g).shape == (1, C, 12, 12)
    sr = tiny("concat")
    z = sr.sample_latents(2, cond=torch.randn(2, C, 3, 9), steps=2, generator=g)
    assert z.shape == (2, C, 3, 9) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="cond"):
        sr.sample_latents(2, steps=2)


def test_upscale_gives_the_exact_size_from_any_lr():
    m = bound(tiny("concat"))
    lr = torch.rand(2, 3, 5, 7) * 2 - 1  # non-square, odd sides
    for size in ((13, 17), (11, 16), 9):  # x2.6/x2.43, x2.2/x2.29 (non-integer), and a square int
        out = m.upscale(lr, size, steps=2, generator=torch.Generator().manual_seed(0))
        hw = (size, size) if isinstance(size, int) else size
        assert out.shape == (2, 3, *hw) and torch.isfinite(out).all()
    a = m.upscale(lr, (13, 17), steps=2, generator=torch.Generator().manual_seed(0))
    b = m.upscale(lr, (13, 17), steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="SR"):
        bound(tiny()).upscale(lr, 10, steps=2)


def test_adain_color_fix_matches_the_bicubic_channel_statistics():
    import torch.nn.functional as F

    m = bound(tiny("concat"))
    lr = torch.rand(2, 3, 5, 7) * 2 - 1
    raw = m.upscale(lr, (13, 17), steps=2, generator=torch.Generator().manual_seed(0))
    fixed = m.upscale(lr, (13, 17), steps=2, generator=torch.Generator().manual_seed(0), color_fix="adain")
    ref = F.interpolate(lr, size=(13, 17), mode="bicubic", align_corners=False)
    torch.testing.assert_close(fixed.mean(dim=(-2, -1)), ref.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std(dim=(-2, -1)), ref.std(dim=(-2, -1)), atol=1e-4, rtol=1e-4)
    assert (raw.mean(dim=(-2, -1)) - ref.mean(dim=(-2, -1))).abs().max() > 1e-3  # it did change something
    # the per-image correction keeps the spatial pattern: the fixed image is an affine map of the raw one per channel
    z = (raw - raw.mean(dim=(-2, -1), keepdim=True)) / raw.std(dim=(-2, -1), keepdim=True)
    zf = (fixed - fixed.mean(dim=(-2, -1), keepdim=True)) / fixed.std(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(z, zf, atol=1e-4, rtol=1e-4)
    # a model's own default (config.sampling), as the shipped ldm-sr carries one
    own = bound(tiny("concat", sampling={"color_fix": "adain"}))
    torch.testing.assert_close(own.upscale(lr, (13, 17), steps=2, generator=torch.Generator().manual_seed(0)), fixed)
    with pytest.raises(ValueError, match="color_fix"):
        own.upscale(lr, 9, steps=1, color_fix="nope")


def test_wavelet_color_fix_keeps_detail_and_takes_the_reference_colours():
    from generators.latent_diffusion.model import _wavelet_low, wavelet_color_fix

    g = torch.Generator().manual_seed(0)
    images, reference = torch.rand(2, 3, 40, 33, generator=g), torch.rand(2, 3, 40, 33, generator=g)
    fixed = wavelet_color_fix(images, reference)
    torch.testing.assert_close(wavelet_color_fix(reference, reference), reference)
    # a colour cast (a constant per channel) is low frequency: it is gone after the fix
    cast = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    torch.testing.assert_close(wavelet_color_fix(images + cast, reference), fixed, atol=1e-5, rtol=0)
    # the detail (what the blur removes) is the images', not the reference's
    torch.testing.assert_close(fixed - _wavelet_low(reference, 5), images - _wavelet_low(images, 5))
    m = bound(tiny("concat"))
    lr = torch.rand(1, 3, 5, 7) * 2 - 1
    out = m.upscale(lr, (13, 17), steps=2, generator=torch.Generator().manual_seed(0), color_fix="wavelet")
    assert out.shape == (1, 3, 13, 17) and torch.isfinite(out).all()


def test_short_training_lowers_eps_mse():
    """200 Adam steps of a tiny UNet on 4 fixed latents. The eps-MSE is measured on a fixed set of 64 (t, noise)
    draws. Predicting zero noise scores exactly E[eps^2] = 1 and the random init scores about 1 too; a model that
    learned the (memorisable) 4-point data predicts eps well at every t except the smallest, so it must land far
    below: final < 0.3 and < 0.3 x initial. (Measured: 1.16 -> 0.31 after 50 steps, 0.08 after 200.)"""
    m = tiny(block_out_channels=(16, 32), norm_num_groups=8)
    g = torch.Generator().manual_seed(7)
    data = torch.randn(4, C, S, S, generator=g)
    eval_batch = {"latents": data.repeat(16, 1, 1, 1), "seed": torch.arange(10_000, 10_064)}

    def evaluate():
        with torch.no_grad():
            return float(m.loss(eval_batch)[0])

    initial = evaluate()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    for step in range(200):
        batch = {"latents": data.repeat(4, 1, 1, 1), "seed": torch.arange(16) + 16 * step}
        loss, _ = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = evaluate()
    assert final < 0.3 and final < 0.3 * initial, (initial, final)


def test_short_alignment_training_lowers_l_align():
    """200 Adam steps of L_align on 4 fixed latents z0 whose pixel targets are the frozen decoder's own rendering
    Dec(z0): a UNet that predicts the noise exactly (x0_hat = z0) scores L_align = 0 there, so the bound has an
    exact floor. The initial UNet scores about 1 + SNR-weighted image error (the image term is large at small t);
    a UNet that learned the memorisable data lands far below: final < 0.3 x initial, and the SNR-weighted image
    term falls too (the decoder's gradient shapes what is learned)."""
    m = bound(tiny(block_out_channels=(16, 32), norm_num_groups=8))
    g = torch.Generator().manual_seed(7)
    data = torch.randn(4, C, S, S, generator=g)
    with torch.no_grad():
        images = m.tokenizer.decode(data, size=(16, 16))
    eval_batch = {"latents": data.repeat(16, 1, 1, 1), "images": images.repeat(16, 1, 1, 1),
                  "seed": torch.arange(10_000, 10_064)}

    def evaluate():
        with torch.no_grad():
            loss, metrics = m.alignment_loss(eval_batch)
        return float(loss), metrics["weighted_img"]

    first_before = {k: v.clone() for k, v in m.tokenizer.state_dict().items()}
    initial, initial_img = evaluate()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    for step in range(200):
        batch = {"latents": data.repeat(4, 1, 1, 1), "images": images.repeat(4, 1, 1, 1),
                 "seed": torch.arange(16) + 16 * step}
        loss, _ = m.alignment_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final, final_img = evaluate()
    assert final < 0.3 * initial and final_img < initial_img, (initial, final, initial_img, final_img)
    assert all(torch.equal(v, first_before[k]) for k, v in m.tokenizer.state_dict().items())


# ---------------------------------------------------------------------- GeneratorModel API


def test_generate_returns_tokens_with_the_spec():
    m = tiny()
    tokens, stats = m.generate(None, batch_size=2, steps=3, generator=torch.Generator().manual_seed(0))
    assert isinstance(tokens, Tokens) and tokens.spec == m.spec
    assert m.spec.kind == "continuous" and m.spec.grid == (S, S) and m.spec.downsample == 2 and m.spec.channels == C
    assert tokens.latents.shape == (2, C, S, S) and stats.nfe == 3
    assert m.num_classes == 0
    opts = m.sampling_options("plain")
    assert opts["steps"] == 50 and opts["scheduler"] == "ddim" and opts["eta"] == 1.0
    own = tiny(sampling={"steps": 7, "eta": 0.0})
    assert own.sampling_options("plain")["steps"] == 7 and own.sampling_options("plain")["eta"] == 0.0
    with pytest.raises(ValueError, match="SR"):
        tiny("concat").generate(None, batch_size=1, steps=2)


@pytest.mark.parametrize("option", [{"temperature": 0.5}, {"top_k": 5}, {"top_p": 0.9}, {"cfg": 2.0}])
def test_refuses_options_that_do_not_apply(option):
    with pytest.raises(ValueError):
        tiny().generate(None, batch_size=1, steps=2, **option)
    with pytest.raises(ValueError):
        tiny().generate(torch.tensor([0]), steps=2)  # unconditional: no labels


def test_save_and_load_round_trip(tmp_path):
    from vision.hub import from_pretrained, save_pretrained

    m = tiny("concat", attention_levels=(False, True))
    save_pretrained(m, tmp_path / "ldm")
    back = from_pretrained(tmp_path / "ldm")
    assert isinstance(back, LatentDiffusion) and back.config == m.config
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    assert math.isclose(float(back.noise_scheduler.betas[0]), 0.0015, rel_tol=1e-6)
