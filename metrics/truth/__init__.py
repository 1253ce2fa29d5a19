"""Truth readers: where stopstorm learns what the server really did (the only part of metrics/ that does I/O
against the target): the simulator's ledger, vLLM's /metrics and request log, NVML and a DCGM exporter."""
