"""Where each trainer finds its model families: a name in the config -> a `setup` function.

Families are modules imported only when chosen (so BERT runs never import the image code);
`register` adds one by function, for families outside the package and for tests.
"""

from __future__ import annotations

import importlib
from typing import Callable

from training.errors import UserError


class Registry:
    def __init__(self, trainer: str, modules: dict[str, str]):
        self.trainer = trainer
        self.modules = dict(modules)  # name -> module that defines `setup`
        self._functions: dict[str, Callable] = {}

    def register(self, name: str, setup: Callable) -> None:
        self._functions[name] = setup

    def get(self, name: str) -> Callable:
        if name in self._functions:
            return self._functions[name]
        if name not in self.modules:
            raise UserError(f"config.family={name!r} is not a {self.trainer} family; choose one of: "
                            f"{', '.join(sorted({*self.modules, *self._functions}))}")
        return importlib.import_module(self.modules[name]).setup
