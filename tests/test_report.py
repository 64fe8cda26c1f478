"""The sparsity report of a pruned checkpoint, read back from its shards."""

import importlib.util
import sys

import pytest

import streamprune
from streamprune.errors import StreamPruneError
from streamprune.report import format_report, report

LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.fixture(scope="module", params=["unstructured", "2:4"])
def pruned(request, tiny_models, ids_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / request.param.replace(":", "-")
    streamprune.prune(tiny_models("llama"), out, calib=str(ids_file), nsamples=4, seqlen=16, sparsity=0.5,
                      structure=request.param, progress=False)
    return out


def test_every_linear_of_every_block_is_half_zero(pruned):
    d = report(pruned)
    assert [b["index"] for b in d["blocks"]] == [0, 1, 2]
    for b in d["blocks"]:
        assert set(b["linears"]) == LINEARS
        assert all(s == 0.5 for s in b["linears"].values()), b
        assert b["sparsity"] == 0.5 and b["experts"] == {}
        assert all(b["nm_2_4"].values()) == (pruned.name == "2-4"), b["nm_2_4"]
    assert d["overall"] == 0.5


def test_dense_model_and_table(tiny_models):
    d = report(tiny_models("llama"))
    assert d["overall"] == 0.0
    table = format_report(d)
    assert "q_proj" in table and "down_proj" in table
    assert table.splitlines()[-1] == "overall 0.0000"
    assert table.splitlines()[-2] == "2:4 along the input dimension: 0 of 21 weights"
    assert len(table.splitlines()) == 2 + 3 + 2  # title, header, a row per block, 2:4, overall


def test_png(pruned, tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    png = tmp_path / "sparsity.png"
    report(pruned, png=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_says_how_to_install(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(StreamPruneError, match="pip install matplotlib"):
        report(tiny_models("llama"), png=str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_not_a_model_directory(tmp_path):
    with pytest.raises(StreamPruneError, match="no such model directory"):
        report(tmp_path / "missing")
