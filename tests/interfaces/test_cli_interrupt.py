"""Ctrl-C in `diffusekit generate`: the first SIGINT stops after the current step and still saves the
image (the last x0 estimate, marked interrupted); a second one aborts with exit status 130 and no file.
SIGINT is raised for real (signal.raise_signal) from the progress callback at a chosen step."""
import signal

import pytest

from diffusekit.interfaces import cli


@pytest.fixture(scope="module")
def tiny(models_dir):
    return str(models_dir / "tiny-a.safetensors")


def bars_sending_sigint(at_steps):
    class Bars(cli.StepBars):
        def __call__(self, info):
            super().__call__(info)
            if info.step in at_steps:
                signal.raise_signal(signal.SIGINT)
            self.seen = getattr(self, "seen", []) + [info.step]
            Bars.last = self
    return Bars


def generate(tiny, out, steps=8):
    return cli.main(["generate", "a red circle", "--model", tiny, "--seed", "3", "--steps", str(steps),
                     "--width", "32", "--height", "32", "--out", str(out)])


def test_first_ctrl_c_saves_the_partial_image(tiny, tmp_path, monkeypatch, capsys):
    Bars = bars_sending_sigint({1})
    monkeypatch.setattr(cli, "StepBars", Bars)
    assert generate(tiny, tmp_path) == 0
    assert Bars.last.seen == [0, 1]                       # stopped right after the step that was interrupted
    assert [p.name for p in tmp_path.iterdir()] == ["00000-3.png"]
    err = capsys.readouterr().err
    assert "interrupted: saving" in err and "last x0 estimate" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is restored


def test_second_ctrl_c_aborts_without_saving(tiny, tmp_path, monkeypatch, capsys):
    Bars = bars_sending_sigint({1, 2})
    monkeypatch.setattr(cli, "StepBars", Bars)

    class Stubborn:   # a pipeline that ignores should_stop, so the second Ctrl-C is what ends it
        def __init__(self, pipe):
            self.pipe = pipe

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def generate(self, params, callback=None, should_stop=None):
            return self.pipe.generate(params, callback=callback)

    real = cli._load_pipeline
    monkeypatch.setattr(cli, "_load_pipeline", lambda args: Stubborn(real(args)))
    assert generate(tiny, tmp_path) == 130
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
