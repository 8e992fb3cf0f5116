"""`autopar demo`, small: a real parallel run checked against one process, and its report."""

from autopar import cli
from autopar.plan import Plan


def test_demo_trains_on_local_ranks_like_one_process_and_writes_the_report(tmp_path, capsys):
    status = cli.main(["demo", "--out", str(tmp_path), "--nproc", "2", "--steps", "3", "--skip-large"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "the parallel plan trains exactly like one device" in out
    plan = Plan.load(tmp_path / "gpt-tiny.plan.json")
    assert plan.num_devices == 2
    report = (tmp_path / "gpt-tiny" / "report.html").read_text()
    assert "<svg" in report and plan.model in report


def test_demo_refuses_no_ranks(capsys):
    assert cli.main(["demo", "--nproc", "0", "--skip-large"]) == 2
    assert "--nproc: found 0, required an integer >= 1" in capsys.readouterr().err
