"""Reference pages generated from the code at every build, so they cannot drift from it.

Writes, under ``docs/reference/generated/`` (ignored by git), Markdown that the reference pages include:

- ``cli.md``: the ``--help`` output of every command, run in one child process (the real parsers);
- ``config_keys.md``: the constructor arguments of ``ViTClassifier``, each method's config (``LilyConfig``,
  ``LoRAConfig``, ``VPTConfig``, ...) and each DataModule, with their types, defaults and the sentence their
  docstring gives;
- ``errors.md``: every ``UsageError`` message the package can raise, read from its source with ``ast``.

A command whose help fails (non-zero exit, empty text, a usage line that does not name the command) stops
the build with an error naming it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

# Each command the reference documents, as typed after `python -m lily_lightning` ("" is the program's own
# --help, which must name every command).
COMMANDS: tuple[str, ...] = (
    "",
    "fit",
    "validate",
    "test",
    "predict",
    "prepare demo",
    "prepare vtab1k",
    "prepare fgvc",
    "data check",
    "sweep",
    "report",
    "export",
)

# The classes whose constructor arguments are config keys, with the key prefix they have in a config file.
CONFIG_CLASSES: tuple[tuple[str, str], ...] = (
    ("lily_lightning.ViTClassifier", "model"),
    ("lily_lightning.LilyConfig", "model.lily"),
    ("lily_lightning.LoRAConfig", "model.lora"),
    ("lily_lightning.adapters.VPTConfig", "model.vpt"),
    ("lily_lightning.adapters.SequentialAdapterConfig", "model.adapter"),
    ("lily_lightning.adapters.AdaptFormerConfig", "model.adaptformer"),
    ("lily_lightning.adapters.SSFConfig", "model.ssf"),
    ("lily_lightning.adapters.FacTTTConfig", "model.fact_tt"),
    ("lily_lightning.adapters.DoRAConfig", "model.dora"),
    ("lily_lightning.VTAB1kDataModule", "data.init_args"),
    ("lily_lightning.FGVCDataModule", "data.init_args"),
    ("lily_lightning.ImageFolderDataModule", "data.init_args"),
)

# Runs in a child process: the help of each command, as `python -m lily_lightning <command> --help` prints it.
_HELP_SCRIPT = """
import contextlib, importlib.util, io, json, sys
from lily_lightning.cli import main
entry = importlib.util.find_spec("lily_lightning.__main__").origin
helps = {}
for command in json.loads(sys.stdin.read()):
    sys.argv = [entry, *command.split(), "--help"]  # as the shell would start it
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main([*command.split(), "--help"])
        except SystemExit as stop:
            code = stop.code or 0
    helps[command] = {"code": code, "text": out.getvalue()}
print(json.dumps(helps))
"""


def command_helps(commands: tuple[str, ...], repo: Path) -> dict[str, str]:
    """The help text of each command; raises ExtensionError for every command whose help fails."""
    done = subprocess.run(
        [sys.executable, "-c", _HELP_SCRIPT],
        input=json.dumps(list(commands)),
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise ExtensionError(f"the --help generator failed:\n{done.stderr[-3000:]}")
    helps = json.loads(done.stdout.strip().splitlines()[-1])
    failed = [
        f"`{' '.join(['python -m lily_lightning', *command.split(), '--help'])}`: {problem}"
        for command, result in helps.items()
        if (problem := _help_problem(command, result["code"], result["text"]))
    ]
    if failed:
        raise ExtensionError("the help of these commands failed:\n" + "\n".join(failed))
    return {command: helps[command]["text"] for command in commands}


def _help_problem(command: str, code: object, text: str) -> str:
    if code != 0:
        return f"exit code {code}: {text.strip()[-500:]}"
    usage = text.lstrip().split("\n\n", 1)[0]
    if not usage.startswith("usage:"):
        return f"no usage line: {text.strip()[:300]}"
    if not all(word in usage.split() for word in command.split()):
        return f"its usage line does not name the command: {usage.splitlines()[0]}"
    named = set(re.findall(r"[\w-]+", text))
    unnamed = set() if command else {c.split()[0] for c in COMMANDS if c} - named
    if unnamed:
        return f"it does not name the commands {sorted(unnamed)}"
    return ""


def cli_markdown(helps: dict[str, str]) -> str:
    parts = []
    for command, text in helps.items():
        typed = " ".join(["python -m lily_lightning", *command.split(), "--help"])
        title = f"`{command}`" if command else "The program"
        parts.append(f"## {title}\n\n```text\n$ {typed}\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def docstring_arguments(doc: str, names: set[str]) -> dict[str, str]:
    """The descriptions of the arguments ``names`` in a Google-style ``Args:`` section (``a, b: text``
    describes both; ``a: text. b: text`` on one line describes each)."""
    described: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = lines.index("Args:") + 1
    except ValueError:
        return described
    current: list[str] = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        entry = re.match(r"^    (\w+(?:, \w+)*):\s*(.*)$", line)
        if entry:
            current = [name.strip() for name in entry.group(1).split(",")]
            for name in current:
                described[name] = entry.group(2)
        elif line.strip() and current:
            for name in current:
                described[name] += " " + line.strip()
    # "batch_size: ... eval_batch_size: ..." on one line describes two arguments
    for name, text in list(described.items()):
        for other, rest in re.findall(r"\s(\w+): (.*?)(?=\s\w+: |$)", text):
            if other in names and other not in described:
                described[other] = rest
                described[name] = text.split(f" {other}: ")[0]
    return described


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_markdown(classes: tuple[tuple[str, str], ...]) -> str:
    parts = []
    for path, prefix in classes:
        module_name, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls).parameters
        described = docstring_arguments(cls.__doc__ or "", set(parameters))
        rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for parameter in parameters.values():
            default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
            if re.match(r"\w+Config\(", default):
                default = f"`{default.split('(')[0]}()` (below)"
            else:
                default = f"`{default}`" if default != "required" else default
            annotation = str(parameter.annotation).replace("'", "")
            rows.append(
                f"| `{prefix}.{parameter.name}` | `{_cell(annotation)}` | {_cell(default)} "
                f"| {_cell(described.get(parameter.name, ''))} |"
            )
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        parts.append(f"## `{path}`\n\n{summary}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def usage_errors(package: Path) -> list[tuple[str, str]]:
    """(module, message) for every ``raise UsageError(...)`` in the package; ``{...}`` marks a value."""
    found = []
    for source in sorted(package.rglob("*.py")):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) == "UsageError"
                and node.exc.args
            ):
                message = _template(node.exc.args[0])
                module = source.relative_to(package.parent).with_suffix("").as_posix().replace("/", ".")
                found.append((module, message))
    return found


def _template(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_template(part) for part in node.values)
    if isinstance(node, ast.FormattedValue):
        return "{" + ast.unparse(node.value) + "}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left) + _template(node.right)
    return "{" + ast.unparse(node) + "}"


def errors_markdown(errors: list[tuple[str, str]]) -> str:
    by_module: dict[str, list[str]] = {}
    for module, message in errors:
        by_module.setdefault(module, []).append(message.strip())
    return "\n".join(
        f"### `{module}`\n\n```text\n" + "\n\n".join(messages) + "\n```\n"
        for module, messages in by_module.items()
    )


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def generate(app: Sphinx) -> None:
    docs = Path(app.srcdir)
    repo = docs.parent
    out = docs / "reference" / "generated"
    _write_if_changed(out / "cli.md", cli_markdown(command_helps(COMMANDS, repo)))
    _write_if_changed(out / "config_keys.md", config_markdown(CONFIG_CLASSES))
    _write_if_changed(out / "errors.md", errors_markdown(usage_errors(repo / "lily_lightning")))


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
