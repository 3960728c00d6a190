"""The wire protocol between the agent and an instrument server, and the agent's client driver.

* :mod:`agent.protocol.messages` – versioned pydantic headers, error codes.
* :mod:`agent.protocol.framing` – multipart encoding (JSON header + raw array frames), size
  limits, the libzmq version check.
* :mod:`agent.protocol.security` – CurveZMQ key files and the allowed-clients list.
* :mod:`agent.protocol.client` – :class:`~agent.protocol.client.ZmqMicroscope`, the driver the
  agent uses to run a session on a remote instrument.

``docs/protocol.md`` specifies the protocol for people writing an instrument server.
"""

from agent.protocol.messages import CAPABILITIES, PROTOCOL_NAME, PROTOCOL_VERSION, ErrorCode

__all__ = ["CAPABILITIES", "PROTOCOL_NAME", "PROTOCOL_VERSION", "ErrorCode"]
