"""The ``micrography`` command line.

The CLI is the one place that wires the agent to the simulator and analysis
packages; library code never imports across that line. Every
:class:`~agent.errors.MicrographyError` becomes a one-line message on stderr
and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import ConfigError, MicrographyError

DESCRIPTION = """\
Micrography: guided acquisition for scanning transmission electron microscopes.

Commands:
  simulate   write the synthetic Sm-BFO specimen as a recorded dataset (+ preview PNG)
  describe   print what an instrument can do (stage, pixel sizes, dwell, detectors)
  acquire    take one tile from the simulated or a replayed microscope and save it
  bench      measure speed against the project's targets (prints a table, writes JSON)

Run `micrography COMMAND --help` for the options of each command.
"""


def _simulator_config(path: str | None, seed: int | None) -> Any:
    from agent.config import load_config
    from simulator.config import SimulatorConfig

    config = load_config(path, SimulatorConfig) if path else SimulatorConfig()
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    return config


def _open_driver(args: argparse.Namespace) -> Any:
    """The simulated microscope, or a replay of a recorded image when ``--replay`` is given."""
    if getattr(args, "replay", None):
        from simulator.replay import ReplayMicroscope

        return ReplayMicroscope.from_path(args.replay, pixel_size_nm=args.replay_pixel_size)
    from simulator.drivers import SimulatedMicroscope

    return SimulatedMicroscope(_simulator_config(args.config, args.seed))


def _progress_status(message: str) -> Any:
    from rich.console import Console

    return Console(stderr=True).status(message)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Generate, render and write the synthetic specimen."""
    from simulator.export import export_specimen
    from simulator.specimen import generate_specimen

    config = _simulator_config(args.config, args.seed)
    with _progress_status(f"generating specimen (seed {config.seed})"):
        specimen = generate_specimen(config.specimen, config.seed)
    with _progress_status(
        f"rendering {specimen.size_nm[0]:g} x {specimen.size_nm[1]:g} nm at {args.pixel_size:g} nm/px"
    ):
        exported = export_specimen(
            specimen, config, args.out, pixel_size_nm=args.pixel_size, dwell_us=args.dwell
        )
    print(f"specimen: {len(specimen):,} columns, {len(specimen.features)} planted features")
    for name, count in specimen.label_counts().items():
        print(f"  {name:<17} {count:>8,} columns")
    print(f"image:        {exported.dataset.haadf}")
    print(f"unit cells:   {exported.dataset.uc_parameters}")
    print(f"ground truth: {exported.ground_truth}")
    print(f"config:       {exported.config}")
    if args.preview:
        from simulator.preview import write_preview

        with _progress_status("drawing preview"):
            preview = write_preview(specimen, config, Path(args.out) / "preview.png")
        print(f"preview:      {preview}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """Print the instrument description as JSON."""
    with _open_driver(args) as microscope:
        print(microscope.describe().model_dump_json(indent=2))
    return 0


def cmd_acquire(args: argparse.Namespace) -> int:
    """Acquire one tile and save it."""
    import numpy as np

    from agent.driver import ScanRequest

    out = Path(args.out)
    if out.suffix.lower() not in (".npy", ".png", ".tif", ".tiff"):
        raise ConfigError(f"--out {out}: use a .npy, .tif or .png file name")
    request = ScanRequest(
        x_nm=args.x,
        y_nm=args.y,
        shape=(args.rows, args.cols),
        pixel_size_nm=args.pixel_size,
        dwell_us=args.dwell,
        detector=args.detector,
    )
    with _open_driver(args) as microscope:
        tile = microscope.acquire(request)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        np.save(out, tile.image)
    elif out.suffix.lower() == ".png":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.imsave(out, tile.image, cmap="gray")
    else:
        import tifffile

        tifffile.imwrite(out, tile.image)
    summary = {
        "file": str(out),
        "shape": list(tile.shape),
        "origin_nm": list(tile.origin_nm),
        "pixel_size_nm": tile.pixel_size_nm,
        "dose_e_per_a2": tile.dose_e_per_a2,
        "scan_time_s": tile.t_end - tile.t_start,
        "mean_counts": float(tile.image.mean()),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one benchmark, print its table and write its JSON."""
    from agent.benchmarking import write_report

    if args.target == "simulator":
        from simulator.bench import benchmark_simulator, format_report

        report = benchmark_simulator(
            _simulator_config(args.config, None), repeats=args.repeats, pixel_size_nm=args.pixel_size
        )
    else:  # argparse restricts the choices; kept for type checkers
        raise ConfigError(f"unknown benchmark {args.target!r}")
    print(format_report(report))
    write_report(report, args.json)
    if args.json:
        print(f"written: {args.json}")
    return 0


def _add_instrument_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="simulator configuration (default: built-in, as configs/simulator.yaml)",
    )
    parser.add_argument("--seed", type=int, help="specimen seed (overrides the configuration)")
    parser.add_argument(
        "--replay",
        metavar="PATH",
        help="replay a recorded image (.h5 dataset layout, .npy, .tif) instead of simulating",
    )
    parser.add_argument(
        "--replay-pixel-size",
        type=float,
        metavar="NM",
        help="pixel size of the recorded image, nm (when the file lacks it)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command and its help."""
    parser = argparse.ArgumentParser(
        prog="micrography", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"micrography {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    simulate = commands.add_parser(
        "simulate",
        help="write the synthetic specimen as a recorded dataset",
        description=(
            "Generate the synthetic Sm-doped BiFeO3 specimen, render it as one large HAADF image and "
            "write it in the layout of the open Sm-BFO dataset (Sm_<pct>_<n>_HAADF.h5 with MainImage, "
            "Sm_<pct>_<n>_UCParameterization.h5), plus ground_truth.h5 (every column with its label) "
            "and the configuration used. The image has no drift, so ground-truth positions hold "
            "in its pixels."
        ),
    )
    simulate.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    simulate.add_argument("--config", metavar="YAML", help="simulator configuration (default: built-in)")
    simulate.add_argument(
        "--seed", type=int, help="specimen seed (overrides the configuration); also the file index n"
    )
    simulate.add_argument(
        "--pixel-size",
        type=float,
        default=0.04,
        metavar="NM",
        help="pixel size of the image, nm (default 0.04: ~10 px per unit cell, 4000 px for 160 nm)",
    )
    simulate.add_argument(
        "--dwell",
        type=float,
        default=2.0,
        metavar="US",
        help="dwell per pixel, microseconds (sets the counting noise; default 2)",
    )
    simulate.add_argument(
        "--preview",
        action="store_true",
        help="also write preview.png: survey, ground truth, polarization map, one tile",
    )
    simulate.set_defaults(handler=cmd_simulate)

    describe = commands.add_parser(
        "describe",
        help="print what the instrument can do",
        description=(
            "Print the instrument description (stage limits in nm, pixel-size and dwell ranges, "
            "largest tile, detectors, beam current) as JSON."
        ),
    )
    _add_instrument_options(describe)
    describe.set_defaults(handler=cmd_describe)

    acquire = commands.add_parser(
        "acquire",
        help="take one tile and save it",
        description=(
            "Acquire one tile from the simulated microscope (or a replayed image) and save it as "
            ".npy, .tif or .png; prints its placement, dose and scan time."
        ),
    )
    _add_instrument_options(acquire)
    acquire.add_argument(
        "--x", type=float, required=True, metavar="NM", help="stage x of the tile centre, nm"
    )
    acquire.add_argument(
        "--y", type=float, required=True, metavar="NM", help="stage y of the tile centre, nm"
    )
    acquire.add_argument("--rows", type=int, default=512, help="tile rows, pixels (default 512)")
    acquire.add_argument("--cols", type=int, default=512, help="tile columns, pixels (default 512)")
    acquire.add_argument(
        "--pixel-size", type=float, default=0.02, metavar="NM", help="pixel size, nm (default 0.02)"
    )
    acquire.add_argument(
        "--dwell", type=float, default=2.0, metavar="US", help="dwell per pixel, microseconds (default 2)"
    )
    acquire.add_argument("--detector", default="HAADF", help="detector name (default HAADF)")
    acquire.add_argument(
        "--out", required=True, metavar="FILE", help="where to save the tile (.npy, .tif, .png)"
    )
    acquire.set_defaults(handler=cmd_acquire)

    bench = commands.add_parser(
        "bench",
        help="measure speed against the targets",
        description="Run a benchmark, print its table and optionally write the figures as JSON. "
        "simulator: median time to render 512x512 and 4096x4096 high-resolution tiles "
        "(targets 0.05 s and 3 s on 2 cores).",
    )
    bench.add_argument("target", choices=["simulator"], help="what to measure")
    bench.add_argument("--json", metavar="PATH", help="write the figures here")
    bench.add_argument("--config", metavar="YAML", help="simulator configuration (default: built-in)")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats per case (default 5)")
    bench.add_argument(
        "--pixel-size",
        type=float,
        default=0.02,
        metavar="NM",
        help="pixel size of the high-resolution tiles, nm (default 0.02)",
    )
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 1 for a user or instrument error, 2 for a usage error, 130 on Ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except MicrographyError as error:
        message = str(error).replace("\n", "\n  ")
        print(f"micrography: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("micrography: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
