import torch

from tokenizers.vq import VQTokenizer, vq_config
from vision.hub import from_pretrained, save_pretrained
from vision.tokens import DiscreteTokenizer


def test_vq_tokenizer_round_trips_and_gradients(tmp_path):
    torch.manual_seed(0)
    model = VQTokenizer(vq_config("vq-tiny-f4")).eval()
    assert isinstance(model, DiscreteTokenizer) and model.spec.grid == (8, 8) and model.spec.vocab_size == 256
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    recon, q = model(x)
    tokens = model.encode(x)
    assert tokens.ids.shape == (2, 8, 12) and tokens.spec.grid == (8, 12)
    assert torch.equal(model.ids_to_latents(tokens.ids), q.quantized.detach().contiguous())
    assert torch.allclose(model.decode(tokens), recon, atol=1e-5)
    model.train()
    recon, q = model(x)
    ((recon - x).abs().mean() + q.loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    save_pretrained(model, tmp_path / "vq")
    back = from_pretrained(tmp_path / "vq")
    assert torch.equal(back.encode(x).ids, model.eval().encode(x).ids)
