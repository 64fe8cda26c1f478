"""`streamprune demo` on the real SmolLM2-135M build: calibration text that ships with Python (nothing generated),
everything written under the cache directory, and its progress readable in a log."""

import json
import os
import subprocess
import sys


def test_demo_writes_under_the_cache_and_logs_plain_progress(smollm2, tmp_path):
    cache, cwd = tmp_path / "cache", tmp_path / "cwd"
    cache.mkdir()
    cwd.mkdir()
    (cache / "smollm2-135m").symlink_to(smollm2)  # the built model, so the demo does not build it again
    res = subprocess.run([sys.executable, "-m", "streamprune", "demo", "--nsamples", "2", "--seqlen", "32", "--json"],
                         cwd=cwd, capture_output=True, timeout=900,  # bytes: text mode turns '\r' into '\n'
                         env=dict(os.environ, STREAMPRUNE_CACHE=str(cache), TOKENIZERS_PARALLELISM="false"))
    res = subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())
    assert res.returncode == 0, res.stderr
    assert list(cwd.iterdir()) == []  # nothing in the current directory
    s = json.loads(res.stdout)
    assert s["out"] == str(cache / "demo-out") and (cache / "demo-out" / "model.safetensors.index.json").is_file()
    assert s["calib"] == str(cache / "calib-python-help-topics.txt")
    assert s["sparsity"] == 0.5 and s["pruned_nonzero"] < s["dense_nonzero"]
    # a log: steps and one line per block, no carriage returns or cursor movements (transformers' bars included)
    assert "\r" not in res.stderr and "\x1b[" not in res.stderr, repr(res.stderr[:400])
    lines = res.stderr.splitlines()
    for step in range(1, 6):
        assert any(line.startswith(f"[{step}/5] ") for line in lines), res.stderr
    assert any(line.startswith("blocks: 30/30 blocks") for line in lines), res.stderr


def test_demo_refuses_an_out_that_is_not_its_own(tiny_models, ids_file, tmp_path):
    """--out that holds anything but an earlier demo (files, another prune job) is refused before anything runs,
    and left as it was."""
    import streamprune
    from test_bad_input import cli

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    job = tmp_path / "job"
    streamprune.prune(tiny_models("llama"), job, calib=str(ids_file), nsamples=2, seqlen=16, progress=False)
    before = sorted(p.name for p in job.iterdir())
    for out in (foreign, job, foreign / "notes.txt"):
        res = cli("demo", "--out", out, env={"STREAMPRUNE_CACHE": str(tmp_path / "cache")})
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip() == f"streamprune: error: --out {out}: exists and is not an earlier demo's output; " \
                                     f"choose a new or empty directory"
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in job.iterdir()) == before
    assert not (tmp_path / "cache").exists()


def test_model_build_logs_no_bars(smollm2, tmp_path):
    """The first run's build (GGUF conversion included) writes no carriage returns into a log."""
    code = ("from pathlib import Path; from streamprune.demo import build_smollm2, quiet_transformers_bars\n"
            f"with quiet_transformers_bars(): build_smollm2(Path({str(tmp_path / 'model')!r}), force=True)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=900)  # bytes: see above
    stderr = res.stderr.decode()
    assert res.returncode == 0, stderr
    assert "\r" not in stderr and "\x1b[" not in stderr, repr(stderr[:400])
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
