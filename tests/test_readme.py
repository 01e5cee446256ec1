"""The README's Python API example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs() -> None:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    proc = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    accuracy = float(re.search(r"test accuracy ([\d.]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.8


def test_quickstart_has_the_two_commands() -> None:
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    assert [b.strip() for b in blocks] == [
        "pip install -e . && fedforge run",
        'pip install -e ".[test]" && python -m pytest -q',
    ]
    assert (
        'pip install -e ".[test]" && python -m pytest -q'
        in (README.parent / ".ci" / "run").read_text()
    )


def test_every_readme_python_block_compiles_and_its_imports_resolve() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")
        imports = "\n".join(
            line for line in block.splitlines() if line.startswith(("import ", "from "))
        )
        exec(compile(imports, "README.md", "exec"), {})
