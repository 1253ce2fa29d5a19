"""The web UI's start form is checked by the same rules as the command line, before Locust starts the run.

Locust's `/swarm` handler copies each form field onto `parsed_options` (converted to the type of the value it
replaces) and starts the users; a bad value would only surface mid-run, as a crash in a task or a figure that
quietly means something else. A Flask `before_request` hook on that one route converts the fields the way Locust
will, runs every registered rule over the result (`options.check_options`), and answers a bad one as Locust answers
a bad spawn rate: `{"success": false, "message": ...}`, which its form shows, with nothing started.

A secret option (`--api-key`) is in the form, but Locust fills every field with the value the process started
with and only masks the input: the key would be in the page's source for anyone who can open the UI.
`install_secret_fields` blanks those values in what the page is given, and a start form that leaves such a
field empty keeps the value the process started with (a new value typed there replaces it).
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


SECRET_HELP = " (the web UI never shows it: leave empty to keep the one stopstorm started with)"


def blank_secrets(extra_options: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The form's options with no secret's value in them, and the secret fields' help saying so."""
    return {name: ({**field, "default_value": "", "help_text": f"{field.get('help_text') or ''}{SECRET_HELP}"}
                   if field.get("is_secret") else field)
            for name, field in extra_options.items()}


def kept_secrets(form: Mapping[str, str], secrets: set[str]) -> set[str]:
    """The secret fields a start form left empty: they keep the value the process started with."""
    return {name for name in secrets if name in form and form[name] == ""}


def install_secret_fields(web_ui: Any, secrets: set[str]) -> None:
    """Keep secret option values out of the web UI's page, and keep them through a start form left empty."""
    update = web_ui.update_template_args

    def _update_without_secrets() -> None:
        update()
        web_ui.template_args["extra_options"] = blank_secrets(web_ui.template_args.get("extra_options") or {})

    web_ui.update_template_args = _update_without_secrets
    _update_without_secrets()

    @web_ui.app.before_request
    def _keep_secrets_left_empty() -> None:
        from flask import request
        from werkzeug.datastructures import ImmutableMultiDict

        if request.method != "POST" or request.path != "/swarm":
            return
        kept = kept_secrets(request.form, secrets)
        if kept:  # Locust copies every field it is sent: an empty one would replace the key with ""
            request.form = ImmutableMultiDict([(k, v) for k, v in request.form.items(multi=True) if k not in kept])


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
