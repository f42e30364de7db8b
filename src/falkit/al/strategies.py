"""Imports every strategy module so that each registers itself."""

from falkit.al import badge, coreset, fairfal, kafal, logo, uncertainty  # noqa: F401
