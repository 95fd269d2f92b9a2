"""The distribution-test helpers: exact values against hand computations, and teeth: each test
accepts exact samples and rejects a slightly wrong distribution at a fixed seed. The powers
quoted in comments were measured over 30-40 seeds."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from tests.helpers.distributions import (
    chi_square_test,
    energy_distance_permutation_test,
    energy_statistic,
    enumerate_joint,
    ks_per_coordinate,
    pooled_cells,
    sequence_index,
    total_variation,
    tv_sampling_bound,
)

LEVEL = 0.01


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- a tiny AR model


class TinyModel:
    """Next-token probabilities that depend on the whole prefix: its last token, how many 0s it
    holds, and its length, so a sampler that ignores any part of the prefix is wrong."""

    def __init__(self, vocab_size: int, seed: int = 0):
        g = _generator(seed)
        self.vocab_size = vocab_size
        self.start = torch.randn(vocab_size, generator=g, dtype=torch.float64)
        self.after = torch.randn(vocab_size, vocab_size, generator=g, dtype=torch.float64)
        self.zeros = torch.randn(vocab_size, generator=g, dtype=torch.float64)

    def __call__(self, prefixes: torch.Tensor) -> torch.Tensor:
        if prefixes.shape[1] == 0:
            logits = self.start.expand(len(prefixes), -1)
        else:
            zeros = (prefixes == 0).sum(1, keepdim=True).double()
            logits = self.after[prefixes[:, -1]] + zeros * self.zeros + 0.3 * prefixes.shape[1]
        return logits.softmax(-1)

    def sample(self, n: int, length: int, generator: torch.Generator, first_token_shift=0.0):
        """n sequences drawn token by token; `first_token_shift` moves that much probability from
        the most to the least likely first token (a slightly wrong sampler)."""
        sequences = torch.zeros(n, 0, dtype=torch.long)
        for t in range(length):
            probs = self(sequences)
            if t == 0 and first_token_shift:
                probs = probs.clone()
                probs[:, probs[0].argmax()] -= first_token_shift
                probs[:, probs[0].argmin()] += first_token_shift
            drawn = torch.multinomial(probs, 1, generator=generator)
            sequences = torch.cat([sequences, drawn], dim=1)
        return sequences


def test_enumerate_joint_equals_product_of_conditionals():
    model = TinyModel(3)
    joint = enumerate_joint(model, 3, 4)
    assert joint.shape == (3, 3, 3, 3) and joint.dtype == torch.float64
    for sequence in itertools.product(range(3), repeat=4):  # one prefix at a time
        expected = 1.0
        for t, token in enumerate(sequence):
            prefix = torch.tensor([sequence[:t]], dtype=torch.long).reshape(1, t)
            expected *= float(model(prefix)[0, token])
        assert float(joint[sequence]) == pytest.approx(expected, rel=1e-12)
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-12)


def test_enumerate_joint_markov_chain_hand_values_and_full_size():
    start = torch.tensor([0.5, 0.5], dtype=torch.float64)
    transition = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)

    def markov(prefixes):
        return start.expand(len(prefixes), -1) if prefixes.shape[1] == 0 else transition[prefixes[:, -1]]

    joint = enumerate_joint(markov, 2, 3)
    assert float(joint[0, 0, 1]) == pytest.approx(0.5 * 0.9 * 0.1)
    assert float(joint[1, 0, 0]) == pytest.approx(0.5 * 0.2 * 0.9)
    assert float(joint[1, 1, 1]) == pytest.approx(0.5 * 0.8 * 0.8)

    # the largest intended size, 8^6 sequences: the last token's marginal is start @ P^5
    g = _generator(1)
    start8 = torch.rand(8, generator=g, dtype=torch.float64)
    start8 /= start8.sum()
    transition8 = torch.rand(8, 8, generator=g, dtype=torch.float64).softmax(-1)
    joint = enumerate_joint(
        lambda p: start8.expand(len(p), -1) if p.shape[1] == 0 else transition8[p[:, -1]], 8, 6)
    assert joint.shape == (8,) * 6
    last_token = start8 @ torch.linalg.matrix_power(transition8, 5)
    assert torch.allclose(joint.sum(dim=(0, 1, 2, 3, 4)), last_token, rtol=0, atol=1e-12)


def test_sequence_index_is_row_major():
    sequences = np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0], [2, 1, 2]])
    assert sequence_index(sequences, 3).tolist() == [0, 1, 9, 2 * 9 + 3 + 2]
    assert np.ravel_multi_index(tuple(sequences.T), (3, 3, 3)).tolist() == [0, 1, 9, 23]


# --------------------------------------------------------------------------- chi-square


def test_chi_square_hand_values_with_and_without_pooling():
    # expected 50, 30, 15, 5: no pooling, df 3
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    samples = np.repeat(np.arange(4), [52, 28, 15, 5])
    statistic = 2 ** 2 / 50 + 2 ** 2 / 30
    assert chi_square_test(samples, probs) == pytest.approx(stats.chi2.sf(statistic, 3), rel=1e-12)

    # expected 60, 30, 6, 4: the 4 is pooled and still short, so the 6 joins it -> (60, 30, 10)
    probs = np.array([0.06, 0.6, 0.04, 0.3])
    samples = np.repeat(np.arange(4), [7, 55, 5, 33])
    statistic = 5 ** 2 / 60 + 3 ** 2 / 30 + 2 ** 2 / 10
    assert chi_square_test(samples, probs) == pytest.approx(stats.chi2.sf(statistic, 2), rel=1e-12)
    observed, expected = pooled_cells(np.array([7.0, 55, 5, 33]), 100 * probs, 5.0)
    assert observed.tolist() == [12, 33, 55] and expected.tolist() == pytest.approx([10, 30, 60])


def test_chi_square_impossible_sample_and_coordinates():
    probs = torch.tensor([[0.5, 0.0], [0.25, 0.25]], dtype=torch.float64)
    assert chi_square_test(np.array([[0, 0], [0, 1], [1, 1]]), probs) == 0.0  # (0, 1) has p = 0
    g = _generator(3)
    flat = torch.multinomial(probs.reshape(-1), 5000, replacement=True, generator=g)
    coordinates = np.stack(np.unravel_index(flat.numpy(), (2, 2)), axis=1)
    assert chi_square_test(coordinates, probs) == chi_square_test(flat, probs)


def test_chi_square_accepts_exact_and_rejects_two_percent_moved():
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], dtype=torch.float64)
    wrong = probs.clone()
    wrong[0] -= 0.02
    wrong[1] += 0.02
    g = _generator(0)
    exact = torch.multinomial(probs, 20000, replacement=True, generator=g)
    moved = torch.multinomial(wrong, 20000, replacement=True, generator=g)
    assert chi_square_test(exact, probs) > LEVEL
    assert chi_square_test(moved, probs) < LEVEL  # rejected in 40/40 seeds


def test_chi_square_against_the_enumerated_joint_catches_a_sampler_bug():
    model = TinyModel(3, seed=2)
    joint = enumerate_joint(model, 3, 3)
    g = _generator(0)
    good = model.sample(20000, 3, g)
    bad = model.sample(20000, 3, g, first_token_shift=0.02)
    assert chi_square_test(sequence_index(good, 3), joint.reshape(-1)) > LEVEL
    assert chi_square_test(good, joint) == chi_square_test(sequence_index(good, 3), joint.reshape(-1))
    assert chi_square_test(bad, joint) < LEVEL  # in 29/30 seeds (0.03 moved: 30/30)


# --------------------------------------------------------------------------- total variation


def test_total_variation_and_bound_hand_values():
    probs = np.array([0.5, 0.25, 0.25])
    samples = np.repeat(np.arange(3), [6, 2, 2])  # empirical (0.6, 0.2, 0.2)
    assert total_variation(samples, probs) == pytest.approx(0.5 * (0.1 + 0.05 + 0.05))
    assert tv_sampling_bound(10000, 5, 0.05) == pytest.approx(
        0.5 * math.sqrt(4 / 10000) + math.sqrt(math.log(20) / 20000))


def test_tv_bound_holds_for_exact_samples_and_rejects_moved_mass():
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02], dtype=torch.float64)
    # the bound's false-alarm rate: 500 runs of 2000 exact samples, none may exceed more often
    # than alpha allows (it is conservative, so in practice none exceed)
    g = _generator(4)
    runs = torch.multinomial(probs.expand(500, -1), 2000, replacement=True, generator=g)
    bound = tv_sampling_bound(2000, 8, 0.05)
    exceed = np.mean([total_variation(run, probs) > bound for run in runs])
    assert exceed <= 0.05

    wrong = probs.clone()
    wrong[0] -= 0.02
    wrong[1] += 0.02
    bound = tv_sampling_bound(50000, 8, LEVEL)
    exact = torch.multinomial(probs, 50000, replacement=True, generator=g)
    moved = torch.multinomial(wrong, 50000, replacement=True, generator=g)
    assert total_variation(exact, probs) <= bound
    assert total_variation(moved, probs) > bound  # in 40/40 seeds


# --------------------------------------------------------------------------- KS per coordinate


def test_ks_per_coordinate_is_bonferroni_of_scipy():
    g = _generator(5)
    a = torch.randn(300, 3, generator=g, dtype=torch.float64)
    b = torch.randn(200, 3, generator=g, dtype=torch.float64) + 0.1
    two_sample = [stats.ks_2samp(a[:, d], b[:, d]).pvalue for d in range(3)]
    assert ks_per_coordinate(a, b) == pytest.approx(min(1.0, 3 * min(two_sample)))
    one_sample = [stats.kstest(a[:, d], "norm").pvalue for d in range(3)]
    assert ks_per_coordinate(a, stats.norm.cdf) == pytest.approx(min(1.0, 3 * min(one_sample)))


def test_ks_against_a_cdf_rejects_a_005_sigma_shift():
    g = _generator(0)
    exact = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    shifted = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    shifted[:, 1] += 0.05
    assert ks_per_coordinate(exact, stats.norm.cdf) > LEVEL
    assert ks_per_coordinate(shifted, stats.norm.cdf) < LEVEL  # in 40/40 seeds


def test_ks_two_samples_rejects_a_5_percent_scale():
    g = _generator(0)
    reference = torch.randn(50000, 3, generator=g, dtype=torch.float64)
    exact = torch.randn(50000, 3, generator=g, dtype=torch.float64)
    scaled = torch.randn(50000, 3, generator=g, dtype=torch.float64)
    scaled[:, 2] *= 1.05
    assert ks_per_coordinate(exact, reference) > LEVEL
    assert ks_per_coordinate(scaled, reference) < LEVEL  # in 38/40 seeds


# --------------------------------------------------------------------------- energy distance


def test_energy_statistic_matches_scipy():
    g = _generator(6)
    a = torch.randn(300, generator=g, dtype=torch.float64)
    b = torch.randn(200, generator=g, dtype=torch.float64) * 1.3 + 0.2
    assert energy_statistic(a, b) == pytest.approx(stats.energy_distance(a, b) ** 2, rel=1e-10)
    # in D dimensions, against a direct loop over all pairs
    a = torch.randn(20, 3, generator=g, dtype=torch.float64)
    b = torch.randn(15, 3, generator=g, dtype=torch.float64)
    mean_distance = lambda x, y: np.mean([float((u - v).norm()) for u in x for v in y])  # noqa: E731
    expected = 2 * mean_distance(a, b) - mean_distance(a, a) - mean_distance(b, b)
    assert energy_statistic(a, b) == pytest.approx(expected, rel=1e-10)


def test_energy_permutation_test_accepts_exact_and_rejects_a_shift():
    g = _generator(0)
    a = torch.randn(1500, 4, generator=g, dtype=torch.float64)
    b = torch.randn(1500, 4, generator=g, dtype=torch.float64)
    shifted = torch.randn(1500, 4, generator=g, dtype=torch.float64) + 0.1  # 0.2 sigma in norm
    assert energy_distance_permutation_test(a, b, generator=_generator(1)) > LEVEL
    p_shifted = energy_distance_permutation_test(a, shifted, generator=_generator(1))
    assert p_shifted < LEVEL  # in 29/30 seeds (n = 1500 a side, 200 permutations)
    assert p_shifted >= 1 / 201  # the smallest p-value 200 permutations can give
    # the permutations come from the generator: same seed, same p-value
    assert energy_distance_permutation_test(a, b, generator=_generator(1), max_samples=500) == \
        energy_distance_permutation_test(a, b, generator=_generator(1), max_samples=500)
