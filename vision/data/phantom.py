"""Seeded synthetic CT-like phantom volumes: a body, several organs and tiny lesions, with labels.

The phantom is a stand-in for abdominal CT when no real data may be downloaded: an elliptic
body of soft tissue (~40 HU, with a rim of fat at ~-100 HU) in air (-1000 HU); ``n_organs``
non-overlapping ellipsoidal organs, each with its own mean attenuation; ``n_lesions`` spheres of
radius 1-2 voxels (7-33 voxels) inside organs, hypo- or hyper-attenuating relative to their host.
Gaussian noise (sigma 12 HU) is added. Sizes are chosen in millimetres and converted with
``spacing``, so anisotropic voxels give flatter structures in voxel space, as in real scans.

Labels: 0 background (air and body tissue), ``1..n_organs`` organs, ``n_organs + 1`` lesions.
Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same volume.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["make_phantom", "ORGAN_HU"]

# Mean attenuation (HU) per organ slot, loosely liver, spleen, kidney, pancreas, ... ; distinct by >= 15 HU.
ORGAN_HU = (60.0, 100.0, 150.0, 20.0, 180.0, -20.0, 210.0, 130.0)


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid; ``grid`` holds world (mm) coordinates per axis."""
    d = [g - c for g, c in zip(grid, centre)]
    inside = 0.0
    for k in range(3):
        proj = rotation[0, k] * d[0] + rotation[1, k] * d[1] + rotation[2, k] * d[2]
        inside = inside + (proj / radii[k]) ** 2
    return inside <= 1.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def make_phantom(seed: int, shape: tuple[int, int, int] = (64, 64, 48),
                 spacing: tuple[float, float, float] = (1.5, 1.5, 3.0), n_organs: int = 4,
                 n_lesions: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image float32 HU, labels uint8)``, both of ``shape``, deterministic in ``seed``."""
    if n_organs < 1 or n_organs > len(ORGAN_HU):
        raise ValueError(f"n_organs must be between 1 and {len(ORGAN_HU)}, got {n_organs}")
    if n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * sp
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, sp)], indexing="ij", sparse=True)
    centre = extent / 2

    image = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body_radii = extent * np.array([0.45, 0.38, 0.6]) * rng.uniform(0.92, 1.0, 3)
    body_radii[2] = max(body_radii[2], extent[2])  # the body runs through the whole scan length
    body = _ellipsoid(grid, centre, body_radii, np.eye(3))
    rim = min(6.0, 0.15 * float(min(body_radii[:2])))
    inner = _ellipsoid(grid, centre, body_radii - np.array([rim, rim, 0.0]), np.eye(3))
    image[body] = -100.0  # subcutaneous fat
    image[inner] = 40.0  # soft tissue

    # Organs: rejection-sample ellipsoids inside the body that do not overlap.
    organ_masks = []
    scale = float(min(body_radii[:2]))
    for organ in range(n_organs):
        for _attempt in range(400):
            radii = np.maximum(scale * rng.uniform(0.22, 0.45, 3), 2.0 * sp)  # at least ~4 voxels across
            c = centre + rng.uniform(-0.55, 0.55, 3) * np.maximum(np.minimum(body_radii, centre) - radii, 0.0)
            mask = _ellipsoid(grid, c, radii, _random_rotation(rng))
            if mask.sum() >= 20 and not (mask & ~inner).any() and not (labels[mask] > 0).any():
                break
            scale *= 0.99  # shrink slowly when space runs out
        else:
            raise ValueError(f"could not place {n_organs} organs in a volume of shape {shape}; "
                             "use fewer organs or a larger shape")
        labels[mask] = organ + 1
        image[mask] = ORGAN_HU[organ]
        organ_masks.append(mask)

    # Lesions: spheres of radius 1-2 voxels (in voxel units) lying inside one organ, with a one-voxel
    # shell clear of other lesions so that every lesion is its own connected component.
    lesion = n_organs + 1
    for _ in range(n_lesions):
        for radius in (float(rng.uniform(1.0, 2.0)), 1.0):
            r = int(np.floor(radius + 1.0))
            offsets = np.indices((2 * r + 1,) * 3).reshape(3, -1).T - r
            sphere = offsets[(offsets**2).sum(1) <= radius**2]
            ball = np.zeros((2 * r + 1,) * 3, dtype=bool)
            ball[tuple((sphere + r).T)] = True
            shell = np.zeros_like(ball)
            shell[tuple((offsets[(offsets**2).sum(1) <= (radius + 1.0) ** 2] + r).T)] = True
            clear = ~ndimage.binary_dilation(labels == lesion, structure=shell)
            hosts = [ndimage.binary_erosion(labels == k + 1, structure=ball) & clear for k in range(n_organs)]
            usable = [k for k in range(n_organs) if hosts[k].any()]
            if usable:
                break
        else:
            raise ValueError(f"no room for {n_lesions} lesions in the organs of a {shape} phantom; "
                             "use fewer lesions or a larger shape")
        organ = usable[int(rng.integers(len(usable)))]
        candidates = np.argwhere(hosts[organ])
        c = candidates[int(rng.integers(len(candidates)))]
        vox = tuple((sphere + c).T)
        labels[vox] = lesion
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(40.0, 70.0)
        image[vox] = ORGAN_HU[organ] + contrast

    image += rng.normal(0.0, 12.0, shape).astype(np.float32)
    return image.astype(np.float32), labels
