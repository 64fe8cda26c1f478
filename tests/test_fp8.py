"""Block-scaled FP8 checkpoints: dequantized for statistics and compute, pruned, written back as FP8
codes with the original scales. Masks as pruning the dequantized twin in float32; same size; unpruned codes and
every scale bit for bit the input's."""

import pytest
import torch

import streamprune
from tiny import dequantized_twin, quantize_fp8, tensors


@pytest.fixture(scope="module")
def fp8(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    q = quantize_fp8(tiny_models("llama", dtype=torch.bfloat16), root / "fp8")
    return q, dequantized_twin(q, root / "twin")


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_fp8_round_trip(structure, fp8, ids_file, tmp_path):
    q, twin = fp8
    kw = dict(calib=str(ids_file), nsamples=8, seqlen=32, progress=False, structure=structure, dtype="float32")
    streamprune.prune(q, tmp_path / "out", **kw)
    streamprune.prune(twin, tmp_path / "twin-out", **kw)
    same_as_twin(q, tmp_path / "out", tmp_path / "twin-out")
    from streamprune.reporting import report

    a, b = report(tmp_path / "out"), report(tmp_path / "twin-out")   # FP8 zeros read from the codes' bits
    assert a["overall"] == pytest.approx(b["overall"], abs=1e-4) and a["overall"] == pytest.approx(0.5, abs=1e-3)
    assert [blk["nm_2_4"] for blk in a["blocks"]] == [blk["nm_2_4"] for blk in b["blocks"]]


def test_fp8_fused_experts(tmp_path):
    """Experts stored fused (one 3-D FP8 tensor per projection, one grid of tiles per expert): dequantized and
    re-encoded per expert, whole blocks and in groups."""
    from test_moe import make_moe
    from tiny import write_ids

    calib = write_ids(tmp_path / "ids.jsonl", 8, 32)
    q = quantize_fp8(make_moe(tmp_path / "src", "qwen3_moe", fused=True), tmp_path / "fp8", block=(16, 16))
    twin = dequantized_twin(q, tmp_path / "twin")
    kw = dict(calib=str(calib), nsamples=8, seqlen=32, progress=False, dtype="float32", expert_min_tokens=1)
    streamprune.prune(q, tmp_path / "out", **kw)
    streamprune.prune(twin, tmp_path / "twin-out", **kw)
    got = same_as_twin(q, tmp_path / "out", tmp_path / "twin-out")
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert got[fused].dtype == torch.float8_e4m3fn and got[fused].dim() == 3
    assert float((got[fused].view(torch.uint8) == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    streamprune.prune(q, tmp_path / "groups", expert_group=3, **kw)
    grouped = tensors(tmp_path / "groups")
    assert all(torch.equal(grouped[k].view(torch.uint8), got[k].view(torch.uint8)) for k in got)


def same_as_twin(q, out, twin_out) -> dict:
    """The FP8 output against pruning the dequantized twin in float32: masks agree, every kept code and scale as
    it was, +0 codes only, the same size."""
    src, got, ref = tensors(q), tensors(out), tensors(twin_out)
    assert set(got) == set(src)
    agree = total = 0
    for name, t in src.items():
        assert got[name].dtype == t.dtype, name
        if name.endswith("_scale_inv") or t.dtype != torch.float8_e4m3fn:
            if name in ref and ".layers." in name and t.dim() == 2:
                continue
            assert torch.equal(got[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got[name],
                               t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), name
            continue
        codes, orig = got[name].view(torch.uint8), t.view(torch.uint8)
        pruned = codes == 0
        want = ref[name] == 0
        agree += int((pruned == want).sum())
        total += pruned.numel()
        assert torch.equal(codes[~pruned], orig[~pruned]), name  # every kept code as it was
        assert not bool((codes == 0x80).any()), name             # +0, never -0
    assert agree / total >= 0.9999, (agree, total)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert abs(size(out) - size(q)) < 4096  # the same size (headers aside)
    return got


def test_fp8_output_loads_where_the_input_loads(tiny_models, ids_file, tmp_path):
    """transformers' FP8 loader (dequantizing on the CPU) needs dims that are multiples of the tile: a hidden size
    of 64 here, where it loads the input."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    q = quantize_fp8(tiny_models("llama", dtype=torch.bfloat16, realistic=False), tmp_path / "fp8")
    streamprune.prune(q, tmp_path / "out", calib=str(ids_file), nsamples=8, seqlen=32, progress=False)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, quantization_config=FineGrainedFP8Config(  # noqa: E731
        dequantize=True, weight_block_size=[32, 32])).state_dict()
    a, b = load(q), load(tmp_path / "out")
    w = "model.layers.1.mlp.down_proj.weight"
    assert float((b[w] == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert torch.equal(b[w][b[w] != 0], a[w][b[w] != 0])


def test_other_quantizations_still_refused(tiny_models, ids_file, tmp_path, copy_model):
    import json

    from test_bad_input import expect_error

    model = copy_model(tiny_models("llama"))
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}  # no weight_block_size: per-tensor FP8
    (model / "config.json").write_text(json.dumps(cfg))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="quant_method 'fp8'")


# ---------------------------------------------------------------- edge cases of the codes and scales

DOWN = "model.layers.1.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def fp8_64(tiny_models, tmp_path_factory):
    """An FP8 checkpoint transformers' FP8 loader reads (dims multiples of the 32 x 32 tile)."""
    return quantize_fp8(tiny_models("llama", dtype=torch.bfloat16, realistic=False), tmp_path_factory.mktemp("q") / "fp8")


def edited(src, dst, edit):
    """A copy of checkpoint `src` in `dst` with `edit(tensors)` applied to every shard's tensors (in place)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        t = load_file(shard)
        edit(t)
        save_file(t, shard, metadata={"format": "pt"})
    return dst


def set_tile(name, tile, scale, codes=None, block=32):
    """An edit: tile `tile` (row, col) of FP8 weight `name` gets scale `scale` (and codes `codes` if given)."""
    def edit(t):
        if name in t:
            r, c = tile
            t[name + "_scale_inv"][r, c] = scale
            if codes is not None:
                t[name].view(torch.uint8)[r * block:(r + 1) * block, c * block:(c + 1) * block] = codes
    return edit


def codes_as_promised(src, out) -> dict:
    """Every FP8 code of `out` is +0 (0x00) or the input's code bit for bit; no -0 and no NaN code anywhere;
    every scale and every other tensor as it was. Returns the output's tensors."""
    a, b = tensors(src), tensors(out)
    for name, t in a.items():
        if t.dtype != torch.float8_e4m3fn:
            if name.endswith("_scale_inv") or ".layers." not in name or t.dim() != 2:
                assert torch.equal(b[name], t), name
            continue
        got, orig = b[name].view(torch.uint8), t.view(torch.uint8)
        kept = got != 0
        assert torch.equal(got[kept], orig[kept]), name
        assert not bool(((got == 0x80) | ((got & 0x7F) == 0x7F)).any()), name
    return b


def finite_logits(out) -> bool:
    """transformers' own FP8 loader (dequantizing on the CPU) on `out`: are its logits finite?"""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=FineGrainedFP8Config(
        dequantize=True, weight_block_size=[32, 32]))
    with torch.no_grad():
        logits = model(input_ids=torch.arange(32).reshape(1, 32)).logits
    return bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_fp8_zero_scale_tile_stays_zero(method, fp8_64, ids_file, tmp_path):
    """An all-zero tile with scale 0 (what a quantizer without clamping writes: amax / 448 = 0): zero codes out,
    never NaN; every other code as promised; transformers' logits of the output finite."""
    src = edited(fp8_64, tmp_path / "src", set_tile(DOWN, (1, 2), 0.0, codes=0))
    assert finite_logits(src)
    streamprune.prune(src, tmp_path / "out", calib=str(ids_file), nsamples=8, seqlen=32, progress=False,
                      method=method)
    out = tensors(tmp_path / "out")
    if method == "wanda":
        codes_as_promised(src, tmp_path / "out")
    assert bool((out[DOWN].view(torch.uint8)[32:64, 64:96] == 0).all())
    assert not bool((out[DOWN].view(torch.uint8) & 0x7F == 0x7F).any())
    assert finite_logits(tmp_path / "out")


def test_fp8_float16_keeps_every_kept_code(fp8_64, ids_file, tmp_path):
    """Scales so small (~2e-9) that float16 underflows codes x scale: with --dtype float16 the compute dtype
    decides the mask only; every kept code is the input's, bit for bit."""
    def tiny(t):
        if DOWN in t:
            t[DOWN + "_scale_inv"] *= 2e-9 / float(t[DOWN + "_scale_inv"].mean())
    src = edited(fp8_64, tmp_path / "src", tiny)
    streamprune.prune(src, tmp_path / "out", calib=str(ids_file), nsamples=8, seqlen=32, progress=False,
                      dtype="float16")
    out = codes_as_promised(src, tmp_path / "out")
    assert float((out[DOWN].view(torch.uint8) == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_fp8_float16_refused_for_methods_that_rewrite_weights(fp8_64, ids_file, tmp_path):
    """SparseGPT/ADMM write their updated weights from the compute dtype: one that cannot hold the values is
    refused, naming the tensor."""
    from test_bad_input import expect_error

    def tiny(t):
        if DOWN in t:
            t[DOWN + "_scale_inv"] *= 2e-9 / float(t[DOWN + "_scale_inv"].mean())
    src = edited(fp8_64, tmp_path / "src", tiny)
    expect_error(src, tmp_path / "out", "--calib", ids_file, "--nsamples", 8, "--seqlen", 32, "--method",
                 "sparsegpt", "--dtype", "float16", match=f"tensor {DOWN}: ")


def plan_refusal(model) -> str:
    """`streamprune plan MODEL`'s one line on stderr (it checks a checkpoint whose shards are there as prune does)."""
    from click.testing import CliRunner

    from streamprune.cli import main

    res = CliRunner().invoke(main, ["plan", str(model)])
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    return res.stderr.strip()


@pytest.mark.parametrize("config_block,scale_block", [((64, 64), (32, 32)), ((32, 32), (64, 64)), ((32, 64), (32, 32))])
def test_fp8_scale_grid_must_match_the_block_size(config_block, scale_block, tiny_models, ids_file, tmp_path):
    import json

    from test_bad_input import expect_error

    q = quantize_fp8(tiny_models("llama", dtype=torch.bfloat16, realistic=False), tmp_path / "fp8", block=scale_block)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = list(config_block)
    (q / "config.json").write_text(json.dumps(cfg))
    line = expect_error(q, tmp_path / "out", "--calib", ids_file, "--nsamples", 8, "--seqlen", 32,
                        match="_scale_inv")
    assert "do not match" in line and "model.layers.0." in line
    assert not list(tmp_path.glob("out/*.safetensors"))
    assert plan_refusal(q) == line


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), 1e37])
def test_fp8_bad_scale_named_with_its_tile(bad, fp8_64, ids_file, tmp_path):
    from test_bad_input import expect_error

    src = edited(fp8_64, tmp_path / "src", set_tile(DOWN, (1, 3), bad))
    line = expect_error(src, tmp_path / "out", "--calib", ids_file, "--nsamples", 8, "--seqlen", 32,
                        "--dtype", "float32", match=f"tensor {DOWN}_scale_inv: the scale of tile (1, 3)")
    assert "does not fit" not in line
    assert not list(tmp_path.glob("out/*.safetensors"))   # refused before any block runs
    assert plan_refusal(src) == line


def test_fp8_negative_scale_prunes_to_plus_zero(fp8_64, ids_file, tmp_path):
    """A negative scale (codes x scale as transformers computes it): pruned codes +0 (0x00), never -0 (0x80);
    a -0 code of the input (a kept zero) is written +0 as well."""
    def edit(t):
        set_tile(Q, (0, 0), -float(t[Q + "_scale_inv"][0, 0]) if Q in t else 0)(t)
        if Q in t:
            t[Q].view(torch.uint8)[5, 40] = 0x80
    src = edited(fp8_64, tmp_path / "src", edit)
    streamprune.prune(src, tmp_path / "out", calib=str(ids_file), nsamples=8, seqlen=32, progress=False)
    out = codes_as_promised(src, tmp_path / "out")
    tile = out[Q].view(torch.uint8)[:32, :32]
    assert float((tile == 0).float().mean()) > 0.3
    assert int(out[Q].view(torch.uint8)[5, 40]) == 0


def test_fp8_float16_fused_experts_whole_and_in_groups(tmp_path):
    """Fused FP8 experts whose scales float16 underflows: every kept code the input's, whole blocks and experts
    streamed in groups alike (the same bytes)."""
    from test_moe import make_moe
    from tiny import write_ids

    calib = write_ids(tmp_path / "ids.jsonl", 8, 32)
    q = quantize_fp8(make_moe(tmp_path / "src", "qwen3_moe", fused=True), tmp_path / "fp8", block=(16, 16))

    def tiny(t):
        for name in [n for n in t if n.endswith("experts.gate_up_proj_scale_inv")]:
            t[name] *= 2e-9 / float(t[name].mean())
    src = edited(q, tmp_path / "tiny", tiny)
    kw = dict(calib=str(calib), nsamples=8, seqlen=32, progress=False, dtype="float16", expert_min_tokens=1)
    streamprune.prune(src, tmp_path / "whole", **kw)
    streamprune.prune(src, tmp_path / "groups", expert_group=3, **kw)
    whole = codes_as_promised(src, tmp_path / "whole")
    grouped = codes_as_promised(src, tmp_path / "groups")
    assert all(torch.equal(grouped[k].view(torch.uint8), whole[k].view(torch.uint8)) for k in whole)
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    assert float((whole[fused].view(torch.uint8) == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_fp8_round_trip_shortcut_is_exact():
    """`round_trips` skips the pass over the values when every non-zero code x scale is a normal number of the
    compute dtype: its answer equals the pass's for every finite code, scales across each dtype's range."""
    from streamprune.layout import dequantize, mismatches, round_trips

    bits = torch.arange(256, dtype=torch.uint8)
    bits = bits[((bits & 0x7F) != 0x7F) & (bits != 0x80)]               # no NaN codes, no -0
    codes = bits.repeat(4, 1).view(torch.float8_e4m3fn)                  # one 4 x 253 tile
    g = torch.Generator().manual_seed(0)
    scales = [float(m * 2.0 ** e) for e in range(-140, 120, 3) for m in torch.rand(3, generator=g) + 0.5]
    inexact = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for s in scales + [-x for x in scales[::7]]:
            scale = torch.tensor([[s]])
            value = dequantize(codes, scale, (4, 253), dtype)
            if bool(torch.isfinite(value).all()):
                bad = mismatches(value, codes, scale, (4, 253))
                assert round_trips(value, codes, scale, (4, 253)) == (bad == 0), (dtype, s, bad)
                inexact += bad > 0
    assert inexact > 20   # float16 below its normal range, float32 and bfloat16 near 1e-38
