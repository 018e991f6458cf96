"""Generation: what people actually run. The only layer that knows Stable Diffusion's specifics."""
from .params import GenerationParams, GenerationResult, StepInfo

__all__ = ["Pipeline", "GenerationParams", "GenerationResult", "StepInfo"]


def __getattr__(name):  # the pipeline pulls in the models; keep `import diffusekit.pipelines.params` light
    if name == "Pipeline":
        from .pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)
