"""The README's two commands are what CI and newcomers run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_the_readme_has_a_run_command_and_a_test_command() -> None:
    run, test = readme_commands()
    assert run.endswith("cli.py submit examples/coffee.png")
    assert (REPO / "examples" / "coffee.png").is_file() and (REPO / "examples" / "LICENSE.md").is_file()
    assert test.endswith("-m pytest")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, test = readme_commands()
    assert test in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_readmes_own_operation_is_the_example_plugins_code() -> None:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Your own operation"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    median = (REPO / "examples" / "plugin" / "luminagrid_example_ops" / "median.py").read_text()
    assert block.group(1) in median
    assert 'median = "luminagrid_example_ops.median:OP"' in (REPO / "examples" / "plugin" / "pyproject.toml").read_text()
