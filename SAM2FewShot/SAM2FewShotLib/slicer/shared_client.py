"""One worker client shared by the panel's runs and the Segment Editor effect's live session.

One worker serves both (one model in memory), but each side polls the client on its own timer, and
``WorkerClient.poll`` hands every event to whoever calls it first. SharedClient wraps the client: the
events of the requests a listener claimed (the click session's ids) go to that listener's inbox whoever
polls, the rest to the other pollers in order (the panel's RunController, the example-data load), so
neither side ever drops the other's events. Everything else is the wrapped client's (submit, cancel,
shutdown, pending, base_env...). No Qt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..run import protocol
from ..run.client import wait_for

_KEPT_LOGS = 200  # log lines nobody has read yet (no panel run polls): the oldest are dropped


class SharedClient:
    """A WorkerClient whose claimed request ids are routed to their own inbox."""

    def __init__(self, client):
        self.client = client
        self.claimed: set[str] = set()
        self.inbox: list[dict] = []  # events of claimed requests, in order
        self._others: deque = deque()  # unclaimed events taken by ``pump``, for the next ``poll``
        self._logs = 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def submit(self, request, claim: bool = False) -> str:
        request_id = self.client.submit(request)
        if claim:
            self.claimed.add(request_id)
        return request_id

    def pump(self) -> None:
        """Take the events that have arrived: claimed ones to the inbox, the others kept for ``poll``."""
        for event in self.client.poll():
            self._route(event)

    def poll(self) -> list[dict]:
        """The unclaimed events (the panel's), in order; never blocks. Claimed ones go to the inbox."""
        self.pump()
        events = list(self._others)
        self._others.clear()
        self._logs = 0
        return events

    def take_inbox(self) -> list[dict]:
        events, self.inbox = self.inbox, []
        return events

    def wait(self, job_id: str, timeout: float | None = None,
             on_event: Callable[[dict], None] | None = None) -> dict:
        """WorkerClient.wait through the routing (scripts and tests)."""
        return wait_for(self.poll, lambda: self.client.pending, job_id, timeout, on_event)

    def _route(self, event: dict) -> None:
        request_id = event.get("id")
        if request_id in self.claimed:
            self.inbox.append(event)
            if event["event"] in (*protocol.END_EVENTS, "error"):
                self.claimed.discard(request_id)
            return
        if request_id is None and event["event"] == "log":
            self._logs += 1
            if self._logs > _KEPT_LOGS:  # nobody reads them (no run): keep the latest
                self._drop_oldest_log()
        self._others.append(event)

    def _drop_oldest_log(self) -> None:
        for n, old in enumerate(self._others):
            if old.get("id") is None and old["event"] == "log":
                del self._others[n]
                self._logs -= 1
                return


def shared(controller) -> SharedClient:
    """The RunController's client as a SharedClient, created (worker not started) if it has none yet; its
    client_factory wrapped too, so a worker started later (after a cancel, say) is shared the same way."""
    factory = controller.client_factory
    if not getattr(factory, "shares_client", False):
        def wrapped():
            return SharedClient(factory())

        wrapped.shares_client = True
        controller.client_factory = wrapped
    if controller.client is None:
        controller.client = controller.client_factory()
    elif not isinstance(controller.client, SharedClient):
        controller.client = SharedClient(controller.client)
    return controller.client
