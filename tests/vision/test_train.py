"""Training toolkit: exact resume after SIGKILL, torn checkpoint writes, 2-process DDP == 1 process, NaN stop."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_env
from vision.train.checkpoint import load_checkpoint

SCRIPT = str(Path(__file__).resolve().parent.parent / "helpers" / "tiny_train.py")


def train(out, *args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], env=run_env(),
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def final(out):
    return torch.load(Path(out) / "final.pt", weights_only=True)


def assert_same_weights(a, b, atol=0.0):
    for part in ("model", "ema"):
        for k in a[part]:
            if atol == 0.0:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                assert torch.allclose(a[part][k], b[part][k], atol=atol, rtol=0), f"{part}.{k} differs"


@pytest.mark.xdist_group("train")
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    train(tmp_path / "full", "--noise", "--steps", "12", "--every", "3")
    killed = train(tmp_path / "cut", "--noise", "--steps", "12", "--every", "3", "--kill-at-step", "7", check=False)
    assert killed.returncode == -9
    at_kill = load_checkpoint(tmp_path / "cut/checkpoints/latest.pt")
    assert at_kill["step"] == 6 and at_kill["train_seconds"] > 0
    train(tmp_path / "cut", "--noise", "--steps", "12", "--every", "3", "--resume")
    # the training time carries over the resume (what a shipped model's provenance reports)
    times = {json.loads(l)["step"]: json.loads(l)["time_s"] for l in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()}
    assert times[7] >= round(at_kill["train_seconds"], 3)  # the old code restarted the clock: ~ one step's time
    assert load_checkpoint(tmp_path / "cut/checkpoints/latest.pt")["train_seconds"] >= times[12] - 0.0005  # time_s: 3 decimals
    assert_same_weights(final(tmp_path / "full"), final(tmp_path / "cut"))
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), "metrics lines after the checkpoint must be dropped on resume"
    full_lines = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    cut_lines = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in ls]  # noqa: E731
    assert strip(full_lines) == strip(cut_lines)
    assert (tmp_path / "cut/curves.png").stat().st_size > 1000


@pytest.mark.xdist_group("train")
def test_kill_during_checkpoint_write_keeps_latest_readable(tmp_path):
    # checkpoint every 2 steps: the 3rd write (step 6) is torn by SIGKILL halfway.
    proc = train(tmp_path / "run", "--steps", "12", "--every", "2", "--kill-in-save", "3", check=False)
    assert proc.returncode == -9
    state = load_checkpoint(tmp_path / "run/checkpoints/latest.pt")
    assert state["step"] == 4
    train(tmp_path / "run", "--steps", "12", "--every", "2", "--resume")
    train(tmp_path / "ref", "--steps", "12", "--every", "2")
    assert_same_weights(final(tmp_path / "ref"), final(tmp_path / "run"))


@pytest.mark.xdist_group("train")
def test_two_process_gloo_equals_one_process(tmp_path):
    train(tmp_path / "one", "--steps", "8", "--batch", "8", "--every", "4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
           "--out", str(tmp_path / "two"), "--steps", "8", "--batch", "8", "--every", "4"]
    proc = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(final(tmp_path / "one"), final(tmp_path / "two"), atol=1e-6)
    # accumulation is the same computation again
    train(tmp_path / "acc", "--steps", "8", "--batch", "8", "--accum", "4", "--every", "4")
    assert_same_weights(final(tmp_path / "one"), final(tmp_path / "acc"), atol=1e-6)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    proc = train(tmp_path / "run", "--steps", "12", "--every", "2", "--nan-at-step", "5", check=False)
    assert proc.returncode != 0
    assert "non-finite at step 6" in proc.stderr
    assert load_checkpoint(tmp_path / "run/checkpoints/latest.pt")["step"] == 4


def test_sampler_shards_cover_the_same_global_batches():
    from vision.train.sampler import ResumableSampler

    one = [i for i, _ in ResumableSampler(50, 8, seed=3)]
    two = [[i for i, _ in ResumableSampler(50, 8, rank=r, world_size=2, seed=3)] for r in range(2)]
    assert len(one) == 48 and sorted(one) == sorted(two[0] + two[1])
    for k in range(6):
        assert set(one[8 * k: 8 * k + 8]) == set(two[0][4 * k: 4 * k + 4] + two[1][4 * k: 4 * k + 4])
    s = ResumableSampler(50, 8, seed=3)
    s.set_position(0, 2)
    assert [i for i, _ in s] == one[16:]


def test_ema_update_formula():
    from torch import nn

    from vision.train.ema import EMA

    m = nn.Linear(2, 1)
    ema = EMA(m, 0.9)
    before = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * (before + 1.0))


def test_ema_warmup_is_litema_and_survives_a_restart():
    """LitEma (CompVis latent diffusion): update n uses min(decay, (1 + n) / (10 + n)); the count is saved."""
    from torch import nn

    from vision.train.ema import EMA

    m = nn.Linear(2, 1)
    ema = EMA(m, 0.999, warmup=True)
    expected = m.weight.detach().clone()
    for n in range(3):
        with torch.no_grad():
            m.weight.add_(1.0)
        ema.update(m)
        d = min(0.999, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * m.weight.detach()
    assert torch.allclose(ema.model.weight, expected)
    restored = EMA(m, 0.5)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.warmup, restored.updates) == (0.999, True, 3)


# ---------------------------------------------------------------- run folders: never clobbered, --overwrite, Ctrl-C


def toy_trainer(argv, on_step=None, schedule=None):
    """A trainer as an app writes one (vision.cli parser + add_train_args): 6 steps, a checkpoint every 3;
    `schedule(optimizer, steps)` adds a learning-rate scheduler built from --steps."""
    from torch import nn

    from tests.helpers.tiny_train import Toy
    from vision.cli import ArgumentParser, add_common_args
    from vision.train import Phase, Trainer, add_train_args, train_config_from_args

    p = ArgumentParser(prog="toy")
    add_train_args(p, batch_size=8, max_steps=6, checkpoint_every=3, log_every=1)
    add_common_args(p)
    args = p.parse_args([*argv, "--quiet"])
    torch.manual_seed(args.seed)
    trainer = Trainer(train_config_from_args(args, "cpu", "toy " + " ".join(argv)), Toy())
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    schedulers = {"opt": schedule(opt, args.steps)} if schedule else None
    models = trainer.prepare({"model": model}, {"opt": opt}, schedulers)

    def loss(batch, step):
        if on_step is not None:
            on_step(trainer, step)
        return ((models["model"](batch[0]) - batch[1]) ** 2).mean(), {}

    trainer.fit([Phase("mse", "opt", loss, models=("model",))])
    torch.save(model.state_dict(), trainer.out / "final.pt")
    (trainer.out / "provenance.json").write_text(json.dumps(trainer.provenance("toy " + " ".join(argv))))
    return 0


def run_toy(argv, capsys, on_step=None, schedule=None) -> tuple[int, str]:
    from vision.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(lambda a: toy_trainer(a, on_step, schedule), argv)
    return exit_.value.code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def strip_times(jsonl: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in jsonl.read_text().splitlines()]


def test_out_holding_a_run_is_refused_in_one_line(tmp_path, capsys):
    old = tmp_path / "run"
    assert run_toy(["--out", str(old)], capsys)[0] == 0
    before = snapshot(old)
    code, err = run_toy(["--out", str(old)], capsys)
    assert code == 2 and err == (f"error: --out {old} holds a training run (checkpoints/latest.pt, metrics.jsonl); "
                                 "pass --resume to continue it or --overwrite to replace it\n")
    code, err = run_toy(["--out", str(old), "--resume", "--overwrite"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pass only one" in err
    code, err = run_toy(["--out", str(tmp_path / "new"), "--resume"], capsys)
    assert code == 2 and err == f"error: --resume: no checkpoint at {tmp_path / 'new/checkpoints/latest.pt'}\n"
    assert snapshot(old) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # the toolkit itself refuses too, for a trainer that builds its TrainConfig without the parser
    from tests.helpers.tiny_train import Toy
    from vision.errors import UserError
    from vision.train import TrainConfig, Trainer

    with pytest.raises(UserError, match="--overwrite"):
        Trainer(TrainConfig(out_dir=str(old), max_steps=2, batch_size=8), Toy())
    # a folder with other files but no run is used as it is (and kept)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert run_toy(["--out", str(tmp_path / "other")], capsys)[0] == 0
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_run_only_after_its_first_checkpoint(tmp_path, capsys):
    old = tmp_path / "run"
    assert run_toy(["--out", str(old)], capsys)[0] == 0
    (old / "notes.txt").write_text("part of the old run")
    before = snapshot(old)
    seen = {}

    def watch(trainer, step):  # checkpoints after steps 3 and 6; `step` counts steps done
        if step == 2:  # the new run has logged 2 steps, but has no checkpoint yet
            seen["before_checkpoint"] = snapshot(old), trainer.out
        if step == 3:
            seen["after_checkpoint"] = snapshot(old), trainer.out, sorted(p.name for p in tmp_path.iterdir())

    assert run_toy(["--out", str(old), "--overwrite", "--seed", "1"], capsys, on_step=watch)[0] == 0
    files, where = seen["before_checkpoint"]
    assert files == before and where == tmp_path / ".run.overwrite"
    files, where, siblings = seen["after_checkpoint"]
    assert where == old and siblings == ["run"] and "notes.txt" not in files
    assert load_checkpoint(old / "checkpoints/latest.pt")["config"]["seed"] == 1
    # the result is exactly a fresh run with the same options
    assert run_toy(["--out", str(tmp_path / "fresh"), "--seed", "1"], capsys)[0] == 0
    a = torch.load(old / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "fresh/final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_times(old / "metrics.jsonl") == strip_times(tmp_path / "fresh/metrics.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "run"]


def test_ctrl_c_says_how_to_continue(tmp_path, capsys):
    old = tmp_path / "run"
    assert run_toy(["--out", str(old)], capsys)[0] == 0
    before = snapshot(old)

    def interrupt_at(n):
        def hook(trainer, step):
            if step == n:
                raise KeyboardInterrupt
        return hook

    # an --overwrite interrupted before its first checkpoint: the old run is untouched and still resumes
    code, err = run_toy(["--out", str(old), "--overwrite"], capsys, on_step=interrupt_at(2))
    assert code == 130 and err == (f"error: interrupted before the new run's first checkpoint; the previous run in "
                                   f"{old} is untouched (--resume continues it, --overwrite starts again)\n")
    assert snapshot(old) == before
    assert run_toy(["--out", str(old), "--resume", "--steps", "7"], capsys)[0] == 0
    assert [r["step"] for r in strip_times(old / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 7]
    # a run interrupted after a checkpoint names it and --resume
    new = tmp_path / "new"
    code, err = run_toy(["--out", str(new)], capsys, on_step=interrupt_at(4))
    assert code == 130 and err == (f"error: interrupted; {new} holds a checkpoint from step 3: rerun the same command "
                                   "with --resume to continue\n")
    assert run_toy(["--out", str(new), "--resume"], capsys)[0] == 0
    assert [r["step"] for r in strip_times(new / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "run"]  # the interrupted staging folder is gone


SCHEDULES = {  # each one's shape depends on --steps, as the apps build theirs
    "poly": lambda opt, steps: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - min(s, steps - 1) / steps) ** 0.9),
    "multistep": lambda opt, steps: torch.optim.lr_scheduler.MultiStepLR(opt, [steps * 3 // 4], gamma=0.1),
    "onecycle": lambda opt, steps: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps),
}


@pytest.mark.parametrize("kind", SCHEDULES)
def test_resume_follows_the_schedule_of_the_new_steps(tmp_path, capsys, kind):
    """A run resumed with a larger --steps uses, from its first resumed step on, the learning rates of a run
    started with that --steps (the old code kept the optimizer's stored rate for a step, MultiStepLR's old
    milestones and OneCycleLR's old total, which raised); a plain resume stays bit for bit."""
    def recorder(lrs):
        return lambda trainer, step: lrs.setdefault(trainer.step, trainer.optimizers["opt"].param_groups[0]["lr"])

    straight, first, resumed = {}, {}, {}
    assert run_toy(["--out", str(tmp_path / "a"), "--steps", "12"], capsys, recorder(straight), SCHEDULES[kind])[0] == 0
    assert run_toy(["--out", str(tmp_path / "b"), "--steps", "6"], capsys, recorder(first), SCHEDULES[kind])[0] == 0
    assert run_toy(["--out", str(tmp_path / "b"), "--steps", "12", "--resume"], capsys, recorder(resumed),
                   SCHEDULES[kind])[0] == 0
    assert sorted(resumed) == list(range(6, 12))
    assert [resumed[s] for s in range(6, 12)] == pytest.approx([straight[s] for s in range(6, 12)], rel=1e-12)
    assert first[5] != pytest.approx(straight[5])  # the two schedules do differ before the resume

    def interrupt_at(n):
        def hook(trainer, step):
            if step == n:
                raise KeyboardInterrupt
        return hook

    assert run_toy(["--out", str(tmp_path / "c"), "--steps", "12"], capsys, interrupt_at(8), SCHEDULES[kind])[0] == 130
    assert run_toy(["--out", str(tmp_path / "c"), "--steps", "12", "--resume"], capsys, None, SCHEDULES[kind])[0] == 0
    a, c = (torch.load(tmp_path / f"{x}/final.pt", weights_only=True) for x in "ac")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_provenance_names_every_command_that_trained_the_run(tmp_path, capsys):
    """A run trained by one command reports it; a resumed run reports each command with its steps and time
    (a session interrupted after a checkpoint counts up to that checkpoint; one that never saved, not at all)."""
    one = tmp_path / "one"
    assert run_toy(["--out", str(one)], capsys)[0] == 0
    trained_with, train_time = json.loads((one / "provenance.json").read_text())
    assert trained_with == f"toy --out {one}"
    assert re.fullmatch(r"\d+\.\d min on \d+ CPU threads?", train_time)

    def interrupt_at(n):
        def hook(trainer, step):
            if step == n:
                raise KeyboardInterrupt
        return hook

    run = tmp_path / "run"
    a, b, c = ["--out", str(run), "--steps", "6"], ["--out", str(run), "--steps", "12", "--resume"], \
        ["--out", str(run), "--steps", "12", "--resume", "--log-every", "2"]
    assert run_toy(a, capsys)[0] == 0
    assert run_toy(b, capsys, interrupt_at(8))[0] == 130  # no checkpoint in this session: it trained nothing kept
    assert run_toy(b, capsys, interrupt_at(11))[0] == 130  # checkpoint at step 9, then interrupted
    assert run_toy(c, capsys)[0] == 0
    trained_with, train_time = json.loads((run / "provenance.json").read_text())
    assert trained_with == (f"toy {' '.join(a)} (steps 1-6), then toy {' '.join(b)} (steps 7-9), "
                            f"then toy {' '.join(c)} (steps 10-12)")
    assert re.fullmatch(r"\d+\.\d min \((\d+\.\d min on \d+ CPU threads?(, then )?){3}\)", train_time), train_time
    lines = [json.loads(ln) for ln in (run / "sessions.jsonl").read_text().splitlines()]
    assert [ln["from_step"] for ln in lines] == [0, 6, 9]


# ---------------------------------------------------------------- torn or damaged files, an interrupted swap


def _interrupt_at(n):
    def hook(trainer, step):
        if step == n:
            raise KeyboardInterrupt
    return hook


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    """A kill (or a full disk) during Trainer.log's append leaves a torn last line: the run still resumes,
    and the trim drops it; a damaged line before the last one is one `error:` line."""
    from vision.train.trainer import plot_metrics

    run = tmp_path / "run"
    assert run_toy(["--out", str(run)], capsys, _interrupt_at(5))[0] == 130  # checkpoint at step 3
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0, "mse_l')
    assert plot_metrics(run / "metrics.jsonl", tmp_path / "curves.png") == tmp_path / "curves.png"
    code, err = run_toy(["--out", str(run), "--resume"], capsys)
    assert code == 0, err
    assert [r["step"] for r in strip_times(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    code, err = run_toy(["--out", str(run), "--resume", "--steps", "9"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {run / 'metrics.jsonl'}: line 2 is not ")


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys, how):
    from vision.errors import UserError

    run = tmp_path / "run"
    assert run_toy(["--out", str(run)], capsys)[0] == 0
    ckpt = run / "checkpoints/latest.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    with pytest.raises(UserError, match="is empty" if how == "empty" else "truncated or damaged"):
        load_checkpoint(ckpt)
    code, err = run_toy(["--out", str(run), "--resume", "--steps", "9"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {ckpt} ") and "--overwrite" in err


def _kill_between_the_renames(monkeypatch):
    """RunFolder.commit as a kill between its two renames leaves it: OUT moved aside, the new run not yet in."""
    import os

    from vision.train.run_folder import RunFolder

    def first_rename_only(self):
        if self.staged:
            os.rename(self.final, self.final.parent / f".{self.final.name}.replaced")
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "commit", first_rename_only)


def test_an_overwrite_killed_between_its_renames_is_recovered(tmp_path, capsys, monkeypatch):
    old = tmp_path / "run"
    assert run_toy(["--out", str(old)], capsys)[0] == 0
    _kill_between_the_renames(monkeypatch)
    assert run_toy(["--out", str(old), "--overwrite", "--seed", "1"], capsys)[0] == 130
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.overwrite", ".run.replaced"]
    # the new run has its first checkpoint: it is put in OUT (the old code deleted it on the next command)
    code, err = run_toy(["--out", str(old), "--resume", "--seed", "1"], capsys)
    assert code == 0 and "note: an --overwrite of" in err and "recovered the new run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert run_toy(["--out", str(tmp_path / "fresh"), "--seed", "1"], capsys)[0] == 0
    a, b = torch.load(old / "final.pt", weights_only=True), torch.load(tmp_path / "fresh/final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a new run without a complete checkpoint: the old run comes back, as it was
    shutil.rmtree(old)
    shutil.rmtree(tmp_path / "fresh")
    assert run_toy(["--out", str(old)], capsys)[0] == 0
    before = snapshot(old)
    _kill_between_the_renames(monkeypatch)
    assert run_toy(["--out", str(old), "--overwrite", "--seed", "1"], capsys)[0] == 130
    monkeypatch.undo()
    ckpt = tmp_path / ".run.overwrite/checkpoints/latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    from vision.train.run_folder import check_run_folder

    with pytest.warns(UserWarning, match="recovered the previous run"):
        check_run_folder(old, resume=True, overwrite=False)
    assert snapshot(old) == before
    assert run_toy(["--out", str(old), "--resume", "--steps", "9"], capsys)[0] == 0
    assert [r["step"] for r in strip_times(old / "metrics.jsonl")] == list(range(1, 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert torch.load(old / "checkpoints/latest.pt", weights_only=True)["config"]["seed"] == 0
