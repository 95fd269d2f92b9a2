"""Distribution tests for samplers.

A sampler that claims to be lossless (speculative decoding, a cached or reordered sampler) must
produce the same distribution as the plain one. These helpers check that statistically:

* discrete: `enumerate_joint` computes the exact joint distribution of a tiny autoregressive
  model; `chi_square_test` and `total_variation` / `tv_sampling_bound` compare samples with it;
* continuous: `ks_per_coordinate` (Kolmogorov-Smirnov per coordinate, Bonferroni-corrected)
  and `energy_distance_permutation_test` (a multivariate two-sample test).

All p-values are for the null hypothesis "the samples come from that distribution"; a test
rejects when the p-value is below its level (the tests here use 0.01).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from scipy import stats
from torch import Tensor

MAX_JOINT_CELLS = 1 << 22  # 8^6 = 262,144 sequences fit comfortably; 4M cells is the ceiling


def _numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- discrete


def enumerate_joint(prob_fn: Callable[[Tensor], Tensor], vocab_size: int, length: int) -> Tensor:
    """Exact joint probabilities of every sequence of a tiny autoregressive model.

    `prob_fn(prefixes)` takes a LongTensor (B, t) holding B prefixes of length t (t = 0 gives
    shape (1, 0)) and returns their next-token probabilities (B, vocab_size). It is called once
    per position with all V^t prefixes at once. Returns a float64 tensor of shape
    (vocab_size,) * length: `joint[x0, x1, ...]` is the probability of that sequence. Flatten it
    with `.reshape(-1)` to index sequences by `sequence_index`.
    """
    if vocab_size ** length > MAX_JOINT_CELLS:
        raise ValueError(f"{vocab_size}^{length} sequences is too many to enumerate")
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = torch.zeros(1, 0, dtype=torch.long)
    for t in range(length):
        probs = torch.as_tensor(prob_fn(prefixes)).detach().to("cpu", torch.float64)
        if probs.shape != (len(prefixes), vocab_size):
            raise ValueError(f"prob_fn returned shape {tuple(probs.shape)}, "
                             f"expected {(len(prefixes), vocab_size)}")
        if (probs < 0).any() or not torch.allclose(probs.sum(-1), torch.ones(()).double(), atol=1e-5):
            raise ValueError("prob_fn must return probabilities that sum to 1 over the last dimension")
        probs = probs / probs.sum(-1, keepdim=True)
        joint = (joint[:, None] * probs).reshape(-1)
        next_tokens = torch.arange(vocab_size).repeat(len(prefixes))[:, None]
        prefixes = torch.cat([prefixes.repeat_interleave(vocab_size, dim=0), next_tokens], dim=1)
    return joint.reshape((vocab_size,) * length)


def sequence_index(sequences, vocab_size: int) -> np.ndarray:
    """Row-major index of each sequence (n, L) in a flattened `enumerate_joint` result."""
    sequences = _numpy(sequences).astype(np.int64)
    weights = vocab_size ** np.arange(sequences.shape[1] - 1, -1, -1, dtype=np.int64)
    return sequences @ weights


def _cell_counts(samples, probs) -> tuple[np.ndarray, np.ndarray]:
    """(observed counts, flat probabilities). `samples` holds flat cell indices (n,) or
    coordinates (n, probs.ndim) into `probs`."""
    probs = _numpy(probs).astype(np.float64)
    samples = _numpy(samples).astype(np.int64)
    if samples.ndim == 2 and probs.ndim == samples.shape[1]:
        samples = np.ravel_multi_index(tuple(samples.T), probs.shape)
    samples = samples.reshape(-1)
    flat = probs.reshape(-1)
    if abs(flat.sum() - 1.0) > 1e-6 or (flat < 0).any():
        raise ValueError(f"probs must be a distribution (sum {flat.sum()})")
    if samples.size and (samples.min() < 0 or samples.max() >= flat.size):
        raise ValueError("samples fall outside the cells of probs")
    return np.bincount(samples, minlength=flat.size).astype(np.float64), flat / flat.sum()


def pooled_cells(observed: np.ndarray, expected: np.ndarray, min_expected: float):
    """Pools cells whose expected count is below `min_expected` into one cell, and merges the
    smallest remaining cells into it until the pool reaches min_expected too (the usual rule
    of thumb for the chi-square approximation). Cells of probability 0 are dropped."""
    live = expected > 0
    observed, expected = observed[live], expected[live]
    order = np.argsort(expected, kind="stable")
    observed, expected = observed[order], expected[order]
    small = int(np.searchsorted(expected, min_expected, side="left"))  # cells below the rule
    if small == 0:
        return observed, expected
    cut = small
    while expected[:cut].sum() < min_expected and cut < len(expected):
        cut += 1
    return (np.concatenate([[observed[:cut].sum()], observed[cut:]]),
            np.concatenate([[expected[:cut].sum()], expected[cut:]]))


def chi_square_test(samples, probs, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness-of-fit p-value of `samples` against the distribution `probs`.

    Sparse cells are pooled (`pooled_cells`) so every cell expects at least `min_expected`
    samples; the degrees of freedom are the number of pooled cells minus 1. A sample in a cell
    of probability 0 is impossible under the null and gives p = 0.
    """
    observed, flat = _cell_counts(samples, probs)
    if observed[flat == 0].any():
        return 0.0
    n = observed.sum()
    observed, expected = pooled_cells(observed, n * flat, min_expected)
    if len(observed) < 2:
        return 1.0  # one cell holds everything: nothing to test
    return float(stats.chisquare(observed, expected).pvalue)


def total_variation(samples, probs) -> float:
    """Total variation distance 0.5 sum |p_hat - p| between the empirical distribution of
    `samples` (cell indices or coordinates, as in `chi_square_test`) and `probs`."""
    observed, flat = _cell_counts(samples, probs)
    return float(0.5 * np.abs(observed / observed.sum() - flat).sum())


def tv_sampling_bound(n: int, k: int, alpha: float = 0.01) -> float:
    """A bound b with P(TV(p_hat, p) > b) <= alpha for the empirical distribution p_hat of n
    exact samples from any p over k cells:

        b = 0.5 sqrt((k - 1) / n) + sqrt(log(1 / alpha) / (2 n)).

    First term: E TV = 0.5 sum E|p_hat_i - p_i| <= 0.5 sum sqrt(p_i (1 - p_i) / n)
    <= 0.5 sqrt(k sum p_i (1 - p_i) / n) <= 0.5 sqrt((k - 1) / n) (Jensen, then Cauchy-Schwarz,
    then sum p_i^2 >= 1/k). Second term: changing one sample moves TV by at most 1/n, so
    McDiarmid's inequality gives P(TV - E TV >= t) <= exp(-2 n t^2). The bound is conservative:
    its real false-alarm rate is far below alpha.
    """
    if n <= 0 or k <= 0 or not 0 < alpha < 1:
        raise ValueError("need n > 0, k > 0 and 0 < alpha < 1")
    return 0.5 * math.sqrt((k - 1) / n) + math.sqrt(math.log(1 / alpha) / (2 * n))


# --------------------------------------------------------------------------- continuous


def _samples_2d(x) -> np.ndarray:
    x = _numpy(x).astype(np.float64)
    return x[:, None] if x.ndim == 1 else x.reshape(len(x), -1)


def ks_per_coordinate(samples_a, samples_b_or_cdf) -> float:
    """Kolmogorov-Smirnov test of each coordinate, combined with Bonferroni: returns
    min(1, D * min_d p_d) for D coordinates.

    `samples_a` is (n, D) (or (n,)). The reference is either samples (m, D), compared with the
    two-sample test, or a CDF: a callable mapping the (n, D) array to its (n, D) CDF values
    coordinate by coordinate (e.g. `scipy.stats.norm(mu, sigma).cdf`, broadcasting mu and sigma
    of shape (D,)), compared with the one-sample test on the transformed values.
    """
    a = _samples_2d(samples_a)
    if callable(samples_b_or_cdf):
        uniform = np.asarray(samples_b_or_cdf(a), dtype=np.float64).reshape(a.shape)
        p_values = [stats.kstest(uniform[:, d], "uniform").pvalue for d in range(a.shape[1])]
    else:
        b = _samples_2d(samples_b_or_cdf)
        if b.shape[1] != a.shape[1]:
            raise ValueError(f"samples have {a.shape[1]} and {b.shape[1]} coordinates")
        p_values = [stats.ks_2samp(a[:, d], b[:, d]).pvalue for d in range(a.shape[1])]
    return float(min(1.0, a.shape[1] * min(p_values)))


def _pairwise(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def energy_statistic(a, b) -> float:
    """The squared energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between the empirical
    distributions of a (n, D) and b (m, D), averages over all pairs (zero diagonal included, as
    scipy.stats.energy_distance, which returns its square root for D = 1)."""
    a = torch.as_tensor(_samples_2d(a))
    b = torch.as_tensor(_samples_2d(b))
    return float(2 * _pairwise(a, b).mean() - _pairwise(a, a).mean() - _pairwise(b, b).mean())


def energy_distance_permutation_test(a, b, *, generator: torch.Generator, permutations: int = 200,
                                     max_samples: int | None = None) -> float:
    """Two-sample energy-distance test (Szekely & Rizzo): p-value of `energy_statistic(a, b)`
    under the permutation null, `(1 + #{permuted >= observed}) / (1 + permutations)`.

    The pooled distance matrix is computed once; every permutation reuses it through
    s^T D s for its group indicator s (one matrix product for all permutations), so the cost is
    O(N^2 (D + permutations)) for N = n + m points. `max_samples` caps each side by a random
    subsample (drawn from `generator`, as are the permutations) to bound that cost.
    """
    a = torch.as_tensor(_samples_2d(a))
    b = torch.as_tensor(_samples_2d(b))
    if max_samples is not None:
        a = a[torch.randperm(len(a), generator=generator)[:max_samples]]
        b = b[torch.randperm(len(b), generator=generator)[:max_samples]]
    n, m = len(a), len(b)
    pooled = torch.cat([a, b])
    distances = _pairwise(pooled, pooled)
    row_sums = distances.sum(dim=1)
    total = row_sums.sum()

    observed = torch.cat([torch.ones(n), torch.zeros(m)]).double()
    shuffles = torch.rand(permutations, n + m, generator=generator).argsort(dim=1)
    labels = torch.cat([observed[None], observed[shuffles]])  # row 0: the real split
    within_a = ((labels @ distances) * labels).sum(dim=1)  # s^T D s
    a_to_all = labels @ row_sums  # s^T D 1
    between = a_to_all - within_a
    within_b = total - 2 * a_to_all + within_a
    energy = 2 * between / (n * m) - within_a / n ** 2 - within_b / m ** 2
    return (1 + int((energy[1:] >= energy[0]).sum())) / (1 + permutations)
