"""Read and write the Sm-doped BiFeO3 dataset layout, and load plain images.

The open dataset "STEM images and associated parameters for Sm-doped BFO"
(Zenodo record 4555979) stores, per composition and field of view,

* ``Sm_<pct>_<n>_HAADF.h5`` with the HAADF image in the dataset ``MainImage``;
* ``Sm_<pct>_<n>_UCParameterization.h5`` with one entry per unit cell:
  ``ab`` (cell indices, 2 x N), ``xy_COM`` (cell centre in image pixels, 2 x N),
  ``Pxy`` (polarization vector, 2 x N), ``Vol``, ``a``, ``alpha``, ``I1`` and
  ``I5`` (each N).

The published files spell the prefix both ``Sm_`` and ``SM_``, so names are
matched without regard to case. Whether row 0 of ``xy_COM`` holds x (columns)
or y (rows) is not documented; :func:`read_uc_parameters` decides it from the
image. Pixel coordinates follow numpy: integer values are pixel centres,
counted from 0.

:func:`load_image` also reads plain ``.npy`` and ``.tif`` images, which carry
no pixel size; pass it explicitly for those.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import tifffile
from scipy import ndimage
from scipy.spatial import cKDTree

from agent.driver import require_finite
from agent.errors import ConfigError, DataFileError, InvalidImageError

IMAGE_KEY = "MainImage"
"""HDF5 dataset holding the HAADF image."""

PIXEL_SIZE_ATTR = "pixel_size_nm"
"""Attribute of the image dataset giving the pixel size in nanometres (written by us)."""

UC_KEYS: tuple[str, ...] = ("ab", "xy_COM", "Pxy", "Vol", "a", "alpha", "I1", "I5")
"""Arrays every UCParameterization file must hold."""

VENDOR_READERS: dict[str, tuple[str, str]] = {
    ".dm3": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".dm4": ("digitalmicrograph", "Gatan DigitalMicrograph"),
    ".emd": ("emd", "EMD (Velox or Berkeley)"),
    ".ser": ("tia", "FEI TIA"),
}
"""Vendor formats read through the optional ``vendor`` extra: suffix -> (rosettasciio module, name)."""

SUPPORTED_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".npy", ".tif", ".tiff", *VENDOR_READERS)
"""Image file formats :func:`load_image` reads (plus a directory in the dataset layout)."""

_LENGTH_UNIT_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "å": 0.1, "a": 0.1, "angstrom": 0.1, "ang": 0.1,
    "pm": 1e-3, "µm": 1e3, "um": 1e3, "μm": 1e3, "micron": 1e3, "m": 1e9,
}  # fmt: skip

_HAADF_NAME = re.compile(r"^sm_(?P<pct>\d+(?:\.\d+)?)_(?P<index>\d+)_haadf\.(?:h5|hdf5)$", re.I)
_UC_NAME = re.compile(r"^sm_(?P<pct>\d+(?:\.\d+)?)_(?P<index>\d+)_ucparameterization\.(?:h5|hdf5)$", re.I)
# Enough cells and patch samples to pin the mean patch down while bounding the memory on
# 4k images with tens of thousands of cells.
_ORDER_CHECK_CELLS = 2000
_ORDER_PATCH_SAMPLES = 25
# The image decides the xy_COM order only if the losing order's template consistency is below
# this fraction of the winner's; a lattice aligned with the scan axes scores both alike.
_ORDER_AMBIGUITY = 0.8


@dataclass(frozen=True)
class DatasetFiles:
    """The files of one field of view in the Sm-BFO dataset layout.

    Parameters
    ----------
    haadf : pathlib.Path
        The HAADF image file.
    uc_parameters : pathlib.Path or None
        The matching unit-cell parameterization file, None when there is none.
    composition_pct : float or None
        Sm content in percent parsed from the file name, None if the name does not follow
        the ``Sm_<pct>_<n>_HAADF.h5`` pattern.
    index : int or None
        Field-of-view number ``<n>`` from the file name, None likewise.
    """

    haadf: Path
    uc_parameters: Path | None
    composition_pct: float | None
    index: int | None


@dataclass(frozen=True, eq=False)
class UnitCellParameters:
    """Per-unit-cell parameters of one image, positions in that image's pixels.

    Parameters
    ----------
    ab : numpy.ndarray
        Cell indices, int64, shape ``(2, N)``.
    x_px, y_px : numpy.ndarray
        Cell centre along columns (x) and rows (y), in image pixels (integer values are
        pixel centres), shape ``(N,)``.
    pxy : numpy.ndarray
        Polarization vector ``(Px, Py)`` with Px along columns and Py along rows, shape
        ``(2, N)``, in the units of the source file.
    vol, a, alpha, i1, i5 : numpy.ndarray
        Cell volume (area), lattice parameter, cell angle and the two intensity measures of
        the published parameterization, shape ``(N,)``, in the units of the source file.
    xy_order : str
        ``"xy"`` if row 0 of the file's ``xy_COM`` is x (columns), ``"yx"`` if it is y (rows).
    xy_order_basis : str
        How ``xy_order`` was decided: ``"bounds"`` (only one ordering puts every centre inside
        the image), ``"image"`` (the image content decided), ``"ambiguous"`` (the image could
        not tell; "xy" assumed) or ``"assumed"`` (no image given).
    """

    ab: np.ndarray
    x_px: np.ndarray
    y_px: np.ndarray
    pxy: np.ndarray
    vol: np.ndarray
    a: np.ndarray
    alpha: np.ndarray
    i1: np.ndarray
    i5: np.ndarray
    xy_order: str = "xy"
    xy_order_basis: str = "assumed"

    def __post_init__(self) -> None:
        n = self.x_px.shape[0] if self.x_px.ndim == 1 else -1
        for name in ("ab", "pxy"):
            shape = getattr(self, name).shape
            if shape != (2, n):
                raise ValueError(f"{name} must have shape (2, {n}), got {shape}")
        for name in ("y_px", "vol", "a", "alpha", "i1", "i5"):
            shape = getattr(self, name).shape
            if shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) like x_px, got {shape}")
        if self.xy_order not in ("xy", "yx"):
            raise ValueError(f"xy_order must be 'xy' or 'yx', got {self.xy_order!r}")

    def __len__(self) -> int:
        return int(self.x_px.shape[0])

    def select(self, mask: np.ndarray) -> UnitCellParameters:
        """Return the cells where ``mask`` is true (or at the given indices).

        Parameters
        ----------
        mask : numpy.ndarray
            Boolean mask of shape ``(N,)`` or an integer index array.

        Returns
        -------
        UnitCellParameters
            The selected cells, same order and basis flags.
        """
        return UnitCellParameters(
            ab=self.ab[:, mask],
            x_px=self.x_px[mask],
            y_px=self.y_px[mask],
            pxy=self.pxy[:, mask],
            vol=self.vol[mask],
            a=self.a[mask],
            alpha=self.alpha[mask],
            i1=self.i1[mask],
            i5=self.i5[mask],
            xy_order=self.xy_order,
            xy_order_basis=self.xy_order_basis,
        )


@dataclass(frozen=True, eq=False)
class RecordedImage:
    """A recorded image with what is known about it.

    Parameters
    ----------
    image : numpy.ndarray
        Detector signal, float32, shape ``(rows, cols)``, in the units of the file.
    pixel_size_nm : float or None
        Pixel size in nanometres; None when neither the file nor the caller gave one.
    source : pathlib.Path
        The file the image was read from.
    uc_parameters : UnitCellParameters or None
        Unit-cell parameters of the same field of view, if the dataset has them.
    attrs : dict
        Attributes stored with the image (acquisition settings such as ``dwell_us`` and
        ``beam_current_pa``); empty for formats that carry none.
    """

    image: np.ndarray
    pixel_size_nm: float | None
    source: Path
    uc_parameters: UnitCellParameters | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- file names


def _parse_name(pattern: re.Pattern[str], name: str) -> tuple[float, int] | None:
    match = pattern.match(name)
    if match is None:
        return None
    return float(match["pct"]), int(match["index"])


def _format_pct(composition_pct: float) -> str:
    text = f"{composition_pct:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _matching_uc_file(haadf: Path, composition_pct: float, index: int) -> Path | None:
    candidates = sorted(
        entry
        for entry in haadf.parent.iterdir()
        if entry.is_file() and _parse_name(_UC_NAME, entry.name) == (composition_pct, index)
    )
    if len(candidates) > 1:
        names = ", ".join(entry.name for entry in candidates)
        raise DataFileError(
            f"{haadf}: several unit-cell parameter files match this image ({names}); "
            "remove or rename all but one"
        )
    return candidates[0] if candidates else None


def find_dataset_files(path: str | Path) -> DatasetFiles:
    """Locate the HAADF image and its unit-cell parameter file.

    Parameters
    ----------
    path : str or pathlib.Path
        Either the HAADF ``.h5`` file itself or a directory holding exactly one file named
        like ``Sm_<pct>_<n>_HAADF.h5`` (any case, ``<pct>`` such as ``13`` or ``13.5``).

    Returns
    -------
    DatasetFiles
        The image file, the ``Sm_<pct>_<n>_UCParameterization.h5`` file beside it (matched
        without regard to case; None if absent), and the composition and index parsed from
        the name (None if the name does not follow the pattern).

    Raises
    ------
    DataFileError
        If ``path`` does not exist or is a parameter file, a directory holds no or several
        HAADF files, or several parameter files match the image.
    """
    path = Path(path)
    if path.is_dir():
        images = sorted(
            entry for entry in path.iterdir() if entry.is_file() and _HAADF_NAME.match(entry.name) is not None
        )
        if not images:
            raise DataFileError(
                f"{path}: no file named like Sm_<pct>_<n>_HAADF.h5 in this directory; "
                "name the image file directly"
            )
        if len(images) > 1:
            names = ", ".join(entry.name for entry in images)
            raise DataFileError(
                f"{path}: this directory holds {len(images)} HAADF images ({names}); name the one to use"
            )
        path = images[0]
    elif not path.exists():
        raise DataFileError(f"{path}: no such file or directory")
    elif _UC_NAME.match(path.name) is not None:
        raise DataFileError(
            f"{path}: this is a unit-cell parameter file; name the matching "
            "Sm_<pct>_<n>_HAADF.h5 image (or its directory) instead"
        )
    parsed = _parse_name(_HAADF_NAME, path.name)
    if parsed is None:
        return DatasetFiles(haadf=path, uc_parameters=None, composition_pct=None, index=None)
    composition_pct, index = parsed
    return DatasetFiles(
        haadf=path,
        uc_parameters=_matching_uc_file(path, composition_pct, index),
        composition_pct=composition_pct,
        index=index,
    )


# ----------------------------------------------------------------------------- reading


def _open_hdf5(path: Path) -> h5py.File:
    if not path.exists():
        raise DataFileError(f"{path}: file not found")
    if not path.is_file():
        raise DataFileError(f"{path}: not a file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise DataFileError(
            f"{path}: cannot read as HDF5 ({error}); the file may be truncated or not HDF5"
        ) from None


def _dataset_names(file: h5py.File) -> list[str]:
    names: list[str] = []

    def visit(name: str, item: h5py.HLObject) -> None:
        if isinstance(item, h5py.Dataset):
            names.append(name)

    file.visititems(visit)
    return names


def _read_array(file: h5py.File, path: Path, key: str) -> np.ndarray:
    item = file.get(key)
    if not isinstance(item, h5py.Dataset):
        present = ", ".join(_dataset_names(file)) or "none"
        what = "is not a dataset" if item is not None else "is missing"
        raise DataFileError(f"{path}: dataset {key!r} {what}; datasets present: {present}")
    try:
        return np.asarray(item[()])
    except (OSError, ValueError, TypeError) as error:
        raise DataFileError(f"{path}: cannot read dataset {key!r} ({error})") from None


def _as_float_image(data: np.ndarray, source: str) -> np.ndarray:
    if data.ndim == 3:
        raise InvalidImageError(
            f"{source}: expected a single 2-D image, got a 3-D array of shape {data.shape} "
            "(a stack of frames or a colour image); pick one frame, e.g. stack[0], and save that"
        )
    if data.ndim != 2:
        raise InvalidImageError(f"{source}: expected a 2-D image (rows, cols), got shape {data.shape}")
    real = np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_
    if not real or np.iscomplexobj(data):
        raise InvalidImageError(f"{source}: expected real-valued pixels, got dtype {data.dtype}")
    image = np.asarray(data, dtype=np.float32)
    require_finite(image, source)
    return image


def _pixel_size_attr(attrs: Mapping[str, Any], source: str) -> float | None:
    if PIXEL_SIZE_ATTR not in attrs:
        return None
    try:
        value = float(np.asarray(attrs[PIXEL_SIZE_ATTR]).reshape(()))
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DataFileError(
            f"{source}: attribute {PIXEL_SIZE_ATTR!r} must be a positive number of nanometres, "
            f"got {attrs[PIXEL_SIZE_ATTR]!r}; fix it or pass the pixel size explicitly"
        )
    return value


class HaadfImage(NamedTuple):
    """The image of a HAADF dataset file with what its attributes say about it.

    Parameters
    ----------
    image : numpy.ndarray
        float32 image, shape ``(rows, cols)``, in detector units.
    pixel_size_nm : float or None
        Pixel size in nanometres from the attribute ``pixel_size_nm``, else None.
    attrs : dict
        All attributes of the image dataset (acquisition settings such as ``dwell_us``
        and ``beam_current_pa`` where the writer recorded them).
    """

    image: np.ndarray
    pixel_size_nm: float | None
    attrs: dict[str, Any]


def read_haadf(path: str | Path, key: str = IMAGE_KEY) -> HaadfImage:
    """Read the HAADF image of a dataset file.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``Sm_<pct>_<n>_HAADF.h5`` file (any HDF5 file with the image under ``key``).
    key : str
        Dataset holding the image.

    Returns
    -------
    HaadfImage
        The image as float32, the pixel size from the dataset attribute ``pixel_size_nm``
        (written by :func:`write_dataset`; the published files may lack it) or None, and
        all attributes of the image dataset.

    Raises
    ------
    DataFileError
        If the file is missing, is not readable HDF5, lacks ``key`` (the message lists the
        datasets present) or has an invalid pixel-size attribute.
    InvalidImageError
        If the image is not 2-D or has NaN or infinite pixels.
    """
    path = Path(path)
    with _open_hdf5(path) as file:
        data = _read_array(file, path, key)
        pixel_size_nm = _pixel_size_attr(file[key].attrs, f"{path}:{key}")
        attrs = {name: _attr_value(value) for name, value in file[key].attrs.items()}
    return HaadfImage(_as_float_image(data, f"{path}:{key}"), pixel_size_nm, attrs)


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numpy scalars and bytes unwrapped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_rows(data: np.ndarray, path: Path, key: str) -> np.ndarray:
    # Files written from MATLAB come out transposed in h5py, so accept (N, 2) as well.
    if data.ndim == 2 and data.shape[0] == 2:
        return data
    if data.ndim == 2 and data.shape[1] == 2:
        return data.T
    raise DataFileError(f"{path}: dataset {key!r} must have shape (2, N), got {data.shape}")


def _as_vector(data: np.ndarray, path: Path, key: str) -> np.ndarray:
    if data.ndim == 1:
        return data
    if data.ndim == 2 and 1 in data.shape:
        return data.reshape(-1)
    raise DataFileError(f"{path}: dataset {key!r} must have shape (N,), got {data.shape}")


def _fraction_inside(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> float:
    rows, cols = shape
    inside = (x >= -0.5) & (x <= cols - 0.5) & (y >= -0.5) & (y <= rows - 0.5)
    return float(inside.mean()) if inside.size else 0.0


def _template_consistency(smoothed: np.ndarray, x: np.ndarray, y: np.ndarray, half: float) -> float:
    rows, cols = smoothed.shape
    inside = (x >= -0.5) & (x <= cols - 0.5) & (y >= -0.5) & (y <= rows - 0.5)
    if not inside.any():
        return -math.inf
    x, y = x[inside], y[inside]
    pick = np.unique(np.linspace(0, x.size - 1, min(x.size, _ORDER_CHECK_CELLS)).astype(np.int64))
    x, y = x[pick], y[pick]
    offsets = np.linspace(-half, half, min(2 * math.ceil(half) + 1, _ORDER_PATCH_SAMPLES))
    d_row, d_col = np.meshgrid(offsets, offsets, indexing="ij")
    coords = np.stack([y[:, None] + d_row.ravel(), x[:, None] + d_col.ravel()])
    patches = ndimage.map_coordinates(smoothed, coords, order=1, mode="nearest")
    # Per-patch offsets drop slow thickness gradients, which say nothing about the order.
    patches -= patches.mean(axis=1, keepdims=True)
    template = patches.mean(axis=0)
    total = float((patches**2).sum())
    if total == 0.0:
        return 0.0
    return 1.0 - float(((patches - template) ** 2).sum()) / total


def _detect_xy_order(xy_com: np.ndarray, image: np.ndarray) -> tuple[str, str]:
    finite = np.isfinite(xy_com).all(axis=0)
    first, second = xy_com[0, finite], xy_com[1, finite]
    inside_xy = _fraction_inside(first, second, image.shape)
    inside_yx = _fraction_inside(second, first, image.shape)
    if first.size and inside_xy == 0.0 and inside_yx == 0.0:
        return "xy", "outside"
    if inside_xy == 1.0 and inside_yx < 1.0:
        return "xy", "bounds"
    if inside_yx == 1.0 and inside_xy < 1.0:
        return "yx", "bounds"
    if first.size < 2:
        return "xy", "ambiguous"
    points = np.stack([first, second], axis=1)
    spacing = float(np.median(cKDTree(points).query(points, k=2)[0][:, 1]))
    half = max(2.0, 0.75 * spacing)
    smoothed = ndimage.gaussian_filter(image.astype(np.float64), sigma=1.0, mode="nearest")
    score_xy = _template_consistency(smoothed, first, second, half)
    score_yx = _template_consistency(smoothed, second, first, half)
    best, other = max(score_xy, score_yx), min(score_xy, score_yx)
    if best <= 0.0 or other > _ORDER_AMBIGUITY * best:
        return "xy", "ambiguous"
    return ("xy" if score_xy >= score_yx else "yx"), "image"


def read_uc_parameters(path: str | Path, image: np.ndarray | None = None) -> UnitCellParameters:
    """Read a unit-cell parameterization file.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``Sm_<pct>_<n>_UCParameterization.h5`` file.
    image : numpy.ndarray, optional
        The HAADF image the cells were measured on, used to decide whether row 0 of
        ``xy_COM`` is x (columns) or y (rows). If only one ordering puts every cell centre
        inside the image, that one is taken. Otherwise the image is smoothed (Gaussian,
        sigma 1 px) and, for each ordering, patches about 1.5 cell spacings wide are sampled
        around the centres (bilinear, up to 2000 cells); the ordering whose patches agree
        best with their mean (largest fraction of patch variance explained by the mean
        patch) wins. True centres all sit at the same place in their cell and follow the
        image's rotation and distortion; transposed ones are mirrored about the diagonal
        and drift across the lattice. If the two orderings score within 20 % of each other
        (typically a lattice aligned with the scan axes, whose mirror image is the same
        lattice shifted) the image cannot decide: "xy" is assumed, ``xy_order_basis`` is
        ``"ambiguous"`` and a warning is issued. Without an image the order is assumed to be
        "xy" (row 0 is x) and ``xy_order_basis`` is ``"assumed"``.

    Returns
    -------
    UnitCellParameters
        Positions in image pixels and ``pxy`` as (Px along columns, Py along rows), with
        the rows of ``Pxy`` swapped when the file's order is "yx".

    Raises
    ------
    DataFileError
        If the file is missing or unreadable, lacks one of ``ab``, ``xy_COM``, ``Pxy``,
        ``Vol``, ``a``, ``alpha``, ``I1``, ``I5``, the arrays disagree in length, ``ab`` is
        not integral, or no cell centre falls on ``image``.
    """
    path = Path(path)
    with _open_hdf5(path) as file:
        missing = [key for key in UC_KEYS if not isinstance(file.get(key), h5py.Dataset)]
        if missing:
            present = ", ".join(_dataset_names(file)) or "none"
            raise DataFileError(
                f"{path}: unit-cell parameter dataset(s) {', '.join(map(repr, missing))} "
                f"missing; datasets present: {present}"
            )
        raw = {key: _read_array(file, path, key) for key in UC_KEYS}
    rows = {key: _as_rows(raw[key], path, key) for key in ("ab", "xy_COM", "Pxy")}
    vectors = {key: _as_vector(raw[key], path, key) for key in ("Vol", "a", "alpha", "I1", "I5")}
    lengths = {key: value.shape[-1] for key, value in {**rows, **vectors}.items()}
    if len(set(lengths.values())) != 1:
        listing = ", ".join(f"{key}: {n}" for key, n in lengths.items())
        raise DataFileError(f"{path}: unit-cell arrays disagree in length ({listing})")
    try:
        ab_float = rows["ab"].astype(np.float64)
        xy_com = rows["xy_COM"].astype(np.float64)
        pxy = rows["Pxy"].astype(np.float64)
        floats = {key: value.astype(np.float64) for key, value in vectors.items()}
    except (TypeError, ValueError) as error:
        raise DataFileError(f"{path}: unit-cell arrays must be numeric ({error})") from None
    if not (np.isfinite(ab_float).all() and np.array_equal(ab_float, np.round(ab_float))):
        raise DataFileError(f"{path}: dataset 'ab' must hold integer cell indices")

    if image is None:
        order, basis = "xy", "assumed"
    else:
        if image.ndim != 2:
            raise InvalidImageError(f"image for {path} must be 2-D, got shape {image.shape}")
        order, basis = _detect_xy_order(xy_com, image)
        if basis == "outside":
            raise DataFileError(
                f"{path}: no unit-cell centre falls on the {image.shape[0]}x{image.shape[1]} px "
                "image in either coordinate order; check that the files belong together"
            )
        if basis == "ambiguous":
            warnings.warn(
                f"{path}: cannot tell from the image whether xy_COM row 0 is x or y "
                "(the lattice looks the same both ways); assuming row 0 is x",
                UserWarning,
                stacklevel=2,
            )
    if order == "yx":
        xy_com, pxy = xy_com[::-1], pxy[::-1]
    return UnitCellParameters(
        ab=ab_float.astype(np.int64),
        x_px=np.ascontiguousarray(xy_com[0]),
        y_px=np.ascontiguousarray(xy_com[1]),
        pxy=np.ascontiguousarray(pxy),
        vol=floats["Vol"],
        a=floats["a"],
        alpha=floats["alpha"],
        i1=floats["I1"],
        i5=floats["I5"],
        xy_order=order,
        xy_order_basis=basis,
    )


# ----------------------------------------------------------------------------- writing


def _check_pixel_size(pixel_size_nm: float) -> None:
    if not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise ConfigError(f"pixel_size_nm must be a positive number of nanometres, got {pixel_size_nm}")


def _set_attr(attrs: h5py.AttributeManager, name: str, value: Any) -> None:
    try:
        attrs[name] = value
    except (TypeError, ValueError):
        # Nested or mixed values have no HDF5 attribute type; JSON keeps them readable.
        attrs[name] = json.dumps(value, default=str)


def write_dataset(
    directory: str | Path,
    image: np.ndarray,
    uc: UnitCellParameters | None,
    *,
    pixel_size_nm: float,
    composition_pct: float,
    index: int,
    xy_order: str = "xy",
    extra_attrs: Mapping[str, Any] | None = None,
) -> DatasetFiles:
    """Write an image (and its unit cells) in the Sm-BFO dataset layout.

    Parameters
    ----------
    directory : str or pathlib.Path
        Destination folder, created if needed; existing files of the same name are replaced.
    image : numpy.ndarray
        The image, shape ``(rows, cols)``; stored as float32 in ``MainImage`` with the
        attributes ``pixel_size_nm``, ``units = "counts"`` and ``extra_attrs``.
    uc : UnitCellParameters or None
        Unit cells to write to ``Sm_<pct>_<index>_UCParameterization.h5``; None writes only
        the image.
    pixel_size_nm : float
        Pixel size in nanometres.
    composition_pct : float
        Sm content in percent; written without a trailing ".0" (13 -> "13", 13.5 -> "13.5").
    index : int
        Field-of-view number.
    xy_order : {"xy", "yx"}
        Row order of ``xy_COM`` in the file; ``Pxy`` rows follow the same order. The
        published files do not say which they use, so both can be produced for testing.
    extra_attrs : mapping, optional
        Further attributes of ``MainImage``; values without an HDF5 type are stored as JSON.

    Returns
    -------
    DatasetFiles
        The files written.

    Raises
    ------
    ConfigError
        If the pixel size, composition, index or ``xy_order`` is invalid.
    InvalidImageError
        If the image is not 2-D or has NaN or infinite pixels.
    """
    _check_pixel_size(pixel_size_nm)
    if not (math.isfinite(composition_pct) and composition_pct >= 0):
        raise ConfigError(f"composition_pct must be a non-negative percentage, got {composition_pct}")
    if int(index) != index or index < 0:
        raise ConfigError(f"index must be a non-negative integer, got {index}")
    if xy_order not in ("xy", "yx"):
        raise ConfigError(f"xy_order must be 'xy' or 'yx', got {xy_order!r}")
    data = _as_float_image(np.asarray(image), "image to write")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"Sm_{_format_pct(composition_pct)}_{int(index)}"
    haadf = directory / f"{stem}_HAADF.h5"
    with h5py.File(haadf, "w") as file:
        dataset = file.create_dataset(IMAGE_KEY, data=data)
        dataset.attrs[PIXEL_SIZE_ATTR] = float(pixel_size_nm)
        dataset.attrs["units"] = "counts"
        for name, value in (extra_attrs or {}).items():
            _set_attr(dataset.attrs, name, value)
    uc_path = None
    if uc is not None:
        uc_path = directory / f"{stem}_UCParameterization.h5"
        xy_com = np.stack([uc.x_px, uc.y_px]).astype(np.float64)
        pxy = np.asarray(uc.pxy, dtype=np.float64)
        if xy_order == "yx":
            xy_com, pxy = xy_com[::-1], pxy[::-1]
        arrays = {
            "ab": np.asarray(uc.ab, dtype=np.int64),
            "xy_COM": xy_com,
            "Pxy": pxy,
            "Vol": uc.vol,
            "a": uc.a,
            "alpha": uc.alpha,
            "I1": uc.i1,
            "I5": uc.i5,
        }
        with h5py.File(uc_path, "w") as file:
            for key, value in arrays.items():
                file.create_dataset(key, data=np.ascontiguousarray(value))
    return DatasetFiles(
        haadf=haadf,
        uc_parameters=uc_path,
        composition_pct=float(composition_pct),
        index=int(index),
    )


# ----------------------------------------------------------------------------- any image


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found") from None
    except ValueError as error:
        raise DataFileError(
            f"{path}: not a plain numeric .npy array ({error}); save the image with np.save"
        ) from None
    except OSError as error:
        raise DataFileError(f"{path}: cannot read .npy file ({error})") from None


HYPERSPY_TIFF_TAGS = {"x_units": 65003, "y_units": 65004, "x_offset": 65006, "y_offset": 65007,
                      "x_scale": 65009, "y_scale": 65010}  # fmt: skip
"""Private TIFF tags in which hyperspy and rosettasciio keep each axis's units, offset and scale."""


def _load_tiff(path: Path) -> tuple[np.ndarray, float | None, dict[str, Any]]:
    """Image, pixel size (nm, from a calibrated file) and calibration attributes of a TIFF."""
    if not path.exists():
        raise DataFileError(f"{path}: file not found")
    try:
        with tifffile.TiffFile(path) as tiff:
            data = np.asarray(tiff.asarray())
            tags = {name: tiff.pages[0].tags.get(code) for name, code in HYPERSPY_TIFF_TAGS.items()}
            values = {name: tag.value for name, tag in tags.items() if tag is not None}
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise DataFileError(f"{path}: cannot read as TIFF ({error})") from None
    pixel_size = _vendor_pixel_size([{"units": values.get("x_units"), "scale": values.get("x_scale")}])
    attrs: dict[str, Any] = {}
    if pixel_size is not None:
        factor = pixel_size / float(values["x_scale"])
        attrs["origin_nm"] = [
            float(values.get("x_offset", 0.0)) * factor,
            float(values.get("y_offset", 0.0)) * factor,
        ]
    return data, pixel_size, attrs


def _vendor_pixel_size(axes: list[dict[str, Any]]) -> float | None:
    """Pixel size in nm from the x (last) signal axis of a rosettasciio signal, None if not a length."""
    if not axes:
        return None
    axis = axes[-1]
    units = str(axis.get("units") or "").strip().strip("[]").replace("_", "").lower()
    factor = _LENGTH_UNIT_NM.get(units)
    try:
        scale = float(axis.get("scale", math.nan))
    except (TypeError, ValueError):
        return None
    if factor is None or not (math.isfinite(scale) and scale > 0):
        return None
    return scale * factor


def _load_vendor(path: Path) -> tuple[np.ndarray, float | None, dict[str, Any]]:
    """Image, pixel size (nm) and a few metadata of a vendor file, through rosettasciio."""
    import importlib

    module_name, format_name = VENDOR_READERS[path.suffix.lower()]
    if not path.exists():
        raise DataFileError(f"{path}: file not found")
    try:
        reader = importlib.import_module(f"rsciio.{module_name}")
    except ImportError:
        raise DataFileError(
            f"{path}: reading {format_name} files ({path.suffix}) needs the optional 'vendor' extra "
            "(rosettasciio), which is not installed; run: pip install 'micrography[vendor]'"
        ) from None
    try:
        signals = reader.file_reader(str(path))
    except Exception as error:  # vendor readers raise anything from KeyError to struct.error
        raise DataFileError(
            f"{path}: cannot read as {format_name} ({type(error).__name__}: {error}); "
            "the file may be truncated or of another format"
        ) from None
    if not signals:
        raise DataFileError(f"{path}: the {format_name} file holds no data")
    images = [signal for signal in signals if np.ndim(signal.get("data")) == 2]
    chosen = images[0] if images else signals[0]
    attrs: dict[str, Any] = {"source_format": format_name, "signals_in_file": len(signals)}
    title = (chosen.get("metadata") or {}).get("General", {}).get("title")
    if title:
        attrs["title"] = str(title)
    return np.asarray(chosen["data"]), _vendor_pixel_size(list(chosen.get("axes") or [])), attrs


def load_image(path: str | Path, pixel_size_nm: float | None = None) -> RecordedImage:
    """Load a recorded image from the dataset layout, a ``.npy`` or a ``.tif`` file.

    Parameters
    ----------
    path : str or pathlib.Path
        A ``.h5``/``.hdf5`` HAADF file or a directory in the Sm-BFO layout (the unit-cell
        parameters beside it are read too, their coordinate order checked against the
        image), a ``.npy`` array, a ``.tif``/``.tiff`` image, or, with the optional
        ``vendor`` extra (rosettasciio), a ``.dm3``/``.dm4`` (Gatan), ``.emd`` (Velox or
        Berkeley) or ``.ser`` (FEI TIA) file; of a vendor file holding several signals the
        first 2-D image is taken.
    pixel_size_nm : float, optional
        Pixel size in nanometres; overrides the file's. ``.npy`` and ``.tif`` files carry
        none, so without it the result has ``pixel_size_nm = None``; vendor files carry it
        in their axis calibration (nm, Å, pm or µm).

    Returns
    -------
    RecordedImage
        The image as float32 with its pixel size, source file and unit cells.

    Raises
    ------
    DataFileError
        If the file is missing, unreadable, or of an unsupported format, or a vendor file is
        given without the ``vendor`` extra installed.
    InvalidImageError
        If the image is not 2-D (a 3-D stack must be reduced to one frame first), is not
        real-valued, or has NaN or infinite pixels.
    ConfigError
        If ``pixel_size_nm`` is not a positive number.
    """
    path = Path(path)
    if pixel_size_nm is not None:
        _check_pixel_size(pixel_size_nm)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".h5", ".hdf5"):
        files = find_dataset_files(path)
        image, file_pixel_size, attrs = read_haadf(files.haadf)
        uc = None
        if files.uc_parameters is not None:
            uc = read_uc_parameters(files.uc_parameters, image)
        return RecordedImage(
            image=image,
            pixel_size_nm=pixel_size_nm if pixel_size_nm is not None else file_pixel_size,
            source=files.haadf,
            uc_parameters=uc,
            attrs=attrs,
        )
    file_pixel_size: float | None = None
    attrs: dict[str, Any] = {}
    if suffix == ".npy":
        data = _load_npy(path)
    elif suffix in (".tif", ".tiff"):
        data, file_pixel_size, attrs = _load_tiff(path)
    elif suffix in VENDOR_READERS:
        data, file_pixel_size, attrs = _load_vendor(path)
    else:
        raise DataFileError(
            f"{path}: unsupported image format {path.suffix!r}; use one of "
            f"{', '.join(SUPPORTED_SUFFIXES)} or a directory in the Sm_<pct>_<n>_HAADF.h5 layout"
        )
    return RecordedImage(
        image=_as_float_image(data, str(path)),
        pixel_size_nm=pixel_size_nm if pixel_size_nm is not None else file_pixel_size,
        source=path,
        uc_parameters=None,
        attrs=attrs,
    )
