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
