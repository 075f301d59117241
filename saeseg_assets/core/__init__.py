"""Pure Python/numpy/torch library of saeseg; nothing here imports dagster."""
