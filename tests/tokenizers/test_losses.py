"""Tokenizer losses: GAN objectives and LeCAM on hand cases, the adaptive weight, WeTokLoss's composition."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.losses import (LeCAM, LPIPSLoss, NLayerDiscriminator, WeTokLoss, adaptive_gan_weight, disc_factor,
                               hinge_d_loss, non_saturating_g_loss)
from tokenizers.quantizers import QuantizerOutput


@pytest.fixture(scope="module")
def lpips_alex():
    return LPIPSLoss.random_backbone("alex", seed=0)


def test_hinge_hand_case():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])
    fake = torch.tensor([-2.0, 0.5, 1.0, -1.0])
    # real: relu(1 - r) = [0, 0.5, 2, 0] -> 0.625; fake: relu(1 + f) = [0, 1.5, 2, 0] -> 0.875
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.625 + 0.875))
    assert hinge_d_loss(torch.full((3,), 5.0), torch.full((3,), -5.0)).item() == 0.0


def test_non_saturating_uses_the_per_image_mean_logit():
    logits = torch.tensor([[[[3.0, -3.0], [1.0, -1.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])  # means 0 and 2
    expected = 0.5 * (torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(-2.0))))
    assert non_saturating_g_loss(logits).item() == pytest.approx(expected.item(), rel=1e-6)
    # not the mean of per-logit losses
    assert non_saturating_g_loss(logits).item() != pytest.approx(F.softplus(-logits).mean().item(), rel=1e-3)


def test_disc_factor_switches_on_at_disc_start():
    assert [disc_factor(s, 3) for s in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert disc_factor(0, 0) == 1.0


def test_lecam_hand_case_and_update_order():
    lecam = LeCAM(decay=0.999)
    real, fake = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    lecam.update(real, fake)
    assert lecam.logits_real_ema.item() == pytest.approx(0.002, abs=1e-15)
    assert lecam.logits_fake_ema.item() == pytest.approx(-0.001, abs=1e-15)
    # relu(2 - (-0.001))^2 + relu(0.002 - (-1))^2
    assert lecam(real, fake).item() == pytest.approx(2.001**2 + 1.002**2, rel=1e-6)
    # the regulariser is zero when real logits sit below the fake EMA and fake logits above the real EMA
    assert lecam(torch.full((4,), -1.0), torch.full((4,), 1.0)).item() == 0.0
    lecam.update(real, fake)
    assert lecam.logits_real_ema.item() == pytest.approx(0.002 * 0.999 + 2 * 0.001, abs=1e-15)


def test_lecam_state_round_trips(tmp_path):
    lecam = LeCAM()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        lecam.update(torch.randn(4, 1, 3, 3, generator=g) + 1, torch.randn(4, 1, 3, 3, generator=g) - 1)
    torch.save(lecam.state_dict(), tmp_path / "lecam.pt")
    fresh = LeCAM()
    assert fresh.logits_real_ema.item() == 0.0
    fresh.load_state_dict(torch.load(tmp_path / "lecam.pt", weights_only=True))
    assert fresh.logits_real_ema.item() == lecam.logits_real_ema.item() != 0.0
    assert fresh.logits_fake_ema.item() == lecam.logits_fake_ema.item() != 0.0
    assert fresh.logits_real_ema.dtype == torch.float64


def test_adaptive_weight_equals_manual_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    disc = nn.Conv2d(3, 1, 3)
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    nll = (y - x).abs().mean()
    g = non_saturating_g_loss(disc(y))
    last = net[2].weight
    w = adaptive_gan_weight(nll, g, last, disc_weight=0.8)
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last, retain_graph=True)[0]
    manual = (gn.pow(2).sum().sqrt() / (gg.pow(2).sum().sqrt() + 1e-4)).clamp(0, 1e4) * 0.8
    assert w.item() == pytest.approx(manual.item(), rel=1e-6)
    assert not w.requires_grad
    # a vanishing GAN gradient against a large reconstruction gradient hits the clamp: 1e4 * 0.8
    assert gn.norm().item() > 0.01
    assert adaptive_gan_weight(1e3 * nll, 1e-12 * g, last, disc_weight=0.8).item() == pytest.approx(8000.0)
    with torch.no_grad():
        assert adaptive_gan_weight((net(x) - x).abs().mean(), g.detach(), last).item() == 0.0


def _fake_quantizer_output(z):
    losses = {"commitment": 0.25 * z.pow(2).mean()}
    return QuantizerOutput(z, torch.zeros(1, dtype=torch.long), losses, {"utilisation": 0.5})


def test_generator_loss_is_l1_lpips_gan_and_quantizer(lpips_alex):
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    crit = WeTokLoss(lpips_alex, disc)  # WeTok: fixed GAN weight 0.1, LPIPS weight 1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    q = _fake_quantizer_output(torch.randn(2, 4, 4, 4))
    loss, logs = crit.generator_loss(x, recon, q, step=0)
    with torch.no_grad():
        l1 = (x - recon).abs().mean()
        p = lpips_alex.net(x, recon).mean()
    g = non_saturating_g_loss(disc(recon))
    expected = l1 + p + 0.1 * g + 0.25 * q.quantized.pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logs["l1"] == pytest.approx(l1.item()) and logs["lpips"] == pytest.approx(p.item())
    assert logs["gan_weight"] == pytest.approx(0.1) and "commitment_loss" in logs and logs["q_utilisation"] == 0.5
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_generator_loss_without_gan_before_disc_start(lpips_alex):
    calls = []
    disc = NLayerDiscriminator()
    disc.register_forward_hook(lambda *a: calls.append(1))
    crit = WeTokLoss(lpips_alex, disc, disc_start=10)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = x.flip(-1)
    loss, logs = crit.generator_loss(x, recon, None, step=9)
    assert calls == [] and "g_loss" not in logs
    assert loss.item() == pytest.approx(logs["l1"] + logs["lpips"], rel=1e-6)
    # the discriminator side still runs (LeCAM EMA moves, as in the official code) but is switched off
    d_loss, d_logs = crit.discriminator_loss(x, recon, step=9)
    assert d_loss.item() == 0.0 and crit.lecam.logits_real_ema.item() != 0.0
    d_loss, d_logs = crit.discriminator_loss(x, recon, step=10)
    assert d_loss.item() == pytest.approx(d_logs["hinge"] + 0.05 * d_logs["lecam"], rel=1e-6)


def test_discriminator_loss_is_hinge_plus_lecam_after_update():
    torch.manual_seed(0)
    disc = NLayerDiscriminator().eval()  # eval: fixed BatchNorm statistics, so the forward can be repeated
    crit = WeTokLoss(discriminator=disc, perceptual_weight=0.0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    recon = (0.5 * x).requires_grad_()
    d_loss, logs = crit.discriminator_loss(x, recon, step=0)
    with torch.no_grad():
        real, fake = disc(x), disc(0.5 * x)
    ema_r, ema_f = 0.001 * real.mean().double(), 0.001 * fake.mean().double()
    reg = F.relu(real - ema_f.float()).pow(2).mean() + F.relu(ema_r.float() - fake).pow(2).mean()
    assert d_loss.item() == pytest.approx((hinge_d_loss(real, fake) + 0.05 * reg).item(), rel=1e-6)
    d_loss.backward()
    assert recon.grad is None  # the discriminator step never reaches the generator
    assert disc.main[0].weight.grad.abs().sum() > 0


def test_loss_state_holds_discriminator_and_lecam_not_lpips(lpips_alex):
    crit = WeTokLoss(lpips_alex)
    keys = set(crit.state_dict())
    assert {"lecam.logits_real_ema", "lecam.logits_fake_ema", "discriminator.main.0.weight"} <= keys
    assert not any("lpips" in k or "net." in k or "lin" in k for k in keys)
    crit.lecam.update(torch.ones(2), -torch.ones(2))
    other = WeTokLoss(lpips_alex)
    other.load_state_dict(crit.state_dict())
    assert other.lecam.logits_real_ema.item() == crit.lecam.logits_real_ema.item()
    assert torch.equal(other.discriminator.main[0].weight, crit.discriminator.main[0].weight)
    # LPIPS stays frozen and in eval, but moves with .to()
    crit.train()
    assert not crit.perceptual.net.training
    assert all(not p.requires_grad for p in crit.perceptual.net.parameters())
    crit.double()
    assert next(crit.perceptual.net.parameters()).dtype == torch.float64


def test_lpips_loss_from_local_backbone(tmp_path):
    import torchvision

    alexnet = torchvision.models.alexnet(weights=None)
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pth")
    loss = LPIPSLoss.from_local("alex", tmp_path / "alexnet.pth")
    assert torch.equal(getattr(loss.net.net.slice1, "0").weight, alexnet.features[0].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).abs().max().item() == 0.0 and loss(x, -x).shape == (2,)


def test_patchgan_layout():
    disc = NLayerDiscriminator()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    shapes = {k: tuple(v.shape) for k, v in disc.state_dict().items() if not k.endswith(stats)}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.2.weight"] == (128, 64, 4, 4)
    assert shapes["main.5.weight"] == (256, 128, 4, 4) and shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and "main.2.bias" not in shapes  # BatchNorm layers: no conv bias
    assert disc(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 2, 2)
