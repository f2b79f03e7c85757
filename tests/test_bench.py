"""The GPU bench's script, run where CI runs it: every stage on the CPU at tiny sizes (bench.py gpu --dry-run)."""
import re
import subprocess
import sys
from pathlib import Path

import bench

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_dry_run_runs_every_stage_and_prints_its_figures():
    """What a lent GPU runs first, on the same code path: each stage done, each training run a row of
    figures (not 'failed'), the SDPA kernel named, Lion, embedding and recall (checked against the CPU)."""
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "gpu", "--dry-run"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert len(re.findall(r"^\[stage \d/7: .*: done, \d+ s\]$", out, re.M)) == 7, out
    assert "failed" not in out and "DIFFERENT" not in out, out
    for label, settings in (("vitg8", "--compile=blocks"), ("vitl8", "--compile=blocks"), ("vits16-ca", "--compile=blocks"),
                            ("vitg8", "eager"), ("vitl8", "eager"), ("vits16-ca", "eager")):
        assert re.search(rf"^{label} +{settings} +\d+ +[\d.]+ +[\d.]+ +\d+ +- +[\d.]+$", out, re.M), (label, settings, out)
    assert re.search(r"^vitg8: SDPA kernel at batch \d+: (flash|math|efficient|cudnn)$", out, re.M), out
    assert "Lion step on vitg8's" in out and out.count("crops/s  MFU") == 3 and out.count("identical") == 2, out


def test_a_stage_over_its_budget_is_stopped_and_the_next_one_runs(monkeypatch, capsys):
    """A stage is a process group stopped at its budget (train.py inside it too); one line says so, and
    the bench goes on to the next stage."""
    monkeypatch.setattr(bench, "GPU_STAGES", (("vitg8 train, compiled blocks", 1), ("vitg8 embed", 120)))
    bench.gpu_figures(dry_run=True)
    out = capsys.readouterr().out
    assert re.search(r"^\[stage 1/2: vitg8 train, compiled blocks: stopped at its 1 s budget, [12] s\]$", out, re.M), out
    assert re.search(r"^\[stage 2/2: vitg8 embed: done, \d+ s\]$", out, re.M), out
