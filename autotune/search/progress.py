"""What a driver tells as it goes (``search.pipeline.tune``, the serving study, the speculation stage): one small
protocol, so the CLI, a bench and a notebook each show progress their own way and a driver never prints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Reporter(Protocol):
    def note(self, text: str) -> None:
        """A line the user should see (a trial's result, a decision, a missing memory model)."""

    def step(self, text: str) -> contextlib.AbstractContextManager[Callable[[str], None]]:
        """A stage that takes a while; yields a function to update its one-line status."""


class Quiet:
    """A reporter that says nothing: the default for code that only wants the result."""

    def note(self, text: str) -> None:
        pass

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Callable[[str], None]]:
        yield lambda _text: None


class Lines(Quiet):
    """Every note, and every status within a step, to one function (``print``, a spinner's ``update``)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def note(self, text: str) -> None:
        self.say(text)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Callable[[str], None]]:
        self.say(text)
        yield self.say
