"""apps.train_segmenter --model xdecoder and apps.segment on images, end to end in subprocesses."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import run_env
from vision.data.shapes import make_scene

TRAIN = ["--model", "xdecoder", "--data", "shapes", "--size", "32", "--scenes", "40", "--batch-size", "4",
         "--points", "64", "--warmup", "2", "--log-every", "1", "--quiet"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *map(str, args)], env=run_env(), capture_output=True, text=True)


def _refused(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """4 steps straight, and 2 steps + a resumed 2: the same weights (the toolkit's resume, bit for bit)."""
    root = tmp_path_factory.mktemp("xd")
    straight = _run("apps.train_segmenter", *TRAIN, "--out", root / "a", "--steps", "4", "--checkpoint-every", "2")
    assert straight.returncode == 0, straight.stderr
    first = _run("apps.train_segmenter", *TRAIN, "--out", root / "b", "--steps", "2", "--checkpoint-every", "2")
    assert first.returncode == 0, first.stderr
    resumed = _run("apps.train_segmenter", *TRAIN, "--out", root / "b", "--steps", "4", "--checkpoint-every", "2",
                   "--resume")
    assert resumed.returncode == 0, resumed.stderr
    image = root / "scene.png"
    Image.fromarray(make_scene(3, 32).image).save(image)
    return {"a": root / "a", "b": root / "b", "image": image}


def test_training_resumes_bit_for_bit(trained):
    a = load_file(trained["a"] / "model" / "model.safetensors")
    b = load_file(trained["b"] / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (trained["a"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_segment_semantic_referring_caption(trained, tmp_path):
    model, image = trained["a"] / "model", trained["image"]
    out = tmp_path / "overlay.png"
    proc = _run("apps.segment", "--model", model, image, "--classes", "red circle,blue square,ground", "-o", out,
                "--caption")
    assert proc.returncode == 0, proc.stderr
    labels = np.asarray(Image.open(tmp_path / "overlay_labels.png"))
    assert labels.shape == (32, 32) and set(np.unique(labels)) <= {1, 2, 3}
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    assert "caption: " in proc.stdout and "class" in proc.stdout
    ref = _run("apps.segment", "--model", model, image, "--task", "referring", "--prompt", "the red circle",
               "-o", tmp_path / "ref.png")
    assert ref.returncode == 0, ref.stderr
    assert set(np.unique(np.asarray(Image.open(tmp_path / "ref_labels.png")))) <= {0, 1}
    from apps.segment import main as segment

    # in process (faster): the model's own vocabulary and thing/stuff flags; instance; only a caption
    assert segment(["--model", str(model), str(image), "--task", "panoptic", "-o", str(tmp_path / "pan.png")]) == 0
    assert segment(["--model", str(model), str(image), "--task", "panoptic", "--classes", "red circle,ground",
                    "--stuff", "ground", "-o", str(tmp_path / "pan2.png")]) == 0
    assert segment(["--model", str(model), str(image), "--task", "instance", "--threshold", "0",
                    "-o", str(tmp_path / "inst.png")]) == 0
    inst = np.asarray(Image.open(tmp_path / "inst_labels.png"))
    assert inst.shape == (32, 32)
    assert segment(["--model", str(model), str(image), "--task", "none", "--caption"]) == 0
    long = ",".join(f"a rather long class name number {k}" for k in range(40))  # longer than a file name may be
    assert segment(["--model", str(model), str(image), "--classes", long, "-o", str(tmp_path / "long.png")]) == 0
    assert not (image.parent / "scene_overlay.png").exists()  # --task none writes no image
    again = _run("apps.segment", "--model", model, image, "--classes", "red circle", "-o", out)
    _refused(again, "exists")


def test_bad_arguments_exit_2_and_write_nothing(trained, tmp_path):
    from apps.segment import main as segment
    from vision.cli import UserError

    model, image = trained["a"] / "model", trained["image"]
    out = tmp_path / "o.png"
    _refused(_run("apps.segment", "--model", model, image, "--classes", " , ", "-o", out), "--classes")
    volume = tmp_path / "scan.nii.gz"
    volume.write_bytes(b"")
    _refused(_run("apps.segment", "--model", model, volume, "-o", out), "2-D images")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    cases = [([str(bad)], "not a readable image"), ([str(image), "--prompt", "the dog"], "--task referring"),
             ([str(image), "--task", "referring"], "--prompt"), ([str(image), "--classes", "a,a"], "twice"),
             ([str(image), "--classes", "a,b", "--stuff", "c"], "--stuff"),
             ([str(image), "--task", "panoptic", "--classes", "a,b", "--stuff", "c"], "not in the classes"),
             ([str(image), "--task", "none"], "--caption"), ([str(image), "--tta"], "volume segmenters"),
             ([str(image), "--labels", "a,b"], "volume segmenters"), ([str(image), "--threshold", "2"], "[0, 1]")]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            segment(["--model", str(model), *argv, "-o", str(out)])
    with pytest.raises(UserError, match="only for an open-vocabulary image model"):
        segment([str(volume), "--classes", "dog"])  # the default model segments volumes
    assert not out.exists() and not (tmp_path / "o_labels.png").exists()


def test_torchrun_two_processes_train(tmp_path):
    """DDP through the toolkit: two gloo processes train, rank 0 saves (each rank draws its own templates
    and points, as the official multi-GPU training does, so the weights are not those of one process)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "apps.train_segmenter", *TRAIN, "--steps", "2", "--out", str(tmp_path / "ddp")],
                          env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 2


def test_make_shapes_writes_a_scene_folder_without_a_run_folder(tmp_path):
    from apps.train_segmenter import main as train
    from vision.cli import UserError
    from vision.data.scene_folder import SceneFolder

    assert train(["--model", "xdecoder", "--make-shapes", str(tmp_path / "scenes"), "3", "--size", "32"]) == 0
    assert len(SceneFolder(tmp_path / "scenes", size=32)) == 3
    with pytest.raises(UserError, match="exists"):
        train(["--model", "xdecoder", "--make-shapes", str(tmp_path / "scenes"), "3"])
    with pytest.raises(UserError, match="--out is needed"):
        train(["--model", "xdecoder", "--data", str(tmp_path / "scenes")])
    with pytest.raises(UserError, match="--data"):
        train(["--model", "xdecoder", "--data", str(tmp_path), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("fail_at", ["save", "rename"])
def test_segment_writes_overlay_and_label_map_as_a_pair(tmp_path, monkeypatch, fail_at):
    """Both PNGs are written before either is renamed, and the overlay is renamed last: a failure while
    writing leaves the old pair, one between the two renames leaves a new label map beside the old overlay,
    never a new overlay beside an old label map."""
    import os

    from apps.segment import main as segment

    image, out = tmp_path / "scene.png", tmp_path / "o.png"
    Image.fromarray(make_scene(3, 32).image).save(image)
    labels = tmp_path / "o_labels.png"
    out.write_bytes(b"old overlay")
    labels.write_bytes(b"old labels")
    real_save, real_replace, calls = Image.Image.save, os.replace, []

    def save(self, fp, *args, **kwargs):
        calls.append("save")
        if fail_at == "save" and calls.count("save") == 2:
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    def replace(src, dst):
        if Path(dst) in (out, labels):
            calls.append(Path(dst).name)
            if fail_at == "rename" and len(calls) == 4:
                raise KeyboardInterrupt  # killed between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError if fail_at == "save" else KeyboardInterrupt):
        segment(["--model", "xdecoder-shapes", str(image), "--classes", "red circle,ground", "-o", str(out),
                 "--overwrite"])
    assert out.read_bytes() == b"old overlay"
    assert (labels.read_bytes() == b"old labels") == (fail_at == "save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "o_labels.png", "scene.png"]  # no temporaries
    monkeypatch.undo()
    assert segment(["--model", "xdecoder-shapes", str(image), "--classes", "red circle,ground", "-o", str(out),
                    "--overwrite"]) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3) and np.asarray(Image.open(labels)).shape == (32, 32)
