"""The memory planner: config.json alone in, bytes out; and the tier choice it makes for prune."""

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import SHARED
from streamprune.cli import main
from streamprune.plan import plan_for
from streamprune.units import GiB, parse_size

CONFIGS = SHARED / "data" / "configs"


@pytest.fixture
def config_dir(tmp_path):
    def make(name):
        src = CONFIGS / f"{name}.json"
        if not src.is_file():
            pytest.skip(f"{src} not found")
        (tmp_path / name).mkdir(exist_ok=True)
        shutil.copy(src, tmp_path / name / "config.json")
        return tmp_path / name
    return make


def test_parse_size():
    assert parse_size("24GB") == 24 * GiB and parse_size("512MiB") == 512 * 1024 ** 2 and parse_size(None) is None
    with pytest.raises(Exception, match="not a memory size"):
        parse_size("lots")


def test_llama2_70b_fits_24gb_with_activations_on_gpu(config_dir):
    r = plan_for(config_dir("llama-2-70b"), gpu_memory="24GB", host_memory="64GB")
    p = r["plan"]
    assert r["blocks"] == 80 and r["largest_linear"] == [8192, 28672]  # down_proj: the widest input
    assert p["block_bytes_checkpoint"] == r["block_params"] * 2
    assert p["activation_buffer_bytes"] == 128 * 2048 * 8192 * 2
    assert p["tier"] == "gpu" and p["fits"] and p["peak_gpu_bytes"] < 24 * GiB
    assert r["cards"]["8GB"]["tier"] == "cpu" and r["cards"]["8GB"]["fits"]


def test_405b_needs_host_activations_and_does_not_fit_8gb(config_dir):
    r = plan_for(config_dir("llama-3.1-405b"), gpu_memory="24GB", host_memory="64GB")
    assert r["plan"]["tier"] == "cpu" and r["plan"]["fits"]
    assert 6e9 < r["plan"]["block_bytes_checkpoint"] < 7e9
    assert not r["cards"]["8GB"]["fits"]
    small_host = plan_for(config_dir("llama-3.1-405b"), gpu_memory="24GB", host_memory="24GB")
    assert small_host["plan"]["tier"] == "disk"


def test_more_ranks_shrink_the_activations(config_dir):
    one = plan_for(config_dir("qwen2.5-72b"), gpu_memory="24GB", host_memory="64GB")
    four = plan_for(config_dir("qwen2.5-72b"), gpu_memory="24GB", host_memory="64GB", ranks=4)
    assert four["plan"]["activation_buffer_bytes"] * 4 == one["plan"]["activation_buffer_bytes"]


def test_cli_plan_text_and_json(config_dir):
    d = config_dir("llama-3.1-70b")
    res = CliRunner().invoke(main, ["plan", str(d), "--gpu-memory", "24GB", "--host-memory", "64GB"])
    assert res.exit_code == 0, res.output
    assert "predicted peak GPU memory" in res.output and "24GB: fits" in res.output
    res = CliRunner().invoke(main, ["plan", str(d), "--json"])
    assert json.loads(res.output)["device"] == "cpu"


def test_prune_uses_the_plan(tiny_models, ids_file, tmp_path):
    """In its own process (peak RSS is per process): the tier comes from the plan, the prediction is close."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "streamprune", "prune", str(tiny_models("llama")), str(tmp_path / "out"),
                          "--calib", str(ids_file), "--nsamples", "8", "--seqlen", "32", "--json", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["activations"] == "cpu" and s["plan"]["tier"] == "cpu"
    predicted, measured = s["plan"]["peak_host_bytes"], s["peak_rss_bytes"]
    assert 0.5 < predicted / measured < 1.5, (predicted, measured)  # a tiny model: the interpreter dominates
