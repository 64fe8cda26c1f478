"""MODEL beyond a local directory: a Hugging Face Hub id served from the local hub cache (offline), refused in one
line when neither local nor cached (offline, or the download failing), and a GGUF file named for what it is."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from tiny import byte_tokenizer

REPO_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, model_dir, repo_id=REPO_ID):
    """`model_dir` placed into a hub cache at `root` in the hub's own layout: content-addressed blobs, a snapshot
    of symbolic links to them per commit, and refs/main naming the commit."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return root


@pytest.fixture
def cached(tiny_models, tmp_path):
    model = byte_tokenizer(shutil.copytree(tiny_models("llama"), tmp_path / "model"))
    cache = hub_cache(tmp_path / "hub", model)
    from huggingface_hub import scan_cache_dir

    assert [r.repo_id for r in scan_cache_dir(cache).repos] == [REPO_ID]  # the hub's own reader knows the layout
    return model, cache


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))


def one_line(r, code=2):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("streamprune: error: "), \
        (r.returncode, r.stderr)
    return lines[0]


def files(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def test_hub_id_from_the_local_cache_offline(cached, ids_file, tmp_path):
    model, cache = cached
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    args = ("--calib", ids_file, "--nsamples", 8, "--seqlen", 32, "--no-progress")
    r = cli("prune", REPO_ID, tmp_path / "from-hub", *args, env=env)
    assert r.returncode == 0, r.stderr
    r2 = cli("prune", model, tmp_path / "from-dir", *args)
    assert r2.returncode == 0, r2.stderr
    assert files(tmp_path / "from-hub") == files(tmp_path / "from-dir")  # the same bytes as the directory itself
    # resume continues from the snapshot directory it recorded, with no hub involved
    r = cli("resume", tmp_path / "from-hub", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert r.returncode == 0 and "already complete" in r.stderr, r.stderr


def test_plan_eval_report_take_a_hub_id(cached, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from huggingface_hub import constants

    from streamprune.cli import main

    _, cache = cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # the client reads its environment at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "t.txt").write_text("some plain text to evaluate on. " * 20)
    for args in (["plan", REPO_ID], ["eval", REPO_ID, "--text", tmp_path / "t.txt", "--seqlen", 32, "--no-progress"],
                 ["report", REPO_ID]):
        res = CliRunner().invoke(main, [*map(str, args)])
        assert res.exit_code == 0, (args, res.stderr, res.exception)


def test_incomplete_snapshot_offline_names_what_it_lacks(cached, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from huggingface_hub import constants

    from streamprune.cli import main

    _, cache = cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snap = cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    shard = sorted(snap.glob("model-*.safetensors"))[1]
    shard.unlink()
    res = CliRunner().invoke(main, ["plan", REPO_ID])
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1, (res.stderr, res.exception)
    assert f"its snapshot in the local Hugging Face cache ({snap}) lacks {shard.name}" in lines[0], lines[0]
    assert "downloading is disabled (HF_HUB_OFFLINE)" in lines[0]
    for f in snap.glob("*.safetensors*"):
        f.unlink()
    res = CliRunner().invoke(main, ["plan", REPO_ID])
    assert "lacks model.safetensors or model.safetensors.index.json" in res.stderr, res.stderr


def test_hub_id_not_cached_offline_is_one_line(tmp_path):
    r = cli("prune", "nosuch-org/nosuch-model", tmp_path / "o", "--method", "magnitude",
            env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    msg = one_line(r)
    assert "nosuch-org/nosuch-model: neither a local directory nor in the local Hugging Face cache" in msg, msg
    assert "downloading is disabled (HF_HUB_OFFLINE)" in msg, msg
    assert not (tmp_path / "o").exists()


def test_hub_id_download_failing_is_one_line(tmp_path):
    """Downloads allowed, the hub unreachable (an endpoint on a closed local port): one line, no retries printed."""
    r = cli("plan", "nosuch-org/nosuch-model",
            env={"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    msg = one_line(r)
    assert "neither a local directory nor in the local Hugging Face cache" in msg and "downloading failed" in msg, msg


def write_gguf(path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("command", ["prune", "plan", "eval", "report"])
def test_gguf_file_is_named_with_the_way_forward(command, tmp_path):
    from click.testing import CliRunner

    from streamprune.cli import main

    gguf_file = write_gguf(tmp_path / "m.Q4_1.gguf")
    extra = {"prune": [tmp_path / "o", "--method", "magnitude"], "eval": ["--text", gguf_file]}.get(command, [])
    res = CliRunner().invoke(main, [command, str(gguf_file), *map(str, extra)])
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1, (res.stderr, res.exception)
    assert "m.Q4_1.gguf: a GGUF file, not a safetensors checkpoint directory" in lines[0], lines[0]
    assert "gguf_file='m.Q4_1.gguf'" in lines[0] and "save_pretrained" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_gguf_without_suffix_and_directory_of_gguf_and_other_files(tmp_path):
    from click.testing import CliRunner

    from streamprune.cli import main

    d = tmp_path / "d"
    d.mkdir()
    write_gguf(d / "model.gguf")
    shutil.copyfile(d / "model.gguf", tmp_path / "weights.bin")
    (tmp_path / "notes.txt").write_text("hello")
    for arg, match in ((d, "model.gguf: a GGUF file"), (tmp_path / "weights.bin", "weights.bin: a GGUF file"),
                       (tmp_path / "notes.txt", "notes.txt: a file, not a model directory")):
        res = CliRunner().invoke(main, ["plan", str(arg)])
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and match in lines[0], (arg, res.stderr, res.exception)
