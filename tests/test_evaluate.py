"""Streamed perplexity equals an in-memory transformers evaluation with the same windows and formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from streamprune.errors import StreamPruneError
from streamprune.evaluation import evaluate, read_token_stream



@torch.no_grad()
def in_memory_ppl(model_dir, windows: torch.Tensor) -> float:
    """Whole model, float32, batch 1: exp(mean over windows of the mean shifted-token cross-entropy)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    losses = [F.cross_entropy(model(input_ids=w[None], use_cache=False).logits[0, :-1], w[1:]).item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def stream(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("gemma3", torch.float32),
                                          ("gemma3", torch.bfloat16)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_matches_in_memory(tiny_models, family, dtype, batch_size):
    """Against transformers' own model in float32 (the compute dtype), bf16 checkpoints included."""
    model = tiny_models(family, dtype=dtype)
    ids = stream(7 * 32 + 5)  # 7 windows of 32 (longer than gemma3's sliding window of 8), a dropped tail
    got = evaluate(model, ids=ids, seqlen=32, batch_size=batch_size, progress=False)
    assert (got["windows"], got["seqlen"], got["tokens"]) == (7, 32, 224)
    assert got["ppl"] == pytest.approx(in_memory_ppl(model, ids[:224].view(7, 32)), rel=1e-5)
    assert got["nll"] == pytest.approx(math.log(got["ppl"]))
    assert got["peak_rss_bytes"] > 0 and got["wall_seconds"] > 0


def test_first_windows_and_default_seqlen(tiny_models):
    model = tiny_models("llama")  # context 256
    ids = stream(3 * 256 + 10)
    got = evaluate(model, ids=ids, progress=False)
    assert (got["seqlen"], got["windows"]) == (256, 3)
    first = evaluate(model, ids=ids, seqlen=16, windows=2, progress=False)
    assert first["ppl"] == pytest.approx(in_memory_ppl(model, ids[:32].view(2, 16)), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text_file="missing.txt"), "--text .*missing.txt: no such file"),
    (dict(ids=stream(20), seqlen=32), "too short for one window"),
    (dict(ids=stream(2000), seqlen=512), "beyond the model's context"),
    (dict(ids=stream(100), seqlen=32, windows=4), "--windows asks for 4"),
    (dict(ids=stream(100) + 1000, seqlen=32), "outside the vocabulary"),
])
def test_bad_input_is_one_clear_error(tiny_models, tmp_path, kwargs, message):
    if "text_file" in kwargs:
        kwargs["text_file"] = tmp_path / kwargs["text_file"]
    with pytest.raises(StreamPruneError, match=message) as err:
        evaluate(tiny_models("llama"), progress=False, **kwargs)
    assert "\n" not in str(err.value)


@pytest.fixture
def test_text(text_file):
    return text_file


@pytest.mark.slow
def test_smollm2_wikitext_matches_in_memory(smollm2, test_text):
    got = evaluate(smollm2, test_text, seqlen=512, windows=4, progress=False)
    windows = read_token_stream(test_text, smollm2)[:4 * 512].view(4, 512)
    want = in_memory_ppl(smollm2, windows)
    print(f"SmolLM2-135M on real text, 4 x 512: streamed {got['ppl']:.6f}, in-memory {want:.6f}")
    assert got["ppl"] == pytest.approx(want, rel=1e-4)
    assert 5 < got["ppl"] < 100


def test_smollm2_short_text_is_one_clear_error(smollm2, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    with pytest.raises(StreamPruneError, match="too short for one window of --seqlen 512"):
        evaluate(smollm2, short, seqlen=512, progress=False)
