"""Locust user classes, one per client stack, over one shared streaming core."""
