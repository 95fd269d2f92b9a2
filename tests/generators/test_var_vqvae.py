"""VAR's multi-scale residual VQVAE: official key layout and importer, the residual quantization worked by hand
and restated, the interface VAR's transformer reads (chained next inputs == teacher-forced inputs == f_hat),
training losses and straight-through gradients, and the apps.train_tokenizer wiring.

Parity with FoundationVision/VAR (models/vqvae.py, quant.py, basic_vae.py) was measured against the official code
on shared random weights when this was written: encoder, decoder, var inputs, next inputs and decoded images
identical (max |diff| 0.0), ids identical; the numbers are in the tokenizer's report, not re-run here.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generators.var.vqvae import (
    OFFICIAL_PATCH_NUMS,
    MultiScaleQuantizer,
    MultiScaleVQVAE,
    VARVQVAEConfig,
    from_official,
    official_config,
    recognise_official,
    var_vqvae_config,
)
from vision.errors import ConfigError, UserError
from vision.hub import HubError, from_pretrained, resolve_model, save_pretrained

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = VARVQVAEConfig(vocab_size=32, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                      patch_nums=(1, 2, 3, 4), image_size=8, test_mode=False)
# the smallest layout an official file can have (GroupNorm(32) is not in the file) with the official 10 scales
OFFICIAL_TINY = VARVQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, using_sa=False,
                               image_size=32)


def pinned_keys() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((DATA / "var_vqvae_keys.json").read_text())["keys"].items()}


def tiny_model(config: VARVQVAEConfig = TINY, seed: int = 0) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(config).eval()
    with torch.no_grad():  # spread-out codes and phis that matter, so ids and f_hat are far from trivial
        model.quantize.embedding.weight.normal_()
        for p in model.quantize.quant_resi.parameters():
            p.normal_(0, 0.3)
    return model


def images(n: int = 2, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------- official layout and importer


def test_official_keys_and_shapes_are_pinned():
    with torch.device("meta"):
        model = MultiScaleVQVAE(var_vqvae_config("var-vae-f16"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = pinned_keys()
    assert len(expected) == 324
    assert list(ours) == list(expected)  # the official names in the official order: no renaming table
    assert ours == expected
    assert expected["quantize.ema_vocab_hit_SV"] == (10, 4096)
    assert expected["quantize.embedding.weight"] == (4096, 32)
    assert {k for k in expected if k.startswith("quantize.quant_resi.")} == {
        f"quantize.quant_resi.qresi_ls.{i}.{p}" for i in range(4) for p in ("weight", "bias")}


def test_the_pinned_keys_load_as_the_official_configuration():
    state = {k: torch.empty(s, device="meta") for k, s in pinned_keys().items()}
    assert recognise_official(state)
    assert official_config(state) == var_vqvae_config("var-vae-f16")
    model = from_official(state)
    assert model.config == var_vqvae_config("var-vae-f16") and not model.training
    assert model.spec.grid == (16, 16) and model.spec.downsample == 16 and model.spec.vocab_size == 4096
    assert model.spec.scales == OFFICIAL_PATCH_NUMS
    # the other taming-layout importers must not claim VAR's file
    from tokenizers.llamagen_vq import recognise_official as llamagen
    from tokenizers.maskgit_vqgan import recognise as maskgit
    assert not llamagen(state) and not maskgit(state)


def official_file_state(model: MultiScaleVQVAE) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["quantize.ema_vocab_hit_SV"] = torch.rand_like(state["quantize.ema_vocab_hit_SV"])
    return state


def test_a_released_file_resolves_to_the_same_model(tmp_path):
    model = tiny_model(OFFICIAL_TINY)
    state = official_file_state(model)
    path = tmp_path / "vae_tiny.pth"
    torch.save(state, path)
    loaded = resolve_model(path, kind="tokenizer")
    assert isinstance(loaded, MultiScaleVQVAE)
    assert loaded.config == OFFICIAL_TINY
    assert not any(p.requires_grad for p in loaded.parameters())  # official test_mode: frozen
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = images(2, 32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x).scale_ids, model.encode(x).scale_ids))


def test_the_importer_is_loud_on_anything_unmapped():
    state = official_file_state(tiny_model(OFFICIAL_TINY))
    with pytest.raises(HubError, match="unexpected keys, first 'quantize.extra'"):
        from_official({**state, "quantize.extra": torch.zeros(1)})
    with pytest.raises(HubError, match="missing keys, first 'decoder.conv_out.bias'"):
        from_official({k: v for k, v in state.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(HubError, match="quant_conv.bias"):
        from_official({**state, "quant_conv.bias": torch.zeros(7)})
    fewer = {**state, "quantize.ema_vocab_hit_SV": torch.zeros(6, 64)}  # trained with 6 scales: say which
    with pytest.raises(HubError, match="6 scales"):
        from_official(fewer)
    assert from_official(fewer, patch_nums=(1, 2, 4, 6, 10, 16)).spec.scales == (1, 2, 4, 6, 10, 16)


def test_phi_sharing_variants_are_read_from_the_keys():
    for share, keys in ((1, {"quantize.quant_resi.qresi.weight"}), (0, {f"quantize.quant_resi.{i}.weight"
                                                                         for i in range(10)})):
        with torch.device("meta"):
            model = MultiScaleVQVAE(VARVQVAEConfig(**{**OFFICIAL_TINY.__dict__, "share_quant_resi": share}))
        state = model.state_dict()
        assert keys <= set(state)
        assert official_config(state).share_quant_resi == share


# ------------------------------------------------------------------------------- the quantizer by hand


def one_channel_quantizer(codes: list[float], biases: list[float], patch_nums=(1, 2)) -> MultiScaleQuantizer:
    """Cvae 1; phi_i(h) = 0.5 h + 0.5 conv(h) with a zero kernel and bias b_i, i.e. 0.5 h + 0.5 b_i."""
    config = VARVQVAEConfig(vocab_size=len(codes), z_channels=1, ch=4, ch_mult=(1,), norm_groups=1,
                            patch_nums=patch_nums, image_size=patch_nums[-1])
    q = MultiScaleQuantizer(config)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor(codes)[:, None])
        for phi, b in zip(q.quant_resi.qresi_ls, biases):
            phi.weight.zero_()
            phi.bias.fill_(b)
    return q


def test_two_scales_worked_by_hand():
    # f = [[1, 3], [5, 7]]; codes -3, 0, 1, 4; scale 0 uses phi_0 (0.5 h + 1), scale 1 phi_3 (0.5 h - 1):
    # the ticks of 4 phis are 1/12, 13/36, 23/36, 11/12 and the scales sit at 0 and 1.
    q = one_channel_quantizer([-3.0, 0.0, 1.0, 4.0], [2.0, 100.0, 100.0, -2.0])
    f = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 1, 2, 2)
    ids = q.encode(f)
    # scale 0: area mean 4 -> code 4 (id 3); f_hat = phi_0(4) = 3 everywhere; residual [[-2, 0], [2, 4]]
    assert ids[0].tolist() == [[[3]]]
    # scale 1 (full size, no resize): -2 -> -3, 0 -> 0, 2 -> 1, 4 -> 4
    assert ids[1].tolist() == [[[0, 1], [2, 3]]]
    # f_hat = 3 + phi_3([[-3, 0], [1, 4]]) = 3 + [[-2.5, -1], [-0.5, 1]]
    assert q.ids_to_fhat(ids).tolist() == [[[[0.5, 2.0], [2.5, 4.0]]]]
    # VAR's input for scale 1: area(f_hat after scale 0 -> 2x2) = 3, flattened to (B, 4, Cvae)
    assert q.var_input(ids).tolist() == [[[3.0]] * 4]
    out = q.eval()(f)
    assert out.quantized.tolist() == [[[[0.5, 2.0], [2.5, 4.0]]]]
    assert out.ids.tolist() == [[3, 0, 1, 2, 3]]
    # loss: mean over the 2 scales of (1 + beta) * mse(f_hat_k, f); f_hat_0 = 3: mse 24 / 4, f_hat_1: 16.5 / 4
    assert out.losses["vq"].item() == pytest.approx(1.25 * (6.0 + 4.125) / 2)


def test_the_phi_of_each_scale_follows_the_official_tick_rule():
    quant = MultiScaleQuantizer(var_vqvae_config("var-vae-mnist"))
    # 4 phis (ticks linspace(1/12, 11/12, 4)); 10 official scales, 6 MNIST scales; a 3-phi set uses 1/6 .. 5/6
    assert [quant.quant_resi.index(k, 10) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [quant.quant_resi.index(k, 6) for k in range(6)] == [0, 0, 1, 2, 3, 3]
    three = MultiScaleQuantizer(VARVQVAEConfig(**{**TINY.__dict__, "share_quant_resi": 3}))
    assert [three.quant_resi.index(k, 6) for k in range(6)] == [0, 0, 1, 1, 2, 2]


def reference_encode(q: MultiScaleQuantizer, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A plain restatement: per scale area-pool the residual, nearest code by float64 distance, bicubic up, phi."""
    K, side, codes = len(q.patch_nums), q.patch_nums[-1], q.embedding.weight.detach()
    rest, f_hat, ids_out, fhats = f.clone(), torch.zeros_like(f), [], []
    for k, pn in enumerate(q.patch_nums):
        z = F.adaptive_avg_pool2d(rest, pn) if k < K - 1 else rest
        zf = z.permute(0, 2, 3, 1).double()
        ids = ((zf[..., None, :] - codes.double()) ** 2).sum(-1).argmin(-1)
        h = codes[ids].permute(0, 3, 1, 2)
        if k < K - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic", align_corners=False)
        h = q.quant_resi.at(k, K)(h)
        f_hat, rest = f_hat + h, rest - h
        ids_out.append(ids)
        fhats.append(f_hat)
    return ids_out, fhats


def test_encoding_matches_a_plain_restatement():
    model = tiny_model()
    with torch.no_grad():
        f = model.latents(images(4))
        ids, fhats = reference_encode(model.quantize, f)
        tokens = model.encode(images(4))
    assert all(torch.equal(a, b) for a, b in zip(tokens.scale_ids, ids))
    assert torch.cat([t.flatten() for t in ids]).unique().numel() > 8  # many distinct codes: a real check
    assert torch.allclose(model.scales_to_fhat(tokens.scale_ids), fhats[-1], atol=1e-5)


# ------------------------------------------------------------------------------- the tokenizer and VAR's view


def test_spec_tokens_and_decoding():
    model = tiny_model()
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(0.8)  # push part of the output past 1, where decode clamps
    assert model.spec.scales == (1, 2, 3, 4) and model.spec.grid == (4, 4) and model.spec.downsample == 2
    tokens = model.encode(images())
    assert [tuple(t.shape) for t in tokens.scale_ids] == [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 4, 4)]
    assert all(t.dtype == torch.int64 for t in tokens.scale_ids)
    with torch.no_grad():
        recon, q = model(images())
    decoded = model.decode(tokens)
    assert decoded.abs().max() <= 1 and recon.abs().max() > 1  # decode clamps (fhat_to_img), forward does not
    assert torch.allclose(decoded, recon.clamp(-1, 1), atol=1e-5)
    assert torch.equal(q.ids, torch.cat([t.flatten(1) for t in tokens.scale_ids], 1))
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model.encode(images(1, 16))
    with pytest.raises(ValueError, match="scale_ids"):
        model.decode(type(tokens)(model.spec, ids=torch.zeros(1, 4, 4, dtype=torch.long)))


def test_next_input_chain_reproduces_fhat_and_the_teacher_forced_inputs():
    model = tiny_model()
    scale_ids = model.encode(images(3)).scale_ids
    f_hat, inputs = None, []
    for k, ids in enumerate(scale_ids):
        h = model.embed_ids(ids)
        assert tuple(h.shape) == (3, 4, ids.shape[1], ids.shape[1])
        assert torch.equal(h, model.quantize.embedding.weight[ids].permute(0, 3, 1, 2))
        f_hat, nxt = model.next_autoregressive_input(k, f_hat, h)
        inputs.append(nxt)
    assert nxt is f_hat  # the last scale hands f_hat itself
    assert torch.equal(f_hat, model.scales_to_fhat(scale_ids))
    teacher = model.scales_to_var_input(scale_ids)
    assert tuple(teacher.shape) == (3, 4 + 9 + 16, 4)  # L - pn_1^2 positions
    assert torch.equal(teacher, torch.cat([x.flatten(2).transpose(1, 2) for x in inputs[:-1]], 1))
    # a prefix of n scales gives the inputs of scales 2..n+1 (CoDe's refiner), and f_hat of those n scales
    assert torch.equal(model.scales_to_var_input(scale_ids[:2]), teacher[:, :4 + 9])
    partial = None
    for k in range(2):
        partial, _ = model.next_autoregressive_input(k, partial, model.embed_ids(scale_ids[k]))
    assert torch.equal(model.scales_to_fhat(scale_ids[:2]), partial)
    # official idx_Bl layout (B, pn*pn) is accepted too, and the images come from fhat_to_images
    assert torch.equal(model.scales_to_var_input([t.flatten(1) for t in scale_ids]), teacher)
    assert torch.equal(model.fhat_to_images(f_hat), model.decode(model.encode(images(3))))
    with pytest.raises(ValueError, match="scale 1"):
        model.scales_to_var_input([scale_ids[0], scale_ids[2]])


def test_training_losses_and_straight_through_gradients():
    model = tiny_model().train()
    f = model.latents(images(2)).detach().requires_grad_(True)
    out = model.quantize(f)
    ids = [t.view(2, pn, pn) for t, pn in zip(out.ids.split([1, 4, 9, 16], 1), (1, 2, 3, 4))]
    _, fhats = reference_encode(model.quantize, f.detach())
    assert torch.allclose(out.quantized, fhats[-1], atol=1e-5)
    weight = torch.randn_like(f)
    (out.quantized * weight).sum().backward(retain_graph=True)
    assert torch.equal(f.grad, weight)  # straight through: the identity
    f.grad = None
    out.losses["vq"].backward()
    # d/df of mean_k beta * mse(sg(f_hat_k), f) = beta / K * sum_k 2 (f - f_hat_k) / numel
    expected = 0.25 / 4 * sum(2 * (f.detach() - h) / f.numel() for h in fhats)
    assert torch.allclose(f.grad, expected, atol=1e-6)
    assert model.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook term trains the codes ...
    assert all(p.grad.abs().sum() > 0 for p in model.quantize.quant_resi.parameters())  # ... and every phi
    assert all(torch.equal(a, b) for a, b in zip(ids, model.quantize.encode(f.detach())))

    model.zero_grad()
    recon, q = model(images(2))
    (recon.square().mean() + q.loss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_out.weight", "post_quant_conv.weight",
                 "quantize.embedding.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.last_layer is model.decoder.conv_out.weight
    assert {"vq", "utilisation", "perplexity", "utilisation_ema"} <= set(q.metrics) and set(q.losses) == {"vq"}


def test_vocab_hits_follow_the_official_schedule_and_dead_codes_restart():
    model = tiny_model().train()
    with torch.no_grad():
        out = model(images(2))[1]
    hits = [torch.bincount(t.flatten(), minlength=32).float() for t in out.ids.split([1, 4, 9, 16], 1)]
    ema = model.quantize.ema_vocab_hit_SV
    assert torch.equal(ema[0], hits[0])  # the first record is copied, the next ones decay at 0.9
    assert torch.allclose(ema[1], 0.1 * hits[1]) and model.quantize.record_hit == 4

    config = VARVQVAEConfig(**{**TINY.__dict__, "dead_code_steps": 1})
    model = tiny_model(config).train()
    before = model.quantize.embedding.weight.detach().clone()
    with torch.no_grad():
        f = model.latents(images(2))
        ids = model.quantize(f).ids
    used = torch.zeros(32, dtype=torch.bool)
    used[ids.unique()] = True
    after = model.quantize.embedding.weight.detach()
    assert 0 < used.sum() < 32
    assert torch.equal(after[used], before[used])
    # every restarted code is one of this step's lookup inputs (a pooled residual of some scale)
    rows = reference_inputs(model.quantize, f, ids)
    assert all((rows - code).abs().amax(1).min() < 1e-5 for code in after[~used])


def reference_inputs(q: MultiScaleQuantizer, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    K, rows, rest = len(q.patch_nums), [], f.clone()
    for k, (pn, ids_k) in enumerate(zip(q.patch_nums, ids.split([p * p for p in q.patch_nums], 1))):
        z = F.adaptive_avg_pool2d(rest, pn) if k < K - 1 else rest
        rows.append(z.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))
        rest = rest - q.lift(q.embed(ids_k.reshape(-1, pn, pn)), k, contiguous=True)  # the restarts come after
    return torch.cat(rows)


def test_config_validation():
    with pytest.raises(ConfigError, match="image_size 16 must be patch_nums"):
        VARVQVAEConfig(**{**TINY.__dict__, "image_size": 16})
    with pytest.raises(ConfigError, match="strictly increasing"):
        VARVQVAEConfig(**{**TINY.__dict__, "patch_nums": (1, 3, 2, 4)})
    with pytest.raises(ConfigError, match="strictly increasing"):
        VARVQVAEConfig(**{**TINY.__dict__, "patch_nums": (4,), "image_size": 8})
    with pytest.raises(ConfigError, match="norm_groups"):
        VARVQVAEConfig(**{**TINY.__dict__, "norm_groups": 3})
    assert not any(p.requires_grad for p in MultiScaleVQVAE(VARVQVAEConfig(**{**TINY.__dict__,
                                                                                "test_mode": True})).parameters())


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    loaded = from_pretrained(save_pretrained(model, tmp_path / "m"))
    assert isinstance(loaded, MultiScaleVQVAE) and loaded.config == TINY
    x = images(2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x).scale_ids, model.encode(x).scale_ids))


# ------------------------------------------------------------------------------- apps.train_tokenizer


def test_train_tokenizer_trains_and_saves_var_vae_mnist(tmp_path, capsys):
    from apps.train_tokenizer import main

    out = tmp_path / "run"
    assert main(["--model", "var-vae-mnist", "--data", "mnist5k", "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--perceptual-weight", "0", "--no-gan", "--quiet"]) == 0
    model = from_pretrained(out / "model")
    assert isinstance(model, MultiScaleVQVAE) and model.spec.scales == (1, 2, 3, 4, 6, 8)
    assert model.config.dead_code_steps == 20 and not model.config.test_mode
    assert "utilisation" in capsys.readouterr().out
    with pytest.raises(UserError, match="works at 32 only"):  # vision.cli.run: one line, exit code 2
        main(["--model", "var-vae-mnist", "--data", "mnist5k", "--out", str(tmp_path / "x"), "--image-size", "64"])
