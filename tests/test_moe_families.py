"""Every Mixture-of-Experts family transformers ships either prunes (routers bit-identical, experts pruned) or is
refused with one line naming it: a new family in a transformers release cannot slip through silently.

The families are found, not listed: every causal-LM config transformers registers, built with the same tiny
sizes, whose model holds an experts module (a module whose class calls itself one: the test's oracle, not
streamprune's rule). Gemma-4's MoE layers are switched on with its own option. A family whose config does not
build at these sizes (or builds larger than MAX_PARAMS: multimodal wrappers) is skipped, by name.

Routers here are the linears of a block with one output per expert (what a router scores); streamprune finds
them from the routing itself (streamprune/routing.py), so this checks that rule against an independent one.
Every other linear of a block must be pruned, so a linear wrongly kept as a router fails too.
"""

import warnings

import pytest
import torch
from torch import nn

import streamprune
from streamprune.errors import StreamPruneError
from tiny import write_ids

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_local_experts=6,
            n_routed_experts=6, num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False,
            unpadded_vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, enable_moe_block=True, top_k_experts=2)
MAX_PARAMS = 20_000_000


def _is_experts(mod: nn.Module) -> bool:
    return "expert" in type(mod).__name__.lower() and any(p.dim() == 3 for p in mod.parameters(recurse=False))


def _families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _build(model_type: str):
    """The tiny model of `model_type` (float32, random weights), or None when it is not a MoE family or does
    not build tiny; the reason as the second value."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = CONFIG_MAPPING[model_type](**TINY)
            with torch.device("meta"):
                probe = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any failure means: does not build at these sizes
        return None, f"does not build tiny: {type(e).__name__}"
    if not any(_is_experts(m) for m in probe.modules()):
        return None, "no experts module"
    if sum(p.numel() for p in probe.parameters()) > MAX_PARAMS:
        return None, "larger than tiny at these sizes (a multimodal wrapper)"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5) if "embed" not in name else p.normal_(0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
        try:  # transformers' own forward at these sizes: a config they break is not the family's fault
            model(input_ids=torch.arange(8)[None], use_cache=False)
        except Exception as e:  # noqa: BLE001
            return None, f"transformers' own forward fails at these sizes: {type(e).__name__}"
    return model, ""


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_ids(tmp_path_factory.mktemp("families") / "ids.jsonl", 2, 16)


KNOWN: dict[str, str] = {}  # internal errors today, open: strict, so a fix (or a new failure elsewhere) shows


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=pytest.mark.xfail(reason=KNOWN[t], strict=True))
                                        if t in KNOWN else t for t in _families()])
def test_every_moe_family_prunes_or_is_refused(model_type, calib, tmp_path):
    model, why = _build(model_type)
    if model is None:
        pytest.skip(f"{model_type}: {why}")
    model.save_pretrained(tmp_path / "m")
    src = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        s = streamprune.prune(tmp_path / "m", tmp_path / "out", calib=str(calib), nsamples=2, seqlen=16,
                              progress=False, expert_min_tokens=1)
    except StreamPruneError as e:  # a refusal: one line that says why (the CLI prints it, exit 2)
        msg = str(e)
        assert "\n" not in msg and "internal" not in msg, msg
        assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
        return
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert set(got) == set(src)
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == TINY["num_hidden_layers"])
    prefix = next(n for n, m in model.named_modules() if m is layers)
    routers = pruned = experts = 0
    for i, layer in enumerate(layers):
        counts = {p.shape[0] for m in layer.modules() if _is_experts(m)
                  for p in m.parameters(recurse=False) if p.dim() == 3}
        for name, mod in layer.named_modules():
            key = f"{prefix}.{i}.{name}.weight"
            if isinstance(mod, nn.Linear) and key in got:
                if mod.out_features in counts | {1}:  # a router (one score per expert) or a scalar gate
                    assert torch.equal(got[key], src[key]), f"router {key} was changed"
                    routers += mod.out_features != 1
                else:
                    zeros = float((got[key] == 0).float().mean())
                    assert zeros == pytest.approx(0.5, abs=0.02), f"{key}: {zeros:.3f} zeros"
                    pruned += 1
            elif _is_experts(mod):
                for a, p in mod.named_parameters(recurse=False):
                    if p.dim() == 3:
                        zeros = float((got[f"{prefix}.{i}.{name}.{a}"] == 0).float().mean())
                        assert zeros == pytest.approx(0.5, abs=0.02), f"{name}.{a}: {zeros:.3f} zeros"
                        experts += 1
    assert experts and pruned and s["experts"] > 0
