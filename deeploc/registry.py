"""Name -> class registries for deeploc's plug-ins (decoders, encoders, data sources, metrics).

A plug-in registers itself when its module is imported (``@DECODERS.register("fusion")``). Looking up a name
imports, at most once, every module of the registry's own package (so a built-in plug-in needs no import line
anywhere else) and the Python entry points of the registry's group (so an installed third-party package can
provide plug-ins). Nothing else is ever imported: a name read from a checkpoint or an export file selects among
classes that are already known, it never names a module to import. A user's own plug-in outside any package
registers by being imported: ``plugins: [my_module]`` in deeploc-train / deeploc-extract (imported before anything is
built), ``--import my_module`` on every argparse command.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import PurePath
from typing import Any, ClassVar, Generic, TypeVar

from deeploc.errors import DeeplocError

log = logging.getLogger(__name__)

T = TypeVar("T", bound=type)


class UnknownComponentError(DeeplocError, KeyError):
    """A registry name that no imported module, built-in module or entry point registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Plug-ins of one kind by name.

    Args:
        kind: what the registry holds, for messages ("decoder").
        package: the package whose modules hold the built-in plug-ins (imported on the first failed lookup).
        group: the entry-point group third-party packages declare plug-ins in (``deeploc.decoders``).
    """

    def __init__(self, kind: str, package: str, group: str) -> None:
        self.kind = kind
        self.package = package
        self.group = group
        self._classes: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: make ``cls`` known as ``name`` and record the name on it (``cls.registry_name``)."""

        def add(cls: T) -> T:
            self.add(name, cls)
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return add

    def add(self, name: str, obj: T) -> T:
        """Make ``obj`` known as ``name``; re-registering the same definition (a module imported twice) is fine."""
        known = self._classes.get(name)
        if known is not None and _origin(known) != _origin(obj):
            raise ValueError(
                f"{self.kind} name {name!r} is already registered by {_origin(known)}; choose another name for "
                f"{_origin(obj)}"
            )
        self._classes[name] = obj
        return obj

    def _discover(self) -> None:
        """Import the built-in modules and load the entry points, once."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{self.package}."):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                importlib.import_module(info.name)
        for entry in entry_points(group=self.group):
            try:
                entry.load()
            except Exception as exc:  # a broken third-party plug-in must not hide the built-in ones
                log.warning("could not load %s entry point %s (%s): %s", self.kind, entry.name, entry.value, exc)

    def get(self, name: str) -> T:
        """The class registered as ``name``; the error lists the known names and how to register another."""
        if name not in self._classes:
            self._discover()
        try:
            return self._classes[name]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {self.names()}. A {self.kind} defined "
                f"outside deeploc registers when its module is imported (plugins=[<module>] for deeploc-train and "
                f"deeploc-extract, --import <module> for the other commands) or through a Python entry point in the "
                f"group {self.group!r}. deeploc "
                "never imports a module named inside a checkpoint or export file."
            ) from None

    def has(self, obj: object) -> bool:
        """Whether ``obj`` itself is registered (under its ``registry_name``), without discovering anything."""
        name = getattr(obj, "registry_name", None)
        return name is not None and self._classes.get(name) is obj

    def names(self) -> list[str]:
        """Every registered name (built-ins and entry points included)."""
        self._discover()
        return sorted(self._classes)

    def items(self) -> list[tuple[str, T]]:
        """Every (name, plug-in) in registration order: built-ins of the package first."""
        self._discover()
        return list(self._classes.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        if name not in self._classes:
            self._discover()
        return name in self._classes


def _path_as_text(value: object) -> str:
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _origin(obj: object) -> str:
    target = getattr(obj, "score", obj)  # a metric spec is known by its function
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"


def import_modules(modules: Any, key: str) -> None:
    """Import user modules that register plug-ins: ``--import`` of the argparse commands, the ``plugins`` list of
    deeploc-train / -extract (``key`` names which, for the message)."""
    if modules is None:
        return
    if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
        raise DeeplocError(f"{key} must be a list of module names, e.g. {key}=[my_plugins], got {modules!r}")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure while importing a user's module is the user's to fix
            raise DeeplocError(
                f"{key}: cannot import module {module!r} ({type(exc).__name__}: {exc}); put its folder on "
                "PYTHONPATH (or install its package) and fix the error"
            ) from exc


class RecordsOptions:
    """Mixin: remember the keyword arguments an instance was built with, as plain values.

    Plug-ins are rebuilt from these (checkpoints, exports, multirun logs), so no class keeps a hand-written list
    of its own arguments; ``_derived_options`` names the arguments that come from elsewhere (e.g. the encoder).
    """

    _derived_options: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
        bound.apply_defaults()
        skip = ("self", *cls._derived_options)
        object.__setattr__(obj, "_options", {k: v for k, v in bound.arguments.items() if k not in skip})
        return obj

    def options(self) -> dict[str, Any]:
        """The keyword arguments this instance was built with (a plain-JSON copy)."""
        try:
            return json.loads(json.dumps(self._options, default=_path_as_text))
        except TypeError as exc:
            raise DeeplocError(
                f"{type(self).__name__} keyword arguments must be plain values (numbers, strings, lists, dicts) so "
                f"checkpoints load safely: {exc}"
            ) from None
