"""PSNR (RGB, Y, shave), SSIM and LPIPS (local backbone only)."""
import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vision.metrics import image_quality as iq
from vision.metrics.image_quality import load_lpips, lpips_distance, psnr, rgb_to_y, ssim


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 28, generator=g, dtype=torch.float64)
    b = (a + 0.08 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def test_psnr_rgb_matches_skimage(pair):
    a, b = pair
    ours = psnr(b, a, reduction="none")
    ref = [peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1.0) for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)
    assert float(psnr(b, a)) == pytest.approx(np.mean(ref), rel=1e-12)
    assert psnr(a, a).item() == float("inf")
    assert float(psnr(b * 255, a * 255, data_range=255.0)) == pytest.approx(np.mean(ref), rel=1e-12)


def test_y_channel_is_bt601_as_skimage_and_liif(pair):
    a, b = pair
    ref_y = rgb2ycbcr(a[0].permute(1, 2, 0).numpy())[..., 0] / 255  # Y = 16 + 65.481 R + 128.553 G + 24.966 B
    np.testing.assert_allclose(rgb_to_y(a)[0, 0].numpy(), ref_y, rtol=1e-5)  # skimage rounds to 3 decimals
    # LIIF calc_psnr(dataset='benchmark', scale=s): diff * [65.738, 129.057, 25.064] / 256, shave s, one image
    coeffs = torch.tensor([65.738, 129.057, 25.064], dtype=torch.float64).view(1, 3, 1, 1) / 256
    for i in range(2):
        diff = ((b[i:i + 1] - a[i:i + 1]) * coeffs).sum(1)[..., 3:-3, 3:-3]
        liif = -10 * torch.log10(diff.pow(2).mean())
        assert float(psnr(b[i:i + 1], a[i:i + 1], y_channel=True, shave=3)) == pytest.approx(float(liif), rel=1e-12)


def test_shave_crops_borders():
    a = torch.zeros(1, 3, 20, 20, dtype=torch.float64)
    b = a.clone()
    b[..., :2, :] = 1.0  # errors only in the two top rows
    assert psnr(b, a, shave=2).item() == float("inf")
    assert psnr(b, a, shave=1).item() == pytest.approx(10 * np.log10(18 * 18 / 18), rel=1e-12)
    with pytest.raises(ValueError, match="shave"):
        psnr(b, a, shave=10)


def test_ssim_is_torchmetrics_and_its_interior_equals_skimage(pair):
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = pair
    ours = ssim(b, a, reduction="none")
    _, full = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none", return_full_image=True)
    np.testing.assert_allclose(ours.numpy(), full.mean(dim=(1, 2, 3)).numpy(), rtol=1e-12)
    # torchmetrics averages the whole map (reflect-padded borders); skimage drops a 5-pixel border
    ref = [structural_similarity(a[i].numpy(), b[i].numpy(), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0, channel_axis=0) for i in range(2)]
    np.testing.assert_allclose(full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)).numpy(), ref, rtol=1e-6)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)
    assert 0 < ssim(b, a, y_channel=True, shave=2).item() < 1


def test_lpips_missing_backbone_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    for net, name in (("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")):
        with pytest.raises(FileNotFoundError) as err:
            load_lpips(net)
        assert "\n" not in str(err.value) and name in str(err.value) and str(tmp_path / "checkpoints") in str(err.value)


def test_lpips_backbone_comes_from_the_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pth")
    model = load_lpips("alex", backbone_path=tmp_path / "alexnet.pth")
    assert torch.equal(getattr(model.net.slice5, "10").weight, alexnet.features[10].weight)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.net(x)[4], alexnet.features[:12](x))  # relu5 of the file's network
    y = (x + 0.2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    d = lpips_distance(x, y, model, reduction="none")
    assert d.shape == (2,) and (d > 0).all()
    assert lpips_distance(x, x, model).item() == 0.0
    bad = {k: v for k, v in alexnet.state_dict().items() if k != "features.3.weight"}
    with pytest.raises(ValueError, match="features.3.weight"):
        iq.load_lpips_backbone(model, bad)
