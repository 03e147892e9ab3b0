"""What the client tells the user when the worker dies or its temp folder cannot be made: one sentence
that names the cause (memory, an unwritable folder), never a launcher's text or a traceback.

The launcher case stands in for Slicer's PythonSlicer (CTK's ctkAppLauncher around python-real): a
process that runs the real Python as its child and, when that child dies by a signal, writes
``error: [<path>] exit abnormally - Report the problem.`` on stderr and exits 1, as
commontk/AppLauncher Base/ctkAppLauncher.cpp (applicationFinished, QProcess::CrashExit) does.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import tempfile
import time

import psutil
import pytest
from permissions import SKIP_REASON, permissions_enforced
from test_worker import ENV, data, events_until, propagate_job  # noqa: F401 - data is a fixture

from SAM2FewShotLib.common.errors import InputError
from SAM2FewShotLib.run.client import JobFolder, WorkerClient, WorkerError
from SAM2FewShotLib.run.worker import OOM_ADVICE
from SAM2FewShotLib.run.worker_death import describe_death, oom_kill_count, oom_killed_since

ADVICE = OOM_ADVICE.removeprefix("out of memory: ")
LAUNCHER = f"""#!{sys.executable}
import subprocess, sys
child = subprocess.Popen([{sys.executable!r}] + sys.argv[1:])
code = child.wait()
if code < 0:
    sys.stderr.write("error: [" + {sys.executable!r} + "] exit abnormally - Report the problem.\\n")
    sys.exit(1)
sys.exit(code)
"""


def kill_mid_job(client: WorkerClient, data, folder: JobFolder, victim) -> str:  # noqa: F811
    """Start a job, SIGKILL ``victim(client)`` once it reports progress; the error the client gives."""
    job_id = client.submit(propagate_job(data, folder))
    events_until(client, lambda e: e["event"] in ("progress", "result", "error"))
    os.kill(victim(client), signal.SIGKILL)
    with pytest.raises(WorkerError) as caught:
        client.wait(job_id, timeout=30)
    return str(caught.value)


def test_a_sigkilled_worker_is_named_out_of_memory(data):  # noqa: F811
    with WorkerClient(env=ENV) as client, JobFolder() as folder:
        message = kill_mid_job(client, data, folder, lambda c: c.pid)
    assert message.startswith("the computation ran out of memory and was stopped by the system"), message
    assert ADVICE in message and "signal 9" in message


def test_behind_a_launcher_the_crash_line_becomes_a_memory_sentence(data, tmp_path):  # noqa: F811
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    with WorkerClient(python=str(launcher), env=ENV) as client, JobFolder() as folder:
        message = kill_mid_job(client, data, folder, lambda c: psutil.Process(c.pid).children()[0].pid)
        time.sleep(0.1)
        assert not client.is_alive
    assert "ran out of memory" in message and ADVICE in message, message
    assert "exit abnormally" not in message and "Report the problem" not in message


def test_the_sentence_for_each_kind_of_death():
    crash = ["error: [/opt/Slicer/bin/python-real] exit abnormally - Report the problem."]
    assert describe_death(1, crash, oom_killed=True).startswith("the computation ran out of memory")
    assert "most likely because it ran out of memory" in describe_death(1, crash)
    assert describe_death(137, []).startswith("the computation ran out of memory")
    assert describe_death(3, ["Traceback", "ValueError: bad"]) == (
        "the worker stopped unexpectedly (exit code 3; last message: ValueError: bad).")
    assert describe_death(-11, []) == "the worker stopped unexpectedly (killed by signal 11)."
    assert describe_death(None, []) == "the worker stopped unexpectedly (its output closed)."


def test_the_oom_kill_count_is_read_from_vmstat(tmp_path):
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_free_pages 1\noom_kill 4\n", encoding="ascii")
    assert oom_kill_count(vmstat) == 4
    assert oom_killed_since(3, vmstat) and not oom_killed_since(4, vmstat) and not oom_killed_since(None, vmstat)
    assert oom_kill_count(tmp_path / "absent") is None


@pytest.fixture
def read_only_temp(tmp_path, monkeypatch):
    """TMPDIR pointing at a folder nobody may write; Python's cached choice reset to it."""
    if not permissions_enforced():
        pytest.skip(SKIP_REASON)
    folder = tmp_path / "read-only-tmp"
    folder.mkdir()
    folder.chmod(0o500)
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    folder.chmod(0o700)


def test_a_read_only_temp_folder_is_one_sentence_naming_it(read_only_temp):
    with pytest.raises(InputError, match="cannot create the job's temporary folder in") as caught:
        JobFolder()
    assert str(read_only_temp) in str(caught.value) and "TMPDIR" in str(caught.value)


def test_no_usable_temp_folder_at_all_is_one_sentence(read_only_temp, monkeypatch):
    def nowhere() -> str:
        raise FileNotFoundError("No usable temporary directory found in [...]")

    monkeypatch.setattr(tempfile, "gettempdir", nowhere)
    with pytest.raises(InputError, match=str(read_only_temp)):
        JobFolder()


def test_a_temp_folder_that_is_gone_is_one_sentence_too(tmp_path, monkeypatch):
    """Runs as root too: a folder that no longer exists refuses everyone."""
    gone = tmp_path / "removed-tmp"
    monkeypatch.setattr(tempfile, "tempdir", str(gone))
    with pytest.raises(InputError, match="cannot create the job's temporary folder in") as caught:
        JobFolder()
    assert str(gone) in str(caught.value)
