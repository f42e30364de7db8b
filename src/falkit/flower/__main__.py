"""`python -m falkit.flower`: print the Flower App directory to pass to `flwr run` (with a
run-config key for every registered method's options, plug-ins included)."""

from falkit.flower.common import app_dir

print(app_dir())
