"""The web UI's start form is checked by the same rules as the command line, before Locust starts the run.

Locust's `/swarm` handler copies each form field onto `parsed_options` (converted to the type of the value it
replaces) and starts the users; a bad value would only surface mid-run, as a crash in a task or a figure that
quietly means something else. A Flask `before_request` hook on that one route converts the fields the way Locust
will, runs every registered rule over the result (`options.check_options`), and answers a bad one as Locust answers
a bad spawn rate: `{"success": false, "message": ...}`, which its form shows, with nothing started.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[argparse.Namespace], None]


def form_value(current: Any, value: str, values: list[str]) -> Any:
    """A form field as Locust's `/swarm` will store it: the type of the value it replaces (locust/web.py)."""
    if isinstance(current, bool):
        return value == "true"
    if current is None:
        return value
    if isinstance(current, list):
        items = value.split(",") if "," in value else values
        return [int(x) for x in items] if current and all(isinstance(x, int) for x in current) else items
    return type(current)(value)


def trial_options(parsed: argparse.Namespace, form: Mapping[str, str], lists: Mapping[str, list[str]],
                  names: set[str]) -> argparse.Namespace:
    """A copy of `parsed` with the form's values for `names` (stopstorm's options) in place; ValueError names the
    field whose value cannot be the type Locust will convert it to."""
    trial = argparse.Namespace(**vars(parsed))
    for key, value in form.items():
        if key not in names or not hasattr(parsed, key):
            continue
        try:
            setattr(trial, key, form_value(getattr(parsed, key), value, lists.get(key, [value])))
        except (TypeError, ValueError):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag}: {value!r} is not a {type(getattr(parsed, key)).__name__}") from None
    return trial


def install_form_check(web_ui: Any, names: set[str], check: Check) -> None:
    """Refuse a start form whose stopstorm values break a rule (`check` raises ValueError), before the run."""
    app = web_ui.app

    @app.before_request
    def _check_start_form() -> Any:
        from flask import jsonify, request

        if request.method != "POST" or request.path != "/swarm":
            return None
        env = web_ui.environment
        parsed = env.parsed_options
        if parsed is None:
            return None
        form = request.form
        try:
            check(trial_options(parsed, form.to_dict(), {k: form.getlist(k) for k in form}, names))
        except ValueError as exc:
            return jsonify({"success": False, "message": f"stopstorm: {exc}", "host": env.host})
        return None
