"""The guest's whole userland, as one initramfs: busybox-static, our static agent, iproute2's `ip`
and `tc` (with the shared libraries they load) for `ip mptcp` and netem, the kernel's modules,
and an init script that loads them and hands the control port to the agent.

Images are cached by the hash of everything that goes into them, so a changed agent or kernel
gets a new image and an unchanged one is never rebuilt."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from conformance.endpoints.guest.kernels import Kernel, cache_dir
from conformance.errors import HarnessError

AGENT_SOURCE = Path(__file__).with_name("agent.c")
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
TOOLS = ("/usr/sbin/ip", "/usr/sbin/tc")

# PID 1 of the guest. The control port is found by its name (no udev to make the symlink);
# the agent runs as a child so that this shell reaps whatever it leaves behind.
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t tmpfs run /run
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || echo "mptcp-guest: insmod $m failed"
done
ip link set lo up
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = ctl ] && port=/dev/${p##*/}
done
if [ -z "$port" ]; then
    echo "mptcp-guest: no control port"; poweroff -f
fi
echo "mptcp-guest: agent on $port"
/sbin/agent serve $port
echo "mptcp-guest: agent exited ($?)"
poweroff -f
"""


def _libraries(binary: str) -> list[str]:
    """The shared objects `binary` loads (ldd), the dynamic loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            parts = parts[parts.index("=>") + 1:]
        if parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def build_agent(out_dir: Path) -> Path:
    """The agent, compiled static once per source version."""
    digest = hashlib.sha256(AGENT_SOURCE.read_bytes()).hexdigest()[:16]
    binary = out_dir / f"agent-{digest}"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    cp = subprocess.run(["gcc", "-static", "-O2", "-s", "-Wall", "-pthread", "-o", str(tmp), str(AGENT_SOURCE)],
                        capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        raise HarnessError(f"building the guest agent ({AGENT_SOURCE}) failed: {cp.stderr.strip()[-500:]}")
    tmp.rename(binary)
    return binary


def _inputs(kernel: Kernel, agent: Path) -> list[tuple[str, Path]]:
    """(path in the image, file on this machine) for every file the image holds."""
    files = [("bin/busybox", BUSYBOX), ("sbin/agent", agent)]
    for tool in TOOLS:
        files.append((tool.lstrip("/"), Path(tool)))
        files += [(lib.lstrip("/"), Path(lib)) for lib in _libraries(tool)]
    files += [(f"lib/modules/{m}.ko", kernel.folder / "modules" / f"{m}.ko") for m in kernel.modules]
    return sorted(set(files))


def build(kernel: Kernel) -> Path:
    """The initramfs for `kernel` (built now or taken from the cache)."""
    for need in (BUSYBOX, *map(Path, TOOLS)):
        if not need.exists():
            raise HarnessError(f"guest image: {need} is missing (ci/setup.sh installs busybox-static, iproute2)")
    agent = build_agent(cache_dir() / "agent")
    files = _inputs(kernel, agent)
    h = hashlib.sha256(INIT.encode() + "\n".join(kernel.modules).encode())
    for name, path in files:
        h.update(name.encode() + hashlib.sha256(path.read_bytes()).digest())
    # Uncompressed: unpacking gzip in the guest costs more under emulation than reading the bytes.
    image = cache_dir() / "initramfs" / f"{kernel.release}-{h.hexdigest()[:16]}.cpio"
    if image.exists():
        return image
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".initramfs-", dir=image.parent) as tmp:
        root = Path(tmp) / "root"
        for name, path in files:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path.resolve(), target)
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc/modules.order").write_text("\n".join(kernel.modules) + "\n")
        staged = Path(tmp) / "image.cpio"
        names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        with open(staged, "wb") as out:
            cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=names, stdout=out,
                                  stderr=subprocess.PIPE, check=False)
        if cpio.returncode:
            raise HarnessError(f"guest image for {kernel.release}: cpio failed: {cpio.stderr.decode()[-300:]}")
        os.replace(staged, image)
    return image
