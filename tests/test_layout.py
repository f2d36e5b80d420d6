"""The README's Layout section lists every module of the package, and nothing else."""

import re

from helpers import ROOT


def test_readme_layout_lists_exactly_the_modules():
    readme = (ROOT / "README.md").read_text()
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
    assert listed == modules, f"missing from the README: {sorted(modules - listed)}; not in the code: {sorted(listed - modules)}"


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in [*(ROOT / "fedhlm_app").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for line in path.read_text().splitlines():
            if re.match(r"\s*from fedhlm_app[\w.]* import .*\b_[a-z]\w*", line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders
