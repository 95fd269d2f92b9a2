"""The KL tokenizer (diffusers AutoencoderKL): token interface, training pass, scaling factor, and the import of
MAR's KL-16 VAE (LDM key layout), pinned against the official LTH14/mar models/vae.py."""
import json
import math
from pathlib import Path

import pytest
import torch

from tokenizers.kl import (
    MAR_KL16_SCALE,
    KLConfig,
    KLTokenizer,
    PosteriorOutput,
    convert_official_state,
    from_official,
    kl_config,
    ldm_to_diffusers_key,
    official_config,
    recognise_official,
)
from vision.errors import ConfigError
from vision.hub import HubError, from_pretrained, load_official, resolve_model, save_pretrained
from vision.tokens import Tokenizer, Tokens

PINNED = json.loads((Path(__file__).resolve().parents[1] / "data" / "mar_kl16_keys.json").read_text())
KL16_KEYS = {k: tuple(v) for k, v in PINNED["keys"].items()}
TINY_KEYS = {k: tuple(v) for k, v in PINNED["tiny"]["keys"].items()}
RECORDED = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v
            for k, v in PINNED["tiny"]["recorded"].items()}
# a small native model (not an official layout): GroupNorm(4), attention in the middle only
TINY = KLConfig(image_size=16, block_out_channels=(8, 16), layers_per_block=1, latent_channels=3, norm_num_groups=4,
                encoder_attention=(), scaling_factor=0.5, kl_weight=1e-3)


def tiny_state(keys: dict) -> dict:
    """Deterministic LDM-layout weights for `keys` (the recipe the recorded official outputs were made with)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in keys.items():
        r = torch.randn(shape, generator=g)
        if k.endswith(".bias"):
            state[k] = 0.1 * r
        elif len(shape) == 1:
            state[k] = 1 + 0.1 * r
        else:
            state[k] = r / math.sqrt(math.prod(shape[1:]))
    return state


def tiny_model(config: KLConfig = TINY, seed: int = 0) -> KLTokenizer:
    torch.manual_seed(seed)
    return KLTokenizer(config).eval()


def images(n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------- official layout (MAR's kl16.ckpt)


def test_pinned_kl16_keys_load_and_map_completely():
    assert len(KL16_KEYS) == 312 and KL16_KEYS["quant_conv.weight"] == (32, 32, 1, 1)
    mapped = {ldm_to_diffusers_key(k, 5) for k in KL16_KEYS}
    assert None not in mapped and len(mapped) == len(KL16_KEYS)  # every key has its own counterpart
    with torch.device("meta"):
        ours = KLTokenizer(kl_config("kl16")).state_dict()
    assert {"vae." + k for k in mapped} == set(ours)  # ... and they cover the model exactly
    state = {k: torch.empty(s, device="meta") for k, s in KL16_KEYS.items()}
    model = from_official({"model": state})  # shapes checked key by key
    assert model.config == kl_config("kl16")
    assert model.spec.kind == "continuous" and model.spec.grid == (16, 16) and model.spec.downsample == 16
    assert model.spec.channels == 16 and model.config.scaling_factor == MAR_KL16_SCALE == 0.2325
    assert not model.training


def test_the_key_table_on_known_names():
    table = {
        "encoder.down.4.attn.1.proj_out.weight": "encoder.down_blocks.4.attentions.1.to_out.0.weight",
        "encoder.down.1.block.0.nin_shortcut.bias": "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
        "encoder.down.3.downsample.conv.weight": "encoder.down_blocks.3.downsamplers.0.conv.weight",
        "encoder.mid.block_2.norm1.weight": "encoder.mid_block.resnets.1.norm1.weight",
        "decoder.mid.attn_1.norm.bias": "decoder.mid_block.attentions.0.group_norm.bias",
        "decoder.up.0.block.2.conv2.weight": "decoder.up_blocks.4.resnets.2.conv2.weight",  # fine <-> coarse
        "decoder.up.4.upsample.conv.bias": "decoder.up_blocks.0.upsamplers.0.conv.bias",
        "decoder.norm_out.weight": "decoder.conv_norm_out.weight",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    for ldm, ours in table.items():
        assert ldm_to_diffusers_key(ldm, 5) == ours
    for foreign in ("loss.logvar", "encoder.down.5.block.0.conv1.weight", "decoder.up.0.block.0.temb_proj.weight",
                    "quantize.embedding.weight"):
        assert ldm_to_diffusers_key(foreign, 5) is None


def test_tiny_official_layout_matches_recorded_official_outputs():
    """Outputs of LTH14/mar's own AutoencoderKL on these weights were recorded at test-writing time; attention on
    both sides' coarsest levels checks that the decoder's level order is reversed for attention too."""
    model = from_official({"model": tiny_state(TINY_KEYS)}, image_size=32)
    assert model.config.encoder_attention == (2,) and model.config.decoder_attention == (2,)
    assert model.config.block_out_channels == (32, 32, 64) and model.config.latent_channels == 4
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q = model.posterior(x)
        out = model.decode_latents(z * model.config.scaling_factor)
    assert (q.mean.double() - RECORDED["mean"]).abs().max() < 1e-5
    assert (q.logvar.double() - RECORDED["logvar"]).abs().max() < 1e-5
    assert (out[:, :, ::4, ::4].double() - RECORDED["decode_every_4th_pixel"]).abs().max() < 1e-5
    assert abs(out.double().abs().mean().item() - RECORDED["decode_abs_mean"]) < 1e-5
    tokens = model.encode(x)  # the tokens are the scaled posterior mean
    assert torch.allclose(tokens.latents.double(), RECORDED["mean"] * MAR_KL16_SCALE, atol=1e-6)


def test_official_file_through_the_hub_skips_loss_entries(tmp_path):
    state = tiny_state(TINY_KEYS)
    path = tmp_path / "kl16.ckpt"
    # LDM training checkpoints carry the LPIPS/discriminator loss module beside the autoencoder
    torch.save({"model": {**state, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(2)}},
               path)
    model = resolve_model(path, kind="tokenizer")
    assert isinstance(model, KLTokenizer)
    direct = from_official({"model": state})
    for k, v in direct.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    attn = model.vae.encoder.down_blocks[2].attentions[0].to_q.weight  # 1x1 conv kernel -> linear weight
    assert torch.equal(attn, state["encoder.down.2.attn.0.q.weight"][:, :, 0, 0])
    # half-precision files come in as float32; a plain state dict is taken too
    half = from_official({k: v.half() for k, v in state.items()})
    assert {p.dtype for p in half.parameters()} == {torch.float32}


def test_recognise_is_specific():
    state = tiny_state(TINY_KEYS)
    assert recognise_official({"model": state}) and recognise_official(state)
    vqgan = {**state, "quantize.embedding.weight": torch.zeros(16, 4)}  # taming's VQGAN: a codebook
    assert not recognise_official(vqgan)
    same_width = {**state, "quant_conv.weight": torch.zeros(4, 4, 1, 1)}  # no mean/log-variance doubling
    assert not recognise_official(same_width)
    llamagen = {k: torch.zeros(1) for k in ("encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight",
                                            "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_out.weight")}
    assert not recognise_official({"model": llamagen})
    assert not recognise_official([1]) and not recognise_official({"model": 3})


def test_bad_official_states_are_hub_errors_naming_the_key():
    state = tiny_state(TINY_KEYS)
    with pytest.raises(HubError, match=r"encoder\.down\.0\.block\.0\.extra\.weight"):
        from_official({**state, "encoder.down.0.block.0.extra.weight": torch.zeros(1)})
    with pytest.raises(HubError, match="post_quant_conv.bias"):
        from_official({k: v for k, v in state.items() if k != "post_quant_conv.bias"})
    with pytest.raises(HubError, match="decoder.conv_in.weight"):
        from_official({**state, "decoder.conv_in.weight": torch.zeros(64, 4, 1, 1)})
    with pytest.raises(HubError, match="not a tensor"):
        from_official({**state, "decoder.conv_in.bias": 3})
    with pytest.raises(HubError, match="not an LDM KL"):
        from_official({"model": {"something": torch.zeros(1)}})


def test_garbage_files_are_refused_with_one_line(tmp_path, capsys):
    from apps import extract_tokens
    from vision.cli import run

    garbage = tmp_path / "kl16.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    foreign = tmp_path / "other.ckpt"
    torch.save({"model": {"weights": torch.zeros(3)}}, foreign)
    broken = tmp_path / "broken.ckpt"
    state = tiny_state(TINY_KEYS)
    torch.save({"model": {**state, "decoder.conv_in.weight": torch.zeros(64, 4, 1, 1)}}, broken)
    for path, says in ((garbage, "not a readable PyTorch checkpoint"), (foreign, "not a tokenizer checkpoint"),
                       (broken, "decoder.conv_in.weight")):
        with pytest.raises(SystemExit) as e:
            run(extract_tokens.main, ["--tokenizer", str(path), "--data", "mnist5k", "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err and err.startswith("error: "), err
    with pytest.raises(HubError):
        load_official(garbage)


# ------------------------------------------------------------------------------- the tokenizer


def test_spec_encode_decode_shapes():
    model = tiny_model()
    assert isinstance(model, Tokenizer)
    assert model.spec.kind == "continuous" and model.spec.grid == (8, 8) and model.spec.downsample == 2
    assert model.spec.channels == 3
    tokens = model.encode(torch.rand(2, 3, 12, 20) * 2 - 1)  # not the native size: the Tokens carry its grid
    assert tokens.latents.shape == (2, 3, 6, 10) and tokens.spec.grid == (6, 10)
    assert model.decode(tokens).shape == (2, 3, 12, 20)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="latents"):
        model.decode_latents(torch.zeros(1, 4, 8, 8))


def test_encode_is_the_scaled_mean_and_sample_draws_from_the_posterior():
    model = tiny_model()
    x = images()
    q = model.posterior(x)
    tokens = model.encode(x)
    assert torch.equal(tokens.latents, (q.mean * 0.5).contiguous())
    assert torch.equal(model.encode(x).latents, tokens.latents)  # deterministic
    a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(7)).latents
    b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(7)).latents
    c = model.encode(x, sample=True, generator=torch.Generator().manual_seed(8)).latents
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, (q.mean + q.std * noise) * 0.5, atol=1e-6)
    assert q.std.min() > 0.1  # a random model's posterior is wide: the sample really differs from the mean
    assert (a - tokens.latents).abs().mean() > 0.1


def test_decode_undoes_the_scaling_and_calibration_keeps_reconstructions():
    model = tiny_model()
    x = images(8)
    with torch.no_grad():
        recon = model.decode(model.encode(x))
        assert torch.allclose(recon, model.vae.decode(model.posterior(x).mean).sample, atol=1e-6)
        scale = model.calibrate_scaling_factor(x, batch_size=3)
        assert model.config.scaling_factor == scale and scale != 0.5
        latents = model.encode(x).latents
        assert abs(latents.double().std().item() - 1) < 1e-5  # unit std on the calibration images
        assert torch.allclose(model.decode(Tokens(model.spec, latents=latents)), recon, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        model.calibrate_scaling_factor(x[:1])


def test_forward_is_reconstruction_plus_the_kl_term():
    model = tiny_model()
    x = images(3)
    with torch.no_grad():
        recon, out = model(x)  # eval mode: decodes the mean
        assert torch.equal(recon, model.decode(model.encode(x)))
    assert isinstance(out, PosteriorOutput) and set(out.losses) == {"kl"}
    mu, logvar = out.mean.double(), out.logvar.double()
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum((1, 2, 3))  # closed form KL(N(mu, var) || N(0, 1))
    assert math.isclose(out.losses["kl"].item(), 1e-3 * kl.mean().item() / (3 * 16 * 16), rel_tol=1e-5)
    assert math.isclose(out.loss.item(), out.losses["kl"].item())
    assert math.isclose(out.metrics["kl"], kl.mean().item() / mu[0].numel(), rel_tol=1e-5)

    model.train()
    torch.manual_seed(3)
    recon_a, out_a = model(x, generator=torch.Generator().manual_seed(5))
    recon_b, _ = model(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(recon_a, recon_b) and not torch.allclose(recon_a, recon, atol=1e-3)  # a posterior sample
    ((recon_a - x).abs().mean() + out_a.loss).backward()
    assert model.vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.vae.quant_conv.weight.grad.abs().sum() > 0


def test_the_kl_term_trains_the_encoder_only_and_shrinks_under_its_own_gradient():
    model = tiny_model().train()
    x = images(4)
    _, out = model(x)
    out.loss.backward()
    assert model.vae.encoder.conv_in.weight.grad.abs().sum() > 0 and model.vae.quant_conv.bias.grad.abs().sum() > 0
    assert model.vae.decoder.conv_in.weight.grad is None and model.vae.post_quant_conv.weight.grad is None
    with torch.no_grad():  # a small step against the gradient lowers the KL
        before = out.losses["kl"].item()
        for p in model.vae.encoder.parameters():
            p -= 1e-2 * p.grad / (p.grad.norm() + 1e-12) if p.grad is not None else 0
        model.vae.quant_conv.weight -= 1e-2 * model.vae.quant_conv.weight.grad / model.vae.quant_conv.weight.grad.norm()
        assert model(x)[1].losses["kl"].item() < before


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.config.scaling_factor = 0.37
    loaded = from_pretrained(save_pretrained(model, tmp_path / "m"))
    assert isinstance(loaded, KLTokenizer) and loaded.config == model.config
    x = images()
    assert torch.equal(loaded.encode(x).latents, model.encode(x).latents)


def test_config_validation():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        KLConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ConfigError, match="encoder_attention level 3"):
        KLConfig(image_size=32, block_out_channels=(32, 32, 32), encoder_attention=(3,))
    with pytest.raises(ConfigError, match="scaling_factor"):
        KLConfig(scaling_factor=0.0)
    with pytest.raises(ConfigError, match="kl_weight"):
        KLConfig(kl_weight=-1.0)
    with pytest.raises(ConfigError, match="multiple of"):
        kl_config("kl-mnist", image_size=30)
    with pytest.raises(ConfigError, match="latent_channels"):
        KLConfig(latent_channels=0)
    assert kl_config("kl-mnist").downsample == 4 and kl_config("kl16").downsample == 16
    with pytest.raises(HubError, match="KL autoencoder architecture"):
        official_config({k: torch.empty(s, device="meta") for k, s in TINY_KEYS.items()}, image_size=30)


def test_convert_refuses_a_non_1x1_attention_kernel():
    state = tiny_state(TINY_KEYS)
    state["decoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(HubError, match="1x1"):
        convert_official_state(state, 3)


# ------------------------------------------------------------------------------- training app


def test_train_tokenizer_trains_calibrates_and_saves_a_kl_mnist_model(tmp_path, capsys):
    from apps import train_tokenizer
    from vision.data.datasets import MNISTImages

    out = tmp_path / "run"
    assert train_tokenizer.main(["--model", "kl-mnist", "--data", "mnist5k", "--perceptual-weight", "0", "--no-gan",
                                 "--lr", "1e-3", "--batch-size", "4", "--steps", "3", "--log-every", "1", "--quiet",
                                 "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    model = from_pretrained(out / "model")
    assert isinstance(model, KLTokenizer) and model.spec.grid == (8, 8) and model.spec.channels == 4
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(log["kl_loss"] > 0 and "q_kl" in log for log in logs)  # the KL term is part of the training loss
    # the saved scaling factor gives the first 1000 training images' latents unit std
    latents = model.encode(MNISTImages(32).x[:1000]).latents
    assert model.config.scaling_factor != 1.0 and abs(latents.double().std().item() - 1) < 1e-4
    assert "scaling factor" in printed and "psnr_db" in printed and "utilisation" not in printed
