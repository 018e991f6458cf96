"""Ctrl-C in `diffusekit generate`: the first SIGINT stops after the current step and still saves the
image (the last x0 estimate, marked interrupted); a second one aborts with exit status 130 and no file.
SIGINT is raised for real (signal.raise_signal) from the progress callback at a chosen step.

The tests must pass whatever SIGINT handler the test run started with: a foreground run has Python's
default_int_handler, a background job (`&`, nohup) starts with SIGINT ignored. The in-process tests put
Python's default handler in place for their duration (that is what a user at a terminal has) and check that
the CLI restores exactly the handler it found; the subprocess tests start the CLI both ways."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from diffusekit.interfaces import cli


@pytest.fixture(scope="module")
def tiny(models_dir):
    return str(models_dir / "tiny-a.safetensors")


@pytest.fixture
def foreground_sigint():
    """SIGINT as in a foreground terminal session for this test, then whatever the run had before."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield signal.default_int_handler
    signal.signal(signal.SIGINT, before)


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


def test_first_ctrl_c_saves_the_partial_image(tiny, tmp_path, monkeypatch, capsys, foreground_sigint):
    Bars = bars_sending_sigint({1})
    monkeypatch.setattr(cli, "StepBars", Bars)
    assert generate(tiny, tmp_path) == 0
    assert Bars.last.seen == [0, 1]                       # stopped right after the step that was interrupted
    assert [p.name for p in tmp_path.iterdir()] == ["00000-3.png"]
    err = capsys.readouterr().err
    assert "interrupted: saving" in err and "last x0 estimate" in err
    assert signal.getsignal(signal.SIGINT) is foreground_sigint   # the handler found is restored


def test_second_ctrl_c_aborts_without_saving(tiny, tmp_path, monkeypatch, capsys, foreground_sigint):
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
    assert signal.getsignal(signal.SIGINT) is foreground_sigint


def test_a_custom_handler_found_at_start_is_restored(tiny, tmp_path, monkeypatch):
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    before = signal.signal(signal.SIGINT, mine)
    try:
        monkeypatch.setattr(cli, "StepBars", bars_sending_sigint({1}))
        assert generate(tiny, tmp_path) == 0
        assert signal.getsignal(signal.SIGINT) is mine and seen == []   # the CLI's handler took the signal
    finally:
        signal.signal(signal.SIGINT, before)


# The CLI in a fresh interpreter, started with SIGINT ignored (a background job) or with Python's default
# handler (a terminal). SIGINT is raised at step 1 from the progress callback, as above.
CHILD = textwrap.dedent("""
    import json, signal, sys
    # set either way: a child inherits an ignored SIGINT from a test run that was started in the background
    signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == "ignored" else signal.default_int_handler)
    from diffusekit.interfaces import cli

    class Bars(cli.StepBars):
        steps = []
        def __call__(self, info):
            super().__call__(info)
            Bars.steps.append(info.step)
            if info.step == 1:
                signal.raise_signal(signal.SIGINT)

    cli.StepBars = Bars
    before = signal.getsignal(signal.SIGINT)
    rc = cli.main(["generate", "a red circle", "--model", sys.argv[2], "--seed", "3", "--steps", "4",
                   "--width", "32", "--height", "32", "--out", sys.argv[3]])
    after = signal.getsignal(signal.SIGINT)
    print(json.dumps({"rc": rc, "steps": Bars.steps, "restored": after is before,
                      "ignored_after": after is signal.SIG_IGN}))
""")


def run_child(start, tiny, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", CHILD, start, tiny, str(out)], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_background_start_keeps_sigint_ignored(tiny, tmp_path):
    got, err = run_child("ignored", tiny, tmp_path)
    assert got == {"rc": 0, "steps": [0, 1, 2, 3], "restored": True, "ignored_after": True}
    assert "interrupted" not in err                     # an ignored SIGINT stays ignored: the run completes
    assert [p.name for p in tmp_path.iterdir()] == ["00000-3.png"]


def test_foreground_start_installs_and_restores(tiny, tmp_path):
    got, err = run_child("default", tiny, tmp_path)
    assert got == {"rc": 0, "steps": [0, 1], "restored": True, "ignored_after": False}
    assert "interrupted: saving" in err
    assert [p.name for p in tmp_path.iterdir()] == ["00000-3.png"]
