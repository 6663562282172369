"""The README's commands stay true: every config key it names exists, every train.py command
parses (through train.py itself), every sample.py command parses with sample.py's parser."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def commands(script: str) -> list[list[str]]:
    """The ``python SCRIPT ...`` commands of the README's bash blocks, as argument lists
    (continuation lines joined, comments and shell loops left out)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #", 1)[0]
            if f"python {script}" in line:
                words = shlex.split(line[line.index(f"python {script}") :])
                found.append([w for w in words[2:] if w not in ("&", ";")])
    return found


def config_keys(config_file: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", config_file, "--list-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    keys = {line.split(" = ")[0] for line in out.stdout.splitlines()}
    return keys | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}


def test_the_readme_has_the_commands_it_should():
    assert len(commands("train.py")) >= 4 and len(commands("sample.py")) >= 3


@pytest.mark.slow  # script launches
def test_every_train_command_of_the_readme_parses():
    """Each ``train.py`` command, its placeholders filled in, through train.py --list-config
    (which loads the config and applies the overrides, then exits): an unknown key or a bad
    value fails here."""
    for args in commands("train.py"):
        args = [re.sub(r"=(PATH|N|I|HOST0:PORT|\$i)$", "=1", a) for a in args]
        args = [a.replace("folder:1", "folder:/tmp") for a in args]
        out = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args, "--list-config"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, (args, out.stderr)


def test_every_config_key_the_readme_names_exists():
    """``--config.KEY=...`` anywhere in the README (prose and tables too) is a key of the
    default config or of the prior's (FIELD-style placeholders aside)."""
    known = config_keys("configs/default.py") | config_keys("configs/prior_default.py")
    named = set(re.findall(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])", README))
    assert named, "no config keys found"
    unknown = sorted(k for k in named if k not in known)
    assert not unknown, unknown


@pytest.mark.parametrize("args", commands("sample.py"), ids=lambda a: " ".join(a)[:60])
def test_every_sample_command_of_the_readme_parses(args):
    import sample

    parsed = sample.make_parser().parse_args(args)
    out = parsed.out or ""
    assert out.startswith("workdir/"), f"{out}: the README's outputs go under workdir/"


@pytest.mark.slow  # make launches
def test_make_train_installs_only_what_the_run_needs_and_shows_progress(tmp_path):
    """`make train` on a fresh clone: the photos extra alone, pip not silenced; `make test`
    (what CI runs) still installs the dev extra."""
    venv = f"VENV={tmp_path / 'venv'}"

    def dry(target):
        out = subprocess.run(["make", "-n", "-C", str(ROOT), target, venv], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if "pip install" in line]

    train = dry("train")
    assert any("-e '.[photos]'" in line for line in train), train
    assert not any("[dev]" in line or "[tfds]" in line or " -q" in line for line in train), train
    test = dry("test")
    assert any("-e '.[dev]'" in line for line in test), test
