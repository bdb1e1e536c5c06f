"""The kinds of place a method touches in a ViT, named once so merge, state and counting ask the kind.

Every adapter module says which kinds it is (``kinds``, a tuple); ``vit/inject`` wires each kind in one way:

- ``DELTA``: ``adapter(h, block)`` is added to a module's output. ``h`` is the module's input
  (``reads = "input"``: LoRA, Lily, FacT, DoRA's direction, AdaptFormer beside the MLP) or its output
  (``reads = "output"``: a sequential Adapter after the MLP). ``delta_weight(block)`` is the (out, in) matrix
  ``D`` with ``adapter(x, block) == x @ D.T`` in eval mode, or None when the delta is not linear in ``x``;
  a linear delta on a Linear folds into its weight (``merge``); any other stays a side branch (Lily's ``mlp``
  site) or, when it is the whole method (AdaptFormer, Adapter), refuses to merge (``merge_problem``).
- ``AFFINE``: ``affine(block, weight, bias) -> (scale, shift)`` maps the module's output (deltas included)
  to ``out * scale + shift``, per output channel (SSF; DoRA's magnitude). ``weight`` / ``bias`` are the
  frozen tensors the output comes from (DoRA's scale depends on them). It folds into that weight and bias.
- ``TOKENS``: ``tokens(block, batch)`` gives (batch, length, dim) extra tokens put after the class (prefix)
  tokens at a block's input - inserted at block 0, replacing the previous ones at later blocks - and dropped
  again before the head (VPT). A sequence does not fold into a weight: ``merge`` refuses.
- ``UNFROZEN``: backbone tensors trained in place (BitFit's biases); ``vit/inject`` fills ``names`` with the
  backbone parameters it unfroze. Nothing to fold: they are the backbone's own weights.
- ``LAYERS``: another library replaced backbone modules by layers of its own (HuggingFace PEFT's, built by
  ``vit/peft_bridge``). The adapter owns no tensor: ``names`` are the trained tensors' names in the model
  (as for ``UNFROZEN``), ``wrapped`` maps each replaced module's path to the attribute that holds the
  original module, and ``fold()`` / ``unfold()`` merge the layers and undo it (``merge`` / ``unmerge``).

An adapter may also say why it cannot be merged now with ``merge_problem(site) -> str | None``; a method
that never merges ends its message with :data:`USE_UNMERGED` (what to do instead).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

DELTA = "delta"
AFFINE = "affine"
TOKENS = "tokens"
UNFROZEN = "unfrozen"
LAYERS = "layers"
# The kinds whose trained tensors live in the model's own module tree, under the adapter's ``names``.
NAMED_IN_MODEL: tuple[str, ...] = (UNFROZEN, LAYERS)

Reads = Literal["input", "output"]

# The end of every "cannot merge" message of a method whose update no weight of the plain ViT computes.
USE_UNMERGED = (
    "Keep the run's adapter-only checkpoint and use the adapted model as it is: `python -m lily_lightning "
    "predict` or `test` with --ckpt_path, or lily_lightning.load_classifier(checkpoint) in Python. merge and "
    "export are for methods whose update is linear in the weights (lora, dora, fact_tt, ssf, bitfit, lily "
    "with a fixed mix)."
)

# Places that exist once per model (the others once per block): after the patch embedding, the final norm.
MODEL_PLACES: tuple[str, ...] = ("patch_embed", "norm")


def kinds_of(adapter: nn.Module) -> tuple[str, ...]:
    """The kinds ``adapter`` declares (an additive delta when it does not say)."""
    return tuple(getattr(adapter, "kinds", (DELTA,)))


class UnfrozenTensors(nn.Module):
    """Owns no tensor: names the backbone parameters a method trains in place.

    ``select`` says which (``"bias"``: every bias); ``vit/inject`` fills ``names`` with the parameter names
    it unfroze, so adapter state and parameter counts can find them.
    """

    kinds = (UNFROZEN,)

    def __init__(self, select: str) -> None:
        super().__init__()
        self.select = select
        self.names: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        return f"select={self.select!r}, tensors={len(self.names)}"
