"""Peak host memory depends on one block, not on the number of blocks."""

import json
import subprocess
import sys

import pytest

from tiny import make_checkpoint, write_ids


def peak_rss(model, out, calib):
    cmd = [sys.executable, "-m", "streamprune", "prune", str(model), str(out), "--calib", str(calib),
           "--nsamples", "4", "--seqlen", "64", "--json", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow
def test_peak_rss_flat_in_number_of_blocks(tmp_path):
    shape = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_key_value_heads=4,
                 vocab_size=512, shard_size="50MB")
    calib = write_ids(tmp_path / "ids.jsonl", 4, 64, vocab=512)
    peaks = {}
    for n in (2, 8):
        model = make_checkpoint(tmp_path / f"m{n}", "llama", num_hidden_layers=n, **shape)
        peaks[n] = peak_rss(model, tmp_path / f"out{n}", calib)
    block_bytes = peaks[2]["plan"]["block_bytes_compute"]
    growth = peaks[8]["peak_rss_bytes"] - peaks[2]["peak_rss_bytes"]
    assert peaks[8]["peak_rss_bytes"] <= 1.05 * peaks[2]["peak_rss_bytes"], (peaks[2]["peak_rss_bytes"],
                                                                              peaks[8]["peak_rss_bytes"])
    # a leak of one block per block would add 6 blocks; stay under one
    assert growth < block_bytes, (growth, block_bytes)
