"""Build and run the Dockerfile's image with buildah, on a local stand-in for its registry base image.

No container daemon runs on the CI machine, and the registry cannot be reached, so the image's FROM is
made here once: Debian bookworm (debootstrap, minbase) with Debian's python3 in a virtual environment
on the PATH as the official image's `python` and `pip`, and this machine's CA bundle. It is kept in
buildah's store under the FROM's name, and the root file system under CACHE, between runs.

    .venv/bin/python tests/image.py   # make the stand-in base now (CI does it before the tests)
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Outside the repository: the base is the machine's, shared by every checkout and kept between runs.
CACHE = Path(os.environ.get("SIGNIN_IMAGE_CACHE", "/var/cache/signin-image-base"))
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
# Built on the base like any other layer: the official image's python and pip first on the PATH.
BASE_CONTAINERFILE = """\
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /usr/local/python
CMD ["python3"]
"""
BUILDAH = ["buildah"]
# Debian's chroot build needs no daemon; the host network reaches PostgreSQL and the package index.
ISOLATION = ["--isolation", "chroot", "--network", "host"]


def base_name() -> str:
    """The image the Dockerfile's FROM names."""
    return re.search(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)


def has_image(name: str) -> bool:
    return subprocess.run([*BUILDAH, "inspect", "--type", "image", name], capture_output=True).returncode == 0


def rootfs_tar() -> Path:
    """Debootstrap bookworm minbase with Debian's python3 once, kept as a tarball in CACHE."""
    tar = CACHE / "rootfs.tar"
    if tar.exists():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        rootfs = Path(work) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", rootfs, MIRROR], check=True, capture_output=True)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        subprocess.run(["tar", "-C", rootfs, "-cf", Path(work) / "rootfs.tar", "."], check=True)
        os.replace(Path(work) / "rootfs.tar", tar)
    return tar


def ensure_base() -> str:
    """Make the stand-in base image under the FROM's name unless buildah has it; return the name."""
    name = base_name()
    if has_image(name):
        return name
    tar = rootfs_tar()
    with tempfile.TemporaryDirectory() as context:
        os.link(tar, Path(context) / "rootfs.tar") if tar.stat().st_dev == Path(context).stat().st_dev else shutil.copy(tar, context)
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", context)
        (Path(context) / "Containerfile").write_text(BASE_CONTAINERFILE)
        subprocess.run([*BUILDAH, "build", *ISOLATION, "--format", "docker", "--layers", "-t", name, context], check=True, capture_output=True)
    return name


def build(tag: str) -> subprocess.CompletedProcess:
    """Build the Dockerfile from the repository as `docker build .` would, layers cached."""
    return subprocess.run([*BUILDAH, "build", *ISOLATION, "--format", "docker", "--layers", "-t", tag, ROOT], capture_output=True, text=True, timeout=1800)


if __name__ == "__main__":
    started = time.monotonic()
    print(f"{ensure_base()} ready in {time.monotonic() - started:.0f} s")
    sys.exit(0)
