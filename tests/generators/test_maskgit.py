"""MaskGIT: the plain sampler against MaskGIT's decoding rule computed by hand, the training loss's
masking and per-sample randomness, save/load, and the samplers' option checks through apps.generate."""
import json
import math
from pathlib import Path

import pytest
import torch

import generators.maskgit.samplers  # noqa: F401  (registers the samplers)
from apps import generate
from generators.maskgit.model import MaskGIT, MaskGITConfig
from generators.maskgit.official import map_key, official_config
from generators.recap import unmask_counts
from generators.sampling import gumbel_noise
from vision.cli import run
from vision.hub import HubError, from_pretrained, resolve_model, save_pretrained

VOCAB, GRID = 32, (4, 4)


def tiny(seed: int = 0, **extra) -> MaskGIT:
    torch.manual_seed(seed)
    config = dict(num_classes=5, vocab_size=VOCAB, grid=GRID, downsample=4, dim=32, depth=2, heads=4)
    return MaskGIT(MaskGITConfig(**{**config, **extra})).eval()


def test_unmask_counts_are_maskgits_cosine_schedule():
    # 64 tokens, 8 steps: mask_len_t = floor(64 cos(pi/2 (t+1)/8)) = 62, 59, 53, 45, 35, 24, 12; the last step
    # decodes the 12 left
    assert unmask_counts(64, 8) == [2, 3, 6, 8, 10, 11, 12, 12]
    # mask_len clamped to unknown - 1 keeps at least one token each step; 3 tokens in 4 steps
    assert unmask_counts(3, 4) == [1, 1, 0, 1]
    for n, steps in ((256, 16), (64, 12), (10, 3)):
        assert sum(unmask_counts(n, steps)) == n


def test_plain_step_follows_maskgit_rule_by_hand():
    """Run plain for 8 steps, record each forward's input, and recompute step 0 by hand with a twin
    generator: every position sampled, confidence log p + 4.5 (1 - 1/8) Gumbel, the top 2 kept."""
    model = tiny()
    seen = []
    forward = model.forward

    def recording(ids, labels, **kw):
        seen.append(ids.clone())
        return forward(ids, labels, **kw)

    model.forward = recording
    labels = torch.tensor([0, 3])
    model.generate(labels, sampler="plain", generator=torch.Generator().manual_seed(7), steps=8,
                   choice_temperature=4.5)
    assert len(seen) == 8
    masked = [int((ids == model.mask_id).sum(1)[0]) for ids in seen]
    counts = unmask_counts(16, 8)
    assert masked == [16 - sum(counts[:t]) for t in range(8)]

    twin = torch.Generator().manual_seed(7)
    with torch.no_grad():
        p = forward(seen[0], labels).softmax(-1)
    sampled = torch.multinomial(p.view(-1, VOCAB), 1, replacement=True, generator=twin).view(2, 16)
    noise = gumbel_noise((2, 16), twin)
    confidence = torch.log(p.gather(-1, sampled[..., None])[..., 0]) + 4.5 * (1 - 1 / 8) * noise
    top = confidence.topk(counts[0], dim=1).indices
    expected = torch.full((2, 16), model.mask_id)
    expected.scatter_(1, top, sampled.gather(1, top))
    assert torch.equal(seen[1], expected)


def test_plain_ends_fully_decoded_and_counts_passes():
    model = tiny()
    tokens, stats = model.generate(torch.arange(5), sampler="plain", steps=5, cfg=2.0)
    assert tokens.ids.shape == (5, *GRID) and int(tokens.ids.max()) < VOCAB
    assert stats.nfe == 5


def test_loss_masks_a_cosine_fraction_drawn_from_each_samples_seed():
    model = tiny().train()
    model.config.embed_dropout = 0.0
    model.embed_dropout.p = 0.0
    inputs = []
    forward = model.forward

    def recording(ids, labels, **kw):
        inputs.append((ids.clone(), labels.clone()))
        return forward(ids, labels, **kw)

    model.forward = recording
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, *GRID))
    batch = {"ids": ids, "labels": torch.tensor([0, 1, 2, 3]), "seed": torch.tensor([11, 22, 33, 44])}
    model.loss(batch)
    sub = {k: v[[2, 0]] for k, v in batch.items()}
    model.loss(sub)
    (full_ids, full_labels), (sub_ids, sub_labels) = inputs
    # a sample is masked the same way whichever batch it lands in
    assert torch.equal(full_ids[[2, 0]], sub_ids) and torch.equal(full_labels[[2, 0]], sub_labels)
    for row, seed in enumerate([11, 22, 33, 44]):
        u = torch.rand(16 + 2, generator=torch.Generator().manual_seed(seed))
        n_masked = min(16, max(1, math.ceil(16 * math.cos(math.pi / 2 * float(u[0])))))
        is_masked = full_ids[row] == model.mask_id
        assert int(is_masked.sum()) == n_masked
        assert torch.equal(is_masked, u[2:].argsort().argsort() < n_masked)
        assert torch.equal(full_ids[row][~is_masked], ids.flatten(1)[row][~is_masked])
        assert int(full_labels[row]) == (model.null_class if u[1] < 0.1 else row)


def test_loss_is_label_smoothed_cross_entropy_on_masked_positions():
    model = tiny()
    batch = {"ids": torch.randint(0, VOCAB, (3, *GRID)), "labels": torch.tensor([0, 1, 2]),
             "seed": torch.tensor([1, 2, 3])}
    with torch.no_grad():
        loss, _ = model.loss(batch)
    # recompute from the same masking: eval mode keeps the labels (no class dropout)
    ids = batch["ids"].flatten(1)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    for row, seed in enumerate([1, 2, 3]):
        u = torch.rand(18, generator=torch.Generator().manual_seed(seed))
        n = min(16, max(1, math.ceil(16 * math.cos(math.pi / 2 * float(u[0])))))
        masked[row] = u[2:].argsort().argsort() < n
    with torch.no_grad():
        logits = model(torch.where(masked, model.mask_id, ids), batch["labels"])
    logp = logits[masked].log_softmax(-1)
    target = ids[masked]
    expected = -(0.9 * logp.gather(1, target[:, None])[:, 0] + 0.1 * logp.mean(-1)).mean()
    assert abs(float(loss) - float(expected)) < 1e-5


def test_save_and_load_gives_the_same_logits(tmp_path):
    model = tiny(skip=False)
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    ids = torch.randint(0, VOCAB + 1, (2, 16))
    labels = torch.tensor([1, 5])  # 5: the null class
    assert torch.equal(model(ids, labels), loaded(ids, labels))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maskgit") / "model"
    torch.manual_seed(0)
    save_pretrained(MaskGIT(MaskGITConfig(tokenizer="vq-mnist", num_classes=10, vocab_size=256, grid=(8, 8),
                                          downsample=4, dim=32, depth=2, heads=4)), folder)
    return folder


@pytest.mark.parametrize("flags, says", [
    (("--num-cache-iters", "-1"), "--num-cache-iters must be >= 0"),
    (("--steps", "4", "--pre-full-iters", "5"), "--pre-full-iters must lie in [0, --steps = 4]"),
    (("--steps", "0"), "--steps must be >= 1"),
])
def test_bad_recap_options_are_one_line_exit_2(tmp_path, model_dir, capsys, flags, says):
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as e:
        run(generate.main, ["--model", str(model_dir), "--sampler", "recap", "--labels", "0-1", "-o", str(out),
                            "--quiet", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not out.exists()


def test_generate_app_writes_a_recap_grid(tmp_path, model_dir):
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as e:
        run(generate.main, ["--model", str(model_dir), "--sampler", "recap", "--labels", "0-2", "--per-label", "2",
                            "--steps", "6", "--num-cache-iters", "2", "-o", str(out), "--quiet"])
    assert e.value.code == 0 and out.is_file()


# ------------------------------------------------------------------------------- official U-ViT checkpoint


def official_keys() -> dict[str, tuple[int, ...]]:
    data = json.loads((Path(__file__).resolve().parents[1] / "data" / "maskgit_uvit_keys.json").read_text())
    return {k: tuple(v) for k, v in data["keys"].items()}


def test_official_keys_and_shapes_are_pinned():
    keys = official_keys()
    config = official_config({k: torch.empty(s, device="meta") for k, s in keys.items()}, "nnet_ema.pth")
    assert (config.num_classes, config.vocab_size, config.grid, config.dim, config.depth, config.heads,
            config.mlp_ratio, config.skip) == (1000, 1024, (16, 16), 768, 24, 8, 4.0, True)
    with torch.device("meta"):
        model = MaskGIT(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {map_key(k): (1025,) if k == "mlm_layer.bias" else s for k, s in keys.items()}
    assert keys["mlm_layer.bias"] == (1, 1, 1025)
    assert None not in mapped and mapped == ours


def official_file(model: MaskGIT, path: Path, **edits) -> Path:
    """`model`'s weights under the official names, as nnet_ema.pth holds them."""
    back = {map_key(k): k for k in official_keys()}
    state = {back[k]: v.clone() for k, v in model.state_dict().items()}
    state["mlm_layer.bias"] = state["mlm_layer.bias"].view(1, 1, -1)
    state.update(edits)
    torch.save(state, path)
    return path


def test_official_file_loads_through_the_hub(tmp_path):
    model = tiny(dim=768, heads=8, depth=2, skip=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loaded = resolve_model(official_file(model, tmp_path / "nnet_ema.pth"), kind="generator")
    assert isinstance(loaded, MaskGIT) and loaded.config.num_classes == 5 and loaded.config.grid == GRID
    ids = torch.randint(0, VOCAB + 1, (2, 16))
    labels = torch.tensor([0, 5])
    assert torch.equal(model(ids, labels), loaded(ids, labels))
    assert loaded.tokenizer_name is None  # MaskGIT's VQGAN ships apart


def test_official_file_with_a_foreign_key_or_width_is_refused(tmp_path):
    model = tiny(dim=768, heads=8, depth=2)
    bad = official_file(model, tmp_path / "extra.pth", **{"pos_embed": torch.zeros(3)})
    with pytest.raises(HubError, match="unexpected key 'pos_embed'"):
        resolve_model(bad, kind="generator")
    narrow = official_file(tiny(dim=64, heads=4, depth=2), tmp_path / "narrow.pth")
    with pytest.raises(HubError, match="width 64"):
        resolve_model(narrow, kind="generator")
