"""The linear segmentation probe: model and checkpoints, sweep, evaluation, segmentation metrics."""
