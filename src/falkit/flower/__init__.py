"""falkit on Flower (DESIGN.md §8): the one FAL cycle (`falkit.driver`) as a Flower App.

`server_app.app` (a ServerApp, Message API) drives the cycle on a `FlowerFederation`: a
`query.info` round (pool sizes, data shape), per cycle a `query.stats` round for strategies
with a server statistic (FairFAL's γ_k), a `query.select` round, the FL rounds (`train`,
aggregated by falkit's own algorithm code), and an `evaluate` round; it writes (and resumes)
the same run directory as `falkit run`. `client_app.app` (a ClientApp) keeps its pools in
`context.state` and on its own disk, trains and queries with the same engine and strategies
(`falkit.client`), and asks its oracle locally. `APP_DIR` is the Flower App
project to hand to `flwr run` (print it with `python -m falkit.flower`).
"""

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"
