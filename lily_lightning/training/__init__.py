"""The LightningModule and its run: module, CLI defaults, checkpoints, progress, predictions, results.

May import ``vit``, ``adapters``, ``data`` and the top-level utilities; never ``studies``, ``demo``, ``cli``.
"""
