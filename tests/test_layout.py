"""The guide's Layout section lists every module of the package, and nothing else; the README stays short and in the repository."""

import re

from helpers import ROOT


def test_guide_layout_lists_exactly_the_modules():
    readme = (ROOT / "docs" / "guide.md").read_text()
    tree = readme.split("## Layout", 1)[1].split("```")[1]
    listed, folders = set(), []
    for line in tree.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        depth, name = len(match.group(1)) // 2, match.group(2)
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py") and folders and folders[0] == "fedhlm_app":
            listed.add("/".join([*folders, name]))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "fedhlm_app").rglob("*.py") if p.name != "__init__.py"}
    assert listed == modules, f"missing from docs/guide.md: {sorted(modules - listed)}; not in the code: {sorted(listed - modules)}"


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in [*(ROOT / "fedhlm_app").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for line in path.read_text().splitlines():
            if re.match(r"\s*from fedhlm_app[\w.]* import .*\b_[a-z]\w*", line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders


def test_the_docs_speak_of_the_product_only():
    """Under 250 lines of README; no paths outside the repository, no references to how it was built."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "conf").rglob("*.toml"), *(ROOT / "fedhlm_app").rglob("*.py"),
             ROOT / "pyproject.toml", ROOT / "Makefile"]
    pattern = re.compile(r"\.\./shared|\bissue \d+|\bissues show\b", re.IGNORECASE)
    offenders = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in files for m in pattern.finditer(path.read_text())]
    assert not offenders, offenders
