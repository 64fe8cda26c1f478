"""Crash safety: real prune processes killed with real signals at exact points, then resumed; the result is
byte-identical to an uninterrupted run. Kill points are reached with STREAMPRUNE_FAULT_AT (the process sends
itself the signal there), plus one SIGTERM sent from outside while the job runs."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from tiny import make_checkpoint, write_ids

ARGS = ["--nsamples", "8", "--seqlen", "32", "--snapshot-every", "2", "--no-progress"]


def cli(*args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def published(out):
    """sha256 of every published file (the job's own state directory aside)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_checkpoint(root / "model", "qwen3", num_hidden_layers=6)
    calib = write_ids(root / "ids.jsonl", 8, 32)
    res = cli("prune", model, root / "clean", "--calib", calib, *ARGS)
    assert res.returncode == 0, res.stderr
    return model, calib, published(root / "clean")


KILL_POINTS = [
    "block_start:1", "block_start:4", "statistics:3", "propagate:13", "mid_shard:1", "mid_shard:4",
    "rename_shard:3", "rename_state:2", "rename_state:5", "publish:1", "rename_file:1", "rename_index:1",
]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_is_byte_identical(point, setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, env={"STREAMPRUNE_FAULT_AT": point})
    assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-500:])
    assert not (out / "model.safetensors.index.json").exists(), "an interrupted job published an index"
    for f in out.glob("*.safetensors"):  # temporaries may remain; a file under its final name is complete
        with safe_open(f, "pt") as h:
            for k in h.keys():
                h.get_tensor(k)
    res = cli("resume", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert published(out) == clean
    assert not list(out.glob(".*.tmp")), "a temporary file survived the resume"


@pytest.mark.slow
def test_killed_twice_including_during_resume(setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "out"
    first = cli("prune", model, out, "--calib", calib, *ARGS, "--snapshot-every", "0",
                env={"STREAMPRUNE_FAULT_AT": "block_start:5"})
    assert first.returncode == -signal.SIGKILL
    # writes run behind the compute on one I/O thread, so how many blocks were committed when block 4 started
    # depends on timing; the read of block 3 (queued after block 1's write) bounds it below
    done = json.loads(cli("status", out, "--json").stdout)["blocks_done"]
    assert 2 <= done <= 4
    # the resume recomputes the next block's inputs through the committed blocks (8 batches each); kill it there
    second = cli("resume", out, env={"STREAMPRUNE_FAULT_AT": "recompute:10"})
    assert second.returncode == -signal.SIGKILL, second.stderr[-1000:]
    assert json.loads(cli("status", out, "--json").stdout)["blocks_done"] == done
    third = cli("prune", model, out, "--calib", calib, *ARGS, "--snapshot-every", "0")  # same args: resumes
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"resume: recomputed the inputs of block {done} through committed blocks 0-{done - 1}" in third.stderr
    assert published(out) == clean


@pytest.mark.slow
@pytest.mark.parametrize("point", ["statistics:20", "mid_shard:3", "block_start:3"])
def test_sigterm_stops_at_safe_point_and_resumes(point, setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, "--snapshot-every", "0",
              env={"STREAMPRUNE_FAULT_AT": point, "STREAMPRUNE_FAULT_SIGNAL": "TERM"})
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-1000:]
    assert "streamprune resume" in res.stderr and "Traceback" not in res.stderr
    st = json.loads(cli("status", out, "--json").stdout)
    assert not st["complete"] and st["blocks_done"] < 6
    if st["blocks_done"]:
        assert st["snapshot_after_block"] == st["blocks_done"] - 1  # the stop saved the next block's inputs
    res = cli("resume", out)
    assert res.returncode == 0, res.stderr[-2000:]
    if st["blocks_done"]:
        assert "loaded the activations saved after block" in res.stderr
    assert published(out) == clean


@pytest.mark.slow
def test_sigterm_from_outside(setup, tmp_path):
    """A SIGTERM sent by another process while the job runs: deterministic, the job is held (SIGSTOP) at the
    start of block 2 until the signal is pending, then let go."""
    model, calib, clean = setup
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streamprune", "prune", str(model), str(out), "--calib", str(calib), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, STREAMPRUNE_FAULT_AT="block_start:3", STREAMPRUNE_FAULT_SIGNAL="STOP"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if open(f"/proc/{proc.pid}/stat").read().split()[2] == "T":
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-1000:]
    assert "stopped with 2 of 6 blocks committed" in err
    res = cli("resume", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert published(out) == clean


def test_changed_arguments_are_refused(setup, tmp_path):
    model, calib, _ = setup
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, env={"STREAMPRUNE_FAULT_AT": "block_start:3"})
    assert res.returncode == -signal.SIGKILL
    before = published(out)
    res = cli("prune", model, out, "--calib", calib, *ARGS, "--sparsity", "0.6")
    assert res.returncode == 2
    assert "different inputs" in res.stderr and "sparsity: 0.5 -> 0.6" in res.stderr and "--restart" in res.stderr
    assert published(out) == before
    other = write_ids(tmp_path / "other.jsonl", 8, 32, seed=1)
    res = cli("prune", model, out, "--calib", other, *ARGS)
    assert res.returncode == 2 and "calibration_sha256" in res.stderr
    res = cli("prune", model, out, "--calib", calib, *ARGS, "--sparsity", "0.6", "--restart")
    assert res.returncode == 0, res.stderr[-1000:]
    st = json.loads(cli("status", out, "--json").stdout)
    assert st["complete"] and st["options"]["sparsity"] == 0.6


def test_completed_job_is_not_redone(setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "out"
    assert cli("prune", model, out, "--calib", calib, *ARGS).returncode == 0
    res = cli("prune", model, out, "--calib", calib, *ARGS)
    assert res.returncode == 0 and "already complete" in res.stderr
    assert published(out) == clean
    res = cli("status", out)
    assert "complete, 6/6 blocks" in res.stdout


def test_altered_committed_shard_is_redone(setup, tmp_path):
    model, calib, clean = setup
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, env={"STREAMPRUNE_FAULT_AT": "block_start:5"})
    assert res.returncode == -signal.SIGKILL
    shard = out / "model-00003-of-00007.safetensors"  # block 1
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = cli("resume", out)
    assert res.returncode == 0, res.stderr[-1000:]
    assert "altered; redoing from block 1" in res.stderr
    assert published(out) == clean
