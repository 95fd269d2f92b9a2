"""Folder outputs and --overwrite: apps.generate --out-dir, apps.extract_tokens --out and --make-shapes DIR replace
only a folder the same program wrote, refuse a file where the folder goes, and never delete the only copy of an
earlier output (vision/output_folder.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps import extract_tokens, generate
from vision.cli import UserError, run
from vision.output_folder import FolderKind, check_folder_output, first_foreign, publish_folder


def exit_code(main, *argv) -> int:
    with pytest.raises(SystemExit) as e:
        run(main, [str(a) for a in argv])
    return e.value.code


def refused(capsys, main, *argv) -> str:
    assert exit_code(main, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the shared helper ------------------------------------------------------------------------------------------

PNGS = FolderKind("a folder of NNNNN.png", lambda f: first_foreign(f, r"\d{5}\.png", {r"\d+": r"\d{5}\.png"}))


def test_first_foreign_names_the_first_entry_in_name_order(tmp_path):
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "00000.png").write_bytes(b"")
    assert first_foreign(tmp_path, r"\d{5}\.png", {r"\d+": r"\d{5}\.png"}) is None
    (tmp_path / "3" / "x.txt").write_text("")
    (tmp_path / "zz.txt").write_text("")
    assert first_foreign(tmp_path, r"\d{5}\.png", {r"\d+": r"\d{5}\.png"}) == tmp_path / "3" / "x.txt"
    (tmp_path / "00001.png").mkdir()  # a folder under a file's name
    assert first_foreign(tmp_path, r"\d{5}\.png", {r"\d+": r"\d{5}\.png"}) == tmp_path / "00001.png"


def test_check_refuses_files_links_and_a_lone_previous_copy(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(UserError, match="is not a folder"):
        check_folder_output(target, True, PNGS)
    target.unlink()
    target.symlink_to(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        check_folder_output(target, True, PNGS)
    target.unlink()
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "00000.png").write_text("the only copy")
    with pytest.raises(UserError, match=r"\.out\.old holds its previous contents"):
        check_folder_output(target, True, PNGS)
    assert (old / "00000.png").read_text() == "the only copy"
    with pytest.raises(UserError, match="name the output folder"):
        check_folder_output(".", True, PNGS)


def test_publish_puts_the_old_folder_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    out.mkdir()
    (out / "00000.png").write_text("old")
    staging.mkdir()
    (staging / "00000.png").write_text("new")
    real = Path.rename

    def failing(self, target):
        if self == staging:
            raise OSError("disk gone")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        publish_folder(staging, out, True, PNGS)
    assert (out / "00000.png").read_text() == "old" and not (tmp_path / ".out.old").exists()
    monkeypatch.setattr(Path, "rename", real)
    publish_folder(staging, out, True, PNGS)
    assert tree(tmp_path) == {"out/00000.png": b"new"}


# --- apps.generate (the shipped ar-mnist) ----------------------------------------------------------------------

def gen_args(out, *extra):
    return ("--model", "ar-mnist", "--labels", "0", "--per-label", 1, "--out-dir", out, "--quiet", *extra)


def test_generate_overwrite_keeps_unrelated_files_and_refuses_a_file(tmp_path, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    line = refused(capsys, generate.main, *gen_args(out, "--overwrite"))
    assert "notes.txt" in line and "--overwrite replaces only" in line
    assert tree(tmp_path) == {"samples/notes.txt": b"my notes"}
    # a label folder holding something else is not the program's either
    (out / "notes.txt").unlink()
    (out / "0").mkdir()
    (out / "0" / "cat.jpg").write_bytes(b"jpeg")
    assert str(out / "0" / "cat.jpg") in refused(capsys, generate.main, *gen_args(out, "--overwrite"))
    assert tree(tmp_path) == {"samples/0/cat.jpg": b"jpeg"}

    target = tmp_path / "file.txt"
    target.write_text("text")
    assert "is not a folder" in refused(capsys, generate.main, *gen_args(target, "--overwrite"))
    assert tree(tmp_path) == {"samples/0/cat.jpg": b"jpeg", "file.txt": b"text"}


def test_generate_replaces_its_own_folder_and_keeps_a_lone_previous_copy(tmp_path, capsys):
    out = tmp_path / "samples"
    assert exit_code(generate.main, *gen_args(out)) == 0
    first = tree(out)
    assert list(first) == ["0/00000.png"]
    assert exit_code(generate.main, *gen_args(out, "--overwrite", "--per-label", 2)) == 0
    assert list(tree(out)) == ["0/00000.png", "0/00001.png"] and sorted(p.name for p in tmp_path.iterdir()) == ["samples"]
    # interrupted between the two renames of a replacement: only .samples.old is left
    out.rename(tmp_path / ".samples.old")
    for extra in ((), ("--overwrite",)):
        line = refused(capsys, generate.main, *gen_args(out, *extra))
        assert ".samples.old holds its previous contents" in line
    assert list(tree(tmp_path)) == [".samples.old/0/00000.png", ".samples.old/0/00001.png"]


def test_generate_refuses_a_grid_inside_the_folder_it_replaces(tmp_path, capsys):
    out = tmp_path / "samples"
    assert exit_code(generate.main, *gen_args(out)) == 0
    first = tree(out)
    line = refused(capsys, generate.main, *gen_args(out, "--overwrite", "-o", out / "grid.png"))
    assert "inside --out-dir" in line and tree(out) == first  # the grid would have gone with the old folder


# --- apps.extract_tokens (the shipped vq-mnist on four PNGs) ---------------------------------------------------

@pytest.fixture
def digits(tmp_path) -> Path:
    folder = tmp_path / "digits"
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((32, 32), 60 * k + 100 * int(label), np.uint8)).save(folder / label / f"{k}.png")
    return folder


def tokens(out, data, *extra):
    return ("--tokenizer", "vq-mnist", "--data", data, "--out", out, "--quiet", *extra)


def test_extract_tokens_overwrite_replaces_only_a_token_cache(tmp_path, digits, capsys):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    line = refused(capsys, extract_tokens.main, *tokens(out, digits, "--overwrite"))
    assert "notes.txt" in line and "token cache" in line
    assert tree(out) == {"notes.txt": b"my notes"}
    # an index.json of something else is not a cache
    (out / "notes.txt").unlink()
    (out / "index.json").write_text(json.dumps({"format": "someone-else"}))
    assert "index.json" in refused(capsys, extract_tokens.main, *tokens(out, digits, "--overwrite"))
    assert tree(out) == {"index.json": b'{"format": "someone-else"}'}

    (out / "index.json").unlink()
    assert exit_code(extract_tokens.main, *tokens(out, digits, "--overwrite")) == 0  # an empty folder
    assert json.loads((out / "index.json").read_text())["count"] == 4
    assert exit_code(extract_tokens.main, *tokens(out, digits, "--overwrite", "--flip")) == 0  # its own cache
    assert json.loads((out / "index.json").read_text())["flip"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "digits"]


def test_extract_tokens_refuses_a_file_and_keeps_a_lone_previous_copy(tmp_path, digits, capsys):
    target = tmp_path / "file.txt"
    target.write_text("text")
    assert "is not a folder" in refused(capsys, extract_tokens.main, *tokens(target, digits, "--overwrite"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "file.txt"] and target.read_text() == "text"

    old = tmp_path / ".cache.old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"format": "tessera-token-cache"}))
    for extra in ((), ("--overwrite",)):
        line = refused(capsys, extract_tokens.main, *tokens(tmp_path / "cache", digits, *extra))
        assert ".cache.old holds its previous contents" in line
    assert tree(old) == {"index.json": b'{"format": "tessera-token-cache"}'}
    assert not (tmp_path / "cache").exists()


# --- --make-shapes DIR N ---------------------------------------------------------------------------------------

def make_shapes(folder, *extra) -> int:
    from apps.train_segmenter import main as train

    return train(["--model", "xdecoder", "--make-shapes", str(folder), "2", "--size", "16", *map(str, extra)])


def test_make_shapes_overwrite_replaces_only_a_scene_folder(tmp_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "notes.txt").write_text("my notes")
    with pytest.raises(UserError, match="notes.txt"):
        make_shapes(scenes, "--overwrite")
    (scenes / "notes.txt").unlink()
    (scenes / "images").mkdir()
    (scenes / "images" / "my_photo.png").write_bytes(b"png")
    with pytest.raises(UserError, match="my_photo.png"):
        make_shapes(scenes, "--overwrite")
    assert tree(tmp_path) == {"scenes/images/my_photo.png": b"png"}

    target = tmp_path / "file.txt"
    target.write_text("text")
    with pytest.raises(UserError, match="is not a folder"):
        make_shapes(target, "--overwrite")
    assert target.read_text() == "text" and not (tmp_path / ".file.txt.partial").exists()
    assert not (tmp_path / ".file.txt.old").exists()

    (scenes / "images" / "my_photo.png").unlink()
    assert make_shapes(scenes, "--overwrite") == 0
    assert make_shapes(scenes, "--overwrite", "--seed", 7) == 0  # its own folder
    assert sorted(p.name for p in (scenes / "images").iterdir()) == ["scene_000007.png", "scene_000008.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "scenes"]


def test_make_shapes_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, monkeypatch):
    scenes = tmp_path / "scenes"
    assert make_shapes(scenes) == 0
    before = tree(scenes)
    real = Path.rename

    def failing(self, target):
        if self.name == ".scenes.partial":
            raise OSError("disk gone")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        make_shapes(scenes, "--overwrite", "--seed", 7)
    assert tree(scenes) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]


def test_missing_folders_above_the_output_are_made_after_the_checks(tmp_path):
    target = tmp_path / "tokens" / "nested" / "cache"  # `--out tokens/NAME` on a fresh clone
    assert check_folder_output(target, False, PNGS) == target
    assert target.parent.is_dir() and not target.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        check_folder_output(blocker / "sub" / "cache", False, PNGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tokens"]  # the refusal made nothing
