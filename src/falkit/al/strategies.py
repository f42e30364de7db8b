"""Imports every strategy module so that each registers itself."""

from falkit.al import (  # noqa: F401
    alfamix,
    badge,
    coreset,
    fairfal,
    fast,
    gcnal,
    ifal,
    kafal,
    ll4al,
    logo,
    uncertainty,
)
