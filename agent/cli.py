"""The ``micrography`` command line.

The CLI is the one place that wires the agent to the simulator and analysis
packages; library code never imports across that line. Every
:class:`~agent.errors.MicrographyError` becomes a one-line message on stderr
and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__, paths
from agent.errors import ConfigError, MicrographyError

DESCRIPTION = """\
Micrography: guided acquisition for scanning transmission electron microscopes.

Commands:
  simulate   write the synthetic Sm-BFO specimen as a recorded dataset (+ preview PNG)
  describe   print what an instrument can do (stage, pixel sizes, dwell, detectors)
  acquire    take one tile from the simulated or a replayed microscope and save it
  bench      measure speed against the project's targets (prints a table, writes JSON)
  serve      serve the simulated or a replayed microscope over ZeroMQ as an instrument server
  keys       generate CurveZMQ key pairs for an authenticated instrument link
  run        run a guided acquisition session (the main job; resumable from its journal)
  train      train the graph autoencoder on synthetic specimens (writes a checkpoint)
  analyze    full-frame analysis of one large image (figure, HTML report, JSON)
  replay     rebuild a recorded session from its journal: figures per step, timings, re-scoring
  compare    discovery curves of several sessions (journals) or policies (bench JSON) in one figure
  sweep      benchmarks, replays and analyses of many inputs as tasks on a Dask cluster (resumable)

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

        return ReplayMicroscope.from_path(
            args.replay,
            pixel_size_nm=args.replay_pixel_size,
            recorded_dwell_us=args.replay_dwell,
            counts_per_unit=args.replay_counts_per_unit,
        )
    from simulator.drivers import SimulatedMicroscope

    return SimulatedMicroscope(_simulator_config(args.config, args.seed))


def _positive(value: float | None, option: str, unit: str) -> None:
    """Refuse a zero, negative, NaN or infinite number given for ``option``."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{option} must be a positive number of {unit}, got {value:g}")


DEFAULT_VIEW_BIND = "127.0.0.1:8765"
"""Where the live view listens unless told otherwise (loopback: no token needed)."""

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text: str) -> int:
    """``--tile-budget``-style sizes: bytes, or a number with K, M, G or T (binary multiples)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _BYTE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 8G or 512M, got {text!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return int(number * _BYTE_UNITS[unit])


def _at_least_one(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{option} must be at least 1, got {value}")


def _check_instrument_options(args: argparse.Namespace) -> None:
    """Check the instrument options before the specimen is generated or the recording read."""
    if getattr(args, "config", None):
        paths.input_file(args.config, "--config")
    if getattr(args, "replay", None):
        if not Path(args.replay).exists():
            raise ConfigError(f"--replay {args.replay}: no such file or folder")
        _positive(args.replay_pixel_size, "--replay-pixel-size", "nm")
        _positive(args.replay_dwell, "--replay-dwell", "us")
        _positive(args.replay_counts_per_unit, "--replay-counts-per-unit", "detected electrons per unit")


def _client_curve(args: argparse.Namespace) -> Any:
    """The CURVE keys of ``run --instrument``, loaded (and checked) before anything is exposed."""
    secret, server = args.curve_secret_key, args.curve_server_key
    if secret is None and server is None:
        return None
    if secret is None or server is None:
        raise ConfigError(
            "CURVE needs both --curve-secret-key (this client's .key_secret) and --curve-server-key "
            "(the server's public .key)"
        )
    from agent.protocol.security import CurveClientKeys

    return CurveClientKeys.from_files(
        paths.input_file(secret, "--curve-secret-key"), paths.input_file(server, "--curve-server-key")
    )


def _progress_status(message: str) -> Any:
    from rich.console import Console

    return Console(stderr=True).status(message)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Generate, render and write the synthetic specimen."""
    from simulator.export import export_specimen
    from simulator.specimen import generate_specimen

    _positive(args.pixel_size, "--pixel-size", "nm")
    _positive(args.dwell, "--dwell", "us")
    paths.output_folder(args.out)
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
        from analysis.preview import write_preview

        with _progress_status("drawing preview"):
            preview = write_preview(specimen, config, Path(args.out) / "preview.png")
        print(f"preview:      {preview}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """Print the instrument description as JSON."""
    _check_instrument_options(args)
    with _open_driver(args) as microscope:
        print(microscope.describe().model_dump_json(indent=2))
    return 0


def cmd_acquire(args: argparse.Namespace) -> int:
    """Acquire one tile and save it."""
    import numpy as np

    from agent.config import validate_config
    from agent.driver import ScanRequest

    # Everything is checked before the beam is on: a tile that cannot be saved is dose lost.
    request = validate_config(
        {"x_nm": args.x, "y_nm": args.y, "shape": (args.rows, args.cols), "pixel_size_nm": args.pixel_size,
         "dwell_us": args.dwell, "detector": args.detector},
        ScanRequest,
        "acquire",
    )  # fmt: skip
    out = paths.output_file(args.out, suffixes=(".npy", ".png", ".tif", ".tiff"), overwrite=args.overwrite)
    _check_instrument_options(args)
    with _open_driver(args) as microscope:
        microscope.check(request)
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
        from simulator.export import write_calibrated_tiff

        write_calibrated_tiff(
            out, tile.image, tile.pixel_size_nm, tile.origin_nm,
            {"request": tile.request.model_dump(mode="json"), "dose_e_per_a2": tile.dose_e_per_a2,
             "t_start": tile.t_start, "t_end": tile.t_end, "units": "detected electrons"},
        )  # fmt: skip
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

    _at_least_one(args.repeats, "--repeats")
    _positive(args.pixel_size, "--pixel-size", "nm")
    if args.json:
        paths.output_file(args.json, "--json")
    if args.config:
        paths.input_file(args.config, "--config")
    if args.target == "simulator":
        from simulator.bench import benchmark_simulator, format_report

        report = benchmark_simulator(
            _simulator_config(args.config, None), repeats=args.repeats, pixel_size_nm=args.pixel_size
        )
    elif args.target == "link":
        from simulator.link_bench import benchmark_link, format_report

        report = benchmark_link(repeats=args.repeats)
    elif args.target == "columns":
        from analysis.bench_columns import benchmark_columns, format_report

        report = benchmark_columns()
    elif args.target == "anomaly":
        from analysis.bench_anomaly import DEFAULT_TRAINING_SEEDS, benchmark_anomaly, format_report

        report = benchmark_anomaly(
            training_seeds=_flat(args.training_seeds) or DEFAULT_TRAINING_SEEDS,
            deterministic=args.deterministic,
        )
    elif args.target == "guidance":
        from analysis.bench_guidance import benchmark_guidance, format_report

        report = benchmark_guidance(instrument=args.instrument)
    elif args.target == "analyze":
        from analysis.bench_analyze import benchmark_analyze, format_report

        report = benchmark_analyze(seeds=_flat(args.seeds) or (0,))
    elif args.target == "stitching":
        from analysis.bench_stitching import benchmark_stitching, format_report

        report = benchmark_stitching()
    elif args.target == "sweep":
        from analysis.bench_sweep import benchmark_sweep, format_report

        report = benchmark_sweep()
    elif args.target == "pipeline":
        from analysis.bench_pipeline import DEAD_TIME_SEEDS, benchmark_pipeline, format_report

        report = benchmark_pipeline(seeds=_flat(args.seeds) or DEAD_TIME_SEEDS, guidance=not args.quick)
    elif args.target == "view":
        from analysis.bench_view import SEEDS, benchmark_view, format_report

        seeds = _flat(args.seeds) or (SEEDS[:3] if args.quick else SEEDS)
        report = benchmark_view(seeds=seeds, tiles=16 if args.quick else 30, screenshot=args.screenshot)
    else:  # argparse restricts the choices; kept for type checkers
        raise ConfigError(f"unknown benchmark {args.target!r}")
    print(format_report(report))
    write_report(report, args.json)
    if args.json:
        print(f"written: {args.json}")
    return 0


def _pixel_size_option(value: str | None) -> float | str | None:
    """``--pixel-size``: a number of nm, or ``auto`` (estimated from the material's lattice)."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"--pixel-size: expected a number of nm or 'auto', got {value!r}") from None


def _analyze_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~analysis.analyze.AnalyzeConfig` fields given on the command line."""
    options = {
        "pixel_size_nm": _pixel_size_option(args.pixel_size),
        "material": args.material,
        "lattice_spacing_nm": args.lattice_spacing,
        "threshold_sigma": args.threshold_sigma,
        "model": args.model,
        "gae_steps": args.gae_steps,
        "vae_steps": args.vae_steps,
        "segment_classes": args.classes,
        "embedding": args.embedding,
        "clustering": args.clustering,
        "seed": args.seed,
        "device": args.device,
    }
    return {key: value for key, value in options.items() if value is not None}


def cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse one large image and write its figure, HTML report and JSON."""
    from analysis.analyze import AnalyzeConfig, run_analysis

    if args.model:
        paths.input_file(args.model, "--model")

    from agent.config import validate_config

    config = validate_config(_analyze_options(args), AnalyzeConfig, "options")
    out = paths.output_folder(
        Path(args.out) if args.out else Path("runs") / f"analyze-{Path(args.image).stem}"
    )
    outputs = run_analysis(args.image, out, config, show_progress=not args.quiet)
    summary = outputs.summary
    columns = summary["columns"]
    labels = summary["material"]["labels"]
    print(
        f"{summary['material']['name']} at {summary['image']['pixel_size_nm']:.4g} nm/px: "
        f"columns: {columns['total']:,} ({columns['counts']['A']:,} {labels['A']}, "
        f"{columns['counts']['B']:,} {labels['B']}; {columns['counts']['O']:,} O), "
        f"vacancy sites {columns['vacancy_sites']['A']} A / {columns['vacancy_sites']['B']} B, "
        f"spacing {columns['lattice_spacing_nm'] * 1e3:.1f} pm; "
        f"{summary['embedding']['clusters']} embedding clusters; "
        f"{summary['anomaly']['anomalous_columns']:,} columns above score {summary['anomaly']['threshold']:g}"
    )
    print(f"time {summary['timings_s']['total']:.1f} s, peak memory {summary['peak_memory_mb']:.0f} MB")
    print(f"figure: {outputs.figure}")
    print(f"report: {outputs.html}")
    print(f"json:   {outputs.json}")
    print(f"tables: {', '.join(str(path) for path in outputs.tables)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) a guided session and write its journal, report figure and summary.

    Every input is checked before the first exposure (configuration, checkpoint, journal,
    output folder). Ctrl-C finishes and journals the tile in progress, writes the summary and
    report, prints the command that resumes the session and returns 130; a second Ctrl-C stops
    at once (the steps journaled so far are kept). Resuming a complete session exposes and
    writes nothing.
    """
    import shlex
    import signal
    import threading

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from agent.anomaly import resolve_checkpoint
    from agent.config import load_config, validate_config
    from agent.session import Session, SessionConfig, check_checkpoint
    from simulator.config import SimulatorConfig

    recorded = None
    if args.resume:
        from agent.journal import read_journal, recover_rewrite

        args.resume = str(paths.input_journal(args.resume, "--resume"))
        recover_rewrite(args.resume)  # a resume cut short while it rewrote the journal
        recorded = read_journal(args.resume)
        config = validate_config(recorded.config, SessionConfig, f"{args.resume} (recorded configuration)")
        for problem in recorded.problems:
            print(f"micrography: warning: {args.resume}: {problem}", file=sys.stderr)
    else:
        if args.config:
            paths.input_file(args.config, "--config")
        config = load_config(args.config, SessionConfig) if args.config else SessionConfig()
    updates: dict[str, Any] = {}
    if args.policy:
        updates["policy"] = args.policy
    if args.seed is not None:
        updates["seed"] = args.seed
    if args.checkpoint:
        updates["checkpoint"] = args.checkpoint
    if args.lookahead is not None:
        updates["lookahead_tiles"] = args.lookahead
    if args.budget is not None:
        updates["budget"] = config.budget.model_copy(update={"max_tiles": args.budget})
    config = validate_config(
        {**config.model_dump(mode="json"), **_jsonable(updates)}, SessionConfig, "options"
    )
    simulator = validate_config(
        {**(config.simulator or {}), "seed": config.seed},
        SimulatorConfig,
        f"{args.config or 'built-in'}: simulator",
    )
    if args.real_time:
        if args.instrument:
            raise ConfigError("--real-time is for the simulated instrument; a remote one keeps its own pace")
        simulator = simulator.model_copy(
            update={"instrument": simulator.instrument.model_copy(update={"real_time": True})}
        )
    if args.view:
        from agent.view import parse_bind

        parse_bind(args.view_bind, args.view_token)  # a bad address fails here, before any exposure
    out = Path(
        args.out
        or (Path(args.resume).parent if args.resume else f"runs/session-{config.policy}-seed{config.seed}")
    )
    if not args.out and not args.resume:
        # The default folder must not stop a second run: take the next free one.
        base, number = out, 1
        while (out / "journal.h5").exists():
            number += 1
            out = base.with_name(f"{base.name}-{number}")
    journal = Path(args.resume) if args.resume else out / "journal.h5"
    if not args.resume and journal.exists():
        raise ConfigError(f"{journal} exists; resume it with --resume {journal} or choose another --out")
    # Everything that can be checked is checked here, before the first exposure.
    checkpoint = resolve_checkpoint(config.checkpoint)
    if checkpoint is not None:
        paths.input_file(checkpoint, "checkpoint")
        check_checkpoint(config)
    paths.output_folder(out)
    if (
        recorded is not None
        and recorded.end is not None
        and config.budget == validate_config(recorded.config, SessionConfig, str(args.resume)).budget
    ):
        reason = str(recorded.end.get("stop_reason", "it ended"))
        more = (
            f"; to take more tiles, resume it with a larger budget: micrography run --resume "
            f"{shlex.quote(args.resume)} --budget TILES"
            if reason.startswith("tile budget")
            else ""
        )
        print(
            f"{args.resume}: this session is complete ({reason}, {recorded.end.get('tiles', '?')} tiles); "
            f"nothing was exposed or written{more}"
        )
        return 0

    specimen = None
    if args.instrument:
        from agent.protocol.client import ZmqMicroscope

        driver: Any = ZmqMicroscope(args.instrument, curve=_client_curve(args))
    else:
        from simulator.drivers import SimulatedMicroscope
        from simulator.specimen import generate_specimen

        with _progress_status(f"generating specimen (seed {simulator.seed})"):
            specimen = generate_specimen(simulator.specimen, simulator.seed)
        driver = SimulatedMicroscope(simulator, specimen)

    with driver:
        tracker = None
        truth = None
        if specimen is not None:
            from agent.survey import CandidateGrid
            from analysis.guidance import DiscoveryTracker, true_offsets

            grid = CandidateGrid.tiling(driver.describe(), config.tiles.shape, config.tiles.pixel_size_nm)
            tracker = DiscoveryTracker(specimen, grid, true_offsets(driver))
            truth = tracker.candidates if config.policy == "oracle" else None
        elif config.policy == "oracle":
            raise ConfigError(
                "the oracle policy needs the simulator's ground truth; it cannot run on --instrument"
            )
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} tiles"),
            TextColumn("dose {task.fields[dose]:.0f} e-/A^2"),
            TextColumn("{task.fields[found]}"),
            TimeElapsedColumn(),
        ]
        with Progress(*columns) as progress:
            task = progress.add_task(
                f"{config.policy} session", total=config.budget.max_tiles, dose=0.0, found=""
            )

            feed: Any = None

            def on_step(record: Any) -> None:
                if tracker is not None:
                    tracker(record)
                if feed is not None:
                    feed.on_step(record)
                if record.kind == "survey":
                    return
                found = (
                    f"features imaged {len(tracker.imaged)}/{tracker.total}" if tracker is not None else ""
                )
                progress.update(
                    task, advance=1, dose=record.extra.get("mean_dose_e_per_a2", 0.0), found=found
                )

            if args.resume:
                session = Session.resume(driver, journal, config, on_step=on_step, truth=truth)
            else:
                session = Session(driver, config, journal, on_step=on_step, truth=truth)

            def stop_after_this_tile(signum: int, frame: Any) -> None:
                if session.stop_requested:
                    raise KeyboardInterrupt  # a second Ctrl-C: stop now
                session.request_stop("interrupted (Ctrl-C)")
                progress.console.print(
                    "micrography: stopping after the tile in progress (Ctrl-C again to stop at once)"
                )

            server = None
            if args.view:
                from agent.view import SessionFeed, ViewServer

                discovered = None if tracker is None else (lambda: (len(tracker.imaged), tracker.total))
                feed = SessionFeed(session, discovered)
                server = ViewServer(feed.hub, feed.state, session.operator, args.view_bind, args.view_token)
                server.start()  # a port that is taken fails here, before any exposure
                progress.console.print(f"live view: {server.url}")
            in_main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, stop_after_this_tile) if in_main else None
            try:
                summary = session.run()
            except KeyboardInterrupt:
                summary = session.summary()
            finally:
                if in_main:
                    signal.signal(signal.SIGINT, previous)
                if feed is not None:
                    feed.finished()
                if server is not None:
                    server.close()

    from analysis.guidance import detected_features, session_summary_table, write_session_report

    if specimen is not None and tracker is not None:
        summary["planted_features"] = tracker.total
        summary["imaged_features"] = len(tracker.imaged)
        summary["strict_planted_features"] = tracker.strict_total
        summary["strict_imaged_features"] = len(tracker.strict_imaged)
        summary["detected_features"] = len(detected_features(session, specimen))
        summary["discovery_curve"] = tracker.curve
    from agent.column_table import column_table, vacancy_table, write_tables

    report = write_session_report(session, out / "report.png", tracker) if session.steps else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    tables = write_tables(
        out,
        column_table(session.graph, session.node_scores(), config.detection_threshold),
        vacancy_table(session.graph),
    )
    print(session_summary_table(summary))
    print(f"journal: {journal}\nreport:  {report or 'none (no step taken)'}\nsummary: {out / 'summary.json'}")
    print(f"tables:  {', '.join(str(path) for path in tables)}")
    if session.interrupted:
        resume = f"micrography run --resume {shlex.quote(str(journal))}"
        if args.instrument:
            resume += f" --instrument {shlex.quote(args.instrument)}"
            for option in ("curve_secret_key", "curve_server_key"):
                if getattr(args, option):
                    resume += f" --{option.replace('_', '-')} {shlex.quote(getattr(args, option))}"
        print(
            f"micrography: {summary['stop_reason']} after {summary['tiles']} tiles; every step is in the "
            f"journal. Resume with:\n  {resume}",
            file=sys.stderr,
        )
        return 130
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    """Serve the live view of a journal (finished, or still being written) until Ctrl-C."""
    import time

    from agent.view import JournalFeed, ViewServer

    journal = paths.input_journal(args.journal, "JOURNAL")
    feed = JournalFeed(journal)
    with ViewServer(feed.hub, feed.state, None, args.view_bind, args.view_token) as server:
        feed.start()
        print(f"live view of {journal}: {server.url} (Ctrl-C stops serving)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            feed.close()
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """Send one operator action to a session served with ``run --view`` (or print its state)."""
    import urllib.error
    import urllib.request

    base = args.url if args.url.endswith("/") else args.url + "/"
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    if args.action == "status":
        request = urllib.request.Request(base + "api/state", headers=headers)
    else:
        fields: dict[str, Any] = {"action": args.action, "source": "cli"}
        if args.region is not None:
            fields["region_nm"] = args.region
        if args.setting is not None:
            fields["setting"] = args.setting
        if args.value is not None:
            fields["value"] = args.value
        request = urllib.request.Request(
            base + "api/control", data=json.dumps(fields).encode(), headers=headers, method="POST"
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("error", error.reason)
        raise MicrographyError(f"{base}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MicrographyError(
            f"{base}: no live view answers there ({reason}); start the session with --view"
        ) from None
    if args.action == "status":
        state = body["state"]
        budget = state.get("budget", {})
        print(
            f"{state['phase']}: {budget.get('tiles')} of {budget.get('max_tiles') or '-'} tiles, "
            f"{len(state.get('marks', []))} marks, stop reason: {state.get('stop_reason') or '-'}"
        )
    else:
        print(f"accepted: {body['accepted']}")
    return 0


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        for key, value in values.items()
    }


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a session journal: figures, timing breakdown, reproduction check, optional re-scoring."""
    from analysis.replay import format_replay, run_replay

    _at_least_one(args.every, "--every")
    _at_least_one(args.top_k, "--top-k")
    journal = paths.input_journal(args.journal)
    if args.model:
        paths.input_file(args.model, "--model")
    if args.config:
        paths.input_file(args.config, "--config")
    out = paths.output_folder(Path(args.out) if args.out else journal.parent / "replay")
    report = run_replay(
        journal, out, every=args.every, steps=args.steps, checkpoint=args.model,
        config_path=args.config, top_k=args.top_k,
    )  # fmt: skip
    print(format_replay(report))
    print(f"figure:  {report['figures']['final']}")
    if report["figures"]["steps"]:
        print(f"steps:   {len(report['figures']['steps'])} figures in {out / 'steps'}")
    if report["rescore"] is not None:
        print(f"ranks:   {report['rescore']['figure']}")
    print(f"json:    {out / 'replay.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare sessions or policies: discovery figure and the fractions table (printed, JSON, CSV)."""
    from analysis.bench_guidance import BUDGET_FRACTIONS, check_budgets
    from analysis.compare import format_table, run_compare

    fractions = tuple(args.budgets) if args.budgets else BUDGET_FRACTIONS
    check_budgets(fractions, "--budgets")
    inputs = [
        paths.input_file(item, "input")
        if str(item).lower().endswith(".json")
        else paths.input_journal(item, "input")
        for item in args.inputs
    ]
    paths.output_folder(args.out)
    report = run_compare(inputs, args.out, by_policy=args.by_policy, fractions=fractions)
    print(format_table(report["table"], report["fractions"]))
    files = report["files"]
    print(f"figure:  {files['figure']}\ntable:   {files['csv']}\njson:    {files['json']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the graph autoencoder reproducibly on synthetic specimens and write a checkpoint."""
    from contextlib import nullcontext

    from rich.progress import Progress

    from agent.anomaly import AnomalyConfig, deterministic_torch
    from agent.config import load_config, validate_config
    from analysis.training import SCAN_DWELL_US, TRAINING_SEEDS, train_scorer

    paths.output_file(args.out, suffixes=(".pt",), overwrite=args.overwrite)
    _at_least_one(args.steps, "--steps")
    _positive(args.dwell, "--dwell", "µs")
    config = load_config(args.config, AnomalyConfig) if args.config else AnomalyConfig()
    if args.steps is not None:
        values = config.model_dump() | {"warmup_steps": args.steps}
        config = validate_config(values, AnomalyConfig, "--steps")
    if args.simulator_config:
        paths.input_file(args.simulator_config, "--simulator-config")
    seeds = args.seeds or list(TRAINING_SEEDS)
    with Progress() as progress, deterministic_torch() if args.deterministic else nullcontext():
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        scorer = train_scorer(
            seeds,
            config,
            _simulator_config(args.simulator_config, None),
            dwell_us=SCAN_DWELL_US if args.dwell is None else args.dwell,
            progress=report,
        )
    path = scorer.save(args.out)
    print(f"trained {config.architecture} graph autoencoder on specimen seeds {seeds}: {path}")
    return 0


def _seed_list(text: str) -> list[int]:
    """``--seeds 0 1 2`` items: a non-negative integer or an inclusive range such as ``2000-2029``."""
    low, dash, high = text.partition("-")
    try:
        first, last = int(low), int(high) if dash else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a seed such as 3 or a range such as 0-4, got {text!r}"
        ) from None
    if first < 0 or last < first:
        raise argparse.ArgumentTypeError(f"a seed range runs from a non-negative low to a high, got {text!r}")
    return list(range(first, last + 1))


def _flat(groups: Sequence[Sequence[int]] | None) -> list[int] | None:
    return None if groups is None else list(dict.fromkeys(seed for group in groups for seed in group))


def _sweep_tasks(args: argparse.Namespace, out: Path) -> list[Any]:
    """The tasks of ``micrography sweep KIND``, every input checked before a cluster starts."""
    from analysis import sweep

    if args.kind == "guidance":
        # Options not given keep the benchmark's defaults (guidance_tasks, anomaly_tasks).
        given = {
            "seeds": _flat(args.seeds),
            "family_seeds": _flat(args.family_seeds),
            "policies": args.policies,
            "budgets": args.budgets,
            "instrument": args.instrument,
        }
        options = {key: value for key, value in given.items() if value is not None}
        if args.control_seed is not None:  # -1 skips the control specimen: None must reach the tasks
            options["control_seed"] = None if args.control_seed < 0 else args.control_seed
        return sweep.guidance_sweep_tasks(**options)
    if args.kind == "anomaly":
        given = {
            "training_seeds": _flat(args.training_seeds),
            "evaluation_seeds": _flat(args.evaluation_seeds),
            "training_specimens": _flat(args.training_specimens),
        }
        return sweep.anomaly_sweep_tasks(**{key: value for key, value in given.items() if value is not None})
    if args.kind == "replay":
        _at_least_one(args.every, "--every")
        _at_least_one(args.top_k, "--top-k")
        journals = [paths.input_journal(journal) for journal in args.journals]
        model = paths.input_file(args.model, "--model") if args.model else None
        config = paths.input_file(args.config, "--config") if args.config else None
        return sweep.replay_tasks(
            journals, out, every=args.every, steps=args.steps, model=model, config=config, top_k=args.top_k
        )
    if args.model:
        paths.input_file(args.model, "--model")
    return sweep.analyze_tasks(args.images, out, _analyze_options(args))


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a sweep's missing tasks on a Dask cluster, gather the report, and write ``sweep.json``.

    Exit status 1 when a task failed (the finished ones are kept; the same command retries the rest).
    """
    from analysis.sweep import SweepError, run_sweep

    out = paths.output_folder(Path(args.out) if args.out else Path("runs") / f"sweep-{args.kind}")
    tasks = _sweep_tasks(args, out)
    summary = run_sweep(
        args.kind, tasks, out, serial=args.serial, scheduler=args.scheduler,
        scheduler_file=args.scheduler_file, workers=args.workers,
        threads_per_task=args.threads_per_task, progress=not args.quiet,
    )  # fmt: skip
    if summary["text"]:
        print(summary["text"])
    where = "in this process" if summary["scheduler"] == "serial" else f"on {summary['workers']} workers"
    print(
        f"sweep {args.kind}: {summary['tasks']} tasks, {summary['cached']} done before, "
        f"{summary['ran']} run now {where} ({summary['scheduler']}) in {summary['wall_s']:.1f} s, "
        f"{len(summary['failed'])} failed"
    )
    for name, path in summary["files"].items():
        print(f"{name + ':':<8} {path}")
    print(f"sweep:   {out / 'sweep.json'}")
    for failure in summary["failed"]:
        print(f"failed: {failure['label']}: {failure['error']}", file=sys.stderr)
    if summary["failed"]:
        raise SweepError(
            f"{len(summary['failed'])} of {summary['tasks']} tasks failed (listed above and in "
            f"{out / 'sweep.json'}); the finished ones are kept: run the same command again to retry the rest"
        )
    return 0


def _server_logger(log_file: str | None) -> tuple[Any, list[Any]]:
    """The ``micrography`` logger writing to stderr (and ``log_file``); returns it and its handlers."""
    import logging

    logger = logging.getLogger("micrography")
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        paths.output_file(log_file, "--log")
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger, handlers


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the simulated or replayed microscope as an instrument server until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from agent.protocol.security import CurveServerKeys
    from simulator.server import InstrumentServer, instrument_digest, require_safe_bind

    curve = CurveServerKeys.from_settings(args.curve_secret_key, args.allowed_clients)
    # Refuse an unsafe address, an unusable log or journal before spending time on the specimen.
    require_safe_bind(args.bind, args.events_bind, curve is not None, args.insecure)
    _positive(args.heartbeat, "--heartbeat", "seconds")
    if args.log:
        paths.output_file(args.log, "--log")
    if args.journal:
        paths.output_folder(args.journal, "--journal")
    _check_instrument_options(args)
    logger, handlers = _server_logger(args.log)
    stop = threading.Event()
    # SIGTERM (systemd, docker stop, kill) stops as gracefully as Ctrl-C; only the main thread may
    # install a handler.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if in_main_thread else None
    try:
        with _progress_status("preparing the instrument"):
            microscope = _open_driver(args)
        with microscope:
            journal = None
            if not args.no_journal:
                journal = (
                    Path(args.journal)
                    if args.journal
                    else Path("runs") / "serve-journal" / instrument_digest(microscope)
                )
            server = InstrumentServer(
                microscope,
                args.bind,
                events_bind=args.events_bind,
                curve=curve,
                journal=journal,
                heartbeat_s=args.heartbeat,
                tile_budget_bytes=args.tile_budget,
                memory_budget_bytes=args.memory_budget,
                allow_insecure=args.insecure,
                logger=logger.getChild("server"),
            )
            server.start()
            try:
                if args.endpoint_file:
                    server.write_endpoints(args.endpoint_file)
                status = server.status()
                print(
                    f"serving {microscope.describe().name} on {server.endpoint} "
                    f"(events {server.events_endpoint or 'off'}, CURVE {'on' if curve else 'off'}, "
                    f"journal {journal or 'off'}: {status.exposures} earlier exposure(s)); "
                    "Ctrl-C stops it",
                    flush=True,
                )
                while not stop.wait(0.2):
                    pass
            except KeyboardInterrupt:
                pass
            finally:
                server.stop(grace_s=args.grace)
        print("instrument server stopped", flush=True)
        return 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


CONFIG_SECTIONS = {
    "session": (
        "Session (configs/session.yaml)",
        "`micrography run --config FILE`; recorded in every session journal. Nested keys a session "
        "sets from its own top-level keys say so and must be left at their defaults.",
    ),
    "simulator": (
        "Simulated instrument (configs/simulator.yaml)",
        "`micrography simulate`, `serve`, `acquire` and `describe` with `--config FILE`, and the "
        "`simulator:` key of a session file.",
    ),
}
"""Title and introduction of each configuration file in ``config show`` and docs/configuration.md."""

CONFIG_FILE_HEADERS = {
    "session": "A guided acquisition session (`micrography run --config configs/session.yaml`): every key,\n"
    "with its default, unit and description. Generated by `micrography config show session --defaults\n"
    "--yaml`; copy it and change what you need. Unknown keys are errors that name the key and file.",
    "simulator": "The simulated instrument (`micrography simulate|serve|acquire --config`, or the\n"
    "`simulator:` key of a session file): synthetic Sm-doped BiFeO3 specimen, HAADF image formation\n"
    "and instrument limits, every key with its default, unit and description. Generated by\n"
    "`micrography config show simulator --defaults --yaml`. Unknown keys are errors that name the key\n"
    "and file.",
}
"""The comment at the top of each shipped configuration file."""


def config_models() -> dict[str, type[Any]]:
    """The model of each configuration file, by the name ``config show`` takes."""
    from agent.session import SessionConfig
    from simulator.config import SimulatorConfig

    return {"session": SessionConfig, "simulator": SimulatorConfig}


def cmd_config(args: argparse.Namespace) -> int:
    """Print every setting with its value, unit, default and description (or the docs page)."""
    from agent.config import format_settings, load_config, settings_markdown, settings_of, settings_yaml

    models = config_models()
    which = list(models) if args.which == "all" else [args.which]
    if args.config:
        if args.which == "all":
            raise ConfigError("--config needs the kind of file: config show session|simulator --config FILE")
        paths.input_file(args.config, "--config")
    if args.markdown:
        sections = [(*CONFIG_SECTIONS[name], settings_of(models[name])) for name in which]
        print(settings_markdown(sections), end="")
        return 0
    if args.yaml:
        if len(which) != 1:
            raise ConfigError("--yaml writes one file: config show session|simulator --yaml")
        (name,) = which
        print(settings_yaml(settings_of(models[name]), CONFIG_FILE_HEADERS[name]), end="")
        return 0
    for name in which:
        values = load_config(args.config, models[name]) if args.config else None
        print(f"# {CONFIG_SECTIONS[name][0]}")
        print(format_settings(settings_of(models[name], values), defaults_only=args.defaults))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Generate a CurveZMQ key pair."""
    from agent.protocol.security import generate_keys, load_public_key

    paths.output_folder(args.out)
    public_file, secret_file = generate_keys(args.out, args.name)
    print(f"public key: {public_file}  (give it to the other side of the link)")
    print(f"secret key: {secret_file}  (stays on this machine, readable by you only)")
    print(f"Z85 public key: {load_public_key(public_file).decode()}")
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
    parser.add_argument(
        "--replay-dwell",
        type=float,
        metavar="US",
        help="dwell per pixel the image was recorded with, microseconds (when the file lacks it); "
        "longer dwells are refused",
    )
    parser.add_argument(
        "--replay-counts-per-unit",
        type=float,
        metavar="C",
        help="detected electrons per unit of the recorded signal (when the file lacks it; 1 for an "
        "image in counts); sets the shot noise of lower doses",
    )


def _add_analyze_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``analyze``, shared by ``sweep analyze`` (read back by :func:`_analyze_options`)."""
    parser.add_argument(
        "--pixel-size",
        metavar="NM|auto",
        help="pixel size, nm (needed for .npy and .tif), or 'auto' to estimate it from the material's "
        "lattice; checked against the image before any work",
    )
    parser.add_argument(
        "--material",
        metavar="NAME",
        help="what the image shows: BiFeO3-001 (default) or SrTiO3-001; names the species and "
        "decides whether polarization and domains are reported",
    )
    parser.add_argument(
        "--lattice-spacing", type=float, metavar="NM", help="A-A spacing, nm (default: estimated)"
    )
    parser.add_argument(
        "--threshold-sigma",
        type=float,
        metavar="S",
        help="a column must stand S noise levels above the floor (default 5); dim columns at expected "
        "lattice sites are looked for again at 3 noise levels whatever this is",
    )
    parser.add_argument(
        "--model", metavar="PT", help="GAE checkpoint (default: fitted on the image's own graph)"
    )
    parser.add_argument("--gae-steps", type=int, metavar="N", help="GAE training steps (default 200)")
    parser.add_argument("--vae-steps", type=int, metavar="N", help="VAE training steps (default 600)")
    parser.add_argument("--classes", type=int, metavar="K", help="GMM/VAE segmentation classes (default 3)")
    parser.add_argument("--embedding", choices=["pca", "tsne"], help="projection of the embeddings (pca)")
    parser.add_argument("--clustering", choices=["dbscan", "hdbscan"], help="embedding clusters (dbscan)")
    parser.add_argument("--seed", type=int, help="seed of the models and samples (default 0)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the models run (auto)")


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
    acquire.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (refused by default)"
    )
    acquire.set_defaults(handler=cmd_acquire)

    run = commands.add_parser(
        "run",
        help="run a guided acquisition session (default: on the built-in synthetic specimen)",
        description=(
            "Run a guided session: a low-dose survey of the whole stage, a few spread-out start tiles, "
            "then tile after tile chosen by the policy until the budget is spent. Writes DIR/journal.h5 "
            "(every step, resumable), DIR/report.png (tile path, anomaly map, surrogate mean and "
            "uncertainty, discovery curve) and DIR/summary.json. With no options it runs the guided "
            "policy on the built-in synthetic specimen."
        ),
    )
    run.add_argument("--config", metavar="YAML", help="session configuration (configs/session.yaml)")
    run.add_argument("--policy", help="guided (default), raster, random, survey, image_gp or oracle")
    run.add_argument("--budget", type=int, metavar="TILES", help="high-resolution tiles to acquire")
    run.add_argument("--seed", type=int, help="seed of the session and of the synthetic specimen")
    run.add_argument(
        "--lookahead",
        type=int,
        metavar="TILES",
        help="requests decided ahead of the tile being worked on: 1 (default) the pipelined loop (the "
        "instrument scans the next tile while the agent works on the last), 0 the sequential one",
    )
    run.add_argument(
        "--real-time",
        action="store_true",
        help="the simulated instrument takes its settle and frame time on the wall clock, as a physical "
        "one does (to see how long it waits for the agent); not recorded, a resume may differ",
    )
    run.add_argument(
        "--checkpoint",
        metavar="PT",
        help="GAE checkpoint: 'shipped' (default, the model shipped with the package), a file from "
        "`micrography train`, or 'none' to train one on the start tiles",
    )
    run.add_argument("--out", metavar="DIR", help="output folder (default runs/session-POLICY-seedN)")
    run.add_argument("--resume", metavar="JOURNAL", help="continue an interrupted session from its journal")
    run.add_argument("--instrument", metavar="ENDPOINT", help="run over ZeroMQ, e.g. tcp://127.0.0.1:5555")
    run.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="with --instrument: this client's .key_secret file; turns on CurveZMQ (docs/protocol.md, 8)",
    )
    run.add_argument(
        "--curve-server-key",
        metavar="FILE",
        help="with --instrument and CURVE: the server's public .key file",
    )
    run.add_argument(
        "--view",
        action="store_true",
        help="serve the live view (docs/live-view.md): watch the session in a browser, pause it, mark "
        "regions, change the dwell or the budget",
    )
    _add_view_bind(run)
    run.set_defaults(handler=cmd_run)

    view = commands.add_parser(
        "view",
        help="serve the live view of a journal, finished or still being written (read-only)",
        description="Serve the live-view page for a session journal; it follows the journal while "
        "another process writes it. Ctrl-C stops serving.",
    )
    view.add_argument("journal", metavar="JOURNAL", help="the session's journal.h5")
    _add_view_bind(view)
    view.set_defaults(handler=cmd_view)

    control = commands.add_parser(
        "control",
        help="pause, resume or stop a session served with --view; mark regions; change live settings",
        description="Send one operator action to a session running with `micrography run --view`; it "
        "is journaled with the step after which it takes effect. `status` prints the session's state.",
    )
    from agent.operator import ACTIONS

    control.add_argument("action", choices=["status", *ACTIONS])
    control.add_argument(
        "--region", nargs=4, type=float, metavar=("X_MIN", "X_MAX", "Y_MIN", "Y_MAX"),
        help="for skip and look: the stage region, nm",
    )  # fmt: skip
    control.add_argument("--setting", help="for set: dwell_us, budget.max_tiles, budget.max_time_s, ...")
    control.add_argument(
        "--value", type=float, help="for set: the new value ('set' without one lifts a limit)"
    )
    control.add_argument("--url", default=f"http://{DEFAULT_VIEW_BIND}/", help="the live view's address")
    control.add_argument("--token", help="the view's token (printed by the session for a non-loopback bind)")
    control.set_defaults(handler=cmd_control)

    replay = commands.add_parser(
        "replay",
        help="rebuild a recorded session from its journal (figures, timings, re-scoring)",
        description=(
            "Rebuild a recorded session step by step from its journal, without a microscope, through the "
            "session's own pipeline (every decision is checked against the recorded one; the journal is "
            "only read). Writes DIR/replay.png (survey with tile path and order, node scores over the "
            "stitched graph, surrogate mean and uncertainty), DIR/steps/step-NNNN.png for the chosen steps, "
            "and DIR/replay.json (recorded against replayed region scores, timings per stage, ground truth "
            "for simulated sessions). With --model and/or --config the recorded tiles are re-scored and "
            "DIR/rescore.png shows how the ranking of the imaged regions would change."
        ),
    )
    replay.add_argument("journal", metavar="JOURNAL", help="the session journal (journal.h5)")
    replay.add_argument("--out", metavar="DIR", help="output folder (default: replay/ beside the journal)")
    replay.add_argument("--every", type=int, metavar="N", help="also draw the session after every N-th tile")
    replay.add_argument("--steps", metavar="LIST", help="also draw it after these steps, e.g. 3,5,10-12,last")
    replay.add_argument("--model", metavar="PT", help="re-score the tiles with this GAE checkpoint")
    replay.add_argument("--config", metavar="YAML", help="re-score the tiles with this session configuration")
    replay.add_argument(
        "--top-k", type=int, default=5, metavar="K", help="size of the top list compared when re-scoring (5)"
    )
    replay.set_defaults(handler=cmd_replay)

    compare = commands.add_parser(
        "compare",
        help="discovery curves of several sessions or policies in one figure, with a table of fractions",
        description=(
            "Compare sessions (journals, .h5) and/or policies (the JSON of `micrography bench guidance`): "
            "fraction of planted features imaged and detected against tiles and dose, mean and spread "
            "over seeds, and a table of the fractions at 10, 25 and 50 %% of the tiles covering the stage "
            "(printed, DIR/compare.csv, DIR/compare.json; figure DIR/compare.png). Journals of simulated "
            "sessions are judged against their regenerated specimen; others show tiles, dose and scores."
        ),
    )
    compare.add_argument("inputs", nargs="+", metavar="JOURNAL|BENCH_JSON", help="journals and/or bench JSON")
    compare.add_argument("--out", default="runs/compare", metavar="DIR", help="output folder (runs/compare)")
    compare.add_argument("--by-policy", action="store_true", help="average journals of the same policy")
    compare.add_argument(
        "--budgets", type=float, nargs="+", metavar="F", help="budget fractions for the table (0.1 0.25 0.5)"
    )
    compare.set_defaults(handler=cmd_compare)

    train = commands.add_parser(
        "train",
        help="train the graph autoencoder on synthetic specimens",
        description=(
            "Scan synthetic specimens (seeds the benchmarks never evaluate on) at atomic resolution, "
            "stitch their molecule graphs and train the graph autoencoder on them without labels; "
            "writes a checkpoint that carries its version and feature schema. Reproducible: the "
            "same options give the same checkpoint on the same machine."
        ),
    )
    train.add_argument("--out", required=True, metavar="PATH", help="checkpoint to write (.pt)")
    train.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (refused by default)"
    )
    train.add_argument("--config", metavar="YAML", help="anomaly-scorer configuration (AnomalyConfig)")
    train.add_argument("--simulator-config", metavar="YAML", help="simulator configuration of the specimens")
    train.add_argument("--seeds", type=int, nargs="+", metavar="N", help="training specimen seeds")
    train.add_argument("--steps", type=int, metavar="N", help="gradient steps (overrides the configuration)")
    train.add_argument(
        "--dwell",
        type=float,
        metavar="US",
        help="dwell per pixel of the training tiles, µs (default 32, as the anomaly benchmark's "
        "specimens; a session's tiles use 8)",
    )
    train.add_argument(
        "--deterministic",
        action="store_true",
        help="one thread and torch's deterministic algorithms: the same options give the same "
        "checkpoint bit for bit (slower; the default multi-threaded run may differ in the last bits)",
    )
    train.set_defaults(handler=cmd_train)

    analyze = commands.add_parser(
        "analyze",
        help="full-frame analysis of one large image",
        description=(
            "Analyse one large HAADF image: preprocessing stages, atomic columns with species, "
            "nearest-neighbour distances per species pair, polarization from the B-column shift "
            "(beside the dataset's own Pxy for the Sm-BFO layout) and its domains, GMM versus VAE "
            "segmentation of column patches, graph-autoencoder embeddings with DBSCAN/HDBSCAN "
            "clusters and the anomaly map. Reads the Sm-BFO dataset layout (Sm_<pct>_<n>_HAADF.h5 "
            "or its folder), .npy, .tif and, with the 'vendor' extra, .dm3/.dm4/.emd/.ser. Writes "
            "DIR/analysis.png (all panels), DIR/report.html (self-contained) and DIR/analysis.json "
            "(every number shown, timings, peak memory)."
        ),
    )
    analyze.add_argument("image", metavar="IMAGE", help="image file or Sm-BFO dataset folder")
    analyze.add_argument("--out", metavar="DIR", help="output folder (default runs/analyze-<image name>)")
    _add_analyze_options(analyze)
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(handler=cmd_analyze)

    bench = commands.add_parser(
        "bench",
        help="measure speed against the targets",
        description="Run a benchmark, print its table and optionally write the figures as JSON. "
        "simulator: median time to render 512x512 and 4096x4096 high-resolution tiles "
        "(targets 0.05 s and 3 s on 2 cores). "
        "link: round-trip latency and throughput of 512x512 and 4096x4096 float32 tiles over "
        "loopback TCP, with and without CURVE, for the Micrography protocol, a bare pyzmq exchange "
        "and JSON lists (targets: >= 80 %% of bare pyzmq, >= 100x JSON lists, <= 2 ms at 512x512; "
        "takes about a minute). "
        "columns: recall, precision, RMS error and species accuracy of column finding against ground "
        "truth at four doses for the 'peaks' and 'seed' methods (and atomap when installed), seconds "
        "for 512x512 and 4096x4096 tiles, and the merge of a tile into a 500k-node graph (a few minutes). "
        "anomaly: per-class ROC AUC and average precision of the graph autoencoder, the write-up's "
        "GAE and hand-crafted baselines on three unseen specimens, and scoring/update timings "
        "(about ten minutes). "
        "guidance: discovery curves (planted features imaged and detected against tiles and dose) of "
        "every policy on five specimens and a control specimen without spatial structure, and the "
        "decision latency (tens of minutes). "
        "analyze: `micrography analyze` end to end on a 4096x4096 synthetic image with about 80k "
        "columns, in a fresh process: seconds per stage and peak memory (targets: under 60 s and "
        "4 GB on 2 cores; about a minute). "
        "stitching: raster and guided sessions with overlapping tiles on a realistic instrument, "
        "without drift, and with 0.3 nm/s drift and 5 nm placement error: duplicate nodes, residual "
        "placement error, stitched against single-tile column RMS, seam scores and registration time "
        "(about ten minutes). "
        "sweep: a guidance sweep serially and on a local Dask cluster of 2 workers: speed-up "
        "(target >= 1.8x), per-task overhead (target <= 0.5 s), peak memory per worker, and whether "
        "the results equal the serial run (a few minutes). "
        "pipeline: how long a real-time simulated instrument waits for the agent per dwell with the "
        "sequential and the pipelined loop (targets <= 5 %% at 2 us, <= 10 %% at 1 us), and the guided "
        "imaged fraction with both loops (target: pipelined within 0.02 at 25 %%; about 25 minutes; "
        "--quick skips the guidance part). "
        "view: guided sessions with and without the live view and a headless Chromium drawing it: "
        "step-time overhead (target <= 5 %%) and journaled-to-drawn latency (target <= 0.5 s); "
        "--screenshot PATH also saves the page (about 5 minutes; --quick: 3 seeds of 16 tiles).",
    )
    bench.add_argument(
        "target",
        choices=[
            "simulator",
            "link",
            "columns",
            "anomaly",
            "guidance",
            "analyze",
            "stitching",
            "sweep",
            "pipeline",
            "view",
        ],
        help="what to measure",
    )
    bench.add_argument("--json", metavar="PATH", help="write the figures here")
    bench.add_argument(
        "--instrument",
        choices=["realistic", "ideal"],
        default="realistic",
        help="guidance: the simulated instrument, with its placement error, drift and scan "
        "distortions (default) or without any",
    )
    bench.add_argument(
        "--seeds",
        nargs="+",
        type=_seed_list,
        metavar="SEED",
        help="analyze: specimen seeds, one image and one analyze process each, e.g. 0-4 (default 0); "
        "pipeline: seeds of the dead-time sessions (default 10-14); view: session seeds (default 20-24)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="pipeline: the dead-time part only (no guidance sessions); view: 3 seeds of 16 tiles",
    )
    bench.add_argument("--screenshot", metavar="PNG", help="view: also save a picture of the live page here")
    bench.add_argument(
        "--training-seeds",
        nargs="+",
        type=_seed_list,
        metavar="SEED",
        help="anomaly: training seeds of the autoencoders, e.g. 0-4 (default 0-4)",
    )
    bench.add_argument(
        "--deterministic",
        action="store_true",
        help="anomaly: one thread and torch's deterministic algorithms, the same figures bit for bit",
    )
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

    sweep = commands.add_parser(
        "sweep",
        help="benchmarks and batch analyses as tasks on a Dask cluster",
        description="Run many sessions, trainings, replays or analyses as tasks on dask.distributed: "
        "a local cluster sized to this machine by default, or an existing one (--scheduler, "
        "--scheduler-file, e.g. started by dask-jobqueue). Each task's result is written to "
        "OUT/tasks/ as it arrives, keyed by its inputs, so a rerun of the same command runs only the "
        "tasks still missing; a task that fails is reported and does not stop the others. The report "
        "is the serial command's: guidance and anomaly write the JSON of `micrography bench`, replay "
        "and analyze write each input's usual outputs under OUT/replay/ or OUT/analyze/ and a table "
        "(replays.csv, analyses.csv). docs/sweeps.md has the details.",
    )
    kinds = sweep.add_subparsers(dest="kind", metavar="KIND", required=True)

    def sweep_options(kind_parser: argparse.ArgumentParser, memory_mb: float) -> None:
        kind_parser.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweep-KIND)")
        where = kind_parser.add_argument_group("where the tasks run")
        where.add_argument(
            "--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786"
        )
        where.add_argument(
            "--scheduler-file", metavar="JSON", help="scheduler file of an existing cluster (dask-jobqueue)"
        )
        where.add_argument(
            "--workers",
            type=int,
            metavar="N",
            help=f"local cluster workers (default: one per core, as many as memory allows at about "
            f"{memory_mb / 1024:.1f} GB per task)",
        )
        where.add_argument(
            "--serial", action="store_true", help="run the tasks here, one after another, no Dask"
        )
        where.add_argument(
            "--threads-per-task",
            type=int,
            default=1,
            metavar="N",
            help="torch and BLAS threads of each task (default 1; results repeat bitwise for a given N)",
        )
        kind_parser.add_argument("--quiet", action="store_true", help="no progress bar")
        kind_parser.set_defaults(handler=cmd_sweep)

    from analysis.sweep import TASK_MEMORY_MB

    guidance = kinds.add_parser(
        "guidance",
        help="guidance benchmark: specimens x policies (x budgets as checkpoints)",
        description="The sessions of `micrography bench guidance` as tasks; writes OUT/guidance.json, the "
        "same report. Budgets are checkpoints of one session per specimen and policy.",
    )
    guidance.add_argument("--seeds", nargs="+", type=_seed_list, metavar="SEED", help="default-layout "
                          "specimen seeds, or ranges such as 0-4 (default 0-4)")  # fmt: skip
    guidance.add_argument(
        "--family-seeds",
        nargs="+",
        type=_seed_list,
        metavar="SEED",
        help="specimens of the layout family (simulator/layouts.py): tune on 1000-1009, report on 2000-2029",
    )
    guidance.add_argument(
        "--control-seed",
        type=int,
        metavar="SEED",
        help="seed of the control specimen (default 100; -1 skips it)",
    )
    guidance.add_argument(
        "--policies",
        nargs="+",
        metavar="POLICY",
        help="policies and ablations of the guided one (no_gp, gp_position, survey_only; default: all)",
    )
    guidance.add_argument(
        "--budgets", nargs="+", type=float, metavar="FRACTION", help="budget fractions (default 0.1 0.25 0.5)"
    )
    guidance.add_argument("--instrument", choices=["realistic", "ideal"], default="realistic")
    sweep_options(guidance, TASK_MEMORY_MB["guidance"])

    anomaly = kinds.add_parser(
        "anomaly",
        help="anomaly benchmark over training seeds",
        description="`micrography bench anomaly`, one task per training seed; writes OUT/anomaly.json with "
        "per-seed rows and their mean and spread.",
    )
    anomaly.add_argument("--training-seeds", nargs="+", type=_seed_list, metavar="SEED", help="default 0-4")
    anomaly.add_argument(
        "--evaluation-seeds",
        nargs="+",
        type=_seed_list,
        metavar="SEED",
        help="scored specimens (default 0-2)",
    )
    anomaly.add_argument(
        "--training-specimens",
        nargs="+",
        type=_seed_list,
        metavar="SEED",
        help="specimens trained on (default 1001 1002)",
    )
    sweep_options(anomaly, TASK_MEMORY_MB["anomaly"])

    replay_sweep = kinds.add_parser(
        "replay",
        help="replay (and re-score) many journals",
        description="`micrography replay` of every journal; each writes OUT/replay/NAME/ as replay does, and "
        "OUT/replays.csv lists them. With --model or --config each is re-scored too.",
    )
    replay_sweep.add_argument("journals", nargs="+", metavar="JOURNAL", help="journal.h5 files")
    replay_sweep.add_argument("--every", type=int, metavar="N", help="draw every N-th tile too")
    replay_sweep.add_argument("--steps", metavar="LIST", help='draw these steps too ("3,5,10-12,last")')
    replay_sweep.add_argument("--model", metavar="PT", help="re-score with this GAE checkpoint")
    replay_sweep.add_argument("--config", metavar="YAML", help="re-score with this session configuration")
    replay_sweep.add_argument("--top-k", type=int, default=5, metavar="K", help="top list compared (5)")
    sweep_options(replay_sweep, TASK_MEMORY_MB["replay"])

    analyze_sweep = kinds.add_parser(
        "analyze",
        help="full-frame analysis of many images",
        description="`micrography analyze` of every image; each writes OUT/analyze/NAME/ as analyze does, "
        "and OUT/analyses.csv lists them.",
    )
    analyze_sweep.add_argument("images", nargs="+", metavar="IMAGE", help="image files or dataset folders")
    _add_analyze_options(analyze_sweep)
    sweep_options(analyze_sweep, TASK_MEMORY_MB["analyze"])

    serve = commands.add_parser(
        "serve",
        help="serve a microscope over ZeroMQ (instrument server)",
        description=(
            "Serve the simulated microscope (or a replayed recording) as an instrument server "
            "speaking the Micrography link protocol (docs/protocol.md), so an agent on another "
            "process or computer drives it with ZmqMicroscope. Listens on 127.0.0.1 unless told "
            "otherwise; any other address needs CURVE (--curve-secret-key, --allowed-clients) or "
            "--insecure. Every command is logged. Ctrl-C or SIGTERM stops it gracefully: the "
            "exposure in progress is finished and answered first."
        ),
    )
    _add_instrument_options(serve)
    serve.add_argument(
        "--bind",
        default="tcp://127.0.0.1:5555",
        metavar="ENDPOINT",
        help="command endpoint (default tcp://127.0.0.1:5555; tcp://127.0.0.1:* takes a free port)",
    )
    serve.add_argument(
        "--events-bind",
        default="auto",
        metavar="ENDPOINT",
        help="event endpoint for heartbeats, tile-ready, dose warnings, state "
        "(default: same host, command port + 1)",
    )
    serve.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="the server's .key_secret file: turns on CurveZMQ authentication and encryption",
    )
    serve.add_argument(
        "--allowed-clients",
        metavar="DIR_OR_FILE",
        help="public .key file(s) of the clients allowed in (a file, or a folder of *.key)",
    )
    journal_options = serve.add_mutually_exclusive_group()
    journal_options.add_argument(
        "--journal",
        metavar="DIR",
        help="exposure journal folder: retried request ids are answered across restarts, never "
        "exposed twice (default: runs/serve-journal/<instrument hash>)",
    )
    journal_options.add_argument(
        "--no-journal",
        action="store_true",
        help="keep the request-id bookkeeping in memory only (a restart forgets it)",
    )
    serve.add_argument(
        "--tile-budget",
        type=_byte_size,
        default=8 << 30,
        metavar="SIZE",
        help="tiles kept on disk in the journal folder for answering retried request ids, e.g. 8G "
        "(default 8 GiB: a whole session); older tiles are then answered reply_expired, never re-exposed",
    )
    serve.add_argument(
        "--memory-budget",
        type=_byte_size,
        default=512 << 20,
        metavar="SIZE",
        help="recent tiles also kept in memory, e.g. 512M (default 512 MiB)",
    )
    serve.add_argument(
        "--heartbeat", type=float, default=1.0, metavar="S", help="heartbeat interval, seconds (default 1)"
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="on stop, seconds the exposure in progress may take before it is aborted (default 10)",
    )
    serve.add_argument("--log", metavar="FILE", help="also write the command log to this file")
    serve.add_argument(
        "--endpoint-file",
        metavar="FILE",
        help="write the bound endpoints as JSON here once listening (for scripts using port *)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without CURVE (isolated instrument networks only)",
    )
    serve.set_defaults(handler=cmd_serve)

    keys = commands.add_parser(
        "keys",
        help="CurveZMQ key pairs for the instrument link",
        description="Manage CurveZMQ keys for an authenticated instrument link.",
    )
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    generate = keys_commands.add_parser(
        "generate",
        help="write a new key pair",
        description=(
            "Write NAME.key (public: give it to the other side, e.g. into the server's "
            "--allowed-clients folder) and NAME.key_secret (secret: stays on this machine, created "
            "readable by its owner only). Existing files are never overwritten."
        ),
    )
    generate.add_argument("--out", required=True, metavar="DIR", help="folder for the two files (created)")
    generate.add_argument("--name", default="micrography", help="file stem (default micrography)")
    generate.set_defaults(handler=cmd_keys)

    config = commands.add_parser(
        "config",
        help="every setting with its unit, default and description",
        description="Show the configuration settings (docs/configuration.md is `config show --defaults "
        "--markdown`).",
    )
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = config_commands.add_parser(
        "show",
        help="print the settings of a configuration file, or the defaults",
        description="Print every key of the session and simulator configurations: value, unit, "
        "description, and the default where the value differs.",
    )
    show.add_argument("which", nargs="?", default="all", choices=["all", "session", "simulator"])
    show.add_argument("--config", metavar="YAML", help="show this file's values (with session or simulator)")
    show.add_argument("--defaults", action="store_true", help="show the defaults only")
    show.add_argument("--markdown", action="store_true", help="the reference page as Markdown (defaults)")
    show.add_argument(
        "--yaml", action="store_true", help="the defaults as a commented YAML file (configs/*.yaml)"
    )
    show.set_defaults(handler=cmd_config)
    return parser


def _add_view_bind(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--view-bind",
        default=DEFAULT_VIEW_BIND,
        metavar="HOST:PORT",
        help=f"where the live view listens (default {DEFAULT_VIEW_BIND}, loopback only; any other "
        "address needs a token, generated and printed unless --view-token gives one; port 0: any free)",
    )
    parser.add_argument("--view-token", metavar="TOKEN", help="the live view's access token")


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
        # One line, whatever the error: several problems are joined, so a log shows each mistake once.
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"micrography: error: {message}", file=sys.stderr)
        return 1
    except OSError as error:
        # A path that passed the checks and then failed (disk full, removed meanwhile).
        where = f"{error.filename}: " if error.filename else ""
        print(f"micrography: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("micrography: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
