"""Block-scaled FP8 checkpoints (issue 11): dequantized for statistics and compute, pruned, written back as FP8
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
    from streamprune.report import report

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
    kw = dict(calib=str(calib), nsamples=8, seqlen=32, progress=False, dtype="float32", expert_min_tokens=0)
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
