"""The package version: one place, read by reports, output markers and `strataprune --version`."""

__version__ = "0.1.0"
