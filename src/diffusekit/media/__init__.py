"""Pictures and videos of what the pipelines make: labelled grids, denoising videos and GIFs."""
