"""A callback's wrapper around one of the module's own hooks, installed and removed cleanly.

``SAM`` needs two moments no callback hook reaches: the module's ``optimizer_step`` (to hand
Lightning's optimizer a closure with the second pass) and the end of the module's own
``on_train_batch_start`` (the last code before ``training_step`` of a micro-batch that does
not end a step, where the random state its first pass starts from is captured). Lightning
looks both up on the module at every call, so an instance attribute wrapping the bound
method takes effect: :class:`ModuleHook`. :class:`InstalledHooks` sets them in ``setup``
and removes them in ``teardown``, leaving an instance attribute the user set as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["InstalledHooks", "ModuleHook"]


class ModuleHook:
    """What ``module.<hook>`` is while a callback wraps it: ``step(original, *args)``.

    A copy of the module made meanwhile (``deepcopy`` by SWA/EMA callbacks, ``pickle``) gets
    the original hook bound to the copy, never the callback or its Trainer.

    Example:
        >>> hook = ModuleHook(lambda original, x: 2 * original(x), abs)
        >>> hook(-3), copy.deepcopy(hook) is abs
        (6, True)
    """

    def __init__(self, step: Callable[..., Any], original: Callable[..., Any]) -> None:
        self.step, self.original = step, original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The hook's call: ``step`` with the original hook first."""
        return self.step(self.original, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.original, memo)

    def __reduce__(self) -> Any:
        return self.original.__reduce__()  # type: ignore[attr-defined]


class InstalledHooks:
    """Hooks of one module wrapped by a callback, until :meth:`remove`.

    Example:
        >>> net = nn.Linear(1, 1)
        >>> hooks = InstalledHooks(net, {"extra_repr": lambda original: "wrapped"})
        >>> net.extra_repr(), hooks.remove(), net.extra_repr()
        ('wrapped', None, 'in_features=1, out_features=1, bias=True')
    """

    def __init__(self, module: nn.Module, wrappers: dict[str, Callable[..., Any]]) -> None:
        self.module = module
        self._installed: list[tuple[str, ModuleHook, bool]] = []
        for name, step in wrappers.items():
            had_attribute = name in vars(module)
            hook = ModuleHook(step, getattr(module, name))
            setattr(module, name, hook)
            self._installed.append((name, hook, had_attribute))

    def remove(self) -> None:
        """Put every wrapped hook back (a hook replaced since by someone else is left alone)."""
        for name, hook, had_attribute in reversed(self._installed):
            if vars(self.module).get(name) is not hook:
                continue
            if had_attribute:
                setattr(self.module, name, hook.original)
            else:
                delattr(self.module, name)
        self._installed = []
