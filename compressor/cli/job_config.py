"""The job config a command is given: `--config` (a JSON file or inline JSON) and `--set`.

`compress` and `submit` take both, with one meaning: the config is read first (a file, or
inline JSON when the value starts with `{` or `[`), then each `--set KEY=VALUE` overrides one field
(`finetune.steps=50`; the value is read as JSON when it parses, as a string otherwise).
Nothing here imports torch: checking the fields against the methods is the job's (or the
server's) first step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

CONFIG_HELP = ("Job config: a JSON file, or inline JSON such as '{\"ratio\": 0.3}'. Fields not "
               "given keep their defaults.")
SET_HELP = "Override one config field, e.g. --set ratio=0.25 --set finetune.steps=50."


def config_options(command: F) -> F:
    """Add `--config FILE_OR_JSON` and `--set KEY=VALUE` (passed as `config_source` and
    `settings`) to a command."""
    command = click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                           help=SET_HELP)(command)
    return click.option("--config", "config_source", metavar="FILE_OR_JSON",
                        help=CONFIG_HELP)(command)


def job_config(source: str | None, settings: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Return the config from `source` (a JSON file or inline JSON) with `settings` applied.

    None when neither is given (the defaults). A file that cannot be read, text that is not a
    JSON object and a setting that is not KEY=VALUE exit 2 naming the option.
    """
    if source is None and not settings:
        return None
    config = {} if source is None else _read(source)
    for item in settings:
        _apply_setting(config, item)
    return config


def _read(source: str) -> dict[str, Any]:
    inline = source.lstrip().startswith(("{", "["))
    if inline:
        text, where = source, "the inline JSON"
    else:
        try:
            text, where = Path(source).read_text(), source
        except OSError as exc:
            raise click.BadParameter(
                f"cannot read {source}: {exc.strerror}; give a JSON file or inline JSON such as "
                "'{\"ratio\": 0.3}'", param_hint="--config") from None
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"{where} is not valid JSON: {exc}",
                                 param_hint="--config") from None
    if not isinstance(config, dict):
        raise click.BadParameter(
            f"{where} holds a JSON {type(config).__name__}, not an object such as "
            "'{\"ratio\": 0.3}'", param_hint="--config")
    return config


def _apply_setting(config: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise click.BadParameter(f"{key}: {part} is not a section", param_hint="--set")
    node[leaf] = value
