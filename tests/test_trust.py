"""No silent wrong output: every checkpoint is pruned exactly or refused, and no job can spoil another.

Numerics are held against transformers' own model loaded in the compute dtype; jobs are real processes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import streamprune
from reference import reference_prune
from test_bad_input import INDEX, cli, expect_error, tree
from tiny import FAMILIES, ids_of, make_config, tensors, write_ids

ARGS = ["--nsamples", "8", "--seqlen", "32", "--no-progress"]


def published(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def run(model, out, ids_file, **kw):
    kw.setdefault("calib", str(ids_file))
    return streamprune.prune(model, out, nsamples=8, seqlen=32, progress=False, **kw)


# ------------------------------------------------------------------------------------------ numerics

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_skeleton_buffers_equal_transformers(family, dtype, tiny_models):
    """Every buffer the skeleton computes (rotary tables, Gemma's embed_scale) is bit for bit what
    from_pretrained(dtype=...) computes, whatever dtype the checkpoint was saved in."""
    from streamprune.model import StreamedModel
    from streamprune.shards import Checkpoint
    from streamprune.modelinfo import ModelInfo

    path = tiny_models(family, dtype=torch.bfloat16)
    model = StreamedModel(ModelInfo.load(path).config, Checkpoint(path), "cpu", dtype)
    ours = dict(model.skeleton.named_buffers())
    theirs = dict(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).named_buffers())
    assert set(ours) == set(theirs)
    for name, b in theirs.items():
        assert ours[name].dtype == b.dtype and torch.equal(ours[name], b), name


def test_gemma3_bf16_checkpoint_in_float32_matches_transformers(tiny_models, ids_file, tmp_path):
    """A bf16 Gemma 3 pruned in float32 equals Wanda on transformers' own float32 model (embed_scale 8.944,
    not bf16's 8.9375: sqrt(80) is not a bf16 number)."""
    model = tiny_models("gemma3", dtype=torch.bfloat16)
    run(model, tmp_path / "out", ids_file)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    reference_prune(ref, ids_of(ids_file), 0.5)
    got = tensors(tmp_path / "out")
    for k, v in ref.state_dict().items():
        if k in got:
            assert torch.equal(got[k], v.to(torch.bfloat16)), k


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_narrower_compute_dtype_matches_transformers_in_that_dtype(family, tiny_models, ids_file, tmp_path):
    """float32 checkpoint, bf16 compute: masks as Wanda on transformers' bf16 model; every kept weight and every
    unpruned tensor bit for bit the float32 input."""
    model = tiny_models(family)
    run(model, tmp_path / "out", ids_file, dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    masks = reference_prune(ref, ids_of(ids_file), 0.5)
    got, src = tensors(tmp_path / "out"), tensors(model)
    agree = total = 0
    for name, mask in masks.items():
        zero = got[name] == 0
        agree += int((zero == mask).sum())
        total += mask.numel()
        assert torch.equal(got[name][~zero], src[name][~zero]), name  # kept weights: the float32 originals
    assert agree / total >= 0.9999, (agree, total)
    for name, t in src.items():
        if name not in masks:
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_float32_norms_of_a_bf16_checkpoint_stay_bit_exact(dtype, tiny_models, ids_file, tmp_path):
    model = tiny_models("llama", dtype=torch.bfloat16, float32_norms=True)
    src = tensors(model)
    assert any(t.dtype == torch.float32 for t in src.values())
    run(model, tmp_path / "out", ids_file, dtype=dtype)
    got = tensors(tmp_path / "out")
    for name, t in src.items():
        assert got[name].dtype == t.dtype, name
        if t.dim() == 1:
            assert torch.equal(got[name], t), name


def test_every_input_tensor_reaches_the_output(tiny_models, ids_file, tmp_path, copy_model):
    """Layers under the block prefix beyond num_hidden_layers (multi-token prediction) and unknown tensors are
    copied unchanged."""
    model = copy_model(tiny_models("llama"))
    index = json.loads((model / INDEX).read_text())
    extra = {"model.layers.3.mlp.gate_proj.weight": torch.randn(160, 80), "model.layers.3.eh_proj.weight":
             torch.randn(80, 160), "model.extra_scale": torch.tensor([1.5, 2.5]),
             "model.layers.1.self_attn.rotary_emb.inv_freq": torch.arange(10.0)}
    save_file(extra, model / "model-extra.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    (model / INDEX).write_text(json.dumps(index))
    run(model, tmp_path / "out", ids_file)
    out_index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert set(out_index["weight_map"]) == set(index["weight_map"])
    got = tensors(tmp_path / "out")
    for k, v in extra.items():
        assert torch.equal(got[k], v), k
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())


# ------------------------------------------------------------------------------------------ refused inputs

@pytest.fixture
def model(tiny_models, copy_model):
    return copy_model(tiny_models("llama"))


def test_untied_model_without_lm_head_is_refused(model, ids_file, tmp_path):
    index = json.loads((model / INDEX).read_text())
    shard = model / index["weight_map"].pop("lm_head.weight")
    t = load_file(shard)
    del t["lm_head.weight"]
    save_file(t, shard, metadata={"format": "pt"})
    (model / INDEX).write_text(json.dumps(index))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="lm_head.weight is missing from the checkpoint "
                 "(the config does not tie it")


@pytest.mark.parametrize("method", ["fp8", "gptq", "awq", "bitsandbytes", "compressed-tensors", "mxfp4"])
def test_quantization_config_is_refused_naming_the_method(method, model, ids_file, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method}
    (model / "config.json").write_text(json.dumps(cfg))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match=f"quant_method '{method}'")


@pytest.mark.parametrize("suffix,what", [(".qweight", "GPTQ/AWQ"), (".absmax", "bitsandbytes"),
                                         (".weight_scale_inv", "FP8")])
def test_quantized_layout_without_config_is_named(suffix, what, model, ids_file, tmp_path):
    index = json.loads((model / INDEX).read_text())
    name = "model.layers.0.mlp.up_proj" + suffix
    save_file({name: torch.zeros(4, dtype=torch.int32)}, model / "q.safetensors", metadata={"format": "pt"})
    index["weight_map"][name] = "q.safetensors"
    (model / INDEX).write_text(json.dumps(index))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match=what)


def test_moe_experts_without_a_conversion_rule_are_named(tmp_path, ids_file):
    """Experts stored one by one under names transformers' conversion mapping does not know: named as such."""
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=128, head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "moe")
    shard = tmp_path / "moe" / "model.safetensors"
    t = load_file(shard)
    save_file({k.replace(".gate_proj.", ".w_in."): v for k, v in t.items()}, shard, metadata={"format": "pt"})
    expect_error(tmp_path / "moe", tmp_path / "out", "--calib", ids_file, match="experts are stored one by one")


def test_nan_weight_is_refused_naming_block_and_tensor(model, ids_file, tmp_path):
    index = json.loads((model / INDEX).read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = model / index["weight_map"][name]
    t = load_file(shard)
    t[name][3, 5] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})
    expect_error(model, tmp_path / "out", "--calib", ids_file, "--nsamples", "8", "--seqlen", "32",
                 match=f"tensor {name} holds NaN or Inf")


def test_float16_overflow_is_named_with_the_fix(model, ids_file, tmp_path):
    """Activations that overflow float16 in block 1: an error naming the block, the linear and --dtype float32,
    never masks computed from inf."""
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"):
        rewrite_tensor(model, name, lambda w: w * 3e4)  # act(gate) * up reaches 1e8: inf in float16
    line = expect_error(model, tmp_path / "out", "--calib", ids_file, "--nsamples", "8", "--seqlen", "32",
                        "--dtype", "float16", match="block 1")
    assert "mlp.down_proj" in line and "--dtype float32" in line


@pytest.mark.parametrize("value", ['"7"', "null", "NaN", "1.7", "true", str(2 ** 63), "-3"])
def test_calibration_ids_that_are_not_integers(value, model, tmp_path):
    rows = [json.dumps({"input_ids": list(range(32))})] * 8
    rows[5] = '{"input_ids": [1, 2, ' + value + "]}"
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    expect_error(model, tmp_path / "out", "--calib", tmp_path / "c.jsonl", "--nsamples", "8", "--seqlen", "32",
                 match=":6: \"input_ids\" must hold non-negative integers")


def test_calibration_file_inside_out_is_refused_and_kept(model, ids_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    calib = out / "calib.jsonl"
    calib.write_bytes(ids_file.read_bytes())
    expect_error(model, out, "--calib", calib, "--overwrite", match="is inside OUT")
    assert calib.read_bytes() == ids_file.read_bytes()


def test_dangling_symlinks(model, ids_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path / "nowhere")
    expect_error(model, out, "--calib", ids_file, match="not empty")
    res = cli("prune", model, out, "--calib", ids_file, *ARGS, "--overwrite")
    assert res.returncode == 0, res.stderr
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    expect_error(model, tmp_path / "dangling", "--calib", ids_file, match="dangling symbolic link")


def test_read_only_out(model, ids_file, tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        expect_error(model, mnt / "out", "--calib", ids_file, match="is not writable")
    finally:
        subprocess.run(["umount", str(mnt)])


def test_malformed_state_is_one_line(model, ids_file, tmp_path):
    out = tmp_path / "out"
    (out / ".streamprune").mkdir(parents=True)
    (out / ".streamprune" / "state.json").write_text('{"format": 2, "blocks": 5}')
    expect_error(model, out, "--calib", ids_file, "--nsamples", "8", "--seqlen", "32", match="unreadable job state")
    res = cli("status", out)
    assert res.returncode == 2 and "unreadable job state" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,match", [(["--dtype", "int4"], "--dtype"), (["--activations", "foo"], "--activations"),
                                        (["--nsamples", "0"], "--nsamples"), (["--seqlen", "99999"], "context"),
                                        (["--nproc", "0"], "--nproc"),
                                        (["--nproc", "5", "--nsamples", "4"], "more ranks than calibration batches"),
                                        (["--structure", "3:7"], "not divisible by M=7")])
def test_plan_validates_options_like_prune(args, match, model):
    from click.testing import CliRunner

    from streamprune.cli import main

    res = CliRunner().invoke(main, ["plan", str(model), *args])
    assert res.exit_code == 2, res.output
    assert match in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ jobs

def start_paused(model, out, calib, point="block_start:2", extra=()):
    """A real job stopped (SIGSTOP) at an exact point; returns the process."""
    cmd = [sys.executable, "-m", "streamprune", "prune", str(model), str(out), "--calib", str(calib), *ARGS, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, STREAMPRUNE_FAULT_AT=point, STREAMPRUNE_FAULT_SIGNAL="STOP"))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1][-2000:])
        if open(f"/proc/{proc.pid}/stat").read().split()[2] == "T":
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the job never reached its stop point")


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("trust-jobs")
    model = make_checkpoint(root / "model", "qwen3", num_hidden_layers=6, realistic=True)
    calib = write_ids(root / "ids.jsonl", 8, 32)
    res = cli("prune", model, root / "clean", "--calib", calib, *ARGS, "--snapshot-every", "2")
    assert res.returncode == 0, res.stderr
    return model, calib, published(root / "clean")


@pytest.mark.slow
def test_one_job_per_out(six, tmp_path):
    model, calib, clean = six
    out = tmp_path / "out"
    first = start_paused(model, out, calib, extra=("--snapshot-every", "2"))
    try:
        second = cli("prune", model, out, "--calib", calib, *ARGS, "--snapshot-every", "2")
        assert second.returncode == 2, second.stderr
        assert f"in use by another streamprune job (pid {first.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert published(out) == clean
    # the kernel releases the lock of a killed job
    first = start_paused(model, tmp_path / "b", calib)
    first.kill()
    first.wait()
    res = cli("prune", model, tmp_path / "b", "--calib", calib, *ARGS)
    assert res.returncode == 0, res.stderr[-2000:]


def rewrite_tensor(model, name, fn):
    index = json.loads((model / INDEX).read_text())
    shard = model / index["weight_map"][name]
    t = load_file(shard)
    t[name] = fn(t[name])
    save_file(t, shard, metadata={"format": "pt"})


@pytest.mark.slow
def test_resume_refuses_changed_weights(six, tmp_path, copy_model):
    model, calib, _ = six
    model = copy_model(model)
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, env={"STREAMPRUNE_FAULT_AT": "block_start:4"})
    assert res.returncode == -signal.SIGKILL
    before = published(out)
    rewrite_tensor(model, "model.layers.1.mlp.up_proj.weight", lambda w: w * 1.01)  # same header, new contents
    res = cli("resume", out)
    assert res.returncode == 2 and "weights of block 1 changed" in res.stderr and "--restart" in res.stderr
    assert published(out) == before


@pytest.mark.slow
def test_resume_after_untouched_blocks_changed_equals_a_fresh_job(six, tmp_path, copy_model):
    """Blocks not yet read may change: what the committed blocks read is rehashed and still the same, so the
    result is exactly a fresh prune of the input as it now is."""
    model, calib, _ = six
    model = copy_model(model)
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, env={"STREAMPRUNE_FAULT_AT": "block_start:3"})
    assert res.returncode == -signal.SIGKILL
    rewrite_tensor(model, "model.layers.5.mlp.up_proj.weight", lambda w: w * 1.01)
    res = cli("resume", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "hashed" in res.stderr
    fresh = cli("prune", model, tmp_path / "fresh", "--calib", calib, *ARGS)
    assert fresh.returncode == 0
    assert published(out) == published(tmp_path / "fresh")


@pytest.mark.slow
def test_complete_job_with_a_damaged_file(six, tmp_path):
    model, calib, clean = six
    out = tmp_path / "out"
    assert cli("prune", model, out, "--calib", calib, *ARGS, "--snapshot-every", "2").returncode == 0
    shard = out / "model-00004-of-00007.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = cli("status", out)
    assert res.returncode == 2 and "model-00004-of-00007.safetensors is missing or altered" in res.stderr
    res = cli("resume", out)
    assert res.returncode == 0 and "already complete" not in res.stderr, res.stderr[-2000:]
    assert published(out) == clean
    assert cli("status", out).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--restart", "--overwrite"])
def test_restart_removes_the_index_first(flag, six, tmp_path):
    """Killed right after the first file --restart/--overwrite removed: no index left over half a model."""
    model, calib, _ = six
    out = tmp_path / "out"
    assert cli("prune", model, out, "--calib", calib, *ARGS).returncode == 0
    res = cli("prune", model, out, "--calib", calib, *ARGS, "--sparsity", "0.6", flag,
              env={"STREAMPRUNE_FAULT_AT": "clear:1"})
    assert res.returncode == -signal.SIGKILL
    assert not (out / INDEX).exists(), "an OUT with an index must be complete"


def test_crash_before_the_first_state_write(model, ids_file, tmp_path):
    out = tmp_path / "out"
    (out / ".streamprune").mkdir(parents=True)  # what a crash right after creating the job directory leaves
    (out / ".model-00001-of-00004.safetensors.tmp").write_bytes(b"half")
    res = cli("prune", model, out, "--calib", ids_file, *ARGS)
    assert res.returncode == 0, res.stderr
    assert (out / INDEX).is_file() and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_damaged_snapshot_is_recomputed(six, tmp_path):
    model, calib, clean = six
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, "--snapshot-every", "2",
              env={"STREAMPRUNE_FAULT_AT": "block_start:5"})
    assert res.returncode == -signal.SIGKILL
    named = json.loads((out / ".streamprune" / "state.json").read_text())["snapshot"]["after_block"]
    snap = out / ".streamprune" / f"activations-after-block-{named:05d}.bin"
    data = bytearray(snap.read_bytes())
    data[100] ^= 0x40
    snap.write_bytes(bytes(data))
    res = cli("resume", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "is damaged" in res.stderr and "loaded the activations" not in res.stderr
    assert published(out) == clean


@pytest.mark.slow
@pytest.mark.parametrize("point", ["block_start:3", "block_start:4", "block_start:5", "rename_state:5",
                                   "rename_state:6", "mid_shard:5"])
def test_snapshot_named_by_status_exists(point, six, tmp_path):
    model, calib, _ = six
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", calib, *ARGS, "--snapshot-every", "1", env={"STREAMPRUNE_FAULT_AT": point})
    assert res.returncode == -signal.SIGKILL
    st = json.loads(cli("status", out, "--json").stdout)
    assert st["snapshot_after_block"] is not None
    assert (out / ".streamprune" / f"activations-after-block-{st['snapshot_after_block']:05d}.bin").is_file()


# ------------------------------------------------------------------------------------------ edge guarantees

@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_pruned_entries_are_positive_zero(structure, tiny_models, ids_file, tmp_path, copy_model):
    """Negative zeros in the input (and sign-preserving updates such as SparseGPT's) never reach a pruned
    matrix: every zero written is +0.0, and 2:4 runs along the input dimension."""
    model = copy_model(tiny_models("llama"))
    index = json.loads((model / INDEX).read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = model / index[name]
    src = load_file(shard)
    src[name] = torch.where(torch.arange(src[name].numel()).view_as(src[name]) % 5 != 0, -0.0, src[name])
    save_file(src, shard, metadata={"format": "pt"})
    for method in ("wanda", "sparsegpt"):
        out = tmp_path / method
        run(model, out, ids_file, method=method, structure=structure)
        for k, w in tensors(out).items():
            if k.endswith("proj.weight"):
                assert not bool((torch.signbit(w) & (w == 0)).any()), (method, k)
                if structure == "2:4":
                    assert bool(((w == 0).view(w.shape[0], -1, 4).sum(-1) >= 2).all()), (method, k)


def test_check_pruned_refuses_negative_zero_and_short_groups():
    from streamprune.errors import StreamPruneError
    from streamprune.loop import check_pruned
    from streamprune.methods.base import Structure

    w = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, False, False, True]])
    check_pruned(w, mask, Structure(2, 4), "x")
    with pytest.raises(StreamPruneError, match="not \\+0.0"):
        check_pruned(torch.tensor([[-0.0, 1.0, 2.0, 0.0]]), mask, Structure(), "x")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # a pruned entry that is -0, tiny or NaN
        check_pruned(w.to(dtype), mask, Structure(2, 4), "x")
        for bad in (-0.0, 1e-45 if dtype == torch.float32 else 1e-7, float("nan")):
            with pytest.raises(StreamPruneError, match="not \\+0.0"):
                check_pruned(torch.tensor([[0.0, 1.0, 2.0, bad]], dtype=dtype), mask, Structure(), "x")
    with pytest.raises(StreamPruneError, match="fewer than 2 zeros"):
        check_pruned(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([[True, False, False, False]]),
                     Structure(2, 4), "x")


# ------------------------------------------------------------------------------------------ finished and unfinished jobs

@pytest.mark.slow
def test_report_on_an_unfinished_job_says_so(six, tmp_path):
    """`report` on an OUT whose job is still running, or stopped before its end: the job's state, with `status`
    (and `resume`) as the way forward; not a complaint about missing safetensors."""
    model, calib, _ = six
    out = tmp_path / "out"
    job = start_paused(model, out, calib)
    try:
        res = cli("report", out)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"still running there (pid {job.pid}" in res.stderr and f"streamprune status {out}" in res.stderr
    finally:
        job.kill()
        job.wait()
    res = cli("report", out)
    assert res.returncode == 2 and "not finished" in res.stderr and f"streamprune resume {out}" in res.stderr, res.stderr
    assert cli("resume", out).returncode == 0
    res = cli("report", out, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["blocks"], res.stderr


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_follow_the_umask(mask, model, ids_file, tmp_path):
    """Shards as readable as the config and tokenizer files beside them: mode 0666 less the umask (safetensors
    creates its files 0600), so a group that serves a shared model directory can read it."""
    res = subprocess.run([sys.executable, "-m", "streamprune", "prune", str(model), str(tmp_path / "out"),
                          "--calib", str(ids_file), *ARGS], capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.umask(mask))
    assert res.returncode == 0, res.stderr[-2000:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes) and "config.json" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_rerun_of_a_finished_job_says_nothing_was_done(model, ids_file, tmp_path):
    first = cli("prune", model, tmp_path / "out", "--calib", ids_file, *ARGS)
    assert first.returncode == 0, first.stderr[-2000:]
    again = cli("prune", model, tmp_path / "out", "--calib", ids_file, *ARGS)
    assert again.returncode == 0, again.stderr[-2000:]
    wall = next(l for l in again.stdout.splitlines() if "wall time" in l)
    assert "()" not in wall and "already complete" in wall, wall


def test_half_precision_on_the_cpu_is_warned(model, ids_file, tmp_path):
    """--dtype float16 on the CPU runs matrix products many times slower than float32: one line says so first."""
    res = cli("prune", model, tmp_path / "out", "--calib", ids_file, *ARGS, "--dtype", "float16", "--device", "cpu")
    warnings = [l for l in res.stderr.splitlines() if l.startswith("streamprune: warning:")]
    assert len(warnings) == 1 and "--dtype float16 on the CPU is slow" in warnings[0], res.stderr[-2000:]
    res = cli("prune", model, tmp_path / "f32", "--calib", ids_file, *ARGS, "--device", "cpu")
    assert res.returncode == 0 and "warning" not in res.stderr
