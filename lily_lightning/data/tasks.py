"""Task tables for VTAB-1k and the FGVC benchmark: canonical names, class counts, groups, aliases."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lily_lightning.errors import UsageError

VTAB_GROUPS: tuple[str, ...] = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class VTABTask:
    """One of the 19 VTAB-1k tasks; ``name`` is also its folder name in the NOAH/RepAdapter ``vtab-1k``."""

    name: str
    num_classes: int
    group: str
    test_size: int  # size of the VTAB test split; used by `data check` to flag an incomplete test set
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class FGVCTask:
    """One of the five FGVC datasets, with the folder names the VPT json splits expect."""

    name: str
    num_classes: int
    folder: str  # dataset folder name as in the VPT data preparation notes
    image_dir: str  # json keys are relative to <folder>/<image_dir> ("" = the folder itself)
    split_sizes: tuple[int, int, int]  # train/val/test sizes of the VPT splits, shown by `data check`
    aliases: tuple[str, ...] = ()


VTAB_TASKS: dict[str, VTABTask] = {
    t.name: t
    for t in (
        VTABTask("cifar", 100, "natural", 10_000, ("cifar100", "cifar_100")),
        VTABTask("caltech101", 102, "natural", 6_084, ("caltech",)),
        VTABTask("dtd", 47, "natural", 1_880),
        VTABTask("oxford_flowers102", 102, "natural", 6_149, ("flowers102", "flowers", "oxford_flowers")),
        VTABTask("oxford_iiit_pet", 37, "natural", 3_669, ("oxford_pet", "oxford_pets", "pets", "pet")),
        VTABTask("svhn", 10, "natural", 26_032, ("svhn_cropped",)),
        VTABTask("sun397", 397, "natural", 21_750, ("sun",)),
        VTABTask("patch_camelyon", 2, "specialized", 32_768, ("camelyon", "pcam")),
        VTABTask("eurosat", 10, "specialized", 5_400),
        VTABTask("resisc45", 45, "specialized", 6_300, ("resisc",)),
        VTABTask("diabetic_retinopathy", 5, "specialized", 42_670, ("retinopathy",)),
        VTABTask("clevr_count", 8, "structured", 15_000, ("clevr_count_all",)),
        VTABTask("clevr_dist", 6, "structured", 15_000, ("clevr_distance", "clevr_closest_object_distance")),
        VTABTask("dmlab", 6, "structured", 22_735),
        VTABTask("kitti", 4, "structured", 711, ("kitti_dist", "kitti_distance")),
        VTABTask("dsprites_loc", 16, "structured", 73_728, ("dsprites_location", "dsprites_position")),
        VTABTask("dsprites_ori", 16, "structured", 73_728, ("dsprites_orientation",)),
        VTABTask("smallnorb_azi", 18, "structured", 12_150, ("smallnorb_azimuth",)),
        VTABTask("smallnorb_ele", 9, "structured", 12_150, ("smallnorb_elevation",)),
    )
}

FGVC_TASKS: dict[str, FGVCTask] = {
    t.name: t
    for t in (
        FGVCTask("cub", 200, "CUB_200_2011", "images", (5_394, 600, 5_794), ("cub200", "cub_200", "cub2011")),
        FGVCTask("nabirds", 555, "nabirds", "images", (21_536, 2_393, 24_633), ("na_birds", "nabirds555")),
        FGVCTask(
            "oxford_flowers",
            102,
            "OxfordFlower",
            "",
            (1_020, 1_020, 6_149),
            ("flowers102", "flowers", "oxfordflower"),
        ),
        FGVCTask(
            "stanford_dogs", 120, "Stanford-dogs", "Images", (10_800, 1_200, 8_580), ("dogs", "stanforddogs")
        ),
        FGVCTask("stanford_cars", 196, "Stanford-cars", "", (7_329, 815, 8_041), ("cars", "stanfordcars")),
    )
}


def _normalise(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return key.removeprefix("vtab_")


def _alias_table(tasks: Mapping[str, VTABTask | FGVCTask]) -> dict[str, str]:
    table = {}
    for task in tasks.values():
        extra = (task.folder,) if isinstance(task, FGVCTask) else ()
        for alias in (task.name, *task.aliases, *extra):
            table[_normalise(alias)] = task.name
    return table


_VTAB_ALIASES = _alias_table(VTAB_TASKS)
_FGVC_ALIASES = _alias_table(FGVC_TASKS)


def vtab_task(name: str) -> VTABTask | None:
    """The VTAB-1k task called ``name`` (canonical name or alias, any case), or None for a custom task."""
    canonical = _VTAB_ALIASES.get(_normalise(name))
    return VTAB_TASKS[canonical] if canonical else None


def fgvc_task(name: str) -> FGVCTask | None:
    """The FGVC dataset called ``name`` (canonical name, alias or VPT folder name), or None."""
    canonical = _FGVC_ALIASES.get(_normalise(name))
    return FGVC_TASKS[canonical] if canonical else None


def require_fgvc_task(name: str) -> FGVCTask:
    """Like :func:`fgvc_task`, but an unknown name is a UsageError that lists the valid names."""
    task = fgvc_task(name)
    if task is None:
        valid = ", ".join(f"{t.name} ({t.folder})" for t in FGVC_TASKS.values())
        raise UsageError(f"Unknown FGVC dataset {name!r}. Valid names: {valid}.")
    return task


def vtab_names_help() -> str:
    """The 19 task names by group, for error messages."""
    lines = []
    for group in VTAB_GROUPS:
        names = ", ".join(t.name for t in VTAB_TASKS.values() if t.group == group)
        lines.append(f"  {group}: {names}")
    return "\n".join(lines)


def vtab_group_means(accuracy: Mapping[str, float]) -> dict[str, float]:
    """Mean accuracy per VTAB group, for reporting.

    ``accuracy`` maps task names (aliases allowed) to accuracy. Returns one entry per group that has a task
    in ``accuracy``; once all three groups are present it adds ``"group_mean"`` (mean of the three group
    means) and ``"task_mean"`` (mean over tasks) - papers report either one as "Avg", so both are given.
    """
    per_group: dict[str, list[float]] = {}
    for name, value in accuracy.items():
        task = vtab_task(name)
        if task is None:
            raise UsageError(
                f"{name!r} is not a VTAB-1k task; group means need these names:\n{vtab_names_help()}"
            )
        per_group.setdefault(task.group, []).append(value)
    means = {g: sum(v) / len(v) for g in VTAB_GROUPS if (v := per_group.get(g))}
    if len(means) == len(VTAB_GROUPS):
        means["group_mean"] = sum(means.values()) / len(VTAB_GROUPS)
        means["task_mean"] = sum(accuracy.values()) / len(accuracy)
    return means


def benchmark_task(name: str) -> VTABTask | FGVCTask | None:
    """The VTAB-1k or FGVC task called ``name``, or None; an exact canonical name wins over an alias (FGVC's
    ``oxford_flowers`` is also an alias of VTAB's ``oxford_flowers102``)."""
    exact = VTAB_TASKS.get(name) or FGVC_TASKS.get(name)
    return exact or vtab_task(name) or fgvc_task(name)


def canonical_task(name: str) -> str:
    """VTAB-1k / FGVC names by their canonical spelling (aliases allowed); any other task as it is."""
    task = benchmark_task(name)
    return task.name if task is not None else name
