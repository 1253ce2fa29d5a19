"""stopstorm's command-line options: each layer declares its own in one table, this module puts them where
Locust shows options (the command line, `locust.conf`, `STOPSTORM_*` variables, `stopstorm --help` and the web
UI's start form) and checks them all before anything starts.

Each option is declared once, as an `Option` in its layer's `OptionTable`: flag, default, help and its *rule*,
the parse-and-check that decides what the value may be (`Number`: finite, within bounds; `Parsed`: the layer's
own parser for a string; `WritablePath`: a file stopstorm will write). Argparse turns the text into a number
(`nan` and `inf` are numbers to it); the rule then refuses what a run cannot use, with one line naming the
option: `--hold-seconds must be a finite number >= 0 and <= 1e+06 (seconds), got nan`.

A layer calls `register(TABLE, check)` at import; `check(opts)` (optional) is for what no single option's rule
can say (one option against another). The users register themselves, so this package never imports them (arrows
run users → metrics). `register_preflight` is for checks that need the target (the host answers, serves the
model): they run once the host is known, after the embedded simulator has started. `check_options` runs every
rule and then every layer check: the plugin's init listener calls it before it starts anything.

Locust's start form lists only arguments added on its parser itself, not on a group, so `argument_group` marks
every argument of its group for the form the same way (`include_in_web_ui`, `is_secret`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from locust import events
from locust.argument_parser import LocustArgumentParser

__all__ = ["MAX_SECONDS", "Number", "Option", "OptionTable", "Parsed", "Rule", "WritablePath", "argument_group",
           "check_options", "check_writable", "preflight", "register", "register_preflight", "seconds", "tables"]

AddArguments = Callable[[LocustArgumentParser], None]
Check = Callable[[Any], None]
Preflight = Callable[[Any], None]

MAX_SECONDS = 1e6
"""The longest time any stopstorm option may give (about 11.6 days): past it a timer is a typo, and some
clients' timers overflow (uvloop's and the sockets' take at most ~9e9 s)."""


class Rule(Protocol):
    """What an option's value may be: `check` raises ValueError naming the flag, or returns nothing."""

    def check(self, flag: str, value: Any) -> None: ...

    def words(self) -> str:
        """What the rule allows, for the docs and the help."""
        ...


def _g(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True, slots=True)
class Number:
    """A number: finite, at least `low` (above it with `above`), at most `high` (below it with `below`); a whole
    number with `integer`."""

    low: float | None = None
    high: float | None = None
    above: bool = False  # low itself is refused
    below: bool = False  # high itself is refused
    integer: bool = False
    unit: str = ""  # shown after the range: "seconds", "ms", "tokens"…

    def words(self) -> str:
        low, high = self.low, self.high
        if self.integer:
            parts = [f"at least {_g(low)}" if low is not None else "",
                     f"at most {_g(high)}" if high is not None else ""]
            text = " and ".join(p for p in parts if p)
        elif low is not None and high is not None and not self.above:
            text = f"within [{_g(low)}, {_g(high)}{')' if self.below else ']'}"
        else:
            parts = [(f"> {_g(low)}" if self.above else f">= {_g(low)}") if low is not None else "",
                     (f"< {_g(high)}" if self.below else f"<= {_g(high)}") if high is not None else ""]
            text = " and ".join(p for p in parts if p)
        notes = ", ".join(n for n in (self.unit, "a whole number" if self.integer else "finite") if n)
        return f"{text} ({notes})" if text else f"a number ({notes})"

    def check(self, flag: str, value: Any) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and self.integer:
            ok = isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
        if ok:
            ok = math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.above else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.below else value <= self.high
        if not ok:
            raise ValueError(f"{flag} must be {self.words()}, got {value!r}")


def seconds(low: float = 0.0, above: bool = False, high: float = MAX_SECONDS) -> Number:
    """A duration in seconds (the most common rule)."""
    return Number(low=low, high=high, above=above, unit="seconds")


@dataclass(frozen=True, slots=True)
class Parsed:
    """A string the layer's own parser reads (it raises ValueError naming the option); "" skips it when
    `optional`."""

    parse: Callable[[Any], Any]
    allows: str = ""
    optional: bool = False

    def words(self) -> str:
        return self.allows

    def check(self, flag: str, value: Any) -> None:
        if self.optional and not value:
            return
        self.parse(value)


def check_writable(flag: str, path: str) -> None:
    """Refuse a path stopstorm cannot write a file at (checked without writing to the file itself)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file's path")
    parent = p.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: no such directory {str(parent)!r}")
    try:
        if p.exists():
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)  # opens, writes nothing
            os.close(fd)
        else:  # the file itself is created later (the report is written atomically beside it)
            tempfile.NamedTemporaryFile(dir=parent, prefix=".stopstorm-check-").close()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


@dataclass(frozen=True, slots=True)
class WritablePath:
    """A file stopstorm writes: its directory must exist and take a new file (or the file be writable);
    "" means off when `optional`."""

    optional: bool = False

    def words(self) -> str:
        return "a file path stopstorm can write" + (" (empty: off)" if self.optional else "")

    def check(self, flag: str, value: Any) -> None:
        if not value:
            if self.optional:
                return
            raise ValueError(f"{flag} must be a file path, got {value!r}")
        check_writable(flag, str(value))


@dataclass(frozen=True, slots=True)
class Option:
    """One option, declared once: how Locust adds it and what its value may be."""

    flag: str
    help: str
    default: Any = ""
    rule: Rule | None = None
    type: Callable[[str], Any] | None = None  # argparse's type (int, float); None: text, or a switch for a bool
    choices: tuple[str, ...] | None = None
    secret: bool = False
    env: str = ""  # default STOPSTORM_<FLAG>
    master_only: bool = False  # checked where the run is collected, never on a Locust worker (files it writes)
    when: Callable[[Any], bool] | None = None  # checked only when this says the option is in use
    in_web_ui: bool = True  # False: never in Locust's start form (a value a browser must not set)
    repeat: bool = False  # may be given more than once: its value is the list of every one given

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env_var(self) -> str:
        return self.env or "STOPSTORM_" + self.dest.upper()

    def add_to(self, group: _WebUiGroup) -> None:
        kwargs: dict[str, Any] = {"default": self.default, "env_var": self.env_var, "help": self.help}
        if isinstance(self.default, bool):
            kwargs["action"] = "store_true"
        elif self.repeat:
            kwargs["action"] = "append"
        else:
            if self.type is not None:
                kwargs["type"] = self.type
            if self.choices is not None:
                kwargs["choices"] = list(self.choices)
        group.add_argument(self.flag, is_secret=self.secret, include_in_web_ui=self.in_web_ui, **kwargs)

    def check(self, opts: Any) -> None:
        if self.rule is None or not hasattr(opts, self.dest):
            return  # options of a layer this parser never had (a test's partial namespace)
        if self.when is not None and not self.when(opts):
            return
        self.rule.check(self.flag, getattr(opts, self.dest))


@dataclass(frozen=True, slots=True)
class OptionTable:
    """A layer's options: one titled group in `stopstorm --help`, every option's rule beside it."""

    title: str
    options: tuple[Option, ...]
    description: str | None = None

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options)

    def __getitem__(self, flag: str) -> Option:
        for o in self.options:
            if o.flag == flag:
                return o
        raise KeyError(flag)

    def add_arguments(self, parser: LocustArgumentParser) -> None:
        group = argument_group(parser, self.title, self.description)
        for option in self.options:
            option.add_to(group)

    def check(self, opts: Any, worker: bool = False) -> None:
        """Every option's rule (those this process uses)."""
        for option in self.options:
            if not (worker and option.master_only):
                option.check(opts)


class _WebUiGroup:
    """An argument group whose arguments also show in Locust's web UI form, as the parser's own do."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def add_argument(self, *args: Any, include_in_web_ui: bool = True, is_secret: bool = False,
                     **kwargs: Any) -> Any:
        action = self._group.add_argument(*args, **kwargs)
        action.include_in_web_ui = include_in_web_ui
        action.is_secret = is_secret
        action.is_required = False
        action.is_multiple = False
        return action


def argument_group(parser: LocustArgumentParser, title: str, description: str | None = None) -> _WebUiGroup:
    """A titled group of stopstorm options (one per layer in `stopstorm --help`), each one in the web UI."""
    return _WebUiGroup(parser.add_argument_group(title, description))


_adders: list[tuple[int, AddArguments]] = []
_tables: list[tuple[int, OptionTable]] = []
_checks: list[Check] = []
_preflights: list[Preflight] = []


def register(options: AddArguments | OptionTable, check: Check | None = None, rank: int = 50) -> None:
    """Add a layer's options to every parser Locust builds, their groups in `rank` order (the help reads from
    what a user sets most: streams, then the probe and load shapes, the report, the simulator…); `check(opts)`
    refuses what the options' own rules cannot. Registering the same table or function again changes nothing."""
    adder = options.add_arguments if isinstance(options, OptionTable) else options
    if isinstance(options, OptionTable) and all(t is not options for _, t in _tables):
        _tables.append((rank, options))
        _tables.sort(key=lambda rt: rt[0])
    if all(add != adder for _, add in _adders):
        _adders.append((rank, adder))
        _adders.sort(key=lambda ra: ra[0])
    if check is not None and check not in _checks:
        _checks.append(check)


def tables() -> list[OptionTable]:
    """Every registered table, in rank order (the docs' and tests' view of every rule)."""
    return [t for _, t in _tables]


def register_preflight(check: Preflight) -> None:
    """A check of the target, run with the Locust Environment once its host is known."""
    if check not in _preflights:
        _preflights.append(check)


def check_options(opts: Any, worker: bool = False) -> None:
    """Every registered option's rule, then every layer's check, in registration order; the first bad value
    raises ValueError. A Locust worker (`worker`) skips what only the master uses (the files it writes)."""
    for table in tables():
        table.check(opts, worker=worker)
    for check in _checks:
        check(opts)


def preflight(environment: Any) -> None:
    """Every registered check of the target; the first that fails raises ValueError."""
    for check in _preflights:
        check(environment)


@events.init_command_line_parser.add_listener
def _add_all(parser: LocustArgumentParser) -> None:
    for _, add in _adders:
        add(parser)
