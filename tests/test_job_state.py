"""The job directory while a job runs: who holds OUT, and one writer of the job state (real processes)."""

import json
import signal

from test_bad_input import INDEX, cli
from test_trust import ARGS, published, start_paused


def test_status_and_resume_name_the_job_holding_out_before_its_state_exists(tiny_models, ids_file, tmp_path):
    """Right after a job starts it holds OUT's lock but has not written state.json yet: `status` and `resume`
    say the OUT is in use (as a second `prune` does), not that there is no job."""
    model, out = tiny_models("llama"), tmp_path / "out"
    job = start_paused(model, out, ids_file, point="locked:1")  # OUT locked, no state written yet
    try:
        assert not (out / ".streamprune" / "state.json").exists()
        for command in ("status", "resume"):
            res = cli(command, out)
            assert res.returncode == 2, (command, res.stderr)
            lines = res.stderr.strip().splitlines()
            assert lines == [f"streamprune: error: OUT {out} is in use by another streamprune job (pid {job.pid}); "
                             f"wait for it to finish or stop it"], (command, res.stderr)
    finally:
        job.send_signal(signal.SIGCONT)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-2000:]
    res = cli("status", out)  # the probe left the lock as it was: the job finished, status reads its state
    assert res.returncode == 0 and "complete" in res.stdout, res.stderr
    assert (out / INDEX).is_file()


OWL = ("--sparsity-profile", "owl", "--snapshot-every", "0")


def test_the_job_state_has_one_writer_while_the_io_thread_commits(tiny_models, ids_file, tmp_path):
    """While the I/O thread commits the copied shards it saves the job state; the OWL sweep's result is saved
    too. Both used to write one temporary name from two threads: held between writing its temporary state and
    renaming it until the main thread has moved on to block 0, the I/O thread found its temporary gone (or
    renamed the other thread's). Now every save of the state while the I/O thread runs is made by it, in order:
    the held job finishes, its state complete with the sweep, its bytes those of an unheld run."""
    model = tiny_models("llama")
    clean = cli("prune", model, tmp_path / "clean", "--calib", ids_file, *ARGS, *OWL)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    res = cli("prune", model, out, "--calib", ids_file, *ARGS, *OWL,
              env={"STREAMPRUNE_FAULT_HOLD": "rename_state:io:1:block_start"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert published(out) == published(tmp_path / "clean")
    state = json.loads((out / ".streamprune" / "state.json").read_text())
    clean_state = json.loads((tmp_path / "clean" / ".streamprune" / "state.json").read_text())
    assert state["complete"] and state["profile"] == clean_state["profile"]
    assert set(state["files"]) == set(clean_state["files"])
    assert {k: v["sha256"] for k, v in state["files"].items()} == {k: v["sha256"] for k, v in clean_state["files"].items()}
    assert not list((out / ".streamprune").glob("*.tmp"))
