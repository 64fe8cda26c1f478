"""The real SmolLM2-135M checkpoint (bf16, 3 shards, tied embeddings), calibrated on real English text."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamprune
from reference import reference_prune



@pytest.fixture(scope="module")
def windows(smollm2, text_file, tmp_path_factory):
    from streamprune.calibration import calibration_windows

    ids = calibration_windows(text_file, smollm2, nsamples=4, seqlen=128, seed=0, vocab_size=49152)
    path = tmp_path_factory.mktemp("smol") / "windows.jsonl"
    path.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids.tolist()))
    return ids, path


def test_smollm2_matches_reference_and_loads(smollm2, windows, tmp_path):
    ids, path = windows
    summary = streamprune.prune(smollm2, tmp_path / "out", calib=str(path), nsamples=4, seqlen=128, progress=False)
    assert summary["blocks"] == 30 and summary["sparsity"] == pytest.approx(0.5)
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    reference_prune(ref, ids, 0.5)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert got.dtype == torch.bfloat16
    sd = got.state_dict()
    bad = [k for k, v in ref.state_dict().items() if not torch.equal(sd[k], v.to(torch.bfloat16))]
    assert not bad, bad[:5]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("hello").input_ids  # tokenizer files travelled with the weights


def test_smollm2_text_calibration_is_reproducible(smollm2, text_file, tmp_path):
    kw = dict(calib=str(text_file), nsamples=2, seqlen=64, seed=3, progress=False)
    a = streamprune.prune(smollm2, tmp_path / "a", **kw)
    b = streamprune.prune(smollm2, tmp_path / "b", **kw)
    assert a["sparsity"] == b["sparsity"]
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
