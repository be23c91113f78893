"""The rule sets a scoring worker decides with: the live one, and the one in shadow beside it.

Stored rule sets (``fraudd rules``) are authoritative; where none is live yet the rules file
(``--rules-path``) decides, as before rule sets existed. Each batch hands in the pointer it read
in its first round trip (``rulesets/pointer.py``); only when it moved are the sets it names loaded
from PostgreSQL, and the batch is then decided entirely by them. A load that fails (PostgreSQL
away) keeps the sets in hand and is tried again at the next batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

from fraudd.rulesets import pointer, store
from fraudd.schema import connect
from fraudd.settings import PostgresSettings

from .rules import Rules, RulesError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RuleSets:
    live: Rules
    shadow: Rules | None


class RuleBook:
    def __init__(self, postgres: PostgresSettings, rules_path: Path) -> None:
        self._postgres = postgres
        self._rules_path = rules_path
        self._pointer: bytes | None = None
        self.current = RuleSets(Rules.load(rules_path), None)

    def load(self) -> RuleSets:
        """The stored live and shadow sets, else the rules file (raises RulesError when that is unusable)."""
        with connect(self._postgres.url, self._postgres.schema, connect_timeout=5) as conn:
            live, shadow = store.current(conn)
        self.current = RuleSets(
            Rules.load(self._rules_path) if live is None else live.rules(), None if shadow is None else shadow.rules()
        )
        return self.current

    def for_batch(self, published: bytes | None) -> RuleSets:
        """The sets to decide this batch with, given the pointer it read."""
        if published == self._pointer:
            return self.current
        wanted = pointer.decode(published)
        if published is not None and wanted is not None:
            try:
                self.current = self._fetch(*wanted)
            except (psycopg.Error, store.RuleSetError, RulesError) as exc:
                log.error(
                    "published rule sets not loaded, deciding with the ones in hand",
                    extra={"event": "rules_load_failed", "published": published.decode(), "error": str(exc)},
                )
                return self.current
            log.info(
                "published rule sets taken",
                extra={"event": "rules_published", "rules_version": self.current.live.version, "published": published.decode()},
            )
        self._pointer = published
        return self.current

    def _fetch(self, live: int | None, shadow: int | None) -> RuleSets:
        held = {r.version: r for r in (self.current.live, self.current.shadow) if r is not None}
        with connect(self._postgres.url, self._postgres.schema, connect_timeout=5) as conn:

            def take(version: int) -> Rules:
                return held.get(str(version)) or store.get(conn, version).rules()

            return RuleSets(self.current.live if live is None else take(live), None if shadow is None else take(shadow))
