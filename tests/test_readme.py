"""The README's Python example runs as written, and its two set-up commands match .ci/run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = [ln for ln in ci.splitlines() if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert len(cmd) == 1 and cmd[0].strip() in readme
