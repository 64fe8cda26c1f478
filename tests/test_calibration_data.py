"""Calibration data for a first-time user: the "too little text" refusal says what the text does fit, and
`--calib-dataset` reads text from the `datasets` library (a save_to_disk directory, local data files, a name in
the local datasets cache), offline, deterministically, as part of the job's fingerprint."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import byte_tokenizer, real_text

INDEX = "model.safetensors.index.json"


@pytest.fixture
def model(tiny_models, copy_model):
    return byte_tokenizer(copy_model(tiny_models("llama")))


def invoke(*args):
    from click.testing import CliRunner

    from streamprune.cli import main

    return CliRunner().invoke(main, [*map(str, args)])


def one_error(res):
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("streamprune: error: "), \
        (res.exit_code, res.stderr, res.exception)
    return lines[0]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))


def outputs(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def state(out):
    return json.loads((out / ".streamprune" / "state.json").read_text())


# --- the refusal of too little text ---------------------------------------------------------------------------------

def test_too_little_text_names_the_largest_nsamples_that_fits(model, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("abcdefghij" * 100)  # 1000 tokens with the byte tokenizer
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib", text, "--nsamples", 128, "--seqlen", 64,
                           "--no-progress"))
    assert "1000 tokens, too little text for --nsamples 128 x --seqlen 64 = 8192 tokens" in msg, msg
    assert "it fits at most --nsamples 15 at --seqlen 64, or --seqlen 7 with --nsamples 128" in msg, msg
    assert 'docs/options.md: "Calibration data"' in msg, msg
    # what it names is exactly the edge: 16 is refused, 15 runs
    assert "fits at most --nsamples 15" in one_error(invoke("prune", model, tmp_path / "o", "--calib", text,
                                                            "--nsamples", 16, "--seqlen", 64, "--no-progress"))
    res = invoke("prune", model, tmp_path / "o", "--calib", text, "--nsamples", 15, "--seqlen", 64, "--no-progress")
    assert res.exit_code == 0, (res.stderr, res.exception)


def test_text_shorter_than_one_window(model, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("x" * 50)
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib", text, "--nsamples", 4, "--seqlen", 64,
                           "--no-progress"))
    assert "it is shorter than one window of --seqlen 64, or --seqlen 12 with --nsamples 4" in msg, msg


# --- --calib-dataset ------------------------------------------------------------------------------------------------

try:
    import datasets
except ImportError:  # the test extra installs it
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="--calib-dataset needs the datasets package")

PARAGRAPHS = [p for p in real_text().split("\n\n") if p.strip()][:400]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """This process's datasets cache in tmp_path, offline (the library reads its environment at import)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf-datasets"


def expected_windows(model, rows, nsamples, seqlen, seed=0):
    """The documented draw, written out: non-empty rows in the order torch.randperm(seed) gives, each tokenized on
    its own, joined by the tokens of a blank line, cut into consecutive windows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    stream = []
    for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist():
        if rows[i] and rows[i].strip():
            stream += (sep if stream else []) + tok(rows[i], add_special_tokens=False)["input_ids"]
    return torch.tensor(stream[:nsamples * seqlen]).view(nsamples, seqlen)


def sha(windows):
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


@needs_datasets
def test_saved_dataset_windows_are_the_documented_draw_and_deterministic(model, tmp_path, hf_cache):
    rows = PARAGRAPHS[:200] + ["", "   "]  # empty rows are skipped
    ds_dir = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}).save_to_disk(ds_dir)
    before = outputs(ds_dir)
    args = ("--calib-dataset", ds_dir, "--nsamples", 8, "--seqlen", 64, "--seed", 3, "--no-progress")
    res = invoke("prune", model, tmp_path / "o1", *args)
    assert res.exit_code == 0, (res.stderr, res.exception)
    fp = state(tmp_path / "o1")["fingerprint"]
    assert fp["calibration_sha256"] == sha(expected_windows(model, rows, 8, 64, seed=3))
    assert fp["options"]["calib_dataset"] == str(ds_dir.resolve())
    assert outputs(ds_dir) == before, "the dataset directory changed"
    res = invoke("prune", model, tmp_path / "o2", *args)
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert outputs(tmp_path / "o1") == outputs(tmp_path / "o2")
    # another seed draws other rows
    res = invoke("prune", model, tmp_path / "o3", *args[:-3], "--seed", 4, "--no-progress")
    assert res.exit_code == 0 and state(tmp_path / "o3")["fingerprint"]["calibration_sha256"] != fp["calibration_sha256"]


@needs_datasets
def test_dataset_dict_split_and_column(model, tmp_path, hf_cache):
    d = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"title": ["t"] * 100, "body": PARAGRAPHS[:100]}),
        "validation": datasets.Dataset.from_dict({"title": ["v"] * 100, "body": PARAGRAPHS[100:200]}),
    }).save_to_disk(d)
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib-dataset", d, "--nsamples", 4, "--seqlen", 32))
    assert "no \"text\" column and 2 other text columns" in msg and "--calib-column" in msg, msg
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib-dataset", f"{d}:test", "--calib-column", "body",
                           "--nsamples", 4, "--seqlen", 32))
    assert "no split 'test' (it has train, validation)" in msg, msg
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib-dataset", d, "--calib-column", "nope",
                           "--nsamples", 4, "--seqlen", 32))
    assert "no column 'nope'" in msg, msg
    res = invoke("prune", model, tmp_path / "o", "--calib-dataset", f"{d}:validation", "--calib-column", "body",
                 "--nsamples", 4, "--seqlen", 32, "--no-progress")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert state(tmp_path / "o")["fingerprint"]["calibration_sha256"] == sha(expected_windows(model, PARAGRAPHS[100:200], 4, 32))


@needs_datasets
def test_local_data_files_directory(model, tmp_path, hf_cache):
    """A directory of plain text files, read by the datasets library's own text builder (one row per line)."""
    d = tmp_path / "files"
    d.mkdir()
    (d / "a.txt").write_text("\n".join(PARAGRAPHS[:150]))
    res = invoke("prune", model, tmp_path / "o", "--calib-dataset", d, "--nsamples", 4, "--seqlen", 32, "--no-progress")
    assert res.exit_code == 0, (res.stderr, res.exception)
    rows = [line for p in PARAGRAPHS[:150] for line in p.split("\n")]
    assert state(tmp_path / "o")["fingerprint"]["calibration_sha256"] == sha(expected_windows(model, rows, 4, 32))
    assert hf_cache.is_dir()  # the library's arrow cache went where its configuration says, not into the input


def hub_dataset_cache(cache, repo_id, rows):
    """A hub dataset as the datasets library caches it (`NS___NAME/CONFIG/VERSION/HASH/`, dataset_info.json and
    NAME-SPLIT.arrow), its files written by the library's own text builder."""
    from datasets.packaged_modules.text.text import Text

    src = cache.parent / "hub-src.txt"
    src.write_text("\n".join(rows))
    name = repo_id.split("/")[1]
    builder = Text(cache_dir=str(cache.parent / "build"), dataset_name=name, data_files={"train": str(src)})
    builder.download_and_prepare()
    target = cache / repo_id.replace("/", "___") / "default" / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    for f in ("dataset_info.json", f"{name}-train.arrow"):
        (Path(builder.cache_dir) / f).rename(target / f)


@needs_datasets
@pytest.mark.parametrize("offline", [True, False])
def test_hub_dataset_name_from_the_local_cache(offline, model, tmp_path, hf_cache, monkeypatch):
    """A dataset name is served from the datasets cache before any network: offline, and with downloads allowed
    but the hub unreachable (an endpoint on a closed local port)."""
    rows = PARAGRAPHS[:120]
    hub_dataset_cache(hf_cache, "tiny-org/tiny_set", rows)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    res = invoke("prune", model, tmp_path / "o", "--calib-dataset", "tiny-org/tiny_set:train", "--nsamples", 4,
                 "--seqlen", 32, "--no-progress")
    assert res.exit_code == 0, (res.stderr, res.exception)
    expected = sha(expected_windows(model, [l for r in rows for l in r.split("\n")], 4, 32))
    fp = state(tmp_path / "o")["fingerprint"]
    assert fp["calibration_sha256"] == expected and fp["options"]["calib_dataset"] == "tiny-org/tiny_set:train"


@needs_datasets
def test_dataset_too_small_and_resume_refuses_another_dataset(model, tmp_path, hf_cache):
    small, other = tmp_path / "small", tmp_path / "other"
    datasets.Dataset.from_dict({"text": ["abcdefghij" * 10] * 3}).save_to_disk(small)  # 300 + 2 x 2 separator tokens
    datasets.Dataset.from_dict({"text": PARAGRAPHS[:50]}).save_to_disk(other)
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib-dataset", small, "--nsamples", 8, "--seqlen", 64))
    assert "304 tokens, too little text for --nsamples 8 x --seqlen 64" in msg and "--nsamples 4 at --seqlen 64" in msg, msg
    res = invoke("prune", model, tmp_path / "o", "--calib-dataset", small, "--nsamples", 4, "--seqlen", 64, "--no-progress")
    assert res.exit_code == 0, (res.stderr, res.exception)
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib-dataset", other, "--nsamples", 4, "--seqlen", 64))
    assert "holds a job with different inputs" in msg and "calib_dataset" in msg, msg
    res = invoke("resume", tmp_path / "o")  # resume runs with the stored (absolute) dataset path
    assert res.exit_code == 0 and "already complete" in res.stderr + res.stdout, (res.stderr, res.exception)


def test_calib_and_calib_dataset_exclusive(model, tmp_path, text_file):
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib", text_file, "--calib-dataset", "wikitext"))
    assert "give one source of calibration text" in msg
    msg = one_error(invoke("prune", model, tmp_path / "o", "--calib", text_file, "--calib-column", "text"))
    assert "--calib-column" in msg and "--calib-dataset" in msg


@needs_datasets
def test_dataset_name_not_in_cache_offline_is_one_line(model, tmp_path):
    """A real process with the variables a user sets: nothing in the cache, no download, one line."""
    r = cli("prune", model, tmp_path / "o", "--calib-dataset", "nosuchuser/nosuchset:train", "--nsamples", 4,
            "--seqlen", 32, env={"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not a local path and not in the local datasets cache" in lines[0] and "downloading is disabled" in lines[0]
    assert not (tmp_path / "o").exists()
    # downloads allowed but the hub unreachable (an endpoint on a closed local port): one line, no retries printed
    r = cli("prune", model, tmp_path / "o", "--calib-dataset", "nosuchuser/nosuchset", "--nsamples", 4,
            "--seqlen", 32, env={"HF_DATASETS_OFFLINE": "0", "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                                 "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not in the local datasets cache" in lines[0] and "downloading failed (cannot reach 127.0.0.1" in lines[0]


@needs_datasets
def test_missing_datasets_package_is_one_line_with_the_pip_command(model, tmp_path):
    """Python's own marker of a module that cannot be imported (sys.modules[name] = None) stands in for an
    environment without the package."""
    ds = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": PARAGRAPHS[:20]}).save_to_disk(ds)
    code = ("import sys; sys.modules['datasets'] = None; from streamprune.cli import run; "
            f"sys.argv = ['streamprune', 'prune', {str(model)!r}, {str(tmp_path / 'o')!r}, '--calib-dataset', "
            f"{str(ds)!r}]; run()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "pip install 'streamprune[datasets]'" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
