"""Configuration of the simulated instrument: specimen, image formation and instrument limits.

``configs/simulator.yaml`` is loaded into :class:`SimulatorConfig`; every key is
documented on the field that holds it. Units are in the field names.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from agent.config import StrictModel


class SpecimenConfig(StrictModel):
    """Procedural Sm-doped BiFeO3 specimen viewed along [001].

    Sizes are in nanometres, fractions in [0, 1]. Counts of planted features may
    be zero to switch a feature off.
    """

    size_nm: tuple[float, float] = Field((160.0, 160.0), description="specimen extent (x, y)")
    lattice_nm: float = Field(0.396, gt=0.1, lt=2.0, description="pseudo-cubic lattice parameter")
    sm_fraction: float = Field(0.10, ge=0.0, le=1.0, description="mean Sm fraction on A sites")
    atoms_per_column: int = Field(40, ge=1, description="atoms in a column (sets thickness)")
    polar_displacement_nm: float = Field(
        0.025, ge=0.0, description="B-column shift from the A-cell centre in a fully polar domain"
    )
    position_jitter_nm: float = Field(0.0, ge=0.0, description="static random column displacement")
    oxygen_columns: bool = Field(
        True, description="render the faint pure-O columns at the cell edges (about 2 % of a Bi column)"
    )

    domain_walls: int = Field(4, ge=0, description="number of straight ferroelectric walls")
    wall_width_nm: float = Field(
        0.6, gt=0.0, description="tanh half-width of a wall; columns within it carry the wall label"
    )
    wall_meander_nm: float = Field(1.5, ge=0.0, description="amplitude of the walls' slow meander")

    dislocations: int = Field(6, ge=0, description="edge dislocations")
    dislocation_core_radius_nm: float = Field(0.5, gt=0.0, description="core label radius")
    strain_radius_nm: float = Field(2.5, gt=0.0, description="'strained' label radius around a core")
    strained_patches: int = Field(2, ge=0, description="locally rotated lattice patches")
    strained_patch_radius_nm: float = Field(3.0, gt=0.0, description="radius of a rotated patch")
    strained_patch_rotation_deg: float = Field(3.0, description="peak lattice rotation in a patch")

    vacancy_clusters: int = Field(8, ge=0, description="clusters of missing columns")
    vacancies_per_cluster: tuple[int, int] = Field((3, 8), description="(min, max) per cluster")
    substitution_clusters: int = Field(8, ge=0, description="Sm-rich clusters of A columns")
    substitution_sm_fraction: float = Field(0.6, ge=0.0, le=1.0, description="Sm in a cluster")
    cluster_radius_nm: float = Field(1.2, gt=0.0, description="radius of a vacancy or Sm cluster")
    cluster_near_feature_probability: float = Field(
        0.75, ge=0.0, le=1.0, description="chance a cluster sits near a wall or dislocation"
    )
    cluster_near_distance_nm: float = Field(
        4.0, gt=0.0, description="how close to a wall or dislocation a cluster placed near one lies"
    )

    phase_patches: int = Field(1, ge=0, description="Sm-rich non-polar patches")
    phase_patch_radius_nm: float = Field(9.0, gt=0.0, description="radius of a non-polar patch")
    phase_sm_fraction: float = Field(0.20, ge=0.0, le=1.0, description="Sm fraction on A sites in a patch")
    amorphous_patches: int = Field(1, ge=0, description="patches without lattice")
    amorphous_patch_radius_nm: float = Field(6.0, gt=0.0, description="radius of an amorphous patch")

    thickness_gradient: float = Field(
        0.3, ge=0.0, lt=1.0, description="relative thickness change across the specimen"
    )
    edge_margin_nm: float = Field(
        8.0, ge=0.0, description="planted features keep this distance from the specimen edge"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if min(self.size_nm) < 4 * self.lattice_nm:
            raise ValueError(f"size_nm {self.size_nm} must span at least four lattice spacings")
        low, high = self.vacancies_per_cluster
        if not 1 <= low <= high:
            raise ValueError(
                f"vacancies_per_cluster must be (min, max) with 1 <= min <= max, got {(low, high)}"
            )
        return self


class ImagingConfig(StrictModel):
    """HAADF image formation: probe, detector, noise, scan distortions and specimen drift.

    The drift terms other than the constant rate (random walk, post-move transient) are
    state of the simulated microscope, which integrates them over its instrument clock;
    the stand-alone renderers in :mod:`simulator.imaging` use only the constant rate.
    """

    column_sigma_nm: float = Field(0.035, gt=0.0, description="Gaussian width of a column image")
    haadf_peak_fraction: float = Field(
        0.08, gt=0.0, le=1.0, description="fraction of electrons scattered to the detector on a Bi column"
    )
    background_fraction: float = Field(0.01, ge=0.0, le=1.0, description="diffuse background fraction")
    detector_noise_counts: float = Field(0.5, ge=0.0, description="Gaussian read noise, in counts")
    poisson_noise: bool = Field(True, description="counting noise; off only for tests and figures")
    line_jitter_nm: float = Field(0.004, ge=0.0, description="random x shift of each scan line, nm")
    drift_nm_per_s: tuple[float, float] = Field(
        (0.01, 0.006), description="constant specimen drift rate after settling (x, y), nm/s"
    )
    drift_random_walk_nm_per_s_per_sqrt_s: float = Field(
        0.002, ge=0.0, description="random walk of the drift velocity, nm/s per sqrt(s) of instrument time"
    )
    settle_drift_nm_per_s: float = Field(
        0.05, ge=0.0, description="extra drift speed right after a stage move, along the move, nm/s"
    )
    settle_drift_tau_s: float = Field(30.0, gt=0.0, description="decay time of the post-move drift, seconds")
    flyback_us: float = Field(20.0, ge=0.0, description="dead time at the end of each scan line, us")
    flyback_settle_nm: float = Field(
        0.02, ge=0.0, description="x lag of the beam at the start of each line (flyback settling), nm"
    )
    flyback_settle_us: float = Field(
        30.0, gt=0.0, description="decay time of the line-start lag, microseconds of scan time"
    )

    @property
    def distortions(self) -> bool:
        """True when jitter, drift or flyback settling move the image away from the ideal lattice."""
        return (
            self.line_jitter_nm > 0
            or any(v != 0 for v in self.drift_nm_per_s)
            or self.drift_random_walk_nm_per_s_per_sqrt_s > 0
            or self.settle_drift_nm_per_s > 0
            or self.flyback_settle_nm > 0
        )

    def without_scan_errors(self) -> ImagingConfig:
        """A copy with line jitter, every drift term and flyback settling off; noise unchanged.

        Returns
        -------
        ImagingConfig
            The ideal scan; :meth:`SimulatorConfig.ideal_instrument` also turns placement errors off.
        """
        return self.model_copy(
            update={
                "line_jitter_nm": 0.0,
                "drift_nm_per_s": (0.0, 0.0),
                "drift_random_walk_nm_per_s_per_sqrt_s": 0.0,
                "settle_drift_nm_per_s": 0.0,
                "flyback_settle_nm": 0.0,
            }
        )


class InstrumentConfig(StrictModel):
    """Limits of the simulated instrument, as reported by ``describe()``, and its stage placement errors."""

    name: str = Field("Micrography simulated STEM", description="the name describe() reports")
    beam_current_pa: float = Field(20.0, gt=0.0, description="probe current: sets the dose per dwell")
    dwell_us: tuple[float, float] = Field((0.5, 100.0), description="(min, max) dwell per pixel")
    pixel_size_nm: tuple[float, float] = Field((0.005, 2.0), description="(min, max) pixel size")
    max_tile_shape: tuple[int, int] = Field((4096, 4096), description="largest frame it scans")
    detectors: tuple[str, ...] = Field(("HAADF",), description="detectors a request may name")
    max_dose_e_per_a2: float | None = Field(
        None, gt=0.0, description="per-area dose limit; None disables the check"
    )
    dose_map_cell_nm: float = Field(0.5, gt=0.0, description="resolution of the dose bookkeeping")
    stage_settle_s: float = Field(0.5, ge=0.0, description="instrument time spent per stage move")
    real_time: bool = Field(
        False,
        description="scan at the instrument's pace: an acquisition returns no sooner than its stage "
        "settle and frame time after it began, on the wall clock (rendering counts toward it), as a "
        "physical instrument does; for measuring how long the instrument waits for the agent. Off, "
        "tiles come back as fast as they render and only their timestamps follow the instrument clock",
    )
    placement_sigma_nm: float = Field(
        2.0, ge=0.0, description="random error of each stage move or scan offset, per axis (1 sigma), nm"
    )
    hysteresis_nm: float = Field(
        1.0, ge=0.0, description="extra landing error along the direction of a move, per moved axis, nm"
    )


class SimulatorConfig(StrictModel):
    """Everything ``micrography simulate`` and the simulated microscope need."""

    seed: int = Field(0, description="specimen seed; noise streams are derived from it")
    specimen: SpecimenConfig = SpecimenConfig()
    imaging: ImagingConfig = ImagingConfig()
    instrument: InstrumentConfig = InstrumentConfig()

    def ideal_instrument(self) -> SimulatorConfig:
        """A copy whose instrument places every frame exactly: no placement error, drift, jitter or flyback.

        Counting and read noise are unchanged. With :meth:`ImagingConfig.without_scan_errors`
        (the scan's share) this is the one place that knows every instrument error; tests and
        benchmarks that compare with ground-truth stage positions use it.

        Returns
        -------
        SimulatorConfig
            The ideal instrument with the same specimen, seed and noise.
        """
        instrument = self.instrument.model_copy(update={"placement_sigma_nm": 0.0, "hysteresis_nm": 0.0})
        return self.model_copy(
            update={"imaging": self.imaging.without_scan_errors(), "instrument": instrument}
        )
