"""stopstorm's command-line options: each layer registers its own, this module puts them where Locust shows
options (the command line, `locust.conf`, `STOPSTORM_*` variables, `stopstorm --help` and the web UI's start
form) and checks them all before anything starts.

A layer with options (the users' streams, the probe, the load shapes in stopstorm.users; the report, the
embedded simulator, the GPU, the self-monitor and master/worker mode here) calls `register(add_arguments,
check)` at import: `add_arguments(parser)` adds its group through `argument_group`, and `check(opts)` raises
ValueError naming the option at fault. The users register themselves, so this package never imports them
(arrows run users → metrics). `register_preflight` is for checks that need the target (the host answers,
serves the model): they run once the host is known, after the embedded simulator has started.

Locust's start form lists only arguments added on its parser itself, not on a group, so `argument_group` marks
every argument of its group for the form the same way (`include_in_web_ui`, `is_secret`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from locust import events
from locust.argument_parser import LocustArgumentParser

__all__ = ["argument_group", "check_options", "preflight", "register", "register_preflight"]

AddArguments = Callable[[LocustArgumentParser], None]
Check = Callable[[Any], None]
Preflight = Callable[[Any], None]

_adders: list[tuple[int, AddArguments]] = []
_checks: list[Check] = []
_preflights: list[Preflight] = []


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


def register(add_arguments: AddArguments, check: Check | None = None, rank: int = 50) -> None:
    """Add a layer's options to every parser Locust builds, their groups in `rank` order (the help reads from
    what a user sets most: streams, then the probe and load shapes, the report, the simulator…); `check(opts)`
    refuses bad values. Registering the same function again changes nothing."""
    if all(add is not add_arguments for _, add in _adders):
        _adders.append((rank, add_arguments))
        _adders.sort(key=lambda ra: ra[0])
    if check is not None and check not in _checks:
        _checks.append(check)


def register_preflight(check: Preflight) -> None:
    """A check of the target, run with the Locust Environment once its host is known."""
    if check not in _preflights:
        _preflights.append(check)


def check_options(opts: Any) -> None:
    """Every registered option check, in registration order; the first bad value raises ValueError."""
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
