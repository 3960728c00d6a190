"""Per-column tables other tools can read: one row per atomic column, as CSV and HDF5.

``analyze`` and sessions write ``columns.csv`` and ``columns.h5`` beside their other outputs,
one row per lattice column of the molecule graph (the A and B cation columns; pure-O columns are
found and counted, but are not graph nodes): the position in nm, site and species, the intensity
flags, every node feature of the graph (units in the names, :data:`agent.graph.NODE_FEATURES`),
the anomaly score and whether it is anomalous. The vacancy sites (empty lattice sites) go in a
second table (``vacancies.csv`` and the ``/vacancies`` group). CSV for spreadsheets and pandas;
HDF5 (one dataset per field, each with its ``unit`` and ``description`` attributes) for h5py,
hyperspy's and atomap's users and anything that wants exact floats. Plain numpy, csv and h5py:
the tables are flat, and a dataframe library would add a dependency for nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np

from agent.columns import SPECIES_NAMES
from agent.config import unit_of
from agent.errors import MicrographyError
from agent.graph import NODE_FEATURES, MoleculeGraph

TABLE_FORMAT = "micrography-column-table"
TABLE_VERSION = 1

COLUMN_FIELDS: dict[str, str] = {
    "node_id": "node number in the graph",
    "x_nm": "column position, x (specimen frame)",
    "y_nm": "column position, y (specimen frame)",
    "site": "lattice site: A or B",
    "species": "site code: 0 A, 1 B",
    "abnormal": "intensity is an outlier for its site (e.g. Sm-rich A, vacancy-bearing B)",
    "scattering": "column intensity per incident electron per pixel, averaged over observations",
    "width_nm": "fitted column width (Gaussian sigma)",
    "fit_correlation": "correlation of the column with a Gaussian of its fitted width, -1 to 1",
    "observations": "tiles in which the column was seen",
    "interior": "far enough from every scanned edge for all its neighbours to be known",
    **{name: "node feature (agent.graph.NODE_FEATURES)" for name in NODE_FEATURES},
    "score": "anomaly score (robust z of the graph autoencoder's error; NaN: not scored)",
    "anomalous": "score above the detection threshold",
}
"""The fields of the column table, in order, with what each one is (units from the names:
:func:`agent.config.unit_of`)."""

VACANCY_FIELDS: dict[str, str] = {
    "x_nm": "empty lattice site, x (specimen frame)",
    "y_nm": "empty lattice site, y (specimen frame)",
    "confidence": "how sure the site is empty, 0-1",
}
"""The fields of the vacancy-site table."""


class TableError(MicrographyError, OSError):
    """A column table cannot be written or read."""


def column_table(
    graph: MoleculeGraph, scores: np.ndarray | None = None, threshold: float = 3.0
) -> dict[str, np.ndarray]:
    """One row per column of ``graph``: positions, site, flags, node features, score.

    Parameters
    ----------
    graph : MoleculeGraph
        The columns (a session's merged graph, or ``analyze``'s).
    scores : numpy.ndarray, optional
        Anomaly score per node (NaN where none); all NaN when not given.
    threshold : float
        Score above which a column is ``anomalous``.

    Returns
    -------
    dict of numpy.ndarray
        :data:`COLUMN_FIELDS`, each of length ``len(graph)``.

    Examples
    --------
    >>> from agent.graph import MoleculeGraph
    >>> table = column_table(MoleculeGraph())
    >>> list(table)[:4], len(table["x_nm"])
    (['node_id', 'x_nm', 'y_nm', 'site'], 0)
    """
    n = len(graph)
    scores = np.full(n, np.nan) if scores is None else np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"column_table needs one score per node: {n} nodes, {scores.shape} scores")
    species = graph.species.astype(np.int8)
    features = graph.features
    table: dict[str, np.ndarray] = {
        "node_id": np.arange(n, dtype=np.int64),
        "x_nm": graph.x_nm.astype(np.float64),
        "y_nm": graph.y_nm.astype(np.float64),
        "site": np.array([SPECIES_NAMES[code] for code in species], dtype=object),
        "species": species,
        "abnormal": graph.abnormal.astype(bool),
        "scattering": graph.scattering.astype(np.float64),
        "width_nm": graph.width_nm.astype(np.float64),
        "fit_correlation": graph.quality.astype(np.float64),
        "observations": graph.observations.astype(np.int32),
        "interior": graph.interior.astype(bool),
        **{name: features[:, k].astype(np.float64) for k, name in enumerate(NODE_FEATURES)},
        "score": scores,
        "anomalous": np.nan_to_num(scores, nan=-np.inf) > threshold,
    }
    return table


def vacancy_table(graph: MoleculeGraph) -> dict[str, np.ndarray]:
    """The vacancy sites of ``graph`` as a table of :data:`VACANCY_FIELDS`."""
    sites = graph.vacancy_sites
    return {"x_nm": sites[:, 0], "y_nm": sites[:, 1], "confidence": sites[:, 2]}


def write_tables(
    out_dir: str | Path, columns: dict[str, np.ndarray], vacancies: dict[str, np.ndarray]
) -> tuple[Path, Path, Path]:
    """Write ``columns.csv``, ``vacancies.csv`` and ``columns.h5`` (both tables) into ``out_dir``.

    Returns
    -------
    tuple of pathlib.Path
        The column CSV, the vacancy CSV and the HDF5 file.

    Raises
    ------
    TableError
        If a file cannot be written (the message names it).
    """
    out = Path(out_dir)
    paths = (out / "columns.csv", out / "vacancies.csv", out / "columns.h5")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, table in zip(paths[:2], (columns, vacancies), strict=True):
            _write_csv(path, table)
        with h5py.File(paths[2], "w") as file:
            file.attrs["format"], file.attrs["version"] = TABLE_FORMAT, TABLE_VERSION
            for group, table, described in (
                ("columns", columns, COLUMN_FIELDS),
                ("vacancies", vacancies, VACANCY_FIELDS),
            ):
                for name, values in table.items():
                    data = values.astype("S") if values.dtype == object else values
                    dataset = file.create_dataset(f"{group}/{name}", data=data)
                    dataset.attrs["unit"] = unit_of(name)
                    dataset.attrs["description"] = described.get(name, "")
    except OSError as error:
        raise TableError(f"{out}: could not write the column tables ({error})") from None
    return paths


def _write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    names = list(table)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        # repr keeps every float's digits, so the CSV reads back to the same values.
        columns = [[repr(v) if isinstance(v, float) else v for v in table[n].tolist()] for n in names]
        writer.writerows(zip(*columns, strict=True))


def read_tables(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read ``columns.h5`` back: the column table and the vacancy table.

    Raises
    ------
    TableError
        If the file is missing or is not a Micrography column table.
    """
    try:
        with h5py.File(path, "r") as file:
            if file.attrs.get("format") != TABLE_FORMAT:
                raise TableError(f"{path}: not a Micrography column table")
            tables = []
            for group in ("columns", "vacancies"):
                table = {}
                for name in file[group]:
                    values = file[f"{group}/{name}"][()]
                    table[name] = values.astype(str).astype(object) if values.dtype.kind == "S" else values
                order = COLUMN_FIELDS if group == "columns" else VACANCY_FIELDS
                tables.append({name: table[name] for name in order if name in table})
    except OSError as error:
        raise TableError(f"{path}: cannot read it ({error})") from None
    return tables[0], tables[1]
