"""Every entry of weights/index.json loads as what it says it is, with its provenance, and a shipped generator
names a shipped tokenizer (a model that names a run folder would not load on another machine)."""
import pytest

from vision.hub import from_pretrained, model_kind, read_index

INDEX = read_index()


@pytest.mark.parametrize("name", sorted(INDEX))
def test_shipped_model_loads_with_its_provenance(name):
    entry = INDEX[name]
    for field in ("trained_with", "data", "train_time", "metrics"):
        assert entry.get(field), f"{name}: no {field}"
    model = from_pretrained(name)  # also checks the file's sha256 against the index
    assert model_kind(model) in (None, entry["kind"]), (name, model_kind(model), entry["kind"])
    tokenizer = getattr(getattr(model, "config", None), "tokenizer", None)
    if entry["kind"] == "generator" and tokenizer is not None:
        assert tokenizer in INDEX and INDEX[tokenizer]["kind"] == "tokenizer", (name, tokenizer)
