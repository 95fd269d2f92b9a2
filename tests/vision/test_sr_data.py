"""LIIF's training sampler and evaluation pairs."""
import numpy as np
import torch
from PIL import Image

from vision.data.sr import SRImplicitDownsampled, div2k_shave, downsampled_pair, pixel_centres


def test_pixel_centres_match_liif_make_coord():
    c = pixel_centres(2, 4)
    assert torch.allclose(c[:4, 0], torch.full((4,), -0.5)) and torch.allclose(c[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_training_sample_is_consistent():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    ds = SRImplicitDownsampled([img], inp_size=16, sample_q=200, augment=False)
    s = ds.sample(0, torch.Generator().manual_seed(3))
    assert s["inp"].shape == (3, 16, 16) and s["coord"].shape == (200, 2) and s["gt"].shape == (200, 3)
    hr_side = round(2 / s["cell"][0, 0].item())
    assert torch.allclose(s["cell"], torch.full((200, 2), 2 / hr_side))
    assert 16 <= hr_side <= 64
    # find the crop: every gt value is the HR pixel under its coordinate, and the LR is PIL bicubic of that crop
    rows = ((s["coord"][:, 0] + 1) * hr_side / 2 - 0.5).round().long()
    cols = ((s["coord"][:, 1] + 1) * hr_side / 2 - 0.5).round().long()
    found = None
    for x0 in range(img.shape[0] - hr_side + 1):
        for y0 in range(img.shape[1] - hr_side + 1):
            crop = img[x0:x0 + hr_side, y0:y0 + hr_side]
            if np.array_equal(crop[rows[:5], cols[:5]], ((s["gt"][:5] + 1) * 127.5).round().byte().numpy()):
                found = crop
                break
        if found is not None:
            break
    assert found is not None
    gt = torch.from_numpy(found[rows, cols]).float() / 127.5 - 1
    assert torch.allclose(s["gt"], gt, atol=1e-6)
    lr = np.asarray(Image.fromarray(found).resize((16, 16), Image.BICUBIC))
    assert torch.allclose(s["inp"], torch.from_numpy(lr).permute(2, 0, 1).float() / 127.5 - 1)
    # same (index, generator seed) -> same sample; another seed -> another crop
    again = ds.sample(0, torch.Generator().manual_seed(3))
    assert all(torch.equal(s[k], again[k]) for k in s)
    assert not torch.equal(ds.sample(0, torch.Generator().manual_seed(4))["coord"], s["coord"])


def test_downsampled_pair_protocol():
    img = np.zeros((101, 77, 3), np.uint8)
    lr, hr = downsampled_pair(img, 3.7)
    assert lr.shape == (3, 27, 20) and hr.shape == (3, round(27 * 3.7), round(20 * 3.7))
    assert div2k_shave(4) == 10 and div2k_shave(3.7) == 10 and div2k_shave(2) == 8


def test_rgb_permutation_moves_lr_and_hr_channels_together():
    img = np.empty((200, 200, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 100, 200
    ds = SRImplicitDownsampled([img], inp_size=16, sample_q=64, rgb_permute=True)
    orders = set()
    for seed in range(12):
        s = ds.sample(0, torch.Generator().manual_seed(seed))
        hr_values = ((s["gt"][0] + 1) * 127.5).round().tolist()
        lr_values = ((s["inp"][:, 0, 0] + 1) * 127.5).round().tolist()
        assert sorted(hr_values) == [10, 100, 200] and lr_values == hr_values
        assert torch.equal(s["gt"], s["gt"][:1].expand_as(s["gt"]))
        orders.add(tuple(hr_values))
    assert len(orders) > 1
