"""CI runs exactly the README's test command, and that command lints before it tests."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    section = (ROOT / "README.md").read_text().split("## Set-up: two commands", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)\n```", section.split("\n## ", 1)[0], flags=re.S)
    (command,) = [b for b in blocks if "pytest" in b]
    return command.strip()


def test_ci_runs_the_readme_test_command():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == readme_test_command()


def test_the_test_command_lints_first_with_the_configured_ruff():
    command = readme_test_command()
    assert "ruff check . && pytest -q" in command
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; ctxopt supports 3.10)
    (extra,) = re.findall(r"^test = \[(.*?)\]$", pyproject, flags=re.M | re.S)
    assert '"ruff' in extra
    assert re.search(r"^\[tool\.ruff\]\nline-length = 120$", pyproject, flags=re.M)
