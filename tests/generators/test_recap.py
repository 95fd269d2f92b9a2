"""ReCAP on MaskGIT: a cheap step from a cache of the same state is a full step; with no cheap steps
ReCAP is the plain sampler draw for draw; the group schedule is the official one."""
import numpy as np
import pytest
import torch

import generators.maskgit.samplers  # noqa: F401  (registers the samplers)
from generators.maskgit.model import MaskGIT, MaskGITConfig
from generators.recap import (check_recap_options, draw_kept, group_sizes, recap_counts, score_positions,
                             unmask_counts)
from generators.sampling import annealed_temperature, gumbel_noise

VOCAB = 64


def tiny(seed: int = 0, **extra) -> MaskGIT:
    torch.manual_seed(seed)
    config = dict(num_classes=4, vocab_size=VOCAB, grid=(6, 6), downsample=4, dim=48, depth=4, heads=4)
    model = MaskGIT(MaskGITConfig(**{**config, **extra})).eval()
    with torch.no_grad():  # sharper than the init's near-uniform logits, so sampling choices matter
        model.head.fc.weight.mul_(20)
    return model


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_cheap_step_from_same_state_equals_full_step(skip, batch):
    model = tiny(skip=skip)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, VOCAB, (batch, 36), generator=g)
    ids[torch.rand(batch, 36, generator=g) < 0.5] = model.mask_id
    labels = torch.arange(batch) % 5  # includes the null class 4
    caches = model.new_caches()
    with torch.no_grad():
        full = model.forward_full(ids, labels, caches)
        positions = torch.stack([torch.randperm(36, generator=g)[:7] for _ in range(batch)])
        cheap = model.forward_cheap(positions, ids.gather(1, positions), labels, caches)
        again = model.forward_full(ids, labels, model.new_caches())
    expected = full.gather(1, positions[..., None].expand(-1, -1, VOCAB))
    assert (cheap - expected).abs().max() <= 1e-5
    assert torch.equal(full, again)  # the cheap step wrote nothing into the caches' state of record


def test_cheap_step_sees_the_group_tokens_and_stale_context():
    """The cheap step's own tokens are fresh (changing one changes its logits), the rest come from the cache."""
    model = tiny()
    ids = torch.full((1, 36), model.mask_id)
    caches = model.new_caches()
    with torch.no_grad():
        model.forward_full(ids, torch.tensor([1]), caches)
        positions = torch.tensor([[3, 10]])
        masked = model.forward_cheap(positions, torch.tensor([[model.mask_id] * 2]), torch.tensor([1]), caches)
        filled = model.forward_cheap(positions, torch.tensor([[5, model.mask_id]]), torch.tensor([1]), caches)
        new = ids.clone()
        new[0, 3] = 5
        full = model(new, torch.tensor([1]))
    assert (filled - masked).abs().max() > 1e-3
    # position 10 sees token 5 at position 3 fresh, but the other positions' keys/values are stale: not a full step
    assert (filled[0, 1] - full[0, 10]).abs().max() > 1e-6


@pytest.mark.parametrize("options, pre", [
    (dict(steps=8), 0),
    (dict(steps=12, cfg=3.0, temperature=0.8, top_k=20), 0),
    (dict(steps=5, choice_temperature=0.7, top_p=0.9), 3),
    (dict(steps=10, mask_schedule="recap", draw="recap", temperature=1.0, final_temperature=0.6), 0),
    (dict(steps=7, cfg=2.0, mask_schedule="pow2.5", draw="recap", final_temperature=0.3), 2),
])
def test_zero_cheap_steps_is_plain_token_for_token(options, pre):
    model = tiny()
    labels = torch.tensor([0, 1, 2, 3, 1])
    plain, ps = model.generate(labels, sampler="plain", generator=torch.Generator().manual_seed(3), **options)
    recap, rs = model.generate(labels, sampler="recap", generator=torch.Generator().manual_seed(3),
                               num_cache_iters=0, pre_full_iters=pre, **options)
    assert torch.equal(plain.ids, recap.ids)
    assert ps.nfe == rs.nfe == options["steps"]


def test_pre_full_iters_covering_every_step_is_plain():
    model = tiny()
    labels = torch.tensor([2, 0])
    plain, _ = model.generate(labels, sampler="plain", generator=torch.Generator().manual_seed(1), steps=6)
    recap, _ = model.generate(labels, sampler="recap", generator=torch.Generator().manual_seed(1), steps=6,
                              num_cache_iters=3, pre_full_iters=6)
    assert torch.equal(plain.ids, recap.ids)


def test_cached_groups_run_cheap_passes_on_the_group_only():
    model = tiny()
    calls = []
    full, cheap = model.forward_full, model.forward_cheap
    model.forward_full = lambda ids, labels, caches: calls.append(("full", ids.shape[1])) or full(ids, labels, caches)
    model.forward_cheap = lambda pos, ids, labels, caches: (calls.append(("cheap", pos.shape[1]))
                                                            or cheap(pos, ids, labels, caches))
    tokens, stats = model.generate(torch.tensor([0, 1, 2]), sampler="recap", steps=8, num_cache_iters=2,
                                   pre_full_iters=2, cfg=2.0)
    counts = unmask_counts(36, 8)
    # groups [1, 1, 3, 3]: a cheap pass holds every position of its group
    assert calls == [("full", 36), ("full", 36), ("full", 36), ("cheap", sum(counts[2:5])), ("cheap", sum(counts[2:5])),
                     ("full", 36), ("cheap", sum(counts[5:8])), ("cheap", sum(counts[5:8]))]
    assert stats.nfe == 8
    assert int(tokens.ids.max()) < VOCAB  # nothing left masked


def test_cheap_steps_change_the_samples():
    """With cheap steps the later decisions see a stale context, so the samples differ from plain's."""
    model = tiny()
    labels = torch.tensor([0, 1, 2, 3])
    plain, _ = model.generate(labels, sampler="plain", generator=torch.Generator().manual_seed(9), steps=8)
    recap, _ = model.generate(labels, sampler="recap", generator=torch.Generator().manual_seed(9), steps=8,
                              num_cache_iters=1)
    assert not torch.equal(plain.ids, recap.ids)


def test_group_sizes_follow_the_official_schedule():
    assert group_sizes(16, 8, 1) == [1] * 8 + [2] * 4
    assert group_sizes(16, 0, 1) == [2] * 8
    assert group_sizes(5, 0, 3) == [4, 1]
    assert group_sizes(7, 2, 2) == [1, 1, 3, 2]
    assert group_sizes(4, 0, 0) == [1, 1, 1, 1]
    assert group_sizes(3, 3, 5) == [1, 1, 1]


@pytest.mark.parametrize("steps, pre, cache", [(8, 9, 1), (8, -1, 1), (8, 0, -1), (0, 0, 1)])
def test_bad_options_raise(steps, pre, cache):
    with pytest.raises(ValueError):
        check_recap_options(steps, pre, cache)
    with pytest.raises(ValueError):
        tiny().generate(torch.tensor([0]), sampler="recap", steps=steps, pre_full_iters=pre, num_cache_iters=cache)


def test_one_cheap_step_per_group_is_the_same_in_both_orders():
    """With groups of two steps the cheap step decodes whatever is left, so both orders draw the same."""
    model = tiny()
    labels = torch.tensor([0, 1, 2, 3])
    runs = [model.generate(labels, sampler="recap", generator=torch.Generator().manual_seed(4), steps=8,
                           num_cache_iters=1, group_order=order)[0].ids for order in ("fixed", "confidence")]
    assert torch.equal(*runs)


def test_confidence_order_keeps_the_most_confident_of_the_groups_samples():
    """Replay the first group (3 of 6 steps) by hand: its second step samples the group's undecoded positions
    from the cheap logits and keeps the top counts[1] of log p + noise at the group's annealed temperature,
    1 (1 - 1/2) = 0.5 for the first of two groups (not the per-step 1 (1 - 2/6) = 2/3, nor 0)."""
    model = tiny()
    counts = unmask_counts(36, 6)
    seen = []
    cheap = model.forward_cheap

    def recording(pos, ids, labels, caches):
        out = cheap(pos, ids, labels, caches)
        seen.append((pos.clone(), ids.clone(), out))
        return out

    model.forward_cheap = recording
    labels = torch.arange(8) % 4
    model.generate(labels, sampler="recap", generator=torch.Generator().manual_seed(2), steps=6, num_cache_iters=2,
                   group_order="confidence", choice_temperature=1.0)
    (pos1, ids1, logits1), (pos2, ids2, _) = seen[:2]
    assert pos1.shape[1] == sum(counts[:3]) and int((ids1 != model.mask_id).sum(1)[0]) == counts[0]
    decoded = {(b, int(q)): int(t) for b in range(8) for q, t in zip(pos2[b], ids2[b]) if t != model.mask_id}
    assert len(decoded) == 8 * (counts[0] + counts[1])

    def replay(temperature: float) -> dict:
        """What the second step decodes (beyond the first step's tokens) with this noise temperature."""
        twin = torch.Generator().manual_seed(2)
        torch.multinomial(torch.ones(8 * 36, VOCAB), 1, replacement=True, generator=twin)  # the full step's draws
        gumbel_noise((8, 36), twin)
        p = logits1[:, counts[0]:].softmax(-1)
        drawn = torch.multinomial(p.reshape(-1, VOCAB), 1, replacement=True, generator=twin).view(8, -1)
        confidence = torch.log(p.gather(-1, drawn[..., None])[..., 0]) + temperature * gumbel_noise(drawn.shape, twin)
        keep = confidence.argsort(dim=1, descending=True, stable=True)[:, :counts[1]]
        where = pos1[:, counts[0]:].gather(1, keep)
        return {(b, int(q)): int(t) for b in range(8) for q, t in zip(where[b], drawn[b].gather(0, keep[b]))}

    first = {(b, int(q)): int(t) for b in range(8) for q, t in zip(pos1[b], ids1[b]) if t != model.mask_id}
    assert {**first, **replay(0.5)} == decoded
    assert {**first, **replay(2 / 3)} != decoded and {**first, **replay(0.0)} != decoded


def official_ntoken_schedule(N: int, T: int) -> list[int]:
    """ReCAP's MaskGIT script's counts, written from its formula (numpy, float64), its zero fix included."""
    masked = np.floor((1 - np.linspace(0, 1, T + 1)[:-1] ** 2.5) * N).astype(int)
    counts = (masked[:-1] - masked[1:]).tolist()
    counts.append(N - sum(counts))
    for i, n in enumerate(counts):
        if n == 0:
            counts[i] = 1
            counts[-1] -= 1
    return counts


def test_recap_schedule_is_recaps_ntoken_schedule():
    assert recap_counts(64, 16) == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 6, 6, 7, 7, 9, 7]
    assert recap_counts(16, 12) == [1, 1, 1, 1, 1, 1, 2, 1, 2, 3, 2, 0]  # the official fix can leave the last 0
    for N in (36, 64, 256):
        for T in (1, 2, 8, 16, 20, 24, 32):
            if T <= N and min(official_ntoken_schedule(N, T)) >= 0:
                assert unmask_counts(N, T, "recap") == official_ntoken_schedule(N, T), (N, T)
    # where t / T and numpy's linspace round differently (211 against 210 masked before step 20)
    assert unmask_counts(243, 45, "recap") == official_ntoken_schedule(243, 45)
    with pytest.raises(ValueError):  # where the official rule goes negative, or steps > tokens
        recap_counts(16, 14)
    with pytest.raises(ValueError):
        recap_counts(16, 17)
    for bad in ("pow0", "pow-1", "pownan", "powinf", "pow"):  # a degenerate exponent is refused, not run
        with pytest.raises(ValueError):
            unmask_counts(16, 12, bad)
    # not MaskGIT's pow2.5 rule, which re-masks at least one token every step instead
    assert unmask_counts(16, 12, "pow2.5") != recap_counts(16, 12)


def test_annealed_temperature_is_recaps_samp_temp_schedule():
    for steps, final in ((16, 0.65), (24, 0.72), (2, 0.5), (1, 0.7)):
        official = final + (1 - np.linspace(0, 1, steps) ** 0.5) * (1.0 - final)
        ours = [annealed_temperature(1.0, final, s, steps) for s in range(steps)]
        assert np.allclose(ours, official, rtol=0, atol=1e-12)
    assert [annealed_temperature(0.8, None, s, 5) for s in range(5)] == [0.8] * 5


@pytest.mark.parametrize("sampler, extra", [("plain", {}), ("recap", dict(num_cache_iters=0))])
def test_recap_schedule_decodes_its_counts_each_step(sampler, extra):
    """Record how many positions each forward pass sees masked: N - the counts decoded so far."""
    model = tiny()
    seen = []
    forward = model.forward

    def recording(ids, labels, **kw):
        seen.append(int((ids[0] == model.mask_id).sum()))
        return forward(ids, labels, **kw)

    model.forward = recording
    model.generate(torch.tensor([0, 1]), sampler=sampler, generator=torch.Generator().manual_seed(0), steps=9,
                   mask_schedule="recap", **extra)
    counts = recap_counts(36, 9)
    assert seen == [36 - sum(counts[:t]) for t in range(9)]


def test_recap_draw_keeps_a_tempered_sample_and_scores_an_untempered_one():
    """draw "recap": a position is scored by the log-probability, at temperature 1, of a draw from
    softmax(logits); the token it keeps is drawn again from softmax(logits / T). draw "maskgit": the kept
    token is the scored one, drawn at T."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(40000, 1)

    def probs(lg, t):
        return (lg / t).softmax(-1)

    p1, p_half = probs(logits[0], 1.0), probs(logits[0], 0.5)
    g = torch.Generator().manual_seed(0)
    drawn, log_p = score_positions(probs, logits, 0.5, "recap", g)
    assert drawn is None  # only the chosen positions draw their tokens
    scored = (log_p.exp()[:, None] - p1).abs().argmin(-1)  # which token each score belongs to
    assert torch.allclose(log_p.exp(), p1[scored])
    assert (torch.bincount(scored, minlength=4) / len(scored) - p1).abs().max() < 0.01
    kept = draw_kept(probs, logits[None], torch.arange(40000)[None], 0.5, g)[0]
    assert (torch.bincount(kept, minlength=4) / len(kept) - p_half).abs().max() < 0.01
    assert (scored != kept).float().mean() > 0.3  # two draws, not one
    drawn, log_p = score_positions(probs, logits, 0.5, "maskgit", torch.Generator().manual_seed(0))
    assert torch.allclose(log_p.exp(), p_half[drawn])
    assert (torch.bincount(drawn, minlength=4) / len(drawn) - p_half).abs().max() < 0.01


def test_recap_draw_draws_only_the_decoded_positions(monkeypatch):
    """ReCAP's script draws the kept tokens for the group's positions only: with draw "recap" a full step of
    plain decoding makes one categorical draw per position (the scores) plus one per decoded token."""
    import generators.recap

    model = tiny()
    sizes = []
    real = generators.recap.sample_categorical

    def counting(p, *a, **kw):
        sizes.append(p.reshape(-1, p.shape[-1]).shape[0])
        return real(p, *a, **kw)

    monkeypatch.setattr(generators.recap, "sample_categorical", counting)
    model.generate(torch.tensor([0, 1]), sampler="plain", generator=torch.Generator().manual_seed(0), steps=9,
                   mask_schedule="recap", draw="recap")
    counts = recap_counts(36, 9)
    assert sizes == [n for c in counts for n in (2 * 36, 2 * c)]
