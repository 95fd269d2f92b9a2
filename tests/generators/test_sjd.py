"""Speculative Jacobi decoding is lossless: its samples follow the exact joint distribution of a tiny
LlamaGen GPT (enumerated), with and without top-k, top-p and CFG; a wrong acceptance rule fails the
same test; greedy SJD equals greedy autoregressive decoding token for token."""
import pytest
import torch

from generators.ar.model import LlamaGenConfig, LlamaGenGPT
from generators.ar.plain import guided_probabilities
from generators.ar.speculative_jacobi import INITS, speculative_jacobi
from tests.helpers.distributions import (chi_square_test, enumerate_joint, sequence_index, total_variation,
                                         tv_sampling_bound)
from vision.hub import read_index
from vision.tokens import GenerationStats

VOCAB, GRID, LABEL, N = 4, 2, 1, 20000  # 4^4 = 256 sequences


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = LlamaGenGPT(LlamaGenConfig(num_classes=3, vocab_size=VOCAB, grid=GRID, dim=16, n_layer=1, n_head=2,
                                       ffn_hidden=32)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # LlamaGen's init zeroes the head
    return model


def exact_joint(model, opts):
    """The joint distribution of the 4 tokens under plain sampling, every prefix through the uncached model."""
    def next_token(prefixes):
        labels = torch.full((len(prefixes),), LABEL)
        logits = model(labels, prefixes)[:, -1]
        if opts["cfg"] > 1:
            logits = torch.cat([logits, model(torch.full_like(labels, model.null_class), prefixes)[:, -1]])
        return guided_probabilities(logits, **opts)

    with torch.no_grad():
        return enumerate_joint(next_token, VOCAB, GRID * GRID).reshape(-1)


def sjd_samples(model, opts, init, seed=0, **kw):
    stats = GenerationStats()
    with torch.no_grad():
        tokens = speculative_jacobi(model, torch.full((N,), LABEL), generator=torch.Generator().manual_seed(seed),
                                    stats=stats, batch_size=N, window=3, init=init, **opts, **kw)
    return sequence_index(tokens.ids.flatten(1), VOCAB), stats


def fits(samples, joint) -> bool:
    return (chi_square_test(samples, joint) > 0.01
            and total_variation(samples, joint) <= tv_sampling_bound(N, int((joint > 0).sum())))


CASES = {  # sampling options, and the draft initialisation each case exercises
    "temperature-1": (dict(cfg=1.0, temperature=1.0, top_k=0, top_p=1.0), "random"),
    "top-k": (dict(cfg=1.0, temperature=1.0, top_k=3, top_p=1.0), "repeat_horizon"),
    "top-p": (dict(cfg=1.0, temperature=1.0, top_k=0, top_p=0.9), "sample_vertical"),
    "cfg": (dict(cfg=3.0, temperature=1.0, top_k=0, top_p=1.0), "repeat_vertical"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sjd_matches_the_exact_joint_distribution(tiny, case):
    opts, init = CASES[case]
    joint = exact_joint(tiny, opts)
    samples, stats = sjd_samples(tiny, opts, init)
    assert fits(samples, joint), (chi_square_test(samples, joint), total_variation(samples, joint))
    # several tokens per forward pass happen: the test exercises acceptance, not only plain steps
    assert stats.mean_accepted > 1.1 and max(stats.accepted_per_iter) == 3
    assert sum(stats.accepted_per_iter) == N * GRID * GRID


@pytest.mark.parametrize("case", ["temperature-1", "cfg"])
def test_a_wrong_acceptance_rule_fails_the_same_test(tiny, case):
    """min(1, p(x)) ignores the draft's q: right for fresh one-hot drafts, wrong for the Jacobi drafts."""
    opts, init = CASES[case]
    samples, _ = sjd_samples(tiny, opts, init, accept=lambda p_x, q_x: p_x.clamp(max=1.0))
    assert not fits(samples, exact_joint(tiny, opts))


def _greedy_equal(model, labels, cfg, inits=INITS, windows=(1, 3, 16)):
    plain, plain_stats = model.generate(labels, cfg=cfg, top_k=1)
    assert plain_stats.nfe == model.seq_len
    for init in inits:
        for window in windows:
            sjd, stats = model.generate(labels, sampler="sjd", cfg=cfg, top_k=1, window=window, init=init)
            assert torch.equal(sjd.ids, plain.ids), (init, window)
            assert stats.nfe <= model.seq_len and sum(stats.accepted_per_iter) == len(labels) * model.seq_len
            if window == 1:
                assert stats.nfe == model.seq_len


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_greedy_sjd_equals_greedy_autoregressive(tiny, cfg):
    _greedy_equal(tiny, torch.tensor([0, 1, 2, 1]), cfg)
    torch.manual_seed(1)
    larger = LlamaGenGPT(LlamaGenConfig(num_classes=10, vocab_size=256, grid=8, dim=64, n_layer=2, n_head=4)).eval()
    torch.nn.init.normal_(larger.head.weight, std=0.3)
    _greedy_equal(larger, torch.arange(4), cfg, inits=("random", "sample_vertical"), windows=(16,))


@pytest.mark.skipif("ar-mnist" not in read_index(), reason="ar-mnist is not shipped yet")
def test_greedy_sjd_equals_greedy_autoregressive_on_the_trained_model():
    from vision.hub import from_pretrained

    model = from_pretrained("ar-mnist").eval()
    _greedy_equal(model, torch.arange(10), 4.0, inits=("random", "repeat_horizon", "repeat_vertical"), windows=(16,))


def test_sjd_options_are_checked(tiny):
    with pytest.raises(ValueError, match="--window must be >= 1"):
        tiny.generate(torch.tensor([0]), sampler="sjd", window=0)
    with pytest.raises(ValueError, match="--init must be one of"):
        tiny.generate(torch.tensor([0]), sampler="sjd", init="diagonal")
    options = tiny.sampling_options("sjd")
    assert options["window"] == 16 and options["init"] == "repeat_horizon"
