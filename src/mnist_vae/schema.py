"""The machinery under config.py: YAML mappings built into frozen dataclasses, each value coerced
to its field's type, unknown keys named with a "did you mean", and the range checks that
config.py's dataclasses declare, each failure one `ConfigError` line naming the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import PipelineError
from .files import FileRefusedError, read_bounded

MAX_PARAMS_BYTES = 2**20  # the project's params.yaml is ~5 KB


class ConfigError(PipelineError):
    pass


class Checks:
    """The checks of one config section, each naming `section.key`, its value and what was
    expected: `Checks(self, "train").between("batch_size", 1, 65_536)`."""

    def __init__(self, values: Any, section: str) -> None:
        self.values, self.section = values, section

    def that(self, ok: bool, key: str, expected: str, value: Any = None) -> None:
        if not ok:
            shown = getattr(self.values, key) if value is None else value
            raise ConfigError(f"{self.section}.{key} = {plain(shown)!r}; expected {expected}")

    def between(self, key: str, low: float, high: float | None = None, unit: str = "") -> None:
        """low <= value (<= high)."""
        value = getattr(self.values, key)
        kind = "an integer" if isinstance(value, int) else "a number"
        expected = f"{kind} >= {low:,}" if high is None else f"{kind} from {low:,} to {high:,}"
        self.that(low <= value and (high is None or value <= high), key,
                  expected + (f" ({unit})" if unit else ""))

    def positive(self, key: str, example: str) -> None:
        self.that(getattr(self.values, key) > 0, key, f"a positive number such as {example}")

    def fraction(self, key: str) -> None:
        self.that(0 < getattr(self.values, key) < 1, key, "a fraction strictly between 0 and 1")

    def fields(self) -> None:
        """Every check the section's fields declare (`ranged`, `positive`, `fraction`)."""
        for f in dataclasses.fields(self.values):
            if check := f.metadata.get("check"):
                check(self, f.name)


def ranged(default: float, low: float, high: float | None = None, unit: str = "") -> Any:
    """A dataclass field that must lie in [low, high] (no upper end if None)."""
    return dataclasses.field(default=default, metadata={
        "check": lambda check, key: check.between(key, low, high, unit)})


def positive(default: float, example: str) -> Any:
    return dataclasses.field(default=default, metadata={"check": lambda check, key: check.positive(key, example)})


def fraction(default: float) -> Any:
    return dataclasses.field(default=default, metadata={"check": Checks.fraction})


def plain(value: Any) -> Any:
    """Tuples as lists, as YAML and MLflow show them."""
    return [plain(v) for v in value] if isinstance(value, tuple) else value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping, as DVC does: PyYAML keeps the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one "
                                  "section; keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(cls: type, path: Path | str, overrides: Mapping[str, Any] | None = None) -> Any:
    """`cls` from a YAML file that sets every key, with `overrides` (flat names such as
    "sweep.n_trials", from flags) on top; each error names the file or the flag."""
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())  # errors name the file as the user knows it
    try:
        text = read_bounded(path, MAX_PARAMS_BYTES, "a YAML file of params such as the project's "
                            "params.yaml").decode()
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506  a SafeLoader
    except FileRefusedError as err:
        if err.missing:
            raise ConfigError(f"{path}: not found; run from the project root, where params.yaml lives") from None
        raise ConfigError(str(err)) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); expected a "
                          "YAML file such as the project's params.yaml") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        reason = (f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
                  if mark and getattr(err, "problem", None) else str(err).splitlines()[0])
        raise ConfigError(f"{path}: not valid YAML ({reason}); fix the syntax") from None
    for name, value in (overrides or {}).items():
        section, key = name.split(".", 1)
        raw = {**raw, section: {**(raw.get(section) or {}), key: value}}
    if isinstance(raw, Mapping) and (missing := _missing_keys(cls, raw, prefix="")):
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"{path}: {missing[0]}{more} missing; every key must be set (the "
                          "project's params.yaml lists them all with their defaults)")
    try:
        return _build(cls, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(_name_the_source(str(err), path, overrides or {})) from None


def _name_the_source(message: str, path: Path, overrides: Mapping[str, Any]) -> str:
    """"sweep.n_trials = 0; expected ..." as the user wrote it: a flag (--n-trials 0) when the
    value came from one (flags are the keys with dashes), else the key in params.yaml."""
    key, _, rest = message.partition(" = ")
    whole = re.sub(r"\[\d+\]$", "", key)  # sweep.latent_dim[0]: an item of a list flag
    if whole in overrides and "; " in rest:
        value, reason = rest.split("; ", 1)
        flag = f"--{whole.split('.', 1)[1].replace('_', '-')}"
        if whole != key:
            return f"{flag} {overrides[whole]}: its item {key[len(whole):]} is {value}; {reason} (fix the flag)"
        return f"{flag} {value}: {reason} (fix the flag)"
    return f"{path}: {message} (fix it in {path} or with dvc exp run -S)"


def _missing_keys(cls: type, raw: Mapping[str, Any], prefix: str) -> list[str]:
    missing = []
    for f in dataclasses.fields(cls):
        tp = get_type_hints(cls)[f.name]
        if f.name not in raw:
            missing.append(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(tp) and isinstance(raw[f.name], Mapping):
            missing += _missing_keys(tp, raw[f.name], f"{prefix}{f.name}.")
    return missing


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} is {raw!r}; expected a mapping of keys")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}{key}; {hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", raw[name], tp)
    return cls(**values)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r}; expected one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            pair = len(args) == 2 and args[1] is not Ellipsis  # a range: (low, high)
            raise ConfigError(f"{key} = {value!r}; expected a list such as "
                              f"{'[low, high]' if pair else '[256, 128]'}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        # YAML 1.1 (PyYAML) reads 1e-06 as a string, and `dvc exp run -S train.lr=1e-6` writes that.
        value = float(value)
    # bool is an int subclass in Python; `latent_dim: true` is a typo, not 1.
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str),
          bool: isinstance(value, bool)}[tp]
    if not ok:
        raise ConfigError(f"{key} = {value!r}; expected {_TYPE_NAMES[tp]}")
    if tp is float and not math.isfinite(value):  # .inf overflows later, far from the cause
        raise ConfigError(f"{key} = {value!r}; expected a finite number")
    return tp(value)


_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
