"""A cohort on a Ray cluster: one actor per GPU (or N CPU actors), each with its model and support
features warm; cases are handed out as actors free up. An actor that dies (killed, out of memory)
has its case given to another; outputs go to the shared output folder with the same atomic writes,
and a case whose outputs are already complete is never computed or written twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..common.errors import InputError
from ..run.request import Request
from .cohort import Case
from .manifest import failed

log = logging.getLogger(__name__)
NAMESPACE = "sam2fewshot"


class CohortWorker:
    """The state a Ray actor keeps between cases: a Runner with the model and supports warm."""

    def __init__(self, template: Request, folder: str, suffix: str, options: str, tolerance_mm: float = 1.0):
        from ..run.runner import Runner

        self.template, self.folder, self.suffix = template, Path(folder), suffix
        self.options, self.tolerance_mm = options, tolerance_mm
        self.runner = Runner(max_sessions=1)

    def run(self, case: Case, adopt: bool) -> dict:
        from .case import run_case

        return run_case(self.runner, case, self.template, self.folder, self.suffix, self.options,
                        tolerance_mm=self.tolerance_mm, adopt=adopt)

    def close(self) -> None:
        self.runner.close()


def require_ray():
    try:
        import ray
    except ImportError:
        raise InputError("running a cohort on Ray needs the 'ray' package: "
                         "pip install 'sam2fewshot[cluster]'") from None
    return ray


@contextmanager
def ray_session(address: str | None = None, workers: int | None = None, logs: Path | None = None,
                quiet: bool = False) -> Iterator[int]:
    """Ray for the length of a cohort: a new local instance (``address`` None) or an existing cluster,
    shut down after unless it was already running; yields the cluster's GPU count. Ray's own log lines
    go to ``logs``/ray.log (and the terminal too unless ``quiet``); a local instance started here
    leaves its session folder's logs in ``logs`` and nothing in ~/.ray or the system temp folder."""
    ray = require_ray()
    started_here = not ray.is_initialized()
    with ray_logging(logs, quiet) as logging_again, _token_in_memory(started_here and address is None):
        session = None
        if started_here:
            try:
                context = ray.init(address=address, num_cpus=workers if address is None and workers else None,
                                   include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
                                   configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"cannot reach the Ray cluster at {address or 'a new local instance'}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            logging_again()
            session = context.address_info.get("session_dir") if address is None else None
        try:
            yield int(ray.cluster_resources().get("GPU", 0))
        finally:
            if started_here:
                ray.shutdown()
            if session:
                keep_session_logs(Path(session), logs)


@contextmanager
def ray_logging(logs: Path | None, quiet: bool) -> Iterator[Callable[[], None]]:
    """Ray's Python log lines into ``logs``/ray.log, and on the terminal (Ray's own handler) only when
    not quiet; yields what to call again after ray.init, which clears the "ray" logger's handlers. Its
    "ray._private" logger (what init itself says) gets them too, for the lines said during init."""
    loggers = [logging.getLogger("ray"), logging.getLogger("ray._private")]
    before = [(list(lg.handlers), lg.propagate) for lg in loggers]
    handler = None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logs / "ray.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ours = [h for h in (*([] if quiet else before[0][0]), handler) if h is not None]

    def apply() -> None:
        for lg in loggers:
            lg.handlers, lg.propagate = list(ours), False

    apply()
    try:
        yield apply
    finally:
        for lg, (handlers, propagate) in zip(loggers, before, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
        if handler is not None:
            handler.close()


@contextmanager
def _token_in_memory(applies: bool) -> Iterator[None]:
    """A new local instance gets a token of its own in its processes' environment: Ray would otherwise
    write one into ~/.ray/auth_token. A site's own RAY_AUTH_* settings are left as they are."""
    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    if not applies or any(k in os.environ for k in keys):
        yield
        return
    os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex  # Ray then turns token mode on (RAY_AUTH_MODE) itself
    try:
        yield
    finally:
        for key in keys[:2]:
            os.environ.pop(key, None)


def keep_session_logs(session: Path, logs: Path | None) -> None:
    """Copy a finished local session's logs into ``logs``, then remove the session folder (and the
    'session_latest' link when it points to it): Ray leaves both in the system temp folder."""
    if logs is not None and (session / "logs").is_dir():
        shutil.copytree(session / "logs", logs / "ray_session", dirs_exist_ok=True, symlinks=True,
                        ignore_dangling_symlinks=True)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
        latest.unlink(missing_ok=True)
    shutil.rmtree(session, ignore_errors=True)


def run_on_ray(cases: Sequence[Case], template: Request, folder: Path, suffix: str, options: str,
               on_record: Callable[[Case, dict], None], workers: int | None = None,
               max_retries: int = 2, tolerance_mm: float = 1.0, adoptable: Collection[str] = ()) -> None:
    """Run the cases on the Ray cluster of the current ray_session. A case retried after its actor died
    may adopt what that actor wrote completely (the manifest cannot have recorded it)."""
    ray = require_ray()
    from ray.exceptions import RayActorError, RayTaskError

    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(CohortWorker)
    run_id = uuid.uuid4().hex[:8]
    names = iter(f"cohort-{run_id}-{n}" for n in range(10 ** 6))

    def new_actor():
        name = next(names)
        return name, actor.options(name=name, namespace=NAMESPACE).remote(template, str(folder), suffix, options,
                                                                       tolerance_mm)

    idle = dict(new_actor() for _ in range(min(count, len(cases))))
    queue, running, attempts = deque(cases), {}, {}
    while queue or running:
        while queue and idle:
            name, handle = idle.popitem()
            case = queue.popleft()
            adopt = case.id in adoptable or case.id in attempts
            running[handle.run.remote(case, adopt)] = (name, handle, case)
        [ready], _ = ray.wait(list(running), num_returns=1)
        name, handle, case = running.pop(ready)
        try:
            record = ray.get(ready)
        except RayActorError as exc:  # the actor died with the case: another one takes it
            attempts[case.id] = attempts.get(case.id, 0) + 1
            log.warning("the worker running %s died (%s)", case.id, type(exc).__name__)
            ray.kill(handle, no_restart=True)
            idle.update([new_actor()])
            if attempts[case.id] <= max_retries:
                queue.appendleft(case)
            else:
                on_record(case, failed(case, options, f"its worker died {attempts[case.id]} times "
                                                      "(out of memory, or killed)", attempts[case.id]))
            continue
        except RayTaskError as exc:  # run_case records every error itself: this is a bug, said in one line
            record = failed(case, options, f"internal error: {str(exc.cause or exc).splitlines()[0]}")
        idle[name] = handle
        record["attempts"] = attempts.get(case.id, 0) + 1
        record["worker"] = name
        on_record(case, record)
    ray.get([h.close.remote() for h in idle.values()])
    for handle in idle.values():
        ray.kill(handle)
