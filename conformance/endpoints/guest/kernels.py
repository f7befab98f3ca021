"""Debian's packaged kernels as guest kernels: resolve a version to a package, download it through
apt, verify it against apt's own checksum, and keep what a guest boots (vmlinuz and a handful of
modules, dependencies resolved) in a cache. A kernel is fetched once per machine.

A version names a package as a user would: `6.1` is the newest installable
`linux-image-6.1.*-amd64`, `6.12` the newest `linux-image-6.12.*-amd64`, `6.1.0-52` that exact
one. Cloud, realtime, debug and unsigned flavours are never picked."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conformance.errors import HarnessError

# The guest's NIC, control port and delay emulation; virtio* are modules in Debian's 6.1 and
# built in later (a missing module that the kernel has built in is fine: config says so).
MODULES = ("virtio_pci", "virtio_net", "virtio_console", "sch_netem")
_BUILTIN_CONFIG = {"virtio_pci": "CONFIG_VIRTIO_PCI", "virtio_net": "CONFIG_VIRTIO_NET",
                   "virtio_console": "CONFIG_VIRTIO_CONSOLE", "sch_netem": "CONFIG_NET_SCH_NETEM"}
_CONFIG_KEYS = ("CONFIG_MPTCP", "CONFIG_MPTCP_IPV6", "CONFIG_MODULE_DECOMPRESS", *_BUILTIN_CONFIG.values())
_SKIP_FLAVOURS = ("cloud", "rt", "dbg", "unsigned")


def cache_dir() -> Path:
    """Where fetched kernels and built initramfs images live (MPTCP_CONFORMANCE_CACHE overrides)."""
    base = os.environ.get("MPTCP_CONFORMANCE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mptcp-conformance")
    return Path(base)


@dataclass
class Kernel:
    """A fetched kernel: what a guest boots, and where it came from."""

    version: str  # as the user named it (6.1)
    package: str  # linux-image-6.1.0-56-amd64
    package_version: str  # 6.1.192-2
    release: str  # uname -r: 6.1.0-56-amd64
    sha256: str  # of the .deb, equal to apt's record
    vmlinuz: str
    modules: list[str] = field(default_factory=list)  # load order, dependencies first
    config: dict[str, str] = field(default_factory=dict)  # the CONFIG_* that matter here
    vmlinux: str = ""  # the uncompressed ELF image, booted through its PVH entry

    @property
    def folder(self) -> Path:
        return Path(self.vmlinuz).parent

    def has_netem(self) -> bool:
        return self.config.get("CONFIG_NET_SCH_NETEM") in ("y", "m")


# The compressed payload inside a bzImage, by magic number, and how to unpack it.
_PAYLOADS = ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08", "gzip"))


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """The kernel's ELF image out of its bzImage. Booted through its PVH entry point, a guest
    skips the decompressor, which alone takes seconds under software emulation."""
    data = vmlinuz.read_bytes()
    for magic, kind in _PAYLOADS:
        at = data.find(magic)
        while at >= 0:
            try:
                if kind == "xz":
                    image = lzma.LZMADecompressor().decompress(data[at:])
                elif kind == "gzip":
                    image = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[at:])
                else:
                    image = subprocess.run(["zstd", "-dcq"], input=data[at:], capture_output=True,
                                           check=False).stdout
            except (lzma.LZMAError, zlib.error):
                image = b""
            if image.startswith(b"\x7fELF"):
                out.write_bytes(image)
                return
            at = data.find(magic, at + 1)
    raise HarnessError(f"{vmlinuz}: no xz, zstd or gzip payload holding an ELF kernel (is zstd installed?)")


def _apt(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=cwd)
    except FileNotFoundError:
        raise HarnessError(f"{what}: {argv[0]} is not installed (a Debian machine is needed)") from None
    if cp.returncode != 0:
        raise HarnessError(f"{what}: {' '.join(argv)} failed: {(cp.stderr or cp.stdout).strip()[-300:]}")
    return cp.stdout


def _numbers(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def resolve(version: str) -> str:
    """The package that `version` names (see the module docstring); a clear error if none does."""
    if not re.fullmatch(r"\d+\.\d+[\w.+~-]*", version):
        raise ValueError(f"kernel version {version!r}: expected a Debian kernel version such as 6.1 or 6.12")
    try:
        return _resolve(version)
    except HarnessError:
        # A fresh machine may have no package lists yet: read them once, then ask again.
        _apt(["apt-get", "update", "-q"], f"kernel {version}")
        return _resolve(version)


def _resolve(version: str) -> str:
    out = _apt(["apt-cache", "search", "--names-only", f"^linux-image-{re.escape(version)}"],
               f"kernel {version}")
    names = []
    for line in out.splitlines():
        name = line.split(" - ", 1)[0].strip()
        m = re.fullmatch(r"linux-image-(.+)-amd64", name)
        if not m or any(f"-{flavour}-" in f"{name}-" for flavour in _SKIP_FLAVOURS):
            continue
        rest = m.group(1)
        # 6.1 names 6.1.0-56, never 6.10; 6.12 names 6.12.117+deb12 (but not the meta-package 6.12).
        if rest == version or (rest.startswith(version) and rest[len(version)] in ".-+"):
            names.append(name)
    concrete = [n for n in names if re.search(r"\d+\.\d+\.\d+", n)]
    if not concrete:
        raise HarnessError(f"kernel {version}: no installable Debian package linux-image-{version}*-amd64 "
                           "(see apt-cache search linux-image)")
    return max(concrete, key=_numbers)


def _apt_record(package: str) -> dict[str, str]:
    out = _apt(["apt-cache", "show", "--no-all-versions", package], f"package {package}")
    record = {}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key in ("Version", "SHA256", "Filename"):
            record[key] = value.strip()
    return record


def _modinfo_depends(ko: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _read_config(path: Path) -> dict[str, str]:
    config = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key in _CONFIG_KEYS:
            config[key] = value
    return config


def _pick_modules(tree: Path, release: str, config: dict[str, str], out: Path) -> list[str]:
    """Copy MODULES and their dependencies (decompressed: busybox's insmod reads plain ELF) from
    the package tree to `out`; return their load order."""
    index = {}
    for path in (tree / "lib/modules" / release).rglob("*.ko*"):
        index[path.name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        path = index.get(name)
        if path is None:
            option = _BUILTIN_CONFIG.get(name)
            if (option and config.get(option) == "y") or name not in MODULES:
                return  # built in (a dependency absent from the tree is built in too)
            raise HarnessError(f"kernel {release}: module {name} ({' <- '.join(chain)}) not in the package")
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            data = lzma.decompress(data)
        elif path.name.endswith(".zst"):
            raise HarnessError(f"kernel {release}: {path.name} is zstd-compressed, which we cannot unpack")
        for dep in _modinfo_depends(data):
            visit(dep, (*chain, dep))
        (out / f"{name}.ko").write_bytes(data)
        order.append(name)

    for name in MODULES:
        visit(name, (name,))
    return order


def fetch(version: str) -> Kernel:
    """The kernel `version` names, from the cache or downloaded now (apt-get download, verified)."""
    package = resolve(version)
    record = _apt_record(package)
    folder = cache_dir() / "kernels" / f"{package}_{record.get('Version', 'unknown')}"
    manifest = folder / "kernel.json"
    if manifest.exists():
        kernel = Kernel(**json.loads(manifest.read_text()))
        kernel.version = version
        if not kernel.vmlinux or not Path(kernel.vmlinux).exists():  # a cache from before PVH boots
            extract_vmlinux(Path(kernel.vmlinuz), folder / "vmlinux")
            kernel.vmlinux = str(folder / "vmlinux")
            manifest.write_text(json.dumps(asdict(kernel), indent=2))
        return kernel
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        # apt drops privileges to _apt for downloads, which cannot write into a root-only folder.
        _apt(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
             f"kernel {version}", cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise HarnessError(f"kernel {version}: apt-get download left {len(debs)} packages")
        sha = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        if record.get("SHA256") and sha != record["SHA256"]:
            raise HarnessError(f"kernel {version}: {debs[0].name} has SHA-256 {sha}, apt's record says "
                               f"{record['SHA256']}")
        tree = work / "tree"
        _apt(["dpkg-deb", "-x", str(debs[0]), str(tree)], f"kernel {version}")
        vmlinuz = next((tree / "boot").glob("vmlinuz-*"), None)
        config_file = next((tree / "boot").glob("config-*"), None)
        if vmlinuz is None or config_file is None:
            raise HarnessError(f"kernel {version}: {package} holds no boot/vmlinuz-* and config-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        config = _read_config(config_file)
        if config.get("CONFIG_MPTCP") != "y":
            raise HarnessError(f"kernel {version}: {package} is built without MPTCP (CONFIG_MPTCP "
                               f"{config.get('CONFIG_MPTCP', 'unset')})")
        staged = work / "kernel"
        (staged / "modules").mkdir(parents=True)
        order = _pick_modules(tree, release, config, staged / "modules")
        shutil.copy2(vmlinuz, staged / "vmlinuz")
        extract_vmlinux(vmlinuz, staged / "vmlinux")
        kernel = Kernel(version, package, record.get("Version", ""), release, sha, str(folder / "vmlinuz"),
                        order, config, str(folder / "vmlinux"))
        (staged / "kernel.json").write_text(json.dumps(asdict(kernel), indent=2))
        # Whole or not at all: a killed fetch leaves only its temporary folder, removed with it.
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    return kernel


def cached() -> list[Kernel]:
    """The kernels already in the cache (what `doctor` can report without downloading)."""
    out = []
    for manifest in sorted((cache_dir() / "kernels").glob("*/kernel.json")):
        try:
            out.append(Kernel(**json.loads(manifest.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out
