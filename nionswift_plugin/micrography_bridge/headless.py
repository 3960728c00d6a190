"""Nion Swift without a display: start it, keep it running, shut it down.

:class:`HeadlessSwift` runs the real Nion Swift application on ``nion.ui.TestUI`` (no Qt, no
window system) with its data, document and configuration folders in a temporary directory,
loads every installed plug-in (usim, the instrumentation kit, this bridge) and drives the
application by calling ``app.periodic()``. The command line runs the bridge with the
simulated specimen, for watching a guided session go through Nion Swift::

    python -m nionswift_plugin.micrography_bridge.headless            # serves tcp://127.0.0.1:5555
    micrography run --instrument tcp://127.0.0.1:5555 --budget 6      # in a second terminal
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from agent.errors import ConfigError, MicrographyError
from nionswift_plugin.micrography_bridge.config import CONFIG_ENV

PERIODIC_S = 0.02
"""Interval of ``app.periodic()`` calls, seconds (what Nion Swift's Qt loop uses)."""


class HeadlessSwift:
    """The Nion Swift application running headless, with all installed plug-ins.

    Parameters
    ----------
    bridge_config : str or pathlib.Path, optional
        Settings file of the Micrography bridge (exported as ``MICROGRAPHY_NION_BRIDGE`` while
        plug-ins load); None leaves the variable as it is.
    workdir : str or pathlib.Path, optional
        Where Swift keeps its profile, logs and settings; a temporary folder (removed on close)
        by default.

    Notes
    -----
    Nion Swift keeps global state (the plug-in registry), so one process runs at most one
    instance at a time. Always close it (``with`` block): its acquisition threads are not
    daemon threads and would keep the process alive.
    """

    def __init__(self, bridge_config: str | Path | None = None, workdir: str | Path | None = None) -> None:
        self.bridge_config = bridge_config
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="nionswift-"))
        self.app: Any = None
        self.api: Any = None
        self._previous_setting: str | None = None
        self._setting_exported = False

    def start(self) -> Self:
        """Start Nion Swift and load the plug-ins; returns once the application has started.

        Raises
        ------
        ConfigError
            If Nion Swift is not installed (``pip install -e ".[nion]"``).
        """
        try:
            from nion.swift import Application, Facade
            from nion.ui import TestUI
        except ImportError as error:
            raise ConfigError(
                f"Nion Swift is not installed ({error.name} missing); install it with "
                'python -m pip install -e ".[nion]"'
            ) from None
        folders = {
            name: self.workdir / name
            for name in ("data", "documents", "configuration", "temporary", "profile")
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)

        class _UserInterface(TestUI.UserInterface):  # type: ignore[misc]
            proxy = None  # Application.initialize logs the proxy's type

            def get_data_location(self) -> str:
                return str(folders["data"])

            def get_document_location(self) -> str:
                return str(folders["documents"])

            def get_configuration_location(self) -> Path:
                return folders["configuration"]

            def get_temporary_location(self) -> str:
                return str(folders["temporary"])

        if self.bridge_config is not None:
            self._previous_setting = os.environ.get(CONFIG_ENV)
            os.environ[CONFIG_ENV] = str(self.bridge_config)
            self._setting_exported = True
        # The API broker must exist before plug-ins load: they ask it for the API on construction.
        Facade.initialize()
        self.app = Application.Application(_UserInterface())
        try:
            self.app.initialize(load_plug_ins=True, use_root_dir=False)
            if not self.app.start(profile_dir=folders["profile"]):
                raise ConfigError(f"Nion Swift did not start with the profile in {folders['profile']}")
        except BaseException:
            self.close()
            raise
        self.api = Facade.get_api("~1.0", "~1.0")
        return self

    def bridge(self) -> Any:
        """The running :class:`~nionswift_plugin.micrography_bridge.host.BridgeHost`, or None."""
        from nion.swift.model import PlugInManager

        for extension in PlugInManager.extensions:
            if type(extension).__name__ == "MicrographyBridgeExtension":
                return extension.host
        return None

    def periodic_until(self, done: threading.Event, timeout_s: float | None = None) -> bool:
        """Drive the application until ``done`` is set (or ``timeout_s`` passes); True if it was set."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.app.periodic()
            done.wait(PERIODIC_S)
        return True

    def close(self) -> None:
        """Shut Nion Swift down (plug-ins first, so the bridge finishes its exposure) and clean up."""
        if self.app is not None:
            host = self.bridge()
            if host is not None:
                # Before the application closes its hardware-source manager, so the usim specimen
                # device can still be unregistered cleanly.
                host.close()
            app, self.app = self.app, None
            try:
                app.exit()
            finally:
                app.deinitialize()
        if self._setting_exported:
            self._setting_exported = False
            # The variable is this process's, not the caller's: put back what was there.
            if self._previous_setting is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = self._previous_setting
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


DEMO_SETTINGS: dict[str, Any] = {
    "bind": "tcp://127.0.0.1:5555",
    "hardware_source_id": "micrography_usim_scan",
    "instrument_id": "micrography_usim_scan_stem_controller",
    "detectors": {"HAADF": 0},
    "field_nm": [160.0, 160.0],
    "max_tile_shape": [1024, 1024],
    "pixel_size_nm": [0.005, 0.5],
    "scan_rotation_deg": 30.0,
    "usim_specimen": {"seed": 0, "rotation_deg": 30.0},
}
"""Settings of the demonstration: the seed-0 specimen in usim, whose scan is turned by 30 degrees."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run Nion Swift headless with the bridge until Ctrl-C or SIGTERM; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m nionswift_plugin.micrography_bridge.headless",
        description="Run Nion Swift headless (TestUI) with usim and the Micrography bridge, serving the "
        "Micrography protocol. Without --config it simulates the seed-0 synthetic specimen in usim with "
        "its scan turned by 30 degrees and serves it on tcp://127.0.0.1:5555; then run "
        "`micrography run --instrument tcp://127.0.0.1:5555` in another terminal.",
    )
    parser.add_argument("--config", metavar="YAML", help="bridge settings (docs/nion.md); default: the demo")
    parser.add_argument("--bind", help="command endpoint (overrides the settings)")
    parser.add_argument("--seed", type=int, help="specimen seed of the demo")
    parser.add_argument(
        "--replay", metavar="PATH", help="serve a recording (.h5 dataset layout, .npy, .tif) in usim instead"
    )
    parser.add_argument(
        "--replay-pixel-size", type=float, metavar="NM", help="pixel size of the recording, nm"
    )
    parser.add_argument("--replay-dwell", type=float, metavar="US", help="dwell of the recording, us")
    parser.add_argument(
        "--replay-counts-per-unit",
        type=float,
        metavar="C",
        help="detected electrons per unit of the recorded signal (1 for counts)",
    )
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="micrography-nion-") as scratch:
            if args.config:
                settings_file = Path(args.config)
                if args.bind or args.seed is not None or args.replay:
                    settings = yaml.safe_load(settings_file.read_text(encoding="utf-8")) or {}
                    settings_file = Path(scratch) / "bridge.yaml"
                    _override(settings, args)
                    settings_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
            else:
                settings = {**DEMO_SETTINGS, "usim_specimen": dict(DEMO_SETTINGS["usim_specimen"])}
                _override(settings, args)
                settings_file = Path(scratch) / "bridge.yaml"
                settings_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
            stop = threading.Event()
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                with HeadlessSwift(settings_file) as swift:
                    host = swift.bridge()
                    if host is None:
                        raise ConfigError(
                            "the Micrography bridge plug-in did not load; see the Nion Swift log above"
                        )
                    started = swift.periodic_until(host.ready, timeout_s=60.0)
                    if not started or host.error is not None:
                        raise ConfigError(f"the bridge did not start: {host.error or 'timed out'}")
                    print(
                        f"Nion Swift (headless) serves {host.config.hardware_source_id} "
                        f"on {host.server.endpoint}; "
                        "Ctrl-C stops it",
                        flush=True,
                    )
                    with contextlib.suppress(KeyboardInterrupt):
                        swift.periodic_until(stop)
            finally:
                signal.signal(signal.SIGTERM, previous)
    except MicrographyError as error:
        print(f"micrography-nion: error: {error}", file=sys.stderr)
        return 1
    print("Nion Swift stopped", flush=True)
    return 0


def _override(settings: dict[str, Any], args: argparse.Namespace) -> None:
    if args.bind:
        settings["bind"] = args.bind
    usim = settings.get("usim_specimen")
    if usim is None:
        return
    if args.seed is not None:
        usim["seed"] = args.seed
    if args.replay:
        from simulator.replay import ReplayMicroscope

        # The field offered is the recording's extent.
        description = ReplayMicroscope.from_path(
            args.replay,
            pixel_size_nm=args.replay_pixel_size,
            recorded_dwell_us=args.replay_dwell,
            counts_per_unit=args.replay_counts_per_unit,
        ).describe()
        usim.update(
            {
                "replay": str(Path(args.replay).resolve()),
                "replay_pixel_size_nm": args.replay_pixel_size,
                "replay_dwell_us": args.replay_dwell,
                "replay_counts_per_unit": args.replay_counts_per_unit,
            }
        )
        settings["field_nm"] = [description.stage_x_nm[1], description.stage_y_nm[1]]
        settings["pixel_size_nm"] = list(description.pixel_size_nm)


if __name__ == "__main__":
    raise SystemExit(main())
