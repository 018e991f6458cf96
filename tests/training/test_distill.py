"""Latent Consistency Distillation ([distill]): the target is the guided DDIM teacher step followed by the
target network's consistency function (checked against the pipeline's own CFG and the registry's DDIM
sampler), the boundary rows equal the teacher step exactly, exact resume after a kill, the exported file
is a consistency model that the pipeline (and the ComfyUI KSampler) samples, config errors teach.

The teacher is the tiny random-weight SD1 checkpoint of tests/pipelines; 32x32 shapes, one thread."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusekit.core import samplers
from diffusekit.core.consistency import ConsistencyDenoiser
from diffusekit.core.guidance import cfg
from diffusekit.pipelines.pipeline import UNetAdapter
from diffusekit.training.checkpoint import load_training_checkpoint
from diffusekit.training.config import config_from_dict
from diffusekit.training.distill import Distiller, export_student

pytestmark = pytest.mark.usefixtures("one_thread")
# test_finetune's loaded helpers: save_tiny (tests/pipelines/conftest.py), Stop and assert_same (test_trainer)
_ft = importlib.import_module("test_finetune")
_tiny, _trainer_tests = _ft._tiny, _ft._trainer_tests


def distill_tree(out: Path, base: Path, *, steps: int = 4, **distill) -> dict:
    return {
        "run": {"out_dir": str(out), "seed": 3, "threads": 1},
        "data": {"kind": "shapes", "size": 32, "length": 8, "seed": 0, "preload": True, "workers": 1},
        "distill": {"base": str(base), "intervals": 3, "guidance": 4.0, "target_ema": 0.5, **distill},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "warmup": 1, "ema_decay": 0.9, "eps": 1e-2,
                  "checkpoint_every": 2},
        "log": {"every": 1, "sample_every": 10_000, "progress": False, "prompts": ["a red circle"],
                "sample_seeds": [1], "sample_steps": 1, "sample_sampler": "LCM", "sample_scheduler": "SGM Uniform",
                "sample_cfg": 1.0},
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _tiny.save_tiny(tmp_path_factory.mktemp("teacher") / "tiny-sd1.safetensors", "sd1")


def _finished_run(tmp_path_factory, name: str, make_tree, base: Path) -> Path:
    out = tmp_path_factory.mktemp(name)
    Distiller(config_from_dict(make_tree(out, base))).run()
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base) -> Path:
    return _finished_run(tmp_path_factory, "distill", distill_tree, base)


def test_target_is_the_guided_ddim_step_then_the_target_network(base, tmp_path):
    d = Distiller(config_from_dict(distill_tree(tmp_path, base, intervals=3, guidance=4.0)))
    d._preload()
    with torch.no_grad():   # a target network that differs from the student, as after training steps
        g = torch.Generator().manual_seed(5)
        for p in d.target.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    idx = list(range(8))
    x0, ids = d._latents_and_ids(idx)
    pred, target, k = d.consistency_pair(torch.Generator().manual_seed(11), x0, ids, 0, 8, 8, d.model)
    assert {1} < set(k.tolist()), k       # boundary rows (n = 1) and rows above them

    # the same draws, recomputed with the pipeline's pieces
    gen = torch.Generator().manual_seed(11)
    k2 = torch.randint(1, 4, (8,), generator=gen)
    noise = torch.randn(8, *x0.shape[1:], generator=gen)
    assert torch.equal(k, k2)
    sched = d.teacher.schedule
    sig = sched.t_to_sigma(torch.tensor([0.0, 333.0, 666.0, 999.0], dtype=torch.float64)).float()
    wrapper = type(d.teacher.denoiser)
    target_f = ConsistencyDenoiser(wrapper(UNetAdapter(d.target.unet), sched))
    student_f = ConsistencyDenoiser(wrapper(UNetAdapter(d.model.unet), sched))
    uncond = d.encode(d.tokenizer([""]))
    for i in range(8):
        hi, lo = sig[k[i]], sig[k[i] - 1]
        x = x0[i:i + 1] + hi * noise[i:i + 1]
        ctx = d.encode(ids[i:i + 1])
        guided = cfg(d.teacher.denoiser, 4.0, {"context": ctx}, {"context": uncond})
        with torch.no_grad():
            x_prev = samplers.SAMPLERS["ddim"](guided, x, torch.stack([hi, lo]))
            want = target_f(x_prev, lo.reshape(1), context=ctx)
            want_pred = student_f(x, hi.reshape(1), context=ctx)
        # batch of 8 vs one row through teacher CFG + DDIM + target net: float32 kernels sum in a batch-dependent
        # order (seen: 7e-5 on values ~0.25); a wrong scaling or step is off by O(0.1)
        torch.testing.assert_close(target[i:i + 1], want, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(pred[i:i + 1].detach(), want_pred, rtol=1e-3, atol=1e-4)
        if k[i] == 1:   # f(x, sigma_min) = x: the target is the teacher's step itself, whatever the target net
            torch.testing.assert_close(target[i:i + 1], x_prev, rtol=1e-5, atol=1e-5)


def test_resume_after_kill_equals_the_straight_run(straight, base, tmp_path):
    tree = distill_tree(tmp_path, base)
    d = Distiller(config_from_dict(tree))

    def hook(stage, step):
        if step == 2:
            raise _trainer_tests.Stop   # as a kill right after the checkpoint at step 2

    d.on_step = hook
    with pytest.raises(_trainer_tests.Stop):
        d.run()
    Distiller(config_from_dict(tree), resume=True).run()
    a, b = load_training_checkpoint(tmp_path, "distill"), load_training_checkpoint(straight, "distill")
    assert a[0] == b[0] == 4
    _trainer_tests.assert_same(a[1], b[1])                                   # the student
    _trainer_tests.assert_same(a[2]["extra"]["target"], b[2]["extra"]["target"])   # the target network
    _trainer_tests.assert_same(a[2]["ema"]["shadow"], b[2]["ema"]["shadow"])  # the shipped EMA
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("stage,step,loss") and [r.split(",")[1] for r in rows[1:]] == ["1", "2", "3", "4"]
    with pytest.raises(FileExistsError, match="--resume"):
        Distiller(config_from_dict(tree))


def test_exported_student_is_a_consistency_model_the_pipeline_samples(straight, tmp_path):
    from diffusekit import GenerationParams, Pipeline
    from diffusekit.graph.sampling import comfy_denoiser
    path = straight / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor(next(k for k in f.keys() if k.startswith("model."))).dtype == torch.float16
    assert meta["diffusekit.distilled_from"] == "tiny-sd1"
    pipe = Pipeline.from_pretrained(path)
    assert pipe.family.consistency and isinstance(pipe.denoiser, ConsistencyDenoiser)
    assert isinstance(comfy_denoiser(pipe), ConsistencyDenoiser)
    img = pipe.generate(GenerationParams(prompt="a red circle", steps=1, sampler_name="LCM",
                                         scheduler="SGM Uniform", cfg_scale=1, seed=1, width=32, height=32)).images[0]
    assert img.size == (32, 32)
    # the online student's weights differ from the EMA ones that run() exported
    online = export_student(straight, tmp_path / "online.safetensors", ema=False)
    with safe_open(str(online), "pt") as f, safe_open(str(path), "pt") as g:
        key = next(k for k in f.keys() if k.startswith("model.diffusion_model.out"))
        assert not torch.equal(f.get_tensor(key), g.get_tensor(key))
        assert torch.equal(f.get_tensor("cond_stage_model.transformer.text_model.final_layer_norm.weight"),
                           g.get_tensor("cond_stage_model.transformer.text_model.final_layer_norm.weight"))


def test_a_consistency_model_is_not_a_teacher(straight, tmp_path):
    with pytest.raises(ValueError, match="already consistency-distilled"):
        Distiller(config_from_dict(distill_tree(tmp_path, straight / "model.safetensors")))


@pytest.mark.parametrize("bad, message", [
    ({"distill": {"solver": "euler"}}, "distill.solver='euler'; valid with method='consistency': ddim"),
    ({"distill": {"solver": "dpmpp_2m"}}, "distill.solver='dpmpp_2m'; valid with method='consistency': ddim$"),
    ({"distill": {"method": "trajectory", "solver": "euler"}}, "valid with method='trajectory': ddim, dpmpp_2m"),
    ({"distill": {"method": "reflow"}}, "distill.method='reflow'; valid: consistency, trajectory"),
    ({"distill": {"method": "trajectory", "substeps": 0}}, "distill.substeps=0"),
    ({"distill": {"intervals": 0}}, "distill.intervals=0"),
    ({"distill": {"loss": "l1"}}, "distill.loss='l1'; valid: huber, l2"),
    ({"distill": {"target_ema": 1.0}}, "distill.target_ema=1.0"),
    ({"distill": {"guidance": 0.5}}, "distill.guidance=0.5"),
    ({"distill": {"method": "trajectory", "start_share": 1.5}}, "distill.start_share=1.5: must be in \\[0, 1\\]"),
    ({"distill": {"start_share": 0.5}}, "start_share=0.5 needs method = 'trajectory'"),
    ({"finetune": {"base": "shapes"}}, "drop \\[finetune\\]"),
])
def test_config_errors_name_the_value(bad, message, tmp_path):
    tree = distill_tree(tmp_path, Path("x.safetensors"))
    for table, values in bad.items():
        tree.setdefault(table, {}).update(values)
    with pytest.raises(ValueError, match=message):
        config_from_dict(tree)


def test_student_from_warm_starts_the_student_and_checks_the_architecture(straight, base, tmp_path):
    from diffusekit.models.loading import load_checkpoint
    earlier = straight / "model.safetensors"                             # a consistency model may start one
    d = Distiller(config_from_dict(distill_tree(tmp_path / "a", base, student_from=str(earlier))))
    want = load_checkpoint(earlier, dtype=torch.float32).unet.state_dict()
    got = d.model.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    teacher = d.parts.unet.state_dict()
    assert any(not torch.equal(got[k], teacher[k]) for k in want)       # not the teacher's weights
    other = _tiny.save_tiny(tmp_path / "tiny-sd2.safetensors", "sd2")
    with pytest.raises(ValueError, match="distill.student_from=.*not the teacher's architecture"):
        Distiller(config_from_dict(distill_tree(tmp_path / "b", base, student_from=str(other))))


# ---------------------------------------------------------------- trajectory distillation
def trajectory_tree(out: Path, base: Path, **kw) -> dict:
    tree = distill_tree(out, base, method="trajectory", solver="dpmpp_2m", substeps=2, loss="l2", **kw)
    tree["data"]["captions_per_item"] = 2
    return tree


@pytest.fixture(scope="module")
def trajectory_run(tmp_path_factory, base) -> Path:
    return _finished_run(tmp_path_factory, "trajectory", trajectory_tree, base)


def test_trajectories_are_the_guided_teacher_solve_at_the_grid_points(base, tmp_path):
    d = Distiller(config_from_dict(trajectory_tree(tmp_path, base)))
    d._preload()
    ids = d._pool[1][:3, 0]
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    traj = d.solve_trajectories(ids, noise)
    assert traj.shape == (3, 4, 4, 4, 4)                         # N + 1 = 4 grid points
    sched = d.teacher.schedule
    fine = sched.t_to_sigma(torch.linspace(999, 0, 7, dtype=torch.float64)).float()   # 3 intervals x 2 substeps
    for i in range(3):
        ctx = d.encode(ids[i:i + 1])
        guided = cfg(d.teacher.denoiser, 4.0, {"context": ctx}, {"context": d.encode(d.tokenizer([""]))})
        seen = []
        with torch.no_grad():
            end = samplers.SAMPLERS["dpmpp_2m"](guided, noise[i:i + 1] * fine[0], fine,
                                                callback=lambda info: seen.append(info["x"]))
        want = torch.cat([end, seen[4], seen[2], seen[0]])         # sigma_0 (the end), sigma_1, sigma_2, sigma_3
        # a row alone vs in a batch of 3: float32 sums in another order (a wrong grid point is off by O(1))
        torch.testing.assert_close(traj[i], want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(traj[:, 3], noise * d.sigmas[3], rtol=1e-6, atol=1e-6)


def test_trajectory_loss_regresses_each_grid_point_onto_its_trajectory_end(trajectory_run, base, tmp_path):
    d = Distiller(config_from_dict(trajectory_tree(tmp_path, base)))
    d._preload()
    d._traj, d._traj_ids = d._trajectories()
    assert d._traj.shape == (8, 4, 4, 4, 4) and d._traj.dtype == torch.float16
    # the same picks and noise as the straight run's (seeded by run.seed and the chunk)
    ref = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(trajectory_run / "trajectories" / "chunk-00000.safetensors"))
    assert torch.equal(ref["x"], d._traj) and torch.equal(ref["ids"], d._traj_ids)
    pool = d._pool[1]
    assert all(any(torch.equal(d._traj_ids[i], pool[i, j]) for j in range(2)) for i in range(8))
    pred, target, k = d.trajectory_pair(torch.Generator().manual_seed(4), list(range(8)), 2, 6, 8, d.model)
    assert torch.equal(k, torch.randint(1, 4, (8,), generator=torch.Generator().manual_seed(4))[2:6])
    torch.testing.assert_close(target, d._traj[2:6, 0].float())
    x = d._traj[torch.arange(2, 6), k].float()
    with torch.no_grad():
        want = d.model(x, d.sigmas[k], d.encode(d._traj_ids[2:6]))
    # with grad (F.linear) vs without (the oneDNN inference GEMM): float32 rounding only (seen 1.5e-5 relative)
    torch.testing.assert_close(pred.detach(), want, rtol=1e-4, atol=1e-5)


def test_trajectory_run_resumes_without_solving_again_and_exports(trajectory_run, base, tmp_path):
    from diffusekit import GenerationParams, Pipeline
    tree = trajectory_tree(tmp_path, base)
    d = Distiller(config_from_dict(tree))

    def hook(stage, step):
        if step == 2:
            raise _trainer_tests.Stop

    d.on_step = hook
    with pytest.raises(_trainer_tests.Stop):
        d.run()
    chunk = tmp_path / "trajectories" / "chunk-00000.safetensors"
    before = chunk.stat().st_mtime_ns
    Distiller(config_from_dict(tree), resume=True).run()
    assert chunk.stat().st_mtime_ns == before                     # the solves were reused, not redone
    a, b = load_training_checkpoint(tmp_path, "distill"), load_training_checkpoint(trajectory_run, "distill")
    assert a[0] == b[0] == 4
    _trainer_tests.assert_same(a[1], b[1])
    _trainer_tests.assert_same(a[2]["ema"]["shadow"], b[2]["ema"]["shadow"])
    assert "target" not in a[2]["extra"]                           # no target network in this method
    pipe = Pipeline.from_pretrained(trajectory_run / "model.safetensors")
    assert isinstance(pipe.denoiser, ConsistencyDenoiser)
    img = pipe.generate(GenerationParams(prompt="a red circle", steps=2, sampler_name="LCM", scheduler="SGM Uniform",
                                         cfg_scale=1, seed=1, width=32, height=32)).images[0]
    assert img.size == (32, 32)


def test_trajectory_chunks_of_other_settings_are_solved_again(trajectory_run, base, tmp_path):
    import shutil
    shutil.copytree(trajectory_run / "trajectories", tmp_path / "trajectories")
    d = Distiller(config_from_dict(trajectory_tree(tmp_path, base, guidance=2.0)))   # another teacher CFG
    d._preload()
    x, _ = d._trajectories()
    from safetensors.torch import load_file
    old = load_file(str(trajectory_run / "trajectories" / "chunk-00000.safetensors"))["x"]
    assert not torch.equal(x, old) and torch.equal(x[:, 3], old[:, 3])   # new solves from the same seeded noise
    (tmp_path / "trajectories" / "chunk-00000.safetensors").write_bytes(b"torn")   # a torn file: solved again
    torch.testing.assert_close(d._trajectories()[0], x, rtol=0, atol=0)


def test_start_share_moves_that_share_of_the_batch_to_the_pure_noise_end(base, tmp_path):
    d = Distiller(config_from_dict(trajectory_tree(tmp_path, base, start_share=0.5)))
    d._preload()
    d._traj, d._traj_ids = d._trajectories()
    gen = torch.Generator().manual_seed(7)
    _, _, k = d.trajectory_pair(gen, list(range(8)) * 8, 0, 64, 64, d.model)
    ref = torch.Generator().manual_seed(7)
    uniform = torch.randint(1, 4, (64,), generator=ref)
    moved = torch.rand(64, generator=ref) < 0.5
    assert torch.equal(k, torch.where(moved, 3, uniform)) and 0 < moved.sum() < 64
    d.dc.start_share = 1.0
    assert (d.trajectory_pair(gen, list(range(8)), 0, 8, 8, d.model)[2] == 3).all()   # all at n = N


def test_more_scenes_reuse_the_chunks_of_a_shorter_run(base, tmp_path, monkeypatch):
    import diffusekit.training.distill as distill
    monkeypatch.setattr(distill, "TRAJECTORY_CHUNK", 3)
    short = Distiller(config_from_dict(trajectory_tree(tmp_path, base)))     # 8 scenes: chunks of 3, 3, 2
    short._preload()
    x8, ids8 = short._trajectories()
    chunks = sorted((tmp_path / "trajectories").glob("chunk-*.safetensors"))
    assert len(chunks) == 3
    stamps = [c.stat().st_mtime_ns for c in chunks]
    tree = trajectory_tree(tmp_path, base)
    tree["data"]["length"] = 10                                             # chunks of 3, 3, 3, 1
    longer = Distiller(config_from_dict(tree))
    longer._preload()
    x10, ids10 = longer._trajectories()
    assert [c.stat().st_mtime_ns for c in chunks[:2]] == stamps[:2]         # full chunks reused as they are
    assert chunks[2].stat().st_mtime_ns != stamps[2]                        # the short last chunk solved again
    # the reused scenes are the shorter run's; scenes 6 and 7 are new solves (their chunk draws its caption
    # picks and noise for 3 rows now)
    assert x10.shape[0] == 10 and torch.equal(x10[:6], x8[:6]) and torch.equal(ids10[:6], ids8[:6])
    assert not torch.equal(x10[6:8], x8[6:8])


def test_trajectory_method_needs_preloaded_data(base, tmp_path):
    tree = trajectory_tree(tmp_path, base)
    tree["data"].update(preload=False, captions_per_item=1)
    with pytest.raises(ValueError, match="needs data.preload = true"):
        Distiller(config_from_dict(tree))


def test_the_two_shapes_turbo_stages_chain_and_share_their_trajectories():
    """configs/shapes_turbo.toml then _2.toml (the shipped release): stage 2 warm-starts from stage 1's output
    and solves exactly the trajectories stage 1 solved (same teacher, data, seed and solver), so copying them is
    valid; only the training settings differ."""
    from diffusekit.training.config import config_to_dict, load_config
    root = Path(__file__).resolve().parents[2] / "configs"
    one, two = load_config(root / "shapes_turbo.toml"), load_config(root / "shapes_turbo_2.toml")
    assert two.distill.student_from == f"{one.run.out_dir}/{one.distill.output_name}.safetensors"
    a, b = config_to_dict(one), config_to_dict(two)
    assert a["data"] == b["data"] and a["run"]["seed"] == b["run"]["seed"]
    for key in ("base", "method", "intervals", "solver", "substeps", "guidance"):
        assert a["distill"][key] == b["distill"][key], key
    assert 0 < two.distill.start_share < one.distill.start_share and two.train.lr < one.train.lr
