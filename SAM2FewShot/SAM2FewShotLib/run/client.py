"""The client side of the background worker: what the Slicer Logic (or a script) uses. No Qt here.

The Logic starts the worker with Slicer's own Python, submits jobs whose files live in a private
JobFolder, and calls poll() from a timer: a reader thread parses the worker's stdout into a queue,
so the GUI thread never blocks. cancel() kills the whole process tree within a second and the next
job starts a fresh worker. A worker that dies on its own is reported as one error event per
unfinished job (with the last line it wrote on stderr), never as a silent hang.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ..common.errors import InputError, SAM2FewShotError
from . import protocol
from .job_folders import PREFIX, write_owner
from .owners import PARENT_ENV, owner_record
from .process_tree import kill_tree, popen_options
from .worker_death import describe_death, oom_kill_count, oom_killed_since

WORKER_MODULE = "SAM2FewShotLib.run.worker"
# A job's label map: plain NRRD and its JSON sidecar, written and read by SimpleITK alone (a fresh Slicer has
# no pynrrd or slicerio); the panel's .seg.nrrd-free path.
JOB_RESULT = "result.nrrd"
_EOF = object()  # the reader thread's last item: the worker's stdout closed


class WorkerError(SAM2FewShotError):
    """The worker failed a job, died, or could not be started."""


def make_private_folder(parent: str | Path | None, prefix: str) -> Path:
    """A new folder of mode 0700 under ``parent`` (the system temp folder by default). A temp folder that
    cannot be written (TMPDIR read-only, full, or gone) is one sentence naming it, not a traceback."""
    try:
        where = tempfile.gettempdir() if parent is None else str(parent)
    except FileNotFoundError as exc:  # Python found no writable candidate: TMPDIR, TEMP, /tmp, ... all refused
        raise InputError(_temp_folder_message(os.environ.get("TMPDIR") or os.environ.get("TEMP") or "the system "
                                              "temp folder", "not writable")) from exc
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    except OSError as exc:
        raise InputError(_temp_folder_message(where, exc.strerror or str(exc))) from exc


def _temp_folder_message(folder: str, why: str) -> str:
    return (f"cannot create the job's temporary folder in {folder} ({why}): make it writable, or point TMPDIR "
            "(TEMP on Windows) to a writable folder and restart Slicer")


class JobFolder:
    """A private temporary folder for one job's inputs and outputs, removed after the result is read. It
    records its owner (this process) so that a crashed Slicer's folders can be swept (job_folders.py)."""

    def __init__(self, parent: str | Path | None = None, prefix: str = PREFIX):
        self.path = make_private_folder(parent, prefix)
        try:
            write_owner(self.path)
        except BaseException:
            self.remove()
            raise

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def labels(self) -> Path:
        return self.path / JOB_RESULT

    @property
    def report(self) -> Path:
        return self.path / "report.json"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> JobFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def read_result(event: dict):
    """The label map and the report dict a result event points to."""
    from ..io.volume_io import read_labels

    report = json.loads(Path(event["report"]).read_text(encoding="utf-8"))
    return read_labels(event["labels"]), report


def absolute_paths(message: dict) -> dict:
    """The job message with its paths made absolute against this process's working folder: the worker,
    which refuses relative paths, runs in a folder of its own."""
    out = dict(message)
    for name in protocol.PATH_FIELDS + protocol.LIBRARY_ADD_PATHS:
        if isinstance(out.get(name), str) and out[name]:
            out[name] = os.path.abspath(out[name])
    if isinstance(out.get("supports"), (list, tuple)):
        out["supports"] = [[os.path.abspath(p) if isinstance(p, str) and p else p for p in pair]
                           if isinstance(pair, (list, tuple)) else pair for pair in out["supports"]]
    return out


def wait_for(poll: Callable[[], list[dict]], pending: Callable[[], object], job_id: str,
             timeout: float | None = None, on_event: Callable[[dict], None] | None = None) -> dict:
    """Poll until ``job_id``'s end event (WorkerError on its error, or when it is no longer ``pending()``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for event in poll():
            if on_event is not None:
                on_event(event)
            if event.get("id") == job_id and event["event"] in protocol.END_EVENTS:
                return event
            if event["event"] == "error" and event.get("id") in (job_id, None):
                raise WorkerError(event["message"])
        if job_id not in pending():
            raise WorkerError(f"job {job_id} is not running (cancelled, or never submitted)")
        if deadline is not None and time.monotonic() > deadline:
            raise WorkerError(f"job {job_id} gave no result within {timeout:.0f} s")
        time.sleep(0.02)


class _Process:
    """One running worker: its pipes, a reader thread per output, the parsed events."""

    def __init__(self, argv: list[str], env: dict, cwd: str | None, stderr_lines: int):
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env, cwd=cwd, **popen_options())
        except OSError as exc:
            raise WorkerError(f"cannot start the worker ({argv[0]}): {exc.strerror or exc}") from exc
        self.events: queue.Queue = queue.Queue()
        self.stderr_tail: deque = deque(maxlen=stderr_lines)
        self.stray_lines: list[bytes] = []
        self.expected_exit = False
        self.oom_kills_at_start = oom_kill_count()  # a rise by its death: the OOM killer took it
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.popen.stdout:
            try:
                self.events.put(protocol.parse_event(line))
            except protocol.ProtocolError:
                self.stray_lines.append(line)
                text = line.decode("utf-8", "replace").strip()
                self.events.put(protocol.log("warning", f"the worker wrote a non-protocol line: {text}"))
        self.events.put(_EOF)

    def _read_stderr(self) -> None:
        for line in self.popen.stderr:
            text = line.decode("utf-8", "replace").rstrip()
            if text.strip():
                self.stderr_tail.append(text)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, message: dict) -> bool:
        try:
            self.popen.stdin.write(protocol.encode(message))
            self.popen.stdin.flush()
            return True
        except (OSError, ValueError):  # a dead worker: its end-of-output reports the job
            return False

    def exit_description(self) -> str:
        """Why it died, in one sentence: memory named when a SIGKILL, PythonSlicer's crash line or the
        system's OOM-kill count says so (worker_death.py)."""
        try:
            code = self.popen.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        for t in self._threads[1:]:  # the stderr reader: the launcher's last line comes after the child's death
            t.join(timeout=1.0)
        return describe_death(code, list(self.stderr_tail), oom_killed_since(self.oom_kills_at_start))

    def stop(self) -> None:
        self.expected_exit = True
        kill_tree(self.popen.pid)
        self.close()

    def close(self) -> None:
        for t in self._threads:  # they end at the pipes' end of file, once the process is gone
            t.join(timeout=0.5)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass


class WorkerClient:
    """Starts the worker, sends jobs, and hands back its events without ever blocking (poll)."""

    def __init__(
        self,
        python: str | None = None,
        pythonpath: Sequence[str | Path] = (),
        env: dict | None = None,
        cwd: str | Path | None = None,
        stderr_lines: int = 200,
    ):
        self.python = str(python or sys.executable)
        self.pythonpath = [str(p) for p in pythonpath]
        self.base_env = dict(os.environ if env is None else env)
        self.cwd = None if cwd is None else str(cwd)
        self.stderr_lines = stderr_lines
        self._proc: _Process | None = None
        self._pending: dict[str, None] = {}  # submitted jobs without a result or error yet, in order
        self._backlog: list[dict] = []  # events of a finished worker, not yet polled
        self.reapers: list[threading.Thread] = []  # threads killing cancelled workers

    # ---------------------------------------------------------------------------- process

    def command(self) -> list[str]:
        return [self.python, "-m", WORKER_MODULE]

    def environment(self) -> dict:
        env = dict(self.base_env)
        paths = self.pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        env[PARENT_ENV] = json.dumps(owner_record())  # the worker exits when this process is gone
        return env

    def start(self) -> None:
        """Start the worker unless one is running (a dead one's events stay pollable)."""
        if self.is_alive:
            return
        if self._proc is not None:
            self._retire()
        self._proc = _Process(self.command(), self.environment(), self.cwd, self.stderr_lines)

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.popen.pid

    @property
    def pending(self) -> list[str]:
        return list(self._pending)

    @property
    def stray_lines(self) -> list[bytes]:
        """Lines on the worker's stdout that were not protocol events (there should be none)."""
        return [] if self._proc is None else list(self._proc.stray_lines)

    # ---------------------------------------------------------------------------- jobs

    def submit(self, job: protocol.Job | protocol.LibraryAdd | protocol.ExampleData | dict) -> str:
        """Queue a job on the worker (started if needed); its id. Its events come through poll(). A request
        object (a Job, a LibraryAdd, a live session's request of session_protocol.py) or a message dict."""
        request = hasattr(job, "to_message")
        message = absolute_paths(job.to_message() if request else {"type": "job", **job})
        message.setdefault("id", uuid.uuid4().hex[:12])
        self.start()
        self._pending[message["id"]] = None
        self._proc.send(message)
        return message["id"]

    def poll(self) -> list[dict]:
        """Events that arrived since the last call, in order; never blocks."""
        events, self._backlog = self._backlog, []
        if self._proc is not None:
            events += self._drain(self._proc)
        return events

    def cancel(self) -> None:
        """Kill the worker and its children; unfinished jobs are dropped without events.

        Returns at once: the killing (up to a second or two while the process tree dies and its
        pipes close) runs on a thread of its own, so a GUI that cancels never freezes.
        ``join_reapers()`` waits for it (scripts and tests).
        """
        proc, self._proc = self._proc, None
        self._pending.clear()
        if proc is not None:
            proc.expected_exit = True
            reaper = threading.Thread(target=proc.stop, name="sam2fewshot-worker-reaper", daemon=True)
            reaper.start()
            self.reapers.append(reaper)

    def join_reapers(self, timeout: float | None = None) -> None:
        """Wait until every cancelled worker is dead."""
        for reaper in self.reapers:
            reaper.join(timeout)
        self.reapers = [r for r in self.reapers if r.is_alive()]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish and exit; kill it if it has not within ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        self._pending.clear()
        if proc is None:
            return
        proc.expected_exit = True
        proc.send({"type": "shutdown"})
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        proc.stop()

    def wait(self, job_id: str, timeout: float | None = None,
             on_event: Callable[[dict], None] | None = None) -> dict:
        """Block until the job's result (scripts and tests; the GUI polls). WorkerError on its error."""
        return wait_for(self.poll, lambda: self._pending, job_id, timeout, on_event)

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---------------------------------------------------------------------------- internals

    def _drain(self, proc: _Process) -> list[dict]:
        events = []
        while True:
            try:
                item = proc.events.get_nowait()
            except queue.Empty:
                return events
            if item is _EOF:
                events += self._death_events(proc)
                continue
            if item["event"] in (*protocol.END_EVENTS, "error"):
                self._pending.pop(item.get("id"), None)
            events.append(item)

    def _death_events(self, proc: _Process) -> list[dict]:
        """One error per unfinished job (or one without an id) when the worker ended on its own."""
        if proc.expected_exit:
            return []
        why = proc.exit_description()
        ids, self._pending = list(self._pending) or [None], {}
        return [protocol.error(job_id, why) for job_id in ids]

    def _retire(self) -> None:
        """Keep a dead worker's unread events (its death included) for the next poll()."""
        proc = self._proc
        proc.close()
        self._backlog += self._drain(proc)
