"""Scoring found columns against the synthetic specimen's ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from agent.columns import Columns
from simulator.specimen import SITE_A, SITE_B, Specimen


@dataclass(frozen=True)
class ColumnMatch:
    """One-to-one pairing of found columns with true columns.

    Parameters
    ----------
    found : numpy.ndarray
        Indices into the found columns of the matched pairs.
    truth : numpy.ndarray
        Indices into the true columns of the matched pairs.
    distance : numpy.ndarray
        Distance of each pair, in the units of the positions given.
    n_found, n_truth : int
        How many columns were found and how many true columns could have been.
    """

    found: np.ndarray
    truth: np.ndarray
    distance: np.ndarray
    n_found: int
    n_truth: int

    @property
    def recall(self) -> float:
        """Fraction of true columns that were found."""
        return self.truth.size / self.n_truth if self.n_truth else float("nan")

    @property
    def precision(self) -> float:
        """Fraction of found columns that are true columns."""
        return self.found.size / self.n_found if self.n_found else float("nan")

    def rms(self, mask: np.ndarray | None = None) -> float:
        """Root-mean-square distance of the matched pairs (optionally of a subset)."""
        distance = self.distance if mask is None else self.distance[mask]
        return float(np.sqrt(np.mean(distance**2))) if distance.size else float("nan")


def match_columns(found_xy: np.ndarray, true_xy: np.ndarray, tolerance: float) -> ColumnMatch:
    """Pair found and true columns one to one, closest pairs first, within ``tolerance``.

    Parameters
    ----------
    found_xy, true_xy : numpy.ndarray
        ``(N, 2)`` positions in the same units.
    tolerance : float
        Largest distance of a match (a quarter of the A-A spacing in the benchmarks).

    Returns
    -------
    ColumnMatch
        The pairs; a true column claimed twice keeps its closer partner.
    """
    n_found, n_truth = len(found_xy), len(true_xy)
    empty = np.zeros(0, dtype=np.int64)
    if n_found == 0 or n_truth == 0:
        return ColumnMatch(empty, empty, np.zeros(0), n_found, n_truth)
    distance, nearest = cKDTree(true_xy).query(found_xy, distance_upper_bound=tolerance)
    close = np.flatnonzero(np.isfinite(distance))
    order = close[np.argsort(distance[close], kind="stable")]
    _, first = np.unique(nearest[order], return_index=True)
    found = np.sort(order[first])
    return ColumnMatch(found, nearest[found], distance[found], n_found, n_truth)


def true_columns_in(
    specimen: Specimen, extent_nm: tuple[float, float, float, float], inset_nm: float = 0.0
) -> np.ndarray:
    """Indices of the specimen's lattice (A and B) columns inside a stage rectangle.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    extent_nm : tuple of float
        ``(x_min, x_max, y_min, y_max)``, nanometres.
    inset_nm : float
        Shrink the rectangle by this much on every side (finders skip the tile border).

    Returns
    -------
    numpy.ndarray
        Column indices.
    """
    x_min, x_max, y_min, y_max = extent_nm
    inside = specimen.columns_in(x_min + inset_nm, x_max - inset_nm, y_min + inset_nm, y_max - inset_nm)
    return inside[np.isin(specimen.site[inside], (SITE_A, SITE_B))]


def score_columns(
    columns: Columns,
    specimen: Specimen,
    extent_nm: tuple[float, float, float, float],
    inset_nm: float = 0.0,
) -> dict[str, float]:
    """Recall, precision, RMS error (pixels) and A/B accuracy of found columns in one tile.

    True columns within ``inset_nm`` of the tile edge count neither as missed nor,
    when found, as false.

    Parameters
    ----------
    columns : Columns
        What a finder returned for the tile.
    specimen : Specimen
        Ground truth.
    extent_nm : tuple of float
        The tile's ``(x_min, x_max, y_min, y_max)``, nanometres.
    inset_nm : float
        Border excluded from scoring, nanometres.

    Returns
    -------
    dict
        ``recall``, ``precision``, ``rms_px``, ``rms_a_px``, ``rms_b_px``, ``species_accuracy``,
        ``found`` and ``true`` counts.
    """
    spacing = specimen.config.lattice_nm
    truth = true_columns_in(specimen, extent_nm, inset_nm)
    # Found columns may match true columns just outside the scored area: match against all.
    everywhere = true_columns_in(specimen, extent_nm, 0.0)
    true_xy = np.stack([specimen.x_nm[everywhere], specimen.y_nm[everywhere]], 1)
    found_xy = np.stack([columns.x_nm, columns.y_nm], 1)
    match = match_columns(found_xy, true_xy, 0.25 * spacing)
    x_min, x_max, y_min, y_max = extent_nm
    in_scored_area = (
        (columns.x_nm >= x_min + inset_nm) & (columns.x_nm <= x_max - inset_nm)
        & (columns.y_nm >= y_min + inset_nm) & (columns.y_nm <= y_max - inset_nm)
    )  # fmt: skip
    matched_found = np.zeros(len(columns), dtype=bool)
    matched_found[match.found] = True
    counted = np.isin(everywhere[match.truth], truth)
    site = specimen.site[everywhere[match.truth[counted]]]
    distance_px = match.distance[counted] / columns.pixel_size_nm
    true_species = np.where(site == SITE_A, 0, 1)
    n_found = int(np.count_nonzero(in_scored_area))

    def rms(mask: np.ndarray) -> float:
        return float(np.sqrt(np.mean(distance_px[mask] ** 2))) if mask.any() else float("nan")

    return {
        "recall": float(counted.sum() / truth.size) if truth.size else float("nan"),
        "precision": float(np.count_nonzero(matched_found & in_scored_area) / n_found)
        if n_found
        else float("nan"),
        "rms_px": rms(np.ones(site.size, dtype=bool)),
        "rms_a_px": rms(site == SITE_A),
        "rms_b_px": rms(site == SITE_B),
        "species_accuracy": float(np.mean(columns.species[match.found[counted]] == true_species))
        if site.size
        else float("nan"),
        "found": n_found,
        "true": int(truth.size),
    }
