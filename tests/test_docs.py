"""The documentation site: the notebooks run (once, here) and show their figures, the site builds from them
with warnings as errors, a broken link fails that build, and every shell command it shows is accounted for."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import tomllib
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# The figures each notebook shows as pictures in Jupyter (image/png outputs): quickstart's four plots, the
# routing notebook's two heatmaps and two pyplot figures, the sweep report's two PNGs, own_images' confusion
# matrix and its labelled new images, the method comparison's report PNGs (its bar chart and one routing
# heatmap, in its quick mode: two methods, one seed).
SHOWN = {
    "quickstart.ipynb": 4,
    "routing.ipynb": 4,
    "vtab_sweep.ipynb": 2,
    "own_images.ipynb": 2,
    "compare_methods.ipynb": 3,
}
NEEDS = {"gpu", "internet", "cluster", "hours"}


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Each notebook run top to bottom as a user would in Jupyter, in a folder of its own: the one place the
    suite executes them. Returns the folder of executed copies and each notebook's working folder."""
    out = tmp_path_factory.mktemp("executed")
    workdirs = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LILY_NOTEBOOK_QUICK", "1")  # a long notebook (compare_methods) runs its few-step version
        for path in NOTEBOOKS:
            workdir = workdirs[path.name] = tmp_path_factory.mktemp(path.stem)
            notebook = nbformat.read(path, as_version=4)
            NotebookClient(
                notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
            ).execute()
            nbformat.write(notebook, out / path.name)
    return out, workdirs


@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS])
def test_notebook_runs_and_shows_its_figures(executed: tuple[Path, dict[str, Path]], name: str) -> None:
    folder, workdirs = executed
    notebook = nbformat.read(folder / name, as_version=4)
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    shown = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == SHOWN[name]
    assert all(png.startswith(b"\x89PNG") and len(png) > 5_000 for png in shown), [len(p) for p in shown]
    # every figure is also written as a PNG: under figures/, or report/ for the sweep's report (the generated
    # data sets are PNGs too, elsewhere)
    pngs = sorted(png for sub in ("figures", "report") for png in (workdirs[name] / sub).glob("*.png"))
    assert pngs, "the notebook wrote no PNG"
    assert all(png.stat().st_size > 5_000 for png in pngs), [(p.name, p.stat().st_size) for p in pngs]


def build(copy: Path, notebooks: Path) -> subprocess.CompletedProcess[str]:
    """`./scripts/docs` in ``copy``, in this venv, rendering the already executed ``notebooks``."""
    env = {
        **os.environ,
        "VIRTUAL_ENV": sys.prefix,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "LILY_DOCS_NOTEBOOKS": str(notebooks),
        "PYTHONPATH": str(copy),
    }
    return subprocess.run(
        ["./scripts/docs"], cwd=copy, env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.fixture(scope="module")
def site(executed: tuple[Path, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the site is built from, built once; returns the copy."""
    copy = tmp_path_factory.mktemp("repo")
    for part in ("docs", "lily_lightning", "notebooks", "scripts"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("generated", "__pycache__"))
    (copy / "benchmarks").mkdir()
    shutil.copy(REPO / "benchmarks" / "README.md", copy / "benchmarks")
    shutil.copy(REPO / "ARCHITECTURE.md", copy)
    done = build(copy, executed[0])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return copy


def test_site_has_every_page_with_the_tutorials_figures(site: Path) -> None:
    html = site / "site"
    for page in ("index", "get-started", "how-to/own-images", "reference/api", "explanation/method"):
        assert (html / f"{page}.html").is_file(), page
    for name, count in SHOWN.items():
        page = (html / "tutorials" / "notebooks" / name.replace(".ipynb", ".html")).read_text()
        images = re.findall(r'<img[^>]+src="([^"]+\.png)"', page)
        assert len(images) >= count, (name, images)
        for src in images:
            assert (html / "tutorials" / "notebooks" / src).stat().st_size > 5_000, src
    # the generated reference: each command's options, the config keys with defaults, the error messages
    cli = (html / "reference" / "cli.html").read_text()
    assert "--model.lily.rank" in cli and "--select-on" in cli and "--tfds-python" in cli
    assert "python -m lily_lightning export --help" in cli and "prepare vtab1k  build" in cli  # + the program
    config = (html / "reference" / "config.html").read_text()
    assert "model.lily.num_experts" in config and "data.init_args.cache_images" in config
    assert "model.fact_tt.rank" in config and "model.vpt.length" in config
    assert "did you mean" in (html / "reference" / "errors.html").read_text()
    assert "def inject" not in (html / "reference" / "api.html").read_text()  # rendered, not source
    assert "load_adapter_state_dict" in (html / "reference" / "api.html").read_text()


def test_a_broken_link_fails_the_build(site: Path, executed: tuple[Path, dict[str, Path]]) -> None:
    page = site / "docs" / "get-started.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    done = build(site, executed[0])
    assert done.returncode != 0
    assert "no-such-page" in done.stderr, done.stderr[-3000:]


def shown_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks in Markdown ``text`` (lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"^```(?:bash|shell|sh)\n(.*?)^```", text, flags=re.M | re.S):
        line = ""
        for raw in block.splitlines():
            line = f"{line} {raw.strip()}".strip()
            if line.endswith("\\"):
                line = line[:-1]
                continue
            command = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if command:
                commands.append(command)
            line = ""
    return commands


def site_commands() -> dict[str, str]:
    """Every command shown on the site or in the README, with the first file that shows it."""
    sources = [
        (path, path.read_text())
        for path in [*sorted((REPO / "docs").rglob("*.md")), REPO / "README.md"]
        if "generated" not in path.parts
    ]
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        sources += [(path, "".join(c["source"])) for c in cells if c["cell_type"] == "markdown"]
    found: dict[str, str] = {}
    for path, text in sources:
        for command in shown_commands(text):
            found.setdefault(command, str(path.relative_to(REPO)))
    return found


def manifest_problems(commands: dict[str, str], manifest: list[dict[str, object]]) -> list[str]:
    """What is wrong between the shown commands and the manifest: a command not listed, an entry no page
    shows, an entry without a valid reason, a test file that does not hold the command's words."""
    listed = {str(entry["shown"]): entry for entry in manifest}
    problems = [
        f"{where}: `{cmd}` is not in docs/commands.toml"
        for cmd, where in commands.items()
        if cmd not in listed
    ]
    problems += [f"docs/commands.toml: `{cmd}` is shown nowhere" for cmd in listed if cmd not in commands]
    for command, entry in listed.items():
        if "needs" in entry:
            if entry["needs"] not in NEEDS or not entry.get("why"):
                problems.append(f"`{command}`: needs must be one of {sorted(NEEDS)}, with a why")
            continue
        test = REPO / str(entry.get("test", ""))
        if not entry.get("test") or not test.is_file():
            problems.append(f"`{command}`: no test file {entry.get('test')!r} and no needs")
            continue
        source = test.read_text()
        missing = [word for word in entry.get("words") or command_words(command) if word not in source]
        if missing:
            problems.append(f"`{command}`: {entry['test']} does not hold {missing}")
    return problems


def command_words(command: str) -> list[str]:
    """The words a test running ``command`` must hold: its arguments after the program, minus [options]."""
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", command))
    for program in (["python", "-m", "lily_lightning"], ["python"]):
        if words[: len(program)] == program:
            return words[len(program) :]
    return words


def test_every_shown_command_is_run_by_a_test_or_needs_what_the_suite_lacks() -> None:
    manifest = tomllib.loads((REPO / "docs" / "commands.toml").read_text())["command"]
    assert manifest_problems(site_commands(), manifest) == []


def test_the_command_check_catches_an_unlisted_a_stale_and_an_unbacked_command() -> None:
    manifest = [
        {"shown": "python -m lily_lightning prepare demo", "test": "tests/test_demo_prepare.py"},
        {"shown": "python -m lily_lightning fit --config gone.yaml", "needs": "gpu", "why": "a GPU"},
        {"shown": "python -m lily_lightning report runs --out r", "test": "tests/test_adapters.py"},
        {"shown": "sbatch x.sh", "needs": "a bigger machine"},
    ]
    page = "```bash\npython -m lily_lightning prepare demo   # once\n"
    page += "python -m lily_lightning \\\n    sweep --status runs\n"
    page += "python -m lily_lightning report runs --out r\nsbatch x.sh\n```\n"
    commands = {command: "page.md" for command in shown_commands(page)}
    assert list(commands) == [
        "python -m lily_lightning prepare demo",
        "python -m lily_lightning sweep --status runs",
        "python -m lily_lightning report runs --out r",
        "sbatch x.sh",
    ]
    problems = manifest_problems(commands, manifest)
    assert len(problems) == 4, problems
    assert "sweep --status runs` is not in docs/commands.toml" in problems[0]
    assert "fit --config gone.yaml` is shown nowhere" in problems[1]
    assert "tests/test_adapters.py does not hold" in problems[2]
    assert "needs must be one of" in problems[3]
