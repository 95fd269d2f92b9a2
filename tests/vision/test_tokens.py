import pytest
import torch

from vision.tokens import DiscreteTokenizer, GenerationStats, Tokenizer, TokenSpec, Tokens, compatible


def test_spec_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenSpec("discrete", (4, 4), 8)
    with pytest.raises(ValueError, match="channels"):
        TokenSpec("continuous", (4, 4), 8)
    with pytest.raises(ValueError, match="scales"):
        TokenSpec("discrete", (16, 16), 16, vocab_size=4096, scales=(1, 2, 10))
    spec = TokenSpec("discrete", [16, 16], 16, vocab_size=4096, scales=[1, 2, 16])
    assert spec.grid == (16, 16) and spec.scales == (1, 2, 16) and spec.image_size == (256, 256)


def test_discrete_tokens_round_trip_and_errors():
    spec = TokenSpec("discrete", (2, 3), 8, vocab_size=10)
    ids = torch.randint(0, 10, (4, 2, 3))
    t = Tokens(spec, ids=ids)
    assert t.batch_size == 4 and torch.equal(t.to("cpu").ids, ids)
    with pytest.raises(ValueError, match="int64"):
        Tokens(spec, ids=ids.int())
    with pytest.raises(ValueError, match="shape"):
        Tokens(spec, ids=torch.zeros(4, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"out of range \[0, 10\)"):
        Tokens(spec, ids=torch.full((1, 2, 3), 10))
    with pytest.raises(ValueError, match="out of range"):
        Tokens(spec, ids=torch.full((1, 2, 3), -1))
    with pytest.raises(ValueError, match="latents grid"):
        Tokens(spec, ids=ids, latents=torch.zeros(4, 5, 3, 3))
    with pytest.raises(ValueError, match="batch sizes"):
        Tokens(spec, ids=ids, latents=torch.zeros(3, 5, 2, 3))


def test_grouped_and_multiscale_tokens():
    g = TokenSpec("discrete", (4, 4), 8, vocab_size=256, groups=4)
    Tokens(g, ids=torch.randint(0, 256, (2, 4, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        Tokens(g, ids=torch.randint(0, 256, (2, 4, 4)))
    v = TokenSpec("discrete", (4, 4), 16, vocab_size=32, scales=(1, 2, 4))
    Tokens(v, scale_ids=[torch.randint(0, 32, (2, s, s)) for s in (1, 2, 4)])
    with pytest.raises(ValueError, match=r"scale_ids\[1\]"):
        Tokens(v, scale_ids=[torch.randint(0, 32, (2, s, s)) for s in (1, 3, 4)])


def test_continuous_tokens():
    spec = TokenSpec("continuous", (4, 4), 8, channels=3)
    Tokens(spec, latents=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        Tokens(spec, latents=torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        Tokens(spec, latents=torch.zeros(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="continuous"):
        Tokens(spec, ids=torch.zeros(2, 4, 4, dtype=torch.long), latents=torch.randn(2, 3, 4, 4))


def test_protocols_and_compatibility():
    class Tok:
        spec = TokenSpec("discrete", (2, 2), 8, vocab_size=4)

        def encode(self, x):
            return Tokens(self.spec, ids=torch.zeros(x.shape[0], 2, 2, dtype=torch.long))

        def decode(self, t):
            return torch.zeros(t.batch_size, 3, 16, 16)

        def ids_to_latents(self, ids):
            return torch.zeros(ids.shape[0], 1, 2, 2)

    class Continuous:
        spec = TokenSpec("continuous", (2, 2), 8, channels=4)

        def encode(self, x): ...

        def decode(self, t): ...

    assert isinstance(Tok(), DiscreteTokenizer) and not isinstance(Continuous(), DiscreteTokenizer)
    assert isinstance(Continuous(), Tokenizer)
    assert compatible(Tok.spec, TokenSpec("discrete", (4, 4), 8, vocab_size=4))
    assert not compatible(Tok.spec, TokenSpec("discrete", (2, 2), 8, vocab_size=5))
    s = GenerationStats(nfe=3, accepted_per_iter=[1, 2, 3])
    assert s.mean_accepted == 2.0
