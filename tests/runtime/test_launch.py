"""`autopar run`: torchrun on this machine, for a zoo model or a script."""

import subprocess
import sys
import textwrap

import pytest

from autopar.cli import main


def run(*argv):
    return subprocess.run([sys.executable, "-m", "autopar.cli", "run", "--device", "cpu", *argv], capture_output=True,
                          text=True, timeout=300)


def test_trains_a_zoo_model_and_prints_losses_and_step_times():
    out = run("--model", "mlp-tiny", "--nproc", "2", "--steps", "3", "--strategy", "dp")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mlp-tiny on 2 rank(s), dp plan" in out.stdout
    assert out.stdout.count("loss ") == 3 and "mean step time" in out.stdout


def test_runs_a_users_script_on_every_rank(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.nn as nn, torch.nn.functional as F
        import autopar

        cluster = autopar.Cluster.local()              # joins the torchrun world
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        x, y = torch.randn(4, 8), torch.randn(4, 8)
        compiled = autopar.compile(model, cluster, example_inputs=(x,), loss_fn=F.mse_loss, target=y,
                                   optimizer=lambda ps: torch.optim.SGD(ps, lr=float(sys.argv[2])))
        for _ in range(2):
            loss = compiled.step(x, target=y)
        print(f"rank {torch.distributed.get_rank()} of {cluster.num_devices}: loss {loss.item():.6f}")
    """))
    out = run(str(script), "--nproc", "2", "--", "--lr", "0.1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rank 0 of 2: loss" in out.stdout and "rank 1 of 2: loss" in out.stdout


def test_bad_launches_are_explained(capsys, tmp_path):
    assert main(["run", "--nproc", "2"]) == 2
    assert "neither --model nor a script" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.py")]) == 2
    assert "found no file" in capsys.readouterr().err


@pytest.mark.parametrize("nproc", [0])
def test_nproc_must_be_positive(nproc, capsys):
    assert main(["run", "--model", "mlp-tiny", "--nproc", str(nproc)]) == 2
    assert "--nproc: found 0" in capsys.readouterr().err


def test_more_ranks_than_gpus_are_explained_before_torchrun_starts(capsys, monkeypatch):
    from autopar.runtime import launch

    monkeypatch.setattr(launch, "_gpus", lambda: 1)
    assert main(["run", "--model", "mlp-tiny", "--nproc", "2"]) == 2
    assert "--nproc: found 2, required at most the 1 GPU(s) here" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device: found 'tpu'"):
        launch.launch(nproc=1, model="mlp-tiny", script=None, script_args=[], steps=1, strategy="dp", batch_size=8,
                      lr=0.1, timeout=10.0, device="tpu")
