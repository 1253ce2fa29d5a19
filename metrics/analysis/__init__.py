"""Pure analysis: figures from records and truth snapshots (accounting, GPU attribution, replay, capacity, the
probe's cells). No I/O and no Locust here, so a report can be rebuilt from saved files."""
