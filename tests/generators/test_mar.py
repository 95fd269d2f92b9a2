"""MAR (LTH14/mar): the official checkpoint layout is pinned and imports (EMA by default, raw weights on request);
encoder/decoder outputs, diffusion-head predictions and sampled tokens equal values recorded from the official
code on the same seeded weights; the mask schedule, the truncated-normal mask ratio and the respaced cosine
diffusion follow the official formulas; the loss draws its randomness per sample (a batch split in two gives the
same total); the plain sampler counts its passes and is seeded through its generator only.

Parity was checked in a scratch copy of LTH14/mar@fe470ac on random weights (patch sizes 1 and 2): encoder/decoder,
head, p_mean_variance, training loss and sampled tokens (cfg 1 / 3 linear / 2 constant, temperatures 1 and 0.9)
all equal to 0.0 max-abs; rows with different numbers of known tokens (the padded encoder) within 1.7e-6. The
values below were recorded from the official code then; the repository holds no official code.
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from generators.base import build_preset
from generators.mar import official
from generators.mar.diffusion import GaussianDiffusion, cosine_betas, sample_trajectory, space_timesteps
from generators.mar.model import MAR, MARConfig, truncated_normal_mask_ratio
from generators.mar.plain import make_predict, mask_schedule
from vision.hub import HubError, resolve_model
from vision.tokens import TokenSpec

DATA = Path(__file__).resolve().parents[1] / "data" / "mar_base_keys.json"

# LTH14/mar@fe470ac, MAR(img_size=32, vae_stride=8, patch_size=1, encoder/decoder 32 wide, 1 block, 4 heads,
# vae_embed_dim=2, class_num=5, buffer_size=2, diffloss_d=2, diffloss_w=32, num_sampling_steps="6") with every
# weight N(0, 0.1) (+1 on LayerNorm weights) drawn in sorted key order from torch.Generator().manual_seed(0)
RECORDED = {
    "z": [[[0.003454945981502533, -0.9228521585464478, 0.2478177696466446, -1.6435070037841797],
           [0.20416361093521118, -0.9910741448402405, 0.4031521677970886, -0.8713237643241882],
           [-0.24042223393917084, -1.0612939596176147, -0.4025406241416931, -0.3925936222076416]],
          [[-0.8166519999504089, -0.16693919897079468, 1.365830659866333, 1.60255765914917],
           [0.6781287789344788, 0.39908379316329956, 0.4376719295978546, -0.7478004693984985],
           [-1.4412139654159546, -0.561227023601532, 0.274536669254303, 0.12412535399198532]]],
    "z_sum": -25.760799407958984,
    "head": [[0.5499705076217651, -0.08333370089530945, -1.2398524284362793, 0.4300118386745453],
             [-0.38934341073036194, -1.2065399885177612, -0.5803856253623962, -0.5653125047683716],
             [0.3538408577442169, -0.8187052607536316, -0.7169824838638306, -0.8716616630554199]],
    "tokens": [[-15083.13671875, -18127.5546875], [47212.51171875, 14970.884765625],
               [23739.447265625, 35676.60546875]],
}


def seeded_model(**overrides) -> MAR:
    model = MAR(MARConfig(**{**dict(num_classes=5, grid=(4, 4), downsample=8, channels=2, encoder_dim=32,
                                    encoder_depth=1, encoder_heads=4, decoder_dim=32, decoder_depth=1, decoder_heads=4,
                                    buffer_size=2, diffloss_depth=2, diffloss_width=32, diffusion_batch_mul=1),
                             **overrides}))
    g = torch.Generator().manual_seed(0)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            ones = name.endswith(("norm1.weight", "norm2.weight", "_ln.weight", "norm.weight", "in_ln.weight"))
            state[name].copy_(torch.randn(state[name].shape, generator=g) * 0.1 + (1.0 if ones else 0.0))
    return model.eval()


def test_outputs_equal_the_official_values_on_the_same_weights():
    model = seeded_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, generator=g)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 6:] = True
    with torch.no_grad():
        z = model(x, ~mask, model.class_embedding(torch.tensor([1, 4]), 2, False))
        y, t, c = torch.randn(3, 2, generator=g), torch.tensor([0, 500, 999]), torch.randn(3, 32, generator=g)
        head = model.head(y, t, c)
        noise, zz = torch.randn(3, 6, 2, generator=g), torch.randn(6, 32, generator=g)
        diffusion = GaussianDiffusion(6)
        tokens = sample_trajectory(diffusion, make_predict(model, diffusion, zz[:3], zz[3:], 2.0), noise, 0.9)
    assert torch.allclose(z[:, :3, :4], torch.tensor(RECORDED["z"]), atol=1e-5)
    assert abs(float(z.sum()) - RECORDED["z_sum"]) < 1e-4
    assert torch.allclose(head, torch.tensor(RECORDED["head"]), atol=1e-5)
    assert torch.allclose(tokens, torch.tensor(RECORDED["tokens"]), rtol=1e-5)


def pinned_keys() -> dict[str, tuple]:
    return {k: tuple(v) for k, v in json.loads(DATA.read_text())["keys"].items()}


MAR_BASE_ARGS = argparse.Namespace(model="mar_base", img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16,
                                   buffer_size=64, diffloss_d=6, diffloss_w=1024, diffusion_batch_mul=4,
                                   num_sampling_steps="100", class_num=1000)


def test_official_keys_and_shapes_are_pinned():
    keys = pinned_keys()
    state = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    config = official.official_config(state, vars(MAR_BASE_ARGS), "checkpoint-last.pth")
    assert (config.encoder_dim, config.encoder_depth, config.encoder_heads, config.decoder_depth, config.channels,
            config.grid, config.buffer_size, config.diffloss_depth, config.diffloss_width, config.num_classes,
            config.mlp_ratio) == (768, 12, 12, 12, 16, (16, 16), 64, 6, 1024, 1000, 4.0)
    assert official.official_config(state, {}, "x.pth").encoder_heads == 12  # without args: from the width
    with torch.device("meta"):
        model = MAR(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys  # every name maps to itself


def tiny_checkpoint(tmp_path, **extra) -> tuple[Path, dict]:
    config = MARConfig(num_classes=4, grid=(4, 4), downsample=16, channels=3, encoder_dim=32, encoder_depth=2,
                       encoder_heads=4, decoder_dim=32, decoder_depth=1, decoder_heads=4, buffer_size=3,
                       diffloss_depth=2, diffloss_width=48)
    raw, ema = MAR(config).state_dict(), MAR(config).state_dict()
    args = argparse.Namespace(model="mar_base", patch_size=1, vae_embed_dim=3, vae_stride=16, img_size=64,
                              buffer_size=3, diffusion_batch_mul=4)
    obj = {"model": raw, "model_ema": ema, "args": args, "epoch": 399, "optimizer": {"state": {}, "param_groups": []},
           "scaler": {"scale": np.float64(65536.0)}, **extra}
    path = tmp_path / "checkpoint-last.pth"
    torch.save(obj, path)
    return path, obj


def test_checkpoint_loads_ema_by_default_and_raw_on_request(tmp_path, monkeypatch):
    path, obj = tiny_checkpoint(tmp_path)
    monkeypatch.setitem(official.HEADS_BY_MODEL, "mar_base", 4)  # the tiny file's widths are not MAR-B's
    model = resolve_model(path, kind="generator")
    assert isinstance(model, MAR) and model.spec == TokenSpec("continuous", (4, 4), 16, channels=3)
    assert torch.equal(model.z_proj.weight, obj["model_ema"]["z_proj.weight"])
    assert model.sampling_defaults["cfg"] == 1.0 and model.sampling_defaults["steps"] == 64
    raw = official.load(path, weights="model")
    assert torch.equal(raw.z_proj.weight, obj["model"]["z_proj.weight"])
    monkeypatch.setenv("TESSERA_MAR_WEIGHTS", "model")
    assert torch.equal(resolve_model(path).z_proj.weight, obj["model"]["z_proj.weight"])
    bad = dict(obj["model_ema"])
    bad.pop("encoder_norm.weight")
    torch.save({"model_ema": bad, "model": bad, "args": obj["args"]}, tmp_path / "broken.pth")
    with pytest.raises(HubError, match="missing keys"):
        official.load(tmp_path / "broken.pth")
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    assert not official.recognise(torch.load(tmp_path / "other.pth", weights_only=True))


def test_only_plain_data_is_unpickled_beside_the_weights(tmp_path, monkeypatch):
    """The training arguments (an argparse.Namespace) load under weights_only; any other class in the file is
    refused with one line before anything from it runs."""
    monkeypatch.setitem(official.HEADS_BY_MODEL, "mar_base", 4)
    path, _ = tiny_checkpoint(tmp_path)
    assert isinstance(resolve_model(path, kind="generator"), MAR)
    odd, _ = tiny_checkpoint(tmp_path / "odd", extra_object=Path("/tmp")) if (tmp_path / "odd").mkdir() is None else None
    with pytest.raises(HubError, match="refusing to unpickle") as err:
        resolve_model(odd, kind="generator")
    assert "\n" not in str(err.value)


def test_mask_schedule_is_the_official_one():
    def official_schedule(seq_len, num_iter):  # models/mar.py sample_tokens, restated
        mask, groups, lens = seq_len, [], []
        for step in range(num_iter):
            mask_len = max(1, min(mask - 1, int(np.floor(seq_len * np.cos(math.pi / 2. * (step + 1) / num_iter)))))
            groups.append(mask if step >= num_iter - 1 else mask - mask_len)
            lens.append(mask_len)
            mask = mask_len
        return groups, lens

    for n, steps in ((256, 64), (256, 256), (64, 16), (16, 6), (4, 8), (2, 2), (1, 3)):
        s = mask_schedule(n, steps)
        groups, lens = official_schedule(n, steps)
        assert [h - lo for lo, h in zip(s.lo, s.hi)] == groups and list(s.mask_len) == lens
        assert sum(groups) == n and s.lo[-1] == 0
    linear = mask_schedule(64, 16).guidance(3.0, "linear", 64)
    assert linear[0] == 1 + 2.0 * (64 - 63) / 64 and linear[-1] == 1 + 2.0 * 63 / 64  # the last step reads mask_len 1
    assert mask_schedule(64, 16).guidance(3.0, "constant", 64) == [3.0] * 16


def test_mask_ratio_is_the_truncated_normal():
    u = torch.linspace(0, 0.999, 50, dtype=torch.float64)
    expected = scipy_stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).ppf(u.numpy())
    assert np.allclose(truncated_normal_mask_ratio(u, 0.7).numpy(), expected, atol=1e-9)


def test_respaced_cosine_diffusion():
    betas = cosine_betas()
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert betas[0] == pytest.approx(1 - f(0.001) / f(0)) and betas[-1] == 0.999
    assert sorted(space_timesteps(1000, "100"))[:3] == [0, 10, 20] and len(space_timesteps(1000, "100")) == 100
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    d = GaussianDiffusion(25)
    assert d.num_timesteps == 25 and d.timestep_map[0] == 0 and d.timestep_map[-1] == 999
    full = np.cumprod(1 - betas)
    kept = d.timestep_map.numpy()
    assert np.allclose(d.tables["alphas_cumprod"].numpy(), full[kept], rtol=1e-12)  # respacing keeps alphas_cumprod
    with pytest.raises(ValueError):
        GaussianDiffusion(1)


def loss_batch(indices, seed_offset=0):
    g = torch.Generator().manual_seed(42)
    latents = torch.randn(8, 2, 4, 4, generator=g)
    labels = torch.randint(0, 5, (8,), generator=g)
    idx = torch.tensor(indices)
    return {"latents": latents[idx], "labels": labels[idx], "seed": idx + 1000 + seed_offset}


def test_loss_draws_per_sample_so_a_split_batch_gives_the_same_total():
    model = seeded_model(attn_dropout=0.0, proj_dropout=0.0, diffusion_batch_mul=2).train()  # dropout: global RNG
    whole, whole_m = model.loss(loss_batch(range(8)))
    part_a, a_m = model.loss(loss_batch(range(5)))
    part_b, b_m = model.loss(loss_batch(range(5, 8)))
    total = (part_a * a_m["masked_tokens"] + part_b * b_m["masked_tokens"]) / (a_m["masked_tokens"] + b_m["masked_tokens"])
    assert whole_m["masked_tokens"] == a_m["masked_tokens"] + b_m["masked_tokens"]
    assert torch.allclose(whole, total, rtol=1e-5)
    other, _ = model.loss(loss_batch(range(8), seed_offset=1))  # other seeds: other masks, timesteps and noise
    assert not torch.allclose(whole, other)
    assert 0.7 <= whole_m["mask_ratio"] <= 1.0


def test_loss_trains_the_model():
    torch.manual_seed(0)
    model = MAR(MARConfig(num_classes=2, grid=(2, 2), downsample=8, channels=2, encoder_dim=32, encoder_depth=1,
                          encoder_heads=4, decoder_dim=32, decoder_depth=1, decoder_heads=4, buffer_size=1,
                          diffloss_depth=1, diffloss_width=32, attn_dropout=0.0, proj_dropout=0.0)).train()
    latents = torch.tensor([[1.0, -1.0], [0.5, 0.5]])[:, :, None, None].expand(2, 2, 2, 2).repeat(16, 1, 1, 1)
    batch = {"latents": latents, "labels": torch.arange(2).repeat(16)}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _ = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_plain_sampler_counts_passes_and_uses_only_its_generator():
    model = seeded_model()
    torch.manual_seed(123)
    a, stats = model.generate(torch.tensor([0, 3]), steps=5, diffusion_steps=4, cfg=2.0,
                              generator=torch.Generator().manual_seed(7))
    state = torch.random.get_rng_state()
    b, _ = model.generate(torch.tensor([0, 3]), steps=5, diffusion_steps=4, cfg=2.0,
                          generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not touched
    assert stats.nfe == 5 and a.latents.shape == (2, 2, 4, 4) and torch.equal(a.latents, b.latents)
    c, _ = model.generate(torch.tensor([0, 3]), steps=5, diffusion_steps=4, cfg=2.0,
                          generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.latents, c.latents)
    with pytest.raises(ValueError, match="--diffusion-steps must be >= 2"):
        model.generate(torch.tensor([0]), diffusion_steps=1)
    with pytest.raises(ValueError, match="--cfg-schedule must be one of"):
        model.generate(torch.tensor([0]), cfg_schedule="cosine")


def test_padded_rows_equal_rows_run_alone():
    model = seeded_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 2, generator=g)
    visible = torch.rand(3, 16, generator=g) < torch.tensor([[0.2], [0.6], [0.9]])
    cls = model.class_embedding(torch.tensor([0, 1, 2]), 3, False)
    with torch.no_grad():
        together = model(x, visible, cls)
        alone = torch.cat([model(x[i:i + 1], visible[i:i + 1], cls[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_mnist_presets():
    spec = TokenSpec("continuous", (8, 8), 4, channels=4)
    target = build_preset("mar-mnist", spec, 10, "kl-mnist")
    draft = build_preset("mar-mnist-small", spec, 10, "kl-mnist")
    assert target.spec == draft.spec == spec and target.seq_len == 64 and target.token_dim == 4
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(draft) < n(target) / 3
    assert target.sampling_defaults["steps"] == 16 and target.sampling_defaults["cfg"] == 2.0
