"""WeTok group-wise lookup-free quantization (GQ)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokenizers.quantizers import GroupQuantizer, QuantizerOutput

vqp = pytest.importorskip("vector_quantize_pytorch")


def _reverse_bits(ids: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.zeros_like(ids)
    for j in range(bits):
        out |= ((ids >> j) & 1) << (bits - 1 - j)
    return out


@pytest.mark.parametrize("scale", [1.0, 0.02])
def test_per_group_matches_vector_quantize_pytorch_lfq(scale):
    groups, bits = 4, 8
    torch.manual_seed(0)
    x = torch.randn(2, groups * bits, 8, 8) * scale
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = vqp.LFQ(
        dim=groups * bits, codebook_size=2**bits, num_codebooks=groups, entropy_loss_weight=0.1,
        commitment_loss_weight=0.25, diversity_gamma=1.0, frac_per_sample_entropy=1.0, spherical=False,
        codebook_scale=1.0,
    ).train()
    (q_ref, ids_ref, aux_ref), breakdown = ref(x_ref, return_loss_breakdown=True)
    gq = GroupQuantizer(groups, bits, codebook_entropy="per_group").train()
    out = gq(x_ours)
    assert isinstance(out, QuantizerOutput)

    assert torch.equal(out.quantized, q_ref)
    # LFQ: ids (b, h, w, groups) with channel 0 as the most significant bit; GQ/WeTok: (b, groups, h, w), bit j = channel j
    assert torch.equal(out.ids, _reverse_bits(ids_ref, bits).permute(0, 3, 1, 2))
    assert out.metrics["per_sample_entropy"] == pytest.approx(breakdown.per_sample_entropy.item(), abs=1e-6)
    assert out.metrics["codebook_entropy"] == pytest.approx(breakdown.batch_entropy.item(), abs=2e-6)
    assert out.metrics["commitment"] == pytest.approx(breakdown.commitment.item(), abs=1e-7)
    assert out.loss.item() == pytest.approx(aux_ref.item(), abs=1e-6)

    # same gradients through the straight-through output and the auxiliary losses
    w = torch.randn_like(x)
    (aux_ref + (q_ref * w).sum()).backward()
    (out.loss + (out.quantized * w).sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-6, rtol=1e-5)


def test_pooled_codebook_entropy_pools_groups():
    """WeTok's codebook entropy averages one 2**d distribution over positions *and* groups."""
    groups, bits = 2, 3
    gq = GroupQuantizer(groups, bits).train()
    # group 0 always picks sub-code 0 (all negative), group 1 always sub-code 7 (all positive), sharply
    x = torch.cat([-torch.ones(1, bits, 4, 4), torch.ones(1, bits, 4, 4)], dim=1)
    per_sample, pooled = gq.entropy_terms(x.movedim(1, -1).reshape(1, -1, groups, bits))
    assert per_sample.item() == pytest.approx(0.0, abs=1e-6)
    # pooled: p = (1/2, 0, ..., 0, 1/2) -> entropy log 2 (minus the 1e-5 eps correction)
    assert pooled.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)
    gq_per_group = GroupQuantizer(groups, bits, codebook_entropy="per_group")
    _, per_group = gq_per_group.entropy_terms(x.movedim(1, -1).reshape(1, -1, groups, bits))
    assert per_group.item() == pytest.approx(0.0, abs=1e-4)


def test_ids_bit_layout_and_round_trip():
    gq = GroupQuantizer(groups=2, bits=4).eval()
    x = torch.randn(3, 8, 5, 6)
    out = gq(x)
    assert out.ids.shape == (3, 2, 5, 6) and out.ids.dtype == torch.int64
    for g in range(2):  # group g, bit j is channel g * 4 + j
        expected = sum((x[:, g * 4 + j] > 0).long() << j for j in range(4))
        assert torch.equal(out.ids[:, g], expected)
    assert torch.equal(gq.ids_to_latents(out.ids), out.quantized)
    assert set(out.quantized.unique().tolist()) <= {-1.0, 1.0}
    every = torch.arange(16).view(1, 1, 16, 1).expand(1, 2, 16, 1)
    assert torch.equal(gq(gq.ids_to_latents(every)).ids, every)


def test_straight_through_gradient_reaches_input():
    gq = GroupQuantizer(groups=2, bits=4, commitment_weight=0.0, entropy_weight=0.0).train()
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    w = torch.randn(2, 8, 3, 3)
    out = gq(x)
    ((out.quantized * w).sum() + out.loss).backward()
    assert torch.equal(x.grad, w)


def test_32_bit_forward_backward_stays_small():
    """4 groups x 8 bits on (2, 32, 16, 16): no tensor beyond B*N*G*2**8 floats (a joint 2**32
    codebook would need 4e9), measured over every aten op of forward and backward."""

    class LargestStorage(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
            return out

    gq = GroupQuantizer(groups=4, bits=8).train()
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    with LargestStorage() as mode:
        out = gq(x)
        (out.loss + out.quantized.square().mean()).backward()
    assert 0 < mode.largest <= 2 * 256 * 4 * 256
    assert set(out.losses) == {"entropy", "commitment"}
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_defaults_follow_wetok():
    gq = GroupQuantizer()
    assert (gq.groups, gq.bits, gq.codebook_size) == (4, 8, 256)
    assert (gq.entropy_weight, gq.commitment_weight, gq.temperature, gq.codebook_entropy) == (0.1, 0.25, 0.01, "pooled")
    with pytest.raises(ValueError):
        gq(torch.randn(1, 16, 2, 2))


def _gq_input():
    return torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(3)) * 0.05


def _gq_rank(rank, world, mode):
    x = _gq_input()[rank * 2: rank * 2 + 2].clone().requires_grad_(True)
    out = GroupQuantizer(2, 8, codebook_entropy=mode).train()(x)
    out.losses["entropy"].backward()
    return out.metrics["codebook_entropy"], x.grad, out.metrics["utilisation"]


@pytest.mark.parametrize("mode", ["pooled", "per_group"])
def test_codebook_entropy_is_taken_over_the_global_batch_under_ddp(tmp_path, mode):
    from tests.helpers.two_processes import run_two_processes

    x = _gq_input().requires_grad_(True)
    out = GroupQuantizer(2, 8, codebook_entropy=mode).train()(x)
    out.losses["entropy"].backward()
    ranks = run_two_processes(tmp_path, _gq_rank, mode)
    local = GroupQuantizer(2, 8, codebook_entropy=mode).train()(_gq_input()[:2])
    assert abs(local.metrics["codebook_entropy"] - out.metrics["codebook_entropy"]) > 1e-3  # the halves differ
    assert local.metrics["utilisation"] < out.metrics["utilisation"]
    for entropy, _, utilisation in ranks:
        assert entropy == pytest.approx(out.metrics["codebook_entropy"], abs=1e-5)
        assert utilisation == out.metrics["utilisation"]  # codes used anywhere in the global batch
    # per-process gradients average (DDP) to the single-process one: per-sample part is a local mean,
    # the codebook part arrives summed over both processes
    grad = torch.cat([g for _, g, _ in ranks])
    torch.testing.assert_close(grad / 2, x.grad, rtol=1e-4, atol=1e-6)
