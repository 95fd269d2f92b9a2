"""The sampler benchmark harness: same labels and seeds for every run, counted passes, per-run peak memory."""
import torch

from apps.benchmarks.sampler_harness import SamplerRun, time_samplers
from tests.helpers.tiny_generator import TinyConfig, TinyGenerator


def test_runs_are_counted_and_seeded_alike():
    torch.manual_seed(0)
    model = TinyGenerator(TinyConfig()).eval()
    labels = torch.arange(4)
    rows = time_samplers(model, [SamplerRun("plain"), SamplerRun("three", "twice", {"rounds": 3}),
                                 SamplerRun("guided", options={"cfg": 2.0})], labels, repeats=2)
    assert rows["plain"]["nfe"] == 1 and rows["three"]["nfe"] == 3 and rows["three"]["mean_accepted"] == 1
    assert all(r["wall_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())
    # the same seed for every run: the first round of `twice` is plain's draw
    a, _ = model.generate(labels, generator=torch.Generator().manual_seed(0))
    b, _ = model.generate(labels, sampler="twice", rounds=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.ids, b.ids)


PEAK_SCRIPT = """
import torch
from apps.benchmarks.sampler_harness import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
reset_peak_memory(cpu)
before = peak_memory_mb(cpu)
big = torch.ones(256 * 2**20 // 4)  # 256 MB, touched
big += 1
during = peak_memory_mb(cpu)
del big
reset_peak_memory(cpu)
print(before, during, peak_memory_mb(cpu))
"""


def test_peak_memory_is_reset_per_run():
    """In a fresh process (a test worker's own history would blur the figures): the peak rises with a 256 MB
    tensor and falls back when reset after it is freed."""
    import subprocess
    import sys

    from tests.conftest import run_env

    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], env=run_env(), capture_output=True, text=True, check=True)
    before, during, after = map(float, out.stdout.split())
    assert during - before > 200 and after < during - 200


def test_tensor_peak_counts_what_is_live_at_once():
    """The CPU tensor peak is the high-water mark of live tensors: two 8 MB tensors and their sum alive together
    count 24 MB, three freed one before the next is allocated count 8; weights are counted by tensor_mb."""
    from apps.benchmarks.sampler_harness import tensor_mb, tensor_peak_mb

    cpu = torch.device("cpu")
    n = 2 * 2**20  # float32: 8 MB

    def together():
        a = torch.ones(n)
        b = torch.ones(n)
        return (a + b).sum()  # a third 8 MB tensor while both live

    def one_after_another():
        for _ in range(3):
            torch.ones(n).sum()

    assert 23.5 < tensor_peak_mb(together, cpu) < 26
    assert 7.5 < tensor_peak_mb(one_after_another, cpu) < 10
    assert tensor_mb(torch.nn.Linear(1024, 1024)) == (1024 * 1024 + 1024) * 4 / 2**20
