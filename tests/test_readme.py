"""The README runs as written: its Python examples (the tour and "Use it in your own FL loop"), its
set-up commands (editable install, matching .ci/run), and its cheap command lines. The Flower
section's snippet and commands are run by tests/test_flower.py."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index("## " + title)
    end = README.find("\n## ", start + 3)
    return README[start : end if end > 0 else None]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs():
    blocks = _python_blocks(_section("Python"))
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_readme_own_fl_loop_runs():
    """Client and server sides without the driver: client_update/server_update over rounds, then
    compress + server_mean for masks (the snippet asserts the fused mean equals the one-by-one mean)."""
    (block,) = _python_blocks(_section("Use it in your own FL loop"))
    for name in ("client_update", "server_update", "apply_delta", "server_mean", "RoundContext"):
        assert name in block
    ns: dict = {}
    exec(compile(block, "README.md (own FL loop)", "exec"), ns)
    # the loop moved the global model away from the initial one
    import torch

    torch.manual_seed(0)
    init = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).state_dict()
    assert any((ns["global_state"][k] - init[k]).abs().max() > 1e-4 for k in init)


def test_every_python_block_is_run_by_a_test():
    # Python, own FL loop (here) and Flower (tests/test_flower.py): a new block needs a test
    assert len(_python_blocks(README)) == 3


def _setup_commands() -> list[str]:
    sec = _section("Set up (two commands)")
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", sec, flags=re.S)]


def test_setup_is_two_editable_install_commands():
    """Two commands, both editable installs: they build fedcompress/_C in place, so imports from the
    repository root (python -c, REPL, notebook) get the compiled code (tests/test_api.py checks it)."""
    cmds = _setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    for c in cmds:
        assert "pip install -e ." in c or 'pip install -e ".[' in c, c
        assert "pip install . " not in c + " "


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = [ln for ln in ci.splitlines() if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert len(cmd) == 1 and cmd[0].strip() == _setup_commands()[1]


def test_command_lines_in_readme_and_docs_parse():
    """Every `fedcompress ...` line in README, SECURITY.md and docs/ parses (subcommand, flags,
    choices; SPEC and DIR placeholders filled in) and every compressor spec in it builds; running
    them is the CLI tests' job."""
    from fedcompress import cli
    from fedcompress.api import get_compressor

    parser = cli.build_parser()
    seen = 0
    for doc in [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(r"(?m)(?:^\s*|`)(fedcompress (?:run|compare|results|bench)[^`\n#]*)", doc.read_text()):
            line = re.sub(r"\[(--[^\]]+)\]", r"\1", m.group(1).strip())  # "[--quick]": an optional flag
            line = line.replace("SPEC", "none").replace("DIR", "/tmp/out")
            try:
                args = parser.parse_args(shlex.split(line)[1:])
            except SystemExit:
                pytest.fail(f"{doc.name}: `{line}` does not parse")
            specs = [getattr(args, "compressor", None)] + cli.split_specs(getattr(args, "compressors", None) or "")
            for spec in filter(None, specs):
                get_compressor(spec)
            seen += 1
    assert seen >= 10


@pytest.mark.parametrize("cmd", ["run", "compare", "bench", "results"])
def test_cli_help_runs(cmd, capsys):
    from fedcompress import cli

    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0 and "usage: fedcompress" in capsys.readouterr().out


def test_doc_links_stay_inside_the_repository():
    """Relative links in README, SECURITY.md and docs/ name files that exist in the checkout (no
    paths into the development machine's folders, e.g. the papers: link those by arXiv id)."""
    docs = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text()
        assert "shared/papers" not in text, doc
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name}: broken link {target}"
