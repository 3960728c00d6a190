"""Micrography bridge: a Nion Swift plug-in that serves the Micrography instrument protocol.

Nion Swift loads every ``nionswift_plugin.*`` package it finds and constructs its classes
whose names end in ``Extension``. :class:`MicrographyBridgeExtension` reads the settings file
named by ``MICROGRAPHY_NION_BRIDGE`` (see ``docs/nion.md``) and, when there is one, serves the
configured scan device to Micrography agents over ZeroMQ. Nothing Nion-specific is imported
here at module level, so the geometry and settings modules stay importable without Nion.
"""

from __future__ import annotations

from typing import Any


class MicrographyBridgeExtension:
    """The plug-in object Nion Swift creates at start-up.

    Parameters
    ----------
    api_broker : nion.swift.model.PlugInManager.APIBroker
        Gives the Nion Swift API.
    """

    extension_id = "com.micrography.nion-bridge"

    def __init__(self, api_broker: Any) -> None:
        from nionswift_plugin.micrography_bridge.host import start_from_environment

        api = api_broker.get_api(version="~1.0")
        self.host = start_from_environment(api)

    def close(self) -> None:
        """Stop serving when Nion Swift shuts down."""
        if self.host is not None:
            # Swift has already closed its hardware-source manager when it unloads plug-ins.
            self.host.close(unregister=False)
            self.host = None
