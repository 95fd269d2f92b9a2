"""QLAE model, optimiser recipe, tokenizer interface, and its disentanglement advantage."""
import torch
from torch import nn

from tokenizers.qlae import QLAE, QLAEConfig, compare_qlae_with_autoencoder, param_groups, train_qlae
from vision.data.factors import FactorsConfig, all_factors, make_factors_dataset, render
from vision.tokens import Tokens


def test_official_small_architecture_shapes():
    model = QLAE(QLAEConfig())  # 64x64, conv widths 64-128-256-512, dense 512, 10 latents
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.bias) for c in convs] == [
        (w, (4, 4), (2, 2), None) for w in (64, 128, 256, 512)
    ]
    ups = [m for m in model.decoder_conv.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [u.out_channels for u in ups] == [512, 256, 128, 64]
    assert model.transition_shape == (512, 4, 4)
    logits, q = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert logits.shape == (2, 3, 64, 64) and q.ids.shape == (2, 10)


def test_param_groups_decay_weights_only():
    model = QLAE(QLAEConfig(image_size=16, conv_widths=(8, 16), dense_widths=(32,)))
    decay, rest = param_groups(model)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in rest["params"]}
    assert "quantizer.values" in kept
    assert all(n.endswith("bias") or ".1." in n or n == "quantizer.values" for n in kept)  # GroupNorm is index 1
    assert all(n.endswith("weight") for n in decayed)
    norms = {id(p) for m in model.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()}
    assert norms and not norms & {id(p) for p in decay["params"]}
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_same_size_baseline_and_tokenizer_interface(tmp_path):
    from vision.hub import from_pretrained, save_pretrained

    cfg = QLAEConfig(image_size=16, conv_widths=(), dense_widths=(32,), num_latents=4, num_values=6)
    qlae, ae = QLAE(cfg), QLAE(QLAEConfig(**{**cfg.__dict__, "quantize": False}))
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("quantizer"))  # noqa: E731
    assert count(qlae) == count(ae)

    images = torch.rand(3, 3, 16, 16) * 2 - 1
    tokens = qlae.encode(images)
    assert isinstance(tokens, Tokens) and tokens.ids.shape == (3, 4, 1, 1)
    assert tokens.spec.groups == 4 and tokens.spec.vocab_size == 6
    logits, q = qlae(images)
    assert torch.equal(qlae.ids_to_latents(tokens.ids).flatten(1), q.quantized)
    torch.testing.assert_close(qlae.decode(tokens), torch.sigmoid(logits) * 2 - 1)
    assert ae.encode(images).latents.shape == (3, 4, 1, 1)

    save_pretrained(qlae, tmp_path / "qlae")
    loaded = from_pretrained(tmp_path / "qlae")
    assert torch.equal(loaded.encode(images).ids, tokens.ids)


def test_training_is_seeded_and_lowers_the_loss():
    images, _ = make_factors_dataset(256, FactorsConfig(image_size=16), seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = QLAE(QLAEConfig(image_size=16, conv_widths=(), dense_widths=(32,)))
        history = train_qlae(model, images, steps=40, batch_size=32, seed=0)
        runs.append((model.state_dict(), history))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0].values(), runs[1][0].values()))
    history = runs[0][1]
    assert sum(h["bce"] for h in history[-5:]) < sum(h["bce"] for h in history[:5]) * 0.8


def test_factors_dataset_is_seeded_and_labelled():
    cfg = FactorsConfig(image_size=16)
    a, fa = make_factors_dataset(64, cfg, seed=3)
    b, fb = make_factors_dataset(64, cfg, seed=3)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert a.shape == (64, 3, 16, 16) and a.min() == -1 and a.max() <= 1
    for k, size in enumerate(cfg.factor_sizes):
        assert fa[:, k].min() >= 0 and fa[:, k].max() < size
    # every factor combination renders a distinct image (the factors are identifiable)
    grid = render(all_factors(cfg), cfg)
    assert torch.unique(grid.flatten(1), dim=0).shape[0] == grid.shape[0]


def test_qlae_is_more_modular_than_a_same_size_autoencoder():
    """Same networks, data, seed, batches and optimiser; only the latent quantization differs.
    Full-budget numbers are in the docstring of `compare_qlae_with_autoencoder`."""
    factors = FactorsConfig(image_size=16, num_shapes=2, num_sizes=2, num_x=3, num_y=3, num_colours=3)
    r = compare_qlae_with_autoencoder(
        steps=400, num_train=2048, num_eval=1000, factors=factors, dense_widths=(128,), batch_size=32,
        seed=0, infoe=False,
    )
    assert r["qlae_infom"] > r["ae_infom"] + 0.1, r
