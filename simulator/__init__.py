"""stopstorm's embedded target: an OpenAI-compatible server faithful to vLLM where stops are concerned.

Its engine (`simulator.engine`) runs without sockets; its HTTP front (`simulator.server`) adds vLLM's
disconnect handling, /metrics and request log; its ledger (`simulator.ledger`) is the per-request truth every
stopstorm figure is checked against.
"""

from stopstorm.simulator.config import SimulatorConfig
from stopstorm.simulator.launcher import EmbeddedSimulator
from stopstorm.simulator.ledger import Ledger, LedgerEntry

__all__ = ["EmbeddedSimulator", "Ledger", "LedgerEntry", "SimulatorConfig"]
