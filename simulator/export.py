"""Write the synthetic specimen as a recorded dataset, with its ground truth.

``micrography simulate`` renders the whole specimen as one large HAADF image
in the layout of the Sm-doped BFO dataset (``Sm_<pct>_<n>_HAADF.h5`` and
``Sm_<pct>_<n>_UCParameterization.h5``), so everything that reads recorded
data (the replay microscope, offline analysis) can be tested on it, and writes
the column-level ground truth to ``ground_truth.h5``.

Pixel convention of the written image: pixel ``(row, col)`` is centred on stage
``((col + 0.5) p, (row + 0.5) p)`` nanometres for pixel size ``p``, the frame
:class:`simulator.replay.ReplayMicroscope` uses, so replayed tiles and the
specimen share stage coordinates.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from agent.config import dump_config
from agent.driver import electrons_per_pixel
from agent.errors import DataFileError
from simulator.config import SimulatorConfig, SpecimenConfig
from simulator.dataset import DatasetFiles, UnitCellParameters, write_dataset
from simulator.imaging import add_detector_noise, render_expected_counts
from simulator.specimen import LABELS, PlantedFeature, Specimen

GROUND_TRUTH_FILE = "ground_truth.h5"
CONFIG_FILE = "simulator.yaml"
_COLUMN_FIELDS = (
    "x_nm",
    "y_nm",
    "site",
    "weight",
    "sm_fraction",
    "label",
    "feature_id",
    "cell_ij",
    "polarization",
)


@dataclass(frozen=True)
class ExportedSpecimen:
    """Paths written by :func:`export_specimen`.

    Parameters
    ----------
    dataset : DatasetFiles
        The HAADF image and unit-cell parameter files.
    ground_truth : pathlib.Path
        Column-level ground truth (:func:`read_ground_truth` reads it).
    config : pathlib.Path
        The simulator configuration used, as YAML.
    """

    dataset: DatasetFiles
    ground_truth: Path
    config: Path


def unit_cell_parameters(specimen: Specimen, pixel_size_nm: float) -> UnitCellParameters:
    """The specimen's unit cells in the dataset layout, in pixels of an image at ``pixel_size_nm``.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    pixel_size_nm : float
        Pixel size of the image the parameters refer to, nanometres.

    Returns
    -------
    UnitCellParameters
        ``xy_COM`` and ``Pxy`` in pixels, ``Vol`` in px², ``a`` in px, ``alpha`` in degrees,
        ``I1``/``I5`` the A- and B-column scattering weights.
    """
    cells = specimen.unit_cells()
    return UnitCellParameters(
        ab=cells.ab,
        x_px=cells.center_nm[0] / pixel_size_nm - 0.5,
        y_px=cells.center_nm[1] / pixel_size_nm - 0.5,
        pxy=cells.displacement_nm / pixel_size_nm,
        vol=cells.area_nm2 / pixel_size_nm**2,
        a=cells.a_nm / pixel_size_nm,
        alpha=cells.alpha_deg,
        i1=cells.a_weight,
        i5=cells.b_weight,
    )


def render_specimen_image(
    specimen: Specimen,
    config: SimulatorConfig,
    pixel_size_nm: float,
    dwell_us: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render the whole specimen as one image, without drift, in detected electrons.

    Drift is left out so that ground-truth positions stay valid in image pixels;
    line jitter and counting noise are kept.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    config : SimulatorConfig
        Imaging and instrument parameters.
    pixel_size_nm : float
        Pixel size, nanometres.
    dwell_us : float
        Dwell per pixel, microseconds.
    rng : numpy.random.Generator
        Noise source.

    Returns
    -------
    numpy.ndarray
        float32 image covering ``[0, width] x [0, height]``.
    """
    width, height = specimen.size_nm
    shape = (round(height / pixel_size_nm), round(width / pixel_size_nm))
    imaging = config.imaging.model_copy(update={"drift_nm_per_s": (0.0, 0.0)})
    dx_px = None
    if imaging.line_jitter_nm > 0:
        dx_px = rng.normal(0.0, imaging.line_jitter_nm, shape[0]) / pixel_size_nm
    expected = render_expected_counts(
        specimen,
        (0.5 * pixel_size_nm, 0.5 * pixel_size_nm),
        shape,
        pixel_size_nm,
        electrons_per_pixel(config.instrument.beam_current_pa, dwell_us),
        imaging,
        dx_px=dx_px,
    )
    return add_detector_noise(expected, imaging, rng)


def write_ground_truth(specimen: Specimen, path: str | Path) -> Path:
    """Write the column-level ground truth of a specimen to HDF5.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    path : str or pathlib.Path
        Destination file.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    with h5py.File(path, "w") as file:
        columns = file.create_group("columns")
        for name in _COLUMN_FIELDS:
            columns.create_dataset(name, data=getattr(specimen, name), compression="gzip")
        vacancies = file.create_group("vacancies")
        for name, values in specimen.vacancies.items():
            vacancies.create_dataset(name, data=values)
        file.attrs["labels"] = json.dumps(list(LABELS))
        file.attrs["features"] = json.dumps([asdict(feature) for feature in specimen.features])
        file.attrs["specimen_config"] = specimen.config.model_dump_json()
        file.attrs["seed"] = specimen.seed
        file.attrs["units"] = "positions in stage nanometres"
    return path


def read_ground_truth(path: str | Path) -> Specimen:
    """Read a specimen written by :func:`write_ground_truth`.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``ground_truth.h5`` file.

    Returns
    -------
    Specimen
        The specimen with its labels and features.

    Raises
    ------
    DataFileError
        If the file is missing, unreadable or lacks a ground-truth key.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: ground-truth file not found")
    try:
        with h5py.File(path, "r") as file:
            columns = {name: file["columns"][name][()] for name in _COLUMN_FIELDS}
            vacancies = {name: file["vacancies"][name][()] for name in file["vacancies"]}
            features = [
                PlantedFeature(
                    **{**item, "center_nm": tuple(item["center_nm"]), "bbox_nm": tuple(item["bbox_nm"])}
                )
                for item in json.loads(file.attrs["features"])
            ]
            config = SpecimenConfig.model_validate_json(file.attrs["specimen_config"])
            seed = int(file.attrs["seed"])
    except KeyError as error:
        raise DataFileError(f"{path}: not a Micrography ground-truth file (missing {error})") from None
    except OSError as error:
        raise DataFileError(f"{path}: cannot read ground truth ({error})") from None
    return Specimen.from_columns(config, seed, columns, vacancies, features)


def export_specimen(
    specimen: Specimen,
    config: SimulatorConfig,
    out_dir: str | Path,
    *,
    pixel_size_nm: float = 0.04,
    dwell_us: float = 2.0,
) -> ExportedSpecimen:
    """Render and write the specimen in the Sm-BFO dataset layout, with ground truth and config.

    Parameters
    ----------
    specimen : Specimen
        The specimen.
    config : SimulatorConfig
        Configuration it was generated with (written beside it).
    out_dir : str or pathlib.Path
        Output folder, created if needed.
    pixel_size_nm : float
        Pixel size of the written image, nanometres.
    dwell_us : float
        Dwell per pixel, microseconds.

    Returns
    -------
    ExportedSpecimen
        Paths of the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2,)))
    image = render_specimen_image(specimen, config, pixel_size_nm, dwell_us, rng)
    dataset = write_dataset(
        out_dir,
        image,
        unit_cell_parameters(specimen, pixel_size_nm),
        pixel_size_nm=pixel_size_nm,
        composition_pct=round(100 * config.specimen.sm_fraction, 1),
        index=config.seed,
        extra_attrs={
            "dwell_us": dwell_us,
            "beam_current_pa": config.instrument.beam_current_pa,
            "source": "micrography simulate",
        },
    )
    ground_truth = write_ground_truth(specimen, out_dir / GROUND_TRUTH_FILE)
    config_path = out_dir / CONFIG_FILE
    dump_config(config, config_path)
    return ExportedSpecimen(dataset=dataset, ground_truth=ground_truth, config=config_path)


def write_calibrated_tiff(
    path: str | Path,
    image: np.ndarray,
    pixel_size_nm: float,
    origin_nm: tuple[float, float] = (0.0, 0.0),
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a float32 TIFF that keeps its calibration for ImageJ, hyperspy and rosettasciio.

    The pixel size goes into the resolution tags with ImageJ's ``unit=nm``, and the scale, origin
    and units of both axes into the private tags hyperspy's TIFF writer uses
    (:data:`simulator.dataset.HYPERSPY_TIFF_TAGS`), so ``rsciio.tiff.file_reader`` (and
    ``hyperspy.api.load``) give axes in nm with the stage origin, and :func:`load_image` reads the
    pixel size back without being told it. Written with tifffile: rosettasciio is an optional
    extra, and the tags are all it would add.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.tif`` file.
    image : numpy.ndarray
        2-D image.
    pixel_size_nm : float
        Pixel size, nm.
    origin_nm : tuple of float
        Stage position (x, y) of the first pixel's centre, nm (``Tile.origin_nm``; hyperspy's offset).
    info : dict, optional
        JSON-friendly metadata (dose, dwell, request) kept in ImageJ's ``Info`` text.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    import tifffile

    from simulator.dataset import HYPERSPY_TIFF_TAGS as TAGS

    path = Path(path)
    resolution = 1.0 / pixel_size_nm
    extratags = [
        (TAGS["x_units"], "s", 0, "nm", True),
        (TAGS["y_units"], "s", 0, "nm", True),
        (TAGS["x_offset"], "d", 1, float(origin_nm[0]), True),
        (TAGS["y_offset"], "d", 1, float(origin_nm[1]), True),
        (TAGS["x_scale"], "d", 1, float(pixel_size_nm), True),
        (TAGS["y_scale"], "d", 1, float(pixel_size_nm), True),
    ]
    metadata: dict[str, Any] = {"unit": "nm"}
    if info:
        metadata["Info"] = json.dumps(info, default=str)
    tifffile.imwrite(
        path,
        np.asarray(image, dtype=np.float32),
        imagej=True,
        resolution=(resolution, resolution),
        metadata=metadata,
        extratags=extratags,
    )
    return path
