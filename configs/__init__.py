"""Hydra configs (installed as cnntrain.configs). Importing it declares their schemas."""

import cnntrain.schema  # noqa: F401  (registers the structured configs the YAML files extend)
