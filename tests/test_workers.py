"""`workers.run_tasks`: results in task order, errors and Ctrl-C stop the pool cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = '''
import os, sys, time
from pathlib import Path
from crossdict.workers import run_tasks


def job(i, marker_dir, sleep):
    Path(marker_dir, f"{i}.{os.getpid()}").write_text(os.environ.get("OPENBLAS_NUM_THREADS", ""))
    time.sleep(sleep)
    if i == 99:
        raise ValueError("task 99 failed")
    return i * 10


if __name__ == "__main__":
    mode, marker_dir = sys.argv[1], sys.argv[2]
    try:
        if mode == "ok":
            seen = []
            res = run_tasks(job, [(i, marker_dir, 0.2) for i in range(5)], 2, done=lambda i, r: seen.append(i),
                            order=[4, 3, 2, 1, 0])
            print(res, sorted(seen))
        elif mode == "error":
            run_tasks(job, [(0, marker_dir, 60), (99, marker_dir, 0.5)], 2)
        else:
            run_tasks(job, [(0, marker_dir, 60), (1, marker_dir, 60), (2, marker_dir, 60)], 2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
'''


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    script, markers = tmp_path / "tasks.py", tmp_path / "markers"
    script.write_text(SCRIPT)
    markers.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    # a fresh session: SIGINT to the group reaches parent and workers, as Ctrl-C in a terminal does
    proc = subprocess.Popen([sys.executable, str(script), mode, str(markers)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    return proc, markers


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
            out.add(pid)
        except ProcessLookupError:
            pass
    return out


def test_run_tasks_returns_results_in_task_order(tmp_path):
    proc, markers = _start(tmp_path, "ok")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "[0, 10, 20, 30, 40] [0, 1, 2, 3, 4]"
    pids = {int(p.name.split(".")[1]) for p in markers.iterdir()}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes
    threads = {p.read_text() for p in markers.iterdir()}
    assert threads == {str(max(1, len(os.sched_getaffinity(0)) // 2))}  # cores // workers BLAS threads each


def test_a_task_error_stops_the_pool(tmp_path):
    proc, markers = _start(tmp_path, "error")
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "error: task 99 failed" in err
    assert time.monotonic() - t0 < 45  # the 60 s task was stopped, not waited for
    assert not _alive({int(p.name.split(".")[1]) for p in markers.iterdir()})


@pytest.mark.parametrize("group", [True, False], ids=["ctrl-c", "sigint-to-parent"])
def test_ctrl_c_ends_the_pool_without_tracebacks(tmp_path, group):
    proc, markers = _start(tmp_path, "interrupt")
    deadline = time.monotonic() + 60
    while len(list(markers.iterdir())) < 2 and time.monotonic() < deadline:  # both workers are running a task
        time.sleep(0.1)
    pids = {int(p.name.split(".")[1]) for p in markers.iterdir()}
    assert len(pids) == 2
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted; rerun the same command to resume" in err
    assert "Traceback" not in err, err
    time.sleep(0.5)
    assert not _alive(pids)
