"""Vector quantizer: lookup, losses, EMA, dead-code restart, SimVQ."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.quantizers import VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("codebook", ["learned", "ema", "simvq"])
def test_ids_round_trip_and_nearest_code(distance, codebook):
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, distance=distance, codebook=codebook).eval()
    z = torch.randn(2, 8, 5, 4)
    out = vq(z)
    assert out.ids.shape == (2, 5, 4) and out.ids.dtype == torch.int64
    assert torch.equal(vq.ids_to_latents(out.ids), out.quantized)
    flat = z.movedim(1, -1).reshape(-1, 8)
    if distance == "l2":
        expected = torch.cdist(flat, vq.codebook).argmin(1)
    else:
        expected = (F.normalize(flat, dim=-1) @ F.normalize(vq.codebook, dim=-1).T).argmax(1)
        assert torch.allclose(out.quantized.norm(dim=1), torch.ones(()))
    assert torch.equal(out.ids.reshape(-1), expected)


def test_straight_through_and_loss_terms():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, codebook="learned", beta=0.25, channel_first=False).train()
    z = torch.randn(10, 4, requires_grad=True)
    out = vq(z)
    w = torch.randn(10, 4)
    (out.quantized * w).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, w)  # identity gradient to the encoder
    assert vq.embed.grad is None  # the decoder's gradient does not reach the codebook
    code = vq.embed.detach()[out.ids]
    # beta on the commitment term, not on the codebook term (taming's legacy bug)
    assert out.losses["codebook"].item() == pytest.approx(F.mse_loss(z.detach(), code).item())
    assert out.losses["commitment"].item() == pytest.approx(0.25 * F.mse_loss(z.detach(), code).item())
    z.grad = None
    out.losses["codebook"].backward(retain_graph=True)
    assert z.grad is None and vq.embed.grad.abs().sum() > 0
    vq.embed.grad = None
    out.losses["commitment"].backward()
    assert vq.embed.grad is None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("eps, expected", [
    (0.0, [[4 / 3, 2 / 3], [9.5, 9.5]]),
    # Laplace smoothing: N = (1.5, 1.0), n = 2.5 -> (N + 0.1) / (2.5 + 2 * 0.1) * 2.5 = (40/27, 27.5/27)
    (0.1, [[1.35, 0.675], [9.5 * 27 / 27.5, 9.5 * 27 / 27.5]]),
])
def test_ema_update_matches_hand_computation(eps, expected):
    vq = VectorQuantizer(2, 2, codebook="ema", decay=0.5, eps=eps, channel_first=False).train()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.embed_avg.copy_(vq.embed)
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]])
    out = vq(z)
    assert out.ids.tolist() == [0, 0, 1]
    # cluster_size = 0.5 * 1 + 0.5 * (2, 1); embed_avg = 0.5 * embed + 0.5 * ((4, 2), (9, 9))
    assert vq.cluster_size.tolist() == [1.5, 1.0]
    assert vq.embed_avg.tolist() == [[2.0, 1.0], [9.5, 9.5]]
    torch.testing.assert_close(vq.embed, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert set(out.losses) == {"commitment"}


@pytest.mark.parametrize("codebook", ["learned", "ema"])
def test_dead_code_restart_revives_codes(codebook):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, codebook=codebook, dead_code_steps=2, channel_first=False).train()
    with torch.no_grad():
        vq.embed.copy_(torch.full((8, 4), 100.0))
        vq.embed[0] = 0.0
        if codebook == "ema":
            vq.embed_avg.copy_(vq.embed)
    z = torch.randn(64, 4) * 0.1
    first = vq(z)
    assert first.metrics["utilisation"] == 1 / 8  # everything snaps to code 0
    assert (vq.embed[1:] > 99.0).all()  # not dead yet: unused for 1 step only (EMA smoothing may nudge it)
    vq(z)  # second unused step: codes 1..7 are replaced by batch vectors
    revived = vq.embed[1:].clone()
    assert all((row == z).all(1).any() for row in revived)
    if codebook == "ema":
        assert (vq.embed_avg[1:] == revived).all() and (vq.cluster_size[1:] == 1).all()
    assert vq(z).metrics["utilisation"] > 1 / 8


def test_simvq_lookup_matches_vector_quantize_pytorch():
    torch.manual_seed(0)
    ref = vqp.SimVQ(dim=16, codebook_size=128, rotation_trick=False, channel_first=True)
    ours = VectorQuantizer(128, 16, codebook="simvq", beta=0.25)
    ours.frozen_codebook.copy_(ref.frozen_codebook)
    ours.code_transform.weight.data.copy_(ref.code_transform.weight)
    z = torch.randn(2, 16, 6, 6)
    z_ref, z_ours = z.clone().requires_grad_(), z.clone().requires_grad_()
    q_ref, ids_ref, loss_ref = ref(z_ref)
    out = ours(z_ours)
    assert torch.equal(out.ids, ids_ref)
    torch.testing.assert_close(out.quantized, q_ref, atol=1e-6, rtol=0)  # ref uses z + sg(q - z)
    assert out.loss.item() == pytest.approx(loss_ref.item(), abs=1e-7)
    w = torch.randn_like(z)
    (loss_ref + (q_ref * w).sum()).backward()
    (out.loss + (out.quantized * w).sum()).backward()
    torch.testing.assert_close(z_ours.grad, z_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.code_transform.weight.grad, ref.code_transform.weight.grad)


def _utilisation_after_training(codebook: str, dim: int = 64, size: int = 512, steps: int = 30) -> float:
    torch.manual_seed(0)
    data = torch.randn(1024, dim)
    enc, dec = nn.Linear(dim, dim), nn.Linear(dim, dim)
    vq = VectorQuantizer(size, dim, codebook=codebook, channel_first=False)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), *vq.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = data[torch.randint(1024, (256,), generator=g)]
        out = vq(enc(x))
        loss = F.mse_loss(dec(out.quantized), x) + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return vq.eval()(enc(data)).metrics["utilisation"]


def test_simvq_uses_more_of_the_codebook_than_plain_vq():
    plain, simvq = _utilisation_after_training("learned"), _utilisation_after_training("simvq")
    assert simvq > 2 * plain, (plain, simvq)


def test_metrics_and_validation():
    vq = VectorQuantizer(4, 2, channel_first=False).eval()
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]]))
    out = vq(torch.tensor([[0.1, 0.0], [5.0, 4.9], [0.0, 0.2], [4.8, 5.0]]))
    assert out.metrics["utilisation"] == 0.5
    assert out.metrics["perplexity"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        VectorQuantizer(4, 2, codebook="simvq", dead_code_steps=5)
    with pytest.raises(ValueError):
        vq(torch.randn(3, 5))
