"""LlamaGen GPT: official key names and shapes, the importer (DDP and FSDP files), cached == uncached
logits, rollback, the loss, and the plain sampler against the exact distribution with LlamaGen's own
sampling rules."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generators.ar.model import LlamaGenConfig, LlamaGenGPT
from generators.ar.official import from_official, map_key, official_config
from generators.base import build_preset
from tests.helpers.distributions import chi_square_test, enumerate_joint, sequence_index
from vision.hub import HubError, check_state_dict, resolve_model
from vision.tokens import TokenSpec

DATA = Path(__file__).resolve().parents[1] / "data"


def official_gpt_b_keys() -> dict[str, tuple]:
    return {k: tuple(v) for k, v in json.loads((DATA / "llamagen_gpt_b_keys.json").read_text())["keys"].items()}


def meta_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def random_model(seed=0, **kw) -> LlamaGenGPT:
    torch.manual_seed(seed)
    cfg = dict(num_classes=10, vocab_size=64, grid=4, dim=64, n_layer=2, n_head=4)
    model = LlamaGenGPT(LlamaGenConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # LlamaGen zeroes the head and starts norms at 1: make every weight matter
        model.head.weight.normal_(std=0.3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return model


# ----------------------------------------------------------------------------- official checkpoints


def test_every_official_gpt_b_key_maps_onto_the_model():
    shapes = official_gpt_b_keys()
    assert len(shapes) == 88
    config = official_config(meta_state(shapes), Path("c2i_B_256.pt"))
    assert (config.n_layer, config.n_head, config.dim, config.vocab_size, config.num_classes, config.grid,
            config.ffn_hidden, config.tokenizer) == (12, 12, 768, 16384, 1000, 16, 2048, None)
    with torch.device("meta"):
        model = LlamaGenGPT(config)
    mapped = {map_key(k): v for k, v in meta_state(shapes).items()}
    assert None not in mapped and len(mapped) == len(shapes)  # one to one
    check_state_dict(model.state_dict(), mapped, "c2i_B_256.pt")
    assert sum(math.prod(s) for s in shapes.values()) == sum(p.numel() for p in model.parameters()) == 110_888_448


def test_official_config_from_shapes_and_file_name():
    shapes = official_gpt_b_keys()
    assert official_config(meta_state(shapes), Path("c2i_B_384.pt")).grid == 24
    # an older file that carries the rotary table: the grid comes from it
    with_table = meta_state({**shapes, "freqs_cis": (1 + 24 * 24, 32, 2)})
    assert official_config(with_table, Path("renamed.pt")).grid == 24
    with pytest.raises(HubError, match="do not store their image size"):
        official_config(meta_state(shapes), Path("my_model.pt"))
    # GPT-3B: 3200 wide with 32 heads (not width / 64)
    three_b = {k: tuple(3200 if d == 768 else d for d in v) for k, v in shapes.items()}
    assert official_config(meta_state(three_b), Path("c2i_3B_384.pt")).n_head == 32
    odd = {k: tuple(640 if d == 768 else d for d in v) for k, v in shapes.items()}
    with pytest.raises(HubError, match="width 640"):
        official_config(meta_state(odd), Path("c2i_B_256.pt"))


def official_state_of(model: LlamaGenGPT) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaGen's key names (the inverse of map_key)."""
    keys = official_gpt_b_keys()
    names = {map_key(k.replace("layers.0.", f"layers.{i}.")): k.replace("layers.0.", f"layers.{i}.")
             for k in keys for i in range(model.config.n_layer)}
    return {names[k]: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_official_files_load_through_the_hub(tmp_path, layout):
    """A GPT-B-wide, one-layer model saved as LlamaGen saves it loads with the same logits."""
    ref = random_model(dim=768, n_head=12, n_layer=1, vocab_size=32, num_classes=5, grid=16)
    state = official_state_of(ref)
    path = tmp_path / "c2i_B_64.pt"
    torch.save({"model": state, "steps": 10} if layout == "ddp" else state, path)
    with pytest.raises(HubError, match="image size"):  # 64 is not a released size: refused, not guessed
        resolve_model(path, kind="generator")
    path = path.rename(tmp_path / "c2i_B_256.pt")
    loaded = resolve_model(path, kind="generator")
    assert isinstance(loaded, LlamaGenGPT) and loaded.config.grid == 16
    labels, ids = torch.tensor([0, 4]), torch.randint(0, 32, (2, 15))
    with torch.no_grad():
        assert torch.equal(loaded(labels, ids), ref(labels, ids))

    state["layers.0.attention.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(HubError, match="unexpected key 'layers.0.attention.extra.weight'"):
        from_official(state, path)


# ----------------------------------------------------------------------------- cache, rollback, loss


def test_cached_logits_equal_uncached():
    model = random_model()
    labels = torch.tensor([1, 7, 10])  # 10: the null class
    ids = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        full = model(labels, ids[:, :-1])
        caches = model.new_caches()
        steps = [model.run(model.class_embed(labels)[:, None], torch.tensor([0]), caches)]
        for t in range(15):
            steps.append(model.run(model.token_embed(ids[:, t:t + 1]), torch.tensor([t + 1]), caches))
        assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
        # windows at per-sample positions (how SJD runs): sample 0 at tokens 0..4, sample 1 at 3..7
        caches = model.new_caches()
        model.run(model.class_embed(labels[:2])[:, None], torch.tensor([0]), caches)
        model.run(model.token_embed(ids[1:2, :3]).expand(2, -1, -1), torch.tensor([1, 2, 3]), caches)
        h = torch.stack([torch.cat([model.token_embed(ids[0, :4]), model.token_embed(ids[0, 4:5])]),
                         model.token_embed(ids[1, 2:7])])
        positions = torch.tensor([[1, 2, 3, 4, 5], [3, 4, 5, 6, 7]])
        got = model.run(h, positions, caches)
        assert (got[0] - full[0, 1:6]).abs().max() <= 1e-5
        assert (got[1] - full[1, 3:8]).abs().max() <= 1e-5


def test_rollback_then_continue_equals_never_having_drafted():
    """Drafts written past the accepted length and then overwritten leave no trace."""
    model = random_model(seed=1)
    labels = torch.tensor([2])
    true_ids, wrong = torch.randint(0, 64, (1, 10)), torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        expected = model(labels, true_ids)[:, 5:]
        caches = model.new_caches()
        model.run(model.class_embed(labels)[:, None], torch.tensor([0]), caches)
        model.run(model.token_embed(true_ids[:, :4]), torch.arange(1, 5), caches)
        model.run(model.token_embed(wrong), torch.arange(5, 11), caches)  # six drafts, all rejected
        got = model.run(model.token_embed(true_ids[:, 4:]), torch.arange(5, 11), caches)
        assert (got - expected).abs().max() <= 1e-5
        for cache in caches:  # KVCache.truncate gives the same state
            cache.truncate(5)
        again = model.run(model.token_embed(true_ids[:, 4:]), torch.arange(5, 11), caches)
        assert torch.equal(again, got)


def test_loss_is_next_token_cross_entropy_with_class_dropout():
    model = random_model(class_dropout_prob=1.0)
    batch = {"ids": torch.randint(0, 64, (3, 4, 4)), "labels": torch.tensor([0, 5, 9])}
    flat = batch["ids"].flatten(1)
    model.eval()  # no dropout: the given labels
    loss, metrics = model.loss(batch)
    expected = F.cross_entropy(model(batch["labels"], flat[:, :-1]).flatten(0, 1), flat.flatten())
    torch.testing.assert_close(loss, expected)
    assert metrics["ce"] == pytest.approx(float(expected.detach()))
    model.train()
    model.token_dropout.p = 0.0
    for block in model.blocks:
        block.attn.proj_dropout.p = block.ffn.dropout.p = 0.0
    dropped, _ = model.loss(batch)  # class_dropout_prob 1: every label becomes the null class
    null = torch.full((3,), 10)
    torch.testing.assert_close(dropped, F.cross_entropy(model(null, flat[:, :-1]).flatten(0, 1), flat.flatten()))


def test_mnist_preset_speaks_vq_mnist():
    spec = TokenSpec("discrete", (8, 8), 4, vocab_size=256)
    model = build_preset("llamagen-gpt-mnist", spec, 10, "vq-mnist")
    c = model.config
    assert (c.grid, c.vocab_size, c.num_classes, c.tokenizer) == (8, 256, 10, "vq-mnist")
    assert model.spec == spec and model.class_embed.num_embeddings == 11  # the null class for CFG


# ----------------------------------------------------------------------------- the plain sampler


def llamagen_reference_probs(cond, uncond, cfg, temperature, top_k, top_p):
    """LlamaGen's generate.py rules written out: guidance, /max(T, 1e-5), top-k, top-p (keep the token
    that crosses top_p), softmax."""
    logits = uncond + (cond - uncond) * cfg if cfg > 1 else cond
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k)[0][..., -1, None], -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = F.softmax(sorted_logits, -1).cumsum(-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    return F.softmax(logits, -1)


@pytest.mark.parametrize("opts", [dict(cfg=1.0, temperature=1.0, top_k=0, top_p=1.0),
                                  dict(cfg=2.5, temperature=0.8, top_k=3, top_p=0.9)])
def test_plain_sampler_follows_llamagens_rules(opts):
    model = random_model(vocab_size=4, grid=2, dim=16, n_layer=1, n_head=2, ffn_hidden=32)
    label = 3

    def next_token(prefixes):
        labels = torch.full((len(prefixes),), label)
        cond = model(labels, prefixes)[:, -1]
        uncond = model(torch.full_like(labels, model.null_class), prefixes)[:, -1]
        return llamagen_reference_probs(cond, uncond, **opts)

    with torch.no_grad():
        joint = enumerate_joint(next_token, 4, 4).reshape(-1)
    tokens, stats = model.generate(torch.full((20000,), label), generator=torch.Generator().manual_seed(0), **opts)
    assert stats.nfe == 4
    assert chi_square_test(sequence_index(tokens.ids.flatten(1), 4), joint) > 0.01
    again, _ = model.generate(torch.full((20000,), label), generator=torch.Generator().manual_seed(0), **opts)
    assert torch.equal(again.ids, tokens.ids)  # seeded
