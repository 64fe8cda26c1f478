"""Mixture-of-Experts (issue 11): every expert pruned with Wanda on the tokens the model's own router sends it,
equal to an in-memory reference written from that rule on transformers' own model, for several families and
both on-disk layouts (one tensor per expert, as save_pretrained writes, and the fused in-memory layout)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import streamprune
from reference import reference_prune_moe
from tiny import write_ids

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def moe_config(family: str):
    import transformers

    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
                                           num_experts=4, num_experts_per_tok=2, head_dim=16)
    if family == "qwen2_moe":  # a shared expert with its scalar gate
        return transformers.Qwen2MoeConfig(**SMALL, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2,
                                           shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)
    if family == "mixtral":  # block_sparse_moe.experts.N.w1/w2/w3 on disk
        return transformers.MixtralConfig(**SMALL, intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2)
    if family == "deepseek_v3":  # MLA attention, a dense first block, a shared expert, grouped routing
        return transformers.DeepseekV3Config(**SMALL, intermediate_size=128, moe_intermediate_size=32,
                                             num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=4,
                                             n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                                             q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16)
    if family == "gpt_oss":  # transposed experts with biases, interleaved gate/up, sinks, sliding layers
        return transformers.GptOssConfig(**SMALL, intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2, head_dim=16, sliding_window=8,
                                         layer_types=["sliding_attention", "full_attention"])
    raise KeyError(family)


def make_moe(path, family: str, fused: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5) if "embed" not in name else p.normal_(0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    if fused:  # the layout the model has in memory, straight to disk
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        model.save_pretrained(path)
    return path


def ids_of(path):
    return torch.tensor([json.loads(line)["input_ids"] for line in open(path)])


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_ids(tmp_path_factory.mktemp("moe") / "ids.jsonl", 8, 32)


def check_against_reference(model_dir, out, calib, n=0, m=0, sparsity=0.5):
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager",
                                               attn_implementation="eager" if "gpt_oss" in str(model_dir) else None)
    src = {k: v.clone() for k, v in ref.state_dict().items()}
    masks = reference_prune_moe(ref, ids_of(calib), sparsity, n, m)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd, want = got.state_dict(), ref.state_dict()
    assert set(sd) == set(want)
    bad = [k for k in want if not torch.equal(sd[k], want[k])]
    assert not bad, f"differ from the reference: {bad[:4]}"
    for k, v in src.items():  # routers, norms, biases: untouched
        if not any(k.startswith(name.split("[")[0].rsplit(".", 1)[0]) and k.endswith(name.split("[")[0].rsplit(".", 1)[-1])
                   for name in masks):
            assert torch.equal(sd[k], v), k
    check_report(out, masks, n, m)
    return masks


def check_report(out, masks, n, m):
    """`report` reads every expert back through the output's layout: the reference's zeros per expert matrix."""
    from streamprune.report import report

    d = report(out)
    for b in d["blocks"]:
        for label, per in b["experts"].items():
            want = [masks[f"model.layers.{b['index']}.{label}[{e}]"] for e in range(len(per))]
            assert per == [float(w.float().mean()) for w in want], label
            assert b["nm_2_4"][label] == ((n, m) == (2, 4))
    assert sum(len(b["experts"]) for b in d["blocks"]) == len({k.split("[")[0] for k in masks if "[" in k})


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_experts_match_reference(family, calib, tmp_path):
    model = make_moe(tmp_path / family, family)
    s = streamprune.prune(model, tmp_path / "out", calib=str(calib), nsamples=8, seqlen=32, progress=False,
                          expert_min_tokens=0)
    masks = check_against_reference(model, tmp_path / "out", calib)
    experts = [k for k in masks if "[" in k]
    assert experts and s["experts"] == len(experts) // 2 and s["experts_fallback"] == 0  # gate/up and down each
    zeros = sum(int(v.sum()) for v in masks.values())
    assert s["sparsity"] == pytest.approx(zeros / sum(v.numel() for v in masks.values()))
    assert s["sparsity"] == pytest.approx(0.5)
    # the layout the input had: one tensor per expert in, one tensor per expert out
    src = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"] \
        if (model / "model.safetensors.index.json").is_file() else None
    out = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    if src is not None:
        assert set(out) == set(src)


@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
def test_fused_layout_on_disk_and_nm(structure, calib, tmp_path):
    model = make_moe(tmp_path / "qwen3_moe", "qwen3_moe", fused=True)
    streamprune.prune(model, tmp_path / "out", calib=str(calib), nsamples=8, seqlen=32, progress=False,
                      structure=structure, expert_min_tokens=0)
    n, m = (2, 4) if structure == "2:4" else (0, 0)
    check_against_reference(model, tmp_path / "out", calib, n, m)
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model-00002-of-00003.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # still fused


def test_gpt_oss_transposed_experts_with_biases(calib, tmp_path):
    model = make_moe(tmp_path / "gpt_oss", "gpt_oss")
    s = streamprune.prune(model, tmp_path / "out", calib=str(calib), nsamples=8, seqlen=32, progress=False,
                          expert_min_tokens=0)
    check_against_reference(model, tmp_path / "out", calib)
    assert s["experts"] == 8


def test_starved_experts_take_the_all_tokens_statistics(calib, tmp_path):
    """With a threshold above what 8 x 32 tokens give every expert, each expert is pruned from the statistics
    of all tokens routed to it by force: counted in the summary, still 50% per expert matrix."""
    model = make_moe(tmp_path / "qwen3_moe", "qwen3_moe")
    s = streamprune.prune(model, tmp_path / "out", calib=str(calib), nsamples=8, seqlen=32, progress=False,
                          expert_min_tokens=10 ** 6)
    assert s["experts_fallback"] == s["experts"] == 8
    assert s["sparsity"] == pytest.approx(0.5)
    t = streamprune.prune(model, tmp_path / "out0", calib=str(calib), nsamples=8, seqlen=32, progress=False,
                          expert_min_tokens=0)
    got, ref = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (tmp_path / "out", tmp_path / "out0"))
    assert not torch.equal(got["model.layers.0.mlp.experts.down_proj"], ref["model.layers.0.mlp.experts.down_proj"])
    assert t["experts_fallback"] == 0


def test_router_and_output_generate(calib, tmp_path):
    model = make_moe(tmp_path / "deepseek_v3", "deepseek_v3")
    streamprune.prune(model, tmp_path / "out", calib=str(calib), nsamples=8, seqlen=32, progress=False)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    src = AutoModelForCausalLM.from_pretrained(model)
    assert torch.equal(got.model.layers[1].mlp.gate.weight, src.model.layers[1].mlp.gate.weight)
    out = got.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
