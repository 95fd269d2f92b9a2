"""The sampling toolkit against hand-computed values and, for the random parts, distribution
tests; every random function draws from its generator only."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from generators.sampling import (
    cfg_llamagen,
    cfg_var,
    filter_logits,
    gumbel_noise,
    mask_lowest_confidence,
    maskgit_choice_temperature,
    maskgit_confidence,
    maskgit_mask_len,
    more_smooth_gumbel_softmax,
    probabilities,
    process_logits,
    residual_distribution,
    sample_categorical,
    sample_gumbel_max,
    var_cfg_ratio,
    var_more_smooth,
    var_smooth_tau,
)
from generators.sampling import _gumbel_from_uniform
from tests.helpers.distributions import chi_square_test, ks_per_coordinate

INF = math.inf
# probabilities 0.125, 0.5, 0.125, 0.25 (exact in float32): ranked 1, 3, then 0 and 2 tied
DYADIC = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25]))


def _generator(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _kept(logits: torch.Tensor) -> list:
    return logits.isfinite().tolist()


# --------------------------------------------------------------------------- temperature, top-k


def test_temperature_divides_by_at_least_1e_5():
    logits = torch.tensor([1.0, -2.0, 0.5])
    assert torch.equal(process_logits(logits, temperature=0.5), logits / 0.5)
    assert torch.equal(process_logits(logits, temperature=0.0), logits / 1e-5)
    assert torch.equal(process_logits(logits, temperature=1e-7), logits / 1e-5)
    assert torch.equal(process_logits(logits), logits)
    with pytest.raises(ValueError):
        process_logits(logits, temperature=-1.0)
    half = process_logits(logits.half(), temperature=2.0)
    assert half.dtype == torch.float32 and torch.equal(half, logits.half().float() / 2)


def test_top_k_keeps_ties_with_the_kth_value():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 0.0])
    assert filter_logits(logits, top_k=1).tolist() == [-INF, 3, -INF, 3, -INF, -INF]
    assert filter_logits(logits, top_k=2).tolist() == [-INF, 3, -INF, 3, -INF, -INF]
    assert filter_logits(logits, top_k=3).tolist() == [-INF, 3, 2, 3, 2, -INF]  # 4 tokens kept
    assert filter_logits(logits, top_k=5).tolist() == [1, 3, 2, 3, 2, -INF]
    for off in (None, 0, 6, 100):  # off, or k at least the vocabulary
        assert torch.equal(filter_logits(logits, top_k=off), logits)
    with pytest.raises(ValueError):
        filter_logits(logits, top_k=-1)


def test_filter_leaves_its_input_alone_and_works_on_batches():
    logits = torch.randn(2, 3, 7, generator=_generator(0))
    before = logits.clone()
    out = filter_logits(logits, top_k=3, top_p=0.5)
    assert torch.equal(logits, before)
    unfiltered = filter_logits(logits)
    assert torch.equal(unfiltered, logits) and unfiltered.data_ptr() != logits.data_ptr()
    for i in range(2):
        for j in range(3):
            assert torch.equal(out[i, j], filter_logits(logits[i, j], top_k=3, top_p=0.5))
    assert (out.isfinite().sum(-1) >= 1).all() and (out.isfinite().sum(-1) <= 3).all()


# --------------------------------------------------------------------------- top-p


def test_dyadic_probabilities_are_exact():
    assert DYADIC.softmax(-1).tolist() == [0.125, 0.5, 0.125, 0.25]  # premise of the next tests


@pytest.mark.parametrize("top_p, llamagen, var", [
    # mass of the tokens ranked above each token (1, 3, 0, 2): 0, 0.5, 0.75, 0.875
    (0.75, [True, True, False, True], [False, True, False, True]),  # boundary: 0.75 == top_p
    (0.5, [False, True, False, True], [False, True, False, False]),  # boundary: 0.5 == top_p
    (0.6, [False, True, False, True], [False, True, False, True]),  # no boundary: styles agree
    (0.8, [True, True, False, True], [True, True, False, True]),
    (0.1, [False, True, False, False], [False, True, False, False]),
    (0.0, [False, True, False, False], [False, True, False, False]),  # greedy in both
    (1.0, [True, True, True, True], [True, True, True, True]),  # off
    (None, [True, True, True, True], [True, True, True, True]),
])
def test_top_p_boundary_token_in_both_styles(top_p, llamagen, var):
    assert _kept(filter_logits(DYADIC, top_p=top_p)) == llamagen
    assert _kept(filter_logits(DYADIC, top_p=top_p, top_p_style="llamagen")) == llamagen
    assert _kept(filter_logits(DYADIC, top_p=top_p, top_p_style="var")) == var


def test_top_p_probabilities_and_tie_order():
    # llamagen keeps tokens 1, 3 and the first of the tied pair (0); var stops before the pair
    assert probabilities(DYADIC, top_p=0.75).tolist() == pytest.approx([1 / 7, 4 / 7, 0, 2 / 7])
    assert probabilities(DYADIC, top_p=0.75, top_p_style="var").tolist() == pytest.approx([0, 2 / 3, 0, 1 / 3])
    # uniform: every token tied, ranked by position; llamagen keeps three, var two
    uniform = torch.zeros(4)
    assert _kept(filter_logits(uniform, top_p=0.5)) == [True, True, True, False]
    assert _kept(filter_logits(uniform, top_p=0.5, top_p_style="var")) == [True, True, False, False]


def _peaked_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits as a trained model gives them: a few likely tokens, a long tail; some rows with ties,
    -inf entries (after top-k) or a boundary that falls on top_p exactly."""
    g = _generator(seed)
    logits = torch.randn(rows, vocab, generator=g) * torch.rand(rows, 1, generator=g).mul(10)
    logits[:5, :40] = logits[:5, :1]  # ties among the likely tokens
    logits[5:10] = logits[5:10].round()  # ties everywhere
    logits[10:15, vocab // 3:] = -INF
    logits[15] = -30.0  # masses 0.5, 0.25, then the rest: the boundary lies on 0.75
    logits[15, :2] = torch.log(torch.tensor([0.5, 0.25]))
    logits[15, 2:] = math.log(0.25 / (vocab - 2))
    return logits


@pytest.mark.parametrize("style", ["var", "llamagen"])
@pytest.mark.parametrize("vocab", [1, 7, 512, 4096])
def test_top_p_threshold_equals_the_full_sort(style, vocab):
    """The top-p mask found from the sorted values and a binary search is the full index sort's, entry for
    entry: peaked rows, ties at the boundary (only some of the tied tokens go), -inf entries, a boundary on
    top_p exactly, signed zeros, rows with NaN or infinite logits (the full rule's), float64."""
    from generators import sampling

    full = sampling._TOP_P_MASKS[style]
    logits = _peaked_logits(400, vocab, seed=vocab) if vocab > 40 else torch.randn(60, vocab, generator=_generator(1))
    logits[20:30] = (logits[20:30] * 2).round() / 2  # coarse values: ties at most boundaries
    logits[30, ::2] = -0.0
    logits[31] = 0.0
    logits[32] = -INF
    logits[33, 0] = math.nan
    logits[34, -1] = INF
    for top_p in (0.0, 0.3, 0.75, 0.9, 0.96, 0.999):
        expected = full(logits, top_p)
        got = sampling._top_p_mask(logits.view(-1, 20, vocab), top_p, style).view_as(logits)
        assert torch.equal(got, expected), top_p
        assert torch.equal(sampling._top_p_mask(logits.double(), top_p, style), full(logits.double(), top_p)), top_p
        kept = filter_logits(logits[:20], top_p=top_p, top_p_style=style).isfinite()
        assert torch.equal(kept, ~expected[:20] & logits[:20].isfinite())
    if vocab > 40:  # some boundary ties were split, so the tie order was exercised
        ties = logits[20:30]
        t = ties.masked_fill(full(ties, 0.9), INF).min(-1, keepdim=True).values  # the smallest kept value
        assert ((ties == t) & full(ties, 0.9)).any()


def test_top_p_argument_checks():
    with pytest.raises(ValueError):
        filter_logits(DYADIC, top_p=1.5)
    with pytest.raises(ValueError):
        filter_logits(DYADIC, top_p=-0.1)
    with pytest.raises(ValueError):
        filter_logits(DYADIC, top_p=0.5, top_p_style="hf")


def test_order_is_temperature_then_top_k_then_top_p():
    # top-k 2 leaves (0.5, 0.25) -> renormalised (2/3, 1/3); top-p 0.6 then keeps only token 1.
    # (top-p first would keep tokens 1 and 3.)
    assert _kept(process_logits(DYADIC, top_k=2, top_p=0.6)) == [False, True, False, False]
    # temperature 0.5 squares the probabilities: (0.5, 0.25, 0.125, 0.125) -> (16, 4, 1, 1) / 22,
    # so top-p 0.75 keeps two tokens where the untempered distribution keeps three
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    assert _kept(process_logits(logits, top_p=0.75)) == [True, True, True, False]
    assert _kept(process_logits(logits, temperature=0.5, top_p=0.75)) == [True, True, False, False]
    assert probabilities(logits, temperature=0.5, top_p=0.75).tolist() == pytest.approx([0.8, 0.2, 0, 0])


def test_probabilities_is_softmax_of_processed_logits():
    logits = torch.randn(3, 50, generator=_generator(1))
    options = dict(temperature=0.8, top_k=20, top_p=0.9)
    p = probabilities(logits, **options)
    assert torch.equal(p, process_logits(logits, **options).softmax(-1))
    assert torch.allclose(p.sum(-1), torch.ones(3))
    assert ((p > 0).sum(-1) <= 20).all()


# --------------------------------------------------------------------------- guidance


def test_cfg_forms_and_var_ramp():
    cond = torch.tensor([1.0, 2.0])
    uncond = torch.tensor([0.5, -1.0])
    assert cfg_llamagen(cond, uncond, 3.0).tolist() == [2.0, 8.0]  # 0.5 + 3 * 0.5, -1 + 3 * 3
    assert cfg_llamagen(cond, uncond, 1.0).tolist() == cond.tolist()
    assert cfg_var(cond, uncond, 0.5).tolist() == [1.25, 3.5]  # 1.5 * cond - 0.5 * uncond
    assert cfg_var(cond, uncond, 0.0).tolist() == cond.tolist()
    assert torch.allclose(cfg_var(cond, uncond, 0.7), cfg_llamagen(cond, uncond, 1.7))
    # VAR: t = cfg * si / 9 over its 10 scales
    ramp = [var_cfg_ratio(1.5, si, 10) for si in range(10)]
    assert ramp == pytest.approx([1.5 * si / 9 for si in range(10)])
    assert ramp[0] == 0.0 and ramp[3] == pytest.approx(0.5) and ramp[9] == 1.5
    with pytest.raises(ValueError):
        var_cfg_ratio(1.5, 0, 1)
    with pytest.raises(ValueError):
        var_cfg_ratio(1.5, 10, 10)


# --------------------------------------------------------------------------- random draws


def _random_calls(device="cpu"):
    """Every random function of the toolkit, as f(generator) -> tensor."""
    logits = torch.randn(4, 6, generator=_generator(9)).to(device)
    known = torch.tensor([False, True, False, False, True, False], device=device)
    return {
        "sample_categorical": lambda g: sample_categorical(logits.softmax(-1), g, 3),
        "gumbel_noise": lambda g: gumbel_noise((5, 2), g, device=device),
        "sample_gumbel_max": lambda g: sample_gumbel_max(logits, g),
        "maskgit_confidence": lambda g: maskgit_confidence(
            logits.log_softmax(-1)[:, 0].expand(6, 4).T, known.expand(4, 6), choice_temperature=4.5,
            step=0, num_steps=8, generator=g),
        "more_smooth_gumbel_softmax": lambda g: more_smooth_gumbel_softmax(logits, 0.3, g),
        "var_more_smooth": lambda g: var_more_smooth(logits, 3, 10, g),
    }


@pytest.mark.parametrize("name", list(_random_calls()))
def test_random_functions_use_only_their_generator(name):
    call = _random_calls()[name]
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = call(_generator(7))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG was not touched
    assert torch.equal(call(_generator(7)), first)  # same seed, same draws
    assert not torch.equal(call(_generator(8)), first)  # the draws come from the generator
    with pytest.raises(TypeError):
        call(None)
    with pytest.raises(TypeError):
        gumbel_noise((2,), None)


def test_generator_device_must_match():
    probs = torch.full((2, 3), 1 / 3, device="meta")
    with pytest.raises(ValueError, match="generator is on cpu"):
        sample_categorical(probs, _generator(0))
    with pytest.raises(ValueError, match="generator is on cpu"):
        sample_gumbel_max(torch.zeros(3, device="meta"), _generator(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_on_cuda_tensors():
    cuda_state = torch.cuda.get_rng_state()
    for name, call in _random_calls("cuda").items():
        first = call(_generator(7, "cuda"))
        assert first.device.type == "cuda", name
        assert torch.equal(call(_generator(7, "cuda")), first), name
        with pytest.raises(ValueError):
            call(_generator(7, "cpu"))
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


def test_sample_categorical_shapes_and_frequencies():
    probs = torch.tensor([0.1, 0.0, 0.3, 0.6])
    batch = probs.expand(2, 3, 4)
    assert sample_categorical(batch, _generator(0)).shape == (2, 3, 1)
    assert sample_categorical(batch, _generator(0), 5).shape == (2, 3, 5)
    assert sample_categorical(probs, _generator(0), 5).shape == (5,)
    draws = sample_categorical(probs.expand(20000, 4), _generator(1)).flatten()
    assert not (draws == 1).any()
    assert chi_square_test(draws, probs.double()) > 0.01


def test_cpu_single_draw_is_torch_multinomial_draw_for_draw(monkeypatch):
    """The CPU draw (uniform doubles, log1p only where p > 0) gives torch.multinomial's draws and leaves the
    generator where torch.multinomial would: peaked and flat rows, zeros, denormals, V = 1, several blocks of
    rows; sample_categorical takes it for sparse rows only."""
    from generators import sampling

    g = _generator(3)
    logits = torch.randn(300, 512, generator=g) * torch.rand(300, 1, generator=g) * 12
    peaked = filter_logits(logits, top_p=0.9, top_p_style="var").softmax(-1)
    flat = torch.full((50, 700), 1.0 / 700)
    sparse = torch.zeros(64, 33)
    sparse[torch.arange(64), torch.arange(64) % 33] = 1.0
    sparse[::2, 5] = 1e-42  # a denormal probability still counts as > 0
    monkeypatch.setattr(sampling, "_DRAW_BLOCK", 5000)  # peaked: 31 blocks of 9 rows and one of 3
    for probs in (peaked, flat, sparse, torch.ones(8, 1)):
        for seed in (0, 1):
            ours, theirs = _generator(seed), _generator(seed)
            expected = torch.multinomial(probs, 1, replacement=True, generator=theirs)
            assert torch.equal(sampling._multinomial_one_cpu(probs, ours), expected)
            assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))
    assert sampling._draws_as_torch()  # this torch's kernels are the ones reproduced (checked once, here)
    taken = []

    def spy(p, gen):
        taken.append(p.shape)
        return torch.multinomial(p, 1, generator=gen)

    monkeypatch.setattr(sampling, "_multinomial_one_cpu", spy)
    for probs in (peaked.view(30, 10, 512), flat, torch.zeros(300, 512).index_fill_(1, torch.tensor([0]), 1.0)):
        assert torch.equal(sample_categorical(probs, _generator(0)).view(-1, 1),
                           torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=_generator(0)))
    assert taken == [(300, 512), (300, 512)]  # not the dense rows
    monkeypatch.setattr(sampling, "_draws_as_torch", lambda: False)  # another torch: its own multinomial
    sample_categorical(peaked, _generator(0))
    assert len(taken) == 2
    with pytest.raises(RuntimeError):  # invalid rows get torch's own error
        sample_categorical(torch.zeros(20, 512), _generator(0))


def test_exponential_from_uniform_matches_the_c_library_at_float32_midpoints():
    """Where a double lies next to a float32 rounding midpoint, torch's vectorised log1p and the C library's
    can round to different floats; the CPU draw path must give the C library's (exponential_'s) value."""
    from generators.sampling import _exponential_from_uniform

    q = torch.rand(20000, generator=_generator(0)) * 20 + 1e-3
    upper = torch.nextafter(q, torch.tensor(math.inf))
    u = -torch.expm1(-(q.double() + upper.double()) / 2)  # draws whose Exp(1) value is a float32 midpoint
    u = torch.cat([u, torch.tensor([0.0, 0.5, 1 - 2.0 ** -53], dtype=torch.float64)])
    libm = torch.tensor([-math.log1p(-x) for x in u.tolist()], dtype=torch.float64).float()
    assert torch.equal(_exponential_from_uniform(u), libm)


def test_gumbel_noise_is_gumbel_and_finite():
    noise = gumbel_noise((20000,), _generator(0), dtype=torch.float64)
    assert noise.dtype == torch.float64 and noise.isfinite().all()
    assert ks_per_coordinate(noise, stats.gumbel_r.cdf) > 0.01
    assert gumbel_noise((3,), _generator(0), dtype=torch.float16).dtype == torch.float16
    # the uniform's endpoints: 0 is raised to the smallest normal number, so no -inf
    u = torch.tensor([0.0, 0.5, 1 - 2 ** -24])
    g = _gumbel_from_uniform(u)
    assert g.isfinite().all()
    assert g[1].item() == pytest.approx(-math.log(math.log(2)))
    assert g[0].item() == pytest.approx(-math.log(-math.log(torch.finfo(torch.float32).tiny)))


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([0.3, -1.0, 1.2, -INF, 0.0, 2.0])
    draws = sample_gumbel_max(logits.expand(20000, 6), _generator(0))
    assert draws.shape == (20000,) and draws.dtype == torch.long
    assert not (draws == 3).any()
    assert chi_square_test(draws, logits.double().softmax(-1)) > 0.01
    assert sample_gumbel_max(torch.zeros(2, 3, 5), _generator(0)).shape == (2, 3)


# --------------------------------------------------------------------------- MaskGIT


def test_maskgit_confidence_rule():
    log_p = torch.log(torch.tensor([0.5, 0.2, 0.9, 0.1]))
    known = torch.tensor([False, True, False, False])
    assert maskgit_choice_temperature(4.5, 2, 12) == 4.5 * (1 - 3 / 12)  # 3.375
    confidence = maskgit_confidence(log_p, known, choice_temperature=4.5, step=2, num_steps=12,
                                    generator=_generator(0))
    expected = log_p + 3.375 * gumbel_noise((4,), _generator(0))
    assert confidence[1].item() == INF
    assert torch.equal(confidence[~known], expected[~known])
    # the last step adds no noise: confidence is log p
    last = maskgit_confidence(log_p, known, choice_temperature=4.5, step=11, num_steps=12,
                              generator=_generator(0))
    assert torch.equal(last[~known], log_p[~known])


def _schedule_table(num_tokens, num_steps, schedule="cosine"):
    unknown, table = num_tokens, []
    for step in range(num_steps):
        mask_len = int(maskgit_mask_len(num_tokens, unknown, step, num_steps, schedule))
        table.append(mask_len)
        unknown = mask_len
    return table


def test_maskgit_mask_len_cosine_table():
    # floor(16 cos(pi/2 (t+1)/T)), clamped to [1, unknown - 1]
    assert _schedule_table(16, 4) == [14, 11, 6, 1]  # 14.78, 11.31, 6.12, 0
    assert _schedule_table(16, 2) == [11, 1]
    assert _schedule_table(16, 1) == [1]
    # float32 like the official code: cos(pi/3) = 0.49999997, so 7 rather than 8
    assert _schedule_table(16, 3) == [13, 7, 1]
    # 4 tokens in 8 steps: floor(3.92, 3.70, 3.33, 2.83, ...) capped by unknown - 1 = 3, 2, 1, 0
    assert _schedule_table(4, 8) == [3, 2, 1, 1, 1, 1, 1, 1]
    # per row: the clamp to unknown - 1, and at least one
    rows = maskgit_mask_len(16, torch.tensor([16, 10, 2, 1, 0]), 0, 4)
    assert rows.dtype == torch.long and rows.tolist() == [14, 9, 1, 1, 1]


def test_maskgit_mask_len_other_schedules():
    def lengths(schedule):
        return [int(maskgit_mask_len(16, 16, step, 4, schedule)) for step in range(4)]
    assert lengths("uniform") == [12, 8, 4, 1]  # 1 - r
    assert lengths("pow2") == [15, 12, 7, 1]  # 1 - r^2: 15, 12, 7, 0
    assert lengths("log") == [8, 4, 1, 1]  # -log2(r) / log2(16): 0.5, 0.25, 0.104, 0
    assert lengths("exp") == [14, 12, 8, 1]  # 1 - 2^(-4 (1 - r)): 0.875, 0.75, 0.5, 0
    with pytest.raises(ValueError):
        maskgit_mask_len(16, 16, 0, 4, "linear")


def test_mask_lowest_confidence():
    confidence = torch.tensor([[0.3, -1.0, INF, 0.1, -0.5],
                               [2.0, 1.0, 0.0, -1.0, INF]])
    assert mask_lowest_confidence(confidence, 2).tolist() == [
        [False, True, False, False, True], [False, False, True, True, False]]
    per_row = mask_lowest_confidence(confidence, torch.tensor([1, 3]))
    assert per_row.tolist() == [[False, True, False, False, False], [False, True, True, True, False]]
    assert torch.equal(mask_lowest_confidence(confidence, torch.tensor([[1], [3]])), per_row)
    # every finite entry at or beyond the row length; known (+inf) never
    assert mask_lowest_confidence(confidence, 9).tolist() == [
        [True, True, False, True, True], [True, True, True, True, False]]
    # official tie rule: entries equal to the cut-off stay, so fewer than mask_len can go
    assert mask_lowest_confidence(torch.tensor([0.0, 0.0, 1.0]), 1).tolist() == [False, False, False]


def test_maskgit_step_remasks_exactly_mask_len_of_the_unknown():
    g = _generator(3)
    known = torch.rand(6, 64, generator=g) < 0.4
    log_p = torch.rand(6, 64, generator=g).log()
    confidence = maskgit_confidence(log_p, known, choice_temperature=4.5, step=3, num_steps=8, generator=g)
    mask_len = maskgit_mask_len(64, (~known).sum(-1), 3, 8)
    masked = mask_lowest_confidence(confidence, mask_len)
    assert torch.equal(masked.sum(-1), mask_len)
    assert not (masked & known).any()


# --------------------------------------------------------------------------- VAR more_smooth


def test_more_smooth_gumbel_softmax():
    logits = torch.tensor([[1.0, -INF, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]])
    weights = more_smooth_gumbel_softmax(logits, 0.3, _generator(0))
    expected = ((logits + gumbel_noise(logits.shape, _generator(0))) / 0.3).softmax(-1)
    assert torch.equal(weights, expected)
    assert weights[0, 1] == 0 and torch.allclose(weights.sum(-1), torch.ones(2))
    # VAR: tau(r) = max(0.27 (1 - 0.95 r), 0.005), logits scaled by 1 + r, r = si / 9
    assert var_smooth_tau(0.0) == pytest.approx(0.27)
    assert var_smooth_tau(5 / 9) == pytest.approx(0.27 * (1 - 0.95 * 5 / 9))
    assert var_smooth_tau(1.0) == pytest.approx(0.0135)
    assert torch.equal(var_more_smooth(logits, 9, 10, _generator(0)),
                       more_smooth_gumbel_softmax(logits * 2, var_smooth_tau(1.0), _generator(0)))
    with pytest.raises(ValueError):
        more_smooth_gumbel_softmax(logits, 0.0, _generator(0))


# --------------------------------------------------------------------------- speculative residual


def test_residual_distribution_hand_values():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.2, 0.2, 0.6], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    residual = residual_distribution(p, q)
    assert residual[0].tolist() == pytest.approx([0.75, 0.25, 0.0])  # (0.3, 0.1, 0) / 0.4
    assert residual[1].tolist() == p[1].tolist()  # p == q: no rejection can happen; p returned
    assert residual[2].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3])  # (0.1, 0, 0.2) / 0.3


def test_residual_makes_speculative_sampling_exact():
    # accept x ~ q with probability min(1, p/q), else draw from the residual: the result is p
    g = _generator(4)
    p = torch.rand(5, 7, generator=g, dtype=torch.float64).softmax(-1)
    q = torch.rand(5, 7, generator=g, dtype=torch.float64).softmax(-1)
    p[0, 3] = 0.0  # a token the target never produces
    p[0] /= p[0].sum()
    accepted = q * torch.clamp(p / q, max=1)
    rejected = 1 - accepted.sum(-1, keepdim=True)
    assert torch.allclose(accepted + rejected * residual_distribution(p, q), p, rtol=0, atol=1e-15)
