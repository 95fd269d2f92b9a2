"""Sliding-window inference over CT/MRI volumes with slab-wise stitching on the CPU.

Window placement and blending follow MONAI (``monai.inferers.sliding_window_inference``) exactly:

- the volume is padded (constant ``padding_value``, split ``diff // 2`` before / the rest after)
  along any axis shorter than the window, and the output cropped back;
- scan interval per axis ``int(window * (1 - overlap))`` (at least 1; the whole axis when the
  window equals it), windows start at ``0, interval, 2 * interval, ...`` until one reaches the end,
  and that last window is shifted back to end exactly at the border;
- importance map: the separable Gaussian ``exp(-x^2 / (2 sigma^2))`` with ``x`` measured from the
  window centre and ``sigma = sigma_scale * window`` per axis (``sigma_scale = 0.125`` is also
  nnU-Net's ``patch / 8``), its minimum clamped to at least 1e-3; or ones for ``mode="constant"``;
- the result is ``sum_w(map * prediction_w) / sum_w(map)`` per voxel.

Memory. MONAI keeps a ``classes x volume`` float32 output and a count map alive for the whole run;
for 100+ classes on a whole-body CT that is tens of GB (MONAI issue #1189). Here windows are
processed in order of their start along the last axis, and weighted predictions are accumulated
only in a slab ``classes x X x Y x window_z`` covering the windows that can still touch it. When
the next window starts at ``z``, everything before ``z`` is final: it is normalised, reduced to
labels (argmax, the default) or written to the output, and the slab slides on. With
``output="labels"`` peak memory is the label map + the slab + one batch of windows, independent
of the volume's length; ``"probabilities"``/``"logits"`` add the preallocated ``classes x
volume`` float32 output.

2-D models (``spatial_dims=2``) run on a 3-D ``(C, X, Y, Z)`` volume slice by slice through the
same code: a ``(wx, wy, 1)`` window over the volume, the model called on the squeezed
``(B, C, wx, wy)`` batch, so one batch mixes windows from consecutive slices. The result equals
MONAI's 2-D sliding window applied to every slice.

Mirroring test-time augmentation (nnU-Net): each window batch is predicted 2^d times, flipped
along every subset of the spatial axes (8 passes in 3-D, 4 for a 2-D model), the predictions
flipped back and their logits averaged. ``mirror_axes`` restricts the flips to some axes (an nnU-Net
checkpoint's ``inference_allowed_mirroring_axes``).

nnU-Net's own placement and weights (``placement="nnunet"``, ``mode="gaussian_nnunet"``;
nnunetv2/inference/sliding_window_prediction.py): per axis ``n = ceil((size - window) / (window * (1 -
overlap))) + 1`` windows, start ``i`` at ``round(i * (size - window) / (n - 1))`` (numpy's
half-to-even rounding); the weight map is a unit impulse at voxel ``window // 2`` blurred by
``scipy.ndimage.gaussian_filter`` (sigma ``window / 8``, truncated at 4 sigma, zero outside), scaled
to a maximum of 10, its zeros replaced by its smallest positive value. Padding is the same.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sliding_window_inference", "scan_intervals", "window_starts", "nnunet_window_starts", "importance_map"]

Output = Literal["labels", "probabilities", "logits"]


def _per_axis(value, n: int, name: str) -> tuple:
    if isinstance(value, (int, float)) or value is None:
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} {value} needs {n} entries, one per spatial axis")
    return value


def scan_intervals(image_size: Sequence[int], window: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """Distance between neighbouring window starts per axis (MONAI ``_get_scan_interval``)."""
    out = []
    for size, win, ov in zip(image_size, window, overlap):
        if win == size:
            out.append(int(win))
        else:
            out.append(max(int(win * (1 - ov)), 1))
    return tuple(out)


def window_starts(image_size: Sequence[int], window: Sequence[int], interval: Sequence[int]) -> list[list[int]]:
    """Start index of the windows along each axis (MONAI ``dense_patch_slices``): last one flush with the end."""
    starts = []
    for size, win, step in zip(image_size, window, interval):
        win = min(win, size)
        count = next((d + 1 for d in range(math.ceil(size / step)) if d * step + win >= size), 1)
        starts.append([min(i * step, size - win) for i in range(count)])
    return starts


def nnunet_window_starts(image_size: Sequence[int], window: Sequence[int], step_size: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``: evenly spread starts, the last flush with the end.

    ``step_size`` is nnU-Net's ``tile_step_size`` (1 - overlap); every axis must be at least the window.
    """
    import numpy as np

    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    starts = []
    for size, win in zip(image_size, window):
        if size < win:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the window {tuple(window)}")
        n = int(np.ceil((size - win) / (win * step_size))) + 1
        actual = (size - win) / (n - 1) if n > 1 else 0.0
        starts.append([int(np.round(actual * i)) for i in range(n)])
    return starts


def _nnunet_gaussian(window: Sequence[int], sigma_scale: float = 0.125) -> Tensor:
    import numpy as np
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(tuple(window))
    impulse[tuple(w // 2 for w in window)] = 1
    g = gaussian_filter(impulse, [w * sigma_scale for w in window], 0, mode="constant", cval=0)
    g = torch.from_numpy(g / (g.max() / 10)).float()
    g[g == 0] = g[g > 0].min()
    return g


def importance_map(window: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125
                   ) -> Tensor:
    """Blending weights of one window (MONAI ``compute_importance_map``; ``"gaussian_nnunet"``: nnU-Net's), float32."""
    if mode == "gaussian_nnunet":
        scales = set(_per_axis(sigma_scale, len(window), "sigma_scale"))
        if len(scales) != 1:
            raise ValueError("nnU-Net's Gaussian takes one sigma_scale for every axis")
        return _nnunet_gaussian(window, float(scales.pop()))
    if mode == "constant":
        weights = torch.ones(tuple(window), dtype=torch.float32)
    elif mode == "gaussian":
        scales = _per_axis(sigma_scale, len(window), "sigma_scale")
        weights = None
        for i, (n, s) in enumerate(zip(window, scales)):
            x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0
            g = torch.exp(x**2 / (-2 * (n * s) ** 2))
            weights = g if i == 0 else weights.unsqueeze(-1) * g
    else:
        raise ValueError(f"mode must be 'gaussian', 'gaussian_nnunet' or 'constant', got {mode!r}")
    return weights.clamp(min=max(weights.min().item(), 1e-3))


class _SlabStitcher:
    """Accumulates weighted window predictions in a slab that slides along the last spatial axis.

    The slab holds ``L = window_last`` positions as a ring buffer (absolute position ``z`` lives at
    ``z % L``), so sliding on costs nothing: positions are normalised, written out and zeroed
    when they are finalised, and then reused.
    """

    _CHUNK_VOXELS = 1 << 22  # voxels per class finalised at a time (bounds the temporaries)

    def __init__(self, padded_size: tuple[int, ...], window_last: int, pad_lo: tuple[int, ...],
                 size: tuple[int, ...], output: Output):
        self.padded_size, self.length = padded_size, window_last
        self.pad_lo, self.size, self.output = pad_lo, size, output
        self.acc: Tensor | None = None
        self.wsum = torch.zeros(*padded_size[:-1], window_last)
        self.z0 = 0  # first position not yet finalised
        self.result: Tensor | None = None
        self.slab_shape: tuple[int, ...] | None = None  # for inspection (tests, memory notes)

    def _allocate(self, classes: int) -> None:
        self.acc = torch.zeros(classes, *self.padded_size[:-1], self.length)
        self.slab_shape = tuple(self.acc.shape)
        if self.output == "labels":
            dtype = torch.uint8 if classes <= 256 else torch.int16 if classes <= 2**15 else torch.int64
            self.result = torch.zeros(self.size, dtype=dtype)
        else:
            self.result = torch.zeros(classes, *self.size)

    def _segments(self, a: int, b: int):
        """Split absolute positions [a, b) (at most L of them) into runs contiguous in the ring."""
        z = a
        while z < b:
            r = z % self.length
            n = min(b - z, self.length - r)
            yield z, r, n
            z += n

    def add(self, pred: Tensor, start: Sequence[int], weight: Tensor) -> None:
        if self.acc is None:
            self._allocate(pred.shape[0])
        z_start, depth = start[-1], weight.shape[-1]
        self.advance(z_start)
        inner = tuple(slice(s, s + w) for s, w in zip(start[:-1], weight.shape[:-1]))
        for z, r, n in self._segments(z_start, z_start + depth):
            src = slice(z - z_start, z - z_start + n)
            self.acc[(slice(None), *inner, slice(r, r + n))].addcmul_(pred[..., src], weight[..., src])
            self.wsum[(*inner, slice(r, r + n))] += weight[..., src]

    def advance(self, z: int) -> None:
        """Finalise every position before ``z`` (no later window reaches back there)."""
        if z > self.z0:
            self._finalise(self.z0, min(z, self.z0 + self.length))
            self.z0 = z

    def finish(self) -> Tensor:
        self._finalise(self.z0, self.padded_size[-1])
        return self.result

    def _finalise(self, a: int, b: int) -> None:
        inner = tuple(slice(p, p + s) for p, s in zip(self.pad_lo[:-1], self.size[:-1]))
        first, last = self.pad_lo[-1], self.pad_lo[-1] + self.size[-1]  # the real volume, unpadded
        plane = math.prod(self.size[:-1])
        chunk = max(1, self._CHUNK_VOXELS // max(plane, 1))
        for z, r, n in self._segments(a, b):
            for c in range(0, n, chunk):
                za, zb = max(z + c, first), min(z + min(c + chunk, n), last)
                if za < zb:
                    ring = slice(r + za - z, r + zb - z)
                    out = slice(za - first, zb - first)
                    acc = self.acc[(slice(None), *inner, ring)]
                    if self.output == "labels":
                        # the normalisation divides every class by the same positive weight sum:
                        # it cannot change the argmax, so it is skipped
                        self.result[..., out] = _argmax_classes(acc, self.result.dtype)
                    else:
                        values = acc / self.wsum[(*inner, ring)]
                        self.result[..., out] = values.softmax(dim=0) if self.output == "probabilities" else values
            self.acc[..., r: r + n] = 0
            self.wsum[..., r: r + n] = 0


def _argmax_classes(scores: Tensor, dtype: torch.dtype) -> Tensor:
    """``scores.argmax(0)`` (first maximum wins) as a running maximum over the class axis.

    Elementwise passes over one class at a time vectorise well; ``Tensor.argmax`` over the outer
    axis of a (classes, X, Y, z) slab is several times slower on CPU.
    """
    best = scores[0].clone()
    index = torch.zeros(best.shape, dtype=dtype)
    for k in range(1, scores.shape[0]):
        better = scores[k] > best
        index.masked_fill_(better, k)
        torch.maximum(best, scores[k], out=best)
    return index


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in itertools.chain(model.parameters(), model.buffers()):
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def sliding_window_inference(
    volume: Tensor,
    model: Callable[[Tensor], Tensor],
    window: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.25,
    step: int | Sequence[int] | None = None,
    mode: Literal["gaussian", "gaussian_nnunet", "constant"] = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    sw_batch_size: int = 4,
    output: Output = "labels",
    spatial_dims: int | None = None,
    tta_mirror: bool = False,
    device: str | torch.device | None = None,
    padding_value: float = 0.0,
    progress: bool = False,
    placement: Literal["monai", "nnunet"] = "monai",
    mirror_axes: Sequence[int] | None = None,
) -> Tensor:
    """Predict a whole volume with a model trained on windows (see the module docstring).

    Args:
        volume: ``(C, *spatial)`` tensor (any device; windows are copied to ``device`` batch by batch).
        model: maps ``(B, C, *window)`` to ``(B, K, *window)`` logits (a tuple/list: its first item,
            e.g. the full-resolution deep-supervision output). Put it in eval mode yourself.
        window: window size per spatial axis (one int for all); ``None``/``<= 0`` means the whole axis.
        overlap: fraction of the window shared by neighbours (MONAI's default 0.25; nnU-Net uses 0.5).
        step: explicit distance between window starts in voxels, overriding ``overlap``.
        mode: ``"gaussian"`` (weights fall off towards window borders), ``"gaussian_nnunet"`` (nnU-Net's
            map, see the module docstring) or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window size.
        sw_batch_size: windows per model call.
        output: ``"labels"`` (argmax over classes, uint8 for up to 256 classes, shape ``spatial``),
            ``"probabilities"`` (softmax of the blended logits) or ``"logits"`` (the blended model
            output, what MONAI returns), both ``(K, *spatial)`` float32.
        spatial_dims: 2 to apply a 2-D model to a 3-D volume slice by slice along the last axis.
        tta_mirror: average predictions over flips of all spatial axes (nnU-Net's mirroring).
        device: where the model runs (default: the model's parameters' device). Stitching is on CPU.
        padding_value: fill value where the volume is padded up to the window size.
        progress: show a tqdm bar on stderr.
        placement: ``"monai"`` window starts, or nnU-Net's (``step_size = 1 - overlap``; ``step`` unused).
        mirror_axes: the spatial axes (0-based) that ``tta_mirror`` flips; default all of them.
    """
    volume = torch.as_tensor(volume)
    if volume.ndim < 2:
        raise ValueError(f"volume must be (C, *spatial), got shape {tuple(volume.shape)}")
    n_vol = volume.ndim - 1
    spatial_dims = n_vol if spatial_dims is None else spatial_dims
    per_slice = spatial_dims == 2 and n_vol == 3
    if spatial_dims != n_vol and not per_slice:
        raise ValueError(f"a {spatial_dims}-D model cannot run on a volume with {n_vol} spatial axes")
    if output not in ("labels", "probabilities", "logits"):
        raise ValueError(f"output must be 'labels', 'probabilities' or 'logits', got {output!r}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    size = tuple(int(s) for s in volume.shape[1:])

    win = tuple(size[i] if (w is None or w <= 0) else int(w)
                for i, w in enumerate(_per_axis(window, spatial_dims, "window")))
    ovl = _per_axis(overlap, spatial_dims, "overlap")
    if any(not 0 <= o < 1 for o in ovl):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    steps = None if step is None else tuple(int(s) for s in _per_axis(step, spatial_dims, "step"))
    scales = _per_axis(sigma_scale, spatial_dims, "sigma_scale")
    if per_slice:  # a (wx, wy, 1) window walking over every slice
        win, ovl, scales = (*win, 1), (*ovl, 0.0), (*scales, 1.0)
        steps = None if steps is None else (*steps, 1)
    if placement not in ("monai", "nnunet"):
        raise ValueError(f"placement must be 'monai' or 'nnunet', got {placement!r}")
    if steps is not None and any(s < 1 or s > w for s, w in zip(steps, win)):
        raise ValueError(f"step {step} must be between 1 and the window size {win}, or windows leave gaps")

    # Pad axes shorter than the window, as MONAI does (half before, the rest after).
    diffs = [max(w - s, 0) for w, s in zip(win, size)]
    pad_lo = tuple(d // 2 for d in diffs)
    if any(diffs):
        pad = []
        for d in reversed(diffs):
            pad += [d // 2, d - d // 2]
        volume = F.pad(volume[None], pad, mode="constant", value=padding_value)[0]
    padded = tuple(int(s) for s in volume.shape[1:])

    if placement == "nnunet":
        per_axis = nnunet_window_starts(padded[:spatial_dims], win[:spatial_dims], 1 - ovl[0])
        if per_slice:
            per_axis.append(list(range(padded[-1])))
    else:
        intervals = scan_intervals(padded, win, ovl)
        if steps is not None:
            intervals = tuple(w if w == p else s for w, p, s in zip(win, padded, steps))
        per_axis = window_starts(padded, win, intervals)
    starts = list(itertools.product(*per_axis))
    starts.sort(key=lambda s: s[-1])  # stable: MONAI's order within each slab
    weight = importance_map(win[:spatial_dims], mode, scales[:spatial_dims])
    if per_slice:
        weight = weight.unsqueeze(-1)

    device = torch.device(device) if device is not None else _model_device(model)

    def predictor(x: Tensor) -> Tensor:
        out = model(x[..., 0]) if per_slice else model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.unsqueeze(-1) if per_slice else out

    if mirror_axes is None:
        mirror_axes = range(spatial_dims)
    if any(not 0 <= int(a) < spatial_dims for a in mirror_axes):
        raise ValueError(f"mirror_axes {tuple(mirror_axes)} must be spatial axes 0..{spatial_dims - 1}")
    mirror_axes = tuple(2 + int(a) for a in mirror_axes)
    flips = [axes for r in range(1, len(mirror_axes) + 1) for axes in itertools.combinations(mirror_axes, r)]

    def predict(x: Tensor) -> Tensor:
        out = predictor(x).float()
        if tta_mirror:
            for axes in flips:
                out += predictor(torch.flip(x, axes)).float().flip(axes)
            out /= len(flips) + 1
        return out

    stitcher = _SlabStitcher(padded, win[-1], pad_lo, size, output)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(starts), desc="sliding window", unit="win", leave=False)
    for i in range(0, len(starts), sw_batch_size):
        batch_starts = starts[i: i + sw_batch_size]
        batch = torch.stack([volume[(slice(None), *(slice(s, s + w) for s, w in zip(st, win)))]
                             for st in batch_starts])
        if not batch.is_floating_point():
            batch = batch.float()
        pred = predict(batch.to(device))
        if pred.ndim != batch.ndim or tuple(pred.shape[2:]) != win or pred.shape[0] != batch.shape[0]:
            raise ValueError(f"model returned shape {tuple(pred.shape)} for windows {tuple(batch.shape)}; "
                             "it must keep the spatial size: (B, classes, *window)")
        pred = pred.cpu()
        for p, st in zip(pred, batch_starts):
            stitcher.add(p, st, weight)
        if bar is not None:
            bar.update(len(batch_starts))
    if bar is not None:
        bar.close()
    return stitcher.finish()
