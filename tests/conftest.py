"""Shared fixtures: a small synthetic specimen that keeps the suite fast."""

from __future__ import annotations

import pytest

from simulator.config import ImagingConfig, SimulatorConfig, SpecimenConfig
from simulator.specimen import Specimen, generate_specimen

SMALL_SPECIMEN = SpecimenConfig(
    size_nm=(30.0, 30.0),
    domain_walls=2,
    dislocations=2,
    strained_patches=1,
    vacancy_clusters=3,
    substitution_clusters=3,
    phase_patches=1,
    phase_patch_radius_nm=4.0,
    amorphous_patches=1,
    amorphous_patch_radius_nm=2.5,
    edge_margin_nm=4.0,
)
"""A 30 x 30 nm specimen with every kind of planted feature (about 11k columns)."""


def specimen_with(**settings: object) -> SpecimenConfig:
    """A specimen config with no planted feature except those ``settings`` ask for.

    Tests that study one kind of feature (a wall, two dislocations) start from this.
    """
    none = dict.fromkeys(
        ("domain_walls", "dislocations", "strained_patches", "vacancy_clusters", "substitution_clusters",
         "phase_patches", "amorphous_patches"),
        0,
    )  # fmt: skip
    return SpecimenConfig(**(none | settings))  # type: ignore[arg-type]


IDEAL_IMAGING = ImagingConfig(poisson_noise=False, detector_noise_counts=0.0).without_scan_errors()
"""Noise-free, undistorted imaging, for checks against ground-truth positions.

A simulated microscope also needs an ideal stage: ``config.ideal_instrument()``.
"""


@pytest.fixture(scope="session")
def small_config() -> SimulatorConfig:
    return SimulatorConfig(seed=3, specimen=SMALL_SPECIMEN)


@pytest.fixture(scope="session")
def small_specimen(small_config: SimulatorConfig) -> Specimen:
    return generate_specimen(small_config.specimen, small_config.seed)
