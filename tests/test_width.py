"""Structured width (`--structure width`, docs/edge.md): whole MLP channels removed, the consumer refitted.

Held against an in-memory reference on transformers' own model (tests/reference.py: the same score from full-model
forwards through the already shrunk blocks, the compensation solved as the documented ridge problem by float64
least squares), and the output against transformers' loader: a stock config with a smaller intermediate_size."""

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import streamprune
from reference import reference_width
from test_bad_input import INDEX, cli, expect_error
from test_moe import make_moe
from test_resume import published
from tiny import ids_of, tensors, write_ids

# the tiny models' 160 channels hold no multiple of the default 256 below 160 (tests/test_edge.py tests that default)
ARGS = dict(nsamples=8, seqlen=32, progress=False, width_multiple=8)


def load(out):
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def check_against_reference(model_dir, out, ids_file, ratio, compensate=True):
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference_width(ref, ids_of(ids_file), ratio, compensate=compensate)
    got = load(out)
    assert got.config.intermediate_size == ref.config.intermediate_size
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert set(got_sd) == set(ref_sd)
    for k, v in ref_sd.items():
        if k.endswith("down_proj.weight") and compensate:  # float32 normal equations against float64 lstsq
            torch.testing.assert_close(got_sd[k], v, rtol=2e-3, atol=2e-4 * float(v.abs().max()))
        else:  # copied rows and columns: the same channels, bit for bit
            assert torch.equal(got_sd[k], v), k
    ids = ids_of(ids_file)[:2]
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)
    return got


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3"])
def test_width_equals_reference(family, tiny_models, ids_file, tmp_path):
    """Channels chosen and down refitted as the reference does; the output loads as the stock architecture
    with no missing or unexpected keys and generates."""
    model = tiny_models(family)
    summary = streamprune.prune(model, tmp_path / "out", calib=str(ids_file), structure="width", sparsity=0.25,
                                **ARGS)
    inter = json.loads((model / "config.json").read_text())["intermediate_size"]
    assert summary["intermediate_size"] | {"llama_cpp_warning": None} == {
        "before": inter, "after": 120, "multiple": 8, "requested": 0.25, "achieved": 0.25, "llama_cpp_warning": None}
    assert summary["sparsity"] == pytest.approx(0.25)  # of the MLP weights: 40 of 160 channels
    got = check_against_reference(model, tmp_path / "out", ids_file, 0.25)
    assert type(got).__name__ == AutoModelForCausalLM.from_config(got.config).__class__.__name__
    gen = got.generate(ids_of(ids_file)[:1, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors(tmp_path / "out").values())


def test_width_without_compensation(tiny_models, ids_file, tmp_path):
    model = tiny_models("llama")
    streamprune.prune(model, tmp_path / "out", calib=str(ids_file), structure="width", sparsity=0.5,
                      width_compensation=False, **ARGS)
    check_against_reference(model, tmp_path / "out", ids_file, 0.5, compensate=False)


def test_compensation_lowers_the_block_error(tiny_models, ids_file, tmp_path):
    """The refit is worth having: logits closer to the dense model's than without it."""
    model = tiny_models("llama")
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = ids_of(ids_file)
    err = {}
    for comp in (True, False):
        out = tmp_path / str(comp)
        streamprune.prune(model, out, calib=str(ids_file), structure="width", sparsity=0.5, width_compensation=comp,
                          **ARGS)
        with torch.no_grad():
            err[comp] = float((load(out)(ids).logits - dense(ids).logits).norm())
    assert err[True] < 0.8 * err[False], err


def test_magnitude_width_needs_no_data(tiny_models, tmp_path):
    model = tiny_models("llama")
    streamprune.prune(model, tmp_path / "out", method="magnitude", structure="width", sparsity=0.5,
                      width_compensation=False, progress=False, width_multiple=8)
    got = load(tmp_path / "out")
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    for layer, new in zip(ref.model.layers, got.model.layers):
        score = layer.mlp.down_proj.weight.abs().sum(0)
        kept = torch.sort(torch.sort(-score, stable=True).indices[:80]).values
        assert torch.equal(new.mlp.gate_proj.weight, layer.mlp.gate_proj.weight[kept])


def test_width_multiple(tiny_models, ids_file, tmp_path):
    s = streamprune.prune(tiny_models("llama"), tmp_path / "out", calib=str(ids_file), structure="width",
                          sparsity=0.3, **dict(ARGS, width_multiple=32))
    assert s["intermediate_size"]["after"] == 128  # 160 x 0.7 = 112 -> 128


class _Crossed(nn.Module):
    """An MLP whose producers' channels reach the consumer reversed: removing row j and column j together
    would be wrong."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj((torch.relu(self.gate_proj(x)) * self.up_proj(x)).flip(-1))


class _Block(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


def test_probe_refuses_an_mlp_that_does_not_pair_channels():
    from streamprune.errors import StreamPruneError
    from streamprune.width import WidthPruner

    torch.manual_seed(0)
    pruner = WidthPruner(16, 8, needs_data=False, compensate=False)
    with pytest.raises(StreamPruneError, match="does not pair its producers' outputs"):
        pruner.prune_block(_Block(_Crossed(8, 16)), None, 0)
    ok = _Crossed(8, 16)
    ok.forward = lambda x: ok.down_proj(torch.relu(ok.gate_proj(x)) * ok.up_proj(x))
    assert pruner.prune_block(_Block(ok), None, 0)["mlp.down_proj"] == {"zeros": 64, "numel": 128}
    assert ok.gate_proj.weight.shape == (8, 8) and ok.down_proj.weight.shape == (8, 8)


def test_resume_after_a_kill_is_byte_identical(tiny_models, ids_file, tmp_path):
    import signal

    model = tiny_models("qwen3")
    args = ["--calib", ids_file, "--nsamples", "8", "--seqlen", "32", "--structure", "width", "--sparsity", "0.4",
            "--width-multiple", "8", "--no-progress"]
    assert cli("prune", model, tmp_path / "clean", *args).returncode == 0
    res = cli("prune", model, tmp_path / "out", *args, env={"STREAMPRUNE_FAULT_AT": "block_start:2"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert not (tmp_path / "out" / INDEX).exists()
    res = cli("resume", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert published(tmp_path / "out") == published(tmp_path / "clean")


def test_two_processes(tiny_models, ids_file, tmp_path):
    """--nproc 2: the same channels, the refit from the same (summed) second moments."""
    model = tiny_models("llama")
    args = ["--calib", ids_file, "--nsamples", "8", "--seqlen", "32", "--structure", "width", "--sparsity", "0.25",
            "--width-multiple", "8", "--no-progress"]
    res = cli("prune", model, tmp_path / "two", *args, "--nproc", "2")
    assert res.returncode == 0, res.stderr
    check_against_reference(model, tmp_path / "two", ids_file, 0.25)


def test_eval_report_and_plan_on_the_output(tiny_models, ids_file, tmp_path):
    from streamprune.evaluation import evaluate
    from streamprune.reporting import report

    out = tmp_path / "out"
    streamprune.prune(tiny_models("llama"), out, calib=str(ids_file), structure="width", sparsity=0.25, **ARGS)
    ids = ids_of(ids_file)
    got = evaluate(out, ids=ids.flatten(), seqlen=32, progress=False)
    model = load(out)
    with torch.no_grad():
        nll = sum(float(model(r[None], labels=r[None]).loss) for r in ids) / len(ids)
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert report(out)["overall"] == 0.0  # no zeros: the channels are gone
    res = cli("plan", out)
    assert res.returncode == 0 and "peak" in res.stdout.lower(), res.stderr


@pytest.mark.parametrize("args, match", [
    (["--method", "sparsegpt"], "not --method sparsegpt"),
    (["--method", "magnitude"], "add --no-width-compensation"),
    (["--sparsity-profile", "owl"], "no --sparsity-profile"),
    (["--refine", "dsnot"], "no --refine"),
    (["--sparsity", "0.01"], "keeps 160, nothing to remove"),
    (["--width-multiple", "0"], "--width-multiple must be at least 1"),
    (["--dtype", "bfloat16"], "use --dtype float32"),
])
def test_refused_options(args, match, tiny_models, ids_file, tmp_path, copy_model):
    model = copy_model(tiny_models("llama"))
    expect_error(model, tmp_path / "out", "--calib", ids_file, "--nsamples", "4", "--seqlen", "16",
                 "--structure", "width", "--width-multiple", "8", *args, match=match)


def test_mixture_of_experts_is_refused(tmp_path):
    model = make_moe(tmp_path / "moe", "qwen3_moe")
    calib = write_ids(tmp_path / "ids.jsonl", 4, 16)
    expect_error(model, tmp_path / "out", "--calib", calib, "--nsamples", "4", "--seqlen", "16", "--structure",
                 "width", "--width-multiple", "8", match="Mixture-of-Experts")


def test_shrunk_config_changes_the_text_model_only(tmp_path):
    from streamprune.errors import StreamPruneError
    from streamprune.width import shrink_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"text_config": {"intermediate_size": 160, "hidden_size": 80},
                                "vision_config": {"intermediate_size": 160}}))
    out = json.loads(shrink_config(path, 160, 120))
    assert out == {"text_config": {"intermediate_size": 120, "hidden_size": 80},
                   "vision_config": {"intermediate_size": 160}}
    path.write_text(json.dumps({"intermediate_size": 160, "vision_config": {"intermediate_size": 160}}))
    assert json.loads(shrink_config(path, 160, 120)) == {"intermediate_size": 120,
                                                         "vision_config": {"intermediate_size": 160}}
    with pytest.raises(StreamPruneError, match="no intermediate_size 160"):
        path.write_text(json.dumps({"intermediate_size": 128}))
        shrink_config(path, 160, 120)
