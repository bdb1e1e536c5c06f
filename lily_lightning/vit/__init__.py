"""Everything that knows a timm ViT: adapter injection, adapter state, merge/unmerge, export, local weights.

May import ``adapters`` and the top-level utilities (``errors``, ``paths``, ``files``); never Lightning.
"""
