"""ComfyUI workflows: the executor's cost next to the pipeline doing the same job.

    python bench/graph.py [--runs 5] [--threads 1]

The default txt2img graph (examples/workflows/txt2img.json: shapes model, 64x64, 20 steps euler/normal,
cfg 8) through validate_prompt + GraphExecutor (text encoding, sampling, decode, PNG with its chunks) and
Pipeline.generate with the same settings (A1111's conventions: its start noise differs, the work is the
same), interleaved, medians; plus validating the graph alone and rerunning it fully cached."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffusekit import GenerationParams
from diffusekit.graph import Environment, GraphExecutor, validate_prompt

GRAPH = Path(__file__).resolve().parents[1] / "examples" / "workflows" / "txt2img.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    env = Environment(output_dir=tmp, input_dir=tmp, temp_dir=tmp)
    base = json.loads(GRAPH.read_text())
    pipe = env.load_checkpoint("shapes")
    graph_s, pipe_s, cpu_g, cpu_p = [], [], [], []
    for i in range(args.runs + 1):                       # run 0 warms both up
        prompt = json.loads(json.dumps(base))
        prompt["3"]["inputs"]["seed"] = i
        t, c = time.perf_counter(), time.process_time()
        check = validate_prompt(prompt, env)
        GraphExecutor(env).run(prompt, "bench", check.outputs)
        if i:
            graph_s.append(time.perf_counter() - t)
            cpu_g.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        pipe.generate(GenerationParams(prompt=prompt["6"]["inputs"]["text"], steps=20, sampler_name="Euler",
                                       scheduler="Normal", cfg_scale=8, seed=i, width=64, height=64))
        if i:
            pipe_s.append(time.perf_counter() - t)
            cpu_p.append(time.process_time() - c)
    ex = GraphExecutor(env)
    check = validate_prompt(prompt, env)
    ex.run(prompt, "warm", check.outputs)
    t = time.perf_counter()
    check = validate_prompt(json.loads(json.dumps(prompt)), env)
    validate_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    ex.run(prompt, "cached", check.outputs)
    cached_ms = (time.perf_counter() - t) * 1e3
    g, p = statistics.median(graph_s), statistics.median(pipe_s)
    print("| graph s | pipeline s | ratio (wall) | ratio (CPU time) | validate ms | cached rerun ms |")
    print(f"| {g:.3f} | {p:.3f} | {g / p:.2f} | {statistics.median(cpu_g) / statistics.median(cpu_p):.2f} | "
          f"{validate_ms:.2f} | {cached_ms:.2f} |")


if __name__ == "__main__":
    main()
