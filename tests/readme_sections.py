"""The README's runnable example of one section, for the tests that run it."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def first_python_block(heading: str) -> str:
    """The first ```python block under the README heading whose title is `heading` (at
    any level), before the next heading of the same or a higher level."""
    text = README.read_text()
    found = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.M)
    assert found, f"README has no heading {heading!r}"
    level = len(found.group(1))
    section, in_code = [], False
    for line in text[found.end():].splitlines(keepends=True):
        in_code ^= line.startswith("```")
        if not in_code and re.match(rf"#{{1,{level}}} ", line):
            break  # the next heading (a "# comment" inside a code block is not one)
        section.append(line)
    section = "".join(section)
    block = re.search(r"```python\n(.*?)\n```", section, re.S)
    assert block, f"README's section {heading!r} has no python block"
    return block.group(1)
