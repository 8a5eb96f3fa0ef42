"""Key-to-column tables, compiled once per family and planned once per key set.

A family declares each column as a rule: the payload keys it reads and a function of the
message's fields (`fields.get`) and its per-pack SoCs. A rule gives None (unknown) when none
of its keys is in the message, so a message only needs the rules its keys reach. A push
carries a handful of keys out of the family's hundred, always the same handful for the same
kind of message: the plan (which rules to run) is worked out the first time a key set is
seen and reused after that, so a five-key push runs four or five small functions instead of
the whole decoder.

`Table.decode` gives exactly what running every rule gives: tests/test_decoders_compiled.py
checks it on every fixture and on random key subsets and values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .reading import CLEARED, finish, with_soc_min

# Key sets remembered per family. A station sends a few kinds of message; a bridge with many
# models a few dozen. Past this the plans are dropped and built again as keys come (a REST
# map of 500 keys makes a 4 KB key; 1,024 of them stay under 5 MB).
PLAN_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Rule:
    """One column: the payload keys it reads, and its value from `(fields.get, packs)`."""

    column: str
    keys: frozenset[str]
    value: Callable[[Callable[..., Any], dict[str, float]], Any]


def rule(column: str, keys, value) -> Rule:
    return Rule(column, frozenset(keys), value)


class Table:
    """A family's rules in column order, and the per-pack SoC reader they share."""

    def __init__(self, rules: list[Rule], packs: Callable[[Callable[..., Any]], dict[str, float]],
                 pack_keys) -> None:
        self.rules = tuple(rules)
        self.packs = packs
        self.pack_keys = frozenset(pack_keys)
        self.keys = frozenset().union(*(r.keys for r in rules), self.pack_keys)
        self._plans: dict[tuple, tuple[bool, tuple]] = {}

    def plan(self, keys: tuple) -> tuple[bool, tuple]:
        """(whether packs are read, the (column, value) rules) for a message with `keys`."""
        found = self._plans.get(keys)
        if found is None:
            present = self.keys.intersection(keys)
            found = (not self.pack_keys.isdisjoint(present),
                     tuple((r.column, r.value) for r in self.rules
                           if not r.keys.isdisjoint(present)))
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[keys] = found
        return found

    def decode(self, fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Columns and per-pack SoCs, running only the rules the message's keys reach."""
        with_packs, rules = self.plan(tuple(fields))
        get = fields.get
        packs = self.packs(get) if with_packs else {}
        # finish() in the same pass: unknown (None) left out, CLEARED stored as None.
        result = {}
        for column, value in rules:
            found = value(get, packs)
            if found is not None:
                result[column] = None if found is CLEARED else found
        return with_soc_min(result, packs), packs

    def decode_all(self, fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """The same by running every rule: the reference `decode` must equal."""
        get = fields.get
        packs = self.packs(get)
        return finish({r.column: r.value(get, packs) for r in self.rules}, packs), packs
