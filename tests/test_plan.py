"""The memory planner: config.json alone in, bytes out; and the tier choice it makes for prune."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import FIXTURES
from streamprune.cli import main
from streamprune.planner import plan_for
from streamprune.units import GiB, parse_size

CONFIGS = FIXTURES / "configs"


@pytest.fixture
def config_dir(tmp_path):
    def make(name):
        src = CONFIGS / f"{name}.json"
        assert src.is_file(), f"{src}: the large-model configs are fixtures of the repository"
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


def test_cli_plan_counts_the_refinement_as_prune_does(tmp_path):
    """`plan --refine dsnot` plans the workspace the prune job plans for itself (DSnoT's row chunk takes more than
    RIA's score); before, `plan` had no --refine and planned RIA alone. A refinement of a method it does not
    refine is refused as prune refuses it."""
    from tiny import make_checkpoint, write_ids

    model = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=1, hidden_size=256, intermediate_size=1024,
                            vocab_size=512)
    calib = write_ids(tmp_path / "ids.jsonl", 4, 32, vocab=512)
    common = ["--nsamples", "4", "--seqlen", "32", "--method", "ria", "--json"]
    planned = {}
    for refine in ([], ["--refine", "dsnot"]):
        res = CliRunner().invoke(main, ["plan", str(model), *common, *refine])
        assert res.exit_code == 0, res.output
        planned[bool(refine)] = json.loads(res.output)["plan"]["workspace_bytes"]
    res = CliRunner().invoke(main, ["prune", str(model), str(tmp_path / "out"), "--calib", str(calib), "--no-progress",
                                    *common, "--refine", "dsnot"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["plan"]["workspace_bytes"] == planned[True] > planned[False]
    res = CliRunner().invoke(main, ["plan", str(model), "--method", "sparsegpt", "--refine", "dsnot"])
    assert res.exit_code == 2 and "refines a wanda or ria mask" in res.output
    res = CliRunner().invoke(main, ["plan", str(model), "--method", "ria", "--refine", "nope"])
    assert res.exit_code == 2 and "--refine 'nope': choose dsnot" in res.output  # the registry's names


def prune_json(model, out, calib, env=None):
    """A prune in its own process (peak RSS is per process): its --json summary."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "streamprune", "prune", str(model), str(out), "--calib", str(calib),
                          "--nsamples", "4", "--seqlen", "64", "--json", "--no-progress"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow
def test_prune_uses_the_plan_and_its_block_terms_are_right(tmp_path):
    """The tier comes from the plan, and what the plan adds per byte of block is what the process uses: the
    difference between two model widths (the interpreter's constant cancels) within 10% of the predicted one;
    and the plan's peak is not below what a process with malloc as users run it takes.

    Both processes run with malloc's mmap threshold fixed. By default glibc raises it to the largest chunk freed
    (up to 32 MiB): the narrower model's workspace temporaries (9 MiB) then come from the heap, whose freed pages
    stay resident, while the wider one's (36 MiB) get mappings of their own that go back at once. That added
    20-30 MiB to the narrower peak alone and took the measured difference 14% under the plan's, run to run
    (CI failed on it). With the threshold fixed both widths allocate alike: 245.1-245.9 MiB measured over four
    runs of each, against 258 MiB planned (the selection's 15 B per element rounds up its measured 14.4).
    The default-malloc peak is 90 MiB higher in a venv fresh from install than in an older one (torch's library
    pages in the page cache): what `plan.PROCESS_BASE` must cover."""
    from tiny import make_checkpoint, write_ids

    calib = write_ids(tmp_path / "ids.jsonl", 4, 64, vocab=512)
    runs = {}
    for hidden in (768, 1536):
        model = make_checkpoint(tmp_path / f"m{hidden}", "llama", num_hidden_layers=2, hidden_size=hidden,
                                intermediate_size=4 * hidden, num_attention_heads=12, num_key_value_heads=4,
                                vocab_size=512, dtype=torch.bfloat16, shard_size="500MB")
        runs[hidden] = prune_json(model, tmp_path / f"out{hidden}", calib, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
        assert runs[hidden]["activations"] == runs[hidden]["plan"]["tier"] == "cpu"
        default = prune_json(model, tmp_path / f"default{hidden}", calib)  # 462-558 / 696-785 MiB against 637 / 895
        assert default["peak_rss_bytes"] <= default["plan"]["peak_host_bytes"]
    predicted = runs[1536]["plan"]["peak_host_bytes"] - runs[768]["plan"]["peak_host_bytes"]
    measured = runs[1536]["peak_rss_bytes"] - runs[768]["peak_rss_bytes"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_readme_plan_figures(config_dir):
    """The numbers docs/memory.md quotes for Llama-2-70B and Llama-3.1-405B on a 24 GB card, and docs/moe-fp8.md for
    the MoE models, are the plan's."""
    docs = FIXTURES.parents[1] / "docs"
    page = " ".join((docs / "memory.md").read_text().split())
    r70 = plan_for(config_dir("llama-2-70b"), gpu_memory="24GB", host_memory="64GB")["plan"]
    r405 = plan_for(config_dir("llama-3.1-405b"), gpu_memory="24GB", host_memory="64GB")["plan"]
    for text in (f"one block is {r70['block_bytes_checkpoint'] / GiB:.1f} GiB",
                 f"the two activation buffers {2 * r70['activation_buffer_bytes'] / GiB:.0f} GiB",
                 f"predicted peak GPU {r70['peak_gpu_bytes'] / GiB:.1f} GiB",
                 f"about {r70['peak_host_bytes'] / GiB:.1f} GiB of host memory",
                 f"predicted peak GPU {r405['peak_gpu_bytes'] / GiB:.1f} GiB, host {r405['peak_host_bytes'] / GiB:.0f} GiB"):
        assert text in page, text
    page = " ".join((docs / "moe-fp8.md").read_text().split())
    moe = {name: plan_for(config_dir(name), gpu_memory="24GB", host_memory="64GB")["plan"]["peak_gpu_bytes"] / GiB
           for name in ("qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x22b", "gpt-oss-120b")}
    assert (f"Qwen3-30B-A3B peaks at {moe['qwen3-30b-a3b']:.1f} GiB GPU, Qwen3-235B-A22B {moe['qwen3-235b-a22b']:.1f}, "
            f"Mixtral-8x22B {moe['mixtral-8x22b']:.1f}, gpt-oss-120b {moe['gpt-oss-120b']:.1f}") in page
    r = plan_for(config_dir("deepseek-v3"), gpu_memory="24GB", host_memory="64GB")
    ds = r["plan"]
    assert f"larger than the card: {r['block_params'] * 2 / GiB:.1f} GiB in bf16" in page
    assert (f"streams {ds['expert_group']} of {r['experts']} experts at a time, predicted peak GPU "
            f"{ds['peak_gpu_bytes'] / GiB:.1f} GiB, host {ds['peak_host_bytes'] / GiB:.1f} GiB") in page


def test_moe_blocks_are_planned_with_their_experts(config_dir):
    """Qwen3-30B-A3B: a block is its attention, its router and all 128 experts (every expert is pruned, so every
    expert's matrix is in memory and has its own statistics)."""
    r = plan_for(config_dir("qwen3-30b-a3b"), gpu_memory="24GB", host_memory="64GB", method="sparsegpt")
    h, e, i, q, kv = 2048, 128, 768, 32 * 128, 4 * 128
    attention = h * q + 2 * h * kv + q * h + 2 * 128 + 2 * h   # q/k/v/o, q/k norms, the two layer norms
    assert r["block_params"] == attention + e * h + e * 3 * h * i   # + the router and gate/up/down of each expert
    assert r["largest_linear"] == [h, q] and r["plan"]["fits"]   # o_proj: of the same size, the widest input
    # Hessians: q/k/v share one (2048), o_proj one (4096), each expert one for gate/up (2048) and one for down (768)
    assert r["plan"]["statistics_bytes"] == (h * h + q * q + e * (h * h + i * i)) * 4


def test_deepseek_v3_is_planned_from_its_largest_block_in_fp8(config_dir):
    """DeepSeek-V3: the first three blocks are dense, the other 58 carry 256 experts; its release stores them in
    FP8. The plan is the largest block's, at one byte per stored weight. A whole block (21 GiB in bf16) does not
    fit a 24 GB card: its experts are streamed in the largest even groups that fit, on every card from 8 GB."""
    r = plan_for(config_dir("deepseek-v3"), gpu_memory="24GB", host_memory="512GB")
    assert r["blocks"] == 61 and r["checkpoint_dtype"] == "float8_e4m3fn" and r["compute_dtype"] == "bfloat16"
    assert 11e9 < r["block_params"] < 12e9   # 256 x 3 x 7168 x 2048 expert weights and the shared expert
    assert r["plan"]["block_bytes_checkpoint"] == r["block_params"] and r["experts"] == 256
    p = r["plan"]
    assert p["fits"] and p["peak_gpu_bytes"] <= 24 * GiB and 256 % p["expert_group"] == 0 < p["expert_group"] < 256
    per_expert = 3 * 7168 * 2048
    assert p["block_bytes_compute"] == 2 * (r["block_params"] - (256 - p["expert_group"]) * per_expert)
    assert all(card["fits"] and card["expert_group"] for card in r["cards"].values())
    groups = [r["cards"][c]["expert_group"] for c in ("8GB", "12GB", "16GB")]
    assert groups == sorted(groups) and groups[0] < groups[-1]  # a larger card, larger groups
    whole = plan_for(config_dir("deepseek-v3"), gpu_memory="80GB", host_memory="512GB")["plan"]
    assert whole["fits"] and whole["expert_group"] == 0
    cpu = plan_for(config_dir("deepseek-v3"), host_memory="512GB")
    assert cpu["plan"]["fits"] and cpu["plan"]["block_bytes_compute"] == 4 * r["block_params"]
    res = CliRunner().invoke(main, ["plan", str(config_dir("deepseek-v3")), "--gpu-memory", "24GB",
                                    "--host-memory", "512GB"])
    assert res.exit_code == 0 and f"experts streamed through the device {p['expert_group']} of 256" in res.output


def test_expert_groups_shrink_to_the_card(config_dir):
    """The grouped plan's peaks grow with the group; the chosen group is the largest even one under the limit,
    and a card too small even for one expert is refused with the reason."""
    from streamprune.planner import BlockShape, make_plan

    shape = BlockShape(params=200 * 2 ** 20 + 64 * 8 * 2 ** 20, largest_linear=(4096, 2048), hidden=2048,
                       intermediate=4096, heads=16, kv_heads=4, head_dim=128, stat_inputs=(2048,) * 2 + (2048, 1024) * 64,
                       experts=64, expert_params=8 * 2 ** 20, expert_inputs=(2048, 1024))
    args = dict(nsamples=8, seqlen=512, batch=1, ckpt_itemsize=2, compute_itemsize=2, device_type="cuda",
                tier="auto", host_free=256 * GiB, checkpoint_bytes=10 * GiB)
    peaks = [make_plan(shape, gpu_free=64 * GiB, expert_group=g, **args).peak_gpu_bytes for g in (1, 2, 8, 32)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    assert make_plan(shape, gpu_free=3 * GiB, **args).expert_group == 0  # the whole block fits: no groups
    auto = make_plan(shape, gpu_free=int(1.5 * GiB), **args)
    assert auto.fits and auto.peak_gpu_bytes <= 1.5 * GiB and 64 % auto.expert_group == 0 < auto.expert_group
    bigger = make_plan(shape, gpu_free=int(1.5 * GiB), expert_group=auto.expert_group * 2, **args)
    assert not bigger.fits
    tiny = make_plan(shape, gpu_free=GiB, **args)
    assert not tiny.fits and "even with one expert at a time" in tiny.reason


def test_admm_is_planned_as_sparsegpt(config_dir):
    """ADMM keeps the same statistics as SparseGPT (one Hessian per distinct input); each has its own measured
    workspace (test_method_workspace_is_what_the_prune_takes), above Wanda's: the factorization of the down
    projection's 28672 x 28672 Hessian."""
    args = dict(gpu_memory="24GB", host_memory="64GB")
    admm = plan_for(config_dir("llama-2-70b"), method="admm", **args)["plan"]
    sgpt = plan_for(config_dir("llama-2-70b"), method="sparsegpt", **args)["plan"]
    wanda = plan_for(config_dir("llama-2-70b"), **args)["plan"]
    assert admm["statistics_bytes"] == sgpt["statistics_bytes"] > 0 == wanda["statistics_bytes"]
    assert min(admm["workspace_bytes"], sgpt["workspace_bytes"]) > 2 * 28672 ** 2 * 4 > wanda["workspace_bytes"]
    assert sgpt["fits"] and admm["fits"] and sgpt["peak_gpu_bytes"] <= 24 * GiB


PRUNE_PEAK = """
import sys, torch
from streamprune.methods import method_named
from streamprune.methods.admm import ADMM
from streamprune.methods.base import Pruner
from streamprune.methods.dsnot import DSnoT
from streamprune.methods.base import Structure
from streamprune.planner import row_chunk
from streamprune.statistics import HessianStats

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

name, out, inp, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
name, _, refine = name.partition("+")
torch.manual_seed(0)
H = None
if name in ("sparsegpt", "admm"):
    x = torch.randn(2 * inp, inp)
    H = x.t() @ x / x.shape[0]
    del x
w = torch.randn(out, inp).to(dtype)
method = method_named(name) if name != "admm" else ADMM(iters=2, gradual=1)  # the same buffers as 20 iterations
if refine:  # RIA's mask, then DSnoT's refinement
    method = Pruner(method, DSnoT())

class Stats:  # what the block loop hands the method: the Hessian, whose memory the last user may reuse
    hessian, last_use = HessianStats.__new__(HessianStats), True
Stats.hessian.H, Stats.sq_norm = H, H.diagonal().clone() if H is not None else torch.rand(inp) + 0.1
Stats.moments = type("Moments", (), dict(sum_mean=torch.randn(inp) * 10, var=torch.rand(inp) + 0.1))
chunk = min(out, row_chunk(inp))
open("/proc/self/clear_refs", "w").write("5")  # reset the kernel's high-water mark
base = status("VmRSS")
method.prune(w, Stats, 0.5, Structure(), chunk)
print(status("VmHWM") - base, method.workspace_bytes(out, inp, w.element_size(), chunk))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("method,out,inp,dtype", [
    ("sparsegpt", 1024, 6144, "float32"), ("sparsegpt", 3072, 3072, "bfloat16"),
    ("admm", 1024, 6144, "float32"), ("admm", 3072, 3072, "bfloat16"), ("wanda", 3072, 3072, "float32"),
    ("ria", 4096, 11008, "float32"), ("ria+dsnot", 4096, 11008, "float32")])
def test_method_workspace_is_what_the_prune_takes(method, out, inp, dtype):
    """The plan's workspace of one matrix against the peak RSS its prune adds, in a process of its own: at least
    what is used less malloc's noise (10%) and at most 30% above it, in one of three fresh processes: the same
    case's peak is bimodal between runs (glibc's dynamic mmap threshold puts freed temporaries on the heap or
    not; with it fixed five runs agree to 0.2%), which no single figure brackets tightly. The factorizations of
    SparseGPT and ADMM (2-3 in x in float32) were left out before: 30% of the peak of the 1024 x 6144 cases. DSnoT's row chunk took 3.4x the plan before its own bytes per element
    sized it; RIA's score took 7% more than a selection."""
    import subprocess
    import sys

    from conftest import REPO

    seen = []
    for _ in range(3):  # the same prune's peak is bimodal from run to run (up to 28% apart in bf16): a fresh process
        res = subprocess.run([sys.executable, "-c", PRUNE_PEAK, method, str(out), str(inp), dtype], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert res.returncode == 0, res.stderr
        measured, planned = (int(v) for v in res.stdout.split())
        seen.append(round(measured / 2 ** 20))
        if 0.9 * measured <= planned <= 1.3 * measured:
            return
    pytest.fail(f"planned {planned / 2 ** 20:.0f} MiB; three prunes measured {seen} MiB")


def test_plan_memory_sizes_name_their_unit(config_dir):
    """`--gpu-memory 24` is 24 GB, not 24 bytes; prune's name `--gpu-memory-limit` works too; a size that is not
    one is one line naming the option."""
    d = str(config_dir("llama-2-70b"))
    outs = [CliRunner().invoke(main, ["plan", d, flag, size, "--host-memory", "64", "--json"])
            for flag, size in (("--gpu-memory", "24"), ("--gpu-memory", "24GB"), ("--gpu-memory-limit", "24GB"))]
    assert all(r.exit_code == 0 for r in outs), [r.output for r in outs]
    plans = [json.loads(r.output) for r in outs]
    assert plans[0] == plans[1] == plans[2] and plans[0]["gpu_memory"] == 24 * GiB and plans[0]["plan"]["fits"]
    assert plans[0]["host_memory"] == 64 * GiB
    res = CliRunner().invoke(main, ["plan", d, "--gpu-memory", "lots"])
    assert res.exit_code == 2 and res.stderr.strip() == ("streamprune: error: --gpu-memory-limit 'lots': not a memory "
                                                        "size (e.g. 24GB, 512MiB; a bare number is GB)"), res.stderr


def test_plan_of_a_small_model_counts_its_parameters(tiny_models):
    res = CliRunner().invoke(main, ["plan", str(tiny_models("llama")), "--nsamples", "8", "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    first = res.output.splitlines()[0]
    assert "0.00B" not in first and "blocks of 57.8K parameters" in first, first


def test_plan_takes_prunes_options_and_plans_what_prune_runs(tiny_models, ids_file, tmp_path):
    """plan has prune's options that change memory (--structure width: the refit's statistics) or are refused by
    prune (an N:M that does not divide the linears), declared once; its plan is the one the prune job makes."""
    model = str(tiny_models("llama"))
    common = ["--nsamples", "8", "--seqlen", "32", "--structure", "width", "--sparsity", "0.25", "--width-multiple", "8",
              "--json"]  # the tiny model's 160 channels hold no multiple of the default 256
    res = CliRunner().invoke(main, ["plan", model, *common])
    assert res.exit_code == 0, res.output
    planned = json.loads(res.output)
    assert planned["structure"] == "width" and planned["plan"]["statistics_bytes"] == 3 * 160 * 160 * 4
    unstructured = json.loads(CliRunner().invoke(main, ["plan", model, *common[:4], "--json"]).output)
    assert unstructured["plan"]["statistics_bytes"] == 0
    res = CliRunner().invoke(main, ["prune", model, str(tmp_path / "out"), "--calib", str(ids_file), "--no-progress",
                                    *common])
    assert res.exit_code == 0, res.output
    ran = json.loads(res.stdout)["plan"]
    same = ("block_bytes_checkpoint", "block_bytes_compute", "activation_buffer_bytes", "forward_transient_bytes",
            "workspace_bytes", "statistics_bytes", "row_chunk", "tier", "disk_bytes")
    assert {k: ran[k] for k in same} == {k: planned["plan"][k] for k in same}
    res = CliRunner().invoke(main, ["plan", model, "--structure", "3:7"])
    assert res.exit_code == 2 and "not divisible by M=7" in res.stderr, res.output


def test_time_estimate_counts_the_jobs_work():
    """The time model (timing.py) over fixed rates: forwards scale with the tokens and the passes, ranks split the
    tokens, SparseGPT and ADMM add their Hessians and factorizations, magnitude runs no forward."""
    from streamprune.methods import method_named
    from streamprune.methods.base import Pruner, Structure
    from streamprune.planner import BlockShape
    from streamprune.spec import PruneOptions
    from streamprune.timing import Rates, elementwise_per_token, estimate, forward_flops

    shape = BlockShape(params=1000, largest_linear=(20, 10), hidden=10, intermediate=20, heads=2, kv_heads=2,
                       head_dim=5, stat_inputs=(10, 20), linear_shapes=((20, 10), (10, 20)),
                       all_linear_shapes=((20, 10), (20, 10), (10, 20)), ops_per_forward=7)
    rates = Rates(matmul=1e6, select={10: 1e5, 20: 1e5}, step=1e-3)

    def est(method="wanda", nsamples=4, ranks=1, passes=2):
        pruner = Pruner(method_named(method, PruneOptions()))
        return estimate(shape, 3, nsamples=nsamples, seqlen=8, batch=1, ranks=ranks, pruner=pruner, passes=passes,
                        needs=pruner.needs, rates=rates, structure=Structure(), sparsity=0.5)

    w = est()
    fwd = forward_flops(1000, 32, 8, 2, 5)
    assert fwd == 2 * 1000 * 32 + 2 * 32 * 8 * 10
    elements = 32 * elementwise_per_token(shape, 8)
    assert elements == 32 * (10 * 10 + 4 * 20 + 2 * 2 * 8)
    assert w["forward_seconds"] == pytest.approx(3 * 2 * (fwd / 1e6 + 4 * 7 * 1e-3 + elements / 1e9))
    hooks = 3 * 32 * 30 / 1e9 + 4 * 30 * 2 * 1e-3  # sq_norm hooks: 3 passes per input element, 30 ops per call
    assert w["statistics_seconds"] == pytest.approx(3 * hooks)
    assert w["prune_seconds"] == pytest.approx(3 * (2 * 600 / 1e5 + 3 * 20 * 1e-3))  # the selection, the mask applied
    assert w["seconds"] == pytest.approx(w["forward_seconds"] + w["statistics_seconds"] + w["prune_seconds"])
    assert est(nsamples=8)["forward_seconds"] == pytest.approx(2 * w["forward_seconds"])
    assert est(ranks=2)["forward_seconds"] == pytest.approx(w["forward_seconds"] / 2)
    assert est(passes=3)["forward_seconds"] == pytest.approx(1.5 * w["forward_seconds"])
    g, a = est("sparsegpt"), est("admm")
    assert g["statistics_seconds"] == pytest.approx(3 * (2 * 32 * (10 ** 2 + 20 ** 2) / 1e6 + hooks))
    assert w["prune_seconds"] < g["prune_seconds"] and w["prune_seconds"] < a["prune_seconds"]
    work = {m: Pruner(method_named(m, PruneOptions())).prune_work(4096, 11008, Structure(), 0.5).flops
            for m in ("wanda", "sparsegpt", "admm")}
    assert work["wanda"] == 0 < work["sparsegpt"] < work["admm"]
    m = est("magnitude", passes=0)
    assert m["forward_seconds"] == 0 and m["statistics_seconds"] == 0


def test_plan_estimates_time_where_it_can_measure(tiny_models):
    model = str(tiny_models("llama"))
    res = CliRunner().invoke(main, ["plan", model, "--nsamples", "8", "--seqlen", "32"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "time:" in x)
    assert "time: about" in line and "per block" in line and "measured on cpu" in line, line
    r = json.loads(CliRunner().invoke(main, ["plan", model, "--nsamples", "8", "--seqlen", "32", "--json"]).output)
    t = r["time"]
    assert t["seconds"] > 0 and t["forward_seconds"] > 0 and t["seconds"] == pytest.approx(t["block_seconds"] * r["blocks"])
    assert t["rates"]["matmul_flops"] > 0
    if not torch.cuda.is_available():
        res = CliRunner().invoke(main, ["plan", model, "--gpu-memory-limit", "24GB", "--json"])
        assert json.loads(res.output)["time"] == {"seconds": None, "reason": "no CUDA device on this machine to "
                                                  "measure; run plan where the job runs"}
