"""Judging guided sessions against ground truth, and the session report figure.

A planted feature counts as *imaged* once a high-resolution tile covering any
of its columns (or, for vacancy clusters, its vacant sites) was acquired, and
as *detected* once one of its nodes scores above the session's detection
threshold. These evaluations use the simulator's ground truth and never feed
back into the session's decisions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from pydantic import ValidationError

from agent.driver import ScanRequest
from agent.journal import JournalContents
from agent.policy import GuidedPolicy
from agent.session import DECISION_STAGES, Session, StepRecord
from agent.survey import CandidateGrid
from analysis.figures import SCORE_UNIT, clipped_norm, empty_panel, labelled_colorbar, tile_numbers
from analysis.ground_truth import match_columns
from simulator.config import SimulatorConfig
from simulator.drivers import ExposureTruth, SimulatedMicroscope
from simulator.specimen import Specimen, generate_specimen


def feature_candidates(specimen: Specimen, grid: CandidateGrid) -> list[set[int]]:
    """For each candidate tile, the ids of the planted features it would image.

    Parameters
    ----------
    specimen : Specimen
        Ground truth.
    grid : CandidateGrid
        Candidate tiles of the session.

    Returns
    -------
    list of set of int
        One set of feature ids per candidate (the oracle policy's truth).
    """
    points_x = [specimen.x_nm[specimen.feature_id >= 0], specimen.vacancies["x_nm"]]
    points_y = [specimen.y_nm[specimen.feature_id >= 0], specimen.vacancies["y_nm"]]
    point_feature = [specimen.feature_id[specimen.feature_id >= 0], specimen.vacancies["feature_id"]]
    x, y = np.concatenate(points_x), np.concatenate(points_y)
    feature = np.concatenate(point_feature)
    result: list[set[int]] = []
    for x_min, x_max, y_min, y_max in grid.extents:
        inside = (x >= x_min) & (x <= x_max) & (y >= y_min) & (y <= y_max)
        result.append({int(f) for f in np.unique(feature[inside])})
    return result


def recorded_simulator(contents: JournalContents) -> tuple[SimulatorConfig | None, str]:
    """The simulated instrument a journal was recorded on, or why it cannot be known.

    Parameters
    ----------
    contents : JournalContents
        A journal as read by :func:`agent.journal.read_journal`.

    Returns
    -------
    simulator : SimulatorConfig or None
        The recorded simulator settings (``micrography run`` records them; a missing
        ``simulator`` entry means the built-in specimen with the session's seed).
    reason : str
        Empty with a configuration; otherwise why there is none.
    """
    config = contents.config
    name = contents.instrument.get("name", "an unnamed instrument")
    try:
        recorded = {**(config.get("simulator") or {}), "seed": config.get("seed", 0)}
        simulator = SimulatorConfig.model_validate(recorded)
    except ValidationError:
        return None, "the recorded simulator configuration is not valid for this Micrography"
    if name != simulator.instrument.name:
        return None, f"recorded on {name!r}, not on the simulated microscope"
    return simulator, ""


def recorded_ground_truth(contents: JournalContents) -> tuple[Specimen | None, str]:
    """The planted features of a session recorded on the simulated microscope, or why there are none.

    The specimen is regenerated from the simulator configuration and seed recorded in the
    journal (:func:`recorded_simulator`). It is trusted only if the regenerated instrument,
    brought to the state of the recording by the requests before it, reproduces the first
    recorded high-resolution tile, so a journal of another specimen (or of a real instrument)
    is never judged against the wrong truth.

    Parameters
    ----------
    contents : JournalContents
        A journal as read by :func:`agent.journal.read_journal`.

    Returns
    -------
    specimen : Specimen or None
        The ground truth, or None.
    reason : str
        Empty with a specimen; otherwise why there is no ground truth, in a microscopist's words.
    """
    simulator, reason = recorded_simulator(contents)
    if simulator is None:
        return None, reason
    unrecorded = "the simulator settings were not recorded"
    position = next(
        (k for k, s in enumerate(contents.steps) if s.record.get("kind") != "survey" and s.image is not None),
        None,
    )
    if position is None:
        return None, "no high-resolution tile was recorded to check a regenerated specimen against"
    first = contents.steps[position]
    specimen = generate_specimen(simulator.specimen, simulator.seed)
    with SimulatedMicroscope(simulator, specimen) as microscope:
        if microscope.describe().model_dump(mode="json") != contents.instrument:
            return None, f"the recorded stage differs from the regenerated specimen's ({unrecorded})"
        # The stage moves and drift before the first tile decide where it landed.
        before = [ScanRequest.model_validate(s.record["request"]) for s in contents.steps[:position]]
        microscope.resume_after(before, None)
        tile = microscope.acquire(ScanRequest.model_validate(first.record["request"]))
    same = tile.image.shape == first.image.shape and np.allclose(
        tile.image, first.image, rtol=1e-5, atol=1e-3
    )
    if not same:
        return None, f"the regenerated specimen does not reproduce the recorded tiles ({unrecorded})"
    return specimen, ""


def exposure_truths(
    session: Session, simulator: SimulatorConfig | None = None, specimen: Specimen | None = None
) -> dict[str, ExposureTruth]:
    """Where every tile of a session on the simulated microscope truly was (evaluation only).

    Parameters
    ----------
    session : Session
        A session that has run (or been rebuilt from its journal).
    simulator, specimen : optional
        The simulated instrument and specimen, when ``session.driver`` is not the simulated
        microscope itself (a replay): a fresh one replays the session's requests.

    Returns
    -------
    dict
        Request id to :class:`~simulator.drivers.ExposureTruth`; empty when the truth cannot be had.
    """
    requests = [step.request for step in session.steps]
    driver = session.driver
    if isinstance(driver, SimulatedMicroscope):
        return _truths_of(driver, requests)
    if simulator is None or specimen is None:
        return {}
    return replayed_exposure_truths(simulator, specimen, requests)


def replayed_exposure_truths(
    simulator: SimulatorConfig, specimen: Specimen, requests: list[ScanRequest]
) -> dict[str, ExposureTruth]:
    """True placements of ``requests`` on a fresh simulated microscope that replays them (no exposure).

    Parameters
    ----------
    simulator : SimulatorConfig
        The recorded instrument.
    specimen : Specimen
        Its specimen.
    requests : list of ScanRequest
        Every request of the session, in order (the survey too: its moves set the drift).

    Returns
    -------
    dict
        Request id to :class:`~simulator.drivers.ExposureTruth`.
    """
    with SimulatedMicroscope(simulator, specimen) as driver:
        driver.resume_after(requests, None)
        return _truths_of(driver, requests)


def _truths_of(driver: SimulatedMicroscope, requests: list[ScanRequest]) -> dict[str, ExposureTruth]:
    truths = {}
    for request in requests:
        try:
            truths[request.request_id] = driver.exposure_truth(request.request_id)
        except KeyError:
            continue
    return truths


def specimen_frame_nodes(session: Session, exposures: dict[str, ExposureTruth]) -> np.ndarray:
    """Graph node positions moved from the session's frame into the specimen's, ``(N, 2)`` nm.

    Each node is corrected by the placement error of the tile that first saw it (its true
    offset less the measured one), so a tile the registration placed a few cells off is
    still judged on the columns it really imaged.
    """
    graph = session.graph
    points = np.stack([graph.x_nm, graph.y_nm], 1)
    if not exposures or len(graph) == 0:
        return points
    placed = {p.tile_id for p in session.registrar.placements}
    correction = np.zeros((len(graph.tile_ids), 2))
    for index, tile_id in enumerate(graph.tile_ids):
        truth = exposures.get(tile_id)
        if truth is not None and tile_id in placed:
            # Where registration has the tile now: as measured, plus later moves of its part.
            correction[index] = np.asarray(truth.offset_nm) - session.registrar.current_offset_nm(tile_id)
    return points + correction[graph.first_tile]


def true_offsets(microscope: SimulatedMicroscope) -> Callable[[ScanRequest], tuple[float, float]]:
    """Where each tile of ``microscope`` truly landed, as :class:`DiscoveryTracker` wants it.

    Parameters
    ----------
    microscope : SimulatedMicroscope
        The simulated instrument a session runs on.

    Returns
    -------
    callable
        Request to the true offset ``(x, y)`` of its tile from the requested position, nm;
        ``(0, 0)`` for a request this instrument did not expose (steps rebuilt from a journal
        on resume).
    """

    def offset(request: ScanRequest) -> tuple[float, float]:
        try:
            return microscope.exposure_truth(request.request_id).offset_nm
        except KeyError:
            return (0.0, 0.0)

    return offset


STRICT_MARGIN_NM = 1.0
"""Strict scoring: how far inside an acquired tile a column must lie to count as imaged, nm."""

STRICT_SHARE = 0.5
"""Strict scoring: share of a feature's columns (or vacant sites) that must be imaged."""


@dataclass
class DiscoveryTracker:
    """Follows which planted features a session has imaged, step by step (an ``on_step`` callback).

    Two scorings, reported side by side:

    *lenient* (``imaged``)
        A feature counts once the candidate tile holding the request's centre holds any of its
        columns (or vacant sites), edge included, each column carrying one feature (the
        specimen's label priority).
    *strict* (``strict_imaged``)
        A feature counts once at least :data:`STRICT_SHARE` of its columns and vacant sites lie
        at least :data:`STRICT_MARGIN_NM` inside the tiles acquired, placed where they truly
        landed (``true_offset``); a column may belong to several features
        (:meth:`~simulator.specimen.Specimen.feature_members`), and a feature with no column
        left is not counted as planted.

    Parameters
    ----------
    specimen : Specimen
        Ground truth.
    grid : CandidateGrid
        The session's candidate tiles.
    true_offset : callable, optional
        Maps a request to the true offset ``(x, y)`` of its tile from the requested position,
        nm (placement error and drift, :class:`~simulator.drivers.ExposureTruth`); None takes
        tiles where they were requested.
    """

    specimen: Specimen
    grid: CandidateGrid
    true_offset: Callable[[ScanRequest], tuple[float, float]] | None = None
    candidates: list[set[int]] = field(init=False)
    imaged: set[int] = field(default_factory=set)
    strict_imaged: set[int] = field(default_factory=set)
    curve: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.candidates = feature_candidates(self.specimen, self.grid)
        members = self.specimen.feature_members()
        self._member_x = np.asarray(members["x_nm"], dtype=np.float64)
        self._member_y = np.asarray(members["y_nm"], dtype=np.float64)
        self._member_feature = np.asarray(members["feature_id"], dtype=np.int64)
        self._member_count = np.bincount(self._member_feature, minlength=len(self.specimen.features))
        self._covered = np.zeros(self._member_x.size, dtype=bool)

    @property
    def total(self) -> int:
        """Number of planted features (lenient scoring: every feature the specimen lists)."""
        return len(self.specimen.features)

    @property
    def strict_total(self) -> int:
        """Number of planted features that kept at least one column or vacant site (strict scoring)."""
        return int(np.count_nonzero(self._member_count))

    def __call__(self, record: StepRecord) -> None:
        """Update after one session step."""
        if record.kind == "survey":
            return
        x_min, x_max, y_min, y_max = record.request.extent_nm
        centre = self.grid.index_of(0.5 * (x_min + x_max), 0.5 * (y_min + y_max))
        if centre >= 0:
            self.imaged |= self.candidates[centre]
        dx, dy = self.true_offset(record.request) if self.true_offset is not None else (0.0, 0.0)
        margin = STRICT_MARGIN_NM
        inside = (
            (self._member_x >= x_min + dx + margin)
            & (self._member_x <= x_max + dx - margin)
            & (self._member_y >= y_min + dy + margin)
            & (self._member_y <= y_max + dy - margin)
        )
        self._covered |= inside
        covered = np.bincount(self._member_feature[self._covered], minlength=self._member_count.size)
        count = self._member_count
        share = np.divide(covered, count, out=np.zeros(covered.size), where=count > 0)
        self.strict_imaged = {int(f) for f in np.flatnonzero(share >= STRICT_SHARE)}
        self.curve.append(
            {
                "tiles": float(len(self.curve) + 1),
                "mean_dose_e_per_a2": float(record.extra.get("mean_dose_e_per_a2", np.nan)),
                "imaged_fraction": len(self.imaged) / self.total if self.total else float("nan"),
                "strict_imaged_fraction": (
                    len(self.strict_imaged) / self.strict_total if self.strict_total else float("nan")
                ),
            }
        )


def detected_features(
    session: Session, specimen: Specimen, exposures: dict[str, ExposureTruth] | None = None
) -> set[int]:
    """Features with at least one node scoring above the session's detection threshold.

    Parameters
    ----------
    session : Session
        A session that has run.
    specimen : Specimen
        Ground truth.
    exposures : dict, optional
        True placements (:func:`exposure_truths`); by default those of ``session.driver``
        when it is the simulated microscope. Nodes are matched to the specimen through them.

    Returns
    -------
    set of int
        Detected feature ids.
    """
    if len(session.graph) == 0:
        return set()
    scores = session.node_scores()
    exposures = exposure_truths(session) if exposures is None else exposures
    # One match gives both the label and the feature of every node.
    match = match_columns(
        specimen_frame_nodes(session, exposures),
        np.stack([specimen.x_nm, specimen.y_nm], 1),
        0.25 * specimen.config.lattice_nm,
    )
    labels = np.full(len(session.graph), -1)
    feature = np.full(len(session.graph), -1)
    labels[match.found] = specimen.label[match.truth]
    feature[match.found] = specimen.feature_id[match.truth]
    hot = (scores > session.config.detection_threshold) & (labels > 0) & session.graph.interior
    return {int(f) for f in np.unique(feature[hot]) if f >= 0}


def session_report_figure(
    session: Session, tracker: DiscoveryTracker | None = None, title: str | None = None
) -> Figure:
    """A 2 x 3 figure: survey, tiles and walls, anomaly map, survey prior, surrogate mean and std, discovery.

    It draws the session's state as it is when called, so a replay calls it after any step
    for the figure of the session at that step. Every colour bar says its quantity and unit;
    the anomaly scale is clipped at the 99th percentile, kept between one and three detection
    thresholds so one hot cluster does not black out the normal lattice; panels with nothing to
    show say why.

    Parameters
    ----------
    session : Session
        A session that has run.
    tracker : DiscoveryTracker, optional
        Ground-truth discovery curve (simulated specimens); without it the last panel says so.
    title : str, optional
        Figure title (default: policy and seed).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (close it with ``plt.close`` when done).
    """
    heading = title or f"Session: {session.config.policy} policy, seed {session.config.seed}"
    (x0, x1), (y0, y1) = session.description.stage_x_nm, session.description.stage_y_nm
    extent = (x0, x1, y1, y0)
    figure, axes = plt.subplots(2, 3, figsize=(18, 11), constrained_layout=True)
    survey = session.survey_tiles[0] if session.survey_tiles else None
    steps = [step for step in session.steps if step.kind != "survey"]
    centres = np.array([[step.request.x_nm, step.request.y_nm] for step in steps]).reshape(-1, 2)
    survey_extent = None
    if survey is not None:
        sx0, sx1, sy0, sy1 = survey.extent_nm
        survey_extent = (sx0, sx1, sy1, sy0)

    ax = axes[0, 0]
    if survey is not None:
        shown = ax.imshow(survey.image, cmap="gray", extent=survey_extent)
        labelled_colorbar(figure, shown, ax, "survey HAADF intensity", "counts")
    width, height = session.grid.tile_size_nm
    colours = ["#ffb000" if step.kind == "start" else "#00c0ff" for step in steps]
    for step, colour in zip(steps, colours, strict=True):
        corner = (step.request.x_nm - width / 2, step.request.y_nm - height / 2)
        ax.add_patch(plt.Rectangle(corner, width, height, fill=False, edgecolor=colour, linewidth=0.8))
    if len(centres) > 1:
        ax.plot(centres[:, 0], centres[:, 1], color="#00c0ff", linewidth=0.4, alpha=0.4)
    tile_numbers(ax, centres[:, 0], centres[:, 1], colours, fontsize=7 if len(steps) <= 60 else 5)
    walls = session.policy.walls if session.policy is not None else []
    for wall in walls:
        reach = wall.half_length_nm * np.asarray(wall.direction)
        ends = np.asarray(wall.point_nm) + np.outer([-1.0, 1.0], reach)
        ax.plot(ends[:, 0], ends[:, 1], color="#ff40ff", linewidth=2.0)
    wall_note = f"; magenta: {len(walls)} walls" if walls else ""
    ax.set_title(f"Survey and {len(steps)} tiles in order (orange: start{wall_note})")

    ax = axes[0, 1]
    scores = session.node_scores()
    if scores.size and np.isfinite(scores).any():
        if survey is not None:
            ax.imshow(survey.image, cmap="gray", extent=survey_extent, alpha=0.5)
        threshold = session.config.detection_threshold
        # Columns on the rim of the scanned area miss neighbours and score high for it; they are
        # drawn grey, as the detection ignores them.
        interior = session.graph.interior & np.isfinite(scores)
        rim = ~session.graph.interior
        ax.scatter(
            session.graph.x_nm[rim], session.graph.y_nm[rim], c="0.55", s=0.2, linewidths=0, rasterized=True
        )
        norm, clipped = clipped_norm(scores[interior], at_least=threshold, at_most=3 * threshold)
        order = np.flatnonzero(interior)[np.argsort(scores[interior])]
        points = ax.scatter(
            session.graph.x_nm[order],
            session.graph.y_nm[order],
            c=scores[order],
            s=0.2,
            cmap="inferno",
            norm=norm,
            rasterized=True,
        )
        bar = labelled_colorbar(figure, points, ax, "node anomaly score", SCORE_UNIT, extend=clipped)
        bar.ax.axhline(threshold, color="#00c0ff", linewidth=1.5)
        ax.set_title(f"Anomaly scores (blue line: threshold {threshold:g}; grey: rim of the scan)")
    else:
        empty_panel(ax, "Anomaly scores", "no column scored yet (the anomaly model has not been fitted)")

    mean = variance = prior = None
    policy = session.policy
    guided = isinstance(policy, GuidedPolicy)
    if guided:
        prior = policy.survey_prior
        if len(policy.surrogate):
            mean, variance = policy.posterior()
    if not guided:
        no_model = f"the {session.config.policy} policy keeps no surrogate: it does not predict tile interest"
    elif not policy.config.use_surrogate:
        no_model = "the surrogate is switched off (acquisition.use_surrogate: false)"
    else:
        no_model = "no tile scored yet"
    model_unit = policy.model_unit if guided else SCORE_UNIT
    rows, cols = session.grid.grid_shape
    panels = (
        (axes[0, 2], prior, "Survey prior", "fringe distortion and loss", "z", "cividis",
         "no survey prior: only the guided policy reads the survey"),
        (axes[1, 0], mean, "Surrogate mean: predicted tile interest", "tile interest", model_unit,
         "viridis", no_model),
        (axes[1, 1], None if variance is None else np.sqrt(variance), "Surrogate uncertainty",
         "std of tile interest", model_unit, "magma", no_model),
    )  # fmt: skip
    for ax, values, panel_title, quantity, unit, cmap, empty in panels:
        if values is None:
            empty_panel(ax, panel_title, empty)
            continue
        norm, clipped = clipped_norm(values, floor=None)
        image = ax.imshow(
            values.reshape(rows, cols), extent=extent, cmap=cmap, norm=norm, interpolation="nearest"
        )
        labelled_colorbar(figure, image, ax, quantity, unit, extend=clipped)
        ax.plot(centres[:, 0], centres[:, 1], "w.", markersize=2)
        ax.set_title(f"{panel_title} (white dots: tiles taken)")
    if guided and policy.walls and prior is not None:
        # Where the policy expects the walls it has seen to continue (one wall-reach beyond each).
        reach = policy.config.wall_reach_tiles * max(session.grid.tile_size_nm)
        for wall in policy.walls:
            span = (wall.half_length_nm + reach) * np.asarray(wall.direction)
            ends = np.asarray(wall.point_nm) + np.outer([-1.0, 1.0], span)
            axes[0, 2].plot(ends[:, 0], ends[:, 1], "--", color="#ff40ff", linewidth=0.7)
        axes[0, 2].set_title("Survey prior (dashed: walls followed)")
    ax = axes[1, 2]
    if tracker is None:
        empty_panel(ax, "Discovery", "no ground truth (a real specimen): discovery not measured")
    else:
        tiles = [point["tiles"] for point in tracker.curve]
        ax.plot(tiles, [point["imaged_fraction"] for point in tracker.curve], label=session.config.policy)
        ax.plot(
            tiles,
            [point["strict_imaged_fraction"] for point in tracker.curve],
            ":",
            color="C0",
            label=f"{session.config.policy}, strict (half of a feature 1 nm inside tiles)",
        )
        ax.plot(
            tiles, np.array(tiles) / len(session.grid), "--", color="grey", label="area scanned (raster pace)"
        )
        ax.set_xlabel("high-resolution tiles")
        ax.set_ylabel("fraction of planted features imaged")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left")
        ax.set_title(
            f"Discovery: {len(tracker.imaged)} of {tracker.total} planted features imaged "
            f"({len(tracker.strict_imaged)} of {tracker.strict_total} strict)"
        )
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1]):
        if not ax.get_xticks().size:
            continue  # an empty panel keeps no axes
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_xlabel("x (nm)")
        ax.set_ylabel("y (nm)")
    figure.suptitle(heading)
    return figure


def write_session_report(
    session: Session,
    path: str | Path,
    tracker: DiscoveryTracker | None = None,
    title: str | None = None,
    dpi: int = 90,
) -> Path:
    """Write :func:`session_report_figure` as a PNG.

    Parameters
    ----------
    session : Session
        A session that has run.
    path : str or pathlib.Path
        PNG to write.
    tracker : DiscoveryTracker, optional
        Ground-truth discovery curve (simulated specimens).
    title : str, optional
        Figure title (default: policy and seed).
    dpi : int
        Resolution of the PNG, dots per inch.

    Returns
    -------
    pathlib.Path
        The PNG written.
    """
    path = Path(path)
    figure = session_report_figure(session, tracker, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def session_summary_table(summary: dict[str, Any]) -> str:
    """The session summary as aligned text lines."""
    lines = [
        f"policy          {summary['policy']} (seed {summary['seed']})",
        f"tiles           {summary['tiles']} (+ {summary['survey_tiles']} survey)",
        f"nodes           {summary['nodes']:,}",
        f"dose spent      {summary['mean_dose_e_per_a2']:.1f} e-/A^2 averaged over the stage",
        f"instrument time {summary['instrument_time_s']:.1f} s",
        f"stopped because {summary['stop_reason']}",
    ]
    if summary.get("instrument_dead_time_fraction") is not None:
        loop = "pipelined" if summary.get("lookahead_tiles") else "sequential"
        lines.append(
            f"instrument idle {summary['instrument_dead_time_fraction']:.1%} of its time, waiting for the "
            f"agent ({summary['instrument_dead_time_s']:.1f} s; {loop} loop)"
        )
    if summary.get("wall_segments"):
        lines.append(f"domain walls    seen in {summary['wall_segments']} tiles and followed")
    if "imaged_features" in summary:
        lines.append(f"features imaged {summary['imaged_features']} of {summary['planted_features']}")
        lines.append(f"features found  {summary['detected_features']} scored above the detection threshold")
    if "strict_imaged_features" in summary:
        lines.append(
            f"strictly imaged {summary['strict_imaged_features']} of {summary['strict_planted_features']} "
            "(half of a feature's columns 1 nm inside tiles)"
        )
    timings = summary.get("median_timings_s", {})
    if timings:
        latency = sum(v for k, v in timings.items() if k in DECISION_STAGES)
        lines.append(
            "median seconds  "
            + ", ".join(f"{k} {v:.3f}" for k, v in timings.items())
            + f"; tile in -> next request out {latency:.3f}"
        )
    return "\n".join(lines)
