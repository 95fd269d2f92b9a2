"""score_digits: the held-out digits score FD 0 and the classifier's recorded accuracy, real digits score a small
FD, noise and wrong labels score a large FD / chance accuracy, the features are the classifier's own, and the
figures are those apps.evaluate gives on the saved PNGs."""
import numpy as np
import pytest
import torch
from PIL import Image

from vision import hub
from vision.data import to_uint8
from vision.data.mnist import mnist5k_split
from vision.metrics import classify_folder, fid_from_folders, heldout_digits, reference_statistics, score_digits
from vision.metrics.classifier import MNISTClassifier, MNISTClassifierConfig
from vision.metrics.digits import REFERENCE_BATCH
from vision.metrics.fid import fid_from_features

SHIPPED = "mnist-classifier" in hub.read_index()
shipped_only = pytest.mark.skipif(not SHIPPED, reason="mnist-classifier not shipped in weights/")


@pytest.fixture(scope="module")
def small_clf(tmp_path_factory):
    """A small random classifier saved with save_pretrained (no shipped weights needed)."""
    torch.manual_seed(0)
    model = MNISTClassifier(MNISTClassifierConfig(widths=(8, 16), feature_dim=12)).eval()
    path = tmp_path_factory.mktemp("clf") / "model"
    hub.save_pretrained(model, path)
    return path, model


def _generated_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out digits with noise added, as float in [-1, 1] (values outside are clamped like a decoder's)."""
    x, y = heldout_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:n]
    images = x[idx].float() / 127.5 - 1 + 0.3 * torch.randn(n, 1, 32, 32, generator=g)
    return images, y[idx]


def test_heldout_split_is_the_classifiers():
    x, y = heldout_digits()
    (_, _), (xs, ys) = mnist5k_split()
    assert x.shape == (1000, 1, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], xs) and torch.equal(y, ys) and torch.bincount(y).tolist() == [100] * 10


def test_features_are_the_classifiers_own(small_clf):
    path, model = small_clf
    x, _ = heldout_digits()
    ref = reference_statistics(path)
    with torch.no_grad():
        feats = torch.cat([model.features(x[i:i + REFERENCE_BATCH]) for i in range(0, 1000, REFERENCE_BATCH)])
    f64 = feats.double().numpy()
    assert ref.n == 1000 and ref.mu.shape == (12,)
    np.testing.assert_allclose(ref.mu.numpy(), f64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref.sigma.numpy(), np.cov(f64, rowvar=False), rtol=1e-9, atol=1e-12)
    assert reference_statistics(path) is ref  # computed once per process

    images, labels = _generated_like(50, seed=1)
    got = score_digits(images, labels, classifier=path, batch_size=16)
    pixels = to_uint8(images)  # generated floats are scored as the 8-bit images they would be saved as
    with torch.no_grad():
        fake = torch.cat([model.features(pixels[i:i + 16]) for i in range(0, 50, 16)])
        pred = model(pixels).argmax(1)
    assert got["fd"] == pytest.approx(fid_from_features(feats, fake), rel=1e-9)
    assert got["accuracy"] == (pred == labels).double().mean().item()


def test_same_figures_as_apps_evaluate_on_the_saved_pngs(small_clf, tmp_path):
    path, _ = small_clf
    real = tmp_path / "real"
    real.mkdir()
    for i, img in enumerate(heldout_digits()[0]):
        Image.fromarray(img[0].numpy()).save(real / f"{i:04d}.png")
    images, labels = _generated_like(40, seed=2)
    for i, (img, c) in enumerate(zip(to_uint8(images), labels)):
        (tmp_path / "gen" / str(int(c))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(tmp_path / "gen" / str(int(c)) / f"{i:03d}.png")
    got = score_digits(images, labels, classifier=path)
    fid = fid_from_folders(real, tmp_path / "gen", features=path)
    # the folder sorts the digits by class, so labels follow the file order there
    classified = classify_folder(tmp_path / "gen", classifier=path, labels_from_folder_names=True)
    assert fid["n_real"] == 1000 and fid["n_fake"] == 40
    assert got["fd"] == pytest.approx(fid["fid"], rel=1e-6)
    assert got["accuracy"] == pytest.approx(classified["accuracy"], abs=1e-12)


@shipped_only
def test_heldout_digits_score_zero_and_the_recorded_accuracy():
    x, y = heldout_digits()
    recorded = hub.read_index()["mnist-classifier"]["metrics"]["heldout_accuracy"]
    got = score_digits(x, y)
    assert abs(got["fd"]) < 1e-6 and got["accuracy"] == pytest.approx(recorded, abs=1e-12)
    part = score_digits(x[::5], y[::5])
    assert score_digits(x[::5].float() / 127.5 - 1, y[::5]) == part  # [-1, 1] floats of the same pixels
    assert score_digits(x[::5].expand(-1, 3, -1, -1), y[::5]) == part  # R = G = B, as saved digits are read


@shipped_only
def test_real_digits_score_low_noise_and_wrong_labels_score_badly():
    (xt, yt), _ = mnist5k_split()
    real = score_digits(xt[::8, None], yt[::8])  # 500 training digits: other digits of the same distribution
    assert 0 < real["fd"] < 40 and real["accuracy"] > 0.97  # measured 20.7 and 1.0
    g = torch.Generator().manual_seed(0)
    noise = score_digits(torch.rand(500, 1, 32, 32, generator=g) * 2 - 1, yt[::8])
    assert noise["fd"] > 100 * real["fd"]  # measured 8500
    x, y = heldout_digits()
    random_labels = score_digits(x, torch.randint(0, 10, (1000,), generator=g))
    # labels independent of the predictions: accuracy ~ Binomial(1000, 0.1) / 1000, sd 0.0095
    assert abs(random_labels["accuracy"] - 0.1) < 0.04 and abs(random_labels["fd"]) < 1e-6
    assert score_digits(x[::2], (y[::2] + 1) % 10)["accuracy"] < 0.03  # every label wrong but for misclassified digits


def test_bad_inputs_are_refused(small_clf):
    path, _ = small_clf
    images, labels = _generated_like(4, seed=0)
    with pytest.raises(ValueError, match="labels must be"):
        score_digits(images, labels[:3], classifier=path)
    with pytest.raises(ValueError, match="class ids in 0..9"):
        score_digits(images, labels + 10, classifier=path)
    with pytest.raises(ValueError, match="at least 2"):
        score_digits(images[:1], labels[:1], classifier=path)
    with pytest.raises(ValueError, match="digit images"):
        score_digits(images.expand(-1, 2, -1, -1), labels, classifier=path)
