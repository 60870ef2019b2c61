"""A bounded load generator for llama-server on this machine: N users, a fixed request mix, a hard time limit.

Each user is a thread that sends its share of the requests one after another (a closed loop: a user waits
for a reply before asking again), streaming ``/completion`` so the time to the first token is what a client
sees. Bounds a serving study relies on: exactly the requests it is given and no more, nothing after the time
limit (a stalled server costs the limit, not a hang), and only loopback addresses: it measures a server this
tool started, never someone else's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..vocabulary.errors import SettingsError

# The shipped request mix: (prompt tokens, reply tokens) of chat turns from short questions to pasted code,
# cycled in this order. Prompt median 112 (32-256), reply median 32 (16-64): small enough that a trial on
# a 2-core CPU takes seconds per user, varied enough that slots finish at different times, as real ones do.
MIX: tuple[tuple[int, int], ...] = ((64, 32), (192, 16), (32, 48), (256, 32), (96, 64), (128, 24), (48, 40), (160, 32))


@dataclass(frozen=True)
class Request:
    prompt: list[int]  # token ids
    n_predict: int


@dataclass
class Done:
    """One request as the client saw it."""

    user: int
    sent: float  # seconds from the start of the load
    first: float | None = None  # first streamed token
    end: float | None = None
    tokens: int = 0  # generated tokens the server reported
    asked: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.end is not None

    @property
    def truncated(self) -> bool:
        return self.ok and self.tokens < self.asked

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def user_tps(self) -> float | None:
        """This reply's decode speed as its user felt it: tokens after the first over the time they took."""
        if not self.ok or self.first is None or self.end is None or self.tokens < 2 or self.end <= self.first:
            return None
        return (self.tokens - 1) / (self.end - self.first)


@dataclass
class LoadResult:
    users: int
    requests: int  # how many the load was given
    wall_s: float
    done: list[Done] = field(default_factory=list)  # every request that was sent
    timed_out: bool = False

    @property
    def failed(self) -> int:
        """Requests that errored, or were never sent because the time limit came first."""
        return sum(not d.ok for d in self.done) + self.requests - len(self.done)

    @property
    def truncated(self) -> int:
        return sum(d.truncated for d in self.done)

    @property
    def throughput(self) -> float:
        """Generated tokens per second, all users together, from the first request to the last reply."""
        return sum(d.tokens for d in self.done if d.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def ttft(self, q: float) -> float | None:
        return _quantile([d.ttft for d in self.done if d.ok and d.ttft is not None], q)

    @property
    def user_tps(self) -> float | None:
        """The median reply's decode speed as its user felt it."""
        return _quantile([d.user_tps for d in self.done if d.user_tps is not None], 0.5)

    def summary(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "requests": self.requests,
            "wall_s": self.wall_s,
            "throughput": self.throughput,
            "user_tps": self.user_tps,
            "ttft_p50": self.ttft(0.5),
            "ttft_p95": self.ttft(0.95),
            "failed": self.failed,
            "truncated": self.truncated,
            "timed_out": self.timed_out,
        }


def _quantile(values: list[float | None], q: float) -> float | None:
    """Nearest-rank quantile (p95 of 16 requests is the 16th): no interpolation between two requests."""
    xs = sorted(v for v in values if v is not None)
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else None


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if its host is this machine's loopback; SettingsError otherwise."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SettingsError(
            f"the load generator only drives a server on this machine's loopback interface, not {host or url!r}"
        )
    return url.rstrip("/")


def requests_for(tokens: list[int], count: int) -> list[Request]:
    """``count`` requests of the shipped mix, each prompt its own slice of ``tokens`` (repeated as needed), so
    no two requests share a prefix the server could reuse."""
    need = sum(MIX[i % len(MIX)][0] for i in range(count))
    text = list(tokens)
    while len(text) < need:
        text += tokens
    out, at = [], 0
    for i in range(count):
        n_prompt, n_reply = MIX[i % len(MIX)]
        out.append(Request(text[at : at + n_prompt], n_reply))
        at += n_prompt
    return out


def run(url: str, requests: list[Request], users: int, time_limit: float) -> LoadResult:
    """Send ``requests`` from ``users`` concurrent users (request i belongs to user i mod users) to the
    llama-server at ``url``; stop at ``time_limit`` seconds whatever is in flight."""
    base = check_loopback(url)
    if users < 1 or time_limit <= 0:
        raise SettingsError(f"a load needs at least one user and a time limit (got {users} users, {time_limit} s)")
    start = time.perf_counter()
    deadline = start + time_limit
    result = LoadResult(users, len(requests), 0.0)
    lock = threading.Lock()

    def user(u: int) -> None:
        for req in requests[u::users]:
            if time.perf_counter() >= deadline:
                return
            d = Done(u, time.perf_counter() - start, asked=req.n_predict)
            with lock:
                result.done.append(d)
            _send(base, req, d, start, deadline)

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(min(users, len(requests)))]
    for t in threads:
        t.start()
    for t in threads:  # a user still waiting at the deadline is left behind: its server is about to be stopped
        t.join(max(0.0, deadline - time.perf_counter()))
    now = time.perf_counter()
    with lock:
        result.done = [dataclasses.replace(d) for d in result.done]  # what a late thread writes is not counted
    for d in result.done:
        if d.end is None and not d.error:
            d.error = "time limit"
    result.timed_out = any(t.is_alive() for t in threads) or len(result.done) < len(requests)
    ends = [d.end for d in result.done if d.end is not None]
    result.wall_s = max(ends) if ends and not result.timed_out else now - start
    return result


def _send(base: str, req: Request, d: Done, start: float, deadline: float) -> None:
    """Stream one completion into ``d``; every read waits at most until the deadline."""
    body = {
        "prompt": req.prompt,
        "n_predict": req.n_predict,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
        "stream": True,
    }
    http = urllib.request.Request(base + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http, timeout=max(0.01, deadline - time.perf_counter())) as r:
            for raw in r:
                now = time.perf_counter()
                line = raw.decode().strip()
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if d.first is None and chunk.get("content"):
                        d.first = now - start
                    if chunk.get("stop"):
                        d.tokens = int(
                            (chunk.get("timings") or {}).get("predicted_n", chunk.get("tokens_predicted", 0))
                        )
                        d.end = now - start
                        return
                if now >= deadline:
                    d.error = "time limit"
                    return
        d.error = "the stream ended without a final chunk"
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        d.error = "time limit" if time.perf_counter() >= deadline else f"{type(e).__name__}: {e}"
