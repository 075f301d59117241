"""The asset definitions, one module per stage."""
