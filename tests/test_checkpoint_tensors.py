"""What a checkpoint's tensors are, as the model's own code sees them: dtypes the model cannot compute with are
refused up front by name; output heads are found under whatever name the family gives them."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from test_bad_input import INDEX, cli, expect_error, tree
from test_trust import ARGS, rewrite_tensor
from tiny import tensors


def as_int8(w):
    return (w * 100).round().clamp(-127, 127).to(torch.int8)


@pytest.fixture
def model(tiny_models, copy_model):
    return copy_model(tiny_models("llama"))


@pytest.mark.parametrize("name, fn, dtype", [
    ("model.layers.0.self_attn.q_proj.weight", as_int8, "int8"),   # a weight the pruner prunes
    ("model.embed_tokens.weight", lambda w: w.to(torch.int32), "int32"),   # the capture computes with it
    ("model.layers.1.input_layernorm.weight", lambda w: w > 0, "bool"),
    ("model.norm.weight", lambda w: w.to(torch.uint8), "uint8"),
    ("lm_head.weight", as_int8, "int8"),
])
def test_non_float_weights_are_refused_by_name_and_dtype_before_any_work(name, fn, dtype, model, ids_file, tmp_path):
    """A tensor the model computes with in floating point, stored as integers or booleans without a
    quantization_config, is refused by prune, plan and eval alike, naming the tensor and its dtype."""
    rewrite_tensor(model, name, fn)
    match = f"tensor {name} is stored as {dtype}, but the model computes with it in floating point"
    expect_error(model, tmp_path / "out", "--calib", ids_file, *ARGS, match=match)
    assert not (tmp_path / "out").exists(), "refused before OUT was touched"

    from streamprune.cli import main

    before = tree(model)
    res = CliRunner().invoke(main, ["plan", str(model)])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [f"streamprune: error: {model}: {match} and no "
                                                                     f"quantization_config says how to read it; use the "
                                                                     f"unquantized release or dequantize it first"]
    from streamprune.errors import StreamPruneError
    from streamprune.evaluation import evaluate

    with pytest.raises(StreamPruneError, match=match):
        evaluate(model, ids=torch.arange(64) % 256, seqlen=32, progress=False)
    assert tree(model) == before


def test_plan_of_a_config_alone_reads_no_weights(model):
    """Without the shards (a config and index downloaded first), plan still plans from the config."""
    from streamprune.planner import plan_for

    rewrite_tensor(model, "model.layers.0.self_attn.q_proj.weight", as_int8)
    for shard in model.glob("*.safetensors"):
        shard.unlink()
    assert plan_for(model)["blocks"] == 3


def test_non_float_tensors_the_model_does_not_compute_with_are_copied(model, ids_file, tmp_path):
    """Integer and boolean tensors the model does not know, inside a block and outside, reach the output unchanged
    (no refusal: nothing computes with them)."""
    index = json.loads((model / INDEX).read_text())
    extra = {"model.layers.0.self_attn.step": torch.tensor([7], dtype=torch.int64),
             "model.layers.2.mlp.keep": torch.tensor([True, False, True]),
             "model.token_type_ids": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    save_file(extra, model / "model-extra.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    (model / INDEX).write_text(json.dumps(index))
    res = cli("prune", model, tmp_path / "out", "--calib", ids_file, *ARGS)
    assert res.returncode == 0, res.stderr
    got = tensors(tmp_path / "out")
    for k, v in extra.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_gpt_neox_output_head_found_through_the_models_own_key_mapping(tiny_models, ids_file, tmp_path):
    """GPT-NeoX checkpoints call the output head `embed_out.weight`; the model's `get_output_embeddings()` is
    `lm_head`, and transformers' key mapping for the class renames one into the other. Pruned exactly as the
    in-memory reference prunes transformers' own model, the head copied bit for bit under its own name, and
    the output loads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from reference import reference_prune
    from test_equivalence import assert_same_model, load_ids, run

    model = tiny_models("gpt_neox")
    stored = tensors(model)
    assert "embed_out.weight" in stored and "lm_head.weight" not in stored
    summary = run(model, tmp_path / "out", ids_file, sparsity=0.5)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    masks = reference_prune(ref, load_ids(ids_file), 0.5)
    assert len(masks) == 4 * 3  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h in each of 3 blocks
    assert_same_model(tmp_path / "out", ref, load_ids(ids_file))
    assert summary["sparsity"] == pytest.approx(sum(m.sum().item() for m in masks.values()) /
                                                sum(m.numel() for m in masks.values()))
    got = tensors(tmp_path / "out")
    assert set(got) == set(stored)
    unpruned = [k for k in stored if k.replace(".weight", "") not in {n.replace(".weight", "") for n in masks}]
    assert "embed_out.weight" in unpruned and "gpt_neox.embed_in.weight" in unpruned
    for k in unpruned:
        assert got[k].dtype == stored[k].dtype and torch.equal(got[k], stored[k]), k


def test_a_fused_tensor_the_model_splits_is_named_not_missing(tmp_path, ids_file):
    """A checkpoint tensor that transformers splits into several parameters (SarvamMoE's fused
    `query_key_value` into q/k/v) is refused for what it is, not as a missing tensor."""
    import transformers

    from tiny import COMMON

    cfg = transformers.AutoConfig.for_model("sarvam_moe", **dict(COMMON, num_hidden_layers=2, head_dim=16,
                                                                  num_experts=4, num_experts_per_tok=2,
                                                                  moe_intermediate_size=32, first_k_dense_replace=1))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    assert "model.layers.0.attention.query_key_value.weight" in tensors(tmp_path / "model")
    expect_error(tmp_path / "model", tmp_path / "out", "--calib", ids_file, *ARGS,
                 match="parameter model.layers.0.self_attn.q_proj.weight: the checkpoint stores it inside "
                       "model.layers.0.attention.query_key_value.weight through conversion operations ['Split'], "
                       "which streamprune does not read")


def test_a_convolution_in_a_block_is_not_taken_for_experts(tiny_models, ids_file, tmp_path):
    """Mamba's blocks hold a depthwise Conv1d ([channels, 1, width]: 3-D like a fused experts tensor) beside
    nn.Linears, one of which (dt_proj) has one output per channel like a router. The kernel is copied bit for
    bit and every linear is pruned, dt_proj included."""
    model = tiny_models("mamba")
    stored = tensors(model)
    # magnitude: Mamba's forward reads dt_proj's weight without calling it (no input statistics for wanda)
    res = cli("prune", model, tmp_path / "out", "--method", "magnitude", *ARGS, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["experts"] == 0
    got = tensors(tmp_path / "out")
    for i in range(3):
        prefix = f"backbone.layers.{i}.mixer."
        assert torch.equal(got[prefix + "conv1d.weight"], stored[prefix + "conv1d.weight"])
        for lin in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            w = got[prefix + lin + ".weight"]  # magnitude: one threshold per matrix
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), lin
