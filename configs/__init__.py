"""The Hydra configs of cnntrain, installed as the package `cnntrain.configs` (see pyproject)."""
