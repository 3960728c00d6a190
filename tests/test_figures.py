"""Figures a microscopist reads at a glance: labelled colour bars with units, clipped score scales,
the polarization key with its magnitude, legible tile numbers, titles that neither collide nor run
off the page, and empty panels that say why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from agent.session import BudgetConfig, Session
from agent.survey import CandidateGrid
from analysis.analyze import AnalyzeConfig, analyze_image, summarise
from analysis.analyze_report import overview_figure, section_figures
from analysis.figures import clipped_norm, colour_wheel_key, pixel_size_label, tile_numbers, vector_rgb
from analysis.guidance import DiscoveryTracker, session_report_figure
from analysis.preview import preview_figure
from simulator.config import SimulatorConfig
from simulator.dataset import load_image
from simulator.drivers import SimulatedMicroscope
from simulator.export import export_specimen
from simulator.specimen import Specimen
from tests.test_session import SMALL_SESSION, run_session

ASCII_UNITS = ("A^2", "e-/A", "A/px", " A)")
"""Spellings of Å that a figure must not show."""


@pytest.fixture
def close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def _texts(figure: Figure) -> list[Text]:
    return [t for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _colour_bars(figure: Figure) -> list[plt.Axes]:
    """The axes of every colour bar in ``figure``."""
    return [ax for ax in figure.axes if getattr(ax, "_colorbar", None) is not None]


def _check_readable(figure: Figure) -> None:
    """Every colour bar says quantity (unit); no ASCII Å; titles inside the page and apart."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for bar in _colour_bars(figure):
        label = bar._colorbar.ax.get_ylabel() or bar._colorbar.ax.get_xlabel()
        assert label.strip(), "a colour bar without a label"
        assert "(" in label and label.endswith(")"), f"colour bar {label!r} states no unit"
    for text in _texts(figure):
        for ascii_unit in ASCII_UNITS:
            assert ascii_unit not in text.get_text(), f"{text.get_text()!r} spells a unit in ASCII"
    page = figure.bbox
    titles = [ax.title for ax in figure.axes if ax.title.get_text()]
    if figure._suptitle is not None:
        titles.append(figure._suptitle)
    boxes = [title.get_window_extent(renderer) for title in titles]
    for title, box in zip(titles, boxes, strict=True):
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1, (
            f"title {title.get_text()!r} runs off the page"
        )
    for i, first in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            assert not first.overlaps(boxes[j]), (
                f"titles {titles[i].get_text()!r} and {titles[j].get_text()!r} collide"
            )


# ----------------------------------------------------------------------------- building blocks


def test_a_clipped_scale_keeps_the_normal_lattice_visible_beside_one_hot_cluster() -> None:
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(1.0, 0.3, 5000), np.full(20, 400.0)]
    norm, extend = clipped_norm(scores, at_least=3.0, at_most=9.0)
    # An unclipped scale would put the normal lattice at 1/400 of the colour range: black.
    assert norm(1.0) > 0.1 and norm.vmax <= 9.0 and extend == "max"
    assert norm.vmin == 0.0
    # Without an outlier there is nothing to clip, and the threshold stays inside the scale.
    quiet, extend = clipped_norm(rng.normal(1.0, 0.3, 5000), at_least=3.0)
    assert quiet.vmax == 3.0 and extend == "neither"
    empty, extend = clipped_norm(np.full(4, np.nan))
    assert (empty.vmin, empty.vmax, extend) == (0.0, 1.0, "neither")


def test_the_colour_wheel_key_points_as_the_map_and_states_its_rim(close_figures: None) -> None:
    # +x is red on the map and on the key; +y (down on an image) is drawn down on the key too.
    red = vector_rgb(np.array(1.0), np.array(0.0), 1.0)
    assert red[0] > 0.8 and red[1] < 0.3 and red[2] < 0.3
    assert np.allclose(vector_rgb(np.array(0.0), np.array(0.0), 1.0), 0.0)
    _, ax = plt.subplots()
    inset = colour_wheel_key(ax, 25.0, "pm")
    wheel = inset.get_images()[0]
    *_, bottom, top = wheel.get_extent()
    assert (bottom, top) == (1, -1), "the key's y axis points down like the image's"
    assert [t.get_text() for t in inset.texts] == ["rim 25 pm"]
    rgb = np.asarray(wheel.get_array())
    middle = rgb.shape[0] // 2
    assert mcolors.rgb_to_hsv(rgb[middle, -10])[0] < 0.05  # right edge: red (+x)


def test_tile_numbers_follow_the_acquisition_order(close_figures: None) -> None:
    _, ax = plt.subplots()
    labels = tile_numbers(ax, [5.0, 15.0, 25.0], [5.0, 5.0, 10.0], ["#ffb000", "#00c0ff", "#00c0ff"])
    assert [label.get_text() for label in labels] == ["1", "2", "3"]
    assert [label.get_position() for label in labels] == [(5.0, 5.0), (15.0, 5.0), (25.0, 10.0)]
    assert all(label.get_path_effects() for label in labels), "numbers are outlined to read on any image"
    assert pixel_size_label(0.0404) == "0.404 Å/px"


# ----------------------------------------------------------------------------- whole figures


def test_the_session_report_labels_every_scale_and_numbers_every_tile(
    small_config: SimulatorConfig, small_specimen: Specimen, close_figures: None
) -> None:
    session = run_session(small_config, small_specimen, SMALL_SESSION, None)
    figure = session_report_figure(session)
    _check_readable(figure)
    bars = {bar._colorbar.ax.get_ylabel() for bar in _colour_bars(figure)}
    assert bars == {
        "survey HAADF intensity (counts)",
        "node anomaly score (RMS z)",
        "fringe distortion and loss (z)",
        "tile interest (RMS z)",
        "std of tile interest (RMS z)",
    }
    steps = [step for step in session.steps if step.kind != "survey"]
    path = figure.axes[0]
    numbers = [t for t in path.texts if t.get_text().isdigit()]
    assert [t.get_text() for t in numbers] == [str(n) for n in range(1, len(steps) + 1)]
    assert [t.get_position() for t in numbers] == [(s.request.x_nm, s.request.y_nm) for s in steps]
    # The anomaly scale keeps the detection threshold inside and never runs past three of it.
    anomaly = figure.axes[1].collections[-1]
    threshold = session.config.detection_threshold
    assert threshold <= anomaly.norm.vmax <= 3 * threshold
    # Without ground truth the discovery panel says why it is empty.
    assert "no ground truth" in " ".join(t.get_text() for t in figure.axes[5].texts)


def test_a_raster_report_says_why_it_has_no_surrogate(
    small_config: SimulatorConfig, small_specimen: Specimen, close_figures: None
) -> None:
    config = SMALL_SESSION.model_copy(update={"policy": "raster", "budget": BudgetConfig(max_tiles=4)})
    with SimulatedMicroscope(small_config, small_specimen) as microscope:
        grid = CandidateGrid.tiling(microscope.describe(), config.tiles.shape, config.tiles.pixel_size_nm)
        tracker = DiscoveryTracker(small_specimen, grid)
        session = Session(microscope, config, on_step=tracker)
        session.run()
    figure = session_report_figure(session, tracker)
    _check_readable(figure)
    empty = {ax.get_title(): " ".join(" ".join(t.get_text().split()) for t in ax.texts) for ax in figure.axes}
    assert "keeps no surrogate" in empty["Surrogate mean: predicted tile interest"]
    assert "only the guided policy" in empty["Survey prior"]
    assert figure.axes[5].get_title().startswith("Discovery:")


def test_the_specimen_preview_states_intensity_and_polarization_scales(
    small_config: SimulatorConfig, small_specimen: Specimen, close_figures: None
) -> None:
    figure = preview_figure(small_specimen, small_config, survey_pixel_nm=0.25, tile_px=128)
    _check_readable(figure)
    bars = [bar._colorbar.ax.get_ylabel() for bar in _colour_bars(figure)]
    assert bars == ["HAADF intensity (counts)", "HAADF intensity (counts)"]
    rim = 1000 * small_config.specimen.polar_displacement_nm
    keys = [t.get_text() for t in _texts(figure) if t.get_text().startswith("rim")]
    assert keys == [f"rim {rim:.3g} pm"]


def test_the_analysis_figures_label_scales_and_classes(
    tmp_path: Path, small_specimen: Specimen, small_config: SimulatorConfig, close_figures: None
) -> None:
    export_specimen(small_specimen, small_config, tmp_path, pixel_size_nm=0.02, dwell_us=4.0)
    result = analyze_image(load_image(tmp_path), AnalyzeConfig(gae_steps=20, vae_steps=60))
    result.summary = summarise(result, {})
    overview = overview_figure(result)
    _check_readable(overview)
    by_title = {ax.get_title(): ax for ax in overview.axes}
    gmm = next(ax for title, ax in by_title.items() if title.startswith("GMM classes"))
    shares = [t.get_text() for t in gmm.get_legend().get_texts()]
    assert len(shares) == result.segmentation.classes
    assert abs(sum(float(share.split(": ")[1].rstrip("%")) for share in shares) - 100) <= len(shares)
    wheel = [t.get_text() for t in _texts(overview) if t.get_text().startswith("rim")]
    assert wheel and wheel[0].endswith(" pm")
    for figure in section_figures(result).values():
        _check_readable(figure)
