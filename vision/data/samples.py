"""Real photographs carried by installed wheels (no download): scikit-image, scikit-learn, matplotlib."""
from __future__ import annotations

import importlib.util
from pathlib import Path

# Natural photographs only (no charts, logos, synthetic test patterns). Colour first, then greyscale.
_PHOTOS = {
    "skimage": ["data/astronaut.png", "data/chelsea.png", "data/coffee.png", "data/rocket.jpg",
                "data/motorcycle_left.png", "data/motorcycle_right.png", "data/hubble_deep_field.jpg",
                "data/retina.jpg", "data/ihc.png", "data/camera.png", "data/coins.png", "data/moon.png",
                "data/brick.png", "data/grass.png", "data/gravel.png"],
    "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
    "matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
}


def _package_dir(name: str) -> Path | None:
    """Locate an installed package's folder without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_photos() -> list[Path]:
    """Paths of the real photos found, in a fixed order (the same on every machine with the same wheels)."""
    found = []
    for package, files in _PHOTOS.items():
        root = _package_dir(package)
        if root is None:
            continue
        found += [root / f for f in files if (root / f).is_file()]
    return found


def sample_photo(name: str) -> Path:
    """One photo by stem, e.g. sample_photo('astronaut')."""
    for p in sample_photos():
        if p.stem == name:
            return p
    raise FileNotFoundError(f"no sample photo named {name!r}; have {[p.stem for p in sample_photos()]}")


# Held out of every training run on the sample photos, for validation. The motorcycle stereo
# pair stays together on the training side so no near-duplicate straddles the split.
HELD_OUT = ("chelsea", "coffee", "flower", "grace_hopper")


def split_photos() -> tuple[list[Path], list[Path]]:
    """(train, held_out) sample photos."""
    photos = sample_photos()
    return [p for p in photos if p.stem not in HELD_OUT], [p for p in photos if p.stem in HELD_OUT]
