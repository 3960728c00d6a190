"""``BridgeHost``: what the plug-in runs inside Nion Swift (the usim specimen, the driver, the server).

Nion Swift constructs plug-in extensions while it imports plug-ins, before the
instrumentation plug-in has created the scan hardware sources. The host therefore
registers the optional usim specimen device at once, and starts the
:class:`~simulator.server.InstrumentServer` on a background thread as soon as the
configured hardware source appears (or reports why it did not, after ``startup_timeout_s``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.errors import ConfigError, MicrographyError
from nionswift_plugin.micrography_bridge.config import BridgeConfig
from nionswift_plugin.micrography_bridge.driver import NionScanDriver

LOG = logging.getLogger("micrography.nion")
DEFAULT_STARTUP_TIMEOUT_S = 30.0


class BridgeHost:
    """Serve the Micrography protocol from inside Nion Swift.

    Parameters
    ----------
    api : nion.swift.Facade.API_1
        The Nion Swift API (``api_broker.get_api(version="~1.0")``).
    config : BridgeConfig
        What to serve and how to map the stage.
    startup_timeout_s : float
        How long to wait for the scan hardware source to appear, seconds.
    """

    def __init__(
        self, api: Any, config: BridgeConfig, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    ) -> None:
        self.api = api
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.server: Any = None
        self.driver: NionScanDriver | None = None
        self.generator: Any = None
        self.error: BaseException | None = None
        """Why the bridge could not start, if it could not."""
        self.ready = threading.Event()
        """Set once the server listens, or once starting it has failed (see :attr:`error`)."""
        self._closing = threading.Event()
        self._registered: tuple[Any, Any] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> BridgeHost:
        """Register the usim specimen device (if configured) and start serving in the background."""
        if self.config.usim_specimen is not None:
            from nionswift_plugin.micrography_bridge.usim_specimen import (
                ReplayScanGenerator,
                SpecimenScanGenerator,
                register_specimen_scan_device,
            )
            from simulator.config import SimulatorConfig

            usim = self.config.usim_specimen
            if usim.replay:
                from simulator.replay import ReplayMicroscope

                replay = ReplayMicroscope.from_path(
                    usim.replay,
                    pixel_size_nm=usim.replay_pixel_size_nm,
                    recorded_dwell_us=usim.replay_dwell_us,
                    counts_per_unit=usim.replay_counts_per_unit,
                )
                self.generator = ReplayScanGenerator(replay, rotation_deg=usim.rotation_deg)
            else:
                simulator = (
                    load_config(usim.simulator_config, SimulatorConfig)
                    if usim.simulator_config
                    else SimulatorConfig()
                )
                simulator = simulator.model_copy(update={"seed": usim.seed})
                self.generator = SpecimenScanGenerator(simulator, rotation_deg=usim.rotation_deg)
            self._registered = register_specimen_scan_device(self.generator, usim.scan_device_id)
        self._thread = threading.Thread(
            target=self._serve_when_ready, name="micrography-bridge-start", daemon=True
        )
        self._thread.start()
        return self

    def _hardware_source(self) -> Any:
        try:
            return self.api.get_hardware_source_by_id(self.config.hardware_source_id, "~1.0")
        except AttributeError:  # the hardware-source manager is not registered yet
            return None

    def _serve_when_ready(self) -> None:
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            scan = self._hardware_source()
            while scan is None:
                if self._closing.is_set():
                    return
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"Nion Swift has no hardware source {self.config.hardware_source_id!r} after "
                        f"{self.startup_timeout_s:g} s; set hardware_source_id in the bridge settings to "
                        "your "
                        "scan device (see docs/nion.md, troubleshooting)"
                    )
                time.sleep(0.05)
                scan = self._hardware_source()
            self._start_server(scan)
        except BaseException as error:  # reported through .error and the log; Swift must keep running
            self.error = error
            LOG.error("Micrography bridge not started: %s", error)
        finally:
            self.ready.set()

    def _beam_current_pa(self) -> float:
        if self.config.beam_current_pa is not None:
            return self.config.beam_current_pa
        instrument = self.api.get_instrument_by_id(self.config.instrument_id, "~1.0")
        if instrument is None:
            raise ConfigError(
                f"Nion Swift has no instrument {self.config.instrument_id!r} to read the beam current from; "
                "set instrument_id, or beam_current_pa in the bridge settings"
            )
        amperes = instrument.get_control_output("BeamCurrent")
        if not amperes or amperes <= 0:
            raise ConfigError(
                f"the instrument reports a beam current of {amperes!r} A; "
                "set beam_current_pa in the bridge settings"
            )
        return float(amperes) * 1e12

    def _start_server(self, scan: Any) -> None:
        from agent.protocol.security import CurveServerKeys
        from simulator.server import InstrumentServer, instrument_digest

        config = self.config
        curve = CurveServerKeys.from_settings(
            config.curve_secret_key, config.allowed_clients, ("curve_secret_key", "allowed_clients")
        )
        self.driver = NionScanDriver(
            scan, config, self._beam_current_pa(), name=f"Nion Swift: {config.hardware_source_id}"
        )
        journal = Path(config.journal) / instrument_digest(self.driver) if config.journal else None
        self.server = InstrumentServer(
            self.driver,
            config.bind,
            events_bind=config.events_bind,
            curve=curve,
            journal=journal,
            heartbeat_s=config.heartbeat_s,
            allow_insecure=config.insecure,
            logger=LOG.getChild("server"),
        ).start()
        if config.endpoint_file:
            self.server.write_endpoints(config.endpoint_file)
        LOG.info("Micrography bridge serving %s on %s", config.hardware_source_id, self.server.endpoint)

    def close(self, grace_s: float = 10.0, *, unregister: bool = True) -> None:
        """Stop the server (finishing the exposure in progress) and unregister the usim specimen.

        Parameters
        ----------
        grace_s : float
            Seconds the exposure in progress may take before it is aborted.
        unregister : bool
            Unregister the usim specimen device; only possible while Nion Swift's
            hardware-source manager is still open (not when Swift unloads its plug-ins).
        """
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=self.startup_timeout_s + 5.0)
        if self.server is not None:
            self.server.stop(grace_s=grace_s)
            self.server = None
        if self.driver is not None:
            self.driver.close()
        if self._registered is not None and unregister:
            from nionswift_plugin.micrography_bridge.usim_specimen import unregister_specimen_scan_device

            unregister_specimen_scan_device(*self._registered)
            self._registered = None


def start_from_environment(api: Any) -> BridgeHost | None:
    """Start the bridge from the file named by ``MICROGRAPHY_NION_BRIDGE``; None when it is not set.

    Errors in the settings are logged, never raised: a bad file must not stop Nion Swift.
    """
    from nionswift_plugin.micrography_bridge.config import CONFIG_ENV, load_bridge_config

    try:
        config = load_bridge_config()
    except MicrographyError as error:
        LOG.error("Micrography bridge not started: %s", error)
        return None
    if config is None:
        LOG.info("Micrography bridge off: set %s to its settings file to serve", CONFIG_ENV)
        return None
    try:
        return BridgeHost(api, config).start()
    except MicrographyError as error:  # an unreadable recording, for example
        LOG.error("Micrography bridge not started: %s", error)
        return None
