"""Every bad input: one clear line on stderr, a non-zero exit, the input untouched, nothing published."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from tiny import write_ids

INDEX = "model.safetensors.index.json"


def tree(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))


def expect_error(model, out, *args, match, code=2):
    """Run the CLI in this process (the same entry point as the console script) and check the failure."""
    from click.testing import CliRunner

    from streamprune.cli import main

    def published():
        try:
            return (out / INDEX).exists()
        except OSError:  # ENAMETOOLONG: an OUT no file can be in
            return False

    before = tree(model) if model.is_dir() else None
    published_before = published()
    res = CliRunner().invoke(main, ["prune", str(model), str(out), *map(str, args), "--no-progress"])
    assert res.exit_code == code, (res.exit_code, res.stderr, res.exception)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    # warnings (e.g. half precision on the CPU) may come first; the refusal itself is one line
    lines = [l for l in lines if not l.startswith("streamprune: warning: ")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("streamprune: error: ") and match in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    if before is not None:
        assert tree(model) == before, "the input directory changed"
    assert published() == published_before
    return lines[0]


@pytest.fixture
def model(tiny_models, copy_model):
    return copy_model(tiny_models("llama"))


def shard_of(model, name):
    return model / json.loads((model / INDEX).read_text())["weight_map"][name]


def test_no_config(model, ids_file, tmp_path):
    (model / "config.json").unlink()
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="no config.json")


def test_not_a_directory(tmp_path, ids_file):
    expect_error(tmp_path / "nope", tmp_path / "out", "--calib", ids_file, match="no such model directory")


def test_encoder_only_architecture(model, ids_file, tmp_path):
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                   "hidden_size": 64, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "intermediate_size": 128}))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="unsupported architecture")


def test_missing_shard(model, ids_file, tmp_path):
    shard_of(model, "model.layers.1.mlp.up_proj.weight").unlink()
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="is missing")


def test_truncated_shard(model, ids_file, tmp_path):
    shard = shard_of(model, "model.layers.2.mlp.down_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="truncated shard")


def test_corrupt_header(model, ids_file, tmp_path):
    shard = shard_of(model, "model.layers.0.self_attn.q_proj.weight")
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"{" + b"x" * (n - 1)
    shard.write_bytes(bytes(data))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="corrupt safetensors header")


def test_absurd_header_length(model, ids_file, tmp_path):
    shard = shard_of(model, "model.layers.0.self_attn.q_proj.weight")
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    shard.write_bytes(bytes(data))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="corrupt safetensors header")


def test_shape_disagrees_with_config(model, ids_file, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(cfg))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match="the config implies")


def test_block_tensor_missing(model, ids_file, tmp_path):
    from safetensors.torch import load_file, save_file

    name = "model.layers.1.self_attn.o_proj.weight"
    shard = shard_of(model, name)
    tensors = load_file(shard)
    del tensors[name]
    if tensors:
        save_file(tensors, shard, metadata={"format": "pt"})
    else:
        shard.unlink()
    index = json.loads((model / INDEX).read_text())
    del index["weight_map"][name]
    (model / INDEX).write_text(json.dumps(index))
    expect_error(model, tmp_path / "out", "--calib", ids_file, match=f"tensor {name} is missing")


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_sparsity_out_of_range(value, model, ids_file, tmp_path):
    expect_error(model, tmp_path / "out", "--calib", ids_file, "--sparsity", value, match="strictly between 0 and 1")


@pytest.mark.parametrize("structure,match", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("2:x", "expected"),
                                             ("3:7", "not divisible by M=7")])
def test_bad_structure(structure, match, model, ids_file, tmp_path):
    expect_error(model, tmp_path / "out", "--calib", ids_file, "--structure", structure, match=match)


def test_calibration_empty(model, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    expect_error(model, tmp_path / "out", "--calib", tmp_path / "empty.txt", match="empty")


def test_calibration_not_utf8(model, tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"hello \xff\xfe world")
    expect_error(model, tmp_path / "out", "--calib", tmp_path / "bin.txt", match="not UTF-8")


def test_calibration_missing(model, tmp_path):
    expect_error(model, tmp_path / "out", "--calib", tmp_path / "nope.txt", match="no such file")


def test_calibration_too_few_windows(model, tmp_path):
    calib = write_ids(tmp_path / "ids.jsonl", 3, 32)
    expect_error(model, tmp_path / "out", "--calib", calib, "--nsamples", "8", "--seqlen", "32", match="3 input_ids windows")


def test_calibration_windows_too_short(model, tmp_path):
    calib = write_ids(tmp_path / "ids.jsonl", 8, 16)
    expect_error(model, tmp_path / "out", "--calib", calib, "--nsamples", "8", "--seqlen", "32", match="has 16 tokens")


def test_calibration_bad_jsonl(model, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"input_ids": [1, 2]}\nnot json\n')
    expect_error(model, tmp_path / "out", "--calib", tmp_path / "c.jsonl", match=":2: not valid JSON")


def test_calibration_token_out_of_vocab(model, tmp_path):
    calib = write_ids(tmp_path / "ids.jsonl", 8, 32, vocab=100000)
    expect_error(model, tmp_path / "out", "--calib", calib, "--nsamples", "8", "--seqlen", "32", match="outside the vocabulary")


def test_calibration_text_too_short(smollm2, tmp_path):
    (tmp_path / "short.txt").write_text("Just a few words of text.")
    expect_error(smollm2, tmp_path / "out", "--calib", tmp_path / "short.txt", "--nsamples", "4", "--seqlen", "64",
                 match="too little text")


def test_text_calibration_without_tokenizer(model, tmp_path):
    (tmp_path / "t.txt").write_text("some text " * 100)
    expect_error(model, tmp_path / "out", "--calib", tmp_path / "t.txt", match="no usable tokenizer")


def test_seqlen_beyond_context(model, ids_file, tmp_path):
    expect_error(model, tmp_path / "out", "--calib", ids_file, "--seqlen", "4096", match="beyond the model's context (256")


@pytest.mark.parametrize("device,match", [("cuda:7", "cuda"), ("tpu", "not a device"), ("meta", "only cpu and cuda")])
def test_device_that_does_not_exist(device, match, model, ids_file, tmp_path):
    expect_error(model, tmp_path / "out", "--calib", ids_file, "--device", device, match=match)


def test_out_equals_model(model, ids_file):
    expect_error(model, model, "--calib", ids_file, match="is the model directory or inside it")


def test_out_inside_model(model, ids_file):
    expect_error(model, model / "pruned", "--calib", ids_file, match="is the model directory or inside it")
    assert not (model / "pruned").exists()


def test_out_not_empty(model, ids_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    expect_error(model, out, "--calib", ids_file, "--nsamples", "8", match="not empty")
    assert (out / "notes.txt").read_text() == "mine"
    res = cli("prune", model, out, "--calib", ids_file, "--nsamples", "8", "--seqlen", "32", "--overwrite", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert not (out / "notes.txt").exists() and (out / INDEX).is_file()


def test_missing_calibration_for_wanda(model, tmp_path):
    expect_error(model, tmp_path / "out", match="needs calibration text")


def test_unknown_method(model, ids_file, tmp_path):
    expect_error(model, tmp_path / "out", "--calib", ids_file, "--method", "nope", match="--method 'nope'")


def test_debug_shows_traceback(model, tmp_path):
    res = cli("prune", model, tmp_path / "out", "--sparsity", "2", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr and "StreamPruneError" in res.stderr


def test_resume_without_job(tmp_path):
    res = cli("resume", tmp_path)
    assert res.returncode == 2 and "no streamprune job here" in res.stderr


def test_disk_space_is_checked(model, ids_file, tmp_path):
    """A tmpfs too small for the output but larger than the 1 MiB margin (so an estimate of zero would pass): a
    clear error naming both numbers, before anything is written."""
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={1024 * 1024 + size // 2}", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        line = expect_error(model, mnt / "out", "--calib", ids_file, "--nsamples", "8", "--seqlen", "32",
                            match="not enough disk space")
        assert "needs" in line and "is free" in line
    finally:
        subprocess.run(["umount", str(mnt)])


def test_running_out_of_space_mid_job_resumes(model, ids_file, tmp_path):
    """ENOSPC while writing: clean failure, then the job resumes once space is freed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + 2 * 1024 * 1024}", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "out"
        filler = mnt / "filler"
        env_args = ("--calib", ids_file, "--nsamples", "8", "--seqlen", "32", "--no-progress", "--snapshot-every", "0")
        # pass the up-front check, then take the space away while the job runs
        proc = subprocess.Popen([sys.executable, "-m", "streamprune", "prune", str(model), str(out), *map(str, env_args)],
                                stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, STREAMPRUNE_FAULT_AT="block_start:2", STREAMPRUNE_FAULT_SIGNAL="STOP"))
        import time
        deadline = time.time() + 120
        while time.time() < deadline:
            st = open(f"/proc/{proc.pid}/stat").read().split()[2] if proc.poll() is None else "X"
            if st == "T":
                break
            time.sleep(0.05)
        free = shutil.disk_usage(mnt).free
        filler.write_bytes(b"\0" * max(0, free - 4096))
        proc.send_signal(__import__("signal").SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and "no space left on device" in lines[0] and "streamprune resume" in lines[0]
        assert not (out / INDEX).exists()
        filler.unlink()
        res = cli("resume", out)
        assert res.returncode == 0, res.stderr
        assert (out / INDEX).is_file()
    finally:
        subprocess.run(["umount", str(mnt)])


# ------------------------------------------------------------------ usage errors, fast refusals

@pytest.mark.parametrize("args,match", [(["--sparsity", "abc"], "'--sparsity'"), (["--bogus"], "--bogus"),
                                        (["--gpu-memory-limit", "abc"], "--gpu-memory-limit 'abc'"),
                                        (["--nsamples", "1.5"], "'--nsamples'")])
def test_usage_errors_are_one_line(args, match, model, tmp_path):
    """A bad option value, an unknown option: one line naming the option, exit 2 (click's own form starts with
    "Usage:" and takes three), in the console script and in `main` alike."""
    from click.testing import CliRunner

    from streamprune.cli import main

    for stderr, code in ((lambda r: (r.stderr, r.returncode))(cli("prune", model, tmp_path / "out", *args)),
                         (lambda r: (r.stderr, r.exit_code))(CliRunner().invoke(main, ["prune", str(model),
                                                                                       str(tmp_path / "out"), *args]))):
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1, stderr
        assert lines[0].startswith("streamprune: error: ") and match in lines[0] and "Usage" not in stderr, lines[0]
    assert not (tmp_path / "out").exists()


def test_sparsity_given_as_a_percentage_suggests_the_fraction(model, tmp_path):
    line = expect_error(model, tmp_path / "out", "--sparsity", "50", match="strictly between 0 and 1")
    assert "did you mean 0.5?" in line


@pytest.mark.parametrize("args", [["--sparsity", "50"], ["--method", "nope"], ["--dtype", "int8"],
                                  ["--structure", "4:2"], ["--nproc", "0"], ["--gpu-memory-limit", "lots"]])
def test_a_refused_option_never_imports_torch(args, model, tmp_path):
    """Options are checked before torch (3-10 s to import on a busy machine) is loaded: the refusal is immediate."""
    code = ("import sys\nfrom streamprune.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, "prune", str(model), str(tmp_path / "out"), *args],
                         capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["2", "False", "False"], (res.stdout, res.stderr)
    assert res.stderr.startswith("streamprune: error: ") and len(res.stderr.strip().splitlines()) == 1


def test_calibration_json_document_is_not_jsonl(model, tmp_path):
    """A valid JSON file that is not JSON Lines (a config.json, an array): said so, not "not valid JSON"."""
    line = expect_error(model, tmp_path / "out", "--calib", model / "config.json", match="not JSON Lines")
    assert "one JSON object over" in line and '"input_ids"' in line
    (tmp_path / "array.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    expect_error(model, tmp_path / "out", "--calib", tmp_path / "array.json", match="one JSON array over")


# ------------------------------------------------------------------ OUT paths the filesystem cannot hold

def test_out_name_longer_than_the_filesystem_allows(model, ids_file, tmp_path):
    expect_error(model, tmp_path / ("o" * 300), "--calib", ids_file, "--nsamples", "8", "--seqlen", "32", match="longer than the filesystem allows (255)")
    expect_error(model, tmp_path / ("o" * 300) / "out", "--calib", ids_file, match="longer than the filesystem allows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_out_path_beyond_path_max(model, ids_file, tmp_path):
    """A path the job's own files below OUT would take past PATH_MAX (4096 on Linux): refused before anything is
    created, not at the first file."""
    deep = tmp_path.joinpath(*["d" * 200] * (4096 // 201))
    line = expect_error(model, deep, "--calib", ids_file, "--nsamples", "8", "--seqlen", "32", match="the system's limit of 4096 bytes")
    assert "choose a shorter path" in line
    assert not (tmp_path / ("d" * 200)).exists()


# ------------------------------------------------------------------ a file-size limit (ulimit -f)

def test_file_size_limit_mid_job_is_one_line_and_resumes(model, ids_file, tmp_path):
    """EFBIG as ENOSPC: a real process under RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails with EFBIG
    instead of the signal killing the process) stops with one line; resumed without the limit, the output is
    byte for byte an unlimited job's."""
    import resource
    import signal

    args = ("--calib", ids_file, "--nsamples", "8", "--seqlen", "32", "--no-progress")
    clean = cli("prune", model, tmp_path / "clean", *args)
    assert clean.returncode == 0, clean.stderr
    sizes = sorted({p.stat().st_size for p in (tmp_path / "clean").glob("*.safetensors")})
    assert len(sizes) > 1
    limit = (sizes[-1] + sizes[0]) // 2  # the first shard (embeddings and head) fits, the largest does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "streamprune", "prune", str(model), str(out), *map(str, args)],
                         capture_output=True, text=True, timeout=300, preexec_fn=limited,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert res.returncode == 2, (res.returncode, -res.returncode == signal.SIGXFSZ, res.stderr)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "file-size limit (ulimit -f)" in lines[0] and "streamprune resume" in lines[0], lines
    assert not (out / INDEX).exists()
    res = cli("resume", out)
    assert res.returncode == 0, res.stderr
    published = [{k: v for k, v in tree(d).items() if not k.startswith(".streamprune")} for d in (out, tmp_path / "clean")]
    assert published[0] == published[1]


def test_the_dtype_names_checked_without_torch_are_torch_dtypes():
    """choices.py names the dtypes for the checks made before torch is loaded; each is a torch dtype, and the
    declaration's choices are among them."""
    import torch

    from streamprune import choices
    from streamprune.options import declared
    from streamprune.spec import parse_dtype

    assert {parse_dtype(name) for name in choices.DTYPES} == {torch.float32, torch.bfloat16, torch.float16}
    assert set(declared()["dtype"].choices) <= set(choices.DTYPES)


def test_python_api_is_four_functions():
    """`streamprune.prune`, `plan`, `evaluate` and `report` stay the API's functions once the package's modules are
    imported (a submodule of the same name would replace its function on the package)."""
    import importlib
    import inspect

    import streamprune

    for mod in ("cli", "job", "planner", "reporting", "evaluation", "spec"):
        importlib.import_module(f"streamprune.{mod}")
    for name in streamprune.__all__:
        fn = getattr(streamprune, name)
        assert inspect.isfunction(fn) and len(fn.__doc__) > 200, name
    assert streamprune.__all__ == ["prune", "plan", "evaluate", "report"]
