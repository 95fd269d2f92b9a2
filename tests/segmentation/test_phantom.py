"""The seeded CT-like phantom: determinism, label layout, tiny lesions inside organs, HU levels."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from vision.data.phantom import ORGAN_HU, make_phantom


def test_deterministic_for_a_seed():
    a_img, a_lab = make_phantom(7)
    b_img, b_lab = make_phantom(7)
    c_img, c_lab = make_phantom(8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab)
    assert a_img.shape == a_lab.shape == (64, 64, 48)
    assert a_img.dtype == np.float32 and a_lab.dtype == np.uint8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_organs_and_lesions(seed):
    n_organs, n_lesions = 4, 3
    image, labels = make_phantom(seed, n_organs=n_organs, n_lesions=n_lesions)
    assert set(np.unique(labels)) == set(range(n_organs + 2))
    lesion = labels == n_organs + 1
    components, count = ndimage.label(lesion)
    assert count == n_lesions
    sizes = np.bincount(components.ravel())[1:]
    assert sizes.min() >= 7 and sizes.max() <= 33  # spheres of radius 1 to 2 voxels
    # Without lesions the organs are the same (lesions are drawn last): each lesion replaced voxels
    # of exactly one organ.
    _, organs_only = make_phantom(seed, n_organs=n_organs, n_lesions=0)
    assert np.array_equal(labels[~lesion], organs_only[~lesion])
    for k in range(1, n_lesions + 1):
        hosts = np.unique(organs_only[components == k])
        assert len(hosts) == 1 and 1 <= hosts[0] <= n_organs
    # HU: air outside the body, each organ near its mean (noise sigma 12 HU), lesions differ from their host.
    assert abs(float(image[0, 0, 0]) + 1000) < 80
    for organ in range(1, n_organs + 1):
        assert abs(float(image[labels == organ].mean()) - ORGAN_HU[organ - 1]) < 3.0
    for k in range(1, n_lesions + 1):
        host = int(np.unique(organs_only[components == k])[0])
        assert abs(float(image[components == k].mean()) - ORGAN_HU[host - 1]) > 20.0


def test_anisotropic_shape_and_errors():
    image, labels = make_phantom(0, shape=(48, 40, 20), spacing=(0.8, 0.8, 2.5), n_organs=6, n_lesions=5)
    assert image.shape == (48, 40, 20) and labels.max() == 7
    assert ndimage.label(labels == 7)[1] == 5
    with pytest.raises(ValueError, match="n_organs"):
        make_phantom(0, n_organs=0)
