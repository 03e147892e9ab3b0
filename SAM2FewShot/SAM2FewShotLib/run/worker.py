"""The background worker process: ``python -m SAM2FewShotLib.run.worker`` (protocol: see protocol.py).

Slicer starts it with its own Python and talks to it through client.py. It stays alive between
jobs so the model and the query's encoder features stay warm, answers every job with one result
or one error line, and survives bad input and out-of-memory errors. Only protocol lines reach the
real stdout: file descriptor 1 and sys.stdout are pointed at stderr before anything else runs, so
tqdm bars, warnings and C libraries cannot corrupt the stream. It exits on its own (CLIENT_GONE_EXIT)
when Slicer's process is gone, checked every PARENT_POLL_S seconds, even in the middle of a job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import BinaryIO

from .. import __version__
from ..common.errors import InputError, SAM2FewShotError
from . import owners, protocol, session_protocol

CLIENT_GONE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
PARENT_POLL_S = 1.0  # how often the worker checks that Slicer (its client's process) still runs
OOM_ADVICE = "out of memory: try a smaller model or image size, a slice range, or (from a GPU) the CPU device"


def claim_stdout() -> BinaryIO:
    """A private handle on the real stdout for protocol lines; fd 1 and sys.stdout then go to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "wb")


class ClientGone(Exception):
    """The client closed its end of the protocol stream: nobody reads the events any more."""


class Emitter:
    """Writes whole protocol lines, one at a time, flushed at once."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.closed = False
        self._lock = threading.Lock()

    def send(self, event: dict) -> None:
        """ClientGone once the client has closed the pipe (then and for every later event)."""
        line = protocol.encode(event)
        with self._lock:
            if self.closed:
                raise ClientGone()
            try:
                self.stream.write(line)
                self.stream.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.closed = True
                _discard_output(self.stream)
                raise ClientGone() from None

    def progress_for(self, job_id: str):
        def progress(stage: str, done: int, total: int) -> None:
            self.send(protocol.progress(job_id, stage, done, total))

        return progress


def _discard_output(stream: BinaryIO) -> None:
    """Point the stream's descriptor at the null device: the bytes still buffered are flushed there at
    exit, not against the closed pipe (Python's "Exception ignored ... BrokenPipeError")."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError):  # no descriptor (a test's in-memory stream): nothing is flushed at exit
        pass


class EventLogHandler(logging.Handler):
    """The engine's log records as log events, so the panel's log shows them."""

    def __init__(self, emitter: Emitter, level: int = logging.INFO):
        super().__init__(level)
        self.emitter = emitter

    def emit(self, record: logging.LogRecord) -> None:
        if self.emitter.closed:
            return  # nobody reads the log any more; the job's own send says the client is gone
        try:
            self.emitter.send(protocol.log(record.levelname.lower(), record.getMessage()))
        except ClientGone:
            pass
        except Exception:  # noqa: BLE001 - logging must never break a job
            self.handleError(record)


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA), or the RuntimeError the CPU and MPS allocators raise."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def error_message(exc: BaseException) -> str:
    """One line the user can act on (an out-of-memory cause is named even when wrapped)."""
    oom = next((e for e in causes(exc) if is_out_of_memory(e)), None)
    if oom is not None:
        return f"{OOM_ADVICE} ({protocol.single_line(oom, 200)})"
    if isinstance(exc, SAM2FewShotError):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError):
        return (f"the Python package '{exc.name}' is missing in the worker's environment: "
                "install it (the module's first-use setup does) and run again")
    return f"internal error ({type(exc).__name__}): {exc}"


def causes(exc: BaseException) -> list[BaseException]:
    """The exception and the chain of causes behind it (hydra and our own wrappers hide them)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


class Worker:
    """Reads requests, runs jobs one at a time, answers each with one result or error event."""

    def __init__(self, emitter: Emitter):
        from .live_sessions import SessionHost
        from .runner import Runner

        self.emitter = emitter
        self.runner = Runner()
        self.sessions = SessionHost(self.runner)  # the live session (clicks), on the runner's model

    def handle(self, line: bytes) -> bool:
        """Handle one request line; False when the worker should stop."""
        if not line.strip():
            return True
        try:
            request = session_protocol.parse_request(line)
        except protocol.ProtocolError as exc:
            self.emitter.send(protocol.error(exc.job_id, f"invalid job: {exc}"))
            return True
        except Exception as exc:  # noqa: BLE001 - a request no check foresaw still gets its one line
            self.emitter.send(protocol.error(None, f"invalid job: {error_message(exc)}"))
            return True
        if request == "shutdown":
            return False
        self.run(request)
        return True

    def run(self, job: protocol.Job) -> None:
        out_of_memory = False
        try:
            event = self.run_job(job)
        except ClientGone:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure (MemoryError included) becomes one error line
            if self.emitter.closed:  # a progress event found the pipe closed, and something wrapped that
                raise ClientGone() from None
            out_of_memory = any(is_out_of_memory(e) for e in causes(exc))
            if not isinstance(exc, SAM2FewShotError):
                traceback.print_exc(file=sys.stderr)
            event = protocol.error(job.id, error_message(exc))
        if out_of_memory:  # here, not in the handler: its traceback still holds the job's tensors
            self.sessions.close()
            self.runner.forget()
        self.emitter.send(event)

    def run_job(self, job: protocol.Job | protocol.LibraryAdd | protocol.ExampleData) -> dict:
        """The job through the Runner, its files written; the result event to send back."""
        from ..methods.registry import get_method
        from .outputs import write_outputs

        if isinstance(job, session_protocol.SESSION_REQUESTS):
            return self.sessions.handle(job, self.emitter.progress_for(job.id))
        if isinstance(job, protocol.LibraryAdd):
            with self.sessions.around_job(job.model):  # the live session's encoding waits: one model at work
                return self.add_to_library(job)
        if isinstance(job, protocol.ExampleData):
            return self.example_data(job)
        relative = protocol.relative_paths(job)
        if relative:
            field, path = relative[0]
            raise InputError(f"job.{field} must be an absolute path, got '{path}': the worker's working folder is "
                             "not the client's")
        start = time.perf_counter()
        model = job.model if get_method(job.method).needs_model else None  # registration needs none
        with self.sessions.around_job(model):
            labels, report = self.runner.run(job, self.emitter.progress_for(job.id))
        reused = report["run"]["session_reused"]
        report["worker"] = {"session_reused": reused, "job_id": job.id}
        write_outputs(labels, report, job.out, job.report)
        encoded = int(report.get("timing", {}).get("frames_encoded", 0))
        return protocol.result(job.id, job.out, job.report, time.perf_counter() - start, encoded, reused)


    def add_to_library(self, job: protocol.LibraryAdd) -> dict:
        """library/add.add_case with the features of the library's existing indexes (SAM2's from the warm
        model of ``job.model``): the embedding runs here, never in Slicer's process."""
        from ..library.add import add_case
        from ..library.cases import label_base

        features = [self.library_features(name, job.model) for name in _index_feature_names(job.library)]
        added = add_case(job.library, job.image, job.labels, name=job.name, replace=job.replace, features=features,
                         progress=self.emitter.progress_for(job.id))
        synced = sum(1 for ix in added.indexes if not ix.left)
        left = len(added.indexes) - synced
        index = (f"{synced} index{'es' if synced != 1 else ''} updated" if added.indexes
                 else "no index yet: the first retrieval run embeds every case")
        index += f"; {left} left for its own model" if left else ""
        name = label_base(added.case.labels) or added.case.id
        message = f"Added {name} to the library {added.library} ({index})."
        return protocol.added(job.id, name, str(added.library), message)

    def example_data(self, request: protocol.ExampleData) -> dict:
        """The demo's pair from the cache, downloaded (MD5-checked) and unpacked there the first time
        (io/example_data.py logs the download, and the log reaches the panel)."""
        from ..common.cache import require_cache
        from ..io.example_data import DEMO_QUERY, DEMO_SUPPORT, example_cases, structure_names

        self.emitter.send(protocol.progress(request.id, "example data", 0, 1))
        try:
            require_cache()
            cases = example_cases()
        except InputError as exc:
            raise InputError(example_data_problem(exc)) from None
        except OSError as exc:  # unpacking into the cache: a full disk, say
            raise InputError(f"the example data could not be unpacked into the cache folder ({exc.strerror or exc}); "
                             "free some disk space or choose another cache folder, then try again") from None
        missing = [case for case in (DEMO_QUERY, DEMO_SUPPORT) if case not in cases]
        if missing:
            raise InputError(f"the example data in the cache lack the case {missing[0]}; empty the cache folder's "
                             "data folder and try again")
        self.emitter.send(protocol.progress(request.id, "example data", 1, 1))
        (query, _), (support, labels) = cases[DEMO_QUERY], cases[DEMO_SUPPORT]
        return protocol.example(request.id, str(query), str(support), str(labels), DEMO_QUERY, DEMO_SUPPORT,
                                structure_names())

    def library_features(self, name: str, options):
        from ..library.sync import library_features
        from ..sam2.devices import resolve_device

        if name == "sam2":
            predictor, _ = self.runner.model(options)
            return library_features(name, predictor, predictor.device)
        return library_features(name, None, resolve_device(options.device), offline=options.offline,
                                random_weights=options.random_weights, seed=options.seed, progress=False)


def example_data_problem(exc: InputError) -> str:
    """Why the example data could not be had, in plain words: io/example_data.py names the URL and the
    low-level reason, and keeps the network error as the context of its InputError."""
    context = exc.__context__
    if isinstance(context, OSError):
        reason = getattr(context, "reason", context)  # urllib's URLError wraps the socket's error
        why = getattr(reason, "strerror", None) or str(reason)
        return f"the download failed ({why}); check this computer's internet connection and try again"
    if "checksum" in str(exc):
        return ("the download arrived damaged or changed (its checksum does not match the published one) and was "
                "not kept; try again later")
    return str(exc)


def _index_feature_names(library: str) -> list[str]:
    """The features of the indexes a library keeps; none for a library that does not exist yet."""
    from ..library.add import index_feature_names
    from ..library.cases import open_library

    try:
        return index_feature_names(open_library(library))
    except InputError:  # a new or empty folder: nothing indexed yet
        return []


def preload(emitter: Emitter) -> dict:
    """Import torch and sam2 before the first job, so a job does not pay for it (or learn late that
    they are missing); the devices torch sees, for the ready event."""
    try:
        import torch

        from ..methods import matched_support, propagate  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install must not stop the worker from answering
        emitter.send(protocol.log("warning", f"{error_message(exc)} (only the registration method can run)"))
        return {"cuda": [], "mps": False}
    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append({"name": torch.cuda.get_device_name(index), "free_gib": round(free / 2 ** 30, 1),
                     "total_gib": round(total / 2 ** 30, 1)})
    mps = getattr(torch.backends, "mps", None)
    return {"cuda": gpus, "mps": bool(mps is not None and mps.is_available())}


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def _parent_gone() -> None:
    """Slicer's process is gone (crashed, killed): end now, with the job, and free the GPU.

    os._exit, from the watching thread: the main thread may be deep in one torch call for minutes, and
    neither an exception nor a signal handler runs before that call returns. Nothing is lost by skipping
    the clean-up: the events and the result file had only the gone process as reader, its job folder is
    swept at the next module start (its owner is gone), and the system frees the GPU memory of an ended
    process. The exit code is a closed client's: the same thing happened."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - no psutil: the worker starts no children of its own anyway
        children = []
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    os._exit(CLIENT_GONE_EXIT)


def main() -> int:
    # Watched by polling, not prctl(PR_SET_PDEATHSIG): that signal tells of the death of the parent *thread*,
    # and the parent is PythonSlicer's launcher, which outlives a Slicer crash.
    owners.watch(owners.parent_record(), _parent_gone, PARENT_POLL_S)
    stream = claim_stdout()
    emitter = Emitter(stream)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    engine_log = logging.getLogger(__package__.partition(".")[0])
    engine_log.addHandler(EventLogHandler(emitter))
    engine_log.setLevel(logging.INFO)
    engine_log.propagate = False
    signal.signal(signal.SIGTERM, _stop)  # a polite stop ends like Ctrl-C: no traceback, exit code 130
    worker = None
    try:
        devices = preload(emitter)
        worker = Worker(emitter)
        emitter.send(protocol.ready(os.getpid(), __version__, devices))
        for line in sys.stdin.buffer:
            if not worker.handle(line):
                break
    except KeyboardInterrupt:
        return 130
    except ClientGone:  # the client closed the pipe: nobody to answer, nothing to explain
        return CLIENT_GONE_EXIT
    finally:
        if worker is not None:  # the live session's encoding stops and its scratch file goes
            worker.sessions.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
