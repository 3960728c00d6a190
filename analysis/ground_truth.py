"""Scoring found columns against ground truth: the synthetic specimen, or any table of true columns.

:func:`score_columns` scores one axis-aligned tile against the specimen in stage
coordinates. :func:`score_sites` scores in image pixels against a :class:`SiteTruth`
(from the specimen in a rotated frame, :func:`specimen_site_truth`, or from a
multislice fixture): detection per sublattice, species of A and B columns, pure-O
columns taken for B, Sm-substituted A columns flagged abnormal, and vacancy sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from agent.columns import SPECIES_A, SPECIES_B, SPECIES_O, Columns
from simulator.specimen import LABELS, SITE_A, SITE_B, SITE_O, Specimen


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


def nearest_planted_feature(
    x_nm: np.ndarray, y_nm: np.ndarray, specimen: Specimen
) -> tuple[np.ndarray, list[str]]:
    """Distance from each point to the nearest column that carries a planted-feature label.

    Parameters
    ----------
    x_nm, y_nm : numpy.ndarray
        Stage positions, nanometres (for example the hot spots of ``analyze``).
    specimen : Specimen
        The specimen; every label but ``normal`` is a planted feature (a vacancy's label sits on
        the columns around the empty site).

    Returns
    -------
    distance_nm : numpy.ndarray
        Distance to the nearest labelled column, nanometres (inf when the specimen has none).
    labels : list of str
        That column's label ("" when there is none).

    Examples
    --------
    >>> from simulator.config import SpecimenConfig
    >>> from simulator.specimen import generate_specimen
    >>> specimen = generate_specimen(SpecimenConfig(size_nm=(20.0, 20.0)), seed=0)
    >>> labelled = np.flatnonzero(specimen.label > 0)[0]
    >>> distance, labels = nearest_planted_feature(
    ...     specimen.x_nm[[labelled]], specimen.y_nm[[labelled]], specimen
    ... )
    >>> float(distance[0]), labels[0] == LABELS[specimen.label[labelled]]
    (0.0, True)
    """
    x_nm, y_nm = np.atleast_1d(np.asarray(x_nm, dtype=float)), np.atleast_1d(np.asarray(y_nm, dtype=float))
    planted = np.flatnonzero(specimen.label > 0)
    if planted.size == 0:
        return np.full(x_nm.size, np.inf), [""] * x_nm.size
    tree = cKDTree(np.stack([specimen.x_nm[planted], specimen.y_nm[planted]], 1))
    distance, nearest = tree.query(np.stack([x_nm, y_nm], 1))
    return distance, [LABELS[specimen.label[planted[i]]] for i in nearest]


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
    # Pure-O columns are reported as such and are not lattice columns to score: not false either.
    in_scored_area &= columns.species != SPECIES_O
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


@dataclass(frozen=True)
class SiteTruth:
    """True columns and vacant sites of one image, in its pixel coordinates.

    Parameters
    ----------
    x_px, y_px : numpy.ndarray
        Positions, pixels (x along columns, y along rows).
    species : numpy.ndarray
        Site role, :data:`~agent.columns.SPECIES_A`, ``SPECIES_B`` or ``SPECIES_O``; other
        values (amorphous atoms) are ignored.
    sm_fraction : numpy.ndarray
        Fraction of the A column's atoms that are the substituent (0 elsewhere).
    vacant : numpy.ndarray
        True for a site with no column (not in the image).
    """

    x_px: np.ndarray
    y_px: np.ndarray
    species: np.ndarray
    sm_fraction: np.ndarray
    vacant: np.ndarray


def specimen_site_truth(
    specimen: Specimen,
    centre_nm: tuple[float, float],
    shape: tuple[int, int],
    pixel_size_nm: float,
    rotation_rad: float = 0.0,
) -> SiteTruth:
    """The specimen's columns and vacancies seen in a (rotated) frame, in that frame's pixels.

    The frame convention is :func:`simulator.imaging.render_rotated_expected_counts`: the
    column axis along ``(cos r, sin r)`` on the stage, centre at ``centre_nm``.
    """
    rows, cols = shape
    reach = 0.5 * float(np.hypot(rows, cols)) * pixel_size_nm + specimen.config.lattice_nm
    cx, cy = centre_nm
    index = specimen.columns_in(cx - reach, cx + reach, cy - reach, cy + reach)
    vac = specimen.vacancies
    x = np.concatenate([specimen.x_nm[index], vac["x_nm"]]) - cx
    y = np.concatenate([specimen.y_nm[index], vac["y_nm"]]) - cy
    cos_r, sin_r = float(np.cos(rotation_rad)), float(np.sin(rotation_rad))
    # Amorphous atoms stay in the truth with role -1: a column found on one is neither right nor false.
    code = {SITE_A: SPECIES_A, SITE_B: SPECIES_B, SITE_O: SPECIES_O}
    site = np.concatenate([specimen.site[index], vac["site"]])
    return SiteTruth(
        x_px=(cos_r * x + sin_r * y) / pixel_size_nm + 0.5 * (cols - 1),
        y_px=(-sin_r * x + cos_r * y) / pixel_size_nm + 0.5 * (rows - 1),
        species=np.array([code.get(int(value), -1) for value in site], dtype=np.int8),
        sm_fraction=np.concatenate([specimen.sm_fraction[index], np.zeros(len(vac["x_nm"]))]),
        vacant=np.concatenate([np.zeros(index.size, bool), np.ones(len(vac["x_nm"]), bool)]),
    )


SITE_COUNTS = (
    "a_true", "a_found", "a_as_a", "b_true", "b_found", "b_as_b", "o_true", "o_found", "o_as_b",
    "cation_found", "cation_false", "substituted", "substituted_flagged", "normal_a", "normal_a_flagged",
    "a_vacant", "a_vacant_found", "b_vacant", "b_vacant_found", "sites", "false_vacancies",
)  # fmt: skip
"""Counts returned by :func:`score_sites` (pooled over tiles by adding)."""


def score_sites(
    columns: Columns,
    truth: SiteTruth,
    spacing_px: float,
    border_px: float,
    shape: tuple[int, int],
    *,
    substituted_sm: float = 0.45,
    normal_sm: float = 0.25,
    vacancy_confidence: float = 0.5,
) -> dict[str, Any]:
    """Detection, species, abnormal flags and vacancy sites of one image against the truth.

    Only what lies more than ``border_px`` inside the image is scored (the finder drops its
    border). A match lies within a quarter of the A-A spacing.

    Parameters
    ----------
    columns : Columns
        What the finder returned (pixel positions are used).
    truth : SiteTruth
        True columns and vacant sites in the same pixels.
    spacing_px : float
        A-A spacing, pixels.
    border_px : float
        Scored area inset, pixels.
    shape : tuple of int
        Image ``(rows, cols)``.
    substituted_sm, normal_sm : float
        An A column with at least ``substituted_sm`` substituent must be flagged; one with at
        most ``normal_sm`` must not.
    vacancy_confidence : float
        Reported vacancy sites at least this confident count.

    Returns
    -------
    dict
        The integer counts named in :data:`SITE_COUNTS` and the RMS errors ``rms_a_px``,
        ``rms_b_px`` (NaN when none matched).
    """
    rows, cols = shape

    def interior(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x >= border_px) & (x <= cols - 1 - border_px) & (y >= border_px) & (y <= rows - 1 - border_px)

    present = ~truth.vacant & (truth.species >= 0)
    true_index = np.flatnonzero(~truth.vacant)
    match = match_columns(
        np.stack([columns.col_px, columns.row_px], 1),
        np.stack([truth.x_px[true_index], truth.y_px[true_index]], 1),
        0.25 * spacing_px,
    )
    matched_truth = true_index[match.truth]
    scored = interior(truth.x_px[matched_truth], truth.y_px[matched_truth])
    t_species = truth.species[matched_truth][scored]
    f_species = columns.species[match.found][scored]
    flagged = columns.abnormal[match.found][scored]
    sm = truth.sm_fraction[matched_truth][scored]
    distance = match.distance[scored]
    in_view = interior(truth.x_px, truth.y_px)
    counts: dict[str, Any] = {}
    for name, code in (("a", SPECIES_A), ("b", SPECIES_B), ("o", SPECIES_O)):
        counts[f"{name}_true"] = int(np.count_nonzero(present & in_view & (truth.species == code)))
        counts[f"{name}_found"] = int(np.count_nonzero(t_species == code))
    counts["a_as_a"] = int(np.count_nonzero((t_species == SPECIES_A) & (f_species == SPECIES_A)))
    counts["b_as_b"] = int(np.count_nonzero((t_species == SPECIES_B) & (f_species == SPECIES_B)))
    counts["o_as_b"] = int(np.count_nonzero((t_species == SPECIES_O) & (f_species == SPECIES_B)))
    found_cation = interior(columns.col_px, columns.row_px) & np.isin(columns.species, (SPECIES_A, SPECIES_B))
    on_amorphous = np.zeros(len(columns), dtype=bool)
    on_amorphous[match.found[truth.species[matched_truth] < 0]] = True
    found_cation &= ~on_amorphous
    matched_cation = np.zeros(len(columns), dtype=bool)
    cation_truth = np.isin(truth.species[matched_truth], (SPECIES_A, SPECIES_B))
    matched_cation[match.found[cation_truth]] = True
    counts["cation_found"] = int(np.count_nonzero(found_cation))
    counts["cation_false"] = int(np.count_nonzero(found_cation & ~matched_cation))
    is_a = t_species == SPECIES_A
    counts["substituted"] = int(np.count_nonzero(is_a & (sm >= substituted_sm)))
    counts["substituted_flagged"] = int(np.count_nonzero(is_a & (sm >= substituted_sm) & flagged))
    counts["normal_a"] = int(np.count_nonzero(is_a & (sm <= normal_sm)))
    counts["normal_a_flagged"] = int(np.count_nonzero(is_a & (sm <= normal_sm) & flagged))
    # Vacancies: a reported site matches a true vacant site of the same role within a quarter cell.
    vacancies = columns.vacancies.select(columns.vacancies.confidence >= vacancy_confidence)
    reported_inside = interior(vacancies.col_px, vacancies.row_px)
    vacancies = vacancies.select(reported_inside)
    vacant = np.flatnonzero(truth.vacant & in_view & np.isin(truth.species, (SPECIES_A, SPECIES_B)))
    hit = np.zeros(vacant.size, dtype=bool)
    used = np.zeros(len(vacancies), dtype=bool)
    if vacant.size and len(vacancies):
        tree = cKDTree(np.stack([vacancies.col_px, vacancies.row_px], 1))
        for k, index in enumerate(vacant):
            for candidate in tree.query_ball_point((truth.x_px[index], truth.y_px[index]), 0.25 * spacing_px):
                if not used[candidate] and vacancies.species[candidate] == truth.species[index]:
                    hit[k] = used[candidate] = True
                    break
    for name, code in (("a", SPECIES_A), ("b", SPECIES_B)):
        counts[f"{name}_vacant"] = int(np.count_nonzero(truth.species[vacant] == code))
        counts[f"{name}_vacant_found"] = int(np.count_nonzero(hit & (truth.species[vacant] == code)))
    counts["sites"] = int(np.count_nonzero(in_view & np.isin(truth.species, (SPECIES_A, SPECIES_B))))
    counts["false_vacancies"] = int(np.count_nonzero(~used))
    counts["rms_a_px"] = float(np.sqrt(np.mean(distance[is_a] ** 2))) if is_a.any() else float("nan")
    is_b = t_species == SPECIES_B
    counts["rms_b_px"] = float(np.sqrt(np.mean(distance[is_b] ** 2))) if is_b.any() else float("nan")
    return counts


def site_figures(counts: dict[str, Any]) -> dict[str, float | None]:
    """Rates from pooled :func:`score_sites` counts (None where the denominator is zero).

    Returns ``recall_a``, ``recall_b``, ``precision``, ``species_accuracy_a``,
    ``species_accuracy_b``, ``o_as_b``, ``substituted_flagged``, ``normal_a_flagged``,
    ``a_vacancy_recall``, ``b_vacancy_recall`` and ``false_vacancy_rate``.
    """

    def rate(numerator: str, denominator: str, complement: bool = False) -> float | None:
        total = counts[denominator]
        if not total:
            return None
        value = counts[numerator] / total
        return 1.0 - value if complement else value

    return {
        "recall_a": rate("a_found", "a_true"),
        "recall_b": rate("b_found", "b_true"),
        "precision": rate("cation_false", "cation_found", complement=True),
        "species_accuracy_a": rate("a_as_a", "a_found"),
        "species_accuracy_b": rate("b_as_b", "b_found"),
        "o_found": counts["o_found"],
        "o_as_b": counts["o_as_b"],
        "substituted_flagged": rate("substituted_flagged", "substituted"),
        "normal_a_flagged": rate("normal_a_flagged", "normal_a"),
        "a_vacancy_recall": rate("a_vacant_found", "a_vacant"),
        "b_vacancy_recall": rate("b_vacant_found", "b_vacant"),
        "false_vacancy_rate": rate("false_vacancies", "sites"),
    }
