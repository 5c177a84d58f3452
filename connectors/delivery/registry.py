"""Delivery connectors found by name: built-ins, ``register_connector`` and entry points.

In the spirit of faust's ``FactoryMapping``: the config names a connector (``outbox``, ``smtp``)
and ``build_connector`` turns the name and its options into a ``DeliveryConnector``. Built-ins
register themselves when their module is imported (done lazily on first look-up); other packages
add connectors through the entry-point group ``switchboard.connectors``, whose entry points load
either a connector class with a ``from_options`` classmethod or a factory callable.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, TypeVar, cast, overload

from connectors.delivery.base import DeliveryConnector

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConnectorFactory",
    "OptionReader",
    "OptionValue",
    "UnknownConnectorError",
    "build_connector",
    "known_connectors",
    "register_connector",
    "unregister_connector",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "switchboard.connectors"

OptionValue = str | int | float | bool
"""A scalar option value as YAML gives it (``ChannelConfig.options``)."""


class ConnectorFactory(Protocol):
    """Builds a connector from its options; raises ``ValueError`` naming a bad option."""

    def __call__(
        self, options: Mapping[str, OptionValue], *, data_dir: Path
    ) -> DeliveryConnector: ...


class _Configurable(Protocol):
    """A connector class that builds itself from options."""

    @classmethod
    def from_options(
        cls, options: Mapping[str, OptionValue], *, data_dir: Path
    ) -> DeliveryConnector: ...


_C = TypeVar("_C", bound=_Configurable)

_BUILTINS: dict[str, str] = {
    "outbox": "connectors.delivery.outbox",
    "smtp": "connectors.delivery.smtp",
}
_registry: dict[str, ConnectorFactory] = {}


class UnknownConnectorError(KeyError):
    """No connector is registered under the name; the message lists the known names."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown connector {self.name!r} (known: {', '.join(self.known) or 'none'})"


class OptionReader:
    """Typed access to one connector's options; ``check_unknown()`` rejects unread names.

    Values may come from YAML (typed) or from the environment (strings), so numbers and booleans
    are also accepted as strings (``"25"``, ``"true"``/``"false"``, ``"yes"``/``"no"``, ``"1"``/
    ``"0"``). Every error is a ``ValueError`` naming the connector and the option.
    """

    _TRUE = frozenset({"true", "1", "yes", "on"})
    _FALSE = frozenset({"false", "0", "no", "off"})

    def __init__(self, connector: str, options: Mapping[str, OptionValue]) -> None:
        self._connector = connector
        self._options = dict(options)
        self._read: set[str] = set()

    def _bad(self, name: str, expected: str, value: object) -> ValueError:
        return ValueError(
            f"connector {self._connector!r}: option {name!r} must be {expected}, got {value!r}"
        )

    def _get(self, name: str) -> OptionValue | None:
        self._read.add(name)
        return self._options.get(name)

    def optional_str(self, name: str) -> str | None:
        """The option as a string (numbers are converted), or None when absent."""
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, bool):
            raise self._bad(name, "a string", value)
        return str(value)

    def get_str(self, name: str, default: str) -> str:
        """The option as a string, or ``default`` when absent."""
        value = self.optional_str(name)
        return default if value is None else value

    def require_str(self, name: str) -> str:
        """The option as a non-empty string. Raises ``ValueError`` when absent or empty."""
        value = self.optional_str(name)
        if not value:
            raise ValueError(f"connector {self._connector!r}: option {name!r} is required")
        return value

    def get_int(self, name: str, default: int) -> int:
        """The option as an integer, or ``default`` when absent."""
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise self._bad(name, "an integer", value)

    def get_float(self, name: str, default: float) -> float:
        """The option as a float, or ``default`` when absent."""
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise self._bad(name, "a number", value)

    def get_bool(self, name: str, default: bool) -> bool:
        """The option as a boolean, or ``default`` when absent."""
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in self._TRUE:
            return True
        if text in self._FALSE:
            return False
        raise self._bad(name, "a boolean", value)

    def check_unknown(self) -> None:
        """Raise ``ValueError`` naming every option that no getter has read."""
        unknown = sorted(set(self._options) - self._read)
        if unknown:
            raise ValueError(
                f"connector {self._connector!r}: unknown option(s) {', '.join(unknown)} "
                f"(accepted: {', '.join(sorted(self._read))})"
            )


def _as_factory(obj: object, name: str) -> ConnectorFactory:
    from_options = getattr(obj, "from_options", None)
    if callable(from_options):
        return cast(ConnectorFactory, from_options)  # duck-typed: a class with from_options
    if callable(obj):
        return cast(ConnectorFactory, obj)  # a plain factory callable
    raise TypeError(f"connector {name!r}: {obj!r} is neither a factory nor has from_options")


def _add(name: str, factory: ConnectorFactory, *, replace: bool) -> None:
    current = _registry.get(name)
    if current is not None and current != factory and not replace:
        raise ValueError(f"connector {name!r} is already registered ({current!r})")
    _registry[name] = factory


@overload
def register_connector(name: str) -> Callable[[_C], _C]: ...
@overload
def register_connector(
    name: str, factory: ConnectorFactory, *, replace: bool = False
) -> ConnectorFactory: ...
def register_connector(
    name: str, factory: ConnectorFactory | None = None, *, replace: bool = False
) -> Callable[[_C], _C] | ConnectorFactory:
    """Register a connector under ``name``: as a class decorator or with a factory.

    Used bare, ``@register_connector("smtp")`` decorates a class that has a
    ``from_options(options, *, data_dir)`` classmethod. Called with ``factory`` it registers any
    callable of that signature.

    Args:
        name: The name configs use (``channels.<channel>.connector``).
        factory: A factory callable; None to return a class decorator.
        replace: Allow replacing a different factory already under ``name``.

    Returns:
        The decorator, or ``factory`` itself.

    Raises:
        ValueError: Another factory is registered under ``name`` and ``replace`` is False.
    """
    if factory is not None:
        _add(name, factory, replace=replace)
        return factory

    def decorate(cls: _C) -> _C:
        _add(name, cls.from_options, replace=replace)
        return cls

    return decorate


def unregister_connector(name: str) -> None:
    """Forget the connector registered under ``name`` (no error when there is none)."""
    _registry.pop(name, None)


def _entry_point_names() -> set[str]:
    return {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _resolve(name: str) -> ConnectorFactory | None:
    if name in _registry:
        return _registry[name]
    if name in _BUILTINS:
        importlib.import_module(_BUILTINS[name])
        return _registry.get(name)
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        loaded = ep.load()
        if name not in _registry:  # loading a decorated class registers it already
            _add(name, _as_factory(loaded, name), replace=False)
        log.info("loaded delivery connector %r from entry point %s", name, ep.value)
        return _registry[name]
    return None


def known_connectors() -> list[str]:
    """Sorted names of every connector: registered, built-in or offered by an entry point."""
    return sorted(set(_registry) | set(_BUILTINS) | _entry_point_names())


def build_connector(
    name: str, options: Mapping[str, OptionValue], *, data_dir: Path
) -> DeliveryConnector:
    """Build the connector registered under ``name`` with its options.

    Args:
        name: Connector name, e.g. ``"outbox"`` or ``"smtp"``.
        options: Its options (``ChannelConfig.options``); unknown names are errors.
        data_dir: Directory for files a connector keeps (the outbox file by default).

    Returns:
        A ready connector; the caller closes it with ``aclose()``.

    Raises:
        UnknownConnectorError: No connector has that name (a ``KeyError``).
        ValueError: An option is unknown, missing or of the wrong type; the message names it.
    """
    factory = _resolve(name)
    if factory is None:
        raise UnknownConnectorError(name, known_connectors())
    return factory(options, data_dir=data_dir)
