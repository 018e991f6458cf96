"""diffusekit: Stable-Diffusion-style image generation, written from the math up.

    from diffusekit import Pipeline, GenerationParams
    pipe = Pipeline.from_pretrained("shapes")
    result = pipe.generate(GenerationParams(prompt="a red circle", steps=20, sampler_name="DPM++ 2M",
                                            scheduler="Karras", cfg_scale=5, seed=1))
"""
from .version import __version__

__all__ = ["Pipeline", "GenerationParams", "__version__"]


def __getattr__(name):  # lazy: `import diffusekit` stays cheap for the CLI and the core math
    if name in ("Pipeline", "GenerationParams"):
        from . import pipelines
        return getattr(pipelines, name)
    raise AttributeError(f"module 'diffusekit' has no attribute {name!r}")
