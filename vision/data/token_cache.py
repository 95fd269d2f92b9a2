"""Token caches: a dataset encoded once by a tokenizer, read by every generator trainer.

A cache is a folder:

    index.json                 {"format": "tessera-token-cache", "version": 1, "tokenizer": ..., "spec": {...},
                                "fields": [...], "count": N, "flip": bool, "shards": [{"file", "count"}, ...]}
    r0-00000.safetensors ...   per-process shards: "index" (position in the source dataset), "labels",
                               and the token fields: "ids" | "latents" | "scale_ids.K" (+ "*_flip" twins)

Shards from any number of processes are put back in dataset order by "index", so a cache written by
torchrun equals one written by a single process. Ids are stored in the smallest integer type that
holds the vocabulary and come back as int64.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from vision.atomic import atomic_path
from vision.tokens import Tokens, TokenSpec

FORMAT = "tessera-token-cache"
VERSION = 1
INDEX = "index.json"


def token_fields(tokens: Tokens) -> dict[str, Tensor]:
    """The tensors of a Tokens batch under their cache names."""
    out: dict[str, Tensor] = {}
    if tokens.ids is not None:
        out["ids"] = tokens.ids
    if tokens.latents is not None and tokens.spec.kind == "continuous":
        out["latents"] = tokens.latents.float()
    for k, ids in enumerate(tokens.scale_ids or []):
        out[f"scale_ids.{k}"] = ids
    return out


def _compact(t: Tensor, vocab: int | None) -> Tensor:
    if t.dtype != torch.int64:
        return t.contiguous()
    dtype = torch.int16 if vocab is not None and vocab <= 2**15 else torch.int32
    return t.to(dtype).contiguous()


def write_shard(folder: Path, name: str, tensors: dict[str, Tensor], spec: TokenSpec) -> dict[str, Any]:
    data = {k: _compact(v.detach().cpu(), spec.vocab_size) if k not in ("index", "labels") else v.detach().cpu().long()
            for k, v in tensors.items()}
    path = Path(folder) / f"{name}.safetensors"
    with atomic_path(path) as tmp:
        save_file(data, str(tmp))
    return {"file": path.name, "count": int(data["index"].shape[0])}


def write_index(folder: Path, *, tokenizer: str, spec: TokenSpec, fields: list[str], shards: list[dict],
                flip: bool, **extra: Any) -> Path:
    meta = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "spec": dataclasses.asdict(spec),
            "fields": fields, "flip": flip, "count": sum(s["count"] for s in shards), "shards": shards, **extra}
    path = Path(folder) / INDEX
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_index(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a token cache (no {INDEX}); make one with python -m apps.extract_tokens")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a token cache index ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a Tessera token cache index")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: token cache version {meta.get('version')} (this Tessera reads {VERSION})")
    return meta


def spec_from_dict(d: dict) -> TokenSpec:
    return TokenSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


class TokenCache(Dataset):
    """The whole cache in memory, in dataset order. Items are dicts of tensors ("labels" a 0-d int64).

    With flipped twins in the cache, `sample(i, generator)` (what the training toolkit calls) picks the
    original or the flipped tokens with probability 1/2 from the sample's own generator.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_index(self.folder)
        self.spec = spec_from_dict(self.meta["spec"])
        self.tokenizer = self.meta["tokenizer"]
        parts: dict[str, list[Tensor]] = {}
        for shard in self.meta["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"token cache shard {path} is missing")
            try:
                tensors = load_file(str(path))
            except SafetensorError as e:  # truncated or overwritten
                raise ValueError(f"token cache shard {path} is unreadable ({str(e).splitlines()[0]}); "
                                 "make the cache again with python -m apps.extract_tokens") from None
            for k, v in tensors.items():
                parts.setdefault(k, []).append(v)
        data = {k: torch.cat(v) for k, v in parts.items()}
        order = torch.argsort(data["index"])
        self.data = {k: (v[order].long() if not torch.is_floating_point(v) else v[order]) for k, v in data.items()}
        if len(self.data["index"]) != self.meta["count"]:
            raise ValueError(f"{self.folder}: index.json says {self.meta['count']} items, shards hold {len(self.data['index'])}")
        self.fields = [f for f in self.meta["fields"]]

    def __len__(self) -> int:
        return len(self.data["index"])

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or int(self.data["labels"].max()) + 1)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self._item(i, flip=False)

    def sample(self, i: int, g: torch.Generator) -> dict[str, Tensor]:
        """With the sample's own generator: the flip choice, and "seed", from which a family's loss draws its
        per-sample randomness (class dropout, masks, noise: `generators.base.per_sample_rand`), so training
        does not depend on how a batch is split over processes."""
        flip = bool(self.meta["flip"]) and bool(torch.rand((), generator=g) < 0.5)
        item = self._item(i, flip)
        item["seed"] = torch.randint(0, 2**62, (), generator=g)
        return item

    def _item(self, i: int, flip: bool) -> dict[str, Tensor]:
        item = {f: self.data[f + "_flip" if flip else f][i] for f in self.fields}
        item["labels"] = self.data["labels"][i]
        return item
