"""TF1 bilinear resize against an independent formula, and the torch-bilinear option."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vision.metrics.resize import resize_for_inception, resize_tf1_bilinear


def _tf1_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False): source = dst * in / out (float32), no half-pixel offset."""
    h, w = img.shape[-2:]
    out = np.zeros(img.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        sy = float(np.float32(i) * np.float32(h / out_h))
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = float(np.float32(j) * np.float32(w / out_w))
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[..., y0, x0] * (1 - fx) + img[..., y0, x1] * fx
            bottom = img[..., y1, x0] * (1 - fx) + img[..., y1, x1] * fx
            out[..., i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("in_size,out_size", [((9, 13), (29, 31)), ((40, 23), (17, 19)), ((5, 5), (5, 5))])
def test_tf1_resize_equals_reference_formula(in_size, out_size):
    x = torch.rand(2, 3, *in_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    got = resize_tf1_bilinear(x, out_size).numpy()
    np.testing.assert_allclose(got, _tf1_reference(x.numpy(), *out_size), rtol=0, atol=1e-10)


def test_tf1_known_values_and_difference_from_torch():
    ramp = torch.tensor([[[[0.0, 10.0]]]])
    assert resize_tf1_bilinear(ramp, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    # PyTorch's half-pixel convention samples at (j + 0.5) / 2 - 0.5: 0, 2.5, 7.5, 10
    assert resize_for_inception(ramp, (1, 4), "torch").flatten().tolist() == [0.0, 2.5, 7.5, 10.0]


def test_torch_mode_is_plain_interpolate_and_same_size_is_identity():
    x = torch.rand(1, 3, 37, 50, generator=torch.Generator().manual_seed(1)) * 255
    expected = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(resize_for_inception(x, (299, 299), "torch"), expected)
    assert torch.equal(resize_tf1_bilinear(x, (37, 50)), x)
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_for_inception(x, (10, 10), "bicubic")
