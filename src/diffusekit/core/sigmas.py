"""Sigma schedules: the descending noise levels a sampler walks through, ending in 0.

    get("karras", 20, sigma_min=0.0292, sigma_max=14.6146)      # continuous: needs only the range
    get("normal", 20, schedule=DiscreteSchedule.from_name())      # discrete: indexes the model's table

Every schedule returns steps + 1 float values, strictly descending, the last one 0 — except
`ddim_uniform` and `beta` (ComfyUI variant), which keep ComfyUI's definitions: ddim_uniform takes a
fixed stride through the table (20 steps give 20, 7 steps give 8) and beta drops repeated table
entries. Definitions follow k-diffusion (karras, exponential, polyexponential, uniform), ComfyUI
0.3 comfy/samplers.py (normal, simple, ddim_uniform, beta, kl_optimal, linear_quadratic,
sgm_uniform, align_your_steps) and A1111 1.10 modules/sd_schedulers.py; where A1111 differs an
opt `variant="a1111"` reproduces it (beta, align_your_steps). Values are computed in float64.

Which inputs each schedule uses:
  range  (sigma_min, sigma_max; default: the schedule's): karras, exponential, polyexponential,
         kl_optimal, beta with variant="a1111" (the default when no schedule is given)
  table  (schedule required): uniform, normal, sgm_uniform (these two also honour sigma_min /
         sigma_max), simple, ddim_uniform, beta with variant="comfyui"
  sigma_max only: linear_quadratic;   fixed published tables: align_your_steps
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import torch

from .schedules import DiscreteSchedule

F64 = torch.float64

DISPLAY_NAMES: dict[str, str] = {
    "Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
    "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform", "KL Optimal": "kl_optimal",
    "Align Your Steps": "align_your_steps", "Simple": "simple", "Normal": "normal", "DDIM": "ddim_uniform",
    "Beta": "beta", "Linear Quadratic": "linear_quadratic",
}
_ALIASES = {"sgmuniform": "sgm_uniform", "ddim": "ddim_uniform", "ays": "align_your_steps"}

# Align Your Steps (Sabour et al. 2024), 10-step tables. ComfyUI stores the model's exact sigmas,
# A1111 the 3-decimal values of NVIDIA's how-to page.
_AYS = {
    ("sd15", "comfyui"): [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                          0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    ("sdxl", "comfyui"): [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                          0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    ("sd15", "a1111"): [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    ("sdxl", "a1111"): [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def _zero_end(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s.to(F64), s.new_zeros(1, dtype=F64)])


# --- continuous schedules (k-diffusion) ---

def karras(steps, sigma_min, sigma_max, rho=7.0):
    """Eq. 5 of Karras et al. 2022: (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, steps, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _zero_end((hi + ramp * (lo - hi)) ** rho)


def exponential(steps, sigma_min, sigma_max):
    """Log sigma evenly spaced from log sigma_max to log sigma_min."""
    return _zero_end(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=F64).exp())


def polyexponential(steps, sigma_min, sigma_max, rho=1.0):
    """k-diffusion: log sigma = ramp^rho (log max - log min) + log min, ramp 1 -> 0 (rho=1: exponential)."""
    ramp = torch.linspace(1, 0, steps, dtype=F64) ** rho
    return _zero_end((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def kl_optimal(steps, sigma_min, sigma_max):
    """Sabour et al. 2024 / ComfyUI: tan of evenly spaced arctan sigma; steps = 1 gives [max, 0]."""
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=F64)
    w = torch.arange(steps, dtype=F64) / (steps - 1)
    return _zero_end((w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan())


def beta_a1111(steps, sigma_min, sigma_max, alpha=0.6, beta=0.6):
    """A1111 / diffusers `use_beta_sigmas` (Lee et al. 2024): sigma_min + ppf(1 - i/(n-1)) (max - min)."""
    # 1 - numpy.linspace(0, 1, steps): grid i * (1/(n-1)) with the last point exactly 1; n = 1 gives [0]
    grid = [i * (1.0 / (steps - 1)) for i in range(steps - 1)] + [1.0] if steps > 1 else [0.0]
    ts = [1.0 - g for g in grid]
    ppf = torch.tensor([_beta_ppf(t, alpha, beta) for t in ts], dtype=F64)
    return _zero_end(sigma_min + ppf * (sigma_max - sigma_min))


# --- schedules over a discrete model's table (ComfyUI / A1111) ---

def uniform(steps, schedule):
    """A1111 "Uniform" = k-diffusion DiscreteSchedule.get_sigmas: t = linspace(T-1, 0, n)."""
    t = torch.linspace(len(schedule) - 1, 0, steps, dtype=F64)
    return _zero_end(schedule.t_to_sigma(t))


def normal(steps, schedule, sigma_min, sigma_max, sgm=False):
    """ComfyUI normal_scheduler: timesteps evenly spaced from t(sigma_max) to t(sigma_min).

    sgm=True (SGM Uniform): steps+1 points with the last dropped. Without sgm, a model whose lowest
    sigma is ~0 keeps that point as the final one instead of appending 0.
    """
    start, end = schedule.sigma_to_t(torch.tensor(sigma_max, dtype=F64)), \
        schedule.sigma_to_t(torch.tensor(sigma_min, dtype=F64))
    if sgm:
        return _zero_end(schedule.t_to_sigma(torch.linspace(float(start), float(end), steps + 1, dtype=F64)[:-1]))
    if math.isclose(float(schedule.t_to_sigma(end)), 0.0, abs_tol=1e-5):
        return schedule.t_to_sigma(torch.linspace(float(start), float(end), steps + 1, dtype=F64)).to(F64)
    return _zero_end(schedule.t_to_sigma(torch.linspace(float(start), float(end), steps, dtype=F64)))


def simple(steps, schedule):
    """ComfyUI simple_scheduler: table entries -(1 + int(i * T / steps)) for i < steps."""
    table = schedule.sigmas
    if steps > len(table):
        raise ValueError(f"'simple' picks distinct table entries: steps must be <= {len(table)}, got {steps}")
    stride = len(table) / steps
    return _zero_end(torch.stack([table[-(1 + int(i * stride))] for i in range(steps)]))


def ddim_uniform(steps, schedule):
    """ComfyUI ddim_scheduler: every (T // steps)-th table entry from index 1, reversed, then 0."""
    table = schedule.sigmas
    picked = [] if math.isclose(float(table[1]), 0.0, abs_tol=1e-5) else [0.0]
    if not picked:
        steps += 1
    stride, x = max(len(table) // steps, 1), 1
    while x < len(table):
        picked.append(float(table[x]))
        x += stride
    return torch.tensor(picked[::-1], dtype=F64)


def beta_comfyui(steps, schedule, alpha=0.6, beta=0.6):
    """ComfyUI beta_scheduler (Lee et al. 2024): table[rint(ppf(1 - i/steps) (T-1))], repeats dropped."""
    last_index = len(schedule) - 1
    picked, prev = [], -1
    for i in range(steps):
        t = round(_beta_ppf(1.0 - i * (1.0 / steps), alpha, beta) * last_index)  # round half to even, as rint
        if t != prev:
            picked.append(float(schedule.sigmas[int(t)]))
        prev = t
    return _zero_end(torch.tensor(picked, dtype=F64))


def linear_quadratic(steps, sigma_max, threshold_noise=0.025, linear_steps=None):
    """ComfyUI linear_quadratic (from Mochi): 1 - (linear ramp to threshold_noise, then quadratic), x sigma_max."""
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=F64)
    n_lin = steps // 2 if linear_steps is None else int(linear_steps)
    if not 1 <= n_lin < steps:
        raise ValueError(f"linear_steps must be in [1, {steps - 1}] for {steps} steps, got {linear_steps}")
    lin = [i * threshold_noise / n_lin for i in range(n_lin)]
    diff = n_lin - threshold_noise * steps
    n_quad = steps - n_lin
    a = diff / (n_lin * n_quad ** 2)
    b = threshold_noise / n_lin - 2 * diff / n_quad ** 2
    c = a * n_lin ** 2
    quad = [a * i ** 2 + b * i + c for i in range(n_lin, steps)]
    return torch.tensor([1.0 - v for v in lin + quad + [1.0]], dtype=F64) * sigma_max


def align_your_steps(steps, model="sd15", variant="comfyui"):
    """Sabour et al. 2024 published 10-step tables, log-linearly interpolated to other step counts.

    comfyui: interpolate the 11 values to steps+1 points and set the last to 0 (10 steps = the table).
    a1111:   interpolate to `steps` points (11 steps = the table) and append 0.
    """
    if model not in ("sd15", "sdxl") or variant not in ("comfyui", "a1111"):
        raise ValueError(f"align_your_steps: model must be 'sd15' or 'sdxl' (got {model!r}), "
                         f"variant 'comfyui' or 'a1111' (got {variant!r})")
    table = torch.tensor(_AYS[(model, variant)], dtype=F64)
    if variant == "a1111":
        return _zero_end(table if steps == len(table) else _loglinear_interp(table, steps))
    out = table if steps + 1 == len(table) else _loglinear_interp(table, steps + 1)
    return torch.cat([out[:-1], out.new_zeros(1)])


def _loglinear_interp(desc: torch.Tensor, n: int) -> torch.Tensor:
    """Resample a descending table to n points, linear in log value over an even grid (np.interp)."""
    ys = desc.flip(0).log()
    xs = torch.linspace(0, 1, len(ys), dtype=F64)
    new_xs = torch.linspace(0, 1, n, dtype=F64)
    j = (torch.searchsorted(xs, new_xs, right=True) - 1).clamp(0, len(xs) - 2)
    slope = (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
    return (slope * (new_xs - xs[j]) + ys[j]).exp().flip(0)


# --- the Beta(alpha, beta) quantile (scipy.stats.beta.ppf), since core imports only torch ---

def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return math.exp(log_front) * h / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) in x: Newton steps kept inside a shrinking bisection bracket."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        f = _betainc(a, b, x) - q
        if f == 0.0:
            return x
        lo, hi = (x, hi) if f < 0 else (lo, x)
        pdf = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_beta)
        new = x - f / pdf
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - x) <= 1e-16 * max(x, 1e-300) or hi - lo <= 1e-17:
            return new
        x = new
    return x


class _Spec(NamedTuple):
    inputs: str                  # "range" | "table" | "table_range" | "sigma_max" | "fixed" | "beta"
    fn: Callable
    opts: tuple = ()


_SPECS: dict[str, _Spec] = {
    "uniform": _Spec("table", uniform),
    "karras": _Spec("range", karras, ("rho",)),
    "exponential": _Spec("range", exponential),
    "polyexponential": _Spec("range", polyexponential, ("rho",)),
    "sgm_uniform": _Spec("table_range", lambda n, s, lo, hi: normal(n, s, lo, hi, sgm=True)),
    "kl_optimal": _Spec("range", kl_optimal),
    "align_your_steps": _Spec("fixed", align_your_steps, ("model", "variant")),
    "simple": _Spec("table", simple),
    "normal": _Spec("table_range", normal),
    "ddim_uniform": _Spec("table", ddim_uniform),
    "beta": _Spec("beta", None, ("alpha", "beta", "variant")),
    "linear_quadratic": _Spec("sigma_max", linear_quadratic, ("threshold_noise", "linear_steps")),
}
NAMES: tuple[str, ...] = tuple(_SPECS)
LABELS: dict[str, str] = {sid: label for label, sid in DISPLAY_NAMES.items()}   # id -> A1111 label


def label(name: str) -> str:
    """The A1111 label of a schedule id or label ("karras" -> "Karras"); ValueError naming the valid ones."""
    sid = resolve(name)
    return LABELS.get(sid, sid)


def aliases(name: str) -> list[str]:
    """Other spellings `resolve` accepts for a schedule besides its id and label ("ays" for align_your_steps)."""
    sid, low = resolve(name), LABELS.get(resolve(name), "").lower()
    return [a for a, target in _ALIASES.items() if target == sid and a != low]


def needs_table(name: str, **opts) -> bool:
    """Whether the schedule indexes a discrete model's own noise table (`get` needs `schedule=`): A1111's
    `need_inner_model`. "beta" does in its default ComfyUI variant, not with variant="a1111"."""
    sid = resolve(name)
    if sid == "automatic":
        return False
    if sid == "beta":
        return opts.get("variant", "comfyui") == "comfyui"
    return _SPECS[sid].inputs.startswith("table")


def default_options(name: str) -> dict:
    """The options of schedule `name` and their defaults, from its function ({"rho": 7.0} for karras)."""
    sid = resolve(name)
    if sid == "automatic":
        return {}
    spec = _SPECS[sid]
    fns = (beta_comfyui, beta_a1111) if sid == "beta" else (spec.fn,)
    out = {}
    for fn in fns:
        for n, prm in inspect.signature(fn).parameters.items():
            if n in spec.opts and prm.default is not inspect.Parameter.empty:
                out.setdefault(n, prm.default)
    return out


def resolve(name: str) -> str:
    """Canonical schedule id for an id or an A1111 label ("Karras", "SGM Uniform"), case-insensitive."""
    key = str(name).strip().lower()
    table = {k.lower(): v for k, v in DISPLAY_NAMES.items()} | {v: v for v in DISPLAY_NAMES.values()} | _ALIASES
    key = key if key in table else key.replace(" ", "_").replace("-", "_")
    if key in table:
        return table[key]
    raise ValueError(f"unknown sigma schedule {name!r}; valid ids: {', '.join(NAMES)}; "
                     f"labels: {', '.join(DISPLAY_NAMES)}")


def get(name: str, steps: int, *, sigma_min: float | None = None, sigma_max: float | None = None,
        schedule: DiscreteSchedule | None = None, dtype: torch.dtype = torch.float32, device=None,
        **opts) -> torch.Tensor:
    """The sigma schedule `name` (an id or A1111 label) for `steps` sampling steps.

    schedule: a `DiscreteSchedule` (or `FlowSchedule`) — required by the table schedules, and the
    default range of the others. Returns a 1-D tensor, strictly descending, ending in 0.
    """
    sid = resolve(name)
    if sid == "automatic":
        raise ValueError("'Automatic' means the sampler's own default schedule: look it up in "
                         "diffusekit.core.samplers.INFO[sampler].default_schedule first")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    spec = _SPECS[sid]
    unknown = set(opts) - set(spec.opts)
    if unknown:
        raise ValueError(f"schedule {sid!r} got unknown option(s) {sorted(unknown)}; "
                         f"it accepts {list(spec.opts) or 'none'}")
    lo = sigma_min if sigma_min is not None else (schedule.sigma_min if schedule is not None else None)
    hi = sigma_max if sigma_max is not None else (schedule.sigma_max if schedule is not None else None)
    inputs = spec.inputs
    if inputs == "beta":
        variant = opts.pop("variant", "comfyui" if schedule is not None else "a1111")
        if variant not in ("comfyui", "a1111"):
            raise ValueError(f"beta: variant must be 'comfyui' (table) or 'a1111' (range), got {variant!r}")
        inputs = "table" if variant == "comfyui" else "range"
        fn = beta_comfyui if variant == "comfyui" else beta_a1111
    else:
        fn = spec.fn
    if inputs.startswith("table") and schedule is None:
        raise ValueError(f"schedule {sid!r} indexes a discrete model's noise table: pass "
                         f"schedule=DiscreteSchedule(...) (continuous ones: karras, exponential, "
                         f"polyexponential, kl_optimal, beta with variant='a1111')")
    if inputs in ("range", "table_range"):
        if lo is None or hi is None:
            raise ValueError(f"schedule {sid!r} needs sigma_min and sigma_max, or a schedule to take them from")
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    if inputs == "sigma_max" and (hi is None or hi <= 0):
        raise ValueError(f"schedule {sid!r} needs sigma_max > 0 (or a schedule), got {hi}")
    if inputs == "range":
        out = fn(steps, float(lo), float(hi), **opts)
    elif inputs == "table_range":
        out = fn(steps, schedule, float(lo), float(hi), **opts)
    elif inputs == "table":
        out = fn(steps, schedule, **opts)
    elif inputs == "sigma_max":
        out = fn(steps, float(hi), **opts)
    else:
        out = fn(steps, **opts)
    return check_sigmas(out.to(F64)).to(dtype=dtype, device=device)


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Raise ValueError unless `sigmas` is 1-D, >= 2 values, finite, strictly descending, ending >= 0."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.numel() < 2:
        shape = tuple(sigmas.shape) if torch.is_tensor(sigmas) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 values (one step), got {shape}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    rising = (sigmas[1:] >= sigmas[:-1]).nonzero()
    if rising.numel():
        i = int(rising[0, 0])
        raise ValueError(f"sigmas must be strictly descending: sigmas[{i}]={float(sigmas[i]):.6g} "
                         f"<= sigmas[{i + 1}]={float(sigmas[i + 1]):.6g}")
    if sigmas[-1] < 0:
        raise ValueError(f"the last sigma must be >= 0, got {float(sigmas[-1]):.6g}")
    return sigmas


def slice_steps(sigmas: torch.Tensor, start_step: int = 0, end_step: int | None = None) -> torch.Tensor:
    """Steps start_step..end_step of a schedule: sigmas[start_step : end_step + 1] (a copy).

    For handing a latent from one sampler to the next (SDXL refiner, ComfyUI KSamplerAdvanced):
    slice_steps(s, 0, k) ends at the nonzero sigma s[k], where slice_steps(s, k) begins.
    end_step None or past the end means the last step.
    """
    n = sigmas.shape[0] - 1
    end = n if end_step is None else min(int(end_step), n)
    if not 0 <= start_step < end:
        raise ValueError(f"need 0 <= start_step < end_step <= {n} for a {n}-step schedule, "
                         f"got start_step={start_step}, end_step={end_step}")
    return sigmas[start_step:end + 1].clone()
