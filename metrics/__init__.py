"""Records, SSE parsing, server-truth scraping, GPU sampling, Locust hooks and reports."""
