"""Specimen layouts: the fixed default and control films, and a family drawn from ranges.

A policy tuned on one specimen layout can learn that layout instead of learning to
find features. The *layout family* draws every structural parameter of a
:class:`~simulator.config.SpecimenConfig` from a documented range, one draw per
family seed, so that benchmarks can tune on one set of family seeds and report on
a disjoint one (:data:`FAMILY_TUNING_SEEDS`, :data:`FAMILY_HELD_OUT_SEEDS`).

Layouts are named in benchmarks and sweeps:

``default``
    The simulator's default film (4 meandering walls, 6 dislocations, clusters mostly
    near walls and cores, one phase and one amorphous patch).
``control``
    Features uniformly at random, no walls, no patches and no survey contrast, where no
    honest policy can beat random by much.
``family``
    :func:`family_specimen` of the seed.

Examples
--------
>>> config = family_specimen(2000)
>>> config == family_specimen(2000)
True
>>> 0 <= config.domain_walls <= 10
True
"""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import Field, model_validator

from agent.config import StrictModel
from agent.errors import ConfigError
from simulator.config import SpecimenConfig

LAYOUTS: tuple[str, ...] = ("default", "control", "family")

CONTROL_SPECIMEN = SpecimenConfig(
    domain_walls=0,
    cluster_near_feature_probability=0.0,
    amorphous_patches=0,
    phase_patches=0,
    thickness_gradient=0.0,
)
"""Features uniformly at random: no walls to follow, no clustering, no survey contrast."""

FAMILY_TUNING_SEEDS: tuple[int, ...] = tuple(range(1000, 1010))
"""Family seeds a policy may be tuned on."""

FAMILY_HELD_OUT_SEEDS: tuple[int, ...] = tuple(range(2000, 2030))
"""Family seeds reserved for reporting (disjoint from :data:`FAMILY_TUNING_SEEDS`)."""

# Mixed into the family seed so that a family draw never shares its random stream with the
# specimen that the same integer seeds (generate_specimen uses the plain seed).
_FAMILY_STREAM = 0x1A7_0F


class LayoutFamily(StrictModel):
    """Ranges from which :func:`family_specimen` draws a specimen layout.

    Integer ranges are inclusive ``(low, high)``; float ranges are ``[low, high]``, drawn
    uniformly. Sizes in nanometres.
    """

    domain_walls: tuple[int, int] = Field((0, 10), description="ferroelectric walls")
    wall_meander_nm: tuple[float, float] = Field((0.0, 4.0), description="walls' meander amplitude")
    dislocations: tuple[int, int] = Field((0, 12), description="edge dislocations")
    strained_patches: tuple[int, int] = Field((0, 4), description="locally rotated lattice patches")
    vacancy_clusters: tuple[int, int] = Field((2, 14), description="vacancy clusters")
    substitution_clusters: tuple[int, int] = Field((2, 14), description="Sm-substitution clusters")
    cluster_near_feature_probability: tuple[float, float] = Field(
        (0.0, 1.0), description="chance that a cluster sits near a wall or dislocation"
    )
    polar_displacement_nm: tuple[float, float] = Field(
        (0.010, 0.035), description="B-column shift in a fully polar domain"
    )
    phase_patch_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="chance that the film has one Sm-rich non-polar patch"
    )
    amorphous_patch_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="chance that the film has one amorphous patch"
    )
    thickness_gradient: tuple[float, float] = Field((0.0, 0.5), description="relative thickness change")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        limits = {
            "cluster_near_feature_probability": (0.0, 1.0),
            "thickness_gradient": (0.0, 0.99),
        }
        for name, value in self:
            if not isinstance(value, tuple):
                continue
            low, high = value
            if not low <= high:
                raise ValueError(f"{name}: the range ({low}, {high}) must have low <= high")
            if low < 0:
                raise ValueError(f"{name}: the range ({low}, {high}) must not be negative")
            bounds = limits.get(name)
            if bounds is not None and not (bounds[0] <= low and high <= bounds[1]):
                raise ValueError(f"{name}: the range ({low}, {high}) must lie within {bounds}")
        return self


def family_specimen(seed: int, family: LayoutFamily | None = None) -> SpecimenConfig:
    """The specimen layout of one family seed: every structural parameter drawn from its range.

    Parameters
    ----------
    seed : int
        Family seed (non-negative). The same seed and ranges always give the same layout.
    family : LayoutFamily, optional
        The ranges (the documented defaults when omitted).

    Returns
    -------
    SpecimenConfig
        The layout; everything not drawn keeps the simulator's default.

    Raises
    ------
    ConfigError
        If the seed is negative.
    """
    if seed < 0:
        raise ConfigError(f"a layout-family seed is a non-negative integer, got {seed}")
    family = family or LayoutFamily()
    rng = np.random.default_rng([_FAMILY_STREAM, seed])

    def integer(bounds: tuple[int, int]) -> int:
        return int(rng.integers(bounds[0], bounds[1] + 1))

    def real(bounds: tuple[float, float]) -> float:
        return float(rng.uniform(bounds[0], bounds[1]))

    # One fixed draw order, so adding a range at the end never moves the earlier draws.
    return SpecimenConfig(
        domain_walls=integer(family.domain_walls),
        wall_meander_nm=real(family.wall_meander_nm),
        dislocations=integer(family.dislocations),
        strained_patches=integer(family.strained_patches),
        vacancy_clusters=integer(family.vacancy_clusters),
        substitution_clusters=integer(family.substitution_clusters),
        cluster_near_feature_probability=real(family.cluster_near_feature_probability),
        polar_displacement_nm=real(family.polar_displacement_nm),
        phase_patches=int(rng.random() < family.phase_patch_probability),
        amorphous_patches=int(rng.random() < family.amorphous_patch_probability),
        thickness_gradient=real(family.thickness_gradient),
    )


def layout_specimen(layout: str, seed: int) -> SpecimenConfig:
    """The specimen configuration of a named layout (see the module docstring) for one seed.

    Parameters
    ----------
    layout : str
        ``"default"``, ``"control"`` or ``"family"``.
    seed : int
        Specimen seed; for ``"family"`` also the family seed.

    Returns
    -------
    SpecimenConfig

    Raises
    ------
    ConfigError
        If the layout is unknown.
    """
    if layout == "default":
        return SpecimenConfig()
    if layout == "control":
        return CONTROL_SPECIMEN
    if layout == "family":
        return family_specimen(seed)
    raise ConfigError(f"unknown specimen layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
