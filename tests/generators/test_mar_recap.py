"""ReCAP for MAR (generators/mar/recap.py): a cheap step on a fresh cache gives the full pass's conditions; with
every group one step it is plain MAR sampling, token for token (up to the official last-step guidance scale);
the sampled tokens equal values recorded from the official ReCAP-MAR code on the same weights, orders and noise;
bad options are one-line errors, and `python -m apps.generate --sampler recap` writes a grid or exits 2.

Parity: liebenxj/ReCAP@4d1da38 `examples/MAR+ReCAP/models/mar.py` `sample_tokens(..., cache_buffer=False)` (the
scripts' setting), run in a scratch copy on CPU in float64 (`.cuda()` made a no-op; `DiffLoss.sample` fed the
same noise as `noise_fn`, and its float32 timestep embedding cast to float64 as ours is; `sample_orders`
returning ORDERS) against `sample_latents` with the same seeded MAR (encoder and decoder 2 blocks, width 32,
4 heads, buffer 2, 4x4 grid of 2 channels) and 6 evenly spaced diffusion steps, four settings (CASES):
one cheap step without guidance; two cheap steps after one full-only step with linear guidance 2.5 at
temperature 0.9; three cheap steps after two full-only steps with constant guidance 2 (a last group of one
step); no cheap steps with linear guidance 3 (the official last-step scale). All sampled tokens agreed to
2.6e-7 relative (max abs 0.0114 on tokens of magnitude up to 5.4e4: the random head blows them up, and the
official diffusion gathers its coefficients in float32; on another CPU, with other float32 kernels, our tokens
are off the recorded ones by up to 0.04, so the test allows 4e-6 of the largest token). diff_fast_ratio is 0.5
in every case: the official code builds its fast diffusion at the first call, a full step, so every official
run uses 0.5 whatever it is passed (see generators/mar/recap.py). The repository holds no official code.
"""
import math

import pytest
import torch

from generators.mar import plain as mar_plain
from generators.mar import recap
from generators.mar.model import MAR, MARConfig
from generators.mar.plain import mask_schedule
from tests.helpers.tiny_mar import random_mar
from vision.tokens import GenerationStats


def tiny_mar(seed=0, **overrides):
    return random_mar(seed, depth=2, **overrides)


OPTS = dict(steps=6, diffusion_steps=4, diffusion_spacing="ddim", temperature=1.0)


def run_plain(model, labels, seed, **opts):
    with torch.no_grad():
        return mar_plain.sample_latents(model, labels, batch_size=len(labels),
                                        generator=torch.Generator().manual_seed(seed), stats=GenerationStats(), **opts)


def run_recap(model, labels, seed, stats=None, **opts):
    with torch.no_grad():
        return recap.sample_latents(model, labels, batch_size=len(labels), generator=torch.Generator().manual_seed(seed),
                                    stats=stats or GenerationStats(), **opts)


# ---------------------------------------------------------------------- (a) the cheap step is exact on a fresh cache


@pytest.mark.parametrize("guided", [False, True])
def test_a_cheap_step_on_a_fresh_cache_gives_the_full_pass_conditions(guided):
    model = tiny_mar()
    g = torch.Generator().manual_seed(3)
    B, N, D = 2, model.seq_len, model.token_dim
    cls = model.class_embedding(torch.tensor([1, 4]), B, guided)
    R = len(cls)
    tokens = torch.randn(R, N, D, generator=g, dtype=torch.float64)
    rank = torch.rand(B, N, generator=g).argsort(1).argsort(1).repeat(R // B, 1)
    known = rank >= 10  # 6 known tokens per row
    group = (rank >= 4) & (rank < 10)  # 6 masked positions the cheap steps would feed
    positions = group.nonzero()[:, 1].view(R, -1)
    with torch.no_grad():
        z_plain = model(tokens, known, cls)
        z, cache = model.forward_full(tokens, known, cls, group)
        cheap = model.forward_cheap(torch.zeros(R, 6, D, dtype=torch.float64), torch.zeros(R, 6, dtype=torch.bool),
                                    positions, cls, cache)
    assert (z - z_plain).abs().max() <= 1e-12  # the full step is MAR's pass
    assert [len(c) for c in cache.encoder] == [6, 6] and [len(c) for c in cache.decoder] == [10, 10]
    full_at_group = z.gather(1, positions[..., None].expand(-1, -1, z.shape[-1]))
    assert (cheap - full_at_group).abs().max() <= 1e-5
    assert (cheap - full_at_group).abs().max() <= 1e-12  # float64: the same numbers up to summation order
    # the cache matters: one taken from another state (a known token changed) gives other conditions
    other = tokens.clone()
    other[known.nonzero()[0, 0], known.nonzero()[0, 1]] += 1.0
    with torch.no_grad():
        _, stale = model.forward_full(other, known, cls, group)
        wrong = model.forward_cheap(torch.zeros(R, 6, D, dtype=torch.float64), torch.zeros(R, 6, dtype=torch.bool),
                                    positions, cls, stale)
    assert (wrong - full_at_group).abs().max() > 1e-3


def test_full_and_cheap_passes_leave_forward_and_the_cache_unchanged():
    model = tiny_mar()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 16, 2, generator=g, dtype=torch.float64)
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[:, :5] = True
    group = torch.zeros(2, 16, dtype=torch.bool)
    group[:, 5:9] = True
    cls = model.class_embedding(torch.tensor([0, 2]), 2, False)
    with torch.no_grad():
        _, cache = model.forward_full(tokens, known, cls, group)
        before = [kv.read()[0].clone() for kv in cache.decoder]
        visible = torch.tensor([[True, False, True, False]] * 2)
        model.forward_cheap(tokens[:, 5:9], visible, torch.arange(5, 9).expand(2, 4), cls, cache)
    assert all(torch.equal(b, kv.read()[0]) for b, kv in zip(before, cache.decoder))


# ---------------------------------------------------------------------- (b) one-step groups are plain MAR


@pytest.mark.parametrize("cfg,schedule", [(1.0, "linear"), (2.0, "constant"), (2.5, "linear")])
@pytest.mark.parametrize("cache_iters,pre_full,ratio", [(0, 0, 1.0), (0, 0, 0.5), (2, 6, 1.0)])
def test_one_step_groups_are_plain_sampling_token_for_token(cfg, schedule, cache_iters, pre_full, ratio):
    model = tiny_mar()
    labels = torch.tensor([0, 3, 4])
    opts = dict(OPTS, cfg=cfg, cfg_schedule=schedule)
    stats = GenerationStats()
    ours = run_recap(model, labels, 7, stats, num_cache_iters=cache_iters, pre_full_iters=pre_full,
                     diff_fast_ratio=ratio, **opts)
    assert torch.equal(ours, run_plain(model, labels, 7, **opts))
    assert stats.nfe == OPTS["steps"]


def test_the_official_last_step_guidance_differs_from_plain_only_at_the_last_step():
    """The official ReCAP-MAR scales the last step's guidance with mask_len 0 (plain MAR: 1); on request only."""
    model = tiny_mar()
    labels = torch.tensor([0, 3])
    opts = dict(OPTS, cfg=2.0, cfg_schedule="linear")
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    with torch.no_grad():
        a = mar_plain.sample_latents(model, labels, batch_size=2, generator=torch.Generator().manual_seed(0),
                                     stats=GenerationStats(), orders=orders, **opts)
    b = run_recap(model, labels, 0, num_cache_iters=0, pre_full_iters=0, diff_fast_ratio=1.0, orders=orders,
                  official_last_guidance=True, **opts)
    last = orders.argsort(1) < mask_schedule(16, OPTS["steps"]).hi[-1]  # the positions the last step decodes
    assert torch.equal(a[~last], b[~last])
    assert (a[last] - b[last]).abs().min() > 0
    official = recap.guidance_scales(16, 6, 2.0, "linear", official_last_guidance=True)
    assert official[-1] == 2.0 and official[:-1] == mask_schedule(16, 6).guidance(2.0, "linear", 16)[:-1]
    assert recap.guidance_scales(16, 6, 2.0, "linear") == mask_schedule(16, 6).guidance(2.0, "linear", 16)


def test_cheap_steps_run_and_change_the_samples(monkeypatch):
    model = tiny_mar()
    labels = torch.tensor([1, 2])
    calls = {"full": 0, "cheap": 0}
    for name in calls:
        method = getattr(MAR, f"forward_{name}")

        def counted(self, *a, _m=method, _n=name, **k):
            calls[_n] += 1
            return _m(self, *a, **k)

        monkeypatch.setattr(MAR, f"forward_{name}", counted)
    stats = GenerationStats()
    opts = dict(OPTS, steps=8, cfg=1.5, cfg_schedule="linear")
    ours = run_recap(model, labels, 1, stats, num_cache_iters=3, pre_full_iters=2, diff_fast_ratio=0.5, **opts)
    # groups 1, 1, 4, 2: two cached groups of one full and 3 + 1 cheap steps
    assert calls == {"full": 2, "cheap": 4} and stats.nfe == 8
    assert torch.isfinite(ours).all()
    assert not torch.allclose(ours, run_plain(model, labels, 1, **opts))


# ---------------------------------------------------------------------- (c) parity with the official code

ORDERS = [[9, 1, 6, 3, 4, 8, 13, 14, 0, 11, 12, 7, 2, 15, 5, 10], [9, 10, 2, 8, 0, 13, 7, 5, 4, 1, 14, 11, 6, 3, 12, 15]]
CASES = {
    "c1_pre0_cfg1": dict(steps=6, cfg=1.0, cfg_schedule="linear", temperature=1.0, pre_full_iters=0, num_cache_iters=1),
    "c2_pre1_cfg25lin": dict(steps=6, cfg=2.5, cfg_schedule="linear", temperature=0.9, pre_full_iters=1,
                             num_cache_iters=2),
    "c3_pre2_cfg2const": dict(steps=7, cfg=2.0, cfg_schedule="constant", temperature=1.0, pre_full_iters=2,
                              num_cache_iters=3),
    "c0_cfg3lin": dict(steps=5, cfg=3.0, cfg_schedule="linear", temperature=1.0, pre_full_iters=0, num_cache_iters=0),
}
# the official sample_tokens' output (patchified: 2 samples x 16 tokens x 2 values, flattened), 9 significant digits
RECORDED = {
    "c1_pre0_cfg1": [23925.9584, -16855.4601, 19248.5412, -16185.3601, 2164.39966, -14867.5155, 41792.4813, 7474.59327, -3547.25776, -438.044309, 23787.1902, -14904.8454, -8920.09928, -28294.8793, 18566.7513, -13042.0928, 6767.5115, 19981.3838, -13416.3866, 4020.21102, -13949.6807, 6517.04466, 35775.2948, -27687.9887, 15143.2307, -8045.12139, 16080.5863, 17240.5938, -23935.1266, -24164.568, 12422.5485, -6172.16453, 6026.49031, 21502.577, 12036.3891, -25507.034, -31460.0424, 40550.9302, 1854.34031, -15149.5813, -15974.5513, 14003.3563, 90.1128043, 11871.1157, 18681.2455, -13551.1707, 14577.4583, -8443.65668, -15552.4727, -21884.1195, 19904.7344, -26504.0027, 14835.1837, 1155.13008, 15264.8127, -492.490165, -22684.2414, -33259.5271, 10450.6402, 49774.7043, 16269.5544, -12349.6828, 14221.9989, 17556.4514],  # noqa: E501
    "c2_pre1_cfg25lin": [-13158.7211, 6114.85994, 20682.588, -14382.6461, -11983.9544, 11836.9743, 42877.8675, 9044.83291, -3551.52426, 3266.02884, -8158.48296, -2414.87404, -8355.16744, -28876.2374, -8671.76497, 14185.9383, 7407.72471, 22772.4316, -13361.105, 8560.11537, 21830.5957, -13939.7881, 19183.245, -8567.90263, 38486.5006, -30621.6007, 16553.0205, 18372.5422, -23828.5245, -22840.9334, 14704.5423, 2206.59823, 6557.63878, 21254.3365, 22173.1311, -19595.5115, -31585.3986, 40196.6517, -2911.97233, -1324.13032, -16234.9362, 14461.2709, 777.685564, 11762.5313, 9208.49472, -4321.75721, 14452.8209, -8478.50145, -16606.4236, -23199.6453, 19011.007, -29104.3485, 15726.7214, 1532.41921, 18787.9673, -13798.6777, 16674.7384, -6147.8402, 11115.7553, 49615.7032, 16200.4859, -13634.8162, -1148.4348, -15461.0629],  # noqa: E501
    "c3_pre2_cfg2const": [24621.3423, -16277.405, 14018.497, -14933.4603, 2228.94988, -14468.4437, 20030.528, -11150.6802, 38105.2423, -26016.918, -13497.9688, 6573.00457, 7368.85456, 338.799582, 14009.1913, -4762.17928, 18364.2839, -12456.2595, 17675.9034, 37350.1386, 22120.2313, -13706.94, -11417.5068, 23435.4024, 43302.8532, 8164.81134, 54110.1985, 37541.6781, -15455.222, 14461.3058, 16222.5534, -12814.6212, 10558.607, -27717.9808, -15843.3951, 10713.4141, -21303.4625, -19288.8994, 18597.9267, -16332.1902, 15544.3119, 1214.45875, 15764.1582, -12714.2851, 8873.09961, -3201.55413, 17911.2791, -11967.9883, -6073.23877, -29698.4619, 17974.1914, 250.039584, 3192.25721, -4479.73703, 24532.6479, -16288.9101, -23707.3677, -35641.7677, 34930.7005, -10208.9901, 3012.8128, 7400.33131, -2926.37698, -17009.2796],  # noqa: E501
    "c0_cfg3lin": [-6494.75102, -28021.5156, -9611.78312, 53463.3392, -14955.7727, 4714.03555, -582.73525, -34103.2495, 12314.415, -16999.2829, -10512.9638, 13376.6802, 15118.7018, -8241.879, 19411.0441, -13037.825, -31300.2089, 43390.6793, 19983.0562, -698.873503, 21840.4879, -13931.9054, 14121.7693, -2429.04935, -9143.9621, 4254.85092, 29505.2234, 19668.076, 13573.509, -7169.79334, 19896.2458, -15083.1199, 6951.87817, -13190.3447, -1554.85825, -15610.4037, -19779.7929, 38948.9941, -2993.22747, -1726.38177, 19170.2939, 22271.2409, 24221.3431, -20626.9385, -8833.2109, -4195.94302, 14967.2841, 1716.9844, 11954.3421, -13453.1817, 4167.45977, 5419.60754, 7544.76844, 15007.786, 21694.262, -36252.8018, -13874.9403, 10801.2151, 17540.3303, -29085.9162, -9353.66385, -113.677866, -1209.61869, -15515.1637],  # noqa: E501
}


def seeded_model() -> MAR:
    """Every weight N(0, 0.1) (+1 on LayerNorm weights), float64, drawn in sorted key order from seed 0."""
    model = MAR(MARConfig(num_classes=5, grid=(4, 4), downsample=8, channels=2, encoder_dim=32, encoder_depth=2,
                          encoder_heads=4, decoder_dim=32, decoder_depth=2, decoder_heads=4, buffer_size=2,
                          diffloss_depth=2, diffloss_width=32, diffusion_batch_mul=1, attn_dropout=0.0,
                          proj_dropout=0.0)).double()
    g = torch.Generator().manual_seed(0)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            ones = name.endswith(("norm1.weight", "norm2.weight", "_ln.weight", "norm.weight", "in_ln.weight"))
            state[name].copy_(torch.randn(state[name].shape, generator=g, dtype=torch.float64) * 0.1
                              + (1.0 if ones else 0.0))
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_equal_the_official_recap_mar(case):
    model = seeded_model()
    g = torch.Generator().manual_seed(5)
    ours = run_recap(model, torch.tensor([1, 3]), 0, orders=torch.tensor(ORDERS), diffusion_steps=6,
                     diffusion_spacing="even", diff_fast_ratio=0.5, official_last_guidance=True,
                     noise_fn=lambda n, K, D: torch.randn(n, K, D, generator=g, dtype=torch.float64), **CASES[case])
    recorded = torch.tensor(RECORDED[case], dtype=torch.float64)
    # float32 rounding (the official coefficient gather) differs between CPUs: measured 0.0114 and 0.04 of tokens
    # up to 5.4e4 on two machines; a wrong step moves tokens by thousands
    assert (ours.flatten() - recorded).abs().max() <= 4e-6 * recorded.abs().max()


# ---------------------------------------------------------------------- (d) bad arguments


@pytest.mark.parametrize("given,says", [
    (dict(num_cache_iters=-1), "--num-cache-iters must be >= 0"),
    (dict(pre_full_iters=7, steps=6), "--pre-full-iters must lie in [0, --steps = 6]"),
    (dict(diff_fast_ratio=0.0), "--diff-fast-ratio must lie in (0, 1]"),
    (dict(diff_fast_ratio=1.5), "--diff-fast-ratio must lie in (0, 1]"),
    (dict(diff_fast_ratio=-0.2), "--diff-fast-ratio must lie in (0, 1]"),
    (dict(diff_fast_ratio=0.3, diffusion_steps=4), "leaves 1 diffusion step(s)"),
    (dict(diff_fast_ratio=0.37, diffusion_steps=100, diffusion_spacing="ddim"), "integer stride"),
])
def test_bad_options_are_one_line_value_errors(given, says):
    model = tiny_mar()
    with pytest.raises(ValueError) as e:
        model.sampling_options("recap", **given)
    assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:  # the sampler itself refuses them too
        run_recap(model, torch.tensor([0]), 0, **{**dict(OPTS, cfg=1.0, cfg_schedule="linear", num_cache_iters=1,
                                                         pre_full_iters=0, diff_fast_ratio=0.5), **given})
    assert says in str(e.value)


def test_defaults_are_the_official_runs():
    options = tiny_mar().sampling_options("recap")
    assert (options["num_cache_iters"], options["pre_full_iters"], options["diff_fast_ratio"]) == (1, 0, 0.5)
    assert recap.fast_diffusion_steps(25, 0.4) == 10 and recap.fast_diffusion_steps(100, 0.5) == 50


# ---------------------------------------------------------------------- (e) through apps.generate


def test_apps_generate_runs_recap_and_refuses_bad_options_in_one_line(tmp_path, capsys):
    from apps import generate
    from vision.cli import run
    from vision.hub import save_pretrained

    model = tiny_mar(0, tokenizer="kl-mnist", num_classes=10, grid=(8, 8), channels=4).float()
    path = str(save_pretrained(model, tmp_path / "mar"))

    def gen_exit(*argv) -> int:
        with pytest.raises(SystemExit) as e:
            run(generate.main, [str(a) for a in argv])
        return e.value.code

    base = ["--model", path, "--labels", "0-2", "--per-label", 1, "--steps", 4, "--diffusion-steps", 4,
            "--diffusion-spacing", "ddim", "--sampler", "recap", "--quiet"]
    grid = tmp_path / "grid.png"
    assert gen_exit(*base, "--num-cache-iters", 2, "--diff-fast-ratio", 0.5, "-o", grid) == 0 and grid.is_file()
    capsys.readouterr()
    bad = {"--diff-fast-ratio must lie in (0, 1]": ["--diff-fast-ratio", 1.5],
           "--pre-full-iters must lie in [0, --steps = 4]": ["--pre-full-iters", 5],
           "--num-cache-iters must be >= 0": ["--num-cache-iters", -1],
           "is not an option of --sampler recap": ["--group-order", "confidence"]}
    for message, extra in bad.items():
        assert gen_exit(*base, *extra, "-o", tmp_path / "bad.png") == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
        assert not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------------- the benchmark's MAR part


@pytest.mark.parametrize("quick", [True, False])
def test_benchmark_reports_the_mar_figures(quick):
    from apps.benchmarks import recap as bench

    sampling = {"steps": 4, "diffusion_steps": 4, "diffusion_spacing": "ddim", "cfg": 1.5, "cfg_schedule": "linear"}
    model = tiny_mar(sampling=sampling, num_classes=10)
    seen = []

    def quality(model, tokenizer, run, *, per_class, seed=0):
        seen.append((run.sampler, run.options.get("pre_full_iters"), per_class))
        return {"fd": 10.0 + seed, "accuracy": 0.5}

    figures = bench.measure_mar(model, None, quick, quality=quality)
    for key in ("mar_speedup", "mar_flop_ratio", "mar_fd_plain", "mar_fd_recap", "mar_accuracy_plain",
                "mar_accuracy_recap"):
        assert math.isfinite(figures[key]), key
    assert figures["mar_steps"] == 4 and figures["mar_pre_full_iters"] == 2  # half the model's steps
    # 4 steps, 2 full-only, then one group of a full and a cheap step: the cheap one saves transformer work
    assert figures["mar_flop_ratio"] > 1.0
    assert seen[1] == ("recap", 2, 20 if quick else 100)
    assert ("mar_c3_p2_r50_fd" in figures) != quick and ("mar_fd_noise" in figures) != quick
