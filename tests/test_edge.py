"""Edge outputs llama.cpp can quantize (`--structure width` at the default `--width-multiple`): every shrunk
dimension a multiple of 256 (llama.cpp's k-quant block along each row); the rounding stated as requested vs
achieved before any work (`plan`) and after it (the summary, `report`); a width llama.cpp would store in F16 or a
larger legacy type warned about in one line; a rounding that removes nothing or everything refused."""

import json
import shutil

import pytest
from safetensors import safe_open

import streamprune
from conftest import FIXTURES
from test_bad_input import cli, expect_error
from test_width import ARGS as WIDTH_ARGS

ARGS = {k: v for k, v in WIDTH_ARGS.items() if k != "width_multiple"}  # the default multiple here


def shapes(out):
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            found.update({k: h.get_slice(k).get_shape() for k in h.keys()})
    return found


def test_default_width_output_quantizes_in_llama_cpp(tiny_models, ids_file, tmp_path):
    """768 channels at 30%: 537.6 rounds to 512, not to a multiple of 8 (536); every row the shrink touched is a
    multiple of 256 long, and the summary says what was asked and what was achieved, and the size after."""
    model = tiny_models("llama", intermediate_size=768, realistic=False)
    out = tmp_path / "out"
    s = streamprune.prune(model, out, calib=str(ids_file), structure="width", sparsity=0.3, **ARGS)
    w = s["intermediate_size"]
    assert (w["before"], w["after"], w["multiple"]) == (768, 512, 256)
    assert w["requested"] == 0.3 and w["achieved"] == pytest.approx(1 - 512 / 768, abs=1e-4)
    assert w["llama_cpp_warning"] is None
    found = shapes(out)
    shrunk = {k: v for k, v in found.items() if 512 in v}
    assert shrunk and all(k.endswith(("down_proj.weight", "gate_proj.weight", "up_proj.weight")) for k in shrunk)
    for k, v in found.items():
        if k.endswith("down_proj.weight"):
            assert v[1] % 256 == 0, (k, v)  # each row of ffn_down: the shrunk dimension
        if k.endswith(("gate_proj.weight", "up_proj.weight")):
            assert v[0] % 256 == 0, (k, v)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 512
    assert s["bytes"]["after"] == sum(f.stat().st_size for f in out.glob("*.safetensors")) - \
        sum(8 + int.from_bytes((out / f.name).read_bytes()[:8], "little") for f in out.glob("*.safetensors"))
    assert s["bytes"]["after"] < s["bytes"]["before"]
    res = cli("report", out)
    assert res.returncode == 0, res.stderr
    assert "MLP channels removed: requested 0.3000, achieved 0.3333 (kept a multiple of 256)" in res.stdout
    assert "warning" not in res.stdout


@pytest.mark.parametrize("name, intermediate", [("llama-2-7b", 11008), ("llama-3.1-8b", 14336)])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.25, 0.3, 0.4, 0.5])
def test_planned_widths_of_real_configs(name, intermediate, ratio, tmp_path):
    """The plan of a width job on the published configs (no weights): the width kept is a multiple of 256, the
    fraction achieved is the rounding of the one requested, and the size after is the checkpoint less exactly
    the removed rows and columns (3 x hidden x channels per block, 2 bytes each)."""
    from streamprune.planner import plan_for

    (tmp_path / "m").mkdir()
    shutil.copy(FIXTURES / "configs" / f"{name}.json", tmp_path / "m" / "config.json")
    r = plan_for(tmp_path / "m", host_memory="64GB", structure="width", sparsity=ratio, nsamples=8, seqlen=64)
    w = r["width"]
    assert w["before"] == intermediate and w["after"] % 256 == 0 and 0 < w["after"] < intermediate
    assert abs(w["after"] - intermediate * (1 - ratio)) <= 128
    assert w["achieved"] == pytest.approx(1 - w["after"] / intermediate, abs=1e-4)
    assert w["llama_cpp_warning"] is None
    assert r["checkpoint_bytes"] - r["bytes_after"] == 32 * 3 * 4096 * (intermediate - w["after"]) * 2


def test_plan_states_the_rounding_before_any_work(tiny_models, tmp_path):
    model = tiny_models("llama", intermediate_size=1536, realistic=False)
    res = cli("plan", model, "--structure", "width", "--sparsity", "0.2")
    assert res.returncode == 0, res.stderr
    assert "MLP channels removed: requested 0.2000, achieved 0.1667 (kept 1280 of 1536, a multiple of 256)" \
        in res.stdout
    assert "warning" not in res.stdout
    res = cli("plan", model, "--structure", "width", "--sparsity", "0.2", "--width-multiple", "8")
    assert res.returncode == 0, res.stderr
    assert "kept 1232 of 1536" in res.stdout
    assert "warning: MLP width 1232 is not a multiple of 32: llama.cpp stores every down projection (ffn_down) " \
           "in F16" in res.stdout


def test_a_width_llama_cpp_cannot_quantize_is_warned_about(tiny_models, ids_file, tmp_path):
    """--width-multiple 8 on 160 channels at 25%: 120, which llama.cpp stores in F16; one line on stderr when the
    job starts, again in the summary and in `report`."""
    out = tmp_path / "out"
    res = cli("prune", tiny_models("llama"), out, "--calib", ids_file, "--nsamples", "8", "--seqlen", "32",
              "--structure", "width", "--sparsity", "0.25", "--width-multiple", "8", "--no-progress")
    assert res.returncode == 0, res.stderr
    line = "warning: MLP width 120 is not a multiple of 32: llama.cpp stores every down projection"
    assert sum(line in x for x in res.stderr.splitlines()) == 1, res.stderr
    assert line in res.stdout and "requested 0.2500, achieved 0.2500 (kept 120 of 160, a multiple of 8)" in res.stdout
    assert line in cli("report", out).stdout
    # 160 x 0.5 / 32 = 2.5 rounds (half to even) to 2: 64 channels
    s = streamprune.prune(tiny_models("llama"), tmp_path / "k", calib=str(ids_file), structure="width",
                          sparsity=0.5, width_multiple=32, **ARGS)
    assert s["intermediate_size"]["llama_cpp_warning"].startswith("MLP width 64 is not a multiple of 256: "
                                                                  "llama.cpp's k-quants")


@pytest.mark.parametrize("ratio, what", [("0.25", "keeps 0, nothing to keep"), ("0.05", "keeps 256, nothing to remove")])
def test_rounding_that_removes_nothing_or_everything_is_refused(ratio, what, tiny_models, ids_file, tmp_path,
                                                                copy_model):
    """160 channels cannot be kept as a multiple of 256: one line, before anything is written (plan too)."""
    model = copy_model(tiny_models("llama"))
    err = expect_error(model, tmp_path / "out", "--calib", ids_file, "--nsamples", "4", "--seqlen", "16",
                       "--structure", "width", "--sparsity", ratio, match=what)
    assert "smaller --width-multiple" in err
    res = cli("plan", model, "--structure", "width", "--sparsity", ratio)
    assert res.returncode == 2 and what in res.stderr and len(res.stderr.strip().splitlines()) == 1
