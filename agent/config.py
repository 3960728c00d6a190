"""YAML configuration files validated by pydantic models.

Every file in ``configs/`` maps onto one pydantic model. Unknown keys and wrong
types are errors that name the file and the dotted key, so a typo in a
configuration never silently falls back to a default.
"""

from __future__ import annotations

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
        got = problem.get("input")
        suffix = f" (got {got!r})" if problem["type"] != "extra_forbidden" and got is not None else ""
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
