"""VTAB-1k, FGVC and image-folder DataModules, task tables, `data check`, and a synthetic task writer.

The DataModules yield float32 images in [0, 1]; the model normalises them (``model.normalize``).
"""

from lily_lightning.data.check import check_tree
from lily_lightning.data.fgvc import FGVCDataModule
from lily_lightning.data.imagefolder import ImageFolderDataModule
from lily_lightning.data.synthetic import write_synthetic_vtab_task
from lily_lightning.data.tasks import (
    FGVC_TASKS,
    VTAB_GROUPS,
    VTAB_TASKS,
    FGVCTask,
    VTABTask,
    fgvc_task,
    vtab_group_means,
    vtab_task,
)
from lily_lightning.data.vtab1k import VTAB1kDataModule

__all__ = [
    "FGVC_TASKS",
    "VTAB_GROUPS",
    "VTAB_TASKS",
    "FGVCDataModule",
    "FGVCTask",
    "ImageFolderDataModule",
    "VTAB1kDataModule",
    "VTABTask",
    "check_tree",
    "fgvc_task",
    "vtab_group_means",
    "vtab_task",
    "write_synthetic_vtab_task",
]
