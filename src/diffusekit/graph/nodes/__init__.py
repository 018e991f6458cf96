"""The core nodes, registered in `graph.spec.NODES` on import (ComfyUI's class_type names)."""
from . import image, latent, loaders  # noqa: F401  (registration)
