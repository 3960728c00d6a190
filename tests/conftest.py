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

IDEAL_IMAGING = ImagingConfig(
    line_jitter_nm=0.0, drift_nm_per_s=(0.0, 0.0), poisson_noise=False, detector_noise_counts=0.0
)
"""Noise-free, undistorted imaging, for checks against ground-truth positions."""


@pytest.fixture(scope="session")
def small_config() -> SimulatorConfig:
    return SimulatorConfig(seed=3, specimen=SMALL_SPECIMEN)


@pytest.fixture(scope="session")
def small_specimen(small_config: SimulatorConfig) -> Specimen:
    return generate_specimen(small_config.specimen, small_config.seed)
