"""A rank that dies: the others say which one and exit; under --max-restarts the job resumes from its checkpoint.

`autopar run` on 2 local gloo ranks, rank 1 made to exit as a step begins (AUTOPAR_CRASH, a testing
aid honoured on the first attempt only).
"""

import math
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from autopar.runtime.restarts import crash_if_asked
from autopar.testing import reference


def launch(*argv, crash: str | None = None, timeout: float = 300):
    """`autopar run` with AUTOPAR_CRASH set: (return code, stdout, stderr lines each with the
    seconds since the start at which it arrived, seconds until exit)."""
    env = {**os.environ, **({"AUTOPAR_CRASH": crash} if crash else {})}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "autopar.cli", "run", "--device", "cpu", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(timeout, proc.kill)  # nothing hangs the suite
    watchdog.start()
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    err = [(time.monotonic() - start, line) for line in proc.stderr]
    rc = proc.wait()
    watchdog.cancel()
    reader.join(timeout=10)
    return rc, "".join(out), err, time.monotonic() - start


def printed_losses(stdout: str) -> dict[int, float]:
    """Step → loss as rank 0 printed it (a restarted step: its last print)."""
    return {int(s): float(v) for s, v in re.findall(r"step +(\d+)  loss ([\d.]+)", stdout)}


def test_a_restarted_job_resumes_from_its_last_checkpoint(tmp_path):
    """Rank 1 dies as step 3 begins; torchrun starts both ranks again, which resume from the
    checkpoint of step 2 and finish: every step's loss is the uninterrupted single-device run's."""
    rc, stdout, err, _ = launch("--model", "mlp-tiny", "--nproc", "2", "--steps", "6", "--strategy", "dp",
                                "--save-every", "2", "--resume", str(tmp_path), "--max-restarts", "1",
                                "--timeout", "30", crash="1:3")
    assert rc == 0, "".join(line for _, line in err)[-3000:]
    assert "resumed from step 2" in stdout, stdout
    assert stdout.count("step    2  loss") == 2  # run before the crash, and again after the restart
    losses = printed_losses(stdout)
    expected = reference({"model": "mlp-tiny", "steps": 6})["losses"]
    assert sorted(losses) == list(range(6))
    assert all(math.isclose(losses[s], expected[s], abs_tol=2e-6) for s in range(6)), (losses, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000006"]


def test_a_lost_rank_is_named_within_the_timeout(tmp_path):
    """Without restarts the job fails, the surviving rank naming rank 1, within --timeout of the crash."""
    timeout = 20
    rc, _, err, _ = launch("--model", "mlp-tiny", "--nproc", "2", "--steps", "4", "--strategy", "dp",
                           "--timeout", str(timeout), crash="1:1")
    text = "".join(line for _, line in err)
    assert rc != 0
    crashed = next(t for t, line in err if "AUTOPAR_CRASH" in line)
    named = next((t for t, line in err if "RankFailure: rank 0: rank(s) 1 stopped" in line), None)
    assert named is not None, text[-3000:]
    assert named - crashed < timeout and err[-1][0] - crashed < timeout, (crashed, named, err[-1][0])


def test_crash_requests_are_honoured_on_the_first_attempt_only(monkeypatch):
    monkeypatch.setenv("AUTOPAR_CRASH", "1:3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    crash_if_asked(1, 3)  # a restarted job runs through
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    crash_if_asked(0, 3)
    crash_if_asked(1, 2)
    monkeypatch.setenv("AUTOPAR_CRASH", "rank1")
    with pytest.raises(ValueError, match=r"AUTOPAR_CRASH: found 'rank1', required <rank>:<step>"):
        crash_if_asked(1, 3)


def test_bad_checkpoint_options_are_explained(capsys):
    from autopar.cli import main

    assert main(["run", "--model", "mlp-tiny", "--save-every", "2"]) == 2
    assert "--save-every: found no --resume DIR" in capsys.readouterr().err
    assert main(["run", "--model", "mlp-tiny", "--save-every", "0", "--resume", "d"]) == 2
    assert "--save-every: found 0, required >= 1" in capsys.readouterr().err
    assert main(["run", "--model", "mlp-tiny", "--max-restarts", "-1"]) == 2
    assert "--max-restarts: found -1" in capsys.readouterr().err
