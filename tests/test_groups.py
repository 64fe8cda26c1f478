"""Experts streamed through the device in groups (blocks larger than the card; groups.py): every output
tensor bit for bit the whole-block path's, for each MoE family, method, structure, layout and dtype; what it cannot
do refused before OUT is touched; the plan streams DeepSeek-V3's experts on a 24 GB card."""

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import streamprune
from streamprune import loop
from streamprune.cli import main
from test_moe import SMALL, make_moe
from tiny import quantize_fp8, tensors, write_ids

KW = dict(nsamples=8, seqlen=32, progress=False)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_ids(tmp_path_factory.mktemp("groups") / "ids.jsonl", 8, 32)


@pytest.fixture
def grouped_calls(monkeypatch):
    """How many blocks went through the grouped path."""
    calls = []
    original = loop.BlockLoop._prune_grouped

    def spy(self, *args, **kwargs):
        calls.append(args[0])
        return original(self, *args, **kwargs)
    monkeypatch.setattr(loop.BlockLoop, "_prune_grouped", spy)
    return calls


def wide_qwen3(path, dtype=torch.float32, shard=None, seed=0):
    """Qwen3-MoE with 8 experts and top-4 routing: a token's experts often fall two or more in one later group,
    so a sum of per-group partial outputs would round differently from the whole block's loop."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=32,
                                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, head_dim=16)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5) if "embed" not in name else p.normal_(0, 1.0)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def same_as_whole(model, tmp_path, calib, group, **kw):
    whole = streamprune.prune(model, tmp_path / "whole", calib=str(calib), **KW, **kw)
    grouped = streamprune.prune(model, tmp_path / f"g{group}", calib=str(calib), expert_group=group, **KW, **kw)
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / f"g{group}")
    assert set(a) == set(b)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))]
    assert not bad, f"grouped output differs from the whole block's: {bad[:4]}"
    assert grouped["expert_group"] == group and whole["expert_group"] == 0
    for key in ("sparsity", "experts", "experts_fallback", "block_sparsity"):
        assert grouped[key] == whole[key], key
    return whole, grouped


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_groups_equal_the_whole_block(family, calib, tmp_path, grouped_calls):
    model = make_moe(tmp_path / family, family)
    whole, _ = same_as_whole(model, tmp_path, calib, 3, expert_min_tokens=1)
    moe_blocks = 1 if family == "deepseek_v3" else 2  # its first block is dense
    assert len(grouped_calls) == moe_blocks and whole["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("group", [1, 3, 5])
def test_groups_keep_the_expert_loop_order(group, calib, tmp_path, grouped_calls):
    """Top-4 of 8: bit-exact only because each group's loop continues the previous groups' output buffer (adding
    per-group sums rounds differently; SparseGPT's updated weights in the next block show any changed bit)."""
    same_as_whole(wide_qwen3(tmp_path / "m"), tmp_path, calib, group, expert_min_tokens=1, method="sparsegpt")
    assert grouped_calls


@pytest.mark.parametrize("options", [
    dict(structure="2:4"), dict(method="magnitude"), dict(method="ria"), dict(refine="dsnot"),
    dict(method="sparsegpt"), dict(expert_min_tokens=10 ** 6),  # every expert takes the all-tokens fallback
    dict(dtype="bfloat16"),  # float32 checkpoint, narrower compute: originals kept and masked
])
def test_groups_equal_for_methods_and_dtypes(options, calib, tmp_path, grouped_calls):
    whole, _ = same_as_whole(wide_qwen3(tmp_path / "m"), tmp_path, calib, 3, **options)
    assert grouped_calls
    if "expert_min_tokens" in options:
        assert whole["experts_fallback"] == whole["experts"] == 16


def test_groups_on_bf16_and_fused_layouts(calib, tmp_path):
    same_as_whole(wide_qwen3(tmp_path / "bf16", dtype=torch.bfloat16), tmp_path / "a", calib, 3)
    same_as_whole(make_moe(tmp_path / "fused", "qwen3_moe", fused=True), tmp_path / "b", calib, 3)


def test_groups_on_fp8_experts(calib, tmp_path):
    """DeepSeek-V3's release format: one FP8 tensor per expert with its block scales, re-encoded per group."""
    src = wide_qwen3(tmp_path / "src", shard="200KB")
    fp8 = quantize_fp8(src, tmp_path / "fp8", block=(16, 16))
    _, g = same_as_whole(fp8, tmp_path, calib, 3)
    assert tensors(tmp_path / "g3")["model.layers.0.mlp.experts.5.up_proj.weight"].dtype == torch.float8_e4m3fn


def test_groups_resume_after_sigkill_is_byte_identical(calib, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    model = wide_qwen3(tmp_path / "m")
    streamprune.prune(model, tmp_path / "ref", calib=str(calib), expert_group=3, **KW)
    args = [sys.executable, "-m", "streamprune", "prune", str(model), str(tmp_path / "out"), "--calib", str(calib),
            "--nsamples", "8", "--seqlen", "32", "--expert-group", "3", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # killed in block 1's propagation, between its expert groups' passes (block 0 had 8 propagate batches)
    killed = subprocess.run(args, env=dict(env, STREAMPRUNE_FAULT_AT="propagate:12"), capture_output=True, cwd=REPO)
    assert killed.returncode == -9, killed.stderr
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    a, b = tensors(tmp_path / "ref"), tensors(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_what_groups_do_not_do_is_refused_before_out(calib, tmp_path):
    gpt = make_moe(tmp_path / "gpt_oss", "gpt_oss")  # its expert loop cannot skip experts outside a group
    res = CliRunner().invoke(main, ["prune", str(gpt), str(tmp_path / "o1"), "--calib", str(calib), "--nsamples", "8",
                                    "--seqlen", "32", "--expert-group", "2", "--no-progress"])
    assert res.exit_code == 2 and "cannot be run one group at a time" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o1").exists()
    from streamprune import evaluation as ev
    from streamprune.errors import StreamPruneError

    def no_capture(*a, **k):
        raise AssertionError("the eval ran before its probe refused")
    with pytest.MonkeyPatch.context() as mp, \
            pytest.raises(StreamPruneError, match="cannot be run one group at a time"):  # probed as prune is
        mp.setattr(ev._Evaluator, "capture_inputs", no_capture)
        ev.evaluate(gpt, ids=torch.arange(64) % 100, seqlen=32, progress=False, expert_group=2)
    qwen = make_moe(tmp_path / "qwen", "qwen3_moe")
    res = CliRunner().invoke(main, ["prune", str(qwen), str(tmp_path / "o2"), "--calib", str(calib), "--nsamples", "8",
                                    "--seqlen", "32", "--expert-group", "2", "--sparsity-profile", "owl",
                                    "--no-progress"])
    assert res.exit_code == 2 and "not supported with --sparsity-profile owl" in res.output
    assert not (tmp_path / "o2").exists()
    res = CliRunner().invoke(main, ["prune", str(qwen), str(tmp_path / "o3"), "--expert-group", "-1"])
    assert res.exit_code == 2 and "--expert-group" in res.output


def test_dense_models_ignore_expert_group(tiny_models, ids_file, tmp_path):
    model = tiny_models("llama")
    a = streamprune.prune(model, tmp_path / "a", calib=str(ids_file), **KW)
    b = streamprune.prune(model, tmp_path / "b", calib=str(ids_file), expert_group=2, **KW)
    ta, tb = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(torch.equal(ta[k], tb[k]) for k in ta) and a["sparsity"] == b["sparsity"]


def test_skeleton_of_experts_larger_than_the_host(tmp_path):
    """DeepSeek-V3's experts tensor is 28 GiB in float32: the meta skeleton is built without allocating it (the
    kernel refuses an allocation larger than this 24 GB machine before it could be moved to meta), and its
    non-persistent buffers are still real."""
    from transformers import AutoConfig

    from conftest import FIXTURES
    from streamprune.model import build_skeleton

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "config.json").write_text((FIXTURES / "configs" / "deepseek-v3.json").read_text())
    model = build_skeleton(AutoConfig.from_pretrained(tmp_path / "ds"), dtype=torch.float32)
    experts = model.model.layers[3].mlp.experts
    assert experts.gate_up_proj.device.type == "meta" and experts.gate_up_proj.numel() > 7e9
    assert all(b.device.type == "cpu" for b in model.buffers())


@pytest.mark.parametrize("family", ["wide_qwen3", "deepseek_v3"])
def test_streamed_eval_with_expert_groups_is_the_whole_blocks(family, tmp_path):
    """`eval --expert-group`: the same losses to the bit as whole blocks, and the in-memory model's perplexity."""
    import math

    from streamprune.evaluation import evaluate

    model = wide_qwen3(tmp_path / "m") if family == "wide_qwen3" else make_moe(tmp_path / "m", family)
    ids = torch.randint(0, 256, (4 * 32,), generator=torch.Generator().manual_seed(1))
    whole = evaluate(model, ids=ids, seqlen=32, progress=False)
    grouped = evaluate(model, ids=ids, seqlen=32, progress=False, expert_group=3)
    assert grouped["nll"] == whole["nll"]
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():
        nll = sum(float(ref(w[None], labels=w[None]).loss) for w in ids.view(4, 32)) / 4
    assert math.isclose(grouped["nll"], nll, rel_tol=1e-5)
    res = CliRunner().invoke(main, ["eval", str(model), "--text", str(tmp_path / "none.txt"), "--expert-group", "-1"])
    assert res.exit_code == 2 and "--expert-group" in res.output


def test_groups_of_a_weight_updating_method_on_a_narrower_checkpoint_are_another_job(calib, tmp_path):
    """SparseGPT on a bf16 checkpoint computed in float32: grouped, its experts propagate through the bf16 weights
    as written, whole blocks through their float32 values. The outputs differ, so OUT from one is not resumed or
    completed by the other; Wanda's are the same job either way."""
    model = wide_qwen3(tmp_path / "m", dtype=torch.bfloat16)
    args = ["prune", str(model), str(tmp_path / "out"), "--calib", str(calib), "--nsamples", "8", "--seqlen", "32",
            "--no-progress"]
    assert CliRunner().invoke(main, args + ["--method", "sparsegpt", "--expert-group", "3"]).exit_code == 0
    res = CliRunner().invoke(main, args + ["--method", "sparsegpt"])
    assert res.exit_code == 2 and "experts_propagate_as_written" in res.output
    args[2] = str(tmp_path / "wanda")
    assert CliRunner().invoke(main, args + ["--expert-group", "3"]).exit_code == 0
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "already complete" in res.output


def test_routing_index_must_be_unambiguous():
    from streamprune.errors import StreamPruneError
    from streamprune.groups import in_group

    x, idx = torch.zeros(4, 8), torch.tensor([[0, 5], [1, 2], [7, 3], [4, 4]])
    (got, index, w), _ = in_group((x, idx, torch.ones(4, 2)), {}, (2, 5), 8)
    assert index.tolist() == [[8, 8], [8, 0], [8, 1], [2, 2]] and got is x
    with pytest.raises(StreamPruneError, match="2 integer"):
        in_group((x, idx, idx.clone()), {}, (0, 2), 8)
    with pytest.raises(StreamPruneError, match="0 integer"):
        in_group((x, idx.t()), {}, (0, 2), 8)
