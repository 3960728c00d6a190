"""Reading and writing the Sm-BFO dataset layout and plain images."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from agent.errors import ConfigError, DataFileError, InvalidImageError
from simulator.dataset import (
    UC_KEYS,
    UnitCellParameters,
    find_dataset_files,
    load_image,
    read_haadf,
    read_uc_parameters,
    write_dataset,
)


def lattice(
    shape: tuple[int, int], spacing: float, angle_deg: float, seed: int = 0, margin: float = 6.0
) -> tuple[np.ndarray, UnitCellParameters]:
    """Gaussian blobs at the centres of a rotated square lattice, with mild noise."""
    rows, cols = shape
    rng = np.random.default_rng(seed)
    theta = np.radians(angle_deg)
    n = int(2 * max(rows, cols) / spacing) + 2
    i, j = np.meshgrid(np.arange(-n, n), np.arange(-n, n), indexing="ij")
    x = 0.37 * spacing + spacing * (i * np.cos(theta) - j * np.sin(theta))
    y = 0.71 * spacing + spacing * (i * np.sin(theta) + j * np.cos(theta))
    keep = (x > margin) & (x < cols - 1 - margin) & (y > margin) & (y < rows - 1 - margin)
    x, y, i, j = x[keep], y[keep], i[keep], j[keep]
    yy, xx = np.mgrid[0:rows, 0:cols]
    image = np.full(shape, 10.0)
    amplitude = 100.0 * (1 + 0.1 * rng.standard_normal(x.size))
    for xc, yc, amp in zip(x, y, amplitude, strict=True):
        r0, r1 = int(yc) - 6, int(yc) + 7
        c0, c1 = int(xc) - 6, int(xc) + 7
        image[r0:r1, c0:c1] += amp * np.exp(
            -((xx[r0:r1, c0:c1] - xc) ** 2 + (yy[r0:r1, c0:c1] - yc) ** 2) / (2 * 1.5**2)
        )
    image += rng.normal(0.0, 2.0, shape)
    n_cells = x.size
    uc = UnitCellParameters(
        ab=np.stack([i, j]).astype(np.int64),
        x_px=x,
        y_px=y,
        pxy=np.array([[0.3], [-0.1]]) + 0.01 * rng.random((2, n_cells)),
        vol=rng.random(n_cells),
        a=rng.random(n_cells),
        alpha=rng.random(n_cells),
        i1=amplitude,
        i5=rng.random(n_cells),
    )
    return image.astype(np.float32), uc


def assert_same_cells(got: UnitCellParameters, want: UnitCellParameters) -> None:
    for name in ("ab", "x_px", "y_px", "pxy", "vol", "a", "alpha", "i1", "i5"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.fixture(scope="module")
def tall_lattice() -> tuple[np.ndarray, UnitCellParameters]:
    return lattice((256, 200), spacing=12.0, angle_deg=4.0)


@pytest.fixture(scope="module")
def square_lattice() -> tuple[np.ndarray, UnitCellParameters]:
    return lattice((200, 200), spacing=12.0, angle_deg=5.0, seed=1)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("order", ["xy", "yx"])
def test_round_trip_non_square_detects_order_from_bounds(tmp_path, tall_lattice, order):
    image, uc = tall_lattice
    files = write_dataset(
        tmp_path,
        image,
        uc,
        pixel_size_nm=0.02,
        composition_pct=13,
        index=0,
        xy_order=order,
        extra_attrs={"specimen_seed": 3, "note": {"nested": [1, 2]}},
    )
    assert files.haadf.name == "Sm_13_0_HAADF.h5"
    assert files.uc_parameters is not None
    assert files.uc_parameters.name == "Sm_13_0_UCParameterization.h5"
    recorded = load_image(files.haadf)
    np.testing.assert_array_equal(recorded.image, image)
    assert recorded.image.dtype == np.float32
    assert recorded.pixel_size_nm == pytest.approx(0.02)
    assert recorded.source == files.haadf
    cells = recorded.uc_parameters
    assert cells is not None
    assert (cells.xy_order, cells.xy_order_basis) == (order, "bounds")
    assert_same_cells(cells, uc)
    with h5py.File(files.haadf) as file:
        assert file["MainImage"].attrs["units"] == "counts"
        assert file["MainImage"].attrs["specimen_seed"] == 3


@pytest.mark.parametrize("order", ["xy", "yx"])
def test_round_trip_square_detects_order_from_image(tmp_path, square_lattice, order):
    image, uc = square_lattice
    files = write_dataset(
        tmp_path, image, uc, pixel_size_nm=0.015, composition_pct=13.5, index=2, xy_order=order
    )
    assert files.haadf.name == "Sm_13.5_2_HAADF.h5"
    recorded = load_image(tmp_path)
    cells = recorded.uc_parameters
    assert cells is not None
    assert (cells.xy_order, cells.xy_order_basis) == (order, "image")
    assert_same_cells(cells, uc)


@pytest.mark.parametrize("order", ["xy", "yx"])
def test_order_from_image_survives_heavy_noise_and_small_rotation(tmp_path, order):
    image, uc = lattice((160, 160), spacing=12.0, angle_deg=1.5, seed=4)
    image = image + np.random.default_rng(5).normal(0.0, 40.0, image.shape).astype(np.float32)
    files = write_dataset(
        tmp_path, image, uc, pixel_size_nm=0.02, composition_pct=13, index=0, xy_order=order
    )
    assert files.uc_parameters is not None
    cells = read_uc_parameters(files.uc_parameters, image)
    assert (cells.xy_order, cells.xy_order_basis) == (order, "image")


def test_lattice_aligned_with_scan_axes_is_reported_ambiguous(tmp_path):
    image, uc = lattice((160, 160), spacing=12.0, angle_deg=0.0, seed=2)
    files = write_dataset(tmp_path, image, uc, pixel_size_nm=0.02, composition_pct=13, index=0, xy_order="yx")
    assert files.uc_parameters is not None
    with pytest.warns(UserWarning, match="cannot tell from the image whether xy_COM row 0 is x"):
        cells = read_uc_parameters(files.uc_parameters, image)
    assert (cells.xy_order, cells.xy_order_basis) == ("xy", "ambiguous")


def test_uc_order_without_image_is_assumed_xy(tmp_path, square_lattice):
    image, uc = square_lattice
    files = write_dataset(tmp_path, image, uc, pixel_size_nm=0.015, composition_pct=20, index=1)
    assert files.uc_parameters is not None
    cells = read_uc_parameters(files.uc_parameters)
    assert (cells.xy_order, cells.xy_order_basis) == ("xy", "assumed")
    assert_same_cells(cells, uc)


def test_uc_arrays_written_transposed_as_from_matlab_are_accepted(tmp_path, square_lattice):
    image, uc = square_lattice
    path = tmp_path / "Sm_13_0_UCParameterization.h5"
    with h5py.File(path, "w") as file:
        file["ab"] = uc.ab.T
        file["xy_COM"] = np.stack([uc.x_px, uc.y_px]).T
        file["Pxy"] = uc.pxy.T
        for key, values in (("Vol", uc.vol), ("a", uc.a), ("alpha", uc.alpha), ("I1", uc.i1)):
            file[key] = values[:, None]
        file["I5"] = uc.i5
    assert_same_cells(read_uc_parameters(path, image), uc)


def test_image_without_uc_file_and_unnamed_file(tmp_path):
    image = np.arange(12, dtype=np.float64).reshape(3, 4)
    files = write_dataset(tmp_path, image, None, pixel_size_nm=0.1, composition_pct=0, index=5)
    assert files.uc_parameters is None
    renamed = files.haadf.rename(tmp_path / "frame.h5")
    found = find_dataset_files(renamed)
    assert (found.composition_pct, found.index, found.uc_parameters) == (None, None, None)
    recorded = load_image(renamed, pixel_size_nm=0.25)
    assert recorded.pixel_size_nm == 0.25
    assert recorded.uc_parameters is None
    np.testing.assert_array_equal(recorded.image, image.astype(np.float32))


def test_names_are_matched_without_case(tmp_path, tall_lattice):
    image, uc = tall_lattice
    files = write_dataset(tmp_path, image, uc, pixel_size_nm=0.02, composition_pct=13, index=0)
    assert files.uc_parameters is not None
    haadf = files.haadf.rename(tmp_path / "SM_13_0_HAADF.h5")
    uc_path = files.uc_parameters.rename(tmp_path / "sm_13_0_ucparameterization.h5")
    for target in (haadf, tmp_path):
        found = find_dataset_files(target)
        assert found.haadf == haadf
        assert found.uc_parameters == uc_path
        assert (found.composition_pct, found.index) == (13.0, 0)
    # A UC file of another field of view must not be paired with this image.
    uc_path.rename(tmp_path / "Sm_13_1_UCParameterization.h5")
    assert find_dataset_files(haadf).uc_parameters is None


def test_npy_round_trip(tmp_path):
    image = np.random.default_rng(0).random((20, 30))
    path = tmp_path / "frame.npy"
    np.save(path, image)
    recorded = load_image(path, pixel_size_nm=0.05)
    np.testing.assert_array_equal(recorded.image, image.astype(np.float32))
    assert recorded.pixel_size_nm == 0.05
    assert load_image(path).pixel_size_nm is None


def test_tif_round_trip(tmp_path):
    image = np.random.default_rng(1).integers(0, 60000, (24, 17)).astype(np.uint16)
    path = tmp_path / "frame.TIF"
    tifffile.imwrite(path, image)
    recorded = load_image(path, pixel_size_nm=0.02)
    np.testing.assert_array_equal(recorded.image, image.astype(np.float32))
    assert recorded.image.dtype == np.float32


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "Sm_13_0_HAADF.h5"
    with pytest.raises(DataFileError, match=r"Sm_13_0_HAADF\.h5.*no such file"):
        load_image(missing)
    with pytest.raises(DataFileError, match=r"Sm_13_0_HAADF\.h5: file not found"):
        read_haadf(missing)
    with pytest.raises(DataFileError, match=r"nothing\.npy: file not found"):
        load_image(tmp_path / "nothing.npy")


def test_missing_main_image_lists_present_keys(tmp_path):
    path = tmp_path / "Sm_13_0_HAADF.h5"
    with h5py.File(path, "w") as file:
        file["Image"] = np.zeros((4, 4))
        file.create_group("meta")["scan"] = np.zeros(3)
    with pytest.raises(DataFileError, match=r"Sm_13_0_HAADF\.h5.*'MainImage' is missing.*Image, meta/scan"):
        load_image(path)
    image, _, _ = read_haadf(path, key="Image")
    assert image.shape == (4, 4)


def test_missing_uc_key(tmp_path, tall_lattice):
    image, uc = tall_lattice
    files = write_dataset(tmp_path, image, uc, pixel_size_nm=0.02, composition_pct=13, index=0)
    assert files.uc_parameters is not None
    with h5py.File(files.uc_parameters, "a") as file:
        del file["alpha"]
    with pytest.raises(DataFileError, match=r"UCParameterization\.h5.*'alpha' missing"):
        load_image(files.haadf)


def test_uc_arrays_of_different_length(tmp_path, tall_lattice):
    image, uc = tall_lattice
    files = write_dataset(tmp_path, image, uc, pixel_size_nm=0.02, composition_pct=13, index=0)
    assert files.uc_parameters is not None
    with h5py.File(files.uc_parameters, "a") as file:
        del file["I5"]
        file["I5"] = np.zeros(3)
    with pytest.raises(DataFileError, match=r"disagree in length.*I5: 3"):
        read_uc_parameters(files.uc_parameters)


def test_uc_centres_off_the_image(tmp_path, tall_lattice):
    image, uc = tall_lattice
    files = write_dataset(tmp_path, image, uc, pixel_size_nm=0.02, composition_pct=13, index=0)
    assert files.uc_parameters is not None
    with pytest.raises(DataFileError, match="no unit-cell centre falls on the 3x3 px image"):
        read_uc_parameters(files.uc_parameters, np.zeros((3, 3)))


def test_corrupt_file(tmp_path):
    path = tmp_path / "Sm_13_0_HAADF.h5"
    path.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataFileError, match=r"Sm_13_0_HAADF\.h5: cannot read as HDF5"):
        load_image(path)


def test_nan_image_reports_count(tmp_path):
    path = tmp_path / "Sm_13_0_HAADF.h5"
    image = np.ones((8, 8))
    image[1, 2] = np.nan
    image[3, 3] = np.inf
    image[5, 0] = np.nan
    with h5py.File(path, "w") as file:
        file["MainImage"] = image
    with pytest.raises(InvalidImageError, match="3 of 64 pixels are NaN or infinite"):
        load_image(path)


def test_unsupported_suffix(tmp_path):
    # .dm4 is read through the optional vendor extra now (tests/test_analyze.py); .jpg never is.
    path = tmp_path / "frame.jpg"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(DataFileError, match=r"frame\.jpg: unsupported image format '\.jpg'.*\.npy"):
        load_image(path)


def test_three_d_stack(tmp_path):
    path = tmp_path / "stack.npy"
    np.save(path, np.zeros((3, 8, 8)))
    with pytest.raises(InvalidImageError, match=r"stack\.npy.*shape \(3, 8, 8\).*pick one frame"):
        load_image(path)
    with h5py.File(tmp_path / "stack.h5", "w") as file:
        file["MainImage"] = np.zeros((2, 4, 4))
    with pytest.raises(InvalidImageError, match="pick one frame"):
        load_image(tmp_path / "stack.h5")


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataFileError, match=r"objects\.npy: not a plain numeric \.npy array"):
        load_image(path)


def test_directory_with_two_haadf_files(tmp_path):
    for index in (0, 1):
        write_dataset(tmp_path, np.zeros((4, 4)), None, pixel_size_nm=0.1, composition_pct=13, index=index)
    with pytest.raises(
        DataFileError,
        match=r"2 HAADF images \(Sm_13_0_HAADF\.h5, Sm_13_1_HAADF\.h5\); name the one",
    ):
        load_image(tmp_path)
    assert load_image(tmp_path / "Sm_13_1_HAADF.h5").image.shape == (4, 4)


def test_uc_file_named_instead_of_image(tmp_path, tall_lattice):
    image, uc = tall_lattice
    files = write_dataset(tmp_path, image, uc, pixel_size_nm=0.02, composition_pct=13, index=0)
    assert files.uc_parameters is not None
    with pytest.raises(DataFileError, match="unit-cell parameter file; name the matching"):
        load_image(files.uc_parameters)


def test_directory_without_haadf_file(tmp_path):
    with pytest.raises(DataFileError, match=r"no file named like Sm_<pct>_<n>_HAADF\.h5"):
        find_dataset_files(tmp_path)


def test_invalid_pixel_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="pixel_size_nm must be a positive"):
        write_dataset(tmp_path, np.zeros((4, 4)), None, pixel_size_nm=0.0, composition_pct=13, index=0)
    path = tmp_path / "frame.npy"
    np.save(path, np.zeros((4, 4)))
    with pytest.raises(ConfigError, match="pixel_size_nm must be a positive"):
        load_image(path, pixel_size_nm=-1.0)


def test_uc_keys_are_the_published_ones():
    assert UC_KEYS == ("ab", "xy_COM", "Pxy", "Vol", "a", "alpha", "I1", "I5")


def test_path_helper_types(tmp_path):
    files = write_dataset(
        str(tmp_path), np.zeros((2, 2)), None, pixel_size_nm=1.0, composition_pct=14.25, index=3
    )
    assert isinstance(files.haadf, Path)
    assert files.haadf.name == "Sm_14.25_3_HAADF.h5"
    assert find_dataset_files(str(files.haadf)).composition_pct == 14.25
