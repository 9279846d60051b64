"""README.md says what the code does: its "Use" snippet runs as written, its Layout names every package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from capsnet.routing import RoutingResult

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PACKAGE = REPO / "src" / "capsnet"


def _block(language: str) -> tuple[int, str]:
    """The one ```language fenced block of the README: its first line number (1-based) and its text."""
    text = README.read_text()
    fences = re.finditer(rf"^```{language}\n(.*?)^```$", text, re.M | re.S)
    blocks = [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in fences]
    assert len(blocks) == 1, f"README.md should hold one ```{language} block, found {len(blocks)}"
    return blocks[0]


def _section_block(heading: str) -> str:
    """The first fenced block after ``## heading``."""
    text = README.read_text()
    section = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"README.md has no '## {heading}' section"
    block = re.search(r"^```\w*\n(.*?)^```$", section.group(1), re.M | re.S)
    assert block, f"README.md's '## {heading}' section has no fenced block"
    return block.group(1)


def _run_use_snippet() -> dict:
    """Execute the snippet with the names it leaves to the reader bound to small valid tensors."""
    first_line, snippet = _block("python")
    namespace = {
        "labels": torch.randint(0, 10, (8,)),  # the 8 images of the snippet's batch, 10 classes
        "images": torch.rand(8, 1, 28, 28),
        "votes": torch.randn(2, 6, 3, 4),  # (B, I, J, D)
    }
    # Padded so that a traceback names the README's own line numbers.
    exec(compile("\n" * (first_line - 1) + snippet, str(README), "exec"), namespace)
    return namespace


def test_use_snippet_runs_as_written(one_thread):
    namespace = _run_use_snippet()
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].dim() == 0
    routed = namespace["routed"]
    assert isinstance(routed, RoutingResult)
    assert routed.poses.shape == (2, 3, 4) and routed.coupling.shape == (2, 6, 3)


def test_use_snippet_shapes_match_its_comments(one_thread):
    """A snippet line whose comment is a Python literal (``x.shape  # (8, 10)``) evaluates to it."""
    namespace = _run_use_snippet()
    _, snippet = _block("python")
    checked = 0
    for line in snippet.splitlines():
        code, _, comment = line.partition("#")
        try:
            expected = ast.literal_eval(comment.strip())
            expression = compile(code.strip(), str(README), "eval")
        except (SyntaxError, ValueError):
            continue
        assert eval(expression, namespace) == expected, f"README.md: {line.strip()}"
        checked += 1
    assert checked, "no snippet line states its result in a comment; this test checks nothing"


def test_layout_names_every_package():
    layout = _section_block("Layout")
    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    missing = [name for name in packages if f"src/capsnet/{name}/" not in layout]
    assert not missing, f"README.md's Layout block does not name these packages: {missing}"
