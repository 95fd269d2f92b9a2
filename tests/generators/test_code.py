"""CoDe (collaborative decoding): N = K is the drafter's plain sampling, the drafter as its own refiner is plain
sampling for every N, the refiner continues from the drafter's prefix, counted passes, refused pairings
(directly and through apps.generate: one line, exit 2), and the specialised fine-tuning flags of
apps.train_generator.

Parity with czg1225/CoDe itself (at its released commit, run in a scratch folder on the same random weights:
a d3 drafter and a d2 refiner, V 4096, patch_nums 1..16, top-k 600, top-p 0.96, cfg 1.5, temperatures
[1.1]*7 + [1.0]*3, seed 42): the same token maps and images (max |diff| 0) for N = 8, 6, 3 and 1, and with
top-k 1 at N = 5."""
import json

import pytest
import torch

from apps import generate, train_generator
import generators.var.collaborative  # noqa: F401  (registers the samplers)
from tests.helpers.tiny_var import PATCH_NUMS, random_scale_ids, tiny_var, tiny_vqvae
from vision.cli import run
from vision.data.token_cache import write_index, write_shard
from vision.hub import save_pretrained

K = len(PATCH_NUMS)
OPTS = dict(cfg=1.5, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def tok():
    return tiny_vqvae()


@pytest.fixture(scope="module")
def drafter(tok):
    return tiny_var(tok, seed=1, depth=2, width=32)


@pytest.fixture(scope="module")
def refiner(tok):
    return tiny_var(tok, seed=2, depth=1, width=16, heads=1)


def sample(model, sampler="plain", seed=0, labels=(1, 4, 4, 9), **options):
    return model.generate(torch.tensor(labels), sampler=sampler, generator=torch.Generator().manual_seed(seed),
                          **{**OPTS, **options})


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.scale_ids, b.scale_ids))


def test_all_scales_drafted_is_the_drafters_plain_sampling(drafter, refiner):
    ref, _ = sample(drafter, seed=3)
    tokens, stats = sample(drafter, "code", seed=3, refiner=refiner, draft_steps=K)
    assert same(tokens, ref) and (stats.nfe, stats.refiner_nfe) == (K, 0)
    assert set(stats.per_model_time_s) == {"drafter"}


@pytest.mark.parametrize("n", range(1, K))
def test_the_drafter_as_its_own_refiner_is_plain_sampling(drafter, n):
    """The one-pass block-causal prefill gives the refiner the cache and logits the drafter's steps had."""
    ref, _ = sample(drafter, seed=n, scale_temperature="1.2*2,0.9*2")
    tokens, stats = sample(drafter, "code", seed=n, refiner=drafter, draft_steps=n, scale_temperature="1.2*2,0.9*2")
    assert same(tokens, ref)
    assert (stats.nfe, stats.refiner_nfe) == (n, K - n) and set(stats.per_model_time_s) == {"drafter", "refiner"}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_refiner_continues_from_the_drafters_prefix(drafter, refiner, tok, n):
    """Greedy CoDe by hand: scales < n are the drafter's greedy guided choices, scales >= n the refiner's,
    both read off teacher-forced logits of the final token maps (guidance ramp t = cfg k / (K - 1))."""
    labels, cfg = torch.tensor([0, 3, 8]), 2.0
    tokens, _ = sample(drafter, "code", labels=(0, 3, 8), refiner=refiner, draft_steps=n, cfg=cfg, top_k=1)
    x = tok.scales_to_var_input(tokens.scale_ids)
    null = torch.full_like(labels, 10)
    for k, (b, e) in enumerate(drafter.begin_ends):
        model = drafter if k < n else refiner
        with torch.no_grad():
            cond, uncond = model(labels, x)[:, b:e], model(null, x)[:, b:e]
        t = cfg * k / (K - 1)
        assert torch.equal(tokens.scale_ids[k].flatten(1), ((1 + t) * cond - t * uncond).argmax(-1)), k
    drafted_only, _ = sample(drafter, labels=(0, 3, 8), cfg=cfg, top_k=1)
    assert all(torch.equal(a, b) for a, b in zip(tokens.scale_ids[:n], drafted_only.scale_ids[:n]))
    assert not torch.equal(tokens.scale_ids[-1], drafted_only.scale_ids[-1])


def test_the_drafters_cache_holds_only_its_scales(drafter, refiner, monkeypatch):
    """CoDe's memory saving: the drafter's KV cache is sized for scales 0..N-1, not the whole sequence."""
    from generators.var.model import VAR

    sizes, real = [], VAR.new_caches

    def spy(self, scales=None):
        caches = real(self, scales)
        sizes.append((self.config.depth, caches[0].capacity_hint))
        return caches

    monkeypatch.setattr(VAR, "new_caches", spy)
    sample(drafter, "code", refiner=refiner, draft_steps=2)
    assert sizes == [(2, 1 + 4), (1, 1 + 4 + 9 + 16)]


def test_bad_pairings_and_draft_steps_are_refused(drafter, refiner, tok):
    cases = {
        "needs --refiner": dict(refiner=None, draft_steps=2),
        r"--draft-steps must lie in 1..4": dict(refiner=refiner, draft_steps=5),
        "--draft-steps must be >= 1": dict(refiner=refiner, draft_steps=0),
        "must be a VAR model": dict(refiner=torch.nn.Linear(2, 2), draft_steps=2),
    }
    for message, options in cases.items():
        with pytest.raises(ValueError, match=message):
            sample(drafter, "code", **options)
    other_vocab = tiny_var(tiny_vqvae(vocab=32), seed=3)
    with pytest.raises(ValueError, match="must share a VQVAE"):
        sample(drafter, "code", refiner=other_vocab, draft_steps=2)
    a, b = tiny_var(tok, tokenizer_name="vq-a"), tiny_var(tok, tokenizer_name="vq-b")
    with pytest.raises(ValueError, match="speaks tokenizer vq-b, the drafter vq-a"):
        sample(a, "code", refiner=b, draft_steps=2)


# ----------------------------------------------------------------------------- through the apps


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    vq, vq2, vq3 = tiny_vqvae(), tiny_vqvae(seed=1), tiny_vqvae(vocab=32)
    paths = {"vq": save_pretrained(vq, root / "vq"), "vq2": save_pretrained(vq2, root / "vq2"),
             "vq3": save_pretrained(vq3, root / "vq3")}
    for name, tok, seed, depth, width in (("drafter", "vq", 1, 2, 32), ("refiner", "vq", 2, 1, 16),
                                          ("other_vae", "vq2", 3, 1, 16), ("other_vocab", "vq3", 4, 1, 16)):
        model = tiny_var({"vq": vq, "vq2": vq2, "vq3": vq3}[tok], seed=seed, depth=depth, width=width,
                         heads=1 if width == 16 else 2, tokenizer_name=str(paths[tok]))
        paths[name] = save_pretrained(model, root / name)
    return paths


def gen_exit(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        run(generate.main, [str(a) for a in argv])
    return e.value.code


def test_apps_generate_runs_code_and_refuses_bad_arguments_in_one_line(saved, tmp_path, capsys):
    base = ["--model", saved["drafter"], "--labels", "0-2", "--per-label", 2, "--sampler", "code", "--quiet"]
    out = tmp_path / "stats.json"
    assert gen_exit(*base, "--refiner", saved["refiner"], "--draft-steps", 2, "--json", out) == 0
    figures = json.loads(out.read_text())
    assert figures["images"] == 6 and figures["nfe"] == 2  # one batch: the drafter's two passes
    capsys.readouterr()
    bad = {
        "--draft-steps must lie in 1..4": ["--refiner", saved["refiner"], "--draft-steps", 5],
        "--draft-steps must be >= 1": ["--refiner", saved["refiner"], "--draft-steps", 0],
        "must share a VQVAE": ["--refiner", saved["other_vae"], "--draft-steps", 2],
        "which a draft or refiner must share": ["--refiner", saved["other_vocab"], "--draft-steps", 2],
        "needs --refiner": ["--draft-steps", 2],
    }
    for message, extra in bad.items():
        assert gen_exit(*base, *extra, "--json", tmp_path / "bad.json") == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
        assert not (tmp_path / "bad.json").exists()


def token_cache(folder, tokenizer: str, n: int = 32):
    folder.mkdir()
    ids = random_scale_ids(n, seed=9)
    tensors = {f"scale_ids.{k}": s for k, s in enumerate(ids)}
    tensors.update(index=torch.arange(n), labels=torch.arange(n) % 10)
    spec = tiny_vqvae().spec
    shard = write_shard(folder, "r0-00000", tensors, spec)
    write_index(folder, tokenizer=tokenizer, spec=spec, fields=[f"scale_ids.{k}" for k in range(K)], shards=[shard],
                flip=False, num_classes=10, data="random")
    return folder


def train_exit(*argv) -> int:
    with pytest.raises(SystemExit) as e:
        run(train_generator.main, [str(a) for a in argv])
    return e.value.code


def test_train_generator_fine_tunes_a_refiner_on_its_scales_with_distillation(saved, tmp_path, capsys):
    cache = token_cache(tmp_path / "tokens", str(saved["vq"]))
    base = ["--model", saved["refiner"], "--tokens", cache, "--steps", 3, "--batch-size", 8, "--log-every", 1,
            "--checkpoint-every", 100, "--quiet", "--lr", "1e-3"]
    assert train_exit(*base, "--out", tmp_path / "run", "--train-scales", "2:4", "--teacher", saved["drafter"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["kd"] > 0 and r["gen_loss"] == pytest.approx(0.5 * r["kd"] + 0.5 * r["ce"], rel=1e-4) for r in rows)
    capsys.readouterr()
    bad = {"--train-scales: expected A:B": ["--train-scales", "2-4"],
           "--train-scales: train scales 3:9 must satisfy 0 <= A < B <= 4": ["--train-scales", "3:9"],
           "must share a VQVAE": ["--teacher", saved["other_vocab"]],
           "argument --distill-alpha: must be a number >= 0 and <= 1": ["--teacher", saved["drafter"], "--distill-alpha", "1.5"]}
    for i, (message, extra) in enumerate(bad.items()):
        assert train_exit(*base, "--out", tmp_path / f"bad{i}", *extra) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (message, err)


@pytest.mark.filterwarnings("ignore:fake set has")
def test_the_code_benchmark_runs_on_tiny_models(saved):
    from apps.benchmarks import registry
    from apps.benchmarks.code import measure

    assert "code" in registry()
    figures = measure(str(saved["drafter"]), str(saved["refiner"]), quick=True, draft_steps=(1, 3), per_class=2,
                      noise_seeds=0)
    assert figures["nfe_large"] == K and figures["images"] == 20
    for n in (1, 3):
        assert (figures[f"drafter_nfe_n{n}"], figures[f"refiner_nfe_n{n}"]) == (n, K - n)
        assert figures[f"speedup_n{n}"] > 0 and figures[f"memory_ratio_n{n}"] > 0
        assert figures[f"fd_code_n{n}"] >= 0 and 0 <= figures[f"accuracy_code_n{n}"] <= 1
    assert figures["fd_large"] >= 0 and figures["large_peak_memory_mb"] > 0
