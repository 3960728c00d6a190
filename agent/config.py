"""YAML configuration files validated by pydantic models.

Every file in ``configs/`` maps onto one pydantic model. Unknown keys and wrong
types are errors that name the file and the dotted key, so a typo in a
configuration never silently falls back to a default.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for configuration models: unknown keys are rejected, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def describe_validation_error(error: ValidationError, source: str) -> str:
    """Render a pydantic validation error as lines that name each bad key.

    Parameters
    ----------
    error : pydantic.ValidationError
        The error raised while validating.
    source : str
        Where the values came from (a file path or a description).

    Returns
    -------
    str
        One line per problem, ``source: key.path: message (got value)``.
    """
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<top level>"
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against the documented keys)"
        else:
            message = problem["msg"]
        if problem["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        got = problem.get("input")
        # A whole-model check names its keys itself: repeating the whole input would bury it.
        shown = problem["type"] != "extra_forbidden" and got is not None and bool(problem["loc"])
        suffix = f" (got {got!r})" if shown else ""
        lines.append(f"{source}: {key}: {message}{suffix}")
    return "\n".join(lines)


def validate_config(values: dict[str, Any], model: type[ModelT], source: str) -> ModelT:
    """Validate a mapping against a configuration model.

    Parameters
    ----------
    values : dict
        Raw values, for example parsed from YAML.
    model : type of pydantic.BaseModel
        The model to validate against.
    source : str
        Where the values came from, used in error messages.

    Returns
    -------
    pydantic.BaseModel
        The validated model instance.

    Raises
    ------
    ConfigError
        If a key is unknown or a value has the wrong type or range.
    """
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None


def load_config(path: str | Path, model: type[ModelT]) -> ModelT:
    """Load a YAML file into a configuration model.

    Parameters
    ----------
    path : str or pathlib.Path
        The YAML file.
    model : type of pydantic.BaseModel
        The model the file must satisfy.

    Returns
    -------
    pydantic.BaseModel
        The validated configuration.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid YAML, is not a mapping, or fails validation.

    Examples
    --------
    Not run as a test (it reads a file of the repository's configs/)::

        from simulator.config import SimulatorConfig
        config = load_config("configs/simulator.yaml", SimulatorConfig)
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a configuration file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read configuration file ({error.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        # PyYAML's own text spans several lines with a caret; one line says where.
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML ({problem}{where})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return validate_config(values, model, str(path))


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write a configuration model as YAML that :func:`load_config` reads back.

    Parameters
    ----------
    config : pydantic.BaseModel
        The configuration to write.
    path : str or pathlib.Path
        Destination file; parent folders must exist.
    """
    values = config.model_dump(mode="json")
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


UNIT_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_nm_per_s_per_sqrt_s", "nm/s/√s"),
    ("_nm_per_s", "nm/s"),
    ("_e_per_a2", "e-/Å²"),
    ("_per_um", "per µm"),
    ("_nm", "nm"),
    ("_pm", "pm"),
    ("_us", "µs"),
    ("_s", "s"),
    ("_pa", "pA"),
    ("_deg", "degrees"),
    ("_px", "px"),
    ("_counts", "counts"),
    ("_sigmas", "standard deviations"),
    ("_sigma", "standard deviations"),
    ("_fraction", "fraction"),
    ("_probability", "probability"),
)
"""Units read from the end of a setting's name (the project's naming convention), longest first."""


@dataclass(frozen=True)
class Setting:
    """One configuration key: where it sits, what it is, its default and its current value.

    Parameters
    ----------
    key : str
        Dotted path from the top of the file, e.g. ``tiles.dwell_us``.
    type : str
        The accepted type, as written in the model.
    default : object
        The default value (JSON-friendly).
    value : object
        The value in the configuration shown (the default when none is given).
    unit : str
        From the key's name (:data:`UNIT_SUFFIXES`), empty when it has none.
    description : str
        What it does, from the model; with where a session takes it from instead, if it does.
    """

    key: str
    type: str
    default: Any
    value: Any
    unit: str
    description: str


def unit_of(name: str) -> str:
    """The unit a setting's name states by its ending (``dwell_us`` -> ``µs``), or ``""``."""
    if name in {"shape", "max_tile_shape"}:
        return "px (rows, cols)"
    return next((unit for suffix, unit in UNIT_SUFFIXES if name.endswith(suffix)), "")


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return text or str(annotation).replace("typing.", "").replace("NoneType", "None")


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def settings_of(
    model: type[BaseModel],
    values: BaseModel | None = None,
    defaults: BaseModel | None = None,
    prefix: str = "",
) -> list[Setting]:
    """Every leaf setting of a configuration model, nested models flattened to dotted keys.

    Parameters
    ----------
    model : type of pydantic.BaseModel
        The configuration model (e.g. ``SessionConfig``).
    values : pydantic.BaseModel, optional
        A configuration to show (default: the defaults).
    defaults : pydantic.BaseModel, optional
        The defaults of this level (a nested model's defaults are those its parent sets).
    prefix : str
        Dotted path of this level.

    Returns
    -------
    list of Setting
        In the order the model declares them. A model may name keys a session sets from others
        in its class attribute ``overridden_keys`` (``{dotted key: what is used instead}``).

    Examples
    --------
    >>> from pydantic import Field
    >>> class Scan(StrictModel):
    ...     dwell_us: float = Field(2.0, description="time per pixel")
    >>> [(s.key, s.default, s.unit) for s in settings_of(Scan)]
    [('dwell_us', 2.0, 'µs')]
    """
    defaults = model() if defaults is None else defaults
    values = defaults if values is None else values
    overridden: dict[str, str] = getattr(model, "overridden_keys", {})
    rows = []
    for name, field in model.model_fields.items():
        default, value = getattr(defaults, name), getattr(values, name)
        key = f"{prefix}{name}"
        if isinstance(default, BaseModel):
            nested = settings_of(type(default), value, default, f"{key}.")
            rows += [
                replace(row, description=f"{row.description}; {overridden[row.key[len(prefix) :]]}")
                if row.key[len(prefix) :] in overridden
                else row
                for row in nested
            ]
            continue
        rows.append(
            Setting(
                key,
                _type_name(field.annotation),
                _jsonable(default),
                _jsonable(value),
                unit_of(name),
                field.description or "",
            )
        )
    return rows


def _cell(value: Any) -> str:
    """A value as YAML writes it (null, true), pipes escaped for a Markdown table."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    return str(value).replace("|", "\\|")


def format_settings(rows: list[Setting], defaults_only: bool = False) -> str:
    """Settings as aligned text: ``key = value  [unit]  description (default ...)``.

    Parameters
    ----------
    rows : list of Setting
        From :func:`settings_of`.
    defaults_only : bool
        Show the defaults, not the values (and no default column).

    Returns
    -------
    str
        One line per setting.
    """
    width = max((len(row.key) for row in rows), default=0)
    lines = []
    for row in rows:
        shown = row.default if defaults_only else row.value
        unit = f" [{row.unit}]" if row.unit else ""
        changed = "" if defaults_only or row.value == row.default else f" (default {row.default!r})"
        lines.append(f"{row.key:<{width}} = {shown!r}{unit}  {row.description}{changed}".rstrip())
    return "\n".join(lines)


def settings_markdown(sections: list[tuple[str, str, list[Setting]]]) -> str:
    """A Markdown reference of the settings: one table per configuration file.

    Parameters
    ----------
    sections : list of (title, introduction, rows)
        One entry per file.

    Returns
    -------
    str
        The page (``docs/configuration.md`` is this text for the shipped models).
    """
    lines = [
        "# Configuration reference",
        "",
        "Generated by `micrography config show --defaults --markdown` from the pydantic models;",
        "`tests/test_config.py` fails when this page and the models disagree. Units come from the",
        "key's name (`_nm`, `_us`, `_s`, `_e_per_a2`, ...).",
    ]
    for title, introduction, rows in sections:
        lines += [
            "",
            f"## {title}",
            "",
            introduction,
            "",
            "| key | default | unit | description |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| `{row.key}` | `{_cell(row.default)}` | {_cell(row.unit)} | {_cell(row.description)} |"
            for row in rows
        ]
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    # A one-element flow list gives any scalar or list in YAML's own spelling, on one line.
    return yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=10_000).strip()[1:-1]


def settings_yaml(rows: list[Setting], header: str) -> str:
    """A YAML file of the settings' defaults, each key under its description and unit as comments.

    Parameters
    ----------
    rows : list of Setting
        From :func:`settings_of` (nested keys contiguous, as it returns them).
    header : str
        Comment lines for the top of the file (without ``#``).

    Returns
    -------
    str
        YAML that loads back into the model's defaults (``configs/*.yaml`` are this text).
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    previous: list[str] = []
    for row in rows:
        parts = row.key.split(".")
        common = 0
        while common < min(len(parts), len(previous)) - 1 and parts[common] == previous[common]:
            common += 1
        if len(parts) < len(previous):
            lines.append("")  # back out of a section
        for level in range(common, len(parts) - 1):
            lines += ["", f"{'  ' * level}{parts[level]}:"]
        indent = "  " * (len(parts) - 1)
        unit = f" [{row.unit}]" if row.unit else ""
        note = f"{row.description}{unit}" if row.description else unit.strip()
        lines += textwrap.wrap(note, 100, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        lines.append(f"{indent}{parts[-1]}: {_yaml_value(row.default)}")
        previous = parts
    return "\n".join(lines) + "\n"
