"""The ``fraudd`` group's commands that live in other packages, each registered by name and imported
only when it is invoked (click's lazily loaded subcommands: ``get_command``/``list_commands``).

Such a module imports what its commands need at its top, numpy included (``fraudd rules``): ``fraudd``'s
start-up, ``--help`` and every other command never import it. ``--help`` lists a command not loaded yet
with the short help it is registered with, so the listing imports nothing either."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import click


@dataclass(frozen=True, slots=True)
class Lazy:
    """Where a command is (``module:attribute``) and its short help: its docstring's first sentence,
    as ``fraudd --help`` shows it once the command is loaded (``tests/test_settings.py`` compares)."""

    target: str
    short_help: str


class LazyGroup(click.Group):
    """A group whose ``lazy`` commands are imported when one is looked up by name."""

    def __init__(self, *args: Any, lazy: dict[str, Lazy], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attribute = self.lazy[cmd_name].target.partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, but a command not loaded yet shows its registered short help instead of being imported."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [(name, self._listed(name).get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def _listed(self, name: str) -> click.Command:
        """The command, or a stand-in with its registered short help that shortens it to the width as the command would."""
        if name in self.commands:
            return self.commands[name]
        return click.Command(name, help=self.lazy[name].short_help)
