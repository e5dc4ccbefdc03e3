"""The scheduler's waiting queue: preempted requests first, then the clients' requests in turns; O(1) removal.

Preempted requests (appendleft) come before every new one, as in a plain FCFS queue. New requests queue
per client (Request.client: the API key, or with no keys the HTTP request, so a completions batch is one
client) and the clients take turns: the queue's order is the first waiting request of each client, then
the second of each, and so on; a client whose request leaves the queue (admitted or aborted) goes to the
back of the turns. So another client's request waits behind at most one request of a big batch, not
behind its 60th sequence. Within one client, first come first served.

A request removed from the middle stays in its deque as a stale entry, skipped and dropped when it is
reached; a ticket per entry tells a live entry from a stale one, so a request that leaves and comes back
(preempted again) is never seen twice. Counts (sequences and their tokens) are kept as requests come and
go, so the engine's load() reads them in O(1)."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from server.scheduler.request import Request

Entry = tuple[int, Request]  # (ticket, request)
FRONT = None  # the place of a preempted request: before every client's turn


@dataclass(slots=True)
class _Line:
    """One client's waiting requests, in arrival order (stale entries included)."""

    entries: deque[Entry] = field(default_factory=deque)
    live: int = 0


class WaitingQueue:
    def __init__(self) -> None:
        self._front: deque[Entry] = deque()  # preempted requests, next to be served first
        self._lines: OrderedDict[str, _Line] = OrderedDict()  # the clients in turn order
        self._places: dict[str, tuple[int, str | None]] = {}  # request id -> (live ticket, client or FRONT)
        self._next_ticket = itertools.count()
        self.num_tokens = (
            0  # tokens to compute for every waiting request (prompt + output kept on preemption)
        )
        self._token_counts: dict[str, int] = {}

    def append(self, request: Request) -> None:
        """A new request, at the end of its client's line."""
        line = self._lines.get(request.client)
        if line is None:
            line = self._lines[request.client] = _Line()
        line.entries.append(self._enter(request, request.client))
        line.live += 1

    def appendleft(self, request: Request) -> None:
        """A preempted request, before everything else."""
        self._front.appendleft(self._enter(request, FRONT))

    def _enter(self, request: Request, place: str | None) -> Entry:
        if request.request_id in self._places:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        ticket = next(self._next_ticket)
        self._places[request.request_id] = (ticket, place)
        self._token_counts[request.request_id] = request.num_tokens
        self.num_tokens += request.num_tokens
        return ticket, request

    def remove(self, request: Request) -> None:
        """Take a waiting request out, wherever it is (O(1): its entry goes stale). Its client's turn
        passes: the client goes to the back of the turn order."""
        _, place = self._places.pop(request.request_id)
        self.num_tokens -= self._token_counts.pop(request.request_id)
        if place is FRONT:
            return
        line = self._lines[place]
        line.live -= 1
        if line.live == 0:
            del self._lines[place]
        else:
            self._lines.move_to_end(place)

    def popleft(self) -> Request:
        request = self[0]
        self.remove(request)
        return request

    def _live(self, entry: Entry) -> bool:
        ticket, request = entry
        place = self._places.get(request.request_id)
        return place is not None and place[0] == ticket

    def _live_entries(self, entries: deque[Entry]) -> Iterator[Request]:
        while entries and not self._live(entries[0]):
            entries.popleft()
        return (request for ticket, request in entries if self._live((ticket, request)))

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests in queue order (do not change the queue while iterating): the preempted
        ones, then each client's first, each client's second, ... Lazy: k requests cost O(k) lines."""
        yield from self._live_entries(self._front)
        turns: list[Iterator[Request]] = []
        for line in self._lines.values():
            requests = self._live_entries(line.entries)
            first = next(requests, None)
            if first is not None:
                yield first
                turns.append(requests)
        while turns:
            still: list[Iterator[Request]] = []
            for requests in turns:
                request = next(requests, None)
                if request is not None:
                    yield request
                    still.append(requests)
            turns = still

    def __contains__(self, request: object) -> bool:
        return isinstance(request, Request) and request.request_id in self._places

    def __len__(self) -> int:
        return len(self._places)

    def __bool__(self) -> bool:
        return bool(self._places)

    def __getitem__(self, index: int) -> Request:
        request = next(itertools.islice(iter(self), index, None), None)
        if request is None:
            raise IndexError("waiting queue index out of range")
        return request
