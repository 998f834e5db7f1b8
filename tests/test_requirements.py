"""requirements.txt, constraints.txt and pyproject.toml cannot drift apart.

constraints.txt is the one place that names exact versions; requirements.txt names none (it installs
caee with its test extra under those constraints); pyproject.toml states the ranges. The tests check
that every dependency pyproject.toml declares has exactly one pin, inside its range, and that no pin
is stale. ``python tests/test_requirements.py --installed`` (run by .ci/run after
``pip install -r requirements.txt``) checks that the environment holds exactly the pinned versions.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def pins(path: Path = REPO / "constraints.txt") -> dict[str, Version]:
    """``name==version`` lines of a constraints file, by canonical name; anything else is an error."""
    result: dict[str, Version] = {}
    for line in _lines(path):
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise AssertionError(f"{path.name}: '{line}' is not an exact pin (name==version)")
        name = canonicalize_name(req.name)
        if name in result:
            raise AssertionError(f"{path.name}: {req.name} is pinned twice")
        result[name] = Version(specs[0].version)
    return result


def declared(extras: tuple[str, ...] = ("test",)) -> dict[str, Requirement]:
    """pyproject.toml's dependencies plus the named extras, by canonical name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}


def test_requirements_txt_installs_caee_under_the_constraints_and_names_no_version():
    lines = _lines(REPO / "requirements.txt")
    assert lines == ["-c constraints.txt", "-e .[test]"]
    assert (REPO / "constraints.txt").is_file()


def test_every_dependency_has_exactly_one_pin_inside_its_range_and_no_pin_is_stale():
    pinned, wanted = pins(), declared()
    assert sorted(pinned) == sorted(wanted), (
        f"pinned but not declared: {sorted(set(pinned) - set(wanted))}; "
        f"declared but not pinned: {sorted(set(wanted) - set(pinned))}")
    for name, req in wanted.items():
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's '{req}'"


def test_pin_parser_refuses_a_range_and_a_double_pin(tmp_path):
    """The sync check itself: a loose or repeated pin is a failure, not skipped."""
    f = tmp_path / "c.txt"
    f.write_text("torch>=2\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        pins(f)
    f.write_text("# comment\nPyYAML==6.0.4\npyyaml==6.0.4  # again\n")
    with pytest.raises(AssertionError, match="pinned twice"):
        pins(f)
    f.write_text("PyYAML==6.0.4   # note\n")
    assert pins(f) == {"pyyaml": Version("6.0.4")}


def installed_mismatches() -> list[str]:
    """Pinned distributions whose installed version differs (or that are missing)."""
    from importlib import metadata

    bad = []
    for name, version in pins().items():
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            bad.append(f"{name}: not installed (constraints.txt: {version})")
            continue
        if have.public != version.public:   # a local tag such as torch's +cu130 is the same release
            bad.append(f"{name}: {have} installed, constraints.txt pins {version}")
    return bad


if __name__ == "__main__":
    if sys.argv[1:] != ["--installed"]:
        sys.exit("usage: python tests/test_requirements.py --installed")
    problems = installed_mismatches()
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(pins()) - len(problems)} of {len(pins())} pinned versions installed")
    sys.exit(1 if problems else 0)
