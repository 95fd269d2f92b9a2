"""Continuous speculative decoding is exact: CSpD's samples follow the distribution of the target's plain sampler
(20,000 samples from tiny two-position models with 1- and 2-dimensional tokens: KS per coordinate and the
energy-distance permutation test, marginals and the joint), and the same tests reject when the residual step
is the official last-step one or keeps the draft; identical draft and target accept every token; the
trajectory log density is the direct product of Gaussians (torch.distributions.Normal) with the last step's
Jacobian."""
import copy
import math

import pytest
import torch
from torch.distributions import Normal

from generators.mar import continuous_speculative as cs
from generators.mar.diffusion import final_map
from generators.mar.model import diffusion_for
from generators.mar.plain import sample_latents
from tests.helpers.distributions import energy_distance_permutation_test, ks_per_coordinate
from tests.helpers.tiny_mar import TinyMAR, random_mar
from vision.tokens import GenerationStats

N_SAMPLES = 20000
LEVEL = 0.01


def plain(model, labels, seed, **opts):
    with torch.no_grad():
        return sample_latents(model, labels, batch_size=len(labels), generator=torch.Generator().manual_seed(seed),
                              stats=GenerationStats(), **opts)


def cspd(target, draft, labels, seed, *, window=2, prefill=0.0, residual=cs.exact_residual, inner_temperature=1.0,
         **opts):
    stats = GenerationStats()
    with torch.no_grad():
        out = cs.speculative_latents(target, draft, labels, batch_size=len(labels), window=window, prefill=prefill,
                                     residual_batch=4, inner_temperature=inner_temperature,
                                     generator=torch.Generator().manual_seed(seed), stats=stats, residual=residual,
                                     **opts)
    return out, stats


def p_values(a, b) -> tuple[float, float]:
    """KS per coordinate (every coordinate of every position, plus the sum and difference of the first
    coordinates of the two positions: the joint's projections) and the energy test on the joint."""
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    d = a.shape[1] // 2

    def project(x):
        return torch.cat([x, x[:, :1] + x[:, d:d + 1], x[:, :1] - x[:, d:d + 1]], dim=1).numpy()

    ks = ks_per_coordinate(project(a), project(b))
    energy = energy_distance_permutation_test(a, b, generator=torch.Generator().manual_seed(0), max_samples=3000,
                                              permutations=200)
    return ks, energy


# ---------------------------------------------------------------------- wrong residual rules (test-only)


def keep_draft(job: cs.ResidualJob, generator):
    """A rejected token keeps the draft's value."""
    return job.draft_traj.token, 0


def official_last_step(job: cs.ResidualJob, generator):
    """MarkXCloud/CSpD's `sample_distribution`: the target's own trajectory on the aligned noise gives the last
    step's Gaussian N(x_t, s_t^2) (s = temperature exp(log_var / 2) at t = 0), the draft's gives N(x_d, s_d^2);
    propose from the target's, accept with max(0, p(x) - q(x) / fixed) / p(x), fixed = exp(sum of the noisy steps'
    log std differences); at most 100 tries, a token that never passes stays 0."""
    temperature = job.temperature
    own = job.target.sample(job.noise, temperature)
    dif = job.target.diffusion

    def last_std(head, y1):
        t0 = torch.zeros(len(y1), dtype=torch.long)
        return temperature * torch.exp(0.5 * dif.mean_log_variance(head.predict()(y1, t0), y1, t0)[1])

    s_t, s_d = last_std(job.target, own.states[:, -1]), last_std(job.draft, job.draft_traj.states[:, -1])
    fixed = torch.exp((own.log_stds - job.draft_traj.log_stds).sum(dim=(1, 2)))
    p_dist, q_dist = Normal(own.token, s_t), Normal(job.draft_traj.token, s_d)
    out = torch.zeros_like(own.token)
    done = torch.zeros(len(out), dtype=torch.bool)
    for _ in range(100):
        x = own.token + s_t * torch.randn(own.token.shape, generator=generator, dtype=own.token.dtype)
        p = p_dist.log_prob(x).sum(-1).exp()
        q = q_dist.log_prob(x).sum(-1).exp()
        ok = torch.rand(len(x), generator=generator, dtype=x.dtype) < ((p - q / fixed).clamp(min=0) / p)
        out[ok & ~done] = x[ok & ~done]
        done |= ok
        if bool(done.all()):
            break
    return out, 0


# ---------------------------------------------------------------------- the distribution tests


@pytest.fixture(scope="module", params=[(1, 0.25), (2, 0.15)], ids=["dim1", "dim2"])
def pair(request):
    """A target and a nearby draft (every parameter moved by a multiple of N(0, 1)): most drafted trajectories
    are still rejected (a trajectory ratio is strict), so the residual step does most of the work."""
    channels, perturb = request.param
    target = TinyMAR(positions=2, channels=channels, seed=0)
    draft = TinyMAR(positions=2, channels=channels, seed=0, perturb=perturb)
    labels = torch.randint(0, 3, (N_SAMPLES,), generator=torch.Generator().manual_seed(5))
    opts = dict(steps=2, diffusion_steps=4, cfg=1.0, cfg_schedule="linear", temperature=1.0)
    return target, draft, labels, opts, plain(target, labels, seed=1, **opts)


def test_cspd_matches_plain_target_sampling(pair):
    target, draft, labels, opts, reference = pair
    out, stats = cspd(target, draft, labels, seed=3, **opts)
    verified = sum(stats.accepted_per_iter) + stats.rejected_tokens
    # one window drafts both steps; samples whose first step had a rejection redraft the second in a second window
    assert verified == 2 * N_SAMPLES and stats.nfe == 2 and stats.draft_nfe == 3
    assert 0.2 < stats.rejected_tokens / verified < 0.95  # both steps do real work
    ks, energy = p_values(out, reference)
    assert ks > LEVEL and energy > LEVEL, (ks, energy)
    # the drafts alone are far from the target: the test can tell them apart
    ks_draft, energy_draft = p_values(plain(draft, labels, seed=2, **opts), reference)
    assert ks_draft < 1e-6 and energy_draft < LEVEL
    # the residual's proposals stay within the proven bound: E[tries per verified token] <= 2 + residual_batch TV
    assert stats.residual_tries / verified < 2 + 4 * stats.rejected_tokens / verified


def test_keeping_the_draft_fails_the_same_test(pair):
    target, draft, labels, opts, reference = pair
    out, _ = cspd(target, draft, labels, seed=3, residual=keep_draft, **opts)
    ks, energy = p_values(out, reference)
    assert ks < 1e-6 and energy < LEVEL, (ks, energy)


def test_the_official_last_step_residual_fails_the_same_test(pair):
    """Its bias (the aligned-noise target token, kept when the draft was rejected) is plain in the KS tests
    (p ~ 1e-10); the energy test on 3,000 of the samples is weaker against it (p 0.02 - 0.3)."""
    target, draft, labels, opts, reference = pair
    out, _ = cspd(target, draft, labels, seed=3, residual=official_last_step, **opts)
    ks, energy = p_values(out, reference)
    assert ks < 1e-6, (ks, energy)


def test_inner_temperature_is_lossy(pair):
    """The official flattening (42) accepts more drafts, and the output leaves the target's law."""
    target, draft, labels, opts, reference = pair
    _, exact = cspd(target, draft, labels, seed=3, **opts)
    out, flat = cspd(target, draft, labels, seed=3, inner_temperature=42.0, **opts)
    assert flat.rejected_tokens < 0.8 * exact.rejected_tokens
    assert p_values(out, reference)[0] < LEVEL


def test_windows_prefill_and_guidance_match_plain():
    """Four positions over four steps, windows of 2 after one pre-filled step, guidance 2 on the linear schedule:
    several windows per sample, invalidated slots redrafted, samples advancing at their own pace."""
    target = TinyMAR(positions=4, channels=1, seed=3, coupling=1.5)
    draft = TinyMAR(positions=4, channels=1, seed=3, coupling=1.5, perturb=0.2)
    n = N_SAMPLES // 2
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(6))
    opts = dict(steps=4, diffusion_steps=3, cfg=2.0, cfg_schedule="linear", temperature=0.9)
    reference = plain(target, labels, seed=1, **opts)
    out, stats = cspd(target, draft, labels, seed=4, window=2, prefill=0.25, **opts)
    assert stats.nfe > 2 and stats.draft_nfe >= 3 and stats.rejected_tokens > 0
    ks, energy = p_values(out[:, :2], reference[:, :2])  # positions 0, 1: marginals and their joint
    ks2, energy2 = p_values(out[:, 2:], reference[:, 2:])  # positions 2, 3
    assert min(ks, ks2, energy, energy2) > LEVEL / 2, (ks, ks2, energy, energy2)


# ---------------------------------------------------------------------- identical models, densities, arguments


def tiny_mar(seed=0, **overrides):
    return random_mar(seed, depth=1, **overrides)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_identical_draft_and_target_accept_every_token(cfg):
    target = tiny_mar()
    draft = copy.deepcopy(target)
    tokens, stats = target.generate(torch.arange(5), sampler="cspd", draft=draft, steps=6, diffusion_steps=5,
                                    window=3, prefill=0.2, cfg=cfg, generator=torch.Generator().manual_seed(0))
    prefilled = 2  # steps 0 and 1 (<= 0.2 * 6), which predict 1 + 2 of the 16 tokens
    assert stats.rejected_tokens == 0 and stats.residual_tries == 0
    assert sum(stats.accepted_per_iter) == 5 * (16 - 3)
    assert stats.nfe == prefilled + 2 and stats.draft_nfe == 4  # two windows of 3 and 1 drafted steps
    assert torch.isfinite(tokens.latents).all()


def test_trajectory_log_density_is_the_product_of_its_gaussians():
    """own_log_density (the sampler's record) and log_density (the other model's view: inverts the last step) both
    equal log N(y_K; 0, I) + sum of the noisy steps' Normal log-probs + the last step's at g^{-1}(x) - log|det g'|,
    with every mean and variance recomputed step by step and the Jacobian by autograd."""
    model = tiny_mar()
    dif = diffusion_for(5)
    M, D = 4, model.token_dim
    g = torch.Generator().manual_seed(1)
    z_c, z_u = torch.randn(M, 32, generator=g, dtype=torch.float64), torch.randn(M, 32, generator=g, dtype=torch.float64)
    scale = torch.full((M,), 1.7, dtype=torch.float64)
    head = cs.HeadCondition(model, dif, z_c, z_u, scale)
    temperature = 0.8
    with torch.no_grad():
        traj = head.sample(torch.randn(M, 5, D, generator=g, dtype=torch.float64), temperature)
        own = head.own_log_density(traj)
        other = head.log_density(traj.states, traj.token, temperature)
    predict = head.predict()
    expected = Normal(0.0, 1.0).log_prob(traj.states[:, 0]).sum(-1)
    for j, i in enumerate(range(4, 0, -1), start=1):
        y = traj.states[:, j - 1]
        t = torch.full((M,), i)
        mean, log_var = dif.mean_log_variance(predict(y, t), y, t)
        expected = expected + Normal(mean, temperature * torch.exp(0.5 * log_var)).log_prob(traj.states[:, j]).sum(-1)
    for m in range(M):
        f = lambda y1: final_map(dif, head.rows(torch.tensor([m])).predict(), y1[None])[0]  # noqa: E731
        assert torch.allclose(f(traj.states[m, -1]), traj.token[m])
        expected[m] -= torch.linalg.slogdet(torch.autograd.functional.jacobian(f, traj.states[m, -1]))[1]
    assert torch.allclose(own, expected, rtol=0, atol=1e-9)
    assert torch.allclose(other, expected, rtol=0, atol=1e-7)
    # a wrong density (the Jacobian forgotten) is off by more than the tolerance
    assert (own - expected).abs().max() < 1e-9 < (own - (expected + head.log_det(traj.states[:, -1]))).abs().max()


def test_the_last_step_is_inverted_to_the_draft_state():
    model = tiny_mar()
    dif = diffusion_for(5)
    head = cs.HeadCondition(model, dif, torch.randn(6, 32, dtype=torch.float64), None, torch.ones(6, dtype=torch.float64))
    y1 = torch.randn(6, 2, dtype=torch.float64)
    with torch.no_grad():
        x = final_map(dif, head.predict(), y1)
        back = cs.invert_final_map(dif, head.predict(), x, start=x.clone())
    assert torch.allclose(back, y1, atol=1e-10)


def test_bad_arguments_are_one_line_value_errors():
    target = tiny_mar()
    wrong_grid = tiny_mar(grid=(2, 2))
    wrong_channels = tiny_mar(channels=3)
    wrong_tokenizer = tiny_mar(tokenizer="other")
    target.config.tokenizer = "kl-mnist"
    cases = {"needs a draft": dict(draft=None), "must share the tokenizer": dict(draft=wrong_grid),
             "share the tokenizer": dict(draft=wrong_channels), "speaks tokenizer other": dict(draft=wrong_tokenizer),
             "--steps must be >= 1": dict(draft=target, steps=0), "--window must be >= 1": dict(draft=target, window=0),
             "temperature > 0": dict(draft=target, temperature=0.0)}
    for match, kw in cases.items():
        with pytest.raises(ValueError, match=match) as err:
            target.generate(torch.arange(2), sampler="cspd", **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="top-k / top-p do not apply"):
        target.generate(torch.arange(2), sampler="cspd", draft=target, top_k=5)


def test_prefill_follows_the_official_rule():
    assert [cs.prefill_steps(r, 64) for r in (0.0, 0.15, 0.5, 1.0)] == [0, 10, 33, 64]
    assert cs.prefill_steps(0.25, 8) == 3 and math.floor(0.25 * 8) + 1 == 3  # step <= milestone, milestone included


def test_benchmark_reports_its_flat_figures():
    """apps.benchmark cspd on tiny models (the shipped ones are not needed): every key, finite, consistent."""
    from apps.benchmarks import cspd as bench
    from apps.benchmarks import registry

    assert "cspd" in registry()
    sampling = {"steps": 4, "diffusion_steps": 3, "cfg": 1.5, "temperature": 1.0, "cfg_schedule": "linear"}
    target = tiny_mar(num_classes=10, sampling=sampling)
    draft = copy.deepcopy(target)

    def quality(model, tokenizer, run, *, per_class, seed):
        assert run.sampler in ("plain", "cspd") and per_class == 20
        return {"fd": 10.0 + seed, "accuracy": 0.5}

    figures = bench.measure(target, draft, None, quick=True, quality=quality, window=3)
    for key in ("latency_speedup", "acceptance_rate", "target_nfe_ratio", "residual_tries_mean", "fd_target",
                "fd_cspd", "accuracy_target", "accuracy_cspd", "latency_speedup_lossy", "acceptance_rate_lossy",
                "fd_cspd_lossy"):
        assert math.isfinite(figures[key]), key
    assert figures["acceptance_rate"] == 1.0 and figures["fd_target"] == 10.0  # the same model drafts and verifies
    assert figures["acceptance_rate_lossy"] == 1.0
    assert figures["target_nfe_ratio"] == 2 / 4  # the identical draft: one pre-filled step + one window of 3


def test_apps_generate_runs_cspd_and_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    """Through `python -m apps.generate` with the shipped kl-mnist tokenizer: a CSpD grid is written; a draft that
    speaks other tokens, steps < 1, no draft and a temperature of 0 each give one line and exit 2, no file."""
    from apps import generate
    from vision.cli import run
    from vision.hub import save_pretrained

    def saved(name, seed, **overrides):
        config = {"tokenizer": "kl-mnist", "num_classes": 10, "grid": (8, 8), "channels": 4, **overrides}
        model = tiny_mar(seed, **config).float()
        return str(save_pretrained(model, tmp_path / name))

    def gen_exit(*argv) -> int:
        with pytest.raises(SystemExit) as e:
            run(generate.main, [str(a) for a in argv])
        return e.value.code

    target, draft, other = saved("target", 0), saved("draft", 1), saved("other", 2, channels=3)
    base = ["--model", target, "--labels", "0-2", "--per-label", 1, "--steps", 4, "--diffusion-steps", 4, "--quiet"]
    grid = tmp_path / "grid.png"
    assert gen_exit(*base, "--sampler", "cspd", "--draft", draft, "--window", 2, "-o", grid) == 0 and grid.is_file()
    capsys.readouterr()
    bad = {"which a draft or refiner must share": ["--sampler", "cspd", "--draft", other],
           "--steps must be >= 1": ["--sampler", "cspd", "--draft", draft, "--steps", 0],
           "needs a draft": ["--sampler", "cspd"],
           "temperature > 0": ["--sampler", "cspd", "--draft", draft, "--temperature", 0]}
    for message, extra in bad.items():
        assert gen_exit(*base, *extra, "-o", tmp_path / "bad.png") == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
        assert not (tmp_path / "bad.png").exists()
