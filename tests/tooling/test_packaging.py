"""The project installs as a wheel too (not only editable): kernels/ lands as
clip_fast.kernels (never a top-level `kernels`), csrc/ as package data."""
import zipfile

from tests.support.processes import REPO_ROOT, run_python


def test_wheel_layout_and_import(tmp_path):
    build = run_python(
        ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO_ROOT)],
        env_extra={"CLIP_FAST_BUILD_EXT": "0"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("clip_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "clip_fast/kernels/contrastive.py" in names
    assert "clip_fast/loss.py" in names
    assert any(n.startswith("clip_fast/csrc/") and n.endswith(".cpp") for n in names)
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would clash on PyPI"

    target = tmp_path / "site"
    install = run_python(["-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)])
    assert install.returncode == 0, install.stdout + install.stderr
    probe = run_python(
        ["-c", "import clip_fast, clip_fast.kernels.contrastive as k; from clip_fast import ContrastiveLoss; print(k.__file__)"],
        env_extra={"PYTHONPATH": str(target)},
        cwd=tmp_path,  # not the checkout, whose clip_fast/ would shadow the wheel
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(target)), probe.stdout
