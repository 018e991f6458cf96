"""Loaders and text conditioning: CheckpointLoaderSimple, LoraLoader, CLIPSetLastLayer, CLIPTextEncode,
ConditioningCombine, ConditioningSetArea, ConditioningZeroOut (ComfyUI nodes.py names and defaults)."""
from __future__ import annotations

import re

import torch

from ...models.lora import load_lora
from ...pipelines import prompts as P
from ...pipelines.params import MAX_PROMPT_CHARS
from ..spec import MAX_RESOLUTION, Combo, Float, Int, Link, String, register
from ..values import ClipRef, ModelRef, VaeRef

_EMBEDDING = re.compile(r"embedding:([^\s,()\[\]:]+)")


@register("CheckpointLoaderSimple", category="loaders", display_name="Load Checkpoint",
          inputs={"ckpt_name": Combo(lambda env: list(env.checkpoint_files()),
                                     tooltip="The name of the checkpoint (model) to load.")},
          outputs=("MODEL", "CLIP", "VAE"))
def checkpoint_loader(ctx, ckpt_name):
    """Loads a diffusion model checkpoint: the UNet (MODEL), its text encoders (CLIP) and its VAE."""
    pipe = ctx.env.load_checkpoint(ckpt_name)
    return ModelRef(pipe, ckpt_name), ClipRef(pipe), VaeRef(pipe)


@register("CLIPSetLastLayer", category="conditioning", display_name="CLIP Set Last Layer",
          inputs={"clip": Link("CLIP"), "stop_at_clip_layer": Int(-1, -24, -1, 1)}, outputs=("CLIP",))
def clip_set_last_layer(ctx, clip, stop_at_clip_layer):
    """Reads the text encoder's hidden state at that layer from the end (-2 = A1111's Clip skip 2)."""
    return (ClipRef(clip.pipe, -int(stop_at_clip_layer), clip.loras),)


@register("LoraLoader", category="loaders", display_name="Load LoRA",
          inputs={"model": Link("MODEL"), "clip": Link("CLIP"),
                  "lora_name": Combo(lambda env: list(env.lora_files())),
                  "strength_model": Float(1.0, -100.0, 100.0), "strength_clip": Float(1.0, -100.0, 100.0)},
          outputs=("MODEL", "CLIP"))
def lora_loader(ctx, model, clip, lora_name, strength_model, strength_clip):
    """Applies a LoRA (kohya / A1111 / diffusers layout) to the UNet and the text encoders at the given
    strengths; several LoraLoader nodes chain."""
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    files = ctx.env.lora_files()
    if lora_name not in files:
        raise ValueError(f"lora_name={lora_name!r} is not in the LoRA folder; valid: {', '.join(files) or 'none'}")
    lora = load_lora(files[lora_name], te_count=len(model.pipe.family.text_encoders))
    return (ModelRef(model.pipe, model.name, model.loras + ((lora_name, lora, float(strength_model)),)),
            ClipRef(clip.pipe, clip.clip_skip, clip.loras + ((lora_name, lora, float(strength_clip)),)))


def _comfy_prompt(text: str) -> str:
    """ComfyUI's prompt text in the A1111 syntax our tokenizer reads: `embedding:name` (optionally with the
    file extension) -> the name; square brackets are plain text in ComfyUI, so they are escaped."""
    text = _EMBEDDING.sub(lambda m: re.sub(r"\.(pt|bin|safetensors)$", "", m.group(1)), text)
    return re.sub(r"(?<!\\)([\[\]])", r"\\\1", text)


def encode_comfy(text_conditioner, text: str, clip_skip: int = 1):
    """A prompt encoded with ComfyUI's token weights (sd1_clip.encode_token_weights): the chunks are encoded
    unweighted beside as many empty chunks, and a token of weight w becomes empty + w (token - empty), the
    empty prompt's hidden state at that position; the pooled output is the first chunk's, unweighted.
    (A1111 instead scales the token by w and renormalises the mean.)"""
    chunks = text_conditioner.chunks(_comfy_prompt(text))
    if all(w == 1.0 for c in chunks for w in c.weights):
        return text_conditioner.encode_chunks(chunks, clip_skip)
    plain = [P.Chunk(c.tokens, (1.0,) * len(c.weights), c.fixes) for c in chunks]
    ours, empty = text_conditioner.encode_batch([plain, [P.empty_chunk()] * len(plain)], clip_skip)
    w = torch.tensor([x for c in chunks for x in P.build_weights(c)], dtype=ours.context.dtype,
                     device=ours.context.device)[None, :, None]                   # (1, 77n, 1)
    context = empty.context + w * (ours.context - empty.context)
    return type(ours)(context, ours.pooled)


@register("CLIPTextEncode", category="conditioning", display_name="CLIP Text Encode (Prompt)",
          inputs={"text": String(multiline=True, dynamicPrompts=True, tooltip="The text to be encoded."),
                  "clip": Link("CLIP", tooltip="The CLIP model used for encoding the text.")},
          outputs=("CONDITIONING",))
def clip_text_encode(ctx, text, clip):
    """Encodes a prompt with the model's text encoders: (word:1.2) weights as ComfyUI applies them,
    embedding:NAME for textual-inversion embeddings."""
    pipe = clip.pipe
    if len(str(text)) > MAX_PROMPT_CHARS:
        raise ValueError(f"the text is {len(str(text))} characters; at most {MAX_PROMPT_CHARS} are accepted")
    if pipe.text is None:
        raise ValueError(f"model {pipe.name!r} has no text encoder: it is not text-conditioned")
    pipe.refresh_embeddings()
    with clip.applied(), torch.no_grad():
        c = encode_comfy(pipe.text, str(text), clip.clip_skip)
    return ([[c.context.cpu(), {"pooled_output": None if c.pooled is None else c.pooled.cpu()}]],)


@register("ConditioningCombine", category="conditioning", display_name="Conditioning (Combine)",
          inputs={"conditioning_1": Link("CONDITIONING"), "conditioning_2": Link("CONDITIONING")},
          outputs=("CONDITIONING",))
def conditioning_combine(ctx, conditioning_1, conditioning_2):
    """Both conditionings guide the sampler together (their predictions are averaged where they overlap)."""
    return (list(conditioning_1) + list(conditioning_2),)


@register("ConditioningSetArea", category="conditioning", display_name="Conditioning (Set Area)",
          inputs={"conditioning": Link("CONDITIONING"), "width": Int(64, 64, MAX_RESOLUTION, 8),
                  "height": Int(64, 64, MAX_RESOLUTION, 8), "x": Int(0, 0, MAX_RESOLUTION, 8),
                  "y": Int(0, 0, MAX_RESOLUTION, 8), "strength": Float(1.0, 0.0, 10.0)},
          outputs=("CONDITIONING",))
def conditioning_set_area(ctx, conditioning, width, height, x, y, strength):
    """Restricts a conditioning to a rectangle of the image (pixels), with a strength."""
    area = (int(height), int(width), int(y), int(x))           # ComfyUI's (h, w, y, x) order, in pixels here
    return ([[c, {**opts, "area": area, "strength": float(strength), "set_area_to_bounds": False}]
             for c, opts in conditioning],)


@register("ConditioningZeroOut", category="advanced/conditioning",
          inputs={"conditioning": Link("CONDITIONING")}, outputs=("CONDITIONING",))
def conditioning_zero_out(ctx, conditioning):
    """All-zero text embeddings (and pooled output): the negative of models trained with zeroed prompts."""
    out = []
    for c, opts in conditioning:
        d = dict(opts)
        if d.get("pooled_output") is not None:
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append([torch.zeros_like(c), d])
    return (out,)
