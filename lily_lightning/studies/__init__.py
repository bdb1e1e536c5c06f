"""Many runs and what they show: sweep, report, plots.

May import ``training``, ``vit``, ``adapters``, ``data`` and the top-level utilities; never ``cli``.
"""
