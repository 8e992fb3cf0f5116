"""`autopar bench accuracy`: Kendall's τ, the table, and one case measured for real on 2 ranks."""

import dataclasses

import pytest
import torch

import autopar
from autopar.accuracy_report import AccuracyCase, AccuracyRow, accuracy_summary, accuracy_table, kendall_tau


def test_kendall_tau_counts_concordant_and_discordant_pairs():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # (2 concordant − 1 discordant) / 3
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / 3)  # a tie counts as neither
    # Within groups only: the two groups are each in order, across them reversed.
    assert kendall_tau([1, 2, 10, 20], [30, 40, 1, 2], groups=["a", "a", "b", "b"]) == 1.0
    with pytest.raises(ValueError, match="found 2 and 3 values"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no pairs"):
        kendall_tau([1, 2], [1, 2], groups=["a", "b"])


def test_the_table_reports_errors_rounds_and_the_summary():
    case = AccuracyCase(label="GPT dp", model="gpt-tiny", world=2, batch=16, strategy="dp")
    rows = [AccuracyRow(case=case, plan="one stage on 2", predicted_time=0.09, measured_time=0.1,
                        predicted_memory=9e6, measured_memory=1e7, rounds=(0.095, 0.1, 0.12)),
            AccuracyRow(case=case, plan="one stage on 2", predicted_time=0.2, measured_time=0.16,
                        predicted_memory=2e7, measured_memory=2e7, rounds=(0.15, 0.16, 0.17))]
    summary = accuracy_summary(rows)
    assert summary["time_median"] == pytest.approx((0.1 + 0.25) / 2)
    assert summary["time_worst"] == pytest.approx(0.25)
    assert summary["memory_worst"] == pytest.approx(0.1)
    # Against the fastest round: |0.09 − 0.095| / 0.095 and |0.2 − 0.15| / 0.15.
    assert summary["fastest_median"] == pytest.approx((0.05 / 0.95 + 1 / 3) / 2)
    assert summary["fastest_worst"] == pytest.approx(1 / 3)
    assert summary["tau"] == summary["tau_within"] == 1.0
    table = accuracy_table(rows)
    assert "| GPT dp | 2 | 16 | one stage on 2 | 90 ms | 100 ms | 95 ms–120 ms | 10.0% | 5.3% |" in table
    assert "| step time | 17.5% | 25.0% | median ≤ 10% |" in table
    assert "MFU" not in table  # no FLOPs or peak known
    # MFU = FLOPs per step / (step time × devices × datasheet peak): 4e12 / (0.1 × 2 × 1e14) = 20%
    with_mfu = [dataclasses.replace(r, flops=4e12, datasheet_peak=1e14) for r in rows]
    assert with_mfu[0].mfu == pytest.approx(0.2)
    assert accuracy_table(with_mfu).splitlines()[2].endswith("| 10.0% | 20.0% |")


def test_the_table_reports_the_error_at_the_profiles_speed():
    case = AccuracyCase(label="GPT dp", model="gpt-tiny", world=2, batch=16, strategy="dp")
    # The machine ran at 0.8 of its profiled speed (median of the rounds): 100 ms measured is 80 ms
    # at the profile's speed, against which 90 ms predicted is 12.5% slow.
    row = AccuracyRow(case=case, plan="one stage on 2", predicted_time=0.09, measured_time=0.1, predicted_memory=1e7,
                      measured_memory=1e7, rounds=(0.1, 0.1, 0.1), speeds=(0.7, 0.8, 0.95))
    assert row.speed == pytest.approx(0.8) and row.speed_error == pytest.approx(0.125)
    table = accuracy_table([row, dataclasses.replace(row, speeds=(1.0,))])
    assert "| machine speed | error at the profile's speed |" in table
    assert "| 10.0% | 10.0% | ×0.80 | 12.5% | 10 MB | 10 MB | 0.0% |" in table
    assert "| step time, at the profile's speed | 11.2% | 12.5% | |" in table  # median of 12.5% and 10.0%
    # A row without the machine's speed (no profile): no such columns.
    plain = dataclasses.replace(row, speeds=())
    assert plain.speed is None and plain.speed_error is None
    assert "profile's speed" not in accuracy_table([plain, row])


def test_the_machine_speed_is_the_reference_matmuls_rate_against_the_profiles():
    from autopar.bench_accuracy import Speed, _rounds
    from autopar.cost.profile import MatmulRate, Profile

    def profile(rate):
        return Profile(backend="gloo", memory_bandwidth=20e9, kernel_overhead=2e-6, collectives=(),
                       matmul=(MatmulRate(dtype="fp32", m=256, k=256, n=256, rate=rate),))

    assert Speed(profile(1e15), torch.device("cpu")).measure() < 0.01   # no CPU core does a PFLOP/s
    assert Speed(profile(1e6), torch.device("cpu")).measure() > 100

    class Case:  # what `_rounds` uses of a prepared case
        def __init__(self):
            self.cluster, self.device = autopar.Cluster.preset("cpu"), torch.device("cpu")
            self.cluster = dataclasses.replace(self.cluster, profile=profile(1e15))
            self.timed, self.speeds = 0, []

        def round(self, warm):
            self.timed += 1

    cases = [Case(), Case()]
    _rounds(cases, 3)
    assert [c.timed for c in cases] == [3, 3]
    assert len(cases[0].speeds) == 3 and cases[0].speeds == cases[1].speeds  # one measurement per round, shared
    assert all(0 < s < 0.01 for s in cases[0].speeds)


def test_steal_is_the_hypervisors_share_of_the_cpu_time_between_two_readings(tmp_path):
    from autopar.bench import cpu_times, stolen

    stat = tmp_path / "stat"
    stat.write_text("cpu  1000 0 200 700 10 0 20 70 0 0\ncpu0 500 0 100 350 5 0 10 35 0 0\n")
    before = cpu_times(str(stat))
    assert before == [1000, 0, 200, 700, 10, 0, 20, 70, 0, 0]
    stat.write_text("cpu  1600 0 300 900 10 0 40 150 0 0\n")
    # 1000 ticks spent between the readings (600 user, 100 system, 200 idle, 20 softirq, 80 steal)
    assert stolen(before, cpu_times(str(stat))) == pytest.approx(0.08)
    assert cpu_times(str(tmp_path / "absent")) is None and stolen(None, before) is None
    here = cpu_times()  # this machine's own, where Linux has one
    share = stolen(here, cpu_times())
    assert share is None or 0.0 <= share <= 1.0


def test_a_case_runs_for_real_and_reports_every_rank(pools):
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=2).to_json()
    kwargs = {"model": "mlp-tiny", "batch": 64, "strategy": "dp", "pipeline": None, "overrides": {},
              "cluster": cluster, "rounds": 2, "steps": 2}
    (got,) = pools(2).run([{"call": "autopar.bench_accuracy:measure", "kwargs": kwargs}])
    assert "error" not in got, got.get("traceback")
    assert len(got["times"]) == 2 and got["measured_time"] > 0 and got["predicted_time"] > 0
    assert got["flops"] > 0 and got["datasheet_peak"] == 0  # CPU ranks: no datasheet, no MFU
    assert len(got["measured_memory"]) == len(got["predicted_memory"]) == 2
    # dp holds the whole model on each rank: both ranks predicted and measured alike, within 25%.
    for predicted, measured in zip(got["predicted_memory"], got["measured_memory"]):
        assert predicted == pytest.approx(measured, rel=0.25)


def test_cases_on_the_same_ranks_take_their_rounds_in_turns(pools):
    """Every round times each case once, in order: case A's rounds and case B's interleave."""
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=2).to_json()
    cases = [{"model": "mlp-tiny", "batch": 64, "strategy": s, "pipeline": None, "overrides": {},
              "cluster": cluster, "steps": 1} for s in ("dp", "tp")]
    (got,) = pools(2).run([{"call": "autopar.bench_accuracy:measure_in_turns",
                            "kwargs": {"cases": cases, "rounds": 3}}])
    assert "error" not in got, got.get("traceback")
    dp, tp = got["results"]
    assert len(dp["times"]) == len(tp["times"]) == 3 and dp["measured_time"] > 0 and tp["measured_time"] > 0
    assert dp["starts"][0] < tp["starts"][0] < dp["starts"][1] < tp["starts"][1] < dp["starts"][2] < tp["starts"][2]
    assert dp["predicted_time"] != tp["predicted_time"]  # two plans, not one twice
    assert len(dp["measured_memory"]) == len(tp["measured_memory"]) == 2


def test_a_case_that_cannot_be_prepared_is_named(pools):
    cluster = autopar.Cluster.preset("cpu", gpus_per_node=2).to_json()
    bad = {"model": "no-such-model", "batch": 8, "strategy": "dp", "pipeline": None, "overrides": {},
           "cluster": cluster}
    (got,) = pools(2).run([{"call": "autopar.bench_accuracy:measure_in_turns",
                            "kwargs": {"cases": [bad], "rounds": 1}}])
    assert "no-such-model dp (batch 8)" in got["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_gpu_cases_without_a_gpu_say_so_before_profiling(capsys):
    from autopar.cli import main

    assert main(["bench", "accuracy", "--gpu"]) == 2
    assert "found no CUDA device, required one" in capsys.readouterr().err
