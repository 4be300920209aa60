"""Installing: the source distribution builds and tests the package as a clone does, and an
unbuilt or unloadable kernel library says how to build it."""

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_FOLDERS = ("csrc", "reggan_ext", "python", "tests", "benchmarks")
SHIPPED_FILES = ("setup.py", "README.md", "CMakeLists.txt", "Makefile", "MANIFEST.in")
# What a build or a test run leaves in those folders.
BUILD_LEFTOVERS = ("__pycache__", ".benchmarks", ".pytest_cache")
BUILD_SUFFIXES = (".pyc", ".so")


def source_files():
    files = set(SHIPPED_FILES)
    for folder in SHIPPED_FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            relative = path.relative_to(ROOT)
            if (path.is_file() and path.suffix not in BUILD_SUFFIXES
                    and not any(part in BUILD_LEFTOVERS for part in relative.parts)):
                files.add(relative.as_posix())
    return files


def test_sdist_holds_every_source_and_no_build_output(tmp_path):
    # egg-base keeps the source tree untouched.
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
         "--dist-dir", str(tmp_path)],
        cwd=ROOT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(source_files() - shipped)
    assert not missing, f"not in the sdist (MANIFEST.in decides): {missing}"
    assert not [name for name in shipped if name.endswith(BUILD_SUFFIXES)]


def test_unloadable_kernels_say_how_to_build_them():
    # None in sys.modules fails the import of reggan_ext._C as an unbuilt source tree does.
    code = "import sys; sys.modules['reggan_ext._C'] = None; import reggan_ext"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "are not built, or do not load" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
