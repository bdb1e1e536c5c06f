"""The shipped configs parse, layer as documented, and carry the paper's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lily_lightning.cli import main
from lily_lightning.data import FGVC_TASKS, VTAB_TASKS

CONFIGS = Path(__file__).parent.parent / "configs"


def resolved(capsys: pytest.CaptureFixture[str], *configs: Path) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_one_override_per_task() -> None:
    assert sorted(p.stem for p in (CONFIGS / "vtab").glob("*.yaml")) == sorted(VTAB_TASKS)
    assert sorted(p.stem for p in (CONFIGS / "fgvc").glob("*.yaml")) == sorted(FGVC_TASKS)


def test_paper_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    config = resolved(capsys, CONFIGS / "vit_vtab.yaml", CONFIGS / "vtab" / "dtd.yaml")
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert model["backbone"] == "vit_base_patch16_224.orig_in21k" and model["method"] == "lily"
    assert model["lily"] == {
        "rank": 32, "num_experts": 4, "lp_stride": None, "scale": 1.0,
        "targets": ["k", "v", "mlp"], "routing": "batch", "eval_routing": "batch",
        "sync_routing": True, "running_momentum": 0.1,
    }  # fmt: skip
    assert (model["lr"], model["weight_decay"], model["warmup_epochs"]) == (1e-3, 1e-4, 10)
    assert (model["warmup_lr"], model["min_lr"], model["drop_path_rate"]) == (1e-6, 1e-5, 0.1)
    assert (trainer["max_epochs"], data["init_args"]["batch_size"]) == (100, 64)
    assert data["init_args"]["name"] == "dtd" and data["init_args"]["split_mode"] == "train800val200"
    assert model["report"] == "final"


def test_lora_layer_changes_only_the_method(capsys: pytest.CaptureFixture[str]) -> None:
    lily = resolved(capsys, CONFIGS / "vit_vtab.yaml", CONFIGS / "vtab" / "svhn.yaml")
    lora = resolved(
        capsys, CONFIGS / "vit_vtab.yaml", CONFIGS / "lora_vtab.yaml", CONFIGS / "vtab" / "svhn.yaml"
    )
    assert lora["model"]["method"] == "lora"
    assert lora["model"]["lora"] == {"rank": 8, "alpha": 8.0, "targets": ["q", "v"], "dropout": 0.0}
    for section in ("trainer", "data"):
        assert lora[section] == lily[section]
    differing = {k for k in lily["model"] if lily["model"][k] != lora["model"][k]}
    assert differing == {"method", "lora"} or differing == {"method"}


@pytest.mark.parametrize("task", sorted(FGVC_TASKS))
def test_fgvc_layer_switches_the_data_module(capsys: pytest.CaptureFixture[str], task: str) -> None:
    config = resolved(capsys, CONFIGS / "vit_vtab.yaml", CONFIGS / "fgvc" / f"{task}.yaml")
    assert config["data"]["class_path"] == "lily_lightning.data.FGVCDataModule"
    assert config["data"]["init_args"]["name"] == task
    assert config["model"]["normalize"] == "imagenet"


def test_cli_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "vit_vtab.yaml"), "--data.name", "dtd",
              "--model.lily.rank", "16", "--print_config"])  # fmt: skip
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["init_args"]["name"] == "dtd" and config["model"]["lily"]["rank"] == 16
