"""Named alternative schedules of one kernel (the same computation, other launch or loop choices) and the one in
use. Benchmarks time them side by side and tests check each against the reference; the default stays until a GPU
measurement picks another."""

from __future__ import annotations

import contextlib


class Schedules:
    """``table`` maps a schedule name to what the launcher needs to run it; ``name`` is the one in use.

    ``what`` names the choice in errors (e.g. "forward variant")."""

    def __init__(self, what: str, table: dict, default: str):
        if default not in table:
            raise ValueError(f"default {what} {default!r} is not in {sorted(table)}")
        self.what, self.table, self.name = what, table, default

    @property
    def current(self):
        """The table entry of the schedule in use."""
        return self.table[self.name]

    @contextlib.contextmanager
    def use(self, name: str):
        """Run with schedule ``name`` inside the block; the previous one is restored after it."""
        if name not in self.table:
            raise ValueError(f"{self.what} {name!r} is unknown; known: {sorted(self.table)}")
        previous, self.name = self.name, name
        try:
            yield
        finally:
            self.name = previous
