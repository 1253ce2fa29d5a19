"""The Locust plugin: the only code that touches `locust.events`. Importing `stopstorm.metrics.plugin.hooks`
registers stopstorm's options and listeners (the locustfiles do)."""
