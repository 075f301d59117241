"""The content-addressed artifact store, checkpoint files and checkpoint watching."""
