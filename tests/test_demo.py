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
                         cwd=cwd, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, STREAMPRUNE_CACHE=str(cache), TOKENIZERS_PARALLELISM="false"))
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
