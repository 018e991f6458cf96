"""Training logs: the loss curve (CSV + PNG plot), a progress bar with images/s, image tiles."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import torch
from PIL import Image

FIELDS = ("stage", "step", "loss", "lr", "grad_norm", "wall_s")


class LossLog:
    """Rows of mean loss over every `every` steps in `path`; `truncate` drops rows past a resume point
    so that a resumed run's curve continues the interrupted one."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._sum, self._n = 0.0, 0

    def _rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _write(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def truncate(self, stage: str, step: int) -> None:
        if self.enabled and self.path.is_file():
            self._write([r for r in self._rows() if r["stage"] != stage or int(r["step"]) <= step])
        self._sum, self._n = 0.0, 0

    def add(self, stage: str, step: int, loss: float, lr: float, grad_norm: float, *, every: int, wall: float) -> None:
        self._sum += loss
        self._n += 1
        if not self.enabled or step % max(1, every):
            return
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            w.writerow({"stage": stage, "step": step, "loss": f"{self._sum / self._n:.6g}", "lr": f"{lr:.6g}",
                        "grad_norm": f"{grad_norm:.4g}", "wall_s": f"{wall:.1f}"})
        self._sum, self._n = 0.0, 0

    def plot(self) -> Path | None:
        """loss.png beside the CSV: one panel per stage, log-scale loss against step."""
        rows = self._rows() if self.enabled else []
        if not rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        stages = list(dict.fromkeys(r["stage"] for r in rows))
        fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
        for ax, st in zip(axes[0], stages):
            pts = [(int(r["step"]), float(r["loss"])) for r in rows if r["stage"] == st]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_yscale("log")
            ax.set_title(f"{st} loss")
            ax.set_xlabel("step")
        fig.tight_layout()
        out = self.path.with_suffix(".png")
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out


class Progress:
    """Progress over optimizer steps, showing loss, images/s and the ETA: a tqdm bar on a terminal, a log
    line every 30 s elsewhere (`diffusekit.progress`)."""

    def __init__(self, stage: str, start: int, total: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from ..progress import progress
            self.bar = progress(total, stage, "step", initial=start, interval=30.0, dynamic_ncols=True,
                                mininterval=5.0)
        self._t, self._images = time.time(), 0

    def update(self, images: int, loss: float) -> None:
        if self.bar is None:
            return
        self._images += images
        dt = time.time() - self._t
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{self._images / max(dt, 1e-9):.1f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tensor_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
