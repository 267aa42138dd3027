"""Lazy package attributes: the public API at a package root without importing every module behind it.

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"model_utils.reward_model": ("RewardModel",)})

`from model_utils import create_critic_model` then imports `model_utils.model_factory` on first use only, so
importing the package itself stays cheap (no DeepSpeed, no transformers until a name is used).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(
    package: str, modules: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], object], Callable[[], list], list[str]]:
    """Module-level `__getattr__`, `__dir__` and `__all__` for `package`, resolving the names each module of
    `modules` ({module: names}) exports on first use."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__, sorted(exports)
