"""diffusekit.progress: a tqdm bar on a terminal, whole log lines elsewhere (a fake clock; no timing)."""
import io

from tqdm import tqdm

from diffusekit.progress import LineProgress, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_every_interval_and_at_the_end_with_the_eta():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(10, "train", "step", interval=10.0, file=out, clock=clock)
    for _ in range(10):
        clock.t += 3.0                        # 3 s a step: a line at 12 s (4 steps), 24 s (8), and the last
        bar.set_postfix(loss="0.1234", refresh=False)
        bar.update(1)
    bar.close()                               # the last line is already out: close adds none
    assert out.getvalue().splitlines() == [
        "train: 4/10 steps [loss=0.1234], 12.0 s, ETA 18.0 s",
        "train: 8/10 steps [loss=0.1234], 24.0 s, ETA 6.0 s",
        "train: 10/10 steps [loss=0.1234], 30.0 s",
    ]


def test_interval_zero_is_a_line_per_update_and_close_reports_an_unfinished_run():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(4, "compare", "image", interval=0, file=out, clock=clock)
    for label in ("Euler", "DPM++ 2M"):
        clock.t += 150.0
        bar.set_postfix_str(label)
        bar.update(1)
    assert out.getvalue().splitlines() == ["compare: 1/4 images [Euler], 2 min 30 s, ETA 7 min 30 s",
                                           "compare: 2/4 images [DPM++ 2M], 5 min 00 s, ETA 5 min 00 s"]
    out2 = io.StringIO()
    resumed = LineProgress(100, "vae", "step", initial=40, interval=1e9, file=out2, clock=clock)
    resumed.update(5)
    resumed.close()                           # stopped early: one line saying where
    assert out2.getvalue().startswith("vae: 45/100 steps, ")


def test_a_terminal_gets_tqdm_anything_else_lines_or_nothing():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress(3, "x", file=Tty()), tqdm)
    assert isinstance(progress(3, "x", file=io.StringIO()), LineProgress)
    silent = progress(3, "x", file=io.StringIO(), lines=False)
    silent.update(3)
    silent.close()                            # the inner bars of a comparison: an outer progress reports
    assert not isinstance(silent, (tqdm, LineProgress))
