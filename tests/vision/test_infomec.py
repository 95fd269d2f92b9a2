"""InfoMEC (InfoM, InfoE, InfoC) on hand-built representations."""
import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from vision.metrics.infomec import active_latents, compute_infoe, compute_infomec, compute_nmi, infom_infoc  # noqa: E402

SIZES = (3, 4, 5)


def _factorial(repeats: int = 2) -> np.ndarray:
    """Every combination of the sources equally often: empirically independent sources."""
    grid = np.array(list(itertools.product(*[range(k) for k in SIZES])))
    return np.tile(grid, (repeats, 1))


def _plugin_mi(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats from the empirical joint distribution, written out directly."""
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def test_perfectly_disentangled_code_scores_one():
    s = _factorial()
    m = compute_infomec(s, s.astype(np.float64) * 0.1 - 0.3, discrete_latents=True)
    np.testing.assert_allclose(m.nmi, np.eye(3), atol=1e-12)
    assert m.infom == pytest.approx(1.0, abs=1e-12)
    assert m.infoc == pytest.approx(1.0, abs=1e-12)
    assert m.infoe > 0.99  # one-hot latents predict every source almost perfectly
    assert m.active_latents.all()


def test_entangled_code_matches_hand_computation():
    s = _factorial()
    # z0 merges sources 0 and 1, z1 = source 2, z2 duplicates source 0
    z = np.stack([s[:, 0] * 4 + s[:, 1], s[:, 2], s[:, 0]], axis=1)
    m = compute_infomec(torch.from_numpy(s), torch.from_numpy(z).float(), discrete_latents=True)
    np.testing.assert_allclose(m.nmi, [[1, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-12)
    # InfoM: latents prefer (1/2, 1, 1) -> (5/6 - 1/3) / (2/3) = 3/4; InfoC: sources (1/2, 1, 1) -> same
    assert m.infom == pytest.approx(0.75, abs=1e-12)
    assert m.infoc == pytest.approx(0.75, abs=1e-12)


def test_nmi_and_scores_match_direct_recomputation():
    rng = np.random.default_rng(0)
    s = np.stack([rng.integers(0, k, 500) for k in SIZES], axis=1)
    z = np.stack([s[:, 0] + 3 * rng.integers(0, 2, 500), (s[:, 1] + s[:, 2]) % 4, rng.integers(0, 3, 500)], axis=1)
    nmi = compute_nmi(s, z, discrete_latents=True)
    direct = np.array([[_plugin_mi(s[:, i], z[:, j]) / _plugin_mi(s[:, i], s[:, i]) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(nmi, direct, rtol=1e-10, atol=1e-12)
    infom, infoc = infom_infoc(nmi, np.ones(3, dtype=bool))
    k = l = 3
    assert infom == pytest.approx((np.mean(direct.max(0) / direct.sum(0)) - 1 / k) / (1 - 1 / k), abs=1e-10)
    assert infoc == pytest.approx((np.mean(direct.max(1) / direct.sum(1)) - 1 / l) / (1 - 1 / l), abs=1e-10)


def test_continuous_latents_knn_estimator_and_active_rule():
    from sklearn.feature_selection import mutual_info_classif
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    s = np.stack([rng.integers(0, k, 400) for k in SIZES], axis=1)
    clean = s + rng.normal(0, 0.1, s.shape)
    z = np.concatenate([clean, np.full((400, 1), 2.0), 0.01 * rng.normal(size=(400, 1))], axis=1)
    m = compute_infomec(s, z, discrete_latents=False)
    assert m.active_latents.tolist() == [True, True, True, False, False]  # range <= max range / 20
    assert m.infom > 0.95 and m.infoc > 0.95
    # one entry by hand: kNN MI (k = 10) of the standardised latent, over H(source)
    zj = (z[:, 1] - z[:, 1].mean()) / z[:, 1].std()
    mi = mutual_info_classif(zj[:, None], s[:, 1], discrete_features=False, n_neighbors=10, random_state=0)[0]
    assert m.nmi[1, 1] == pytest.approx(mi / mutual_info_score(s[:, 1], s[:, 1]), rel=1e-12)
    # rotating the code mixes the sources into every latent: lower modularity
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    mixed = (clean - clean.mean(0)) @ q
    mixed_infom, _ = infom_infoc(compute_nmi(s, mixed, discrete_latents=False), np.ones(3, dtype=bool))
    assert mixed_infom < m.infom - 0.3


def test_infoe_bounds():
    s = _factorial()
    assert compute_infoe(s, np.zeros((len(s), 2)), discrete_latents=False) == pytest.approx(0.0, abs=1e-6)
    only_first = compute_infoe(s, s[:, :1].astype(np.float64), discrete_latents=True)
    assert only_first == pytest.approx(1 / 3, abs=0.01)  # one of three sources explained


def test_active_rule_discrete():
    z = np.array([[0, 1], [0, 2], [0, 1]])
    assert active_latents(z, discrete_latents=True).tolist() == [False, True]
