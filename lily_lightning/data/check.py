"""`lily-lightning data check`: is a VTAB-1k / FGVC / class-folder tree complete and readable? In seconds."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from lily_lightning.data.discover import describe_skipped
from lily_lightning.data.fgvc import FGVC_LAYOUT, FGVC_SPLITS, locate_fgvc_dataset
from lily_lightning.data.imagefolder import IMAGE_FOLDER_LAYOUT, looks_like_image_folders, scan_image_folders
from lily_lightning.data.images import undecodable
from lily_lightning.data.records import (
    ImageRecord,
    describe,
    describe_duplicates,
    find_duplicates,
    labels_out_of_range,
    missing_images,
    read_json_split,
)
from lily_lightning.data.tasks import FGVCTask, VTABTask, fgvc_task, vtab_task
from lily_lightning.data.vtab1k import (
    VTAB_LAYOUT,
    VTAB_SPLITS,
    locate_vtab_task,
    read_vtab_split,
    required_splits,
)
from lily_lightning.errors import UsageError
from lily_lightning.paths import resolve_path, shown_path

_STYLE = {"ok": "green", "warn": "yellow", "FAIL": "bold red", "absent": "dim"}
# Each split that is evaluated, and the splits trained on before it (the DataModules' split modes): VTAB-1k
# validates val200 after training on train800, tests after train800val200; FGVC likewise with train / val.
_VTAB_TRAINED_BEFORE = {"val200": ("train800",), "test": ("train800val200",)}
_FGVC_TRAINED_BEFORE = {"val": ("train",), "test": ("train", "val")}


@dataclass
class SplitReport:
    """What `data check` found for one split file."""

    split: str
    records: list[ImageRecord] = field(default_factory=list)
    expected: int | None = None
    strict: bool = False  # a count other than ``expected`` fails (VTAB's 800/200/1000) instead of warning
    error: str | None = None  # the split file is missing or malformed
    absent: bool = False  # a custom task without this (optional) split file
    out_of_range: list[ImageRecord] = field(default_factory=list)
    unseen: list[ImageRecord] = field(default_factory=list)  # labels no image of the training split(s) has
    trained_on: tuple[str, ...] = ()  # those training splits
    unseen_fails: bool = False  # a custom task's unseen labels are errors; a published split's a warning
    repeated: dict[ImageRecord, ImageRecord] = field(default_factory=dict)  # -> the line it repeats
    conflicting: dict[ImageRecord, ImageRecord] = field(default_factory=dict)  # same image, other label
    missing: list[ImageRecord] = field(default_factory=list)
    unreadable: dict[ImageRecord, str] = field(default_factory=dict)  # -> why it does not decode

    @property
    def images(self) -> int:
        """Distinct images: what `fit` uses once it has dropped repeated lines."""
        return len({r.path for r in self.records})

    @property
    def status(self) -> str:
        if self.absent:
            return "absent"
        if self.error or self.out_of_range or self.conflicting or self.missing or self.unreadable:
            return "FAIL"
        if self.unseen and self.unseen_fails:
            return "FAIL"
        if self.expected is not None and self.images != self.expected:
            return "FAIL" if self.strict else "warn"
        return "warn" if self.repeated or self.unseen else "ok"


@dataclass(frozen=True)
class _Target:
    kind: str  # "VTAB-1k", "FGVC" or IMAGE_FOLDERS
    folder: Path
    task: VTABTask | FGVCTask | None  # None: a custom VTAB-layout task


def _mark_unreadable(reports: Sequence[SplitReport]) -> None:
    # Splits overlap (train800val200 = train800 + val200): probe each existing file once.
    missing = {r.path for report in reports for r in report.missing}
    reasons = undecodable(sorted({r.path for report in reports for r in report.records} - missing))
    for report in reports:
        report.unreadable = {r: why for r in report.records if (why := reasons.get(r.path)) is not None}


def _inspect(reports: Sequence[SplitReport], trained_before: dict[str, tuple[str, ...]]) -> None:
    """Duplicates, missing images and (in-range) labels that no training image has, split by split."""
    by_split = {report.split: report for report in reports}
    for report in reports:
        duplicates = find_duplicates(report.records)
        report.repeated, report.conflicting = duplicates.repeated, duplicates.conflicting
        report.missing = missing_images(report.records)
        training = [by_split[split] for split in trained_before.get(report.split, ())]
        if training and all(t.records and not t.error for t in training):
            trained_labels = {r.label for t in training for r in t.records}
            report.trained_on = tuple(t.split for t in training)
            out_of_range = set(report.out_of_range)  # counted as such already
            report.unseen = [
                r for r in report.records if r.label not in trained_labels and r not in out_of_range
            ]


def _check_vtab(folder: Path, task: VTABTask | None) -> tuple[list[SplitReport], str]:
    expected = dict(zip(VTAB_SPLITS, (800, 200, 1000, task.test_size), strict=True)) if task else {}
    reports = []
    for split in VTAB_SPLITS:
        report = SplitReport(split, expected=expected.get(split), strict=split != "test")
        try:  # the reader `fit` uses: a missing, malformed or empty list file fails both
            report.records = read_vtab_split(folder, split)
        except UsageError as err:
            report.error = str(err).strip()
        reports.append(report)
    if task is not None:
        num_classes, note = task.num_classes, f"{task.group}, {task.num_classes} classes"
    else:
        labels = [r.label for report in reports for r in report.records]
        num_classes = max(labels, default=-1) + 1
        note = f"custom task, {num_classes} classes inferred from the labels"
        for report in reports:
            # A custom task may leave out the split files the default split_mode does not read.
            optional = report.split not in required_splits()
            if optional and report.error and not (folder / f"{report.split}.txt").is_file():
                report.error, report.absent = None, True
    for report in reports:
        report.out_of_range = labels_out_of_range(report.records, num_classes)
        # A custom task's labels are the only word on its classes (`fit` infers num_classes from them).
        report.unseen_fails = task is None
    _inspect(reports, _VTAB_TRAINED_BEFORE)
    return reports, note


def _check_fgvc(folder: Path, task: FGVCTask) -> tuple[list[SplitReport], str]:
    reports = []
    for split, size in zip(FGVC_SPLITS, task.split_sizes, strict=True):
        report = SplitReport(split, expected=size)
        try:
            report.records = read_json_split(folder / f"{split}.json", folder / task.image_dir)
        except UsageError as err:
            report.error = str(err).strip()
        reports.append(report)
    _inspect(reports, _FGVC_TRAINED_BEFORE)
    distinct = len({r.label for report in reports for r in report.records})
    if distinct != task.num_classes and reports[0].error is None:
        reports[
            0
        ].error = f"the json files use {distinct} distinct class ids; {task.name} has {task.num_classes}"
    return reports, f"{task.num_classes} classes"


def _table(title: str, reports: Sequence[SplitReport]) -> Table:
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    # "bad label": out of range, or (in an evaluated split) no training image has it; details say which.
    columns = ("split", "images", "expected", "labels", "bad\nlabel", "dup", "missing", "corrupt", "status")
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("split", "labels", "status") else "right", no_wrap=True
        )
    for report in reports:
        labels = [r.label for r in report.records]
        table.add_row(
            report.split,
            "-" if (report.error or report.absent) and not report.records else str(report.images),
            "-" if report.expected is None else str(report.expected),
            f"{min(labels)}..{max(labels)}" if labels else "-",
            str(len(report.out_of_range) + len(report.unseen)),
            str(len(report.repeated) + len(report.conflicting)),
            str(len(report.missing)),
            str(len(report.unreadable)),
            f"[{_STYLE[report.status]}]{report.status}[/]",
        )
    return table


def _details(reports: Sequence[SplitReport]) -> list[str]:
    """What is wrong, split by split, the first few records of each problem, and what `fit` makes of it."""
    lines = []
    for report in reports:
        split = report.split
        if report.error:
            lines.append(f"{split}: {report.error}")
        if report.out_of_range:
            lines.append(f"{split}: {describe(report.out_of_range, 'labels out of range')}")
        if report.unseen:
            trained = "+".join(report.trained_on)
            effect = (
                "these classes cannot be learned: fix the labels, or add training images of them"
                if report.unseen_fails
                else "a warning only: the published split leaves these classes out of training"
            )
            lines.append(f"{split}: {describe(report.unseen, f'labels no {trained} image has')}\n  {effect}")
        if report.conflicting:
            what = "images listed again with another label"
            effect = "`fit` refuses this split: keep one line per image, with its right label"
            lines.append(f"{split}: {describe_duplicates(report.conflicting, what)}\n  {effect}")
        if report.repeated:
            what = "repeated lines (same image and label as an earlier line)"
            effect = f"`fit` drops them with a warning and uses each image once ({report.images} images)"
            lines.append(f"{split}: {describe_duplicates(report.repeated, what)}\n  {effect}")
        if report.missing:
            lines.append(f"{split}: {describe(report.missing, 'images listed but not found')}")
        if report.unreadable:
            unreadable = list(report.unreadable)
            lines.append(f"{split}: {describe(unreadable, 'images that do not decode', report.unreadable)}")
        if report.records and report.expected is not None and report.images != report.expected:
            lines.append(f"{split}: {report.images} images, the published split has {report.expected}")
    return lines


def _looks_like_vtab(folder: Path) -> bool:
    return any((folder / f"{split}.txt").is_file() for split in VTAB_SPLITS)


IMAGE_FOLDERS = "Image folders"


def _check_image_folders(root: Path, console: Console) -> bool:
    """Classes, images per class and split, skipped files, classes missing from a split; True if unusable."""
    try:
        scan = scan_image_folders(root)
    except UsageError as err:
        console.print(f"{IMAGE_FOLDERS} {root}: [bold red]FAIL[/]")
        console.print(str(err), markup=False, highlight=False, soft_wrap=True)
        return True
    scan.drop_undecodable()
    splits = list(scan.sources)
    drawn = [split for split in ("val", "test") if split not in scan.sources]
    note = f"; {' and '.join(drawn)} drawn from train at fit (stratified)" if drawn else ""
    # The title on its own line: a table title wraps at the (narrow) table's width.
    title = f"{IMAGE_FOLDERS} ({len(scan.class_names)} classes{note}): {root}"
    console.print(title, markup=False, highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("class", no_wrap=True)
    for split in splits:
        table.add_column(scan.sources[split], justify="right")
    counts = {split: scan.images_per_class(split) for split in splits}
    for index, name in enumerate(scan.class_names):
        table.add_row(name, *(str(counts[split][index]) for split in splits))
    table.add_row("total", *(str(sum(counts[split])) for split in splits), style="bold")
    console.print(table)
    if scan.skipped:
        console.print(describe_skipped(scan.skipped, root), markup=False, highlight=False, soft_wrap=True)
    for split in splits:
        absent = [name for name, count in zip(scan.class_names, counts[split], strict=True) if not count]
        if absent:
            missing = f"classes missing from {scan.sources[split]}: {', '.join(absent)}"
            console.print(missing, markup=False, highlight=False, soft_wrap=True)
    return 0 in counts["train"]  # a class whose every training image was skipped cannot be learnt


def _find_targets(root: Path, name: str | None) -> list[_Target]:
    if name is not None and looks_like_image_folders(root / name):
        return [_Target(IMAGE_FOLDERS, root / name, None)]
    if name is None and looks_like_image_folders(root):
        return [_Target(IMAGE_FOLDERS, root, None)]
    if name is not None:
        fgvc, vtab = fgvc_task(name), vtab_task(name)
        if fgvc is not None:
            try:
                return [_Target("FGVC", locate_fgvc_dataset(root, fgvc), fgvc)]
            except UsageError:
                if vtab is None:  # only an FGVC name: its error is the helpful one
                    raise
        task, folder = locate_vtab_task(root, name)
        return [_Target("VTAB-1k", folder, task)]
    # No name: root is one task folder, or holds several.
    targets = []
    for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        fgvc = fgvc_task(folder.name)
        if fgvc is not None and (folder / "train.json").is_file():
            targets.append(_Target("FGVC", folder, fgvc))
        elif _looks_like_vtab(folder):
            targets.append(_Target("VTAB-1k", folder, vtab_task(folder.name)))
        if targets and folder == root:
            break
    if not targets:
        raise UsageError(
            f"Found no VTAB-1k task or FGVC dataset (nor class folders) in {root}.\n\n{VTAB_LAYOUT}\n\n"
            f"{FGVC_LAYOUT}\n\n{IMAGE_FOLDER_LAYOUT}"
        )
    return targets


def check_tree(
    root: str | Path, name: str | Sequence[str] | None = None, console: Console | None = None
) -> int:
    """Check every task under ``root`` (or only ``name``, or each of a list of names); a table per task.

    Returns 0 when all is well (warnings allowed), 1 when a split file is missing or malformed, an image is
    missing or does not decode, an image is listed with two labels, a label is out of range (or, in a
    custom task, no training image has it), or a VTAB-1k training split is not 800/200/1000 images; for class
    folders (which skip files that are not readable images, and list them), when the tree cannot be read or a
    class has no readable training image.
    Raises UsageError when ``root`` or ``name`` cannot be found.
    """
    console = console or Console()
    root = resolve_path(root)
    if not root.is_dir():
        raise UsageError(f"{shown_path(root)} does not exist.\n\n{VTAB_LAYOUT}\n\n{FGVC_LAYOUT}")
    failed = []
    names = [name] if name is None or isinstance(name, str) else name
    targets = [target for each in names for target in _find_targets(root, each)]
    for target in targets:
        if target.kind == IMAGE_FOLDERS:
            if _check_image_folders(target.folder, console):
                failed.append(target.folder.name)
            continue
        if target.kind == "FGVC":
            reports, note = _check_fgvc(target.folder, target.task)
        else:
            reports, note = _check_vtab(target.folder, target.task)
        _mark_unreadable(reports)
        label = target.task.name if target.task else target.folder.name
        console.print(_table(f"{target.kind} {label} ({note}): {target.folder}", reports))
        for line in _details(reports):
            console.print(line, markup=False, highlight=False, soft_wrap=True)  # paths stay whole
        if any(report.status == "FAIL" for report in reports):
            failed.append(label)
    if failed:
        console.print(
            f"[bold red]{len(failed)} of {len(targets)} checked with problems:[/] {', '.join(failed)}"
        )
        return 1
    console.print(f"[green]All {len(targets)} checked are complete and readable.[/]")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lily-lightning data check --root R [--name N]``; returns the exit code (2 for unusable arguments)."""
    parser = argparse.ArgumentParser(
        prog="python -m lily_lightning data check",
        description="Verify a VTAB-1k, FGVC or class-folder tree: split sizes, labels, every image decodes.",
    )
    parser.add_argument(
        "--root",
        required=True,
        help="the vtab-1k folder, the FGVC root, one task folder, or class folders' root",
    )
    parser.add_argument("--name", default=None, help="check only this task (default: every task under root)")
    args = parser.parse_args(argv)
    try:
        return check_tree(args.root, args.name)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
