"""The live view: watch and steer a running session from a browser.

:mod:`agent.view.feed` builds what the page shows from a running session (through its public,
read-only ``on_step`` hook and attributes) or from a journal; :mod:`agent.view.server` serves it
with Starlette on uvicorn; ``static/`` holds the page. ``micrography run --view`` and
``micrography view JOURNAL`` start it; docs/live-view.md describes the page and the API.
"""

from agent.view.feed import JournalFeed, SessionFeed, ViewHub
from agent.view.server import ViewError, ViewServer, parse_bind

__all__ = ["JournalFeed", "SessionFeed", "ViewError", "ViewHub", "ViewServer", "parse_bind"]
