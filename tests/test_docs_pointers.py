"""Every file and `file.py: name` pointer in the README and docs/ resolves: the file exists (from the
repository root, `onestory_jax/`, or `onestory_jax/studio/`), and the name is defined in it."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
POINTER = re.compile(r"([\w./-]+\.py)(?::\s*(\w+))?")  # `path.py` or `path.py: name`
BASES = (ROOT, ROOT / "onestory_jax", ROOT / "onestory_jax" / "studio")


def pointers() -> list[tuple[str, str, str | None]]:
    found = []
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
            for path, name in POINTER.findall(span):
                found.append((doc.name, path, name or None))
    return sorted(set(found), key=str)


def resolve(path: str) -> Path | None:
    return next((base / path for base in BASES if (base / path).is_file()), None)


@pytest.mark.parametrize("doc,path,name", pointers())
def test_pointer_resolves(doc, path, name):
    file = resolve(path)
    assert file is not None, f"{doc}: `{path}` does not exist"
    if name is not None:
        defined = re.search(rf"^\s*(def|class)\s+{name}\b|^{name}\s*[:=]", file.read_text(), re.M)
        assert defined, f"{doc}: `{path}: {name}` is not defined there"


def test_pointers_are_found():
    assert len(pointers()) > 40  # the scan itself works (a broken regex would pass every pointer vacuously)
