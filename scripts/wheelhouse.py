#!/usr/bin/env python3
"""Offline wheelhouse: the wheels minigpt needs beyond a GPU image's own packages.

    python scripts/wheelhouse.py [--python-version 3.12] [--platform manylinux_2_28_x86_64]
        [--out wheelhouse] [--have FILE] [--gpt2-tokenizer DIR]

Run it where pip can reach a package index; carry the folder to a node that has none. It takes
minigpt's runtime requirements from pyproject.toml (plus pytest, for the GPU tests), drops what
the image already has (``--have``: a ``pip freeze`` taken on the node; default
scripts/gpu_image_packages.txt, the stock image), resolves the rest for the TARGET interpreter and
platform with the image's versions as constraints (``pip download`` of the whole closure, so
the image's own packages are fetched too, about 100 MB once, then left out), and writes into
``--out``:

    *.whl              the closure, wheels only (pure-python sdists are built here), never a
                       torch, triton or nvidia-* wheel: the image's torch stays the only one
    requirements.txt   exact pins of those wheels, with --no-index and --find-links .
    hf_hub/            GPT-2's tokenizer as a Hugging Face hub cache (HF_HUB_CACHE), for
                       data.tokenizer=gpt2 without network

It fails, with one line, when the folder would exceed 40 MB or hold a torch-family wheel.
Standard library and pip (>= 21.2) only, so any Python with pip runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors tomli
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HAVE = Path(__file__).with_name("gpu_image_packages.txt")
LIMIT_MB = 40.0
HEADER = "# minigpt wheelhouse (scripts/wheelhouse.py)"
GPT2_REPO = "openai-community/gpt2"
# Everything of GPT-2's repo except weights: what minigpt and transformers read for the tokenizer.
GPT2_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# The legacy manylinux names and the glibc each stands for: pip matches platform tags exactly.
LEGACY_MANYLINUX = (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5))
# Running pip with the target's marker environment: pip evaluates `; python_version < "3.12"`
# markers against the interpreter that runs it, even with --python-version.
PIP_FOR_TARGET = """
import json, sys
from pip._vendor.packaging import markers
target = json.loads(sys.argv.pop(1))
host = markers.default_environment
markers.default_environment = lambda: {**host(), **target}
from pip._internal.cli.main import main
sys.exit(main())
"""


class WheelhouseError(Exception):
    """A problem the user must fix; printed as one line."""


def canonical(name: str) -> str:
    """PEP 503 name: the form pip compares (Foo_Bar, foo.bar and foo-bar are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_torch_family(name: str) -> bool:
    """torch, triton and NVIDIA's CUDA libraries: only the image's own build may be used."""
    name = canonical(name)
    return name in {"torch", "triton"} or name.startswith(("nvidia-", "pytorch-triton"))


def project_requirements(pyproject: Path) -> list[str]:
    """[project] dependencies plus the dev extra's pytest, which the GPU tests run with."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    dev = project.get("optional-dependencies", {}).get("dev", [])
    pytest = [r for r in dev if canonical(Requirement(r).name) == "pytest"]
    return list(project["dependencies"]) + (pytest or ["pytest"])


def parse_have(text: str) -> dict[str, str | None]:
    """Installed packages from ``pip freeze`` / ``pip list --format=freeze`` text (or bare names):
    canonical name -> version, None where unknown (``name @ url`` lines, names alone)."""
    have: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):  # comments, -e lines of editable installs
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:===?\s*(\S+))?", line)
        if match:
            have[canonical(match.group(1))] = match.group(2)
    return have


def release(version: str) -> str:
    """The version without its local label (2.11.0+cu130 -> 2.11.0): what an index holds."""
    return version.split("+", 1)[0]


def needed_requirements(requirements: list[str], have: dict[str, str | None]) -> list[str]:
    """The requirements the image does not meet; one it has at a wrong version is an error,
    since carrying a second copy (a second numpy, say) would shadow the image's own."""
    needed = []
    for text in requirements:
        req = Requirement(text)
        name = canonical(req.name)
        version = have.get(name)
        if version is not None and not _satisfies(req, version):
            raise WheelhouseError(
                f"the image's {name} {version} does not meet {text!r} (pyproject.toml); "
                "the wheelhouse never replaces an image package: update the image or the pin"
            )
        if name not in have and not is_torch_family(name):
            needed.append(text)
    return needed


def _satisfies(req: Requirement, version: str) -> bool:
    try:
        return req.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True  # an unparsable local build: let pip judge on the node


def image_constraints(have: dict[str, str | None]) -> list[str]:
    """``name==version`` of every image package with a known version, so the resolved wheels
    work with what is installed there."""
    return [f"{name}=={release(v)}" for name, v in sorted(have.items()) if v]


def platform_tags(platform: str) -> list[str]:
    """Every platform tag a node of ``platform`` accepts (pip's --platform matches exactly):
    manylinux_2_28_x86_64 -> manylinux_2_28 ... manylinux_2_5, manylinux2014, 2010 and 1."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc, 4, -1)]
    return tags + [f"{name}_{arch}" for name, minor in LEGACY_MANYLINUX if glibc >= minor]


def marker_environment(python_version: str, platform: str) -> dict[str, str]:
    """The PEP 508 marker values of a CPython ``python_version`` on ``platform``."""
    parts = (python_version.split(".") + ["0", "0"])[:3]
    env = {
        "python_version": ".".join(parts[:2]),
        "python_full_version": ".".join(parts),
        "implementation_name": "cpython",
        "implementation_version": ".".join(parts),
        "platform_python_implementation": "CPython",
    }
    linux = re.fullmatch(r"(?:many|musl)?linux(?:1|2010|2014|_\d+_\d+)?_(\w+)", platform)
    if linux:
        env.update(sys_platform="linux", platform_system="Linux", os_name="posix")
        env["platform_machine"] = linux.group(1)
    return env


class Pip:
    """pip in a subprocess, resolving for the target interpreter and platform."""

    def __init__(self, python_version: str, platform: str, work: Path) -> None:
        self.environment = json.dumps(marker_environment(python_version, platform))
        self.flags = ["--python-version", python_version, "--implementation", "cp"]
        self.flags += ["--only-binary=:all:", "--disable-pip-version-check"]
        for tag in platform_tags(platform):
            self.flags += ["--platform", tag]
        self.work, self.built = work, work / "built"
        self.built.mkdir(parents=True, exist_ok=True)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", PIP_FOR_TARGET, self.environment, *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    def download(self, dest: Path, *args: str) -> subprocess.CompletedProcess:
        """``pip download`` for the target, wheels built here included. Not ``pip install
        --dry-run --report``: pip 23 checks that one's Requires-Python against its own Python."""
        return self.run(
            "download", "-d", str(dest), "--find-links", str(self.built), *self.flags, *args
        )

    def has_wheel(self, requirement: str) -> bool:
        """Whether the index has a wheel of ``requirement`` for the target."""
        probe = self.download(self.work / "probe", "--no-deps", "--quiet", requirement)
        return probe.returncode == 0

    def build_pure_wheel(self, requirement: str) -> Path:
        """A wheel built here from the sdist of ``requirement``; only a pure-python one
        (py3-none-any) runs on the target, so anything else is an error."""
        name = Requirement(requirement).name
        out = self.work / "building"
        shutil.rmtree(out, ignore_errors=True)
        pip_wheel = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
        ]
        pip_wheel += [f"--no-binary={name}", "-w", str(out), requirement]
        proc = subprocess.run(pip_wheel, capture_output=True, text=True)
        wheels = list(out.glob("*.whl"))
        if proc.returncode or len(wheels) != 1:
            raise WheelhouseError(
                f"{requirement} has no wheel and its sdist did not build: {_last_line(proc.stderr)}"
            )
        if not wheels[0].name.endswith("-none-any.whl"):
            raise WheelhouseError(
                f"{requirement} has no wheel for the target and its sdist builds "
                f"{wheels[0].name}, which is not pure python: build it on the target"
            )
        return Path(shutil.move(str(wheels[0]), self.built / wheels[0].name))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def blocking_requirements(output: str) -> list[str]:
    """The requirements a failed resolution names as having no candidate: pip's last words
    ("No matching distribution found for X") or the conflict's causes ("... depends on X")."""
    found = re.findall(r"No matching distribution found for (\S+)", output)
    found += re.findall(r" depends on (\S+)", output)
    valid = []
    for text in dict.fromkeys(t.rstrip(";,") for t in found):
        try:
            valid.append(str(Requirement(text)))
        except ValueError:  # InvalidRequirement: a fragment of some other message
            continue
    return valid


def resolve(pip: Pip, needed: list[str], constraints: Path, skip: set[str]) -> list[Path]:
    """The wheels of the closure of ``needed`` for the target, in a work folder: the image's
    packages too (pip cannot be told they are installed; the caller drops them). A requirement
    with no wheel for the target (antlr4-python3-runtime 4.9 is sdist-only) gets one built
    here, then pip resolves again."""
    closure = pip.work / "closure"
    for _ in range(10):
        shutil.rmtree(closure, ignore_errors=True)
        proc = pip.download(closure, "-c", str(constraints), *needed)
        if proc.returncode == 0:
            return sorted(closure.iterdir())
        built = []
        # pip prints the conflict's causes on stdout, its verdict on stderr
        for requirement in blocking_requirements(proc.stdout + proc.stderr):
            name = canonical(Requirement(requirement).name)
            if name in skip or is_torch_family(name) or pip.has_wheel(requirement):
                continue  # the image's own, or a real conflict: nothing to build
            built.append(pip.build_pure_wheel(requirement))
            skip.add(name)
        if not built:
            raise WheelhouseError(
                f"pip cannot resolve the requirements for the target:\n{proc.stderr.strip()}"
            )
        print(f"built from sdist: {', '.join(p.name for p in built)}", flush=True)
    raise WheelhouseError("resolution still failing after building 10 sdists")


def wheel_name(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel file name."""
    name, version = filename.split("-")[:2]
    return canonical(name), version


def carried(closure: list[Path], have: dict[str, str | None]) -> list[Path]:
    """The wheels of the closure that the image lacks: never one of the torch family."""
    odd = [p.name for p in closure if p.suffix != ".whl"]
    if odd:
        raise WheelhouseError(f"pip fetched files that are not wheels: {', '.join(odd)}")
    return [
        p
        for p in closure
        if wheel_name(p.name)[0] not in have and not is_torch_family(wheel_name(p.name)[0])
    ]


def write_requirements(out: Path, pins: list[str], have_source: Path) -> None:
    """requirements.txt of exact pins; its own --no-index keeps pip off the network even when
    the command line forgets it, and --find-links . is read relative to this file."""
    shown = have_source.relative_to(ROOT) if have_source.is_relative_to(ROOT) else have_source
    lines = [HEADER, f"# image packages: {shown}", "--no-index", "--find-links .", *pins]
    (out / "requirements.txt").write_text("\n".join(lines) + "\n")


def gpt2_snapshot(source: Path | None, work: Path) -> Path:
    """A folder with GPT-2's tokenizer files: ``source``, else fetched from the Hub."""
    if source is not None:
        return source
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                GPT2_REPO, allow_patterns=list(GPT2_FILES), cache_dir=str(work / "hub")
            )
        )
    except Exception as err:  # ImportError, or no route to the Hub
        raise WheelhouseError(
            f"GPT-2's tokenizer could not be fetched from the Hub ({type(err).__name__}); "
            "pass --gpt2-tokenizer DIR, a folder with its tokenizer.json"
        ) from err


def add_gpt2_tokenizer(out: Path, source: Path) -> Path:
    """Lay GPT-2's tokenizer files out as a hub cache under ``out/hf_hub``, so that
    HF_HUB_CACHE=out/hf_hub finds them (minigpt.tokenizer.gpt2_hub_file, transformers).

    Plain files, no blobs or symlinks: they survive any copy. The revision is the snapshot's own
    when ``source`` is one, else a hash of the files."""
    files = [source / f for f in GPT2_FILES if (source / f).is_file()]
    tokenizer = source / "tokenizer.json"
    if tokenizer not in files:
        raise WheelhouseError(f"--gpt2-tokenizer {source} has no tokenizer.json")
    vocab = json.loads(tokenizer.read_text(encoding="utf-8"))["model"]["vocab"]
    if len(vocab) != 50257 or vocab.get("<|endoftext|>") != 50256:
        raise WheelhouseError(f"{tokenizer} is not GPT-2's (50257 ids, <|endoftext|> = 50256)")
    revision = source.name if source.parent.name == "snapshots" else _files_hash(files)
    repo = out / "hf_hub" / ("models--" + GPT2_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)  # no newline: the hub reads it verbatim
    return snapshot


def _files_hash(files: list[Path]) -> str:
    digest = hashlib.sha1()
    for f in sorted(files):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def folder_size(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_folder(out: Path, limit_mb: float = LIMIT_MB) -> int:
    """The folder's size in bytes; an error when it holds a torch-family wheel or exceeds
    ``limit_mb`` (it must stay small enough to carry)."""
    torch_like = [p.name for p in out.glob("*.whl") if is_torch_family(wheel_name(p.name)[0])]
    if torch_like:
        raise WheelhouseError(f"{out} holds {', '.join(torch_like)}: only the image's may be used")
    total = folder_size(out)
    if total > limit_mb * 1e6:
        raise WheelhouseError(f"{out} is {total / 1e6:.1f} MB, over the {limit_mb:.0f} MB limit")
    return total


def prepare_out(out: Path) -> None:
    """An empty ``out``: a new folder, or an earlier wheelhouse (whose contents go)."""
    req = out / "requirements.txt"
    if out.exists() and any(out.iterdir()):
        if not (req.is_file() and req.read_text().startswith(HEADER)):
            raise WheelhouseError(f"--out {out} is not empty and not a wheelhouse; pick another")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def print_summary(out: Path, closure: list[Path], have: dict[str, str | None]) -> None:
    """Each wheel and its size, the total, the torch check, and the image packages relied on."""
    total = check_folder(out)
    print(f"\n{out}/")
    for wheel in sorted(out.glob("*.whl")):
        print(f"  {wheel.name:<72} {wheel.stat().st_size / 1e6:6.2f} MB")
    print(
        f"  {'hf_hub/ (GPT-2 tokenizer, ' + GPT2_REPO + ')':<72} "
        f"{folder_size(out / 'hf_hub') / 1e6:6.2f} MB"
    )
    print(
        f"total {total / 1e6:.1f} MB (limit {LIMIT_MB:.0f} MB), "
        f"{len(list(out.glob('*.whl')))} wheels; no torch, triton or nvidia-* wheel"
    )
    relied = [wheel_name(p.name) for p in closure if wheel_name(p.name)[0] in have]
    listed = [f"{n} {have[n] or '~' + v}" for n, v in relied]
    print(f"relies on the image's {', '.join(listed)} (~: resolved here, not listed in --have)")
    print("on the node, install as README.md says (section 'Air-gapped GPU nodes')")


def check_pip() -> None:
    """pip 21.2 is the first with both the resolver whose messages resolve() reads and tomli."""
    import pip

    if tuple(int(p) for p in re.findall(r"\d+", pip.__version__)[:2]) < (21, 2):
        raise WheelhouseError(f"pip {pip.__version__} is too old: python -m pip install -U pip")


def build(args: argparse.Namespace) -> None:
    """Resolve, download and check the wheelhouse ``args`` describe."""
    check_pip()
    have = parse_have(args.have.read_text(encoding="utf-8"))
    needed = needed_requirements(project_requirements(ROOT / "pyproject.toml"), have)
    out = args.out.resolve()
    prepare_out(out)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work = Path(tmp)
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(image_constraints(have)) + "\n")
        pip = Pip(args.python_version, args.platform, work)
        print(f"resolving {', '.join(needed)} for Python {args.python_version}, {args.platform}")
        closure = resolve(pip, needed, constraints, set(have))
        wheels = carried(closure, have)
        for wheel in wheels:
            shutil.copyfile(wheel, out / wheel.name)
        write_requirements(out, sorted("==".join(wheel_name(w.name)) for w in wheels), args.have)
        add_gpt2_tokenizer(out, gpt2_snapshot(args.gpt2_tokenizer, work))
        print_summary(out, closure, have)


def main(argv: list[str] | None = None) -> int:
    """Command line: build the wheelhouse; a user error is one line and exit status 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the node's Python (3.12)")
    parser.add_argument(
        "--platform",
        default="manylinux_2_28_x86_64",
        help="the newest platform tag the node accepts",
    )
    parser.add_argument("--out", type=Path, default=Path("wheelhouse"))
    parser.add_argument(
        "--have",
        type=Path,
        default=DEFAULT_HAVE,
        help="pip freeze of the node (default: the stock image's list)",
    )
    parser.add_argument(
        "--gpt2-tokenizer",
        type=Path,
        default=None,
        help="folder with GPT-2's tokenizer.json (default: from the Hub)",
    )
    args = parser.parse_args(argv)
    try:
        build(args)
    except (WheelhouseError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
