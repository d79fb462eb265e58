"""What a config field accepts, and the base classes of config sections.

Every field states what it accepts in its ``metadata["rule"]`` (:func:`choice`, :func:`number`,
:func:`any_value`; a ``bool`` field's type says it all); a section's ``check()`` adds the rules
that join several fields. Nothing here knows the model families, so both :mod:`mtkit.config` and
the ``models/<family>.py`` (each with its own :class:`ModelConfig` subclass) import it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mtkit.errors import MtkitError, did_you_mean


@dataclass(frozen=True)
class Rule:
    """The values a config field accepts beyond its type (``any`` marks a deliberately free field)."""

    choices: tuple[str, ...] = ()
    low: float | None = None  # smallest allowed value (``low_open``: strictly above it)
    low_open: bool = False
    high: float | None = None  # largest allowed value (``high_open``: strictly below it)
    high_open: bool = False
    length: int = 0  # lists: exactly this many items (0: any number)
    any: bool = False

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = " and ".join(parts) if parts else "a finite number"
        return f"{self.length} numbers, each {text}" if self.length else text


def choice(default: str, *choices: str) -> Any:
    """A field holding one of ``choices`` (the default first among them or not)."""
    return field(default=default, metadata={"rule": Rule(choices=tuple(choices))})


def choices_list(factory: Any, *choices: str) -> Any:
    """A list field whose every item is one of ``choices``."""
    return field(default_factory=factory, metadata={"rule": Rule(choices=tuple(choices))})


def number(
    default: Any = None, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, length: int = 0, factory: Any = None,
) -> Any:
    """A numeric field (or list of numbers) in ``[low, high]``; NaN and infinities never pass."""
    rule = Rule(low=low, high=high, low_open=low_open, high_open=high_open, length=length)
    default_kw = {"default": default} if factory is None else {"default_factory": factory}
    return field(**default_kw, metadata={"rule": rule})


def any_value(default: Any) -> Any:
    """A field whose every value of the right type is valid (e.g. ``seed``, a free-text name)."""
    return field(default=default, metadata={"rule": Rule(any=True)})


def field_rule(f: dataclasses.Field) -> Rule | None:
    """The rule of a dataclass field; None only for ``bool`` fields, whose type is the whole check."""
    return f.metadata.get("rule")


def bad_value(key: str, value: Any, rule: Rule) -> MtkitError:
    """The error for ``key`` holding ``value``, which ``rule`` does not allow."""
    text = f"config key '{key}': {value!r} is not allowed; must be {rule.allowed()}"
    if rule.choices and isinstance(value, str):
        text += did_you_mean(value, rule.choices, listing=None)
    return MtkitError(text)


def check_field(f: dataclasses.Field, value: Any, key: str) -> None:
    """Raise :class:`MtkitError` naming ``key`` when ``value`` breaks the rule of field ``f``."""
    rule = field_rule(f)
    if rule is None or rule.any or value is None:  # None passed the type check: the field is Optional
        return
    items = value if isinstance(value, list) else [value]
    if rule.choices:
        for item in items:
            if item not in rule.choices:
                raise bad_value(key, item, rule)
        return
    if rule.length and len(items) != rule.length:
        raise bad_value(key, value, rule)
    for x in items:
        if isinstance(x, (int, float)) and (
            not math.isfinite(x)
            or (rule.low is not None and (x <= rule.low if rule.low_open else x < rule.low))
            or (rule.high is not None and (x >= rule.high if rule.high_open else x > rule.high))
        ):
            raise bad_value(key, value, rule)


class Section:
    """Mixin of every config section: ``check()`` holds the rules that join several fields."""

    def check(self, section: str) -> None:
        """Raise :class:`MtkitError` naming ``section.key`` when fields disagree with each other."""


@dataclass
class ModelConfig(Section):
    """Base of every family's model config; ``arch`` selects the family in ``MODELS``."""

    arch: str = any_value("transformer")  # checked against MODELS (with a did-you-mean) on load

    @property
    def width(self) -> int:
        """The model's width (d_model of the noam schedule): each family names its own."""
        raise NotImplementedError
