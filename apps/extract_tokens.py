"""python -m apps.extract_tokens — encode a dataset once into a token cache for generator training.

    python -m apps.extract_tokens --tokenizer vq-mnist --data mnist5k --out tokens/vq-mnist
    python -m apps.extract_tokens --tokenizer vq_ds16_c2i.pt --data /imagenet/train --image-size 256 --flip --out tokens/in256
    torchrun --nproc_per_node 8 -m apps.extract_tokens --tokenizer ... --data /imagenet/train --out tokens/in256

Each process encodes every W-th image and writes its own shards; index.json lists them all. The
cache is the same whatever the number of processes. `--flip` also stores the tokens of each image
flipped left-right, and training picks one of the two at random (LlamaGen's and MAR's augmentation).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vision.cli import ArgumentParser, UserError, add_common_args, progress, resolve_device, run
from vision.output_folder import FolderKind, check_folder_output, first_foreign, publish_folder, remove_staging, staging_for


def _not_a_cache(folder: Path) -> Path | None:
    """The first entry of `folder` that is not part of a token cache this program wrote (None: all are)."""
    from vision.data.token_cache import FORMAT, INDEX

    foreign = first_foreign(folder, r"index\.json|r\d+-\d{5,}\.safetensors")
    if foreign is not None:
        return foreign
    index = folder / INDEX
    if not index.exists():
        return min(folder.iterdir(), default=None)  # shards without an index (None: an empty folder)
    try:
        return None if json.loads(index.read_text()).get("format") == FORMAT else index
    except (OSError, ValueError, AttributeError):  # unreadable, or JSON that is no object
        return index


CACHE = FolderKind("a token cache (index.json and its shards)", _not_a_cache)


def parse(argv):
    p = ArgumentParser(prog="python -m apps.extract_tokens", description=__doc__.split("\n\n")[0].split(" — ")[1])
    p.add_argument("--tokenizer", required=True, help="shipped tokenizer name, a save_pretrained folder or a released file")
    p.add_argument("--data", required=True, help="ImageNet-layout (or flat) image folder, or 'mnist5k' (its training split)")
    p.add_argument("--out", required=True, help="the cache folder to create (--overwrite replaces only a token cache)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square crop side (default: the tokenizer's training size; MNIST digits are 32)")
    p.add_argument("--flip", action="store_true", help="also store the tokens of each image flipped left-right")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded together")
    p.add_argument("--shard-size", type=int, default=50_000, help="items per shard file")
    add_common_args(p, seed=False)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from vision.data.datasets import FolderImages, MNISTImages
    from vision.data.token_cache import write_index
    from vision.hub import resolve_model
    from vision.train.distributed import barrier, setup_distributed, teardown_distributed

    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = check_folder_output(args.out, args.overwrite, CACHE)
    info = setup_distributed(resolve_device(args.device))
    tokenizer = resolve_model(args.tokenizer, kind="tokenizer", device=info.device)
    size = args.image_size or getattr(getattr(tokenizer, "config", None), "image_size", None) or 32
    ds = tokenizer.spec.downsample
    if size < ds or size % ds:
        raise UserError(f"--image-size {size} must be a multiple of the tokenizer's downsampling {ds}")
    if args.data == "mnist5k":
        data = MNISTImages(size)
    elif Path(args.data).is_dir():
        data = FolderImages(args.data, size)
    else:
        raise UserError(f"--data {args.data}: no such folder (or 'mnist5k')")

    staging = staging_for(out)
    if info.is_main:
        remove_staging(out)
    barrier(info)
    staging.mkdir(exist_ok=True)
    try:
        shards, fields, spec = _encode(args, tokenizer, data, staging, info)
        all_shards = _gather(shards, info)
        if info.is_main:
            write_index(staging, tokenizer=str(args.tokenizer), spec=spec, fields=fields, shards=all_shards,
                        flip=args.flip, data=str(args.data), image_size=size, num_classes=len(data.classes),
                        classes=list(data.classes))
            publish_folder(staging, out, args.overwrite, CACHE)
            if not args.quiet:
                print(f"{sum(s['count'] for s in all_shards)} items ({', '.join(fields)}) -> {out}", file=sys.stderr)
        barrier(info)
    except BaseException:
        if info.is_main:
            remove_staging(out)
        raise
    teardown_distributed()
    return 0


@torch.no_grad()
def _encode(args, tokenizer, data, staging: Path, info):
    from vision.data.token_cache import token_fields, write_shard

    mine = list(range(info.rank, len(data), info.world_size))
    shards, buffer, spec, fields = [], {}, None, None
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]

    def flush(limit: int | None = None):
        """Write full shards of `limit` items (all that is buffered when None), keep the rest."""
        nonlocal buffer
        if not buffer:
            return
        tensors = {k: torch.cat(v) for k, v in buffer.items()}
        count = len(tensors["index"])
        step = limit or count
        start = 0
        while count - start >= step and count - start > 0:
            part = {k: v[start:start + step] for k, v in tensors.items()}
            shards.append(write_shard(staging, f"r{info.rank}-{len(shards):05d}", part, spec))
            start += step
        buffer = {k: [v[start:]] for k, v in tensors.items()} if start < count else {}

    for batch in progress(batches, quiet=args.quiet, desc="encode", unit="batch"):
        items = [data[i] for i in batch]
        images = torch.stack([im for im, _ in items]).to(info.device)
        tokens = tokenizer.encode(images)
        spec = tokens.spec if spec is None else spec
        found = {k: v.cpu() for k, v in token_fields(tokens).items()}
        if args.flip:
            found.update({k + "_flip": v.cpu() for k, v in token_fields(tokenizer.encode(images.flip(-1))).items()})
        fields = [k for k in found if not k.endswith("_flip")]
        found["labels"] = torch.tensor([lab for _, lab in items])
        found["index"] = torch.tensor(batch)
        for k, v in found.items():
            buffer.setdefault(k, []).append(v)
        if sum(len(v) for v in buffer["index"]) >= args.shard_size:
            flush(args.shard_size)
    flush()
    if spec is None:
        spec = tokenizer.spec
        fields = []
    return shards, fields, spec


def _gather(shards: list[dict], info) -> list[dict]:
    if not info.distributed:
        return shards
    import torch.distributed as dist

    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, shards)
    return [s for rank_shards in everyone for s in rank_shards]


if __name__ == "__main__":
    run(main)
