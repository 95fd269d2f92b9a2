"""LIIF: Local Implicit Image Function (Chen, Liu & Wang, CVPR 2021; github.com/yinboc/liif).

An encoder (EDSR-baseline or RDN, no upsampling) turns an image into a latent grid of the same
size (or the IND trunk of vision/decoders/ind.py a latent into a feature grid); an MLP `imnet`
maps [3x3-unfolded latent, relative coordinate, cell size] to RGB at any continuous coordinate, and four such predictions (the latent neighbours around the query) are
blended with bilinear-style area weights ("local ensemble").

Three query paths give the same numbers (to float rounding):

* `query_reference` is the official `query_rgb`, operation for operation.
* `query` is the fast exact path for any coordinates (the training path). The first MLP layer
  is linear, so on the unfolded feature it is a 3x3 convolution: W1 [unfold(f); rel; cell] =
  conv3x3(f, W1_f)[nearest] + W_r rel + W_c cell + b. The convolution runs once per image (or
  tile) instead of unfolding the 9C-wide feature and re-multiplying it for every query and
  every ensemble member.
* `query_grid` is the rendering path for a grid of output pixels. There the neighbour row, the
  relative row coordinate and so the row part of W_r rel depend on the output row only (and
  likewise for columns; the cell is constant), so they are computed once per row and column
  and broadcast; each pixel costs one gather-add, the MLP on all ensemble members at once (in
  cache-sized blocks, with in-place ReLUs), and the blend.

`decode` / `upscale` render any output size in tiles whose input crop carries enough margin for
the encoder's receptive field, so a tiled render equals the untiled one. Everything runs in
float32 unless a reduced-precision `dtype` (bfloat16 / float16) is given for the MLP, which holds
two thirds of the work; the encoder, coordinates, neighbour choice, blend weights and the
bicubic skip stay in float32 or higher. (On the sample photos a bfloat16 MLP moved 0.1-2.4% of
the 8-bit values by 1 grey level; a bfloat16 encoder too moved some by 2.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision.decoders.edsr import EDSR, EDSRConfig
from vision.decoders.ind import GLOBAL_RADIUS
from vision.decoders.rdn import RDN, RDN_PRESETS, RDNConfig
from vision.errors import ConfigError
from vision.hub import HubError, check_state_dict, load_official_state_dict, register_model, register_official

DEFAULT_CHUNK = 30000  # queries per MLP batch; official `eval_bsize`
GRID_CHUNK = 16384  # queries decoded at once when rendering (x4 ensemble members): amortises the Python per chunk
MLP_ROWS_PER_THREAD = 4096  # CPU: rows per thread taken through all MLP layers at once, so they stay in L2 cache
ENSEMBLE_EPS = 1e-6  # official `eps_shift`, keeps shifted queries off latent cell borders
EDSR_FULL = dict(n_resblocks=32, n_feats=256, res_scale=0.1)  # official `make_edsr` defaults


@dataclass
class LIIFConfig:
    encoder: str = "edsr-baseline"  # 'edsr-baseline' | 'edsr' | 'rdn' | 'ind' (a latent trunk, vision.decoders.ind)
    encoder_args: dict[str, Any] = field(default_factory=dict)  # EDSRConfig / RDNConfig / INDConfig fields
    hidden_list: list[int] = field(default_factory=lambda: [256] * 4)
    out_dim: int = 3
    local_ensemble: bool = True
    feat_unfold: bool = True
    cell_decode: bool = True
    # Not in LIIF: "bicubic" adds the bicubic upsampling of the input at each query, so the MLP
    # learns a residual (VDSR's global skip; LTE adds a bilinear one). Official checkpoints: "none".
    skip: str = "none"

    def __post_init__(self) -> None:
        if self.encoder not in ("edsr-baseline", "edsr", "rdn", "ind"):
            raise ConfigError(f"unknown LIIF encoder {self.encoder!r}; "
                              "expected 'edsr-baseline', 'edsr', 'rdn' or 'ind'")
        if any(int(w) < 1 for w in self.hidden_list) or self.out_dim < 1:
            raise ConfigError(f"hidden_list needs widths >= 1 and out_dim >= 1, got {self.hidden_list} and {self.out_dim}")
        if self.skip not in ("none", "bicubic"):
            raise ConfigError(f"unknown LIIF skip {self.skip!r}; expected 'none' or 'bicubic'")
        if self.skip == "bicubic" and self.out_dim != 3:
            raise ConfigError("skip='bicubic' adds the RGB input to the output, so out_dim must be 3")


def make_encoder(name: str, args: dict[str, Any]) -> nn.Module:
    if name == "edsr-baseline":
        return EDSR(EDSRConfig(**args))
    if name == "edsr":
        return EDSR(EDSRConfig(**{**EDSR_FULL, **args}))
    if name == "rdn":
        return RDN(RDNConfig(**args))
    if name == "ind":  # the implicit neural decoder's trunk (Kim & Kim 2024): its input is a latent, not an image
        from vision.decoders.ind import INDConfig, INDTrunk

        return INDTrunk(INDConfig(**args))
    raise ValueError(f"unknown LIIF encoder {name!r}; expected 'edsr-baseline', 'edsr', 'rdn' or 'ind'")


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


def nearest_index(t: Tensor, n: int) -> Tensor:
    """Index that `grid_sample(mode='nearest', align_corners=False)` picks for coordinates `t` along an
    axis of n cells.

    Asking grid_sample itself (on a 1-pixel-wide index ramp; the sampler treats each axis the
    same way) makes the choice, including its rounding at cell borders, identical to the
    official lookup on the full feature map.
    """
    flat = t.reshape(1, 1, -1, 1)
    grid = torch.cat([torch.zeros_like(flat), flat], dim=-1)  # grid is (x, y): sample along y
    ramp = torch.arange(n, device=t.device, dtype=t.dtype).view(1, 1, n, 1)
    return F.grid_sample(ramp, grid, mode="nearest", align_corners=False).view(t.shape).long()


def nearest_latent(coord: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Row/col index (B, Q) that the official nearest lookup picks for (B, Q, 2) coordinates."""
    return nearest_index(coord[..., 0], size[0]), nearest_index(coord[..., 1], size[1])


def axis_neighbour(t: Tensor, n: int, shift: int, eps: float) -> tuple[Tensor, Tensor]:
    """One axis of the official ensemble lookup for output coordinates `t` over n latents.

    Returns the latent index of the neighbour `shift` (-1, 0 or +1 half cells) and the query's
    coordinate relative to that latent's centre, in latent cells: the same float operations as
    `query_reference` applies to that coordinate component.
    """
    shifted = (t + (shift * (2 / n / 2) + eps)).clamp_(-1 + 1e-6, 1 - 1e-6)
    index = nearest_index(shifted, n)
    return index, (t - make_coord_1d(n, t.device)[index]) * n


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

    def skip_grid(self, x: Tensor, rows: Tensor, cols: Tensor, window: tuple[int, int, int, int]) -> Tensor:
        """`skip_rgb` at the grid rows x cols, as (B, len(rows), len(cols), C), computed separably.

        Bicubic sampling of a grid is a pass along x, then one along y, with 4 taps each (the
        order grid_sample itself uses) instead of 16 taps per pixel. `x` is the crop starting at
        (r0, c0) of the full (h, w) input = `window`; taps are placed in the full image's frame,
        so every tile computes exactly the same numbers.
        """
        r0, c0, h, w = window
        b, c, hc, wc = x.shape
        by_col = _cubic_pass(x.permute(3, 0, 1, 2).reshape(wc, b * c * hc), cols, w, c0)  # (cols, B*C*hc)
        by_row = by_col.view(-1, b, c, hc).permute(3, 0, 1, 2).reshape(hc, -1)  # (hc, cols*B*C)
        return _cubic_pass(by_row, rows, h, r0).view(len(rows), len(cols), b, c).permute(2, 0, 1, 3)

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

    def query_grid(
        self,
        z: Tensor,
        rows: Tensor,
        cols: Tensor,
        size: tuple[int, int],
        out_size: tuple[int, int],
        offset: tuple[int, int] = (0, 0),
        chunk: int = GRID_CHUNK,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Decode the output pixels rows x cols from projected latents `z` (B, hz, wz, D); inference only.

        `rows` and `cols` are 1-D pixel-centre coordinates in the full frame, `z` a window of the
        full (h, w) = `size` latent grid starting at `offset`, and cells are those of an
        `out_size` output. Returns (B, len(rows), len(cols), out_dim) in float32 (or z's dtype
        if wider), the values of `query_projected` on the flattened grid, about `chunk` queries
        (times the ensemble members) at a time. With a reduced `dtype`, the first layer's sums
        are rounded to it once and the hidden layers run in it; the output layer and the blend
        stay in float32.
        """
        cfg = self.config
        b, hz, wz, dim = z.shape
        first = self.imnet.layers[0]
        eps = ENSEMBLE_EPS if cfg.local_ensemble else 0
        row_nb = {vy: axis_neighbour(rows, size[0], vy, eps) for vy in {vy for vy, _ in self.shifts}}
        col_nb = {vx: axis_neighbour(cols, size[1], vx, eps) for vx in {vx for _, vx in self.shifts}}
        for neighbours, start, extent in ((row_nb, offset[0], hz), (col_nb, offset[1], wz)):
            for index, _ in neighbours.values():
                if index.min() < start or index.max() >= start + extent:
                    raise RuntimeError("LIIF query needs latents outside the given window (tile margin too small)")
        row_index = {vy: index - offset[0] for vy, (index, _) in row_nb.items()}
        col_index = {vx: index - offset[1] for vx, (index, _) in col_nb.items()}

        # first layer's position part: W_r rel = (W_ry rel_y: per row) + (W_rx rel_x + W_c cell + b: per column)
        exact = torch.promote_types(z.dtype, torch.float32)  # position terms, blend and output: float32 or better
        low = dtype or exact  # the hidden layers' precision
        z = z.to(exact)
        w_pos, bias = first.weight[:, -self.num_pos :].to(exact), first.bias.to(exact)
        if cfg.cell_decode:
            # make_cell's values, then scaled by the latent size as the per-pixel queries do
            cell = torch.ones(2, device=z.device, dtype=exact)
            cell[0] *= 2 / out_size[0]
            cell[1] *= 2 / out_size[1]
            cell[0] *= size[0]
            cell[1] *= size[1]
            bias = bias + w_pos[:, 2:] @ cell
        row_term = {vy: rel[:, None] * w_pos[:, 0] for vy, (_, rel) in row_nb.items()}
        col_term = {vx: rel[:, None] * w_pos[:, 1] + bias for vx, (_, rel) in col_nb.items()}
        linears = list(self.imnet.layers[2::2])
        params = [(lin.weight.t().to(low), lin.bias.to(low)) for lin in linears[:-1]]
        params += [(lin.weight.t().to(exact), lin.bias.to(exact)) for lin in linears[-1:]]  # the output layer

        # relative coordinates of every ensemble member, for the area weights: (members, rows) and (members, cols)
        rel_rows = torch.stack([row_nb[vy][1] for vy, _ in self.shifts])
        rel_cols = torch.stack([col_nb[vx][1] for _, vx in self.shifts])

        n_rows, n_cols, members = len(rows), len(cols), len(self.shifts)
        step_c = min(n_cols, max(1, chunk // b))
        step_r = min(n_rows, max(1, chunk // (b * step_c)))
        widest = max([dim] + [weight.shape[1] for weight, _ in params])
        capacity = members * b * step_r * step_c
        first_out = z.new_empty(capacity * dim, dtype=low)
        gathered = z.new_empty(capacity * dim) if low != exact else None  # first-layer sums before rounding
        block = MLP_ROWS_PER_THREAD * torch.get_num_threads() if z.device.type == "cpu" else capacity
        scratch = [z.new_empty(min(capacity, block) * widest, dtype=low) for _ in range(2)]
        mlp_out = z.new_empty(capacity, cfg.out_dim)
        out = torch.empty(b, n_rows, n_cols, cfg.out_dim, device=z.device, dtype=exact)
        # latent rows first and contiguous, so that selecting rows is a plain copy of whole rows
        z_by_row = z.permute(1, 0, 2, 3).reshape(hz, b * wz * dim)
        for r0 in range(0, n_rows, step_r):
            r1 = min(r0 + step_r, n_rows)
            # this band's latent rows plus the row term, as a table of (rows * B * wz) D-vectors
            z_rows = {vy: z_by_row.index_select(0, index[r0:r1]).view(r1 - r0, b * wz, dim)
                      .add_(row_term[vy][r0:r1, None]).view(-1, dim) for vy, index in row_index.items()}
            row_start = torch.arange((r1 - r0) * b, device=z.device)[:, None] * wz
            for c0 in range(0, n_cols, step_c):
                c1 = min(c0 + step_c, n_cols)
                q = b * (r1 - r0) * (c1 - c0)
                hidden = first_out[: members * q * dim].view(members, q, dim)
                for k, (vy, vx) in enumerate(self.shifts):
                    # dim-0 index_select on a 2-D table is a row copy, far faster than a gather on dim 2
                    picked = hidden[k] if gathered is None else gathered[: q * dim].view(q, dim)
                    torch.index_select(z_rows[vy], 0, (row_start + col_index[vx][c0:c1]).view(-1), out=picked)
                    torch.add(picked.view(-1, c1 - c0, dim), col_term[vx][c0:c1], out=hidden[k].view(-1, c1 - c0, dim))
                pred = _mlp_tail(hidden.view(-1, dim), params, scratch, mlp_out, block)
                pred = pred.view(members, r1 - r0, b, c1 - c0, -1)
                # official area weights, each member taking its diagonal opposite's area (see _blend)
                areas = (rel_rows[:, r0:r1, None] * rel_cols[:, None, c0:c1]).abs_().add_(1e-9)
                weights = (areas.flip(0) if cfg.local_ensemble else areas).div_(areas.sum(0))
                out[:, r0:r1, c0:c1] = (pred.to(exact) * weights[:, :, None, :, None]).sum(0).transpose(0, 1)
        return out

    # ------------------------------------------------------------ rendering

    def decode(
        self,
        x: Tensor,
        size: tuple[int, int],
        tile: int | None = None,
        chunk: int | None = None,
        dtype: torch.dtype | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Render the encoder input `x` (an image in [-1, 1] for EDSR/RDN) at `size` = (H, W).

        Returns (B, out_dim, H, W), unclamped. With `tile`, the latent grid is cut into
        tile x tile cores; each core's encoder input is cropped with a margin of the encoder's
        receptive radius + 3 (the 3x3 unfold, the +-1 ensemble neighbour, one of slack), and
        only output pixels whose coordinates fall in the core are queried, so the result
        equals the untiled one while memory is bounded by the tile size. `chunk` bounds the
        queries decoded at once, `dtype` (bfloat16 / float16) is the MLP's precision, and
        `progress(n)` is called with the number of output pixels done after each tile. Under
        autograd it takes the differentiable `query_projected` path. An encoder whose receptive field is
        global (the IND trunk: GroupNorm, attention) gets the whole input in every tile; it is encoded
        once and only the queries are tiled.
        """
        bsz, _, h, w = x.shape
        H, W = size
        tile = tile or max(h, w)
        differentiable = torch.is_grad_enabled()
        chunk = chunk or (DEFAULT_CHUNK if differentiable else GRID_CHUNK)
        margin = self.encoder.receptive_radius + 3
        full_feat = None  # an encoder whose receptive field is global sees the whole input in every tile: encode once
        ys_out, xs_out = make_coord_1d(H, x.device), make_coord_1d(W, x.device)
        out = x.new_empty(bsz, self.config.out_dim, H, W)
        for a0, a1, i0, i1 in _bands(ys_out, h, tile):
            for b0, b1, j0, j1 in _bands(xs_out, w, tile):
                if i0 == i1 or j0 == j1:
                    continue
                r0, r1, c0, c1 = max(a0 - margin, 0), min(a1 + margin, h), max(b0 - margin, 0), min(b1 + margin, w)
                # latents the queries can touch (core +-2), +1 so their 3x3 conv sees true neighbours
                fy0, fy1, fx0, fx1 = max(a0 - 3, 0), min(a1 + 3, h), max(b0 - 3, 0), min(b1 + 3, w)
                # channels-last: the convolutions run faster, and the projection comes out (B, h, w, D)
                whole = (r0, r1, c0, c1) == (0, h, 0, w)
                if whole and full_feat is not None:
                    feat = full_feat
                else:
                    feat = self.encode(x[:, :, r0:r1, c0:c1].contiguous(memory_format=torch.channels_last))
                    if whole:
                        full_feat = feat
                z = self.project(feat[:, :, fy0 - r0 : fy1 - r0, fx0 - c0 : fx1 - c0])
                # drop the rim whose conv saw the crop's zero padding instead of real latents
                top, left = int(fy0 > 0), int(fx0 > 0)
                z = z[:, top : z.shape[1] - int(fy1 < h), left : z.shape[2] - int(fx1 < w)]
                rows, cols = ys_out[i0:i1], xs_out[j0:j1]
                if differentiable:
                    coord = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
                    coord = coord.view(1, -1, 2).expand(bsz, -1, -1)
                    cell = make_cell(bsz, coord.shape[1], (H, W), x.device) if self.config.cell_decode else None
                    pred = self.query_projected(z, coord, cell, (h, w), (fy0 + top, fx0 + left), chunk)
                else:
                    pred = self.query_grid(z, rows, cols, (h, w), (H, W), (fy0 + top, fx0 + left), chunk, dtype)
                pred = pred.view(bsz, i1 - i0, j1 - j0, -1)
                if self.config.skip == "bicubic":
                    pred = pred + self.skip_grid(x[:, :, r0:r1, c0:c1], rows, cols, (r0, c0, h, w))
                out[:, :, i0:i1, j0:j1] = pred.permute(0, 3, 1, 2)
                if progress is not None:
                    progress((i1 - i0) * (j1 - j0))
        return out

    @torch.no_grad()
    def upscale(
        self,
        image: Tensor,
        size: tuple[int, int],
        tile: int | None = None,
        chunk: int | None = None,
        dtype: torch.dtype | None = None,
        progress: Callable[[int], None] | None = None,
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
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        out = self.decode(image, (int(size[0]), int(size[1])), tile=tile, chunk=chunk, dtype=dtype, progress=progress)
        return out.clamp_(-1, 1)

    def render_plan(
        self, free_bytes: int, in_size: tuple[int, int], out_size: tuple[int, int],
        dtype: torch.dtype = torch.float32, batch: int = 1,
    ) -> tuple[int, int]:
        """(tile, chunk) for `decode` that fit a render of `in_size` -> `out_size` in `free_bytes`
        (e.g. torch.cuda.mem_get_info()[0]); see `plan_tiles`."""
        (h, w), (H, W) = in_size, out_size
        mlp_widths = [self.imnet.layers[0].out_features] + [lin.out_features for lin in self.imnet.layers[2::2]]
        value = torch.finfo(dtype).bits // 8
        return plan_tiles(
            free_bytes - batch * (3 * h * w + 3 * H * W) * 4,  # input and output images stay on the device
            encoder_bytes=batch * (self.encoder.peak_channels * 4 + 2 * mlp_widths[0] * value),
            output_bytes=batch * OUTPUT_BYTES_PER_PIXEL * H * W / (h * w),
            # a global receptive field (IND trunk): the encoder crop is the whole input whatever the tile
            margin=self.encoder.receptive_radius + 3 if self.encoder.receptive_radius < GLOBAL_RADIUS else max(h, w),
            # per query and ensemble member: first-layer sums (float32, rounded to `dtype`) and the output
            query_bytes=len(self.shifts) * (mlp_widths[0] * (value + 4) + self.config.out_dim * 4),
            max_side=max(h, w),
        )


OUTPUT_BYTES_PER_PIXEL = 64  # a tile's buffers per output pixel: prediction, skip, their sum, temporaries (generous)


def plan_tiles(
    free_bytes: float, *, encoder_bytes: float, output_bytes: float, margin: int, query_bytes: float,
    max_side: int, fraction: float = 0.5, min_side: int = 16, max_chunk: int = 1 << 20,
) -> tuple[int, int]:
    """Largest tile side and MLP chunk whose memory stays within `fraction` of `free_bytes`.

    A tile's encoder crop is (tile + 2 margin)^2 input pixels at `encoder_bytes` each, and its
    tile^2 input pixels become `output_bytes` each of output-side buffers; a chunk costs
    `query_bytes` per query. A quarter of the budget goes to the chunk, the rest to the tile.
    The rest of `free_bytes` is headroom for the allocator and the convolution workspaces.
    """
    budget = max(fraction * free_bytes, 0)
    chunk = int(min(max_chunk, max(GRID_CHUNK, budget / 4 // query_bytes)))
    tile_budget = budget - chunk * query_bytes
    # largest side s with (s + 2 margin)^2 encoder_bytes + s^2 output_bytes <= tile_budget (bisection)
    lo, hi = min(min_side, max_side), max_side
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (mid + 2 * margin) ** 2 * encoder_bytes + mid**2 * output_bytes <= tile_budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, chunk


def _cubic_pass(table: Tensor, t: Tensor, n: int, start: int, a: float = -0.75) -> Tensor:
    """Bicubic interpolation along dim 0 of `table` (rows = input pixels start, start+1, ... of an axis
    of n) at coordinates t: (len(t), ...) rows. Tap positions and weights are those of
    `grid_sample(mode='bicubic', padding_mode='border', align_corners=False)`, worked out in
    float64: Keys' cubic convolution with a = -0.75, taps clamped to the axis."""
    u = ((t.to(torch.float32 if t.device.type == "mps" else torch.float64) + 1) * n - 1) / 2
    base = u.floor()
    frac = u - base
    near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # noqa: E731 - |distance| <= 1
    far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # noqa: E731 - 1 < |distance| < 2
    weights = torch.stack([far(frac + 1), near(frac), near(1 - frac), far(2 - frac)]).to(table.dtype)[..., None]
    index = (base.long() + torch.arange(-1, 3, device=t.device)[:, None]).clamp_(0, n - 1) - start
    out = table.index_select(0, index[0]).mul_(weights[0])
    for k in range(1, 4):
        out.addcmul_(table.index_select(0, index[k]), weights[k])
    return out


def _mlp_tail(
    hidden: Tensor, params: list[tuple[Tensor, Tensor]], scratch: list[Tensor], out: Tensor, block: int
) -> Tensor:
    """The MLP after its first Linear, on first-layer outputs `hidden` (N, D); returns out[:N].

    Rows go through all layers `block` at a time, so activations stay in cache between layers;
    ReLUs run in place and the hidden Linears write into the two `scratch` buffers in turn, so no
    activation is allocated. `params` are the (W^T, b) of the later Linears; the last writes
    into `out` (N_max, out_dim) in its own dtype.
    """
    if not params:  # a single-Linear MLP: the first layer is the output
        return hidden
    n = hidden.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        x = hidden[start:stop].relu_()
        for i, (weight_t, bias) in enumerate(params):
            width = weight_t.shape[1]
            if i == len(params) - 1:
                x, target = x.to(weight_t.dtype), out[start:stop]
            else:
                target = scratch[i % 2][: (stop - start) * width].view(stop - start, width)
            x = torch.addmm(bias, x, weight_t, out=target)
            if i < len(params) - 1:
                x.relu_()
    return out[:n]


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


def recognise_official(obj: Any) -> bool:
    """yinboc/liif's release layout: ``{'model': {'name': 'liif', 'args': ..., 'sd': ...}}``
    (edsr-baseline-liif.pth, rdn-liif.pth and the training script's epoch-*.pth)."""
    spec = obj.get("model", obj) if isinstance(obj, dict) else None
    return isinstance(spec, dict) and spec.get("name") == "liif" and isinstance(spec.get("sd"), dict)


register_official("liif", kind="decoder", recognise=recognise_official, load=lambda obj, path: from_official(obj))
