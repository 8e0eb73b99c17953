"""The order a proxy pairs the clients it holds for one key in: source addresses take turns, each in arrival order.

A client's place depends only on when it arrived and on how many turns its
address has had, never on what other clients do after it arrived:

* the clients of one address are paired in arrival order (a later connection
  from the same address, the same host or one NAT, never overtakes one that
  is waiting);
* addresses take turns in rounds: each address with clients waiting is served
  once per round, the address whose waiting client came first going first. An
  address that has had its turn in a round does not get another in that round,
  even if all its clients left and a new one came (reconnecting does not buy a
  turn), and an address new to the key joins the round under way.

So the client that is the k-th of its address to wait is paired before any
other address has been served k + 1 times: within at most k × A pairings of
the key, A being the number of addresses with clients waiting.

This is start-time fair queueing (Goyal et al., 1996) with one turn as the unit
of work: ``vtime`` is the round being served; an address's ``stamp`` is the round
of its next turn, and it stays remembered (while it is ahead of ``vtime``) after
the address's last client leaves.
"""
from __future__ import annotations

from collections import deque
from typing import Generic, Iterator, Protocol, TypeVar


class _Waiter(Protocol):
    host: str  # source address
    arrival: int  # order of arrival at the proxy (unique, increasing)


W = TypeVar("W", bound=_Waiter)


class HeldQueue(Generic[W]):
    """The clients held for one key, by source address; ``peek()`` is the one to pair next."""

    def __init__(self) -> None:
        self._by_host: dict[str, deque[W]] = {}
        self._stamp: dict[str, int] = {}  # the round of each address's next turn (kept while ahead of vtime)
        self.vtime = 0  # the round being served

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_host.values())

    def __bool__(self) -> bool:
        return bool(self._by_host)

    def __iter__(self) -> Iterator[W]:
        for queue in self._by_host.values():
            yield from queue

    def add(self, waiter: W) -> None:
        """``waiter`` (the newest arrival) waits behind the clients of its address."""
        queue = self._by_host.get(waiter.host)
        if queue is None:
            queue = self._by_host[waiter.host] = deque()
            self._stamp[waiter.host] = max(self.vtime, self._stamp.get(waiter.host, self.vtime))
        queue.append(waiter)

    def peek(self) -> W | None:
        """The client to pair next: of the addresses whose turn comes first, the one whose client waited longest."""
        best = min(self._by_host.items(), key=lambda item: (self._stamp[item[0]], item[1][0].arrival), default=None)
        return None if best is None else best[1][0]

    def remove(self, waiter: W, served: bool) -> None:
        """``waiter`` leaves the queue (if it is there): ``served`` (it was ``peek()``: its address has had its turn)
        or not (it left, or was refused)."""
        host = waiter.host
        queue = self._by_host.get(host)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if served:
            self.vtime = self._stamp[host]
            self._stamp[host] += 1
            for other in [h for h, s in self._stamp.items() if s <= self.vtime and h not in self._by_host]:
                del self._stamp[other]  # behind the round: the same as never seen
        if not queue:
            del self._by_host[host]

    def newest_of(self, host: str) -> W | None:
        """The client of ``host`` that arrived last (None if it has none here)."""
        queue = self._by_host.get(host)
        return queue[-1] if queue else None
