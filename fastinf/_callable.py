"""Make a module callable as its same-named public function.

``fastinf.extract``, ``fastinf.aggregate`` and ``fastinf.plan`` are both modules and public functions.
Importing the module (``from fastinf.extract import ...``) rebinds the package attribute to the module,
so each such module calls ``callable_module(__name__, func)``: the module then forwards calls to the
function, and ``fastinf.extract(...)`` works whatever was imported first.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable


def callable_module(module_name: str, func: Callable[..., Any]) -> None:
    """Make ``sys.modules[module_name]`` callable as ``func``."""

    class _CallableModule(types.ModuleType):
        __doc__ = sys.modules[module_name].__doc__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
