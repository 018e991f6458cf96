import csv

from diffusekit.evaluation.study import StudyConfig, markdown_report, run_study
from diffusekit.interfaces.cli import main


def test_study_orders_samplers_as_theory_says():
    cfg = StudyConfig(samplers=("euler", "heun", "dpmpp_2m"), schedules=("karras",), steps=(10, 20, 40),
                      batch=32, dim=4, tol=5e-2, reference_steps=1000)
    res = run_study(cfg)
    err = {(r["sampler"], r["steps"]): r["error"] for r in res.rows}
    for s in ("euler", "heun", "dpmpp_2m"):
        assert err[(s, 10)] > err[(s, 20)] > err[(s, 40)]
    # second-order methods beat Euler at equal steps; heun pays two evaluations per step
    assert err[("dpmpp_2m", 20)] < err[("euler", 20)] / 3
    assert err[("heun", 20)] < err[("euler", 20)] / 3
    nfe = {(r["sampler"], r["steps"]): r["nfe"] for r in res.rows}
    assert nfe[("euler", 20)] == 20 and nfe[("heun", 20)] > 30
    reach = res.steps_to_tolerance(1e9)
    assert reach[("euler", "karras")] == 10
    assert "DPM++ 2M" in markdown_report(res)


def test_cli_writes_table_csv_and_plot(tmp_path, capsys):
    rc = main(["study", "samplers", "--samplers", "euler,dpmpp_2m", "--schedules", "karras", "--steps", "5,10",
               "--batch", "8", "--dim", "2", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "sampler_study.csv")))
    assert {r["sampler"] for r in rows} == {"euler", "dpmpp_2m"} and len(rows) == 4
    assert (tmp_path / "sampler_study.png").stat().st_size > 1000
    assert "Steps to reach" in (tmp_path / "sampler_study.md").read_text()


def test_cli_bad_sampler_is_a_clear_error(tmp_path, capsys):
    rc = main(["study", "samplers", "--samplers", "nope", "--out", str(tmp_path)])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
