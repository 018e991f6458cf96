"""Brownian-tree noise: the noise source of the SDE samplers (DPM++ SDE, 2M SDE, 3M SDE).

An SDE sampler needs the Brownian increments W(t_next) - W(t) between its noise levels. Drawing them
as fresh Gaussians ties the result to the step grid: at 50 and 100 steps the same seed gives unrelated
images. A *virtual Brownian tree* (Li et al. 2020, "Scalable Gradients for Stochastic Differential
Equations"; torchsde's BrownianTree, used by k-diffusion's
BrownianTreeNoiseSampler) instead fixes one Brownian path per seed and answers any query time from it:

    W(t0) = 0,  W(t1) = sqrt(t1 - t0) * Z_root
    midpoint m of a node [a, b]:  W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) * Z_node   (Brownian bridge)

descending the dyadic tree of [t0, t1] towards t until a node is shorter than `tol`, then taking the
bridge mean (linear interpolation) inside that leaf. Every Z_node is a pure function of (seed, node),
so W(t) is a pure function of t: queries in any order, at any step count, agree, and increments over
disjoint intervals are independent (exactly, down to the tol resolution). Time is t = sigma (the
identity transform, k-diffusion's default).

Z_node is drawn by a counter-based generator: the splitmix64 finalizer (Steele et al. 2014) of
(seed, node, element index) gives 53-bit uniforms, Box-Muller turns pairs into normals. A node value
is thus computed for all batch rows and elements in a few vectorised integer ops, where a
torch.Generator would need one object per (row, node). Integer ops are exact on every device, so the
noise is the same on CPU and GPU (up to one ulp of log/cos).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch

_U64 = 1 << 64


def _signed(v: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    v %= _U64
    return v - _U64 if v >= 1 << 63 else v


_GOLDEN = _signed(0x9E3779B97F4A7C15)    # splitmix64 increment
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (wrapping arithmetic): a bijective 64-bit hash."""
    z = (z ^ _srl(z, 30)) * _MUL1
    z = (z ^ _srl(z, 27)) * _MUL2
    return z ^ _srl(z, 31)


class BrownianTree:
    """One independent Brownian path per batch row on [t0, t1], W(t0) = 0, queried at any t.

    seeds: one int per row; shape: the event shape of one row; tol: the time resolution (leaves of the
    dyadic tree are shorter than tol, 1e-6 as in torchsde/k-diffusion); device: where node values are
    computed (CPU by default, so that a seed gives the same noise everywhere).
    `__call__(t)` returns W(t) in float64, shape (len(seeds), *shape).
    """

    def __init__(self, t0: float, t1: float, seeds: Sequence[int], shape: Sequence[int], *, tol: float = 1e-6,
                 device: torch.device | str = "cpu"):
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
            raise ValueError(f"need finite t0 < t1, got t0={t0}, t1={t1}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if isinstance(seeds, int) or not all(isinstance(s, int) for s in seeds):
            raise TypeError(f"seeds must be a list with one int per batch row, got {seeds!r}")
        self.t0, self.t1, self.tol = t0, t1, float(tol)
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.depth = max(0, math.ceil(math.log2((t1 - t0) / tol)))   # levels until a node is < tol
        numel = math.prod(self.shape)
        self._pairs = (numel + 1) // 2                                 # Box-Muller gives 2 normals per pair
        rows = torch.tensor([_signed(s) for s in seeds], dtype=torch.int64, device=self.device)
        self._row_keys = mix64(rows + _GOLDEN).view(-1, 1)             # (B, 1)
        self._counters = torch.arange(2 * self._pairs, dtype=torch.int64, device=self.device) * _GOLDEN
        self._nodes: OrderedDict[int, torch.Tensor] = OrderedDict()  # midpoint values of recent paths
        self._points: OrderedDict[float, torch.Tensor] = OrderedDict()  # W at recent query times
        self._w1 = math.sqrt(t1 - t0) * self._normals([0])[0]                # W(t1); node 0 is the root's end

    @property
    def batch(self) -> int:
        return self._row_keys.shape[0]

    def _normals(self, nodes: list[int]) -> torch.Tensor:
        """Z_node for each node: standard normals (len(nodes), B, *shape), float64, each a pure
        function of (row seed, node), drawn for all nodes, rows and elements in one vectorised pass."""
        node_ids = torch.tensor([_signed(2 * n + 1) for n in nodes], dtype=torch.int64, device=self.device)
        node_keys = mix64(node_ids * _GOLDEN).view(-1, 1, 1)                       # (L, 1, 1)
        bits = mix64((self._row_keys.unsqueeze(0) ^ node_keys) + self._counters)     # (L, B, 2 * pairs)
        u = _srl(bits, 11).to(torch.float64) * 2.0 ** -53                          # uniform in [0, 1)
        radius = (-2.0 * torch.log1p(-u[..., : self._pairs])).sqrt()               # 1 - u in (0, 1]
        angle = (2.0 * math.pi) * u[..., self._pairs:]
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
        return z[..., : math.prod(self.shape)].reshape(len(nodes), self.batch, *self.shape)

    def __call__(self, t) -> torch.Tensor:
        t = float(t)
        if not (self.t0 - self.tol <= t <= self.t1 + self.tol):
            raise ValueError(f"Brownian tree queried at t={t}, outside its interval [{self.t0}, {self.t1}]")
        t = min(max(t, self.t0), self.t1)
        if t in self._points:
            self._points.move_to_end(t)
            return self._points[t]
        # The nodes on the way down depend on t only, not on W: list them, draw the missing Z at once.
        path, a, b, node = [], self.t0, self.t1, 1
        for _ in range(self.depth):
            m = 0.5 * (a + b)
            path.append((node, a, b))
            if t == m:
                break
            a, b, node = (a, m, 2 * node) if t < m else (m, b, 2 * node + 1)
        missing = [n for n, _, _ in path if n not in self._nodes]
        fresh = dict(zip(missing, self._normals(missing))) if missing else {}
        wa, wb = torch.zeros_like(self._w1), self._w1
        w = None
        for n, a, b in path:
            if n in fresh:   # the Brownian bridge at the midpoint of [a, b]
                self._nodes[n] = 0.5 * (wa + wb) + math.sqrt((b - a) / 4) * fresh[n]
            self._nodes.move_to_end(n)
            wm, m = self._nodes[n], 0.5 * (a + b)
            if t == m:
                w = wm
                break
            wa, wb = (wa, wm) if t < m else (wm, wb)
            a, b = (a, m) if t < m else (m, b)
        while len(self._nodes) > 2 * self.depth + 8:   # keep about two root-to-leaf paths
            self._nodes.popitem(last=False)
        if w is None:   # inside a leaf shorter than tol: the bridge mean (its std is below sqrt(tol) / 2)
            w = wa + ((t - a) / (b - a)) * (wb - wa)
        self._points[t] = w
        if len(self._points) > 8:
            self._points.popitem(last=False)
        return w


class BrownianTreeNoiseSampler:
    """Normalised Brownian increments for SDE samplers, one tree per image (k-diffusion's sampler API).

    x: a tensor with the batch shape, dtype and device of the noise; [sigma_min, sigma_max]: the range
    the sampler will query (the smallest positive and the largest sigma of its schedule); seeds: one
    int per batch row, so image i of a batch equals a single run with seeds[i].

    `noise(sigma, sigma_next)` = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|): standard
    normal, shaped like x, and increments over disjoint intervals are independent.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seeds: Sequence[int], *, tol: float = 1e-6,
                 device: torch.device | str = "cpu"):
        seeds = list(seeds) if not isinstance(seeds, int) else seeds
        if isinstance(seeds, int) or len(seeds) != x.shape[0]:
            got = "an int" if isinstance(seeds, int) else f"{len(seeds)} seeds"
            raise ValueError(f"got {got} for a batch of {x.shape[0]}: pass one seed per image")
        self.dtype, self.out_device = x.dtype, x.device
        self.tree = BrownianTree(float(sigma_min), float(sigma_max), seeds, x.shape[1:], tol=tol, device=device)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        s, s_next = float(sigma), float(sigma_next)
        if s == s_next:
            raise ValueError(f"a Brownian increment needs two different times, got sigma = sigma_next = {s}")
        dw = self.tree(s_next) - self.tree(s)
        return (dw / math.sqrt(abs(s_next - s))).to(device=self.out_device, dtype=self.dtype)
