"""Checkpoints: save_pretrained / from_pretrained, shipped-weight names, official imports.

A Tessera model is a config dataclass plus an nn.Module registered by architecture name:

    @register_model("liif")
    class LIIF(nn.Module):
        config_class = LIIFConfig
        def __init__(self, config): ...

`save_pretrained(model, dir)` writes config.json ({"architecture", "config"}) and
model.safetensors. `from_pretrained(name_or_dir)` reads a directory, a single .safetensors
file with a config.json beside it, or a name listed in weights/index.json (whose sha256 is
verified before anything is loaded). Official checkpoints (.pth/.pt/.ckpt) are read with
`torch.load(weights_only=True)` only; each family maps the keys in its own module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import nn

from vision.atomic import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_DIR = Path(os.environ.get("TESSERA_WEIGHTS", Path(__file__).resolve().parent.parent / "weights"))

_REGISTRY: dict[str, type[nn.Module]] = {}


class HubError(ValueError):
    """A checkpoint that cannot be used as asked: unknown name, bad hash, bad keys, unsafe pickle."""


def register_model(name: str):
    """Class decorator: make an architecture loadable by name from config.json."""

    def wrap(cls):
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"{cls.__name__} needs a dataclass `config_class` to be registered")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        cls.architecture = name
        return cls

    return wrap


def registered_models() -> dict[str, type[nn.Module]]:
    _import_model_packages()
    return dict(_REGISTRY)


def _import_model_packages() -> None:
    """Registration happens on import; import every package that defines models (cheap, no weights)."""
    import importlib
    import pkgutil

    for pkg_name in ("vision.decoders", "vision.metrics", "tokenizers", "generators", "segmentation"):
        try:
            pkg = importlib.import_module(pkg_name)
        except ModuleNotFoundError:
            continue
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            importlib.import_module(info.name)


# ---------------------------------------------------------------- config (de)serialisation


def config_to_dict(config: Any) -> dict:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass exactly: tuples come back as tuples, nested configs as dataclasses."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise HubError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})


def _coerce(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError, HubError):
                continue
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a sequence")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if args:
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError("expected a sequence")
        return [_coerce(args[0], v) if args else v for v in value]
    if origin is dict:
        return {k: _coerce(args[1], v) if args else v for k, v in value.items()}
    if tp is float and isinstance(value, int):
        return float(value)
    return value


# ---------------------------------------------------------------- save / load


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors into `directory`, each atomically."""
    arch = getattr(type(model), "architecture", None)
    if arch is None:
        raise TypeError(f"{type(model).__name__} is not registered with @register_model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"architecture": arch}))
    payload = {"architecture": arch, "config": config_to_dict(model.config)}
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(payload, indent=2) + "\n"))
    return directory


def build_model(architecture: str, config: dict | Any) -> nn.Module:
    registry = registered_models() if architecture not in _REGISTRY else _REGISTRY
    if architecture not in registry:
        raise HubError(f"unknown architecture {architecture!r}; known: {', '.join(sorted(registry)) or 'none'}")
    cls = registry[architecture]
    cfg = config if dataclasses.is_dataclass(config) else config_from_dict(cls.config_class, config)
    return cls(cfg)


def from_pretrained(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model from a directory, a .safetensors file with config.json beside it, or a shipped name."""
    path = Path(name_or_path)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    elif path.suffix == ".safetensors" and path.is_file():
        config_path, weights_path = path.parent / CONFIG_NAME, path
    else:
        return _from_index(str(name_or_path), device)
    for p in (config_path, weights_path):
        if not p.is_file():
            raise HubError(f"{p} is missing; a saved model is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    payload = _read_json(config_path, "a saved model's config")
    if not isinstance(payload, dict) or not isinstance(payload.get("architecture"), str) \
            or not isinstance(payload.get("config"), dict):
        raise HubError(f"{config_path}: not a saved model's {CONFIG_NAME} (it needs \"architecture\" and \"config\")")
    return _instantiate(payload["architecture"], payload["config"], weights_path, device)


def _read_json(path: Path, what: str) -> Any:
    """A JSON file, or one HubError naming it: empty, or not valid JSON (truncated, damaged)."""
    text = path.read_bytes()
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = "is empty" if not text.strip() else f"is not valid JSON ({e}): truncated or damaged"
        raise HubError(f"{path} ({what}) {problem}") from None


def _instantiate(arch: str, config: dict, weights_path: Path, device) -> nn.Module:
    model = build_model(arch, config)
    try:
        state = load_file(str(weights_path))
    except SafetensorError as e:
        problem = "is empty" if weights_path.stat().st_size == 0 else f"is not a readable safetensors file ({e}): " \
                                                                     "truncated or damaged"
        raise HubError(f"{weights_path} {problem}") from None
    check_state_dict(model.state_dict(), state, str(weights_path))
    model.load_state_dict(state)
    return model.to(device).eval()


def read_index(weights_dir: Path | None = None) -> dict[str, dict]:
    index = (weights_dir or WEIGHTS_DIR) / "index.json"
    if not index.is_file():
        return {}
    entries = _read_json(index, "the index of shipped models")
    if not isinstance(entries, dict):
        raise HubError(f"{index}: not an index of shipped models (a JSON object of entries)")
    return entries


def _from_index(name: str, device, weights_dir: Path | None = None) -> nn.Module:
    weights_dir = weights_dir or WEIGHTS_DIR
    index = read_index(weights_dir)
    if name not in index:
        known = ", ".join(sorted(index)) or "none shipped"
        raise HubError(f"no model named {name!r} (not a folder or file either); shipped models: {known}")
    entry = index[name]
    file = weights_dir / entry["file"]
    if not file.is_file():
        raise HubError(f"{name}: weights file {file} is missing")
    digest = sha256_file(file)
    if digest != entry["sha256"]:
        raise HubError(f"{name}: sha256 of {file} is {digest[:12]}..., index.json says {entry['sha256'][:12]}...; refusing to load")
    return _instantiate(entry["architecture"], entry["config"], file, device)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_provenance(trainer, command: str, init: str | None = None) -> tuple[str, str]:
    """(trained_with, train_time) for an index entry: the run's commands and time (`Trainer.provenance`: every
    command that trained it, when it was resumed); a run fine-tuned from a shipped model (`init`) records the
    whole chain, the shipped model's command and time first."""
    trained_with, train_time = trainer.provenance(command)
    previous = read_index().get(init) if init else None
    if previous:
        return f"{previous['trained_with']} && {trained_with}", f"{previous['train_time']}, then {train_time}"
    return trained_with, train_time


def check_ship_name(name: str, *, replace: bool = False, weights_dir: Path | None = None) -> list[str]:
    """Refuse a NAME to ship under that is not a plain name, or that is already shipped unless `replace`
    (--replace-shipped). Returns the entries that name NAME as their tokenizer (they decode with it)."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise HubError(f"--ship {name!r}: NAME must be a plain name (not empty, no path separator, no leading dot)")
    weights_dir = weights_dir or WEIGHTS_DIR
    index = read_index(weights_dir)
    if name in index and not replace:
        raise HubError(f"--ship {name}: a model named {name!r} is already shipped ({weights_dir / 'index.json'}); "
                       "pass --replace-shipped to replace it, or choose another NAME")
    return sorted(n for n, e in index.items() if n != name and isinstance(e.get("config"), dict)
                  and e["config"].get("tokenizer") == name)


def register_shipped(name: str, model: nn.Module, *, kind: str, trained_with: str, data: str,
                     train_time: str, metrics: dict[str, float], weights_dir: Path | None = None,
                     replace: bool = False, **extra: Any) -> dict:
    """Write the weights and their index.json entry (file, sha256, config, provenance) under `name`; an
    existing `name` only with `replace` (see `check_ship_name`).

    Crash-safe: the weights go to a file no entry uses (weights/NAME.safetensors, or NAME-<sha256 prefix>
    .safetensors when that name is taken), then index.json is replaced atomically (the commit point), and only
    then is the replaced entry's file removed. A kill at any moment leaves every entry loadable."""
    weights_dir = weights_dir or WEIGHTS_DIR
    dependents = check_ship_name(name, replace=replace, weights_dir=weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"architecture": type(model).architecture})
    digest = hashlib.sha256(blob).hexdigest()
    index = read_index(weights_dir)
    file = _unused_file_name(name, digest, index)
    with atomic_path(weights_dir / file, fsync=True) as tmp:
        tmp.write_bytes(blob)
    entry = {
        "file": file,
        "sha256": digest,
        "kind": kind,
        "architecture": type(model).architecture,
        "config": config_to_dict(model.config),
        "trained_with": trained_with,
        "data": data,
        "train_time": train_time,
        "metrics": metrics,
        **extra,
    }
    old = index.get(name)
    index[name] = entry
    with atomic_path(weights_dir / "index.json", fsync=True) as tmp:
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if old is not None and old.get("file") not in {e.get("file") for e in index.values()}:
        (weights_dir / old["file"]).unlink(missing_ok=True)
    if old is not None and dependents:
        warnings.warn(f"replaced {name}, the tokenizer of {', '.join(dependents)}: they now decode with its new "
                      "weights")
    return entry


def _unused_file_name(name: str, digest: str, index: dict[str, dict]) -> str:
    """NAME.safetensors, or NAME-<sha256 prefix>.safetensors when an entry uses that (the one replaced): never
    the file of an entry with other weights, so index.json keeps matching its files until it is replaced."""
    used = {e.get("file"): e.get("sha256") for e in index.values()}
    for candidate in (f"{name}.safetensors", f"{name}-{digest[:8]}.safetensors", f"{name}-{digest}.safetensors"):
        if used.get(candidate, digest) == digest:  # free, or holding these very bytes already
            return candidate
    raise HubError(f"--ship {name}: every file name for it is taken in index.json")


# ---------------------------------------------------------------- official checkpoints


def check_state_dict(expected: dict, given: dict, source: str) -> None:
    """Refuse weights that do not cover a model exactly: one HubError naming `source` and the first
    unexpected key, mis-shaped key or missing key (with how many there are)."""
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        raise HubError(f"{source}: {len(unexpected)} unexpected keys, first {unexpected[0]!r} (no counterpart in the model)")
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise HubError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model needs {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in given]
    if missing:
        raise HubError(f"{source}: {len(missing)} missing keys, first {missing[0]!r}")


def released_checkpoint_globals() -> list:
    """The plain-data types released checkpoints are known to pickle beside their tensors, and nothing else:
    numpy scalars and dtypes (nnU-Net's `checkpoint_final.pth` logs them), under their numpy 1.x names
    (`numpy.core...`) and 2.x names (`numpy._core...`), and `argparse.Namespace` (MAR's and LlamaGen's
    training arguments). None of them runs code when unpickled."""
    import argparse

    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list = [argparse.Namespace, np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar"),
                     (scalar, "numpy._core.multiarray.scalar")]
    dtype_classes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype (Float64DType, ...)
    if dtype_classes is not None:
        allowed += [getattr(dtype_classes, n) for n in dir(dtype_classes) if n.endswith("DType")]
    return allowed


def load_official_state_dict(path: str | os.PathLike) -> Any:
    """Read an official .pth/.pt/.ckpt with torch.load(weights_only=True): tensors, containers and the plain
    data types of `released_checkpoint_globals` only.

    A file that needs anything else to unpickle (a class, a function: code that would run) is
    refused with HubError; nothing from it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise HubError(f"checkpoint {path} does not exist")
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1)
    if head != b"\x80" and not zipfile.is_zipfile(path):  # torch.save writes a zip archive (legacy: a pickle)
        raise HubError(f"{path}: not a readable PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(released_checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{path}: refusing to unpickle objects that are not tensors or plain containers ({first})") from None
    except Exception as e:  # garbage bytes also raise IndexError, KeyError, struct.error... from the unpickler
        raise HubError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


# ---------------------------------------------------------------- one resolution rule for every app


@dataclasses.dataclass(frozen=True)
class OfficialImporter:
    """How one family recognises its released checkpoint files and turns them into a Tessera model.

    recognise(obj) gets what `load_official_state_dict` returned for the file (e.g. ``{"model": state}``
    or a plain state dict) and must be specific enough not to claim another family's files;
    load(obj, path) returns the model with its weights copied and checked.
    """

    name: str
    kind: str  # generator | tokenizer | decoder | segmenter | classifier
    recognise: typing.Callable[[Any], bool]
    load: typing.Callable[[Any, Path], nn.Module]


_IMPORTERS: dict[str, OfficialImporter] = {}
OFFICIAL_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def register_official(name: str, *, kind: str, recognise, load) -> None:
    """Register a family's importer of released checkpoints (at import time of the family's module)."""
    _IMPORTERS[name] = OfficialImporter(name, kind, recognise, load)


def official_importers(kind: str | None = None) -> dict[str, OfficialImporter]:
    _import_model_packages()
    return {n: i for n, i in _IMPORTERS.items() if kind is None or i.kind == kind}


_FOLDER_IMPORTERS: dict[str, OfficialImporter] = {}


def register_official_folder(name: str, *, kind: str, recognise, load) -> None:
    """Register an importer of released result *folders* (e.g. nnU-Net's plans.json + fold_N/ layout).

    recognise(path) says whether a folder (one without Tessera's config.json) is of this family,
    looking only at file names; load(path, **options) returns the model, raising HubError with one
    line for a folder it recognised but cannot use (a missing file or fold). `resolve_model` passes
    its keyword options (e.g. ``folds``) to load.
    """
    _FOLDER_IMPORTERS[name] = OfficialImporter(name, kind, recognise, load)


def official_folder_importers(kind: str | None = None) -> dict[str, OfficialImporter]:
    _import_model_packages()
    return {n: i for n, i in _FOLDER_IMPORTERS.items() if kind is None or i.kind == kind}


def load_official_folder(path: str | os.PathLike, *, kind: str | None = None, **options: Any) -> nn.Module:
    """Load a released result folder through the first registered folder importer that recognises it."""
    path = Path(path)
    importers = official_folder_importers(kind)
    for importer in importers.values():
        try:
            ok = importer.recognise(path)
        except OSError:
            ok = False
        if ok:
            return importer.load(path, **options).eval()
    tried = ", ".join(sorted(importers)) or "none registered"
    raise HubError(f"{path}: not a save_pretrained folder (no {CONFIG_NAME}) and not a result folder of any family "
                   f"Tessera imports (tried: {tried})")


def load_official(path: str | os.PathLike, *, kind: str | None = None) -> nn.Module:
    """Load a released checkpoint file through the first registered importer that recognises it."""
    path = Path(path)
    importers = official_importers(kind)
    obj = load_official_state_dict(path)
    for importer in importers.values():
        try:
            ok = importer.recognise(obj)
        except Exception:  # a recogniser that trips over a foreign layout simply does not recognise it
            ok = False
        if ok:
            return importer.load(obj, path).eval()
    tried = ", ".join(sorted(importers)) or "none registered"
    what = f"{kind} " if kind else ""
    raise HubError(f"{path}: not a {what}checkpoint of any family Tessera imports (tried: {tried})")


def resolve_model(name_or_path: str | os.PathLike, *, kind: str | None = None,
                  device: str | torch.device = "cpu", **options: Any) -> nn.Module:
    """The one rule every app uses for --model/--tokenizer/--vae: a shipped name, a save_pretrained folder
    (or its .safetensors), a released checkpoint file recognised by a family importer, or a released
    result folder (no config.json) recognised by a folder importer. `options` (e.g. nnU-Net's ``folds``)
    go to a folder importer; given for anything else they are refused."""
    path = Path(name_or_path)
    folder = path.is_dir() and not (path / CONFIG_NAME).is_file()
    if options and not folder:
        raise HubError(f"{name_or_path}: {', '.join(sorted(options))} only apply to a released result folder "
                       "(such as an nnU-Net training output folder)")
    if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
        model = load_official(path, kind=kind)
    elif folder:
        model = load_official_folder(path, kind=kind, **options)
    elif path.is_dir() or (path.suffix == ".safetensors" and path.is_file()):
        model = from_pretrained(path)
    elif path.exists():
        raise HubError(f"{path}: expected a save_pretrained folder, a .safetensors file or a released checkpoint "
                       f"({', '.join(OFFICIAL_SUFFIXES)})")
    elif path.suffix in OFFICIAL_SUFFIXES + (".safetensors",) or os.sep in str(name_or_path):
        raise HubError(f"{path} does not exist")
    else:
        model = _from_index(str(name_or_path), device)
    if kind is not None:
        actual = model_kind(model)
        if actual is not None and actual != kind:
            raise HubError(f"{name_or_path} is a {actual}, not a {kind}")
    return model.to(device).eval()


def model_kind(model: nn.Module) -> str | None:
    """generator | tokenizer | ... from the class (None when it does not say)."""
    from vision.tokens import Tokenizer

    kind = getattr(type(model), "kind", None)
    if kind is None and isinstance(model, Tokenizer):
        kind = "tokenizer"
    return kind


# ---------------------------------------------------------------- helpers


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)
