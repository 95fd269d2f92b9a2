"""InfoMEC: modularity (InfoM), explicitness (InfoE) and compactness (InfoC) of a representation.

A faithful port of kylehkhsu/latent_quantization ``disentangle/metrics/infomec.py`` (Hsu et al.,
"Disentanglement via Latent Quantization", NeurIPS 2023), using the same scikit-learn estimators:

- ``NMI[i, j] = I(s_i; z_j) / H(s_i)``: ``mutual_info_score`` for discrete latents;
  for continuous latents the kNN estimator ``mutual_info_classif(n_neighbors=10)`` on
  standardised latents. Sources are label-encoded.
- Active latents: range > 0 (discrete) or range > max range / 20 (continuous).
- ``InfoM = (mean_{active j} max_i NMI[i, j] / sum_i NMI[i, j] - 1/K) / (1 - 1/K)``, K sources;
  ``InfoC = (mean_i max_{active j} NMI[i, j] / sum_{active j} NMI[i, j] - 1/L) / (1 - 1/L)``, L
  active latents.
- ``InfoE = mean_i (H_null - H_pred) / H_null`` with the cross-entropies of unpenalised
  multinomial logistic regressions (``class_weight="balanced"``, lbfgs, 100 iterations,
  evaluated on the training data) from the latents (one-hot for discrete, standardised for
  continuous) and from a constant input.

Differences from the official file, none of which changes the estimators: ``random_state`` is
passed to ``mutual_info_classif`` (its jitter noise is otherwise unseeded, so repeated calls
differ); unpenalised regression is requested as ``C=inf`` (scikit-learn >= 1.8 deprecates
``penalty=None`` and removed ``multi_class``; lbfgs is multinomial by default).

Requires scikit-learn (imported lazily).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["InfoMEC", "compute_infomec", "compute_nmi", "compute_infoe", "infom_infoc"]


@dataclass
class InfoMEC:
    infom: float
    infoe: float
    infoc: float
    nmi: np.ndarray  # (num_sources, num_latents)
    active_latents: np.ndarray  # (num_latents,) bool


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"expected a (num_samples, num_columns) array, got shape {a.shape}")
    return a


def _label_encode(a: np.ndarray) -> np.ndarray:
    """Column-wise LabelEncoder (np.unique inverse == sklearn's LabelEncoder)."""
    return np.stack([np.unique(a[:, j], return_inverse=True)[1].reshape(-1) for j in range(a.shape[1])], axis=1)


def compute_nmi(sources, latents, discrete_latents: bool, *, n_neighbors: int = 10, random_state: int | None = 0) -> np.ndarray:
    """``NMI[i, j] = I(s_i; z_j) / H(s_i)`` for every source ``i`` and latent ``j``."""
    from sklearn import feature_selection, metrics

    sources, latents = _as_numpy(sources), _as_numpy(latents)
    s = _label_encode(sources)
    if discrete_latents:
        z = _label_encode(latents)
    else:
        z = latents.astype(np.float64)
        std = z.std(axis=0)
        z = (z - z.mean(axis=0)) / np.where(std == 0, 1.0, std)  # == StandardScaler
    nmi = np.empty((s.shape[1], z.shape[1]))
    for i in range(s.shape[1]):
        for j in range(z.shape[1]):
            if discrete_latents:
                nmi[i, j] = metrics.mutual_info_score(s[:, i], z[:, j])
            else:
                nmi[i, j] = feature_selection.mutual_info_classif(
                    z[:, j][:, None], s[:, i], discrete_features=False, n_neighbors=n_neighbors,
                    random_state=random_state,
                )[0]
        nmi[i, :] /= metrics.mutual_info_score(s[:, i], s[:, i])
    return nmi


def active_latents(latents, discrete_latents: bool) -> np.ndarray:
    latents = _as_numpy(latents)
    ranges = latents.max(axis=0) - latents.min(axis=0)
    return ranges > 0 if discrete_latents else ranges > ranges.max() / 20


def infom_infoc(nmi: np.ndarray, active: np.ndarray) -> tuple[float, float]:
    """InfoM and InfoC from an NMI matrix (sources x latents) and the active-latent mask."""
    num_sources = nmi.shape[0]
    num_active = int(active.sum())
    pruned = nmi[:, active]
    infom = (np.mean(pruned.max(axis=0) / pruned.sum(axis=0)) - 1 / num_sources) / (1 - 1 / num_sources)
    infoc = (np.mean(pruned.max(axis=1) / pruned.sum(axis=1)) - 1 / num_active) / (1 - 1 / num_active)
    return float(infom), float(infoc)


def _logistic_cross_entropy(x: np.ndarray, y: np.ndarray) -> float:
    from sklearn import linear_model, metrics

    model = linear_model.LogisticRegression(
        C=np.inf, tol=1e-4, fit_intercept=True, class_weight="balanced", solver="lbfgs", max_iter=100
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs ConvergenceWarning at max_iter=100, as in the official runs
        model.fit(x, y)
    return float(metrics.log_loss(y, model.predict_proba(x), labels=model.classes_))


def compute_infoe(sources, latents, discrete_latents: bool) -> float:
    """Mean over sources of the normalised predictive information of a linear probe."""
    from sklearn import preprocessing

    sources, latents = _as_numpy(sources), _as_numpy(latents)
    s = _label_encode(sources)
    if discrete_latents:
        x = preprocessing.OneHotEncoder().fit_transform(latents)
    else:
        x = preprocessing.StandardScaler().fit_transform(latents.astype(np.float64))
    null = np.zeros(latents.shape, dtype=np.float64)
    scores = []
    for i in range(s.shape[1]):
        h_pred = _logistic_cross_entropy(x, s[:, i])
        h_null = _logistic_cross_entropy(null, s[:, i])
        scores.append((h_null - h_pred) / h_null)
    return float(np.mean(scores))


def compute_infomec(sources, latents, discrete_latents: bool, *, random_state: int | None = 0) -> InfoMEC:
    """InfoM, InfoE, InfoC of ``latents`` (N, L) with respect to integer ``sources`` (N, K)."""
    sources, latents = _as_numpy(sources), _as_numpy(latents)
    if sources.shape[0] != latents.shape[0]:
        raise ValueError(f"sources and latents disagree on the number of samples: {sources.shape[0]} vs {latents.shape[0]}")
    nmi = compute_nmi(sources, latents, discrete_latents, random_state=random_state)
    active = active_latents(latents, discrete_latents)
    infom, infoc = infom_infoc(nmi, active)
    infoe = compute_infoe(sources, latents, discrete_latents)
    return InfoMEC(infom=infom, infoe=infoe, infoc=infoc, nmi=nmi, active_latents=active)
