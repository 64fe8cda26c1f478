"""Progress in logs: with stderr a file or a pipe (`nohup streamprune prune ... > log 2>&1`), plain lines (one per
block), never a carriage return or a cursor movement; on a terminal, tqdm's bars as before."""

import os
import pty
import subprocess
import sys

import pytest

from tiny import write_ids

ESCAPES = ("\x1b[", "\r")


def cli(*args, env=None):
    """The CLI in a child whose stderr is a pipe, read as bytes: text mode would turn a '\r' into a newline."""
    res = subprocess.run([sys.executable, "-m", "streamprune", *map(str, args)], capture_output=True, timeout=300,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())


def plain(stderr: str) -> None:
    assert not [e for e in ESCAPES if e in stderr], repr(stderr[:400])


def test_prune_and_eval_log_plain_lines_when_piped(tiny_models, tmp_path):
    model = tiny_models("llama")
    ids = write_ids(tmp_path / "ids.jsonl", 8, 32)
    res = cli("prune", model, tmp_path / "out", "--calib", ids, "--nsamples", 4, "--seqlen", 16)
    assert res.returncode == 0, res.stderr
    plain(res.stderr)
    lines = res.stderr.splitlines()
    for k in (1, 2, 3):  # one line per block, with the block's sparsity
        assert any(line.startswith(f"blocks: {k}/3 blocks, ") and "sparsity 0.500" in line for line in lines), lines

    # eval (the API: tiny models have no tokenizer), in a child whose stderr is a pipe
    code = (f"import torch, streamprune.evaluation as e; e.evaluate({str(model)!r}, ids=torch.arange(64) % 200, "
            f"seqlen=16)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    stderr = res.stderr.decode()
    assert res.returncode == 0, stderr
    plain(stderr)
    assert [line for line in stderr.splitlines() if line.startswith("blocks: 3/3 blocks")], stderr


def test_owl_sweep_and_resume_log_plain_lines(tiny_models, tmp_path):
    model = tiny_models("llama")
    ids = write_ids(tmp_path / "ids.jsonl", 8, 32)
    res = cli("prune", model, tmp_path / "out", "--calib", ids, "--nsamples", 4, "--seqlen", 16,
              "--sparsity-profile", "owl", env={"STREAMPRUNE_FAULT_AT": "block_start:3", "STREAMPRUNE_FAULT_SIGNAL": "TERM"})
    assert res.returncode == 128 + 15, res.stderr
    plain(res.stderr)
    assert "owl sweep: 3/3 blocks" in res.stderr and "blocks: 2/3 blocks" in res.stderr, res.stderr
    res = cli("resume", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    plain(res.stderr)
    assert "blocks: 3/3 blocks" in res.stderr and "blocks: 2/3" not in res.stderr, res.stderr


def test_transient_bar_prints_at_most_every_interval(capsys):
    from streamprune.progress import LineProgress

    list(LineProgress(range(5), desc="block 0 dense", leave=False))  # the default interval: no line
    assert capsys.readouterr().err == ""
    list(LineProgress(range(3), desc="block 0 dense", leave=False, interval=0))
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("block 0 dense: 1/3, ") and len(err.splitlines()) == 3, err


def test_terminal_keeps_its_bars(tiny_models, tmp_path):
    """On a terminal (a pseudo-terminal here) the bars stay tqdm's."""
    model = tiny_models("llama")
    ids = write_ids(tmp_path / "ids.jsonl", 8, 32)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "streamprune", "prune", str(model), str(tmp_path / "out"), "--calib",
                             str(ids), "--nsamples", "4", "--seqlen", "16"], stdout=subprocess.DEVNULL, stderr=slave,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert "\r" in out and "blocks: 1/3 blocks, " not in out, out[:400]
