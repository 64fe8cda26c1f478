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
    from streamprune.evaluate import evaluate

    with pytest.raises(StreamPruneError, match=match):
        evaluate(model, ids=torch.arange(64) % 256, seqlen=32, progress=False)
    assert tree(model) == before


def test_plan_of_a_config_alone_reads_no_weights(model):
    """Without the shards (a config and index downloaded first), plan still plans from the config."""
    from streamprune.plan import plan_for

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
