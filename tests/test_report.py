"""The sparsity report of a pruned checkpoint, read back from its shards."""

import importlib.util
import shutil
import sys

import pytest

import streamprune
from streamprune.errors import StreamPruneError
from streamprune.reporting import format_report, report
from test_bad_input import cli
from tiny import tensors

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
    p = d["pruning"]
    assert (p["kind"], p["structure"], p["method"], p["target_sparsity"], p["source"]) == \
        ("N:M" if pruned.name == "2-4" else "unstructured", "2:4" if pruned.name == "2-4" else "unstructured",
         "wanda", 0.5, "job state")
    assert format_report(d).splitlines()[1].startswith(
        "pruning: N:M 2:4, method wanda" if pruned.name == "2-4" else "pruning: unstructured, method wanda")


def test_without_job_state_the_kind_is_inferred_and_says_so(pruned, tmp_path):
    """A checkpoint streamprune did not leave its state in: the kind is read from the zeros, labelled as such."""
    bare = tmp_path / "bare"
    shutil.copytree(pruned, bare, ignore=shutil.ignore_patterns(".streamprune"))
    p = report(bare)["pruning"]
    assert p["source"].startswith("inferred from the weights") and p["method"] is None
    assert (p["kind"], p["structure"]) == (("N:M", "2:4") if pruned.name == "2-4" else ("unstructured", None))


def test_dense_model_and_table(tiny_models):
    d = report(tiny_models("llama"))
    assert d["overall"] == 0.0
    assert d["pruning"]["kind"] == "unknown"  # dense, or width-pruned without its state: not told apart
    table = format_report(d)
    assert table.splitlines()[1].startswith("pruning: unknown (inferred from the weights")
    assert "q_proj" in table and "down_proj" in table
    assert table.splitlines()[-1] == "overall 0.0000"
    assert table.splitlines()[-2] == "2:4 along the input dimension: 0 of 21 weights"
    assert len(table.splitlines()) == 3 + 3 + 2  # title, kind, header, a row per block, 2:4, overall


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


@pytest.fixture(scope="module")
def width_out(tiny_models, ids_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("width") / "out"
    streamprune.prune(tiny_models("llama"), out, calib=str(ids_file), nsamples=4, seqlen=16, sparsity=0.25,
                      structure="width", width_multiple=8, progress=False)  # 160 holds no multiple of 256
    return out


def test_width_output_reports_widths_parameters_and_size(width_out, tiny_models, tmp_path):
    """Width pruning adds no zeros: the report gives each block's MLP width, and parameters and bytes before
    (as the input held them) and after."""
    model = tiny_models("llama")
    d = report(width_out)
    assert d["pruning"]["kind"] == "width" and d["pruning"]["source"] == "job state"
    w = d["width"]
    assert w["intermediate_size"] == {"before": 160, "after": 120}
    assert w["blocks"] == [{"index": i, "before": 160, "after": 120} for i in range(3)]
    dense, pruned = tensors(model), tensors(width_out)
    assert w["parameters"] == {"before": sum(t.numel() for t in dense.values()),
                               "after": sum(t.numel() for t in pruned.values())}
    assert w["bytes"] == {"before": sum(t.nbytes for t in dense.values()),
                          "after": sum(t.nbytes for t in pruned.values())}
    res = cli("report", width_out)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1].startswith("pruning: width (whole MLP channels removed), method wanda, target width reduction 0.25")
    assert [line.split()[1:] for line in lines[3:6]] == [["160", "->", "120"]] * 3
    p = w["parameters"]
    assert f"parameters {p['before']:,} -> {p['after']:,}" in res.stdout
    assert "2:4" not in res.stdout and "overall" not in res.stdout


def test_width_png_draws_the_widths(width_out, tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    import matplotlib.image

    png = tmp_path / "width.png"
    report(width_out, png=str(png))
    image = matplotlib.image.imread(png)
    # the bars: the 'after' colour (tab:blue) and the 'before' remainder (lightgray) both cover real area
    rgb = (image[..., :3] * 255).round()
    blue = ((abs(rgb - [31, 119, 180]).sum(-1)) < 6).mean()
    gray = ((abs(rgb - [211, 211, 211]).sum(-1)) < 6).mean()
    assert blue > 0.1 and gray > 0.02, (blue, gray)
