"""Data-parallel pruning: real torchrun processes over gloo on the CPU."""

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tiny import make_checkpoint, write_ids


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def shards(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return make_checkpoint(root / "model", "llama", num_hidden_layers=4), write_ids(root / "ids.jsonl", 7, 32)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--structure", "2:4", "--refine", "dsnot"], ["--sparsity-profile", "owl"]],
                         ids=["wanda", "2:4-dsnot", "owl"])
def test_two_ranks_give_identical_output(extra, model, tmp_path):
    ckpt, calib = model  # 7 sequences: an uneven 3/4 split between the ranks
    args = ["--calib", calib, "--nsamples", "7", "--seqlen", "32", "--no-progress", *extra]
    one = cli("prune", ckpt, tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr[-2000:]
    two = cli("prune", ckpt, tmp_path / "two", *args, "--nproc", "2", "--json")
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout)["ranks"] == 2
    assert shards(tmp_path / "one") == shards(tmp_path / "two")


@pytest.mark.slow
def test_sparsegpt_two_ranks_disagreement_is_small(model, tmp_path):
    """Hessians are summed across ranks, so float32 rounding differs: count the mask entries that flip."""
    ckpt, calib = model
    args = ["--calib", calib, "--nsamples", "7", "--seqlen", "32", "--no-progress", "--method", "sparsegpt"]
    assert cli("prune", ckpt, tmp_path / "one", *args).returncode == 0
    res = cli("prune", ckpt, tmp_path / "two", *args, "--nproc", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    flipped = total = 0
    for f in sorted((tmp_path / "one").glob("*.safetensors")):
        a, b = load_file(f), load_file(tmp_path / "two" / f.name)
        for k, v in a.items():
            if v.dim() == 2 and ".layers." in k:
                flipped += int(((v == 0) != (b[k] == 0)).sum())
                total += v.numel()
                torch.testing.assert_close(v, b[k], atol=1e-4, rtol=1e-4)  # the same update, float32 rounding apart
    print(f"sparsegpt 1 vs 2 ranks: {flipped} of {total} mask entries differ")
    assert total and flipped == 0  # what the README states for this model


@pytest.mark.slow
def test_killed_rank_fails_the_job_quickly(model, tmp_path):
    ckpt, calib = model
    t = time.time()
    res = cli("prune", ckpt, tmp_path / "out", "--calib", calib, "--nsamples", "7", "--seqlen", "32", "--no-progress",
              "--nproc", "2", env={"STREAMPRUNE_FAULT_AT": "statistics:2", "STREAMPRUNE_FAULT_RANK": "1",
                                   "STREAMPRUNE_DIST_TIMEOUT": "30"}, timeout=240)
    elapsed = time.time() - t
    assert res.returncode == 1, res.returncode  # torchrun: a worker failed
    assert "did a rank die?" in res.stderr and "SIGKILL" in res.stderr
    assert elapsed < 120, elapsed
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.slow
def test_distributed_resume_is_byte_identical(model, tmp_path):
    ckpt, calib = model
    args = ["--calib", calib, "--nsamples", "7", "--seqlen", "32", "--no-progress", "--nproc", "2", "--snapshot-every", "1"]
    clean = cli("prune", ckpt, tmp_path / "clean", *args)
    assert clean.returncode == 0, clean.stderr[-2000:]
    res = cli("prune", ckpt, tmp_path / "out", *args, env={"STREAMPRUNE_FAULT_AT": "block_start:3",
                                                           "STREAMPRUNE_FAULT_RANK": "0", "STREAMPRUNE_DIST_TIMEOUT": "30"},
              timeout=240)
    assert res.returncode == 1 and "SIGKILL" in res.stderr, res.stderr[-2000:]
    state = json.loads((tmp_path / "out" / ".streamprune" / "state.json").read_text())
    assert 0 < len(state["blocks"]) < 4
    res = cli("prune", ckpt, tmp_path / "out", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "loaded the activations saved after block" in res.stderr
    assert shards(tmp_path / "clean") == shards(tmp_path / "out")
    res = cli("prune", ckpt, tmp_path / "out", *args[:-4], "--snapshot-every", "1")  # one process: another job
    assert res.returncode == 2 and "ranks: 2 -> 1" in res.stderr


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_at_a_safe_point(model, tmp_path):
    ckpt, calib = model
    args = ["--calib", calib, "--nsamples", "7", "--seqlen", "32", "--no-progress", "--nproc", "2", "--snapshot-every", "0"]
    clean = cli("prune", ckpt, tmp_path / "clean", *args)
    assert clean.returncode == 0, clean.stderr[-2000:]
    res = cli("prune", ckpt, tmp_path / "out", *args, env={"STREAMPRUNE_FAULT_AT": "propagate:5", "STREAMPRUNE_FAULT_RANK": "1",
                                                           "STREAMPRUNE_FAULT_SIGNAL": "TERM", "STREAMPRUNE_DIST_TIMEOUT": "60"},
              timeout=240)
    assert res.returncode == 1, res.returncode  # torchrun reports the workers' exit 143 as a failure
    assert "exitcode  : 143" in res.stderr and "streamprune resume" in res.stderr
    st = json.loads(cli("status", tmp_path / "out", "--json").stdout)
    assert 0 < st["blocks_done"] < 4 and st["snapshot_after_block"] == st["blocks_done"] - 1
    res = cli("resume", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-2000:]
    assert shards(tmp_path / "clean") == shards(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--structure", "2:4", "--refine", "dsnot", "--expert-min-tokens", "1000000"]],
                         ids=["wanda", "2:4-dsnot-fallback"])
def test_two_ranks_with_expert_groups_equal_one_whole(extra, tmp_path):
    """Experts streamed in groups on two ranks: each group's statistics replayed in global batch order (and the
    fallback's too), so the shards are those of one process holding whole blocks."""
    from test_groups import wide_qwen3

    ckpt, calib = wide_qwen3(tmp_path / "m"), write_ids(tmp_path / "ids.jsonl", 7, 32)
    args = ["--calib", calib, "--nsamples", "7", "--seqlen", "32", "--no-progress", *extra]
    one = cli("prune", ckpt, tmp_path / "one", *args)
    assert one.returncode == 0, one.stderr[-2000:]
    two = cli("prune", ckpt, tmp_path / "two", *args, "--nproc", "2", "--expert-group", "3", "--json")
    assert two.returncode == 0, two.stderr[-2000:]
    summary = json.loads(two.stdout)
    assert summary["ranks"] == 2 and summary["expert_group"] == 3
    assert shards(tmp_path / "one") == shards(tmp_path / "two")
