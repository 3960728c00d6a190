"""Domain walls from B-column shifts: synthetic fields with known walls, and simulated tiles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent.columns import find_columns
from agent.domains import WallConfig, WallSegment, find_wall, smooth_displacement, wall_in_tile
from agent.driver import ScanRequest
from simulator.config import SimulatorConfig
from simulator.drivers import SimulatedMicroscope
from simulator.specimen import LABEL_CODE, generate_specimen
from tests.conftest import specimen_with

LATTICE_NM = 0.396
POLAR_PM = 25.0 / math.sqrt(2)  # per component of the projected <111> shift


def b_lattice(size_nm: float = 10.0) -> np.ndarray:
    """B-column positions of a square lattice filling a ``size_nm`` square tile."""
    cells = int(size_nm / LATTICE_NM)
    ij = np.stack(np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij"), -1).reshape(-1, 2)
    return (ij + 0.5) * LATTICE_NM


def two_domains(
    positions: np.ndarray,
    point: tuple[float, float],
    angle_deg: float,
    rotation: int,
    noise_pm: float,
    seed: int,
) -> np.ndarray:
    """Shifts of two polar domains meeting on a straight wall, plus per-column noise (pm)."""
    theta = math.radians(angle_deg)
    normal = np.array([-math.sin(theta), math.cos(theta)])
    side = (positions - np.asarray(point)) @ normal > 0
    first = np.array([POLAR_PM, POLAR_PM])
    second = np.array([POLAR_PM, -POLAR_PM]) if rotation == 90 else -first
    shifts = np.where(side[:, None], second, first)
    return shifts + np.random.default_rng(seed).normal(0.0, noise_pm, shifts.shape)


def line_distance(wall: WallSegment, point: tuple[float, float]) -> float:
    return float(abs(wall.offsets_nm(np.array([point]))[1][0]))


def angle_error_deg(measured: float, truth: float) -> float:
    difference = (measured - truth) % 180.0
    return min(difference, 180.0 - difference)


@pytest.mark.parametrize(
    ("point", "angle_deg", "rotation"),
    [((5.0, 5.0), 45.0, 90), ((3.0, 6.0), 0.0, 90), ((6.5, 5.0), 90.0, 180), ((4.0, 4.0), 120.0, 180)],
)
def test_a_straight_wall_is_found_where_it_is(
    point: tuple[float, float], angle_deg: float, rotation: int
) -> None:
    positions = b_lattice()
    # 8 pm per column is about the scatter of B shifts at the session's dose.
    shifts = two_domains(positions, point, angle_deg, rotation, noise_pm=8.0, seed=1)
    wall = find_wall(positions, shifts)
    assert wall is not None
    assert line_distance(wall, point) < 0.3
    assert angle_error_deg(wall.angle_deg, angle_deg % 180.0) < 3.0
    assert wall.rotation_deg == pytest.approx(rotation, abs=15.0)
    assert wall.separation_pm == pytest.approx(
        2 * POLAR_PM * (1 if rotation == 90 else math.sqrt(2)), rel=0.25
    )
    assert wall.residual_nm < 0.5 and wall.half_length_nm > 3.0
    assert math.hypot(*wall.direction) == pytest.approx(1.0)
    # The second polarization is that of the side the normal points to.
    clean = two_domains(positions, point, angle_deg, rotation, noise_pm=0.0, seed=1)
    across = wall.offsets_nm(positions)[1]
    for side, mask in ((0, across < -1.0), (1, across > 1.0)):
        np.testing.assert_allclose(wall.polarization_pm[side], clean[mask].mean(axis=0), atol=4.0)


@pytest.mark.parametrize("seed", range(5))
def test_one_domain_with_noise_has_no_wall(seed: int) -> None:
    positions = b_lattice()
    shifts = np.random.default_rng(seed).normal(0.0, 8.0, positions.shape) + POLAR_PM
    assert find_wall(positions, shifts) is None


def test_a_curved_phase_boundary_and_crossing_walls_are_not_walls() -> None:
    positions = b_lattice()
    rng = np.random.default_rng(2)
    # A round non-polar patch in a polar domain: two populations, but no straight boundary.
    inside = np.hypot(*(positions - 5.0).T) < 3.0
    patch = np.where(inside[:, None], 0.0, POLAR_PM) + rng.normal(0.0, 4.0, positions.shape)
    assert find_wall(positions, patch) is None
    # Two walls crossing: four quadrants, the boundary is a cross, not a line.
    quadrant = (positions[:, 0] > 5.0).astype(int) + 2 * (positions[:, 1] > 5.0)
    directions = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]]) * POLAR_PM
    crossing = directions[quadrant] + rng.normal(0.0, 4.0, positions.shape)
    assert find_wall(positions, crossing) is None


def test_thresholds_come_from_the_config() -> None:
    positions = b_lattice()
    shifts = two_domains(positions, (5.0, 5.0), 45.0, 90, noise_pm=8.0, seed=3)
    assert find_wall(positions, shifts) is not None
    assert find_wall(positions, shifts, WallConfig(min_separation_pm=60.0)) is None
    assert find_wall(positions, shifts, WallConfig(min_contrast=50.0)) is None
    assert find_wall(positions, shifts, WallConfig(max_residual_nm=0.01)) is None
    assert find_wall(positions, shifts, WallConfig(min_boundary_columns=500)) is None
    # A wall 1.6 nm from the tile edge leaves 16 % of the columns on its far side.
    edge = two_domains(positions, (1.6, 5.0), 90.0, 90, noise_pm=8.0, seed=3)
    assert find_wall(positions, edge) is not None
    assert find_wall(positions, edge, WallConfig(min_side_fraction=0.2)) is None
    small = b_lattice(3.0)  # 49 columns, fewer than min_columns
    small_shifts = two_domains(small, (1.5, 1.5), 45.0, 90, noise_pm=4.0, seed=3)
    assert find_wall(small, small_shifts) is None
    assert find_wall(small, small_shifts, WallConfig(min_columns=20, min_boundary_columns=3)) is not None


def test_non_finite_shifts_are_ignored_and_mismatched_inputs_refused() -> None:
    positions = b_lattice()
    shifts = two_domains(positions, (5.0, 5.0), 0.0, 180, noise_pm=5.0, seed=4)
    shifts[::17] = np.nan
    wall = find_wall(positions, shifts)
    assert wall is not None and line_distance(wall, (5.0, 5.0)) < 0.3
    with pytest.raises(ValueError, match="positions but"):
        find_wall(positions, shifts[:-1])
    with pytest.raises(ValueError, match=r"displacement_pm must have shape \(N, 2\), got \(625, 3\)"):
        find_wall(positions, np.zeros((625, 3)))


def test_a_wall_segment_survives_a_json_round_trip() -> None:
    positions = b_lattice()
    wall = find_wall(positions, two_domains(positions, (5.0, 5.0), 30.0, 90, noise_pm=5.0, seed=5))
    assert wall is not None
    assert WallSegment.from_record(json.loads(json.dumps(wall.to_record()))) == wall
    # The sign convention: the direction's x component is never negative.
    assert wall.direction[0] >= 0


def test_smoothing_averages_within_the_radius() -> None:
    positions = np.array([[0.0, 0.0], [0.4, 0.0], [5.0, 0.0]])
    shifts = np.array([[10.0, 0.0], [20.0, 0.0], [0.0, 30.0]])
    np.testing.assert_allclose(smooth_displacement(positions, shifts, 1.0), [[15, 0], [15, 0], [0, 30]])
    np.testing.assert_allclose(smooth_displacement(positions[:1], shifts[:1], 1.0), shifts[:1])
    # A radius holding far more than 64 points is honoured exactly (brute force).
    dense = b_lattice(6.0)
    values = np.random.default_rng(0).normal(size=dense.shape)
    inside = np.hypot(*(dense[:, None, :] - dense[None, :, :]).transpose(2, 0, 1)) <= 2.5
    expected = (inside[:, :, None] * values[None, :, :]).sum(axis=1) / inside.sum(axis=1)[:, None]
    np.testing.assert_allclose(smooth_displacement(dense, values, 2.5), expected, atol=1e-12)


def test_a_small_smoothing_radius_still_finds_the_wall() -> None:
    positions = b_lattice()
    shifts = two_domains(positions, (5.0, 5.0), 0.0, 180, noise_pm=2.0, seed=6)
    wall = find_wall(positions, shifts, WallConfig(smoothing_radius_nm=0.5))
    assert wall is not None and line_distance(wall, (5.0, 5.0)) < 0.3


def test_the_wall_in_a_simulated_tile_lies_on_the_planted_wall() -> None:
    specimen_config = specimen_with(
        size_nm=(30.0, 30.0), domain_walls=1, edge_margin_nm=8.0, wall_meander_nm=0.5
    )
    # The found wall is compared with the planted one in stage coordinates: an ideal stage.
    config = SimulatorConfig(seed=5, specimen=specimen_config).ideal_instrument()
    specimen = generate_specimen(specimen_config, config.seed)
    on_wall = specimen.label == LABEL_CODE["domain_wall"]
    wall_points = np.stack([specimen.x_nm[on_wall], specimen.y_nm[on_wall]], 1)
    normal = np.asarray(specimen.features[0].params["normal"])
    # A tile centred on the planted wall, and one 12 nm to the side of it.
    centre = wall_points[np.argmin(np.hypot(*(wall_points - 15.0).T))]
    away = np.clip(centre + 12.0 * normal, 5.2, 24.8)
    found = []
    with SimulatedMicroscope(config, specimen) as microscope:
        for k, (x, y) in enumerate((centre, away)):
            request = ScanRequest(
                x_nm=float(x), y_nm=float(y), pixel_size_nm=0.02, shape=(512, 512), dwell_us=8.0,
                request_id=f"tile-{k}",
            )  # fmt: skip
            found.append(wall_in_tile(find_columns(microscope.acquire(request))))
    wall, none = found
    assert none is None
    assert wall is not None
    truth_angle = math.degrees(math.atan2(-normal[0], normal[1])) % 180.0
    assert angle_error_deg(wall.angle_deg, truth_angle) < 5.0
    # Every planted wall column in the tile lies close to the found line.
    x_min, x_max, y_min, y_max = (centre[0] - 4, centre[0] + 4, centre[1] - 4, centre[1] + 4)
    inside = (wall_points[:, 0] > x_min) & (wall_points[:, 0] < x_max)
    inside &= (wall_points[:, 1] > y_min) & (wall_points[:, 1] < y_max)
    assert np.abs(wall.offsets_nm(wall_points[inside])[1]).max() < 1.0
    assert wall.rotation_deg == pytest.approx(90.0, abs=20.0)  # the first planted wall is a 71° wall
