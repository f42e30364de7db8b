"""`python -m falkit.flower`: print the Flower App directory to pass to `flwr run`."""

from falkit.flower import APP_DIR

print(APP_DIR)
