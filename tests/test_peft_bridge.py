"""The ``peft`` method (vit/peft_bridge): HuggingFace PEFT's own layers on a timm ViT. LoRA's forward against
its formula, the start at the pretrained model, the parameter counts of the formulas, adapter-only state and
checkpoints, merge and export to plain timm, and one message for each bad config."""

from __future__ import annotations

import copy
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_methods import Plain, perturb, reference_forward
from tiny_vits import tiny_vit

from lily_lightning import UsageError, adapter_state_dict, count_parameters, inject, load_adapter_state_dict
from lily_lightning.adapters import HFPeftConfig
from lily_lightning.cli import main
from lily_lightning.training.checkpointing import load_trained
from lily_lightning.training.export_command import export_model
from lily_lightning.training.module import ViTClassifier
from lily_lightning.vit.export import load_exported
from lily_lightning.vit.inject import timm_state_dict
from lily_lightning.vit.merge import merge, unmerge
from lily_lightning.vit.state import count_backbone_parameters

# The dev extra installs peft (CI runs all); without it only the tests of the refusals run.
requires_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs the peft extra")

QKV = {"target_modules": ["qkv"]}
# One small config per PEFT type (tiny ViT: width 48, MLP 96, depth 4); OFT/BOFT blocks divide 48.
CONFIGS = {
    "LORA": {"peft_type": "LORA", "r": 2, "lora_alpha": 3, **QKV},
    "DORA": {"peft_type": "LORA", "r": 2, "use_dora": True, **QKV},
    "VERA": {"peft_type": "VERA", "r": 4, "target_modules": ["qkv", "fc1"]},
    "LOHA": {"peft_type": "LOHA", "r": 2, **QKV},
    "LOKR": {"peft_type": "LOKR", "r": 2, **QKV},
    "OFT": {"peft_type": "OFT", "r": 0, "oft_block_size": 8, **QKV},
    "BOFT": {"peft_type": "BOFT", "boft_block_size": 8, **QKV},
    "FOURIERFT": {"peft_type": "FOURIERFT", "n_frequency": 20, **QKV},
    "HRA": {"peft_type": "HRA", "r": 2, **QKV},
    "LILY": {"peft_type": "LILY", "r": 4, "stride_A": 2, "num_B": 2, "target_modules": ["qkv", "fc2"]},
}
# PEFT starts these at the pretrained weights (a zero factor, an identity rotation, paired reflections).
# FourierFT's spectrum starts random (init_weights=False, PEFT's default), so it does not.
STARTS_AT_PRETRAINED = ["LORA", "DORA", "VERA", "LOHA", "LOKR", "OFT", "BOFT", "LILY", "HRA"]
MERGEABLE = ["LORA", "DORA", "VERA", "LOKR", "OFT", "FOURIERFT"]
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def injected(backbone: torch.nn.Module, kind: str) -> torch.nn.Module:
    return inject(copy.deepcopy(backbone), HFPeftConfig(CONFIGS[kind])).eval()


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return tiny_vit()


class LoRAOnQKV(Plain):
    """Hu et al. 2021, Eq. 3: h = W0 x + (alpha / r) B A x, on the whole fused qkv Linear of each block."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.p = dict(model.named_parameters())

    def linear(self, place: str, i: int, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = F.linear(h, w, b)
        if place != "qkv":
            return out
        a = self.p[f"blocks.{i}.attn.qkv.lora_A.default.weight"]  # (r, in)
        up = self.p[f"blocks.{i}.attn.qkv.lora_B.default.weight"]  # (3 dim, r)
        return out + 3 / 2 * (h @ a.T @ up.T)


@requires_peft
def test_peft_lora_forward_equals_the_formula_in_timms_forward(backbone) -> None:
    model = perturb(injected(backbone, "LORA"))
    assert type(model) is type(backbone)  # still timm's VisionTransformer, running timm's forward
    with torch.no_grad():
        expected = reference_forward(backbone.state_dict(), IMAGES, LoRAOnQKV(model))
        torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, backbone(IMAGES), atol=1e-3)  # the perturbation shows


@requires_peft
@pytest.mark.parametrize("kind", STARTS_AT_PRETRAINED)
def test_starts_at_the_pretrained_model(kind: str, backbone) -> None:
    with torch.no_grad():
        logits, frozen = injected(backbone, kind)(IMAGES), backbone(IMAGES)
    if kind == "HRA":  # a product of Householder reflections, identity up to rounding
        torch.testing.assert_close(logits, frozen, atol=1e-6, rtol=0)
    else:
        assert torch.equal(logits, frozen)


@requires_peft
def test_counts_follow_the_formulas_shared_tensors_once(backbone) -> None:
    depth, dim, hidden = 4, 48, 96
    # LoRA r=2 on qkv: A (r x dim) and B (3 dim x r) per block
    assert count_parameters(injected(backbone, "LORA")) == depth * 2 * (dim + 3 * dim) == 1_536
    # PEFT's Lily r=4, stride_A=2, num_B=2 on qkv and fc2: an A (r x in) per 2 blocks, num_B B's (r x out)
    # shared by all blocks, a router (num_B x r) per block; per module type.
    lily = (depth // 2) * 4 * (dim + hidden) + 2 * 4 * (3 * dim + dim) + 2 * depth * 2 * 4
    assert count_parameters(injected(backbone, "LILY")) == lily == 2_752


@requires_peft
def test_the_recipes_vit_b16_counts_follow_the_formulas() -> None:
    import yaml

    dim, depth, hidden = 768, 12, 3072
    # LoRA r=8 on qkv: as many as lora_vtab.yaml's r=8 on the q and v rows
    lora = depth * 8 * (dim + 3 * dim)
    # PEFT's Lily r=32 on qkv and fc2: an A per 3 blocks, 4 B's for all blocks, a router per block
    lily = (depth // 3) * 32 * (dim + hidden) + 4 * 32 * (3 * dim + dim) + 2 * depth * 4 * 32
    assert (lora, lily) == (294_912, 887_808)
    for recipe, expected in (("peft_lora", lora), ("peft_lily", lily)):
        text = (Path(__file__).parent.parent / "configs" / "methods" / f"{recipe}.yaml").read_text()
        config = HFPeftConfig(yaml.safe_load(text)["model"]["peft"])
        assert count_backbone_parameters("vit_base_patch16_224", config) == expected


@requires_peft
@pytest.mark.parametrize("kind", ["LORA", "VERA", "BOFT", "LILY"])
def test_adapter_state_round_trip(kind: str, backbone) -> None:
    trained = perturb(injected(backbone, kind))
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(trained), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sum(t.numel() for t in state.values()) == count_parameters(trained)  # nothing frozen, shared once
    torch.manual_seed(123)  # another draw: what is not saved (VeRA's projections) must be rebuilt the same
    fresh = injected(backbone, kind)
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(IMAGES), trained(IMAGES))


@requires_peft
@pytest.mark.parametrize("kind", MERGEABLE)
def test_merged_logits_equal_unmerged_plain_timm_too_and_unmerge_restores(kind: str, backbone) -> None:
    model = perturb(injected(backbone, kind))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(IMAGES)
        merge(model)
        torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=1e-5)
        plain = copy.deepcopy(backbone)
        plain.load_state_dict(timm_state_dict(model))  # strict: timm's names, no PEFT tensor left
        torch.testing.assert_close(plain(IMAGES), expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(UsageError, match="merged"):
            model.train()(IMAGES)
        unmerge(model.eval())
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(IMAGES), expected)


@requires_peft
def test_peft_lily_refuses_to_merge_in_one_message_and_changes_nothing(backbone) -> None:
    model = perturb(injected(backbone, "LILY"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match="cannot merge PEFT's LILY"):
        merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    merge(injected(backbone, "LORA"))  # and the refusal is no leftover state of the bridge


def classifier(peft: dict, seed: int = 0) -> ViTClassifier:
    torch.manual_seed(seed)
    return ViTClassifier("test_vit", pretrained=False, img_size=32, num_classes=3, method="peft", peft=peft)


@requires_peft
def test_checkpoint_keeps_adapter_and_head_only_and_loads_into_a_fresh_model(tmp_path: Path) -> None:
    module = classifier(CONFIGS["LILY"])
    assert module.method == "peft_lily"  # results and run folders name the PEFT type
    perturb(module)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    head = {k for k in saved if k.startswith("model.head.")}
    assert len(head) == 2 and all(".lily_" in k for k in set(saved) - head)
    assert sum(saved[k].numel() for k in set(saved) - head) == module.adapter_parameters
    torch.save(checkpoint, tmp_path / "last.ckpt")
    fresh = perturb(classifier(CONFIGS["LILY"]), seed=2)  # the same frozen backbone, other adapter and head
    with torch.no_grad():
        assert not torch.allclose(fresh(IMAGES), module(IMAGES))
        load_trained(fresh, tmp_path / "last.ckpt")
        assert torch.equal(fresh(IMAGES), module(IMAGES))


@requires_peft
def test_export_writes_plain_timm_with_the_same_logits(tmp_path: Path) -> None:
    module = perturb(classifier(CONFIGS["DORA"]))
    with torch.no_grad():
        expected = module(IMAGES)
        metadata = export_model(module, tmp_path / "model.safetensors")
        assert metadata["side_branches"] == "[]" and metadata["load"].startswith("import timm")
        loaded = load_exported(tmp_path / "model.safetensors")
        normalized = (IMAGES - module.mean) / module.std
        torch.testing.assert_close(loaded(normalized), expected, atol=1e-5, rtol=1e-5)


@requires_peft
def test_a_training_step_moves_only_peft_tensors_and_the_head() -> None:
    module = classifier({"peft_type": "LORA", "r": 2, "target_modules": ["qkv", "fc2"]})
    before = {k: v.clone() for k, v in module.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = F.cross_entropy(module(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in module.named_parameters() if not torch.equal(v, before[k])}
    lora = {k for k in before if ".lora_" in k}
    assert changed == lora | {"model.head.weight", "model.head.bias"}
    assert module.adapter_parameters == sum(before[k].numel() for k in lora)


@requires_peft
@pytest.mark.parametrize(
    ("peft", "message"),
    [
        ({"peft_type": "LORAX", **QKV}, r"unknown peft_type 'LORAX'.*LILY.*LORA.*VERA"),
        (
            {"peft_type": "LORA", "rank": 8, **QKV},
            r"LoraConfig has no field 'rank'.*, r, ",
        ),
        (
            {"peft_type": "LORA", "target_modules": ["qkv", "fc3"]},
            r"'fc3' matches no module.*attn\.qkv \(Linear",
        ),
        ({"peft_type": "LORA"}, "needs target_modules"),
        ({"peft_type": "LORA", "target_modules": ["head"]}, "reach the classification head 'head'"),
        ({"peft_type": "LORA", "r": 0, **QKV}, "could not apply LORA to this ViT.*positive"),
        ({"r": 8}, "a mapping with a peft_type"),
        (None, "model.method peft needs a HuggingFace PEFT config"),
    ],
)
def test_bad_configs_are_one_usage_error_naming_what_is_wrong(peft: dict | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        classifier(peft)


def test_without_peft_installed_one_message_says_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'lily_lightning\[peft\]'"):
        classifier(CONFIGS["LORA"])


@requires_peft
def test_the_recipes_and_a_json_override_parse(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    configs = Path(__file__).parent.parent / "configs"
    base = ["fit", "--config", str(configs / "vit_vtab.yaml"), "--config"]
    for recipe, peft_type in (("peft_lora", "LORA"), ("peft_lily", "LILY")):
        with pytest.raises(SystemExit):
            main([*base, str(configs / "methods" / f"{recipe}.yaml"), "--print_config"])
        model = yaml.safe_load(capsys.readouterr().out)["model"]
        assert (model["method"], model["peft"]["peft_type"]) == ("peft", peft_type)
    json = '{"peft_type": "HRA", "r": 4, "target_modules": ["fc1"]}'  # replaces the recipe's mapping
    with pytest.raises(SystemExit):
        main([*base, str(configs / "methods" / "peft_lily.yaml"), "--model.peft", json, "--print_config"])
    peft = yaml.safe_load(capsys.readouterr().out)["model"]["peft"]
    assert peft == {"peft_type": "HRA", "r": 4, "target_modules": ["fc1"]}


@requires_peft
def test_cli_fit_resume_test_predict_with_a_json_config(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_cli import result_line, tiny_run_config, trainable_tensors

    config = tiny_run_config(tmp_path, data_root, epochs=2, method="peft")
    lora = '{"peft_type": "LORA", "r": 2, "target_modules": ["qkv"]}'
    args = ["--config", str(config), "--model.peft", lora]
    one_step = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0"]
    assert main(["fit", *args, *one_step, "--trainer.max_epochs", "1"]) == 0
    assert main(["fit", *args, *one_step, "--ckpt_path", "last"]) == 0  # resumes: the second epoch
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    state = trainable_tensors(checkpoint)
    assert all(".lora_" in k or k.startswith("model.head.") for k in state)
    capsys.readouterr()
    assert main(["test", *args, "--ckpt_path", "last"]) == 0
    result = result_line(capsys.readouterr().out)
    dim, depth, rank = 64, 6, 2  # test_vit: LoRA A (r x dim), B (3 dim x r) on each block's qkv
    assert (result["method"], result["adapter_params"]) == ("peft_lora", str(depth * rank * 4 * dim))
    assert main(["predict", *args, "--ckpt_path", "last"]) == 0
    assert len((tmp_path / "run" / "predictions.csv").read_text().splitlines()) == 1 + 64
