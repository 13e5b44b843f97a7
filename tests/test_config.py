"""Config loading: YAML, dotted overrides, and errors that say what is wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advdit.trainer.config import ConfigError, config_hash, flatten, load_config, preset_names

REPO = Path(__file__).resolve().parents[1]
ADVDIT = str(Path(sys.executable).with_name("advdit"))


def test_demo_preset_and_overrides() -> None:
    cfg = load_config(REPO / "configs/demo.yaml", ["train.steps=200", "optim.lr=3e-4",
                                                   "sample.grid_classes=[1, 2]"])
    assert cfg.train.steps == 200
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.num_classes == 10 and cfg.data.image_size == 16
    assert cfg.sample.grid_classes == [1, 2]


def test_int_is_accepted_for_float_and_null_for_optional() -> None:
    cfg = load_config(None, ["optim.lr=1", "model.depth=null", "model.depth=3"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.depth == 3


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.step'.*'train\.steps'"):
        load_config(None, ["train.step=10"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path)


def test_wrong_type_names_key_and_expected_type() -> None:
    with pytest.raises(ConfigError, match=r"'train\.steps' expects int, got str 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"'tracking\.enabled' expects a boolean"):
        load_config(None, ["tracking.enabled=3"])
    with pytest.raises(ConfigError, match=r"'data' is a section.*data\.shards="):
        load_config(None, ["data=5"])


def test_yaml_section_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data: 5\n")
    with pytest.raises(ConfigError, match=r"'data' must be a mapping"):
        load_config(path)


def test_choices_and_ranges_are_checked() -> None:
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flash"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="grid_classes"):
        load_config(None, ["model.num_classes=10", "sample.grid_classes=[3, 12]"])


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    (tmp_path / "a.yaml").write_text("train: {steps: 3}\n")
    # The missing one of several files is named, with the presets that would have been taken.
    with pytest.raises(ConfigError, match=r"config file 'imagenet/bsae' does not exist in .*presets: .*"
                                          r"imagenet/base, .*methods/sadm"):
        load_config([tmp_path / "a.yaml", "imagenet/bsae"])


def test_flatten_and_hash_follow_the_values() -> None:
    a = load_config(None, ["train.steps=5"])
    b = load_config(None, ["train.steps=6"])
    assert flatten(a)["train.steps"] == 5
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(load_config(None, ["train.steps=5"]))


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads(preset: str) -> None:
    load_config(preset)


def test_method_key_with_another_objective_names_its_objective() -> None:
    with pytest.raises(ConfigError, match=r"'sadm\.lambda' belongs to objective 'sadm'.*is 'ddgan'"):
        load_config(None, ["objective=ddgan", "sadm.lambda=0.5"])
    with pytest.raises(ConfigError, match=r"'disc\.lr' belongs to the adversarial objectives.*'dit'"):
        load_config(None, ["disc.lr=1e-3"])


def test_method_keys_with_their_objective() -> None:
    cfg = load_config(None, ["objective=sadm", "sadm.lambda=0.5", "disc.lr=2e-4"])
    assert cfg.sadm.lambda_ == 0.5 and cfg.disc.lr == pytest.approx(2e-4)
    assert flatten(cfg)["sadm.lambda"] == 0.5
    with pytest.raises(ConfigError, match="needs sadm.affinity=softmax"):
        load_config(None, ["objective=sadm", "sadm.distance=kl"])
    with pytest.raises(ConfigError, match="objective.*must be one of"):
        load_config(None, ["objective=wgan"])


def test_cli_takes_overrides_before_and_after_options(capsys: pytest.CaptureFixture) -> None:
    from advdit.launchers.cli import main

    with pytest.raises(SystemExit):  # a stray word that is not key=value is still an error
        main(["train", "train.steps=3", "--resume", "none", "oops"])
    # The override after the option is read (and its bad value reported, exit status 2).
    assert main(["train", "train.steps=3", "--resume", "none", "optim.lr=fast"]) == 2
    assert "'optim.lr' expects float" in capsys.readouterr().err


def test_malformed_yaml_names_file_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from advdit.launchers.cli import main

    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 10\n  lr: [1, 2\nmodel:\n  arch: DiT-S/2\n")
    with pytest.raises(ConfigError, match=rf"{path}:4:6: not valid YAML"):
        load_config(path)
    assert main(["train", "--config", str(path), f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"advdit: error: {path}:4:6: not valid YAML")
    path.write_text("!!python/object/apply:os.system ['touch pwned']\n")  # YAML that would run code
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not (Path.cwd() / "pwned").exists()


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", r"'optim.lr' must be a finite number"),
    ("optim.lr=.inf", r"'optim.lr' must be a finite number"),
    ("optim.lr=-1e-4", r"'optim.lr' must be in \(0.0, inf\)"),
    ("optim.lr=0", r"'optim.lr' must be in \(0.0, inf\)"),
    ("optim.beta2=1.0", r"'optim.beta2' must be in \[0.0, 1.0\)"),
    ("optim.weight_decay=-0.1", r"'optim.weight_decay' must be in \[0.0, inf\)"),
    ("optim.grad_clip=-1", r"'optim.grad_clip' must be in \[0.0, inf\)"),
    ("train.ema_decay=.nan", r"'train.ema_decay' must be a finite number"),
    ('run.name="a\\nb"', r"'run.name' holds the control character"),
])
def test_non_finite_and_out_of_range_values_fail_before_the_run_folder(
        override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from advdit.launchers.cli import main

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    out = tmp_path / "run"
    assert main(["train", f"run.output_dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("advdit: error: config key")
    assert not out.exists()


# ---------------------------------------------------------------------- recipes and composition
RECIPES = sorted((REPO / "tests" / "data").glob("imagenet*.json"))
# From scratch, imagenet{256,512}_dit_xl2_{method}; and from the official DiT-XL/2 weights, the
# same name + _finetune (configs/finetune/ adds the fine-tuning settings).
FINETUNE = [fixture for fixture in RECIPES if fixture.stem.endswith("_finetune")]
SCRATCH = [fixture for fixture in RECIPES if fixture not in FINETUNE]
RECIPE_NAME = re.compile(r"imagenet(\d+)_dit_xl2_(\w+?)(_finetune)?")
# The keys each fine-tune recipe sets on top of the presets it includes (and what its test
# composes them with): the adversary's warm-up for SADM, the eps reading of the DiT for DDGAN.
FINETUNE_METHOD_KEYS = {"sadm": {"sadm.warmup_steps": 5000}, "diffusion_gan": {},
                        "ddgan": {"ddgan.parameterization": "eps"}}
# The keys in which every fine-tune recipe differs from its from-scratch recipe.
FINETUNE_KEYS = {"run.name", "run.output_dir", "model.init_from", "optim.warmup_steps", "train.steps"}


def frozen(fixture: Path) -> dict:
    """The flattened config a recipe resolved to when tests/data/freeze_config.py wrote ``fixture``."""
    return json.loads(fixture.read_text())


def resolved(cfg) -> dict:
    return json.loads(json.dumps(flatten(cfg)))  # the same number forms as the fixture


@pytest.mark.parametrize("fixture", RECIPES, ids=lambda p: p.stem)
def test_recipe_file_resolves_as_frozen(fixture: Path) -> None:
    assert resolved(load_config(REPO / "configs" / f"{fixture.stem}.yaml")) == frozen(fixture)


def test_attention_choices_are_the_backends_of_models_attention() -> None:
    from advdit.models.attention import BACKENDS

    with pytest.raises(ConfigError, match=re.escape(f"'model.attention' must be one of {BACKENDS}")):
        load_config(None, ["model.attention=flash"])
    chosen = [load_config(None, [f"model.attention={name}"]).model.attention for name in BACKENDS]
    assert chosen == list(BACKENDS)


def test_keys_marked_may_change_are_the_only_ones_a_resume_ignores() -> None:
    from advdit.trainer.checkpointing.store import changed_keys

    saved = flatten(load_config(None, ["train.steps=5"]))
    harmless = ["train.steps=9", "run.output_dir=elsewhere", "model.compile=blocks", "eval.fid_every=10",
                "eval.reference=ref.npz", "tracking.enabled=false", "optim.fused=false",
                "sample.cfg_channels=all"]
    assert changed_keys(saved, flatten(load_config(None, harmless))) == {}
    changed = flatten(load_config(None, [*harmless, "optim.lr=3e-4", "model.attention=math"]))
    assert changed_keys(saved, changed) == {"optim.lr": (1e-4, 3e-4), "model.attention": ("auto", "math")}
    harmless += ["model.init_from=official.pt", "model.init_entry=model"]
    assert changed_keys(saved, flatten(load_config(None, harmless))) == {}


def test_a_key_a_checkpoint_predates_counts_as_its_default() -> None:
    """Keys are added with the default that keeps the old behaviour: an older checkpoint lacking
    one resumes under that default, and not under another value."""
    from advdit.trainer.checkpointing.store import changed_keys

    saved = flatten(load_config(None))
    del saved["model.timestep_freq_shift"]
    assert changed_keys(saved, flatten(load_config(None))) == {}
    shifted = flatten(load_config(None, ["model.timestep_freq_shift=1"]))
    assert changed_keys(saved, shifted) == {"model.timestep_freq_shift": (0, 1)}


@pytest.mark.parametrize("fixture", SCRATCH, ids=lambda p: p.stem)
def test_preset_composition_resolves_as_the_frozen_recipe(fixture: Path) -> None:
    resolution, method = re.fullmatch(r"imagenet(\d+)_dit_xl2_(\w+)", fixture.stem).groups()
    name = f"imagenet{resolution}-dit-xl2-{method}"
    cfg = load_config(["imagenet/base", f"imagenet/{resolution}", f"methods/{method}"],
                      [f"run.name={name}", f"run.output_dir=runs/{name}"])
    assert resolved(cfg) == frozen(fixture)


def test_every_recipe_file_has_a_frozen_fixture() -> None:
    recipes = sorted(path.stem for path in (REPO / "configs").glob("imagenet*_dit_xl2_*.yaml"))
    assert recipes == [fixture.stem for fixture in RECIPES]
    assert all(RECIPE_NAME.fullmatch(stem) for stem in recipes)
    methods = ("sadm", "diffusion_gan", "ddgan")
    assert sorted(fixture.stem for fixture in FINETUNE) == sorted(
        f"imagenet{resolution}_dit_xl2_{method}_finetune" for resolution in (256, 512) for method in methods)
    assert len(SCRATCH) == 8


@pytest.mark.parametrize("fixture", FINETUNE, ids=lambda p: p.stem)
def test_finetune_composition_resolves_as_the_frozen_recipe(fixture: Path) -> None:
    """A fine-tune recipe is the from-scratch composition, then finetune/imagenetRES, then its
    method's fine-tuning keys."""
    resolution, method, _ = RECIPE_NAME.fullmatch(fixture.stem).groups()
    name = f"imagenet{resolution}-dit-xl2-{method}-finetune"
    own = [f"{key}={value}" for key, value in FINETUNE_METHOD_KEYS[method].items()]
    cfg = load_config(["imagenet/base", f"imagenet/{resolution}", f"methods/{method}",
                       f"finetune/imagenet{resolution}"],
                      [f"run.name={name}", f"run.output_dir=runs/{name}", *own])
    assert resolved(cfg) == frozen(fixture)


@pytest.mark.parametrize("fixture", FINETUNE, ids=lambda p: p.stem)
def test_finetune_recipe_starts_from_the_official_weights_and_differs_only_as_intended(
        fixture: Path) -> None:
    resolution, method, _ = RECIPE_NAME.fullmatch(fixture.stem).groups()
    tuned = resolved(load_config(REPO / "configs" / f"{fixture.stem}.yaml"))
    scratch = resolved(load_config(REPO / "configs" / f"imagenet{resolution}_dit_xl2_{method}.yaml"))
    # The official release's file of this resolution, read with the official timestep frequencies.
    assert tuned["model.init_from"] == f"pretrained/DiT-XL-2-{resolution}x{resolution}.pt"
    assert tuned["model.timestep_freq_shift"] == 0 and tuned["model.init_entry"] == "ema"
    assert scratch["model.init_from"] is None
    assert tuned.keys() == scratch.keys()
    differing = {key for key in tuned if tuned[key] != scratch[key]}
    assert differing == FINETUNE_KEYS | set(FINETUNE_METHOD_KEYS[method])
    assert tuned["run.output_dir"] == f"runs/imagenet{resolution}-dit-xl2-{method}-finetune"
    assert (tuned["optim.warmup_steps"], tuned["train.steps"]) == (2000, 50000)
    for key, value in FINETUNE_METHOD_KEYS[method].items():
        assert tuned[key] == value
    # What stays as DiT trained the released weights: the rate and the EMA.
    assert (tuned["optim.lr"], tuned["train.ema_decay"], tuned["train.ema_warmup"]) == (1e-4, 0.9999, False)


def test_later_config_files_override_earlier_ones_and_overrides_both(tmp_path: Path) -> None:
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text("train: {steps: 1, log_every: 2}\nrun: {name: first}\n")
    second.write_text("train: {steps: 3}\n")
    cfg = load_config([first, second])
    assert (cfg.train.steps, cfg.train.log_every, cfg.run.name) == (3, 2, "first")
    assert load_config([second, first]).train.steps == 1
    cfg = load_config([first, second], ["train.steps=5", "run.name=cli"])
    assert (cfg.train.steps, cfg.train.log_every, cfg.run.name) == (5, 2, "cli")


def test_include_is_read_relative_to_the_file_before_its_own_keys(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "short.yaml").write_text("train: {steps: 7, log_every: 7}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("include: [parts/short, methods/sadm]\ntrain: {log_every: 1}\n")
    cfg = load_config(recipe)  # parts/short next to the file; methods/sadm a preset of advdit
    assert (cfg.train.steps, cfg.train.log_every, cfg.objective) == (7, 1, "sadm")
    recipe.write_text("include: [parts/short.yaml, methods/sadm.yaml]\ntrain: {log_every: 1}\n")
    cfg = load_config(recipe)
    assert (cfg.train.steps, cfg.train.log_every, cfg.objective) == (7, 1, "sadm")
    (tmp_path / "parts" / "short.yaml").write_text("include: ../recipe.yaml\n")
    with pytest.raises(ConfigError, match=r"includes itself \(.*recipe.yaml -> .*short.yaml -> .*recipe"):
        load_config(recipe)
    recipe.write_text("include: {file: x}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: 'include' expects a config file or preset name"):
        load_config(recipe)


def test_an_unknown_key_names_the_file_that_holds_it(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text("train: {steps: 3}\n")
    (tmp_path / "bad.yaml").write_text("train: {stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.stpes'; did you mean"):
        load_config([tmp_path / "good.yaml", tmp_path / "bad.yaml"])


def advdit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ADVDIT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_config_show_prints_the_resolved_config_as_yaml(tmp_path: Path) -> None:
    name = "imagenet512-dit-xl2-sadm"
    done = advdit("config", "show", "--config", "imagenet/base", "--config", "imagenet/512",
                  f"run.output_dir=runs/{name}", "--config", "methods/sadm", f"run.name={name}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["sadm"]["lambda"] == 0.1 and shown["eval"]["fid_every"] == 0  # every key, also defaults
    # Read back as a recorded config is (it holds the sections of other objectives too).
    fixture = REPO / "tests" / "data" / "imagenet512_dit_xl2_sadm.json"
    assert resolved(load_config(None, base=shown)) == frozen(fixture)


@pytest.mark.parametrize("args, message", [
    (["--config", "imagenet/bsae"], "config file 'imagenet/bsae' does not exist in the current folder"),
    (["--config", "demo", "train.steps=0"], "config key 'train.steps' must be positive"),
])
def test_config_show_errors_are_one_line_with_status_2(args: list[str], message: str, tmp_path: Path) -> None:
    done = advdit("config", "show", *args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"advdit: error: {message}") and done.stderr.count("\n") == 1


# ---------------------------------------------------------------------- an installed wheel
@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """advdit built as a wheel (from a copy of the sources, so no stale build/ of the checkout gets
    in) and installed into a folder of its own, without its dependencies (the venv has them)."""
    root = tmp_path_factory.mktemp("wheel")
    (root / "src").mkdir()
    for name in ("setup.py", "models", "trainer", "launchers", "configs", "slurm"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / "src" / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", root / "src"],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (root / "dist").glob("advdit-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", root / "site", wheel], check=True,
                   capture_output=True, timeout=600)
    return root / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed advdit command, in a folder outside the checkout, seeing only that install."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([site / "bin" / "advdit", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_an_installed_wheel_resolves_presets_by_name(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([sys.executable, "-c", "import advdit.trainer.config as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True,
                           env={**os.environ, "PYTHONPATH": str(installed)}).stdout
    assert Path(where.strip()).is_relative_to(installed)  # the wheel's code, not the checkout's
    packages = sorted({str(p.parent.relative_to(REPO)) for top in ("models", "trainer", "launchers")
                       for p in (REPO / top).rglob("__init__.py")})
    for package in packages:  # every subpackage of the checkout is in the wheel
        assert (installed / "advdit" / package / "__init__.py").is_file(), package
    done = run_installed(installed, tmp_path, "config", "show", "--config", "imagenet256_dit_xl2_ddgan")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    fixture = REPO / "tests" / "data" / "imagenet256_dit_xl2_ddgan.json"
    assert resolved(load_config(None, base=shown)) == frozen(fixture)
    done = run_installed(installed, tmp_path, "config", "show", "--config", "methods/gan")
    # The wheel ships every preset of the checkout, also those one folder down (finetune/...).
    assert done.returncode == 2 and f"presets: {', '.join(preset_names())})" in done.stderr
    assert "presets: demo, digits, finetune/imagenet256, finetune/imagenet512, imagenet/256," in done.stderr


def test_an_installed_wheel_renders_a_slurm_job(installed: Path, tmp_path: Path) -> None:
    done = run_installed(installed, tmp_path, "slurm", "submit", "--dry-run", "--gpus-per-node", "0",
                         "--config", "imagenet/base", "--config", "imagenet/512", "--config", "methods/sadm")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/bin/bash\n") and "#SBATCH --job-name=imagenet512-dit-xl2" in done.stdout
    assert "train --config imagenet/base --config imagenet/512 --config methods/sadm" in done.stdout


def test_a_missing_data_package_is_a_one_line_error() -> None:
    from advdit.trainer.config import package_folder

    assert (package_folder("advdit.configs") / "imagenet" / "base.yaml").is_file()
    with pytest.raises(ConfigError, match=r"advdit's package advdit\.nothing is not installed; reinstall"):
        package_folder("advdit.nothing")


def test_cfg_channels_is_a_count_or_all() -> None:
    assert load_config(None, []).sample.cfg_channels == 3  # as the official DiT's published FIDs
    assert load_config(None, ["sample.cfg_channels=all"]).sample.cfg_channels == "all"
    assert load_config(None, ["sample.cfg_channels=4"]).sample.cfg_channels == 4
    with pytest.raises(ConfigError, match="'sample.cfg_channels' must be positive"):
        load_config(None, ["sample.cfg_channels=0"])
    with pytest.raises(ConfigError, match="'sample.cfg_channels' expects"):
        load_config(None, ["sample.cfg_channels=some"])
