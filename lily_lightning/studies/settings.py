"""What a run's settings mean, whatever their spelling: the ``--config`` files' contents layered in order and
the arguments after them, as one flat mapping of dotted keys (``{"model.lr": 0.001, "data.name": "dtd"}``).

Two runs have the same settings when these mappings are equal, so a sweep rerun after a ``cd``, with absolute
paths, or with its runs folder moved elsewhere matches its finished runs, and ``1e-3`` equals ``0.001``. Where
a run is (``trainer.default_root_dir``) is no setting. `sweep` records the mapping in each run's
``sweep_run.json`` (``settings``); `report` uses it to keep seeds trained with other settings apart.

A ``sweep_run.json`` written before the mapping was recorded holds only the argument text and each config
file's digest: :func:`record_settings` reads its arguments as keys and values (config and run-folder paths
left out) and its config files as their digests in layering order, so a moved or ``cd``-ed study still
matches it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# Where a run is, not what it is: a moved runs folder holds the same runs.
PLACE_KEYS = frozenset({"trainer.default_root_dir"})
# What differs between the seeds of one cell by design: never a reason to keep seeds apart.
SEED_KEYS = frozenset({"seed_everything"})
CONFIG_FLAG = "--config"
# The pseudo-key under which an old record's config files (their digests, in order) are compared.
CONFIG_FILES = "config files (digests)"
UNSET = "(not set)"


def argument_key(argument: str) -> str | None:
    """``--data.init_args.name=x`` -> ``data.name``: the setting a command-line flag sets, else None."""
    if not argument.startswith("--"):
        return None
    return argument[2:].split("=", 1)[0].replace(".init_args.", ".")


def argument_pairs(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """``["--a", "1", "--b=2", "--c"]`` -> ``[("--a", "1"), ("--b", "2"), ("--c", None)]``."""
    pairs: list[tuple[str, str | None]] = []
    for arg in args:
        if arg.startswith("--"):
            flag, equals, value = arg.partition("=")
            pairs.append((flag, value if equals else None))
        elif pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], arg)
        else:
            pairs.append(("", arg))  # a stray value: compared as it is
    return pairs


def plain(value: Any) -> Any:
    """A value as JSON holds it, with text that reads as a finite number made that number (YAML 1.1 reads
    ``1e-3`` as text, the CLI as 0.001)."""
    if isinstance(value, str):
        try:
            number = float(value.replace("_", "x"))  # "1_000" stays text, as the CLI's YAML reads it
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if number.is_integer() and value.strip().lstrip("+-").isdigit() else number
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return json.loads(json.dumps(value, default=str))  # dates and other YAML scalars as text


def read_value(text: str) -> Any:
    """A command-line value as YAML reads it (``true``, ``[k, v]``, ``{rank: 4}``), numbers as numbers."""
    try:
        return plain(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"model": {"lily": {"rank": 4}}}`` -> ``{"model.lily.rank": 4}``; ``init_args`` levels left out, as
    the CLI's keys leave them out."""
    if not isinstance(value, Mapping) or not value:
        return {prefix: plain(value)} if prefix else {}
    flat: dict[str, Any] = {}
    for key, inner in value.items():
        name = prefix if key == "init_args" else f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(inner, name))
    return flat


def read_config(path: str) -> Any:
    return yaml.safe_load(Path(path).read_text())


def resolved_settings(args: Sequence[str], load: Callable[[str], Any] = read_config) -> dict[str, Any]:
    """The settings ``args`` give a run: each ``--config`` file's contents (read by ``load``) and each
    argument, layered left to right; keys sorted, where the run is left out."""
    settings: dict[str, Any] = {}
    for flag, value in argument_pairs(args):
        if flag == CONFIG_FLAG and value is not None:
            settings.update(flatten(load(value), ""))
            continue
        key = argument_key(flag) if flag else value
        if key is None or key in PLACE_KEYS:
            continue
        parsed = read_value(value) if value is not None else None
        settings.update(flatten(parsed, key) if isinstance(parsed, dict) and parsed else {key: parsed})
    return dict(sorted(settings.items()))


def record_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a ``sweep_run.json`` records: its ``settings``, or for a record from before they were
    recorded its arguments as keys and values and its config files' digests in order."""
    if isinstance(settings := record.get("settings"), dict):
        return settings
    args = [str(arg) for arg in record.get("args") or []]
    flags = [(flag, value) for flag, value in argument_pairs(args) if flag != CONFIG_FLAG]
    settings = resolved_settings([item for pair in flags for item in pair if item is not None])
    configs = record.get("configs")
    settings[CONFIG_FILES] = list(configs.values()) if isinstance(configs, dict) else []
    return settings


def comparable(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The settings of several records in one form: the old one (arguments and config digests) as soon as one
    of them is old, since an old record cannot tell a config's contents apart."""
    if all(isinstance(record.get("settings"), dict) for record in records):
        return [record_settings(record) for record in records]
    return [record_settings({k: v for k, v in record.items() if k != "settings"}) for record in records]


def value_text(value: Any) -> str:
    return UNSET if value is None else json.dumps(value) if not isinstance(value, str) else value


def setting_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``["trainer.max_epochs: 1 -> 4", ...]``: each key whose value differs, sorted."""
    return [
        f"{key}: {value_text(before.get(key))} -> {value_text(now.get(key))}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)  # 1 == 1.0; a key set to null is a key not set
    ]


def differing_keys(settings: Sequence[Mapping[str, Any]], ignore: frozenset[str] = frozenset()) -> list[str]:
    """The keys (sorted) whose value is not the same in all of ``settings``, ``ignore`` left out."""
    if not settings:
        return []
    keys = set().union(*(s.keys() for s in settings)) - ignore
    return sorted(key for key in keys if any(s.get(key) != settings[0].get(key) for s in settings))
