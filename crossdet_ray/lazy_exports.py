"""A package's public names imported on first use (PEP 562), so that importing one light
module of a package (the driver's needs) does not import its heavy siblings (torch, pandas)."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose name `n` lives in `exports[n]`."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:  # `from package import submodule` then imports the submodule
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
