"""The start form's values converted as Locust's /swarm converts them, and refused by the command line's rules
before the run (the real web UI: tests/metrics/plugin/test_web_ui_browser.py)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask

from stopstorm.metrics.plugin.web_form import form_value, install_form_check, install_secret_fields, trial_options


@pytest.mark.parametrize(("current", "value", "expected"), [
    (False, "true", True), (True, "false", False), (None, "a>1", "a>1"), (1.5, "2", 2.0), (3, "4", 4),
    ("x", "y", "y"), (["a"], "b,c", ["b", "c"]), ([1, 2], "3,4", [3, 4]),
])
def test_a_form_field_gets_the_type_of_the_value_it_replaces(current: Any, value: str, expected: Any) -> None:
    assert form_value(current, value, [value]) == expected


def test_a_value_that_cannot_be_the_type_names_its_option() -> None:
    parsed = argparse.Namespace(max_tokens=64, other=1)
    with pytest.raises(ValueError, match=r"^--max-tokens: 'many' is not a int$"):
        trial_options(parsed, {"max_tokens": "many"}, {}, {"max_tokens"})
    # Locust's own fields (and options that are not stopstorm's) are left to Locust
    trial = trial_options(parsed, {"other": "nope", "user_count": "2"}, {}, {"max_tokens"})
    assert trial.other == 1 and not hasattr(trial, "user_count") and parsed.max_tokens == 64


def _app(check: Any) -> Any:
    app = Flask("t")
    started: list[dict[str, str]] = []

    @app.post("/swarm")
    def swarm() -> Any:
        from flask import request
        started.append(request.form.to_dict())
        return {"success": True}

    env = SimpleNamespace(parsed_options=argparse.Namespace(read_timeout=60.0, fail_on=None), host="http://h")
    install_form_check(SimpleNamespace(app=app, environment=env), {"read_timeout", "fail_on"}, check)
    return app.test_client(), started


def test_a_bad_value_is_answered_like_locusts_own_and_nothing_starts() -> None:
    seen: list[argparse.Namespace] = []

    def check(opts: argparse.Namespace) -> None:
        seen.append(opts)
        if opts.read_timeout <= 0:
            raise ValueError("--read-timeout: must be > 0 (got 0)")

    client, started = _app(check)
    answer = client.post("/swarm", data={"user_count": "2", "read_timeout": "0"}).get_json()
    assert answer == {"success": False, "message": "stopstorm: --read-timeout: must be > 0 (got 0)",
                      "host": "http://h"}
    assert started == [] and seen[-1].read_timeout == 0.0
    assert client.post("/swarm", data={"read_timeout": "5", "fail_on": "zombies>0"}).get_json()["success"]
    assert started and seen[-1].read_timeout == 5.0 and seen[-1].fail_on == "zombies>0"
    assert client.get("/other").status_code == 404  # only the start form is checked


def test_secret_fields_reach_the_page_blank_and_an_empty_one_keeps_the_started_value() -> None:
    """Locust fills each field with the process's value; the page must get none of a secret's, and a start form
    that sends the blank field back must not replace the key with "" (Locust copies every field it is sent)."""
    app = Flask("t")
    started: list[list[tuple[str, str]]] = []

    @app.post("/swarm")
    def swarm() -> Any:
        from flask import request
        started.append(list(request.form.items(multi=True)))
        return {"success": True}

    fields = {"api_key": {"default_value": "sk-secret", "is_secret": True, "help_text": "API key"},
              "max_tokens": {"default_value": 64, "is_secret": False, "help_text": "max"}}
    web_ui = SimpleNamespace(app=app, template_args={})

    def update() -> None:
        web_ui.template_args = {**web_ui.template_args, "extra_options": fields}

    web_ui.update_template_args = update
    install_secret_fields(web_ui, {"api_key"})
    web_ui.update_template_args()  # as Locust's index route does before each page
    shown = web_ui.template_args["extra_options"]
    assert shown["api_key"]["default_value"] == "" and "leave empty to keep" in shown["api_key"]["help_text"]
    assert shown["max_tokens"] == fields["max_tokens"] and fields["api_key"]["default_value"] == "sk-secret"
    client = app.test_client()
    client.post("/swarm", data={"user_count": "1", "api_key": "", "max_tokens": "8"})
    client.post("/swarm", data={"user_count": "1", "api_key": "sk-new"})
    assert started == [[("user_count", "1"), ("max_tokens", "8")], [("user_count", "1"), ("api_key", "sk-new")]]
