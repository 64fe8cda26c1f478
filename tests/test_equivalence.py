"""streamprune's streamed output equals an in-memory reference Wanda, exactly (float32, batch 1)."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import streamprune
from reference import reference_prune
from tiny import FAMILIES

FAMILY_LIST = list(FAMILIES)


def load_ids(path):
    return torch.tensor([json.loads(line)["input_ids"] for line in open(path)])


def run(model, out, ids_file, **kw):
    kw.setdefault("calib", str(ids_file))
    return streamprune.prune(model, out, nsamples=8, seqlen=32, progress=False, **kw)


def assert_same_model(out, ref, ids):
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd, rsd = got.state_dict(), ref.state_dict()
    assert set(sd) == set(rsd)
    bad = [k for k in rsd if not torch.equal(sd[k], rsd[k].to(sd[k].dtype))]
    assert not bad, f"tensors differ from the reference: {bad[:5]}"
    with torch.no_grad():
        assert torch.equal(got(ids[:2]).logits, ref(ids[:2]).logits)


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_unstructured_matches_reference(family, tiny_models, ids_file, tmp_path):
    model = tiny_models(family)
    summary = run(model, tmp_path / "out", ids_file, sparsity=0.5)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    masks = reference_prune(ref, load_ids(ids_file), 0.5)
    assert_same_model(tmp_path / "out", ref, load_ids(ids_file))
    assert summary["sparsity"] == pytest.approx(sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values()))


@pytest.mark.parametrize("family,structure", [("llama", "2:4"), ("qwen3", "4:8"), ("gemma3", "2:4"), ("phi3", "1:4")])
def test_nm_matches_reference(family, structure, tiny_models, ids_file, tmp_path):
    model = tiny_models(family)
    n, m = (int(x) for x in structure.split(":"))
    summary = run(model, tmp_path / "out", ids_file, structure=structure)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reference_prune(ref, load_ids(ids_file), n=n, m=m)
    assert_same_model(tmp_path / "out", ref, load_ids(ids_file))
    assert summary["sparsity"] == pytest.approx(n / m)


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_magnitude_matches_reference(structure, tiny_models, ids_file, tmp_path):
    model = tiny_models("mistral")
    run(model, tmp_path / "out", ids_file, method="magnitude", structure=structure, sparsity=0.6, calib=None)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reference_prune(ref, load_ids(ids_file), 0.6, *((2, 4) if structure == "2:4" else (0, 0)), method="magnitude")
    assert_same_model(tmp_path / "out", ref, load_ids(ids_file))


def test_bf16_checkpoint_computes_in_float32_and_writes_bf16(tiny_models, ids_file, tmp_path):
    model = tiny_models("llama", dtype=torch.bfloat16)
    run(model, tmp_path / "out", ids_file, sparsity=0.5)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reference_prune(ref, load_ids(ids_file), 0.5)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert got.dtype == torch.bfloat16
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v.to(torch.bfloat16)), k


def digest(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def test_output_bytes_do_not_depend_on_tier_or_overlap(tiny_models, ids_file, tmp_path):
    model = tiny_models("qwen2")
    run(model, tmp_path / "a", ids_file, activations="cpu")
    run(model, tmp_path / "b", ids_file, activations="disk", overlap=False, snapshot_every=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_row_chunks_do_not_change_masks(tiny_models, ids_file, tmp_path):
    from types import SimpleNamespace

    from streamprune.methods import Magnitude, Structure, Wanda

    g = torch.Generator().manual_seed(0)
    w, s = torch.randn(37, 64, generator=g), SimpleNamespace(sq_norm=torch.rand(64, generator=g))
    w[3, :8] = 0.5  # exact ties: the lower input index is pruned first, in every chunking
    for st in (Structure(), Structure(2, 4)):
        full = Wanda().prune(w, s, 0.5, st, 0).mask
        assert torch.equal(full, Wanda().prune(w, s, 0.5, st, 5).mask)
        assert torch.equal(Magnitude().prune(w, s, 0.5, st, 0).mask, Magnitude().prune(w, s, 0.5, st, 7).mask)


def test_output_layout(tiny_models, ids_file, tmp_path):
    from safetensors import safe_open

    model = tiny_models("gemma3")  # tied embeddings: no lm_head tensor in the files
    run(model, tmp_path / "out", ids_file)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src = json.loads((model / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src["weight_map"])
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 4 + 1
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                t = f.get_slice(k)
                total += torch.Size(t.get_shape()).numel() * 4
    assert index["metadata"]["total_size"] == total
    assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (out / "generation_config.json").is_file()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batch_size_matches_reference_with_the_same_batches(family, tiny_models, ids_file, tmp_path):
    """--batch-size 3: 8 sequences as batches of 3, 3 and 2, exactly the reference's running mean over them."""
    model = tiny_models(family)
    s = run(model, tmp_path / "out", ids_file, batch_size=3)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reference_prune(ref, load_ids(ids_file), 0.5, batch_size=3)
    assert_same_model(tmp_path / "out", ref, load_ids(ids_file))
    assert s["sparsity"] == pytest.approx(0.5)
