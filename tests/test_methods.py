"""The visual-PEFT baselines (adapters/): start point, a forward written from each paper's equations, the
ViT-B/16 parameter counts of the papers' formulas, merge, adapter-only state, and a training step each."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_vits import tiny_vit

from lily_lightning import (
    LilyConfig,
    LoRAConfig,
    UsageError,
    adapter_state_dict,
    count_parameters,
    inject,
    load_adapter_state_dict,
)
from lily_lightning.adapters import (
    AdaptFormerConfig,
    BitFitConfig,
    DoRAConfig,
    FacTTTConfig,
    SequentialAdapterConfig,
    SSFConfig,
    VPTConfig,
)
from lily_lightning.training.export_command import export_model
from lily_lightning.training.module import ViTClassifier
from lily_lightning.vit.merge import merge, unmerge
from lily_lightning.vit.state import count_backbone_parameters

CONFIGS = {
    "bitfit": BitFitConfig(),
    "vpt_shallow": VPTConfig(length=3),
    "vpt_deep": VPTConfig(length=3, deep=True),
    "adapter": SequentialAdapterConfig(bottleneck=4),
    "adaptformer": AdaptFormerConfig(bottleneck=4, scale=0.3),
    "ssf": SSFConfig(),
    "fact_tt": FacTTTConfig(rank=4, scale=0.5),
    "dora": DoRAConfig(rank=2, alpha=3.0),
}
STARTS_AT_PRETRAINED = [m for m in CONFIGS if not m.startswith("vpt")]
MERGEABLE = ["bitfit", "ssf", "dora", "fact_tt"]
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IMAGES_32 = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # [0, 1] pixels


def perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every trainable tensor off its start, so a wrong formula shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def trained(backbone: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each method injected into a copy of the tiny ViT, with perturbed (trained-like) tensors."""
    return {method: perturb(inject(copy.deepcopy(backbone), config)) for method, config in CONFIGS.items()}


# -- an independent ViT forward, written out from the frozen tensors and each paper's equations ----------


class Plain:
    """The frozen ViT: every hook is the identity. A method's reference overrides the hooks it changes."""

    length = 0  # prompt tokens

    def __init__(self, model: torch.nn.Module) -> None:
        self.ad = getattr(model, "adapters", None)

    def affine(self, place: str, i: int, h: torch.Tensor) -> torch.Tensor:
        return h

    def linear(self, place: str, i: int, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(h, w, b)

    def mlp(self, i: int, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        return mlp_out

    def prompts(self, i: int, batch: int) -> torch.Tensor | None:
        return None


def layer_norm(h: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    return F.layer_norm(h, h.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-6)


def reference_forward(p: dict[str, torch.Tensor], x: torch.Tensor, m: Plain) -> torch.Tensor:
    """timm's pre-norm ViT (class token, 3 heads, GELU MLP) from its tensors ``p``, with ``m``'s hooks."""
    batch = x.shape[0]
    h = (
        F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=8)
        .flatten(2)
        .transpose(1, 2)
    )
    h = m.affine("patch_embed", 0, h)
    h = torch.cat([p["cls_token"].expand(batch, -1, -1), h], dim=1) + p["pos_embed"]
    depth = len({k.split(".")[1] for k in p if k.startswith("blocks.")})
    for i in range(depth):
        prompts = m.prompts(i, batch)
        if prompts is not None:  # after the class token: inserted at block 0, replacing at later blocks
            h = torch.cat([h[:, :1], prompts, h[:, 1 + (m.length if i else 0) :]], dim=1)
        blk = f"blocks.{i}"
        a = m.affine("norm1", i, layer_norm(h, p, f"{blk}.norm1"))
        qkv = m.affine(
            "qkv", i, m.linear("qkv", i, a, p[f"{blk}.attn.qkv.weight"], p[f"{blk}.attn.qkv.bias"])
        )
        b, n, c = a.shape
        q, k, v = (t.reshape(b, n, 3, c // 3).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        att = ((q @ k.transpose(-2, -1)) / (c // 3) ** 0.5).softmax(-1) @ v
        att = att.transpose(1, 2).reshape(b, n, c)
        h = h + m.affine(
            "proj", i, m.linear("proj", i, att, p[f"{blk}.attn.proj.weight"], p[f"{blk}.attn.proj.bias"])
        )
        n2 = m.affine("norm2", i, layer_norm(h, p, f"{blk}.norm2"))
        f1 = m.affine("fc1", i, m.linear("fc1", i, n2, p[f"{blk}.mlp.fc1.weight"], p[f"{blk}.mlp.fc1.bias"]))
        f2 = m.affine(
            "fc2", i, m.linear("fc2", i, F.gelu(f1), p[f"{blk}.mlp.fc2.weight"], p[f"{blk}.mlp.fc2.bias"])
        )
        h = h + m.mlp(i, n2, f2)
    h = m.affine("norm", 0, layer_norm(h, p, "norm"))
    h = torch.cat([h[:, :1], h[:, 1 + m.length :]], dim=1)  # the prompts leave before the head
    return F.linear(h[:, 0], p["head.weight"], p["head.bias"])


class SSF(Plain):  # Lian et al., Eq. 3: y = gamma * x + beta after each op
    def affine(self, place: str, i: int, h: torch.Tensor) -> torch.Tensor:
        return h * self.ad[place].scale[i] + self.ad[place].shift[i]


class AdaptFormer(Plain):  # Chen et al., Eq. 2: MLP(LN(x)) + s * up(ReLU(down(LN(x))))
    def mlp(self, i: int, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        a = self.ad["mlp"]
        down = torch.relu(mlp_in @ a.down[i].weight.T + a.down[i].bias)
        return mlp_out + CONFIGS["adaptformer"].scale * (down @ a.up[i].weight.T + a.up[i].bias)


class Adapter(Plain):  # after the MLP, on its output, with a residual: m + up(ReLU(down(m)))
    def mlp(self, i: int, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        a = self.ad["mlp"]
        down = torch.relu(mlp_out @ a.down[i].weight.T + a.down[i].bias)
        return mlp_out + down @ a.up[i].weight.T + a.up[i].bias


class DoRA(Plain):  # Liu et al., Eq. 5: W' = m (W0 + s B A) / ||W0 + s B A||_c on the q and v rows
    def linear(self, place: str, i: int, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if place != "qkv":
            return F.linear(h, w, b)
        rows = list(w.chunk(3))
        config = CONFIGS["dora"]
        for third, site in ((0, "q"), (2, "v")):
            a = self.ad[site]
            direction = rows[third] + config.alpha / config.rank * a.lora_b[i].weight @ a.lora_a[i].weight
            rows[third] = a.magnitude[i][:, None] * direction / direction.norm(dim=1, keepdim=True)
        return F.linear(h, torch.cat(rows), b)


class FacT(Plain):  # Jie & Deng, FacT-TT: dW = s * V C U per weight, the MLP's 4 chunks each through U, V
    def linear(self, place: str, i: int, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u, v = self.ad["factors"].u.weight, self.ad["factors"].v.weight  # (r, dim), (dim, r)
        r, dim = u.shape
        s = CONFIGS["fact_tt"].scale
        out = F.linear(h, w, b)
        if place == "qkv":
            cores = [self.ad[site].core[i].weight for site in ("q", "k", "v")]
            return out + s * torch.cat([h @ u.T @ core.T @ v.T for core in cores], dim=-1)
        core = self.ad[place].core[i].weight
        chunks_in, chunks_out = h.shape[-1] // dim, w.shape[0] // dim
        delta = [
            sum(
                h[..., j * dim : (j + 1) * dim] @ u.T @ core[o * r : (o + 1) * r, j * r : (j + 1) * r].T
                for j in range(chunks_in)
            )
            @ v.T
            for o in range(chunks_out)
        ]
        return out + s * torch.cat(delta, dim=-1)


class VPT(Plain):  # Jia et al., Eq. 4-7: [x_cls, P_i, E_i] at each prompted block's input
    length = CONFIGS["vpt_shallow"].length

    def prompts(self, i: int, batch: int) -> torch.Tensor | None:
        prompts = self.ad["tokens"].prompts
        return prompts[i].expand(batch, -1, -1) if i < len(prompts) else None


REFERENCES = {
    "bitfit": Plain,  # the same forward, with the trained biases
    "vpt_shallow": VPT,
    "vpt_deep": VPT,
    "adapter": Adapter,
    "adaptformer": AdaptFormer,
    "ssf": SSF,
    "fact_tt": FacT,
    "dora": DoRA,
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_forward_equals_the_papers_equations(method: str, backbone, trained) -> None:
    model = trained[method]
    frozen = model.state_dict() if method == "bitfit" else backbone.state_dict()  # bitfit wraps nothing
    with torch.no_grad():
        expected = reference_forward(frozen, IMAGES, REFERENCES[method](model))
        torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected, backbone(IMAGES), atol=1e-3)  # the perturbation shows


def test_reference_forward_is_timms_vit(backbone) -> None:
    with torch.no_grad():
        expected = reference_forward(backbone.state_dict(), IMAGES, Plain(backbone))
        torch.testing.assert_close(backbone(IMAGES), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", STARTS_AT_PRETRAINED)
def test_starts_exactly_at_the_pretrained_model(method: str, backbone) -> None:
    model = inject(copy.deepcopy(backbone), CONFIGS[method]).eval()
    with torch.no_grad():
        assert torch.equal(model(IMAGES), backbone(IMAGES))


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_vpt_starts_off_the_pretrained_model_and_the_head_sees_no_prompt(method: str, backbone) -> None:
    # VPT's random prompts join attention from step 0 (the paper's init), so only the token count holds.
    model = inject(copy.deepcopy(backbone), CONFIGS[method]).eval()
    with torch.no_grad():
        assert model.forward_features(IMAGES).shape == backbone.forward_features(IMAGES).shape
        assert not torch.allclose(model(IMAGES), backbone(IMAGES))
        model.train()  # prompt dropout: two train-mode passes differ, eval mode is deterministic
        assert not torch.equal(model(IMAGES), model(IMAGES))


DIM, DEPTH, HIDDEN = 768, 12, 3072
VIT_B16_COUNTS = {
    # every bias: norm1, qkv, proj, norm2, fc1, fc2 per block, the patch embedding, the final norm
    "bitfit": DEPTH * (DIM + 3 * DIM + DIM + DIM + HIDDEN + DIM) + DIM + DIM,
    "vpt_shallow": 10 * DIM,
    "vpt_deep": DEPTH * 10 * DIM,
    "adapter": DEPTH * (DIM * 8 + 8 + 8 * DIM + DIM),
    "adaptformer": DEPTH * (DIM * 8 + 8 + 8 * DIM + DIM),
    # (gamma, beta) after patch embedding and final norm, and after norm1, qkv, proj, norm2, fc1, fc2
    "ssf": 2 * (DIM + DIM + DEPTH * (DIM + 3 * DIM + DIM + DIM + HIDDEN + DIM)),
    # shared U, V; per block cores r x r for q, k, v, proj, r x 4r for fc1, 4r x r for fc2
    "fact_tt": 2 * DIM * 8 + DEPTH * (4 * 8 * 8 + 8 * 32 + 32 * 8),
    # q and v: A (r x in), B (out x r), magnitude (out)
    "dora": DEPTH * 2 * (8 * DIM + DIM * 8 + DIM),
    # LoRA r=8 on q and v: A (r x in), B (out x r)
    "lora": DEPTH * 2 * (8 * DIM + DIM * 8),
    # Lily r=32, 4 experts: per site an LP per 3 blocks (4 LPs), a bank of 4 HPs and a router per block;
    # k and v at rank r, the mlp site at 2r
    "lily": sum(4 * DIM * r + 4 * r * DIM + DEPTH * r * 4 for r in (32, 32, 64)),
}
DEFAULTS = {"vpt_deep": VPTConfig(deep=True), "lora": LoRAConfig(), "lily": LilyConfig()}


@pytest.mark.parametrize("method", list(VIT_B16_COUNTS))
def test_vit_b16_counts_follow_the_papers_formulas(method: str) -> None:
    config = DEFAULTS.get(method) or type(CONFIGS[method])()
    assert count_backbone_parameters("vit_base_patch16_224", config) == VIT_B16_COUNTS[method]


def test_the_formulas_hand_values() -> None:
    # Hand values of the formulas above (the README table lists them next to the papers').
    assert VIT_B16_COUNTS == {
        "bitfit": 102_912,
        "vpt_shallow": 7_680,
        "vpt_deep": 92_160,
        "adapter": 156_768,
        "adaptformer": 156_768,
        "ssf": 205_824,
        "fact_tt": 21_504,
        "dora": 313_344,
        "lora": 294_912,
        "lily": 792_576,
    }


def count_column(path: Path, column: str) -> dict[str, int]:
    """``method -> count`` from the markdown table of ``path`` that has a ``column`` header."""
    counts, header = {}, None
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            header = None
        elif header is None and column in cells:
            header = cells
        elif header is not None and cells[0].startswith("`"):
            counts[cells[0].strip("`")] = int(cells[header.index(column)].replace(",", ""))
    return counts


@pytest.mark.parametrize(
    ("page", "column"), [("README.md", "ViT-B/16 count"), ("docs/explanation/methods.md", "ViT-B/16 params")]
)
def test_the_documented_counts_are_the_formulas(page: str, column: str) -> None:
    documented = count_column(Path(__file__).resolve().parents[1] / page, column)
    assert documented and all(VIT_B16_COUNTS[m] == n for m, n in documented.items()), documented


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_logits_equal_unmerged_and_unmerge_restores(method: str, backbone) -> None:
    model = perturb(inject(copy.deepcopy(backbone), CONFIGS[method]))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(IMAGES)
        merge(model)
        assert not any(site.branches for site in model.modules() if hasattr(site, "folded"))  # all folded
        torch.testing.assert_close(model(IMAGES), expected, atol=1e-5, rtol=1e-5)
        unmerge(model)
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(IMAGES), expected)


NOT_MERGEABLE = {  # method -> why, as its one refusal message says
    "adapter": "sequential bottleneck after each block's MLP",
    "adaptformer": "parallel bottleneck beside each block's MLP",
    "vpt_shallow": "prompt tokens are extra tokens",
    "vpt_deep": "prompt tokens are extra tokens",
}


def assert_refusal(error: UsageError, method: str) -> None:
    """One message: why the method cannot fold into linear weights, and what to use instead."""
    message = str(error)
    assert "\n" not in message and NOT_MERGEABLE[method] in message
    assert "cannot be folded into the linear weights" in message
    assert "adapter-only checkpoint" in message and "load_classifier" in message and "predict" in message


@pytest.mark.parametrize("method", list(NOT_MERGEABLE))
def test_methods_that_cannot_merge_refuse_in_one_message_and_change_nothing(method: str, trained) -> None:
    model = copy.deepcopy(trained[method])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as refused:
        merge(model)
    assert_refusal(refused.value, method)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(getattr(site, "folded", ()) for site in model.modules())


def module(method: str) -> ViTClassifier:
    """A trained-like classifier (perturbed adapter and head) on timm's tiny test ViT, normalising."""
    torch.manual_seed(0)
    settings = {"vpt": VPTConfig(length=2)} if method.startswith("vpt") else {}
    classifier = ViTClassifier(
        "test_vit", pretrained=False, img_size=32, num_classes=3, method=method, normalize="imagenet",
        class_names=["a", "b", "c"], **settings,
    )  # fmt: skip
    return perturb(classifier)


@pytest.mark.parametrize("method", list(NOT_MERGEABLE))
def test_export_refuses_methods_that_cannot_merge_and_writes_nothing(method: str, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    with pytest.raises(UsageError) as refused:
        export_model(module(method), out)
    assert_refusal(refused.value, method)
    assert not out.exists()


PLAIN_TIMM = """
import sys
import safetensors.torch, timm, torch

expected = torch.load(sys.argv[1])
for path, (images, logits) in expected.items():
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    model.load_state_dict(safetensors.torch.load_file(path))  # strict: timm's names, nothing else
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), logits, atol=1e-5, rtol=1e-5)
assert "lily_lightning" not in sys.modules
print("plain timm reproduced", len(expected))
"""


def test_export_of_each_mergeable_method_is_a_plain_timm_file_with_the_unmerged_logits(
    tmp_path: Path,
) -> None:
    # One subprocess for all: plain timm, without this package, loads each file and gives the logits the
    # adapted (unmerged) model gave, on the images it expects (normalised with ImageNet's mean and std).
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalised = (IMAGES_32 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    expected = {}
    for method in MERGEABLE:
        classifier = module(method).eval()
        with torch.no_grad():
            logits = classifier(IMAGES_32)
        out = tmp_path / f"{method}.safetensors"
        export_model(classifier, out)
        expected[str(out)] = (normalised, logits)
    torch.save(expected, tmp_path / "expected.pt")
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"plain timm reproduced {len(MERGEABLE)}" in run.stdout


@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapter_state_round_trip(method: str, backbone, trained) -> None:
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(trained[method]), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert sum(t.numel() for t in state.values()) == count_parameters(trained[method])  # nothing frozen
    fresh = inject(copy.deepcopy(backbone), CONFIGS[method]).eval()
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(IMAGES), trained[method](IMAGES))


def test_bad_settings_are_one_line_usage_errors() -> None:
    with pytest.raises(UsageError, match="length must be > 0"):
        VPTConfig(length=0)
    with pytest.raises(UsageError, match="dora targets"):
        DoRAConfig(targets=("q", "mlp"))
    with pytest.raises(UsageError, match="use method vpt_deep"):
        ViTClassifier("test_vit", pretrained=False, method="vpt_shallow", vpt=VPTConfig(deep=True))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_few_training_steps_move_only_the_methods_tensors(method: str) -> None:
    torch.manual_seed(0)
    settings = {"vpt": VPTConfig(length=2)} if method.startswith("vpt") else {}
    module = ViTClassifier(
        "test_vit", pretrained=False, img_size=32, num_classes=3, method=method, **settings
    )
    before = {k: v.clone() for k, v in module.named_parameters()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        loss = F.cross_entropy(module(images), labels)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {k for k, v in module.named_parameters() if not torch.equal(v, before[k])}
    head = {k for k in before if k.startswith("model.head.")}
    if method == "bitfit":
        method_tensors = {k for k in before if k.endswith(".bias") and k not in head}
    else:
        method_tensors = {k for k in before if k.startswith("model.adapters.")}
    assert changed - head <= method_tensors and changed & method_tensors
    assert module.adapter_parameters == sum(before[k].numel() for k in method_tensors)
