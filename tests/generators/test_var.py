"""VAR transformer: the official key list, the importer (against a plain re-statement of VAR's forward pass),
cached == uncached logits, block causality, the one-pass prefill, the guidance ramp, the loss, the sampler's
options and the MNIST presets.

Parity with the official code itself (FoundationVision/VAR at 78b9539, run in a scratch folder on the same
random weights, patch_nums 1..16, V 4096, a d3 model and a 256-px VQVAE): teacher-forced logits and next-scale
inputs equal to the bit, and generation with the same seed gave the same token maps and images (max |diff| 0)
at top-k 1, at the FID settings (cfg 1.5, top-k 900, top-p 0.96) and at cfg 4 without filtering."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from generators.base import build_preset
from generators.sampling import cfg_var
from generators.var import plain
from generators.var.model import VAR, distillation_kl
from generators.var.official import from_official, map_key, official_config
from tests.helpers.tiny_var import PATCH_NUMS, random_scale_ids, tiny_var, tiny_vqvae
from vision.hub import HubError, check_state_dict, resolve_model, save_pretrained

DATA = Path(__file__).resolve().parents[1] / "data"


def official_d16_keys() -> dict[str, tuple]:
    return {k: tuple(v) for k, v in json.loads((DATA / "var_d16_keys.json").read_text())["keys"].items()}


def meta_state(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.fixture(scope="module")
def tok():
    return tiny_vqvae()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_var(tok)


# ----------------------------------------------------------------------------- official checkpoints


def test_every_official_d16_key_maps_onto_the_model():
    shapes = official_d16_keys()
    assert len(shapes) == 220
    config = official_config(meta_state(shapes), "var_d16.pth")
    assert (config.depth, config.embed_dim, config.num_heads, config.vocab_size, config.cvae, config.num_classes,
            config.patch_nums, config.mlp_ratio, config.attn_l2_norm, config.shared_aln, config.tokenizer) == \
        (16, 1024, 16, 4096, 32, 1000, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 4.0, True, False, None)
    with torch.device("meta"):
        m = VAR(config)
    mapped = {map_key(k): v for k, v in meta_state(shapes).items() if map_key(k) is not None}
    # 220 = 202 weights + 16 zero_k_bias + lvl_1L + attn_bias_for_masking (recomputed, checked on import)
    assert len(mapped) == 202
    check_state_dict(m.state_dict(), mapped, "var_d16.pth")
    assert sum(p.numel() for p in m.parameters()) == 310_283_520  # VAR-d16's 310M
    with pytest.raises(KeyError):
        map_key("blocks.0.attn.extra")


def official_names(model: VAR) -> dict[str, str]:
    """Tessera key -> official key, from the pinned d16 list (block 0's names for every block)."""
    keys = official_d16_keys()
    names = {}
    for k in keys:
        for i in range(model.config.depth):
            official = k.replace("blocks.0.", f"blocks.{i}.")
            if map_key(official) is not None:
                names[map_key(official)] = official
    return names


def official_state_of(model: VAR) -> dict[str, torch.Tensor]:
    """`model`'s weights as a released var_dN.pth holds them (with the buffers VAR stores)."""
    names = official_names(model)
    state = {names[k]: v.clone() for k, v in model.state_dict().items()}
    L = model.L
    levels = model.lvl_1L.clone()
    state["lvl_1L"] = levels
    d = levels.view(1, L, 1)
    state["attn_bias_for_masking"] = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).view(1, 1, L, L)
    for i in range(model.config.depth):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(model.config.embed_dim)
    return state


def restated_logits(sd: dict, labels, x, patch_nums, heads: int, eps: float = 1e-6):
    """VAR's teacher-forced forward pass written out from the paper's description, on official key names."""
    W = sd["class_emb.weight"]
    B, C = len(labels), W.shape[1]
    level = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])
    L, hd = len(level), C // heads
    cond = W[labels]
    h = torch.cat([cond[:, None] + sd["pos_start"], x @ sd["word_embed.weight"].T + sd["word_embed.bias"]], 1)
    h = h + sd["lvl_embed.weight"][level] + sd["pos_1LC"]
    bias = torch.where(level[:, None] >= level[None, :], 0.0, -math.inf)

    def ln(t):
        return F.layer_norm(t, (C,), eps=eps)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        ada = F.silu(cond) @ p("ada_lin.1.weight").T + p("ada_lin.1.bias")
        g1, g2, s1, s2, b1, b2 = ada.view(B, 1, 6, C).unbind(2)
        a = ln(h) * (1 + s1) + b1
        qkv = a @ p("attn.mat_qkv.weight").T + torch.cat([p("attn.q_bias"), torch.zeros(C), p("attn.v_bias")])
        q, k, v = qkv.view(B, L, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q = q / q.norm(dim=-1, keepdim=True) * p("attn.scale_mul_1H11").clamp(max=math.log(100)).exp()
        k = k / k.norm(dim=-1, keepdim=True)
        att = ((q @ k.transpose(-1, -2) + bias).softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
        h = h + (att @ p("attn.proj.weight").T + p("attn.proj.bias")) * g1
        f = ln(h) * (1 + s2) + b2
        f = F.gelu(f @ p("ffn.fc1.weight").T + p("ffn.fc1.bias"), approximate="tanh")
        h = h + (f @ p("ffn.fc2.weight").T + p("ffn.fc2.bias")) * g2
    s, b = (F.silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]).view(B, 1, 2, C).unbind(2)
    return (ln(h) * (1 + s) + b) @ sd["head.weight"].T + sd["head.bias"]


def test_official_file_loads_through_the_hub_and_matches_the_restatement(tmp_path, tok):
    ref = tiny_var(tok, seed=3, depth=2, width=48, heads=3)
    state = official_state_of(ref)
    path = tmp_path / "var_d2.pth"
    torch.save(state, path)
    loaded = resolve_model(path, kind="generator")
    assert isinstance(loaded, VAR) and loaded.config.patch_nums == PATCH_NUMS and loaded.config.num_heads == 3
    loaded.bind_tokenizer(tok)
    labels = torch.tensor([0, 4, 10])  # 10: the null class
    x = tok.scales_to_var_input(random_scale_ids(3, seed=1))
    with torch.no_grad():
        ours = loaded(labels, x)
        assert torch.equal(ours, ref(labels, x))
        expected = restated_logits(state, labels, x, PATCH_NUMS, heads=3)
    assert ours.dtype == torch.float32 and ours.abs().max() > 1
    assert (ours - expected).abs().max() <= 1e-5


def test_apps_generate_takes_an_official_file_and_its_vae(tmp_path):
    """python -m apps.generate --model var_dN.pth --vae VAE --labels ... --cfg 1.5 --top-k 1: the images are the
    decoded tokens of the model's own greedy sampling, seeded as apps.generate seeds its batches."""
    from PIL import Image

    from apps import generate
    from vision.cli import run

    tok = tiny_vqvae(ch_mult=(1, 1, 1, 1, 1))  # 16x downsampling, as every released VAR expects
    ref = tiny_var(tok, seed=4)
    torch.save(official_state_of(ref), tmp_path / "var_d2.pth")
    vae = save_pretrained(tok, tmp_path / "vae")
    with pytest.raises(SystemExit) as e:
        run(generate.main, ["--model", str(tmp_path / "var_d2.pth"), "--vae", str(vae), "--labels", "2,7",
                            "--per-label", "1", "--cfg", "1.5", "--top-k", "1", "--out-dir", str(tmp_path / "out"),
                            "--json", str(tmp_path / "stats.json"), "--quiet"])
    assert e.value.code == 0 and json.loads((tmp_path / "stats.json").read_text())["nfe"] == len(PATCH_NUMS)
    g = torch.Generator().manual_seed(generate.batch_seed(0, 0))
    tokens, _ = ref.generate(torch.tensor([2, 7]), generator=g, cfg=1.5, top_k=1)
    with torch.no_grad():
        expected = ((tok.decode(tokens) + 1) * 127.5).round().clamp(0, 255)
    for i, label in enumerate((2, 7)):
        png = torch.from_numpy(np.array(Image.open(tmp_path / "out" / str(label) / "00000.png")))
        assert png.shape == (64, 64, 3)
        assert (png.permute(2, 0, 1).float() - expected[i]).abs().max() <= 1


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"blocks.0.attn.extra": torch.zeros(1)}), "unexpected key 'blocks.0.attn.extra'"),
    (lambda s: s["attn_bias_for_masking"].zero_(), "buffer 'attn_bias_for_masking'"),
    (lambda s: s["blocks.1.attn.zero_k_bias"].fill_(1), "zero_k_bias"),
    (lambda s: s.pop("head.bias"), "missing keys"),
])
def test_a_foreign_official_file_is_refused(tmp_path, tok, edit, message):
    state = official_state_of(tiny_var(tok))
    edit(state)
    with pytest.raises(HubError, match=message):
        from_official(state, tmp_path / "var_d2.pth")


# ----------------------------------------------------------------------------- cache, causality, prefill


def cached_logits(model: VAR, labels, x):
    """Scale by scale on the KV cache, the inputs given (as the sampler feeds them)."""
    state = plain.new_state(model, labels, cfg=0.0)
    lvl_pos = model.level_positions()
    out = []
    for k in range(model.num_scales):
        if k:
            state.next_input = x[:, model.begin_ends[k][0] - model.first_l: model.begin_ends[k][1] - model.first_l]
        out.append(model.run(plain.step_input(model, state, k, lvl_pos), state.cond_BD, caches=state.caches))
    return torch.cat(out, 1)


def test_cached_logits_equal_uncached(model, tok):
    labels = torch.tensor([1, 7, 10])
    x = tok.scales_to_var_input(random_scale_ids(3, seed=2))
    with torch.no_grad():
        full = model(labels, x)
        assert (cached_logits(model, labels, x) - full).abs().max() <= 1e-5
        # the one-pass block-causal prefill of scales 0..2, then scale 3 cached, gives the same logits
        state = plain.new_state(model, labels, cfg=0.0)
        inputs = [x[:, b - 1: e - 1] for b, e in model.begin_ends[1:]]
        prefix = plain.prefill(model, state, inputs[:2])
        assert len(state.caches[0]) == model.begin_ends[2][1]
        assert (prefix - full[:, model.begin_ends[2][0]: model.begin_ends[2][1]]).abs().max() <= 1e-5
        state.next_input = inputs[2]
        last = model.run(plain.step_input(model, state, 3, model.level_positions()), state.cond_BD, caches=state.caches)
        assert (last - full[:, model.begin_ends[3][0]:]).abs().max() <= 1e-5


def test_logits_of_a_scale_do_not_depend_on_later_scales(model, tok):
    labels = torch.tensor([2, 5])
    a = random_scale_ids(2, seed=3)
    for k in range(len(PATCH_NUMS) - 1):
        b = [s.clone() for s in a]
        b[k] = (b[k] + 1) % tok.config.vocab_size  # scale k's tokens change: inputs of scales > k change
        with torch.no_grad():
            la = model(labels, tok.scales_to_var_input(a))
            lb = model(labels, tok.scales_to_var_input(b))
        seen = model.begin_ends[k][1]  # positions up to scale k never see scale k's own tokens
        assert torch.equal(la[:, :seen], lb[:, :seen])
        assert (la[:, seen:] - lb[:, seen:]).abs().max() > 1e-3
    # and truncating the sequence (what CoDe's drafter fine-tuning does) keeps the logits
    with torch.no_grad():
        x = tok.scales_to_var_input(a)
        assert (model(labels, x, end=14) - model(labels, x)[:, :14]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- sampling


def test_guidance_ramp_matches_a_hand_computation(model, tok):
    """Greedy (top-k 1) guided sampling picks, at every scale k, argmax((1 + t) cond - t uncond) with
    t = cfg k / (K - 1), the cond / uncond logits being the teacher-forced ones of the labels / the null class."""
    labels, cfg, K = torch.tensor([3, 8, 1]), 2.5, len(PATCH_NUMS)
    tokens, stats = model.generate(labels, generator=torch.Generator().manual_seed(0), cfg=cfg, top_k=1, top_p=1.0)
    assert stats.nfe == K
    x = tok.scales_to_var_input(tokens.scale_ids)
    with torch.no_grad():
        cond = model(labels, x)
        uncond = model(torch.full_like(labels, 10), x)
    for k, (b, e) in enumerate(model.begin_ends):
        t = cfg * k / (K - 1)
        by_hand = ((1 + t) * cond[:, b:e] - t * uncond[:, b:e]).argmax(-1)
        assert torch.equal(tokens.scale_ids[k].flatten(1), by_hand), k
    # the ramp is live: without guidance the last scale comes out differently
    plain_tokens, _ = model.generate(labels, generator=torch.Generator().manual_seed(0), cfg=0.0, top_k=1, top_p=1.0)
    assert torch.equal(plain_tokens.scale_ids[0], tokens.scale_ids[0])
    assert not torch.equal(plain_tokens.scale_ids[-1], tokens.scale_ids[-1])
    assert torch.equal(cfg_var(cond, uncond, 0.0), cond)


def test_sampling_is_seeded_and_follows_the_processed_distribution(model, tok):
    """Each scale is one categorical draw per position from softmax(filtered guided logits / temperature):
    with a top-k of 2 every sampled token is one of the two best of its position."""
    labels = torch.tensor([4, 4, 9])
    opts = dict(cfg=1.5, top_k=2, top_p=1.0, temperature=3.0)
    a, _ = model.generate(labels, generator=torch.Generator().manual_seed(5), **opts)
    b, _ = model.generate(labels, generator=torch.Generator().manual_seed(5), **opts)
    c, _ = model.generate(labels, generator=torch.Generator().manual_seed(6), **opts)
    assert all(torch.equal(x, y) for x, y in zip(a.scale_ids, b.scale_ids))
    assert any(not torch.equal(x, y) for x, y in zip(a.scale_ids, c.scale_ids))
    x = tok.scales_to_var_input(a.scale_ids)
    with torch.no_grad():
        cond, uncond = model(labels, x), model(torch.full_like(labels, 10), x)
    K = len(PATCH_NUMS)
    for k, (beg, end) in enumerate(model.begin_ends):
        t = 1.5 * k / (K - 1)
        top2 = ((1 + t) * cond[:, beg:end] - t * uncond[:, beg:end]).topk(2, -1).indices
        assert (top2 == a.scale_ids[k].flatten(1)[..., None]).any(-1).all()


def test_scale_temperature_and_more_smooth_options(model):
    labels = torch.tensor([1, 2])
    base = dict(generator=torch.Generator().manual_seed(1), cfg=1.0, top_k=0, top_p=1.0)
    a, _ = model.generate(labels, temperature=0.7, **base)
    base["generator"] = torch.Generator().manual_seed(1)
    b, _ = model.generate(labels, scale_temperature="0.7*4", **base)
    assert all(torch.equal(x, y) for x, y in zip(a.scale_ids, b.scale_ids))
    for bad, message in (("0.7*3", "gives 3 temperatures"), ("hot", "expected numbers"), ("-1*4", ">= 0")):
        with pytest.raises(ValueError, match=message):
            model.generate(labels, scale_temperature=bad)
    tokens, _ = model.generate(labels, more_smooth=1, generator=torch.Generator().manual_seed(1))
    assert tokens.latents is not None and tokens.latents.shape == (2, 8, 4, 4)
    hard = model.tokenizer.scales_to_fhat(tokens.scale_ids)
    assert (tokens.latents - hard).abs().max() > 1e-3  # the smooth sum is not the hard tokens' f_hat
    # the VQVAE decodes the smooth f_hat it is given, not the hard ids
    assert torch.equal(model.tokenizer.decode(tokens), model.tokenizer.fhat_to_images(tokens.latents))
    assert not torch.equal(model.tokenizer.decode(tokens), model.tokenizer.fhat_to_images(hard))
    with pytest.raises(ValueError, match="more-smooth must be one of"):
        model.generate(labels, more_smooth=2)


def test_official_sampling_defaults_and_own_defaults(tok):
    assert VAR.sampling_defaults == {"cfg": 1.5, "temperature": 1.0, "top_k": 900, "top_p": 0.96}
    m = tiny_var(tok, sampling={"cfg": 3.0, "top_k": 0})
    opts = m.sampling_options("plain")
    assert (opts["cfg"], opts["top_k"], opts["top_p"]) == (3.0, 0, 0.96)


def test_unconditional_labels_are_drawn_from_the_generator(model):
    a, _ = model.generate(None, batch_size=3, generator=torch.Generator().manual_seed(2))
    b, _ = model.generate(None, batch_size=3, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a.scale_ids, b.scale_ids))


# ----------------------------------------------------------------------------- loss and training


def batch_of(scale_ids, labels, seeds=None):
    batch = {f"scale_ids.{k}": s for k, s in enumerate(scale_ids)}
    batch["labels"] = labels
    if seeds is not None:
        batch["seed"] = seeds
    return batch


def test_loss_is_the_mean_cross_entropy_over_all_positions(model, tok):
    ids, labels = random_scale_ids(3, seed=4), torch.tensor([0, 5, 9])
    model.eval()
    loss, metrics = model.loss(batch_of(ids, labels))
    with torch.no_grad():
        logits = model(labels, tok.scales_to_var_input(ids))
    target = torch.cat([s.flatten(1) for s in ids], 1)
    by_hand = -logits.log_softmax(-1).gather(-1, target[..., None]).mean()
    assert abs(loss.item() - by_hand.item()) < 1e-5 and metrics["ce"] == pytest.approx(loss.item())
    # --train-scales 1:3: positions of scales 1 and 2 only
    model.set_train_scales(1, 3)
    try:
        part, _ = model.loss(batch_of(ids, labels))
    finally:
        del model.train_scales
    b, e = model.begin_ends[1][0], model.begin_ends[2][1]
    assert abs(part.item() + logits.log_softmax(-1).gather(-1, target[..., None])[:, b:e].mean().item()) < 1e-5
    with pytest.raises(ValueError, match="0 <= A < B <= 4"):
        model.set_train_scales(2, 5)


@pytest.mark.parametrize("rates", [dict(cond_drop_rate=0.5), dict(cond_drop_rate=0.0, drop_path_rate=0.5)])
def test_class_dropout_and_drop_path_follow_each_sample_seed(tok, rates):
    """Per-sample seeds: a batch's loss is the mean of its halves' losses (what makes 2 processes == 1)."""
    m = tiny_var(tok, **rates).train()
    ids, labels, seeds = random_scale_ids(4, seed=6), torch.tensor([1, 2, 3, 4]), torch.tensor([11, 12, 13, 14])
    whole, _ = m.loss(batch_of(ids, labels, seeds))
    halves = [m.loss(batch_of([s[i] for s in ids], labels[i], seeds[i]))[0] for i in (slice(0, 2), slice(2, 4))]
    assert abs(whole.item() - (halves[0] + halves[1]).item() / 2) < 1e-5
    assert abs(m.loss(batch_of(ids, labels, seeds))[0].item() - whole.item()) < 1e-6  # the same draws again
    m.eval()  # no dropout in eval: the loss differs from the training one (labels or branches were dropped)
    assert abs(m.loss(batch_of(ids, labels, seeds))[0].item() - whole.item()) > 1e-4


def test_loss_falls_on_a_tiny_overfit(tok):
    m = tiny_var(tok, cond_drop_rate=0.0).train()
    batch = batch_of(random_scale_ids(4, seed=7), torch.tensor([0, 1, 2, 3]))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, _ = m.loss(batch)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.5 * first


def test_distillation_term(tok):
    student, teacher = tiny_var(tok, seed=1), tiny_var(tok, seed=2)
    logits = torch.randn(6, 64)
    assert distillation_kl(logits, logits).abs() < 1e-6
    t = torch.randn(6, 64)
    by_hand = (t.softmax(-1) * (t.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).mean()
    assert abs(distillation_kl(logits, t) - by_hand) < 1e-5
    assert abs(distillation_kl(logits, t, 2.0) - 4 * distillation_kl(logits / 2, t / 2)) < 1e-5
    ids, labels = random_scale_ids(2, seed=8), torch.tensor([3, 4])
    student.eval()
    ce, _ = student.loss(batch_of(ids, labels))
    student.set_teacher(teacher, alpha=0.5)
    total, metrics = student.loss(batch_of(ids, labels))
    assert abs(total.item() - (0.5 * metrics["kd"] + 0.5 * ce.item())) < 1e-5 and metrics["kd"] > 0.01
    assert not any(p.requires_grad for p in teacher.parameters())
    assert "_teacher" in student.__dict__ and all(not k.startswith("_teacher") for k in student.state_dict())
    with pytest.raises(ValueError, match="must be a VAR"):
        student.set_teacher(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- presets


def test_mnist_presets_read_the_code_width_from_the_tokenizer(tmp_path):
    tok = tiny_vqvae()
    folder = save_pretrained(tok, tmp_path / "vq")
    big = build_preset("var-mnist-d6", tok.spec, 10, str(folder))
    small = build_preset("var-mnist-d2", tok.spec, 10, str(folder))
    assert (big.config.depth, big.config.embed_dim, small.config.depth, small.config.embed_dim) == (6, 128, 2, 96)
    assert big.config.cvae == small.config.cvae == 8 and big.spec == tok.spec
    assert big.config.tokenizer == str(folder)
    with pytest.raises(ValueError, match="multi-scale"):
        build_preset("var-mnist-d6", tiny_vqvae().spec.__class__("discrete", (4, 4), 2, vocab_size=64), 10, "x")
