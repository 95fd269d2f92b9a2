"""LIIF: official key layout, fast path == official query, tiled == untiled, exact sizes, import errors."""
import json
from pathlib import Path

import pytest
import torch

from vision.decoders.liif import LIIF, LIIFConfig, config_from_official, from_official, make_cell, make_coord
from vision.hub import from_pretrained, save_pretrained
from vision.tokens import Decoder

KEYS = json.loads((Path(__file__).resolve().parent.parent / "data" / "liif_official_keys.json").read_text())

SMALL_EDSR = dict(encoder="edsr-baseline", encoder_args=dict(n_resblocks=2, n_feats=8), hidden_list=[32, 32])
SMALL_RDN = dict(encoder="rdn", encoder_args=dict(G0=8, num_blocks=2, num_layers=2, growth=4), hidden_list=[32, 32])


def random_liif(seed: int = 0, **config) -> LIIF:
    """Random weights with non-zero biases and outputs of order 1, so every term shows in a diff."""
    torch.manual_seed(seed)
    model = LIIF(LIIFConfig(**config)).eval()
    with torch.no_grad():
        if model.config.skip != "none":  # its residual head starts at zero
            model.imnet.layers[-1].reset_parameters()
        for name, p in model.named_parameters():
            if name.endswith("bias") and "mean" not in name:
                p.normal_(0, 0.05)
        model.imnet.layers[-1].weight.mul_(20)
    return model


def full_query(model: LIIF, x: torch.Tensor, size: tuple[int, int], reference: bool = False) -> torch.Tensor:
    """Query every output pixel at once, (B, 3, H, W)."""
    b, (h, w) = x.shape[0], size
    coord = make_coord(size).unsqueeze(0).expand(b, -1, -1)
    cell = make_cell(b, h * w, size)
    feat = model.encode(x)
    pred = model.query_reference(feat, coord, cell) if reference else model.query(feat, coord, cell)
    return pred.view(b, h, w, -1).permute(0, 3, 1, 2)


def official_checkpoint(model: LIIF, args: dict) -> dict:
    return {"model": {"name": "liif", "args": args, "sd": dict(model.state_dict())}, "epoch": 1}


SMALL_ARGS = {
    "encoder_spec": {"name": "edsr-baseline", "args": {"n_resblocks": 1, "n_feats": 8, "no_upsampling": True}},
    "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [16]}},
}


def test_make_coord_pixel_centres():
    coord = make_coord((2, 4))
    assert coord.shape == (8, 2)
    assert torch.equal(coord[:4, 0], torch.full((4,), -0.5))  # row-major, (row, col) order
    assert torch.equal(coord[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.equal(coord[4:, 0], torch.full((4,), 0.5))
    assert torch.equal(make_coord((2, 4), flatten=False)[1, 2], torch.tensor([0.5, 0.25]))
    assert torch.allclose(make_cell(1, 1, (4, 5))[0, 0], torch.tensor([0.5, 0.4]))


@pytest.mark.parametrize("name", ["edsr-baseline-liif", "rdn-liif"])
def test_official_keys_load_directly(name):
    entry = KEYS[name]
    model = LIIF(config_from_official(entry["args"]))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == entry["keys"]  # same names, same shapes, nothing extra
    sd = {k: torch.zeros(shape) for k, shape in entry["keys"].items()}
    loaded = from_official({"model": {"name": "liif", "args": entry["args"], "sd": sd}})
    assert all(int(torch.count_nonzero(p)) == 0 for p in loaded.parameters())
    if name == "edsr-baseline-liif":  # 82 keys; 1,220,440 + 346,883 parameters (official counts)
        assert len(ours) == 82
        assert sum(p.numel() for p in model.encoder.parameters()) == 1_220_440
        assert sum(p.numel() for p in model.imnet.parameters()) == 346_883


def test_from_official_rejects_unmapped_missing_and_misshapen_keys(tmp_path):
    model = from_official(official_checkpoint(LIIF(config_from_official(SMALL_ARGS)), SMALL_ARGS))

    ckpt = official_checkpoint(model, SMALL_ARGS)
    ckpt["model"]["sd"]["encoder.tail.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.tail.0.weight"):
        from_official(ckpt)

    ckpt = official_checkpoint(model, SMALL_ARGS)
    del ckpt["model"]["sd"]["imnet.layers.2.bias"]
    with pytest.raises(ValueError, match="imnet.layers.2.bias"):
        from_official(ckpt)

    ckpt = official_checkpoint(model, SMALL_ARGS)
    ckpt["model"]["sd"]["encoder.head.0.weight"] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(ValueError, match="encoder.head.0.weight"):
        from_official(ckpt)

    upsampling = json.loads(json.dumps(SMALL_ARGS))
    upsampling["encoder_spec"]["args"]["no_upsampling"] = False
    with pytest.raises(ValueError, match="no_upsampling"):
        from_official(official_checkpoint(model, upsampling))

    # through a .pth file (torch.load weights_only) the weights arrive unchanged
    path = tmp_path / "liif.pth"
    torch.save(official_checkpoint(model, SMALL_ARGS), path)
    again = from_official(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_hand_set_mlp_gives_bilinear_interpolation_and_cell(reference):
    """An MLP that returns the centre latent makes the area-weighted ensemble (with its diagonal
    swap) exactly bilinear interpolation between latent centres; one that returns its cell
    input shows rel_cell = cell * (h, w)."""
    model = LIIF(LIIFConfig(**{**SMALL_EDSR, "hidden_list": [5]})).eval()
    h, w = 6, 9
    feat = torch.randn(1, 8, h, w)
    lin0, lin1 = model.imnet.layers[0], model.imnet.layers[2]
    with torch.no_grad():
        for p in model.imnet.parameters():
            p.zero_()
        for c in range(3):  # hidden c = relu(centre tap of channel c + 100), output = hidden - 100
            lin0.weight[c, c * 9 + 4] = 1
            lin0.bias[c] = 100
            lin1.weight[c, c] = 1
            lin1.bias[c] = -100
        lin0.weight[3, -2] = lin0.weight[4, -1] = 1  # the two rel_cell inputs, passed to outputs 0 and 1
        lin1.weight[0, 3] = lin1.weight[1, 4] = 1000
    # queries strictly between the outermost latent centres
    coord = (torch.rand(1, 400, 2) * 2 - 1) * torch.tensor([1 - 1 / h, 1 - 1 / w])
    cell = make_cell(1, 400, (17, 20))
    query = model.query_reference if reference else model.query
    with torch.no_grad():
        pred = query(feat, coord, cell * 0)
        cell_pred = query(feat, coord, cell) - pred
    bilinear = torch.nn.functional.grid_sample(feat[:, :3], coord.flip(-1).unsqueeze(1), mode="bilinear", align_corners=False)
    assert (pred - bilinear[:, :, 0].transpose(1, 2)).abs().max() < 1e-4
    assert torch.allclose(cell_pred[0, :, :2] / 1000, torch.tensor([2 / 17 * h, 2 / 20 * w]).expand(400, 2), atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        SMALL_EDSR,
        SMALL_RDN,
        {**SMALL_EDSR, "feat_unfold": False},
        {**SMALL_EDSR, "local_ensemble": False},
        {**SMALL_EDSR, "cell_decode": False},
    ],
    ids=["edsr", "rdn", "no-unfold", "no-ensemble", "no-cell"],
)
def test_fast_query_equals_official_query(config):
    model = random_liif(**config)
    x = torch.randn(2, 3, 11, 14)
    feat = model.encode(x)
    # latent centres and borders (scale 1 and 2: the ensemble's +-r shift lands exactly on
    # cell borders) plus random points, clamped edges included
    coord = torch.cat([make_coord((11, 14)), make_coord((22, 28)), torch.rand(300, 2) * 2.2 - 1.1]).clamp(-1, 1)
    coord = coord.unsqueeze(0).expand(2, -1, -1).clone()
    coord[1] = coord[1].flip(0)
    cell = torch.rand(2, coord.shape[1], 2) * 0.3
    with torch.no_grad():
        reference = model.query_reference(feat, coord, cell)
        fast = model.query(feat, coord, cell, chunk=97)
    assert reference.abs().mean() > 0.1
    assert (fast - reference).abs().max() <= 1e-5


def test_fast_path_default_config_and_gradients():
    model = random_liif()  # EDSR-baseline-LIIF as released: 16 blocks, 64 feats, MLP 4x256
    x = torch.randn(1, 3, 6, 5)
    size = (22, 19)  # x3.7
    with torch.no_grad():
        reference = full_query(model, x, size, reference=True)
        assert (full_query(model, x, size) - reference).abs().max() <= 1e-5
        assert (model.decode(x, size) - reference).abs().max() <= 1e-5

    # the fast path is also the training path: same gradients as the official query
    small = random_liif(**SMALL_EDSR)
    x = torch.randn(1, 3, 7, 9)
    grads = []
    for reference in (True, False):
        small.zero_grad()
        full_query(small, x, (10, 13), reference=reference).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in small.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0 and (grads[0] - grads[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("config", [SMALL_EDSR, SMALL_RDN, {**SMALL_EDSR, "skip": "bicubic"}],
                         ids=["edsr", "rdn", "edsr-bicubic-skip"])
def test_tiled_equals_untiled(config, monkeypatch):
    model = random_liif(**config)
    x = torch.randn(2, 3, 23, 30)
    with torch.no_grad():
        for size in [(53, 69), (15, 17)]:  # x2.3 and a downscale
            untiled = model.decode(x, size)
            for tile in (5, 8):
                assert (model.decode(x, size, tile=tile) - untiled).abs().max() <= 1e-5
        # control: a margin without the encoder's receptive field really changes the result
        monkeypatch.setattr(type(model.encoder), "receptive_radius", property(lambda self: 0))
        assert (model.decode(x, (53, 69), tile=5) - model.decode(x, (53, 69))).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [1.0, 1.37, 3.7, 12])
def test_upscale_sizes_exact(scale):
    model = random_liif(**SMALL_EDSR)
    image = torch.rand(1, 3, 7, 5) * 2 - 1
    size = (round(7 * scale), round(5 * scale))
    out = model.upscale(image, size, tile=3, chunk=1000)
    assert out.shape == (1, 3, *size)
    with torch.no_grad():
        reference = full_query(model, image, size, reference=True).clamp(-1, 1)
    assert (out - reference).abs().max() <= 1e-5
    assert out.min() >= -1 and out.max() <= 1


def test_upscale_rejects_bad_input():
    model = random_liif(**SMALL_EDSR)
    with pytest.raises(ValueError):
        model.upscale(torch.rand(3, 7, 5), (10, 10))
    with pytest.raises(ValueError):
        model.upscale(torch.rand(1, 3, 7, 5), (0, 10))


def test_registered_decoder_round_trips(tmp_path):
    model = random_liif(**SMALL_RDN)
    assert isinstance(model, Decoder)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, LIIF) and loaded.config == model.config
    x = torch.rand(1, 3, 6, 7) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(x, (9, 11)), model.decode(x, (9, 11)))


def test_bicubic_skip_starts_at_bicubic_and_is_a_residual():
    """skip='bicubic' (not in LIIF): output = MLP residual + bicubic upsampling of the input."""
    import torch.nn.functional as F

    x = torch.rand(2, 3, 13, 17) * 2 - 1
    size = (48, 37)  # x3.7 rows, a downscale-ish x2.2 columns
    untrained = LIIF(LIIFConfig(**SMALL_EDSR, skip="bicubic")).eval()  # residual head starts at zero
    bicubic = F.interpolate(x.double(), size=size, mode="bicubic", align_corners=False).float()
    with torch.no_grad():
        assert (untrained.decode(x, size) - bicubic).abs().max() <= 1e-5
        model = random_liif(**SMALL_EDSR, skip="bicubic")
        plain = LIIF(LIIFConfig(**SMALL_EDSR))
        plain.load_state_dict(model.state_dict())
        out = model.decode(x, size)
        assert (out - plain.eval().decode(x, size) - bicubic).abs().max() <= 1e-5
        coord = make_coord(size).unsqueeze(0).expand(2, -1, -1)
        trained_path = model(x, coord, make_cell(2, coord.shape[1], size)).view(2, *size, 3).permute(0, 3, 1, 2)
        assert (trained_path - out).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="skip"):
        LIIF(LIIFConfig(**SMALL_EDSR, skip="bilinear"))


# ---------------------------------------------------------------- the grid rendering path (query_grid)


@pytest.mark.parametrize(
    "config",
    [
        SMALL_EDSR,
        SMALL_RDN,
        {**SMALL_EDSR, "feat_unfold": False},
        {**SMALL_EDSR, "local_ensemble": False},
        {**SMALL_EDSR, "cell_decode": False},
        {**SMALL_EDSR, "hidden_list": []},
        {**SMALL_EDSR, "hidden_list": [24, 40, 16]},
    ],
    ids=["edsr", "rdn", "no-unfold", "no-ensemble", "no-cell", "one-linear", "uneven-widths"],
)
def test_grid_render_equals_official_query_per_pixel(config):
    """decode's separable grid path, for two different images in one batch, any tile and chunk,
    gives the official per-pixel query's values (up-, down- and mixed scales)."""
    model = random_liif(seed=1, **config)
    x = torch.randn(2, 3, 13, 17)
    with torch.no_grad():
        for size in [(48, 63), (9, 30), (13, 17)]:
            reference = full_query(model, x, size, reference=True)
            assert reference.abs().mean() > 0.1 and (reference[0] - reference[1]).abs().mean() > 0.1
            for tile, chunk in [(None, None), (5, 7), (6, 100_000)]:
                assert (model.decode(x, size, tile=tile, chunk=chunk) - reference).abs().max() <= 1e-5


def test_query_grid_refuses_a_window_without_the_needed_latents():
    model = random_liif(**SMALL_EDSR)
    z = model.project(model.encode(torch.randn(1, 3, 10, 10)))
    rows = cols = torch.linspace(-0.9, 0.9, 7)
    with torch.no_grad():
        model.query_grid(z, rows, cols, (10, 10), (7, 7))
        with pytest.raises(RuntimeError, match="outside the given window"):
            model.query_grid(z[:, 2:], rows, cols, (10, 10), (7, 7), offset=(2, 0))


def test_decode_under_autograd_takes_the_differentiable_path():
    model = random_liif(**{**SMALL_EDSR, "skip": "bicubic"})
    x = torch.randn(1, 3, 9, 8, requires_grad=True)
    with torch.no_grad():
        inference = model.decode(x, (20, 17), tile=4)
    out = model.decode(x, (20, 17), tile=4)
    assert out.requires_grad and (out - inference).abs().max() <= 1e-5
    out.square().mean().backward()
    assert x.grad.abs().max() > 0 and model.imnet.layers[0].weight.grad.abs().max() > 0


def test_half_precision_mlp_stays_within_one_grey_level_on_a_photo():
    """The shipped model with a bfloat16 MLP (apps.upscale --half) against float32, in 8-bit levels."""
    from vision.data.images import read_image
    from vision.data.samples import sample_photo

    model = from_pretrained("liif-lite")
    photo = read_image(sample_photo("chelsea"))[None, :, 100:164, 150:214]
    size = (237, 237)  # x3.7
    full = model.upscale(photo, size)
    half = model.upscale(photo, size, dtype=torch.bfloat16)
    levels = lambda image: ((image + 1) * 127.5).round()  # noqa: E731
    changed = levels(full) != levels(half)
    assert (levels(full) - levels(half)).abs().max() <= 1
    assert 0 < changed.float().mean() < 0.1  # bfloat16 did run (some pixels moved), and moved few
    with pytest.raises(ValueError, match="dtype"):
        model.upscale(photo, size, dtype=torch.int8)


# ---------------------------------------------------------------- tile sizing from free memory (the GPU path)


def test_plan_tiles_fills_but_never_exceeds_the_budget():
    from vision.decoders.liif import GRID_CHUNK, plan_tiles

    sizing = dict(encoder_bytes=520.0, output_bytes=96 * 13.69, margin=21, query_bytes=2 * 4 * 64 * 4.0, max_side=8000)
    previous = 0
    for free in (2**28, 2**30, 2**32, 2**34):
        tile, chunk = plan_tiles(free, **sizing)
        used = ((tile + 42) ** 2 * sizing["encoder_bytes"] + tile**2 * sizing["output_bytes"]
                + chunk * sizing["query_bytes"])
        assert used <= 0.5 * free  # within the budget
        bigger = (tile + 43) ** 2 * sizing["encoder_bytes"] + (tile + 1) ** 2 * sizing["output_bytes"]
        assert tile == sizing["max_side"] or bigger + chunk * sizing["query_bytes"] > 0.5 * free  # and the largest
        assert tile >= previous and chunk * sizing["query_bytes"] <= free / 8
        previous = tile
    assert plan_tiles(2**40, **{**sizing, "max_side": 300})[0] == 300  # never past the image
    assert plan_tiles(0, **sizing) == (16, GRID_CHUNK)  # nothing free: the smallest tile, the CPU chunk


def test_render_plan_counts_the_images_and_the_model():
    model = from_pretrained("liif-lite")
    free = 4 * 2**30
    tile, chunk = model.render_plan(free, (512, 512), (1894, 1894))
    assert tile == 512  # 4 GiB holds a 512x512 input whole
    small_tile, small_chunk = model.render_plan(free, (4000, 4000), (14800, 14800))  # the output alone: 2.4 GiB
    assert 16 <= small_tile < 4000 and small_chunk < chunk  # tiled, and less room left for the MLP
    half_tile, half_chunk = model.render_plan(free, (4000, 4000), (14800, 14800), dtype=torch.bfloat16)
    assert half_tile >= small_tile and half_chunk > small_chunk  # 2-byte MLP values: more queries fit


def test_separable_bicubic_skip_equals_grid_sample_and_is_the_same_in_every_crop():
    from vision.decoders.liif import make_coord_1d

    model = LIIF(LIIFConfig(**SMALL_EDSR, skip="bicubic"))
    x = torch.rand(2, 3, 37, 29) * 2 - 1
    for size in [(137, 107), (20, 50), (5, 3)]:
        rows, cols = make_coord_1d(size[0]), make_coord_1d(size[1])
        coord = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).view(1, -1, 2).expand(2, -1, -1)
        per_pixel = model.skip_rgb(x, coord).view(2, *size, 3)
        full = model.skip_grid(x, rows, cols, (0, 0, 37, 29))
        assert (full - per_pixel).abs().max() <= 1e-6
        # a crop holding every tap (2 pixels beyond the queried centres) gives the full image's numbers exactly
        r0, r1, c0, c1 = 5, 30, 3, 20
        keep_r = (rows > -1 + 2 * (r0 + 2) / 37) & (rows < -1 + 2 * (r1 - 2) / 37)
        keep_c = (cols > -1 + 2 * (c0 + 2) / 29) & (cols < -1 + 2 * (c1 - 2) / 29)
        crop = model.skip_grid(x[:, :, r0:r1, c0:c1], rows[keep_r], cols[keep_c], (r0, c0, 37, 29))
        assert torch.equal(crop, full[:, keep_r][:, :, keep_c])
