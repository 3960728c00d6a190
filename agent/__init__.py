"""Micrography agent: what runs next to the microscope.

The agent defines the driver contract (:mod:`agent.driver`) that instruments
implement, the configuration loader (:mod:`agent.config`) and the typed errors
(:mod:`agent.errors`) every part of Micrography raises.
"""

__version__ = "0.1.0"
