"""The scheduler's waiting queue: FCFS, preempted requests back at the front, removal in O(1).

A request removed from the middle (aborted, or admitted past others) stays in the deque as a stale
entry, skipped and dropped when it is reached; a ticket per entry tells a live entry from a stale one,
so a request that leaves and comes back (preempted again) is never seen twice. Counts (sequences and
their tokens) are kept as requests come and go, so the engine's load() reads them in O(1)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

from server.scheduler.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        self._entries: deque[tuple[int, Request]] = deque()
        self._tickets: dict[str, int] = {}  # request id -> the ticket of its live entry
        self._next_ticket = itertools.count()
        self.num_tokens = (
            0  # tokens to compute for every waiting request (prompt + output kept on preemption)
        )
        self._token_counts: dict[str, int] = {}

    def append(self, request: Request) -> None:
        self._entries.append(self._enter(request))

    def appendleft(self, request: Request) -> None:
        self._entries.appendleft(self._enter(request))

    def _enter(self, request: Request) -> tuple[int, Request]:
        if request.request_id in self._tickets:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        ticket = next(self._next_ticket)
        self._tickets[request.request_id] = ticket
        self._token_counts[request.request_id] = request.num_tokens
        self.num_tokens += request.num_tokens
        return ticket, request

    def remove(self, request: Request) -> None:
        """Take a waiting request out, wherever it is (O(1): its entry goes stale)."""
        del self._tickets[request.request_id]
        self.num_tokens -= self._token_counts.pop(request.request_id)

    def popleft(self) -> Request:
        self._drop_stale_front()
        _, request = self._entries.popleft()
        self.remove(request)
        return request

    def _drop_stale_front(self) -> None:
        while self._entries and not self._live(self._entries[0]):
            self._entries.popleft()

    def _live(self, entry: tuple[int, Request]) -> bool:
        ticket, request = entry
        return self._tickets.get(request.request_id) == ticket

    def __contains__(self, request: object) -> bool:
        return isinstance(request, Request) and request.request_id in self._tickets

    def __len__(self) -> int:
        return len(self._tickets)

    def __bool__(self) -> bool:
        return bool(self._tickets)

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests in queue order (do not change the queue while iterating)."""
        self._drop_stale_front()
        return (
            request for ticket, request in self._entries if self._tickets.get(request.request_id) == ticket
        )

    def __getitem__(self, index: int) -> Request:
        if index == 0:
            self._drop_stale_front()
            return self._entries[0][1]
        return list(self)[index]
