"""The follow-up methods, streamed: identical to the in-memory reference loop on tiny models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import streamprune
from reference import reference_prune

CASES = [
    dict(method="ria"),
    dict(method="ria", structure="2:4"),
    dict(method="sparsegpt"),
    dict(method="sparsegpt", structure="2:4"),
    dict(method="wanda", refine="dsnot"),
    dict(method="ria", refine="dsnot", structure="4:8"),
    dict(method="wanda", sparsity_profile="owl", sparsity=0.6),
    dict(method="sparsegpt", sparsity_profile="owl", sparsity=0.7, owl_lambda=0.1),
    dict(method="admm"),
    dict(method="admm", structure="2:4"),
    dict(method="admm", sparsity_profile="owl", sparsity=0.7, owl_lambda=0.1),
    dict(method="wanda", sparsity_profile="owl-linear", sparsity=0.6),
    dict(method="sparsegpt", sparsity_profile="owl-linear", sparsity=0.7, owl_lambda=0.1),
]


def ids_of(path):
    return torch.tensor([json.loads(line)["input_ids"] for line in open(path)])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_method_matches_reference(case, family, tiny_models, ids_file, tmp_path):
    model = tiny_models(family)
    summary = streamprune.prune(model, tmp_path / "out", calib=str(ids_file), nsamples=8, seqlen=32, progress=False, **case)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    n, m = (int(x) for x in case.get("structure", "0:0").split(":"))
    reference_prune(ref, ids_of(ids_file), case.get("sparsity", 0.5), n, m, method=case["method"],
                    refine=case.get("refine"), profile=case.get("sparsity_profile", "uniform"),
                    owl_lambda=case.get("owl_lambda", 0.08))
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    sd = got.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    if case.get("sparsity_profile", "uniform").startswith("owl"):
        per_block = summary["block_sparsity"]
        assert max(per_block) - min(per_block) > 0.02  # non-uniform
        assert sum(per_block) / len(per_block) == pytest.approx(case["sparsity"], abs=0.02)


def test_owl_sweep_is_stored_and_reused_on_resume(tiny_models, ids_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    model, out = tiny_models("llama"), tmp_path / "out"
    args = [sys.executable, "-m", "streamprune", "prune", str(model), str(out), "--calib", str(ids_file),
            "--nsamples", "8", "--seqlen", "32", "--sparsity-profile", "owl", "--no-progress"]
    res = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, STREAMPRUNE_FAULT_AT="block_start:2"))
    assert res.returncode == -signal.SIGKILL
    state = json.loads((out / ".streamprune" / "state.json").read_text())
    assert state["profile"]["name"] == "owl" and len(state["profile"]["sparsities"]) == 3
    res = subprocess.run([sys.executable, "-m", "streamprune", "resume", str(out), "--json", "--no-progress"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "owl_sweep" not in json.loads(res.stdout)["phase_seconds"]  # not swept again


@pytest.mark.parametrize("args,match", [
    (dict(refine="dsnot", method="magnitude"), "refines a wanda or ria mask"),
    (dict(sparsity_profile="owl", structure="2:4"), "does not apply to N:M"),
    (dict(sparsity_profile="owl-linear", method="magnitude"), "needs calibration statistics"),
    (dict(sparsity_profile="owl", owl_lambda=0.6), "--owl-lambda"),
    (dict(method="sparsegpt2"), "--method"),
    (dict(method="admm", admm_gradual=30), "--admm-gradual"),
    (dict(method="admm", admm_rho=0), "--admm-rho"),
    (dict(refine="dsnot", method="admm"), "refines a wanda or ria mask"),
])
def test_bad_method_combinations(args, match, tiny_models, ids_file, tmp_path):
    from streamprune.errors import StreamPruneError

    with pytest.raises(StreamPruneError, match=match):
        streamprune.prune(tiny_models("llama"), tmp_path / "out", calib=str(ids_file), nsamples=8, seqlen=32,
                          progress=False, **args)
