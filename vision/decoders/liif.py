"""LIIF: Local Implicit Image Function (Chen, Liu & Wang, CVPR 2021; github.com/yinboc/liif).

An encoder (EDSR-baseline or RDN, no upsampling) turns an image into a latent grid of the same
size; an MLP `imnet` maps [3x3-unfolded latent, relative coordinate, cell size] to RGB at any
continuous coordinate, and four such predictions (the latent neighbours around the query) are
blended with bilinear-style area weights ("local ensemble").

Two query paths give the same numbers:

* `query_reference` is the official `query_rgb`, operation for operation.
* `query` is the fast exact path. The first MLP layer is linear, so on the unfolded feature
  it is a 3x3 convolution: W1 [unfold(f); rel; cell] = conv3x3(f, W1_f)[nearest] + W_r rel +
  W_c cell + b. The convolution runs once per image (or tile) instead of unfolding the 9C-wide
  feature and re-multiplying it for every query and every ensemble member.

`decode` / `upscale` render any output size in tiles whose input crop carries enough margin for
the encoder's receptive field, so a tiled render equals the untiled one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.decoders.edsr import EDSR, EDSRConfig
from vision.decoders.rdn import RDN, RDN_PRESETS, RDNConfig
from vision.hub import HubError, check_state_dict, load_official_state_dict, register_model

DEFAULT_CHUNK = 30000  # queries per MLP batch; official `eval_bsize`
ENSEMBLE_EPS = 1e-6  # official `eps_shift`, keeps shifted queries off latent cell borders
EDSR_FULL = dict(n_resblocks=32, n_feats=256, res_scale=0.1)  # official `make_edsr` defaults


@dataclass
class LIIFConfig:
    encoder: str = "edsr-baseline"  # 'edsr-baseline' | 'edsr' | 'rdn'
    encoder_args: dict[str, Any] = field(default_factory=dict)  # EDSRConfig / RDNConfig fields
    hidden_list: list[int] = field(default_factory=lambda: [256] * 4)
    out_dim: int = 3
    local_ensemble: bool = True
    feat_unfold: bool = True
    cell_decode: bool = True
    # Not in LIIF: "bicubic" adds the bicubic upsampling of the input at each query, so the MLP
    # learns a residual (VDSR's global skip; LTE adds a bilinear one). Official checkpoints: "none".
    skip: str = "none"


def make_encoder(name: str, args: dict[str, Any]) -> nn.Module:
    if name == "edsr-baseline":
        return EDSR(EDSRConfig(**args))
    if name == "edsr":
        return EDSR(EDSRConfig(**{**EDSR_FULL, **args}))
    if name == "rdn":
        return RDN(RDNConfig(**args))
    raise ValueError(f"unknown LIIF encoder {name!r}; expected 'edsr-baseline', 'edsr' or 'rdn'")


# ---------------------------------------------------------------- coordinates


def make_coord_1d(n: int, device: torch.device | str | None = None) -> Tensor:
    """Pixel centres of n cells spanning [-1, 1]: -1 + 1/n + 2i/n (same float ops as official)."""
    r = 1 / n
    return -1 + r + (2 * r) * torch.arange(n, device=device).float()


def make_coord(shape: tuple[int, int], flatten: bool = True, device=None) -> Tensor:
    """(h, w, 2) or (h*w, 2) pixel-centre coordinates in (row, col) order, as official `make_coord`."""
    axes = [make_coord_1d(n, device) for n in shape]
    coord = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return coord.view(-1, coord.shape[-1]) if flatten else coord


def make_cell(batch: int, num: int, size: tuple[int, int], device=None) -> Tensor:
    """(B, Q, 2) cell size of an (H, W) output: (2/H, 2/W), as official demo/test."""
    h, w = size
    cell = torch.ones(batch, num, 2, device=device)
    cell[..., 0] *= 2 / h
    cell[..., 1] *= 2 / w
    return cell


def nearest_latent(coord: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Row/col index that `grid_sample(mode='nearest', align_corners=False)` picks for each query.

    Asking grid_sample itself (on 1-pixel-wide index ramps; the sampler treats each axis
    separately) makes the choice, including its rounding at cell borders, identical to the
    official lookup on the full feature map.
    """
    b, q, _ = coord.shape
    h, w = size
    zero = torch.zeros_like(coord[..., :1])
    rows = torch.arange(h, device=coord.device, dtype=coord.dtype).view(1, 1, h, 1).expand(b, 1, h, 1)
    cols = torch.arange(w, device=coord.device, dtype=coord.dtype).view(1, 1, 1, w).expand(b, 1, 1, w)
    grid_y = torch.cat([zero, coord[..., :1]], dim=-1).unsqueeze(1)  # grid is (x, y)
    grid_x = torch.cat([coord[..., 1:], zero], dim=-1).unsqueeze(1)
    iy = F.grid_sample(rows, grid_y, mode="nearest", align_corners=False).view(b, q)
    ix = F.grid_sample(cols, grid_x, mode="nearest", align_corners=False).view(b, q)
    return iy.long(), ix.long()


# ---------------------------------------------------------------- model


class MLP(nn.Module):
    """Linear-ReLU stack; `layers.{0,2,4,...}` are the Linears, as official `models/mlp.py`."""

    def __init__(self, dim_in: int, dim_out: int, hidden_list: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for hidden in hidden_list:
            layers += [nn.Linear(dim_in, hidden), nn.ReLU()]
            dim_in = hidden
        layers.append(nn.Linear(dim_in, dim_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        return self.layers(x.view(-1, x.shape[-1])).view(*shape, -1)


@register_model("liif")
class LIIF(nn.Module):
    config_class = LIIFConfig

    def __init__(self, config: LIIFConfig | None = None):
        super().__init__()
        self.config = config = config or LIIFConfig()
        self.encoder = make_encoder(config.encoder, config.encoder_args)
        feat_dim = self.encoder.out_dim * (9 if config.feat_unfold else 1)
        self.num_pos = 2 + (2 if config.cell_decode else 0)  # rel_coord (+ rel_cell)
        self.imnet = MLP(feat_dim + self.num_pos, config.out_dim, config.hidden_list)
        if config.skip not in ("none", "bicubic"):
            raise ValueError(f"unknown LIIF skip {config.skip!r}; expected 'none' or 'bicubic'")
        if config.skip == "bicubic" and config.out_dim != 3:
            raise ValueError("skip='bicubic' adds the RGB input to the output, so out_dim must be 3")
        if config.skip == "bicubic":  # the residual starts at zero: an untrained model is bicubic
            nn.init.zeros_(self.imnet.layers[-1].weight)
            nn.init.zeros_(self.imnet.layers[-1].bias)

    @property
    def shifts(self) -> list[tuple[int, int]]:
        """(row, col) latent-neighbour offsets of the ensemble, in official loop order."""
        return [(-1, -1), (-1, 1), (1, -1), (1, 1)] if self.config.local_ensemble else [(0, 0)]

    # ------------------------------------------------------------ official semantics

    def encode(self, x: Tensor) -> Tensor:
        """Latent grid (B, C, h, w) of an encoder input (official `gen_feat`)."""
        return self.encoder(x)

    def forward(self, x: Tensor, coord: Tensor, cell: Tensor | None = None) -> Tensor:
        """Training signature of the official model: (B, Q, 2) coords and cells -> (B, Q, out_dim)."""
        out = self.query(self.encode(x), coord, cell)
        return out + self.skip_rgb(x, coord) if self.config.skip == "bicubic" else out

    def skip_rgb(self, x: Tensor, coord: Tensor, window: tuple[int, int, int, int] | None = None) -> Tensor:
        """Bicubic samples (B, Q, C) of the input at pixel-centre coords (edges replicated).

        `x` may be the crop [r0:r1, c0:c1] = `window` of a full (h, w) input; `coord` stays in the
        full image's frame. Equals F.interpolate(mode='bicubic', align_corners=False) on a grid.
        """
        # float64 so that a crop's re-normalised grid picks the same points as the full image's
        # (MPS has no float64: there tiled and untiled may differ by float32 rounding)
        grid = coord.to(torch.float32 if x.device.type == "mps" else torch.float64)
        if window is not None:
            r0, c0, h, w = window
            hc, wc = x.shape[-2:]
            grid = grid * grid.new_tensor([h / hc, w / wc]) - grid.new_tensor([(2 * r0 + hc - h) / hc, (2 * c0 + wc - w) / wc])
        out = F.grid_sample(x.to(grid.dtype), grid.flip(-1).unsqueeze(1), mode="bicubic", padding_mode="border",
                            align_corners=False).to(x.dtype)
        return out[:, :, 0, :].permute(0, 2, 1)

    def query_reference(self, feat: Tensor, coord: Tensor, cell: Tensor | None = None) -> Tensor:
        """Official `query_rgb`, step for step (slow: unfolds 9C channels, 4 full MLP passes)."""
        cfg = self.config
        if cfg.feat_unfold:
            feat = F.unfold(feat, 3, padding=1).view(feat.shape[0], feat.shape[1] * 9, *feat.shape[-2:])
        eps = ENSEMBLE_EPS if cfg.local_ensemble else 0
        h, w = feat.shape[-2:]
        ry, rx = 2 / h / 2, 2 / w / 2
        feat_coord = make_coord((h, w), flatten=False, device=feat.device).permute(2, 0, 1)
        feat_coord = feat_coord.unsqueeze(0).expand(feat.shape[0], 2, h, w)

        preds, areas = [], []
        for vy, vx in self.shifts:
            coord_ = coord.clone()
            coord_[:, :, 0] += vy * ry + eps
            coord_[:, :, 1] += vx * rx + eps
            coord_.clamp_(-1 + 1e-6, 1 - 1e-6)
            grid = coord_.flip(-1).unsqueeze(1)
            q_feat = F.grid_sample(feat, grid, mode="nearest", align_corners=False)[:, :, 0, :].permute(0, 2, 1)
            q_coord = F.grid_sample(feat_coord, grid, mode="nearest", align_corners=False)[:, :, 0, :].permute(0, 2, 1)
            rel_coord = coord - q_coord
            rel_coord[:, :, 0] *= h
            rel_coord[:, :, 1] *= w
            inp = torch.cat([q_feat, rel_coord], dim=-1)
            if cfg.cell_decode:
                rel_cell = cell.clone()
                rel_cell[:, :, 0] *= h
                rel_cell[:, :, 1] *= w
                inp = torch.cat([inp, rel_cell], dim=-1)
            preds.append(self.imnet(inp))
            areas.append(torch.abs(rel_coord[:, :, 0] * rel_coord[:, :, 1]) + 1e-9)
        return _blend(preds, areas, cfg.local_ensemble)

    # ------------------------------------------------------------ fast exact path

    def project(self, feat: Tensor) -> Tensor:
        """Feature part of the first MLP layer as a convolution: (B, C, h, w) -> (B, h, w, D).

        F.unfold orders channels as c*9 + (ky*3 + kx), so W1[:, :9C] viewed as (D, C, 3, 3) is
        exactly a padding-1 conv kernel (zero padding = the unfold's zero padding).
        """
        weight = self.imnet.layers[0].weight
        k = 3 if self.config.feat_unfold else 1
        kernel = weight[:, : feat.shape[1] * k * k].reshape(weight.shape[0], feat.shape[1], k, k)
        return F.conv2d(feat, kernel, padding=k // 2).permute(0, 2, 3, 1)

    def query(self, feat: Tensor, coord: Tensor, cell: Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """Same values as `query_reference` (to float rounding), without unfolding per query."""
        return self.query_projected(self.project(feat), coord, cell, feat.shape[-2:], chunk=chunk)

    def query_projected(
        self,
        z: Tensor,
        coord: Tensor,
        cell: Tensor | None,
        size: tuple[int, int],
        offset: tuple[int, int] = (0, 0),
        chunk: int = DEFAULT_CHUNK,
    ) -> Tensor:
        """Decode queries from projected latents `z` (B, hz, wz, D).

        `z` may be a window of the full (h, w) = `size` latent grid starting at `offset`;
        coordinates, cells and neighbour choice are always those of the full grid.
        """
        cfg = self.config
        if cfg.cell_decode and cell is None:
            raise ValueError("this LIIF decodes cell sizes (cell_decode=True); pass `cell`")
        b, hz, wz, dim = z.shape
        h, w = size
        oy, ox = offset
        z = z.reshape(b, hz * wz, dim)
        first, rest = self.imnet.layers[0], self.imnet.layers[1:]
        w_pos = first.weight[:, -self.num_pos :]
        ys, xs = make_coord_1d(h, z.device), make_coord_1d(w, z.device)
        eps = ENSEMBLE_EPS if cfg.local_ensemble else 0
        ry, rx = 2 / h / 2, 2 / w / 2

        outs = []
        for start in range(0, coord.shape[1], chunk):
            c = coord[:, start : start + chunk]
            if cfg.cell_decode:
                rel_cell = cell[:, start : start + chunk].clone()
                rel_cell[:, :, 0] *= h
                rel_cell[:, :, 1] *= w
            preds, areas = [], []
            for vy, vx in self.shifts:
                c_ = c.clone()
                c_[:, :, 0] += vy * ry + eps
                c_[:, :, 1] += vx * rx + eps
                c_.clamp_(-1 + 1e-6, 1 - 1e-6)
                iy, ix = nearest_latent(c_, (h, w))
                rel_coord = c - torch.stack([ys[iy], xs[ix]], dim=-1)
                rel_coord[:, :, 0] *= h
                rel_coord[:, :, 1] *= w
                iy, ix = iy - oy, ix - ox
                if iy.min() < 0 or ix.min() < 0 or iy.max() >= hz or ix.max() >= wz:
                    raise RuntimeError("LIIF query needs latents outside the given window (tile margin too small)")
                index = (iy * wz + ix).unsqueeze(-1).expand(-1, -1, dim)
                pos = torch.cat([rel_coord, rel_cell], dim=-1) if cfg.cell_decode else rel_coord
                hidden = z.gather(1, index) + F.linear(pos, w_pos, first.bias)
                preds.append(rest(hidden))
                areas.append(torch.abs(rel_coord[:, :, 0] * rel_coord[:, :, 1]) + 1e-9)
            outs.append(_blend(preds, areas, cfg.local_ensemble))
        return torch.cat(outs, dim=1)

    # ------------------------------------------------------------ rendering

    def decode(self, x: Tensor, size: tuple[int, int], tile: int | None = None, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """Render the encoder input `x` (an image in [-1, 1] for EDSR/RDN) at `size` = (H, W).

        Returns (B, out_dim, H, W), unclamped. With `tile`, the latent grid is cut into
        tile x tile cores; each core's encoder input is cropped with a margin of the encoder's
        receptive radius + 3 (the 3x3 unfold, the +-1 ensemble neighbour, one of slack), and
        only output pixels whose coordinates fall in the core are queried, so the result
        equals the untiled one while memory is bounded by the tile size.
        """
        bsz, _, h, w = x.shape
        H, W = size
        tile = tile or max(h, w)
        margin = self.encoder.receptive_radius + 3
        ys_out, xs_out = make_coord_1d(H, x.device), make_coord_1d(W, x.device)
        out = x.new_empty(bsz, self.config.out_dim, H, W)
        for a0, a1, i0, i1 in _bands(ys_out, h, tile):
            for b0, b1, j0, j1 in _bands(xs_out, w, tile):
                if i0 == i1 or j0 == j1:
                    continue
                r0, r1, c0, c1 = max(a0 - margin, 0), min(a1 + margin, h), max(b0 - margin, 0), min(b1 + margin, w)
                feat = self.encode(x[:, :, r0:r1, c0:c1])
                # latents the queries can touch (core +-2), +1 so their 3x3 conv sees true neighbours
                fy0, fy1, fx0, fx1 = max(a0 - 3, 0), min(a1 + 3, h), max(b0 - 3, 0), min(b1 + 3, w)
                z = self.project(feat[:, :, fy0 - r0 : fy1 - r0, fx0 - c0 : fx1 - c0])
                # drop the rim whose conv saw the crop's zero padding instead of real latents
                top, left = int(fy0 > 0), int(fx0 > 0)
                z = z[:, top : z.shape[1] - int(fy1 < h), left : z.shape[2] - int(fx1 < w)]
                coord = torch.stack(torch.meshgrid(ys_out[i0:i1], xs_out[j0:j1], indexing="ij"), dim=-1)
                coord = coord.view(1, -1, 2).expand(bsz, -1, -1)
                cell = make_cell(bsz, coord.shape[1], (H, W), x.device) if self.config.cell_decode else None
                pred = self.query_projected(z, coord, cell, (h, w), (fy0 + top, fx0 + left), chunk)
                if self.config.skip == "bicubic":
                    pred = pred + self.skip_rgb(x[:, :, r0:r1, c0:c1], coord, (r0, c0, h, w))
                out[:, :, i0:i1, j0:j1] = pred.view(bsz, i1 - i0, j1 - j0, -1).permute(0, 3, 1, 2)
        return out

    @torch.no_grad()
    def upscale(
        self, image: Tensor, size: tuple[int, int], tile: int | None = None, chunk: int = DEFAULT_CHUNK
    ) -> Tensor:
        """(B, 3, h, w) image in [-1, 1] -> (B, 3, H, W) in [-1, 1].

        Official demo: input (x - 0.5) / 0.5, output (pred * 0.5 + 0.5).clamp(0, 1); in Tessera's
        [-1, 1] convention that is the identity in and clamp(-1, 1) out.
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, h, w), got shape {tuple(image.shape)}")
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"output size must be two positive integers, got {size}")
        if tile is not None and tile < 1:
            raise ValueError(f"tile must be a positive number of input pixels, got {tile}")
        return self.decode(image, (int(size[0]), int(size[1])), tile=tile, chunk=chunk).clamp(-1, 1)


def _blend(preds: list[Tensor], areas: list[Tensor], local_ensemble: bool) -> Tensor:
    """Area-weighted sum; each prediction takes the area of its diagonal opposite (official swap)."""
    total = torch.stack(areas).sum(dim=0)
    if local_ensemble:
        areas = areas[::-1]  # swaps 0 <-> 3 and 1 <-> 2
    out = 0
    for pred, area in zip(preds, areas):
        out = out + pred * (area / total).unsqueeze(-1)
    return out


def _bands(coords_out: Tensor, n_latent: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Split one axis into latent cores [a0, a1) and the output range [i0, i1) whose pixel
    centres lie in each core (coordinates increase, so each range is contiguous)."""
    owner = ((coords_out + 1) * n_latent / 2).floor().long().clamp_(0, n_latent - 1)
    bands = []
    for a0 in range(0, n_latent, tile):
        a1 = min(a0 + tile, n_latent)
        i0, i1 = torch.searchsorted(owner, torch.tensor([a0, a1], device=owner.device)).tolist()
        bands.append((a0, a1, i0, i1))
    return bands


# ---------------------------------------------------------------- official checkpoints


def config_from_official(args: dict[str, Any]) -> LIIFConfig:
    """LIIFConfig from the `model.args` of an official checkpoint (or training yaml)."""
    args = dict(args)
    encoder_spec, imnet_spec = args.pop("encoder_spec", None), args.pop("imnet_spec", None)
    if encoder_spec is None or imnet_spec is None:
        raise HubError("official LIIF args need both 'encoder_spec' and 'imnet_spec'")
    flags = {k: bool(args.pop(k)) for k in ("local_ensemble", "feat_unfold", "cell_decode") if k in args}
    if args:
        raise HubError(f"unknown official LIIF argument(s) {sorted(args)}")

    name, enc = encoder_spec["name"], dict(encoder_spec.get("args", {}))
    if not enc.pop("no_upsampling", False):
        raise HubError("LIIF encoders have no upsampling tail; encoder args need 'no_upsampling: true'")
    enc.pop("scale", None)  # only sizes the (absent) upsampling tail
    if name in ("edsr-baseline", "edsr"):
        allowed = {"n_resblocks", "n_feats", "res_scale", "rgb_range"}
    elif name == "rdn":
        allowed = {"G0", "RDNkSize", "RDNconfig"}
    else:
        raise HubError(f"unsupported official LIIF encoder {name!r}")
    if set(enc) - allowed:
        raise HubError(f"unknown {name} argument(s) {sorted(set(enc) - allowed)}")
    if name == "rdn":
        preset = enc.pop("RDNconfig", "B")
        if preset not in RDN_PRESETS:
            raise HubError(f"unknown RDNconfig {preset!r}")
        d, c, g = RDN_PRESETS[preset]
        kernel_size = enc.pop("RDNkSize", 3)
        enc = {**enc, "kernel_size": kernel_size, "num_blocks": d, "num_layers": c, "growth": g}

    if imnet_spec.get("name") != "mlp":
        raise HubError(f"unsupported official imnet {imnet_spec.get('name')!r}")
    mlp = dict(imnet_spec.get("args", {}))
    mlp.pop("in_dim", None)  # derived from the encoder; checked through the weight shapes
    if {"hidden_list", "out_dim"} - set(mlp) or set(mlp) - {"hidden_list", "out_dim"}:
        raise HubError(f"official mlp args must be exactly 'out_dim' and 'hidden_list', got {sorted(mlp)}")
    return LIIFConfig(encoder=name, encoder_args=enc, hidden_list=list(mlp["hidden_list"]), out_dim=mlp["out_dim"], **flags)


def from_official(checkpoint: dict | str | os.PathLike) -> LIIF:
    """Build a LIIF from an official release (`{'model': {'name', 'args', 'sd'}, ...}`) or its path.

    Official and Tessera parameter names coincide, so the mapping is the identity; every key is
    still checked both ways, with shapes, and anything unmapped raises (a HubError naming it).
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_official_state_dict(checkpoint)
    spec = checkpoint.get("model", checkpoint)
    if not isinstance(spec, dict) or spec.get("name") != "liif" or "sd" not in spec:
        raise HubError("not an official LIIF checkpoint: expected {'model': {'name': 'liif', 'args', 'sd'}}")
    model = LIIF(config_from_official(spec.get("args", {})))
    check_state_dict(model.state_dict(), spec["sd"], "official LIIF checkpoint")
    model.load_state_dict(spec["sd"], strict=True)
    return model.eval()
