"""Each option declared once (streamprune/options.py, a method's own in its file): PruneOptions, the click options
of prune/plan/eval, the fingerprint's keys and docs/options.md's table are derived from the declarations and
cannot drift; a new method is its own file plus one registry line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamprune
from streamprune.cli import main
from streamprune.errors import StreamPruneError
from streamprune.methods import METHODS, Method, Pruned, register
from streamprune.options import PLAN, PRUNE, Option, declared, for_command, markdown_table, output_keys
from streamprune.spec import PruneOptions
from tiny import tensors

REPO = Path(__file__).resolve().parents[1]
NOT_JOB_OPTIONS = {"nproc", "as_json", "debug", "help", "_click_default_help", "model", "out"}  # the commands' own: arguments, flags


def cli_params(command: str) -> dict:
    """name -> click parameter of `streamprune <command>` as it parses now."""
    cmd = main.commands[command]
    with cmd.make_context(command, ["--help"], resilient_parsing=True) as ctx:
        return {p.name: p for p in cmd.get_params(ctx)}


def test_prune_options_are_the_declarations():
    o = PruneOptions()
    assert set(o.as_dict()) == set(declared())
    assert all(getattr(o, name) == d.default for name, d in declared().items())
    with pytest.raises(StreamPruneError, match="unknown option 'sparsty'"):
        PruneOptions(sparsty=0.5)
    with pytest.raises(AttributeError):
        o.sparsity = 0.6
    assert o.replace(sparsity=0.6).sparsity == 0.6 and o.sparsity == 0.5


@pytest.mark.parametrize("command", ["prune", "plan", "eval"])
def test_the_cli_options_are_the_declarations(command):
    """Every declaration the command takes is a click option with its default, and the command has no other job
    option (its own arguments and --nproc/--json/--debug aside)."""
    params = cli_params(command)
    want = {o.name: o for o in for_command(command)}
    own = {"eval": {"text", "seqlen", "windows", "expert_group"}, "plan": {"gpu_memory", "host_memory"}}.get(command, set())
    job = {name for name in params if name not in NOT_JOB_OPTIONS and name not in own}
    assert job == set(want) - own
    for name in job:
        assert params[name].default == want[name].default, name
        assert params[name].opts[0] == (want[name].flag or want[name].cli), name


def test_plan_takes_every_output_option_but_the_calibration():
    """A plan is asked about the job prune runs: every option that changes the output (or the memory) is plan's
    as well, except those naming the data (a plan reads no text) and the seed."""
    plan = {o.name for o in for_command(PLAN)}
    assert set(output_keys()) - plan == {"seed", "attn_implementation"}


def test_fingerprint_keys_are_the_output_options(tiny_models, ids_file, tmp_path):
    out = tmp_path / "out"
    streamprune.prune(tiny_models("llama"), out, calib=str(ids_file), nsamples=4, seqlen=16, progress=False)
    state = json.loads((out / ".streamprune" / "state.json").read_text())
    keys = set(state["fingerprint"]["options"])
    assert keys == set(output_keys()) | {"device_type", "ranks"}


def test_docs_options_table_is_the_declarations():
    text = (REPO / "docs" / "options.md").read_text()
    assert markdown_table(PRUNE) in text, "docs/options.md drifted: regenerate with python -m streamprune.options"


def test_a_bad_type_through_the_python_api_is_one_line(tiny_models, tmp_path):
    for kw, match in (({"sparsity": "0.5"}, "--sparsity '0.5': must be a number"),
                      ({"nsamples": 8.0}, "--nsamples 8.0: must be an integer"),
                      ({"activations": "ram"}, "--activations 'ram': choose one of auto, gpu, cpu, disk")):
        with pytest.raises(StreamPruneError, match=match):
            streamprune.prune(tiny_models("llama"), tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_the_method_registry_imports_without_torch():
    """The CLI builds its options from the registry before torch is imported (a bad option costs no torch import)."""
    code = ("import sys\nimport streamprune.methods, streamprune.options, streamprune.cli\n"
            "streamprune.options.declared()\nprint('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.stdout.split() == ["False"], res.stderr


# ---------------------------------------------------------------- a new method: this file and one registry line


class Toy(Method):
    """Wanda's metric with the squared norm raised to `power` (0.5: Wanda itself), and an option of its own."""
    name = "toy"
    needs = frozenset({"sq_norm"})
    options = (Option("toy_power", 1.0, "toy: the power of the squared input norm.", float, output=True, group="toy",
                      commands=(PRUNE, PLAN)),)

    def __init__(self, power: float = 1.0):
        self.power = power

    def prune(self, weight, stats, sparsity, structure, row_chunk) -> Pruned:
        from streamprune.methods.base import scaled_abs_mask

        return Pruned(scaled_abs_mask(weight, stats.sq_norm.float() ** self.power, sparsity, structure, row_chunk))


@pytest.fixture
def toy():
    register(Toy)  # the registry line
    yield Toy
    METHODS.pop(Toy.name)


def test_a_new_method_runs_through_prune_plan_and_the_cli_with_its_own_option(toy, tiny_models, ids_file, tmp_path):
    model = tiny_models("llama")
    kw = dict(calib=str(ids_file), nsamples=8, seqlen=32, progress=False)
    streamprune.prune(model, tmp_path / "wanda", **kw)
    streamprune.prune(model, tmp_path / "toy-half", method="toy", toy_power=0.5, **kw)
    wanda, half = tensors(tmp_path / "wanda"), tensors(tmp_path / "toy-half")
    assert all(bool((wanda[k] == half[k]).all()) for k in wanda)   # the option reached the method: Wanda exactly

    res = CliRunner().invoke(main, ["prune", str(model), str(tmp_path / "toy-cli"), "--calib", str(ids_file),
                                    "--nsamples", "8", "--seqlen", "32", "--method", "toy", "--toy-power", "1",
                                    "--no-progress"])
    assert res.exit_code == 0, res.stderr
    one = tensors(tmp_path / "toy-cli")
    assert any(not bool((wanda[k] == one[k]).all()) for k in wanda)
    state = json.loads((tmp_path / "toy-cli" / ".streamprune" / "state.json").read_text())
    assert state["fingerprint"]["options"]["toy_power"] == 1.0 and state["fingerprint"]["options"]["method"] == "toy"

    assert "--toy-power" in CliRunner().invoke(main, ["prune", "--help"]).stdout
    res = CliRunner().invoke(main, ["plan", str(model), "--method", "toy", "--toy-power", "2", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["method"] == "toy"
    assert streamprune.plan(model, method="toy", toy_power=2.0)["method"] == "toy"
    assert "`--toy-power`" in markdown_table()


def test_a_name_already_taken_is_refused():
    class Other(Toy):
        name = "wanda"

    with pytest.raises(StreamPruneError, match="'wanda' is empty or taken"):
        register(Other)


# ---------------------------------------------------------------- the import graph


def import_graph() -> dict:
    """module -> the package modules it imports, at module level or inside functions alike."""
    import ast

    root = REPO / "streamprune"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level:
                base = package.rsplit(".", n.level - 1)[0] if n.level > 1 else package
                target = f"{base}.{n.module}" if n.module else base
                subs = [f"{target}.{a.name}" for a in n.names if f"{target}.{a.name}" in mods]
                graph[m] |= {t for t in (subs if len(subs) == len(n.names) else [target, *subs]) if t in mods} - {m}
            elif isinstance(n, (ast.Import, ast.ImportFrom)) and not getattr(n, "level", 0):
                names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                graph[m] |= {x for x in names if x in mods} - {m}
    return graph


def test_no_import_cycle_and_no_module_imports_the_cli():
    graph = import_graph()
    assert [m for m, deps in graph.items() if "streamprune.cli" in deps] == ["streamprune.__main__"]

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen
    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"
    for base in ("streamprune.errors", "streamprune.choices", "streamprune.targets", "streamprune.dtypes",
                 "streamprune.units", "streamprune.version"):
        assert graph[base] <= {"streamprune.errors"}, (base, graph[base])  # the vocabulary imports nothing else
