"""The report: one document per run and one writer per format (JSON, console, HTML, comparisons, GPU files)."""
