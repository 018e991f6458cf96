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

Speed: a query draws the ~20 nodes below the last query's path (sampler queries walk down in t), i.e.
~20 x batch x latent-size normals, which is most of an SDE step. On the CPU they are drawn in blocks of
`_CPU_BLOCK` elements per torch thread by in-place ops on two reused scratch buffers, so a block stays
in cache; the bridge runs block by block for the same reason. Every op is elementwise, and torch's
elementwise kernels give an element the same bits wherever it sits in a tensor, so a value does not
depend on the blocking, the batch or the thread count; it is bit-for-bit the value of the
straightforward formulation (one op per formula step over all nodes at once). The tests check both.
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
_CPU_BLOCK = 1 << 15   # elements per op and torch thread on the CPU (ATen's grain size): 256 KiB of int64
_ALIGN = 64            # a long row is cut into column slices of a multiple of this many pairs
_TWO_PI_ULP = 2.0 * math.pi * 2.0 ** -53   # 2 pi times the spacing of 53-bit uniforms (exact: a power of 2)


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (wrapping arithmetic): a bijective 64-bit hash."""
    z = (z ^ _srl(z, 30)) * _MUL1
    z = (z ^ _srl(z, 27)) * _MUL2
    return z ^ _srl(z, 31)


def _uniform_bits_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """In place: h <- the top 53 bits of mix64(h), a non-negative int64 (= `_srl(mix64(h), 11)`, bit for
    bit, in 14 ops and no allocation); tmp: scratch of h's shape."""
    for shift, mul in ((30, _MUL1), (27, _MUL2)):
        torch.bitwise_right_shift(h, shift, out=tmp)   # arithmetic shift, then mask = logical shift
        tmp &= (1 << (64 - shift)) - 1
        h ^= tmp
        h *= mul
    # last round fused with the >> 11: srl(z ^ srl(z, 31), 11) = srl(z, 11) ^ srl(z, 42)
    torch.bitwise_right_shift(h, 42, out=tmp)
    tmp &= (1 << 22) - 1
    h >>= 11
    h &= (1 << 53) - 1
    h ^= tmp
    return h


def _box_muller_(bits: torch.Tensor, u: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor,
                 out_cos: torch.Tensor, out_sin: torch.Tensor) -> None:
    """Box-Muller (1958): bits (n, 2, c) 53-bit ints k, u = k 2^-53 uniform in [0, 1) -> out_cos, out_sin
    (n, c) = r (cos, sin)(2 pi u[:, 1]), r = sqrt(-2 log1p(-u[:, 0])). u: float64 scratch (n, 2, c),
    radius, angle: its views u[:, 0], u[:, 1]. Scaling by powers of two is exact, so this equals the
    textbook op order bit for bit."""
    u.copy_(bits)
    radius *= -2.0 ** -53                  # -u, so log1p(-u) = log(1 - u) with 1 - u in (0, 1]
    torch.log1p(radius, out=radius)
    radius *= -2.0
    radius.sqrt_()
    angle *= _TWO_PI_ULP
    torch.cos(angle, out=out_cos)
    torch.sin(angle, out=out_sin)
    out_cos *= radius
    out_sin *= radius


class BrownianTree:
    """One independent Brownian path per batch row on [t0, t1], W(t0) = 0, queried at any t.

    seeds: one int per row; shape: the event shape of one row; tol: the time resolution (leaves of the
    dyadic tree are shorter than tol, 1e-6 as in torchsde/k-diffusion); device: where node values are
    computed (CPU by default, so that a seed gives the same noise everywhere).
    `__call__(t)` returns W(t) in float64, shape (len(seeds), *shape). Do not modify it in place: it is
    cached (queries of a sampler step share their end points).
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
        self._row_keys = mix64(rows + _GOLDEN)                         # (B,)
        # pair j's radius uniform is element j of the node's stream, its angle uniform element pairs + j
        self._counters = torch.arange(2 * self._pairs, dtype=torch.int64, device=self.device).view(2, -1) * _GOLDEN
        self._block = (1 << 62) if self.device.type != "cpu" else _CPU_BLOCK
        self._buffers: torch.Tensor | None = None   # scratch (2, n) int64, see _scratch
        self._nodes: OrderedDict[int, torch.Tensor] = OrderedDict()  # midpoint values of recent paths
        self._points: OrderedDict[float, torch.Tensor] = OrderedDict()  # W at recent query times
        self._w1 = math.sqrt(t1 - t0) * self._normals([0])[0]                # W(t1); node 0 is the root's end
        self._w0 = torch.zeros_like(self._w1)

    @property
    def batch(self) -> int:
        return self._row_keys.shape[0]

    def _normals(self, nodes: list[int]) -> torch.Tensor:
        """Z_node for each node: standard normals (len(nodes), B, *shape), float64, each a pure function of
        (row seed, node): uniform e of a (node, row) item is the top 53 bits of mix64(item key + counter e)."""
        node_ids = torch.tensor([_signed(2 * n + 1) for n in nodes], dtype=torch.int64, device=self.device)
        node_keys = mix64(node_ids * _GOLDEN)
        keys = (node_keys.view(-1, 1) ^ self._row_keys.view(1, -1)).view(-1, 1, 1)   # (L * B, 1, 1) item keys
        out = torch.empty(keys.shape[0], 2, self._pairs, dtype=torch.float64, device=self.device)
        self._draw(keys, out)
        z = out.view(keys.shape[0], 2 * self._pairs)   # a row: (radius cos, radius sin) of its pairs
        numel = math.prod(self.shape)
        if numel < z.shape[1]:   # odd size: the last sin is not used
            z = z[:, :numel]
        return z.reshape(len(nodes), self.batch, *self.shape)

    def _draw(self, keys: torch.Tensor, out: torch.Tensor) -> None:
        """Fill out (items, 2, pairs) with Box-Muller normals of the item keys (items, 1, 1), block by block:
        whole items when one fits in a block, else column slices of one (at multiples of 64 pairs)."""
        items, pairs = out.shape[0], out.shape[2]
        cols = max(1, min(pairs, max(_ALIGN, self._block // 2 // _ALIGN * _ALIGN)))   # pairs per block
        rows = max(1, min(items, self._block_elements() // (2 * cols)))               # items per block
        bits, scratch = (b.view(rows, 2, cols) for b in self._scratch(rows * 2 * cols, torch.int64, 2))

        def views(n: int, c: int):   # (h, tmp, u, radius, angle) of an (n, 2, c) block of the scratch
            h, tmp = bits[:n, :, :c], scratch[:n, :, :c]
            u = tmp.view(torch.float64)   # tmp's storage, free once the bits are in h
            return h, tmp, u, u[:, 0], u[:, 1]

        full, out_cos, out_sin = views(rows, cols), out[:, 0], out[:, 1]   # made once: views cost ~2 us each
        for i in range(0, items, rows):
            k = keys[i:i + rows]
            for j in range(0, pairs, cols):
                n, c = min(rows, items - i), min(cols, pairs - j)
                h, tmp, u, radius, angle = full if (n, c) == (rows, cols) else views(n, c)
                torch.add(self._counters if c == pairs else self._counters[:, j:j + c], k, out=h)
                _uniform_bits_(h, tmp)
                _box_muller_(h, u, radius, angle, out_cos[i:i + n, j:j + c], out_sin[i:i + n, j:j + c])

    def _scratch(self, numel: int, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
        """`count` flat scratch buffers of at least numel elements, kept between queries: fresh memory would
        cost a page fault per 4 KiB on every query. The int64 and float64 buffers share storage."""
        if self._buffers is None or self._buffers.shape[1] < numel:
            self._buffers = torch.empty(2, numel, dtype=torch.int64, device=self.device)
        return [self._buffers[k, :numel].view(dtype) for k in range(count)]

    def _block_elements(self) -> int:
        """Elements per op: on the CPU one block (~ATen's grain) per torch thread, so each thread's share
        stays in its cache; elsewhere everything at once."""
        return self._block * torch.get_num_threads() if self.device.type == "cpu" else self._block

    def _bridge(self, schedule: list[tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]]) -> None:
        """Brownian bridge at the midpoints of a path: for (w, c, W(a), W(b)) in path order, in place on
        w = Z: w <- (W(a) + W(b)) / 2 + c Z, c = sqrt((b - a) / 4). Halving is exact, so adding
        0.5 * (W(a) + W(b)) rounds once, as the formula does. Done one block of (rows, elements) at a
        time, all nodes per block, so the chain W(parent) -> W(child) stays in cache."""
        batch, numel = self.batch, math.prod(self.shape)
        cols = max(1, min(numel, self._block_elements()))            # elements per block
        rows = max(1, min(batch, self._block_elements() // cols))    # batch rows per block
        flat = [(w.view(batch, numel), c, wa.view(batch, numel), wb.view(batch, numel)) for w, c, wa, wb in schedule]
        mean = self._scratch(rows * cols, torch.float64, 1)[0].view(rows, cols)
        if (rows, cols) == (batch, numel):   # one block: no slicing
            for w, c, wa, wb in flat:
                torch.add(wa, wb, out=mean)
                w.mul_(c).add_(mean, alpha=0.5)
            return
        for r in range(0, batch, rows):
            for j in range(0, numel, cols):
                n, k = min(rows, batch - r), min(cols, numel - j)
                m = mean[:n, :k]
                for w, c, wa, wb in flat:
                    torch.add(wa[r:r + n, j:j + k], wb[r:r + n, j:j + k], out=m)
                    w[r:r + n, j:j + k].mul_(c).add_(m, alpha=0.5)

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
        wa, wb = self._w0, self._w1
        schedule, w = [], None   # the bridge steps of the fresh nodes, run after the walk (below)
        for n, a, b in path:
            if n in fresh:   # holds Z until _bridge turns it into W(m) in place
                schedule.append((fresh[n], math.sqrt((b - a) / 4), wa, wb))
                self._nodes[n] = fresh[n]
            self._nodes.move_to_end(n)
            wm, m = self._nodes[n], 0.5 * (a + b)
            if t == m:
                w = wm
                break
            wa, wb = (wa, wm) if t < m else (wm, wb)
            a, b = (a, m) if t < m else (m, b)
        if schedule:
            try:
                self._bridge(schedule)
            except BaseException:   # never leave a half-made Z in the cache
                for n in fresh:
                    self._nodes.pop(n, None)
                raise
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
