"""``python -m lily_lightning``: LightningCLI for fit/validate/test/predict, plus ``prepare``, ``data``,
``sweep``, ``report`` and ``export``.

The Lightning subcommands take YAML configs (``--config``, layered left to right) and overrides such as
``--data.name dtd --model.lily.rank 16``; ``data.num_classes`` is linked into the model.
"""

from __future__ import annotations

import sys

from .console import exit_code, show_package_logs
from .errors import UsageError
from .training.lightning_cli import check_config_files, run_command

USAGE = """usage: python -m lily_lightning {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]
       python -m lily_lightning predict --config CONFIG.yaml --ckpt_path CKPT --data.predict_path DIR_OR_GLOB
       python -m lily_lightning prepare demo [--cache-dir DIR] [--force]
       python -m lily_lightning prepare vtab1k --root DIR [--tasks TASK...] [--tfds-dir DIR] [--tfds-python P]
       python -m lily_lightning prepare fgvc --root DIR --from DOWNLOADS [--datasets NAME...] [--seed N]
       python -m lily_lightning data check --root ROOT [--name TASK]
       python -m lily_lightning sweep --config CONFIG.yaml --tasks vtab|fgvc|TASK... [--methods lily lora]
       python -m lily_lightning report RUNS_DIR [--out DIR]
       python -m lily_lightning export --config CONFIG.yaml --ckpt_path RUN.ckpt --out FILE [--force]"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    show_package_logs()
    return exit_code(lambda: _dispatch(args, from_sys_argv=argv is None))


def _dispatch(args: list[str], from_sys_argv: bool) -> int:
    if args[:1] == ["prepare"]:
        if args[1:2] == ["vtab1k"]:
            from .data.prepare.vtab1k_command import main as prepare_vtab1k_main

            return prepare_vtab1k_main(args[2:])
        if args[1:2] == ["fgvc"]:
            from .data.prepare.fgvc import main as prepare_fgvc_main

            return prepare_fgvc_main(args[2:])
        if args[1:2] != ["demo"]:
            raise UsageError(f"unknown `prepare` target {args[1:2]}; one of demo, vtab1k, fgvc\n{USAGE}")
        from .demo.prepare import main as prepare_demo_main

        return prepare_demo_main(args[2:])
    if args[:1] == ["data"]:
        if args[1:2] != ["check"]:
            raise UsageError(f"unknown `data` command {args[1:2]}; the one command is `check`\n{USAGE}")
        from .data.check import main as data_check_main

        return data_check_main(args[2:])
    if args[:1] == ["sweep"]:
        from .studies.sweep import main as sweep_main

        return sweep_main(args[1:])
    if args[:1] == ["report"]:
        from .studies.report import main as report_main

        return report_main(args[1:])
    if args[:1] == ["export"]:
        from .training.export_command import main as export_main

        check_config_files(args)
        return export_main(args[1:])
    # LightningCLI reads sys.argv itself when called from the command line.
    return run_command(None if from_sys_argv else args, config_args=args)
