"""Adapter-only state: save, load and count the tensors a method trains: those ``inject`` added (shared ones
once), the backbone tensors it unfroze in place (BitFit's biases, under their backbone names) and those of
another library's layers (HF PEFT's, under their names in the model)."""

from __future__ import annotations

from collections.abc import Mapping

import timm
import torch
from torch import nn

from ..adapters import NAMED_IN_MODEL, AdapterConfig, kinds_of
from .inject import ADAPTERS_ATTR, inject


def _adapters(model: nn.Module) -> nn.Module:
    adapters = getattr(model, ADAPTERS_ATTR, None)
    if not isinstance(adapters, nn.Module):
        raise ValueError(
            "this model has no injected adapters; call lily_lightning.inject(model, config) first"
        )
    return adapters


def _unfrozen(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the method trains in the model's own tree (unfrozen backbone tensors, PEFT's layers),
    by their names in ``model``."""
    named = [a for a in _adapters(model).values() if set(NAMED_IN_MODEL) & set(kinds_of(a))]
    names = [n for a in named for n in a.names]
    return {name: model.get_parameter(name) for name in names}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, keyed ``adapters.<site>.<name>``; each Lily HP bank appears once. Backbone
    tensors a method trains in place (BitFit) and the tensors of PEFT's layers appear under their own names
    (a tensor PEFT shares between layers, as its Lily's, once)."""
    state = {
        f"{ADAPTERS_ATTR}.{name}": tensor.detach()
        for name, tensor in _adapters(model).state_dict(keep_vars=True).items()
    }
    return state | {name: tensor.detach() for name, tensor in _unfrozen(model).items()}


def state_problems(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], unexpected: bool = True
) -> list[str]:
    """What keeps ``given`` from loading into tensors shaped like ``expected``: missing names, (with
    ``unexpected``) names the model lacks, and differing shapes. Empty when it fits."""

    def listed(names: list[str]) -> str:
        return repr(names) if len(names) <= 5 else f"{names[:5]} and {len(names) - 5} more"

    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected)) if unexpected else []
    mis_shaped = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(given) & set(expected))
        if given[k].shape != expected[k].shape
    ]
    problems = [f"missing {listed(missing)}"] if missing else []
    problems += [f"unexpected {listed(extra)}"] if extra else []
    problems += [f"wrong shape {listed(mis_shaped)}"] if mis_shaped else []
    return problems


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`adapter_state_dict` returned into an injected model built with the same config.

    Raises ``ValueError`` naming every missing, unexpected or mis-shaped tensor, and ``UsageError`` for a
    merged model (see ``inject._refuse_merged_loads``).
    """
    problems = state_problems(adapter_state_dict(model), state)
    if problems:
        raise ValueError(
            "adapter state does not fit this model (was it saved with another adapter config or backbone?): "
            + "; ".join(problems)
        )
    # Through the model, not its adapters alone: its load hook refuses a merged model. The check above makes
    # ``state`` exactly the adapter tensors, so strict=False only lets the backbone's stay as they are.
    model.load_state_dict(state, strict=False)


def count_parameters(model: nn.Module) -> int:
    """Trainable adapter parameters, each shared tensor counted once (the head is not included)."""
    adapter = sum(p.numel() for p in _adapters(model).parameters() if p.requires_grad)
    return adapter + sum(p.numel() for p in _unfrozen(model).values())


def count_backbone_parameters(backbone: str, config: AdapterConfig | None) -> int:
    """Trainable parameters of ``config`` injected into timm's ``backbone``, head excluded.

    The model is built on the meta device (no memory, no weights). ``None`` means full fine-tuning: every
    backbone parameter but the classifier's.
    """
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    if config is None:
        head = sum(p.numel() for p in model.get_classifier().parameters())
        return sum(p.numel() for p in model.parameters()) - head
    return count_parameters(inject(model, config))
