"""Mixture-of-Experts: every expert pruned with Wanda on the tokens the model's own router sends it,
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
    if family == "jetmoe":  # linear routers (router.layer), and mixture-of-attention experts in self_attention
        return transformers.JetMoeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2,
                                         kv_channels=16, intermediate_size=32, num_local_experts=4,
                                         num_experts_per_tok=2, max_position_embeddings=128)
    if family == "hunyuan_v1_moe":  # a linear router (gate.wg) inside a gate module that does the top-k
        return transformers.HunYuanMoEV1Config(**SMALL, num_key_value_heads=2, intermediate_size=32, num_experts=4,
                                               moe_topk=2, head_dim=16)
    if family == "afmoe":  # a linear router (router.gate) with sigmoid scores and an expert bias
        return transformers.AfmoeConfig(**SMALL, num_key_value_heads=2, intermediate_size=64,
                                        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16,
                                        num_dense_layers=0)
    raise KeyError(family)


LINEAR_ROUTERS = {  # what the test knows by name; streamprune finds them from the routing (routing.py)
    "jetmoe": ("mlp.router.layer", "self_attention.experts.router.layer"),
    "hunyuan_v1_moe": ("mlp.gate.wg",),
    "afmoe": ("mlp.router.gate",),
}


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


def check_against_reference(model_dir, out, calib, n=0, m=0, sparsity=0.5, routers=()):
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager",
                                               attn_implementation="eager" if "gpt_oss" in str(model_dir) else None)
    src = {k: v.clone() for k, v in ref.state_dict().items()}
    masks = reference_prune_moe(ref, ids_of(calib), sparsity, n, m, routers)
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
    from streamprune.reporting import report

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
                          expert_min_tokens=1)
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
                      structure=structure, expert_min_tokens=1)
    n, m = (2, 4) if structure == "2:4" else (0, 0)
    check_against_reference(model, tmp_path / "out", calib, n, m)
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model-00002-of-00003.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # still fused


def test_gpt_oss_transposed_experts_with_biases(calib, tmp_path):
    model = make_moe(tmp_path / "gpt_oss", "gpt_oss")
    s = streamprune.prune(model, tmp_path / "out", calib=str(calib), nsamples=8, seqlen=32, progress=False,
                          expert_min_tokens=1)
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
                          expert_min_tokens=1)
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


@pytest.mark.parametrize("family", sorted(LINEAR_ROUTERS))
def test_linear_routers_found_from_the_routing(family, calib, tmp_path):
    """Routers that are nn.Linear (JetMoE's router.layer, also in its mixture-of-attention experts; HunYuan's
    gate.wg; AFMoE's router.gate) are found from the routing and stay bit-identical; every expert (JetMoE's
    attention experts included) and every other linear equals the reference."""
    model = make_moe(tmp_path / family, family)
    s = streamprune.prune(model, tmp_path / "out", calib=str(calib), nsamples=8, seqlen=32, progress=False,
                          expert_min_tokens=1)
    masks = check_against_reference(model, tmp_path / "out", calib, routers=LINEAR_ROUTERS[family])
    got, src = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (tmp_path / "out", model))
    routers = [k for k in src for r in LINEAR_ROUTERS[family] if f".{r}.weight" in k]
    assert len(routers) == 2 * len(LINEAR_ROUTERS[family])
    for k in routers:
        assert torch.equal(got[k], src[k]), k
        assert k not in masks
    assert s["sparsity"] == pytest.approx(0.5) and any("[" in k for k in masks)


@pytest.mark.parametrize("options", [dict(method="magnitude"), dict(expert_group=2, expert_min_tokens=1)],
                         ids=["magnitude", "groups"])
def test_linear_router_kept_without_calibration_and_in_groups(options, calib, tmp_path):
    """Magnitude has no calibration data: its routers come from a probe window's forward. Experts streamed in
    groups: the trace stops before the experts, which are on the host."""
    model = make_moe(tmp_path / "hunyuan", "hunyuan_v1_moe")
    data = {} if "method" in options else dict(calib=str(calib), nsamples=8, seqlen=32)
    s = streamprune.prune(model, tmp_path / "out", progress=False, **data, **options)
    got, src = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (tmp_path / "out", model))
    for k in ("model.layers.0.mlp.gate.wg.weight", "model.layers.1.mlp.gate.wg.weight"):
        assert torch.equal(got[k], src[k]), k
    assert s["sparsity"] == pytest.approx(0.5, abs=1e-3) and s["experts"] == 8


def _cli(*args):
    import os
    import subprocess
    import sys

    extra = ["--no-progress"] if args[0] == "prune" else []
    return subprocess.run([sys.executable, "-m", "streamprune", *map(str, args), *extra], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))


def _refused(res, match, out):
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("streamprune: error: ") and match in lines[0], lines[0]
    assert not (out / "model.safetensors.index.json").exists()


def test_expert_min_tokens_zero_refused(calib, tmp_path):
    """0 would prune an expert that no calibration token reached from all-zero statistics: an arbitrary mask."""
    model = make_moe(tmp_path / "m", "qwen3_moe")
    res = _cli("prune", model, tmp_path / "out", "--calib", calib, "--nsamples", 8, "--seqlen", 32,
               "--expert-min-tokens", 0)
    _refused(res, "--expert-min-tokens must be at least 1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_longcat_flash_refused_up_front(calib, tmp_path):
    """LongCat-Flash (it was an internal error): its decoder layers each hold two sublayers (num_hidden_layers is
    twice their count), and the list of its per-layer MLPs is no list of blocks. Refused by name before OUT is
    touched."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LongcatFlashConfig(vocab_size=256, hidden_size=64, num_layers=1, num_attention_heads=4,
                                          n_routed_experts=4, zero_expert_num=2, moe_topk=2, ffn_hidden_size=64,
                                          expert_ffn_hidden_size=32, q_lora_rank=32, kv_lora_rank=16,
                                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                          max_position_embeddings=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    res = _cli("prune", tmp_path / "m", tmp_path / "out", "--calib", calib, "--nsamples", 8, "--seqlen", 32)
    _refused(res, "unsupported architecture LongcatFlashForCausalLM: no list of decoder blocks found", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_experts_disagreeing_on_their_count_refused():
    """Zero-computation experts beside the routed ones (LongCat-Flash's layout: gate_up_proj sized for all of
    them, down_proj for the computing ones) in a block: refused by name, whichever family holds them."""
    from torch import nn

    from streamprune.model import experts_problem

    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.zeros(6, 8, 4))
    experts.down_proj = nn.Parameter(torch.zeros(4, 4, 4))
    block = nn.Module()
    block.experts = experts
    assert experts_problem([block], "fam") == ("fam: block 0 experts: its expert parameters disagree on the number "
                                               "of experts (gate_up_proj 6, down_proj 4): experts beside the computing "
                                               "ones (zero or identity experts) are not supported")
    experts.down_proj = nn.Parameter(torch.zeros(6, 4, 4))
    assert experts_problem([block], "fam") is None


def test_gemma4_moe_refused_by_name(calib, tmp_path):
    """Gemma-4 (MoE layers on): per-layer head_dim no longer breaks the plan; its blocks take per-layer inputs
    positionally, which streamprune cannot replay: refused naming the family before any block is pruned."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma4TextConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                                        max_position_embeddings=128, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"], enable_moe_block=True,
                                        num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                                        hidden_size_per_layer_input=0, vocab_size_per_layer_input=256)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    plan = _cli("plan", tmp_path / "m")
    assert plan.returncode == 0, plan.stderr
    res = _cli("prune", tmp_path / "m", tmp_path / "out", "--calib", calib, "--nsamples", 8, "--seqlen", 32)
    _refused(res, "unsupported architecture gemma4_text: its decoder blocks take 1 more positional input",
             tmp_path / "out")
