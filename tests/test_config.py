import json
import subprocess
import sys
from pathlib import Path

import pytest

from configurator import configure

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {"lr": 1e-4, "max_steps": 100, "preset": "vits16", "betas": (0.9, 0.95), "compile": False}


def test_config_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.py"
    path.write_text("import math\nlr = 3e-5\nmax_steps = 10 * 1000\npreset = 'vitg8'\n")
    changed = configure(DEFAULTS, [str(path), "--max_steps=7", "--betas=[0.9, 0.99]", "--compile=True"])
    assert changed == {"lr": 3e-5, "max_steps": 7, "preset": "vitg8", "betas": (0.9, 0.99), "compile": True}


def test_an_int_is_accepted_for_a_float_and_a_bare_word_is_a_string():
    assert configure(DEFAULTS, ["--lr=1", "--preset=vitl8"]) == {"lr": 1.0, "preset": "vitl8"}


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate=1e-4"], "--learning_rate=1e-4: unknown setting 'learning_rate'"),
    (["--max_steps=1e3"], "max_steps must be int like its default 100, got float 1000.0"),
    (["--compile"], "--compile: write overrides as --key=value"),
    (["no/such/config.py"], "no/such/config.py: cannot read config file"),
])
def test_bad_settings_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("[", r"\[")):
        configure(DEFAULTS, argv)


def test_a_string_setting_takes_the_text_as_typed():
    defaults = {"data_weights": "", "data": "", "lr": 1e-4}
    changed = configure(defaults, ["--data_weights=3,1", "--data=/a/b,/c/d", "--lr=1"])
    assert changed == {"data_weights": "3,1", "data": "/a/b,/c/d", "lr": 1.0}


def test_a_typo_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("max_step = 10\n")
    with pytest.raises(SystemExit, match=f"{path}: unknown setting 'max_step'"):
        configure(DEFAULTS, [str(path)])


def model_config_of(config_file):
    """What train.py makes of a config file: its settings are parsed at import, before any training."""
    code = (f"import sys, json; sys.argv = ['train.py', {config_file!r}]; import train, torch\n"
            "from model import MAE\n"
            "with torch.device('meta'): m = MAE(train.model_config)\n"
            "print(json.dumps(dict(settings={k: getattr(train, k) for k in train.settings}, params=m.num_params(), "
            "config=repr(train.model_config))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vitg8_config_is_the_papers_recipe():
    """arXiv 2411.02572's MAE-G/8: Lion lr 3e-5, betas (0.9, 0.95), weight decay 0.05, global batch 8,192,
    one-cycle cosine with 10% warmup; ViT-G/8 with stochastic depth 0.6, mask 0.75, Fourier 0.01."""
    recipe = model_config_of("config/vitg8.py")
    s = recipe["settings"]
    assert (s["lr"], s["global_batch"], s["optimizer"]) == (3e-5, 8192, "lion")
    assert (tuple(s["betas"]), s["weight_decay"], s["warmup_frac"], s["min_lr_frac"]) == ((0.9, 0.95), 0.05, 0.1, 0.0)
    assert 1.80e9 <= recipe["params"] <= 1.90e9
    for fact in ("patch_size=8", "dim=1664", "depth=48", "drop_path=0.6", "mask_ratio=0.75",
                 "fourier_weight=0.01", "channel_agnostic=False", "parallel_blocks=True", "qkv_bias=False",
                 "qk_norm=True", "layerscale_init=0.0001", "norm_pix_loss=False"):
        assert fact in recipe["config"]


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "config").glob("*.py")))
def test_every_shipped_config_parses(config_file):
    assert "MAEConfig(" in model_config_of(f"config/{config_file}")["config"]


def test_train_help_lists_every_setting_with_its_default_and_comment():
    run = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = {line.split()[0]: line for line in run.stdout.splitlines() if line.startswith("  --")}
    assert "peak learning rate" in lines["--lr=0.0001"]
    assert "encoder width" in lines["--dim=384"]                      # an MAEConfig field, from model.py
    assert "optimizer steps" in lines["--max_steps=100"]
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines.values()), "a setting without a comment"
    assert len(lines) >= 55                                           # train.py's globals and MAEConfig's fields


@pytest.mark.parametrize("script", ["data.py prepare", "synth.py", "curate.py", "probe.py", "evaluate.py", "demo.py", "bench.py"])
def test_every_command_explains_itself(script):
    run = subprocess.run([sys.executable, *script.split(), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "(default:" in run.stdout, run.stderr
    assert "python " in run.stdout  # the usage examples of its docstring


def test_a_negative_max_steps_is_a_one_line_error():
    run = subprocess.run([sys.executable, "train.py", "--max_steps=-5"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip() == "max_steps must be 0 or more, got -5"
