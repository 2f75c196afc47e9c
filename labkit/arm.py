"""The agent on a Raspberry Pi without a compiler: the gateway bundle, and the proof on emulated Debian bookworm.

    python -m labkit.arm bundle --arch armhf             # dist/citynerve-<version>-gateway-armhf.tar.gz
    python -m labkit.arm check --arch arm64 --arch armhf  # install it in a clean root, poll a simulated meter

(`make gateway-bundle ARCH=armhf`, `make arm-check`; as root, with debootstrap, qemu-user-static and
binfmt-support, which the make targets install. Not part of the test suite: a run takes 10-20 minutes.)

Why a bundle: msgspec and cffi (which cryptography needs) publish no wheels for 32-bit ARM on PyPI, so `pip
install` on a 32-bit Raspberry Pi OS compiles them, which needs gcc, the Python and libffi headers, and a long
while on a Pi. The bundle carries every wheel the agent needs for one architecture; the ones PyPI lacks are
built once, here, in an emulated Debian bookworm root of that architecture (the same C library and Python 3.11
as Raspberry Pi OS bookworm). The gateway then installs offline with `pip install --no-index --find-links`.

`check` proves it the way docs/install.md says: a clean bookworm root (debootstrap, minbase, python3-venv; no
compiler in it: checked), run under qemu-user-static through binfmt_misc, gets the bundle, installs with the
documented commands, and `edge-agent poll-once` reads a simulated SDM630 (labkit/meter_sim.py, a pymodbus server
on this host: a chroot shares the host's network); the values it prints must be ones the simulator served. Then
`edge-agent enroll` makes the gateway's keys and CSR (cryptography and cffi at work). For
arm64 it also installs straight from PyPI with `--only-binary=:all:` (no compilation possible); for armhf it
records that the same command fails, and on which package. Times and versions go to dist/arm-check.json.

The roots live in --cache (default /var/tmp/citynerve-arm); the debootstrapped base of each architecture is kept
as a tar file there and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# debian arch -> the qemu-user binfmt entry that runs it
QEMU = {"arm64": "aarch64", "armhf": "arm"}
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BUILD_PACKAGES = ["build-essential", "python3-dev", "libffi-dev"]
# Inside the roots: the PATH of a root login, and pip quiet about its own version.
_HOST_CA = "/etc/ssl/certs/build-host-ca.crt"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
       "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}


class Failed(Exception):
    pass


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


class Lab:
    def __init__(self, cache: Path, dist: Path) -> None:
        self.cache = cache
        self.dist = dist
        self.logs = cache / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dist.mkdir(parents=True, exist_ok=True)
        # A build host behind a TLS-inspecting proxy trusts an extra CA (pip's own bundle does not know it): pip in
        # the roots gets the host's bundle. Only for downloads; the documented install uses no network.
        host_ca = next((os.environ[k] for k in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
                        if os.path.isfile(os.environ.get(k, ""))), None)
        self.host_ca = Path(host_ca) if host_ca else None
        self.env = dict(ENV, PIP_CERT=_HOST_CA) if self.host_ca else dict(ENV)

    # -- commands -----------------------------------------------------------------------------------------------

    def run(self, argv: list[str], log: str, *, check: bool = True, timeout: float = 3600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with open(self.logs / f"{log}.log", "a") as out:
            out.write(f"\n$ {' '.join(argv)}\n")
            out.flush()
            result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    timeout=timeout, env=env)
            out.write(result.stdout)
        if check and result.returncode != 0:
            tail = "\n".join(result.stdout.splitlines()[-15:])
            raise Failed(f"{' '.join(argv[:6])}... exited with {result.returncode} (log {self.logs / log}.log):\n{tail}")
        return result

    def chroot(self, root: Path, command: str, log: str, *, check: bool = True,
               timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        with mounted_proc(root):
            return self.run(["chroot", str(root), "/bin/sh", "-c", command], log, check=check, timeout=timeout,
                            env=self.env)

    # -- the emulated roots -------------------------------------------------------------------------------------

    def binfmt(self, arch: str) -> None:
        entry = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{QEMU[arch]}"
        if not Path("/proc/sys/fs/binfmt_misc/register").exists():
            self.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], "binfmt")
        if not entry.exists() or "enabled" not in entry.read_text():
            self.run(["update-binfmts", "--enable", f"qemu-{QEMU[arch]}"], "binfmt", check=False)
        text = entry.read_text() if entry.exists() else ""
        if "enabled" not in text:
            raise Failed(f"{entry}: qemu-user-static is not registered with binfmt_misc (apt-get install "
                         "qemu-user-static binfmt-support; in a container the host must register it)")
        if "flags: " in text and "F" not in text.split("flags: ", 1)[1].split("\n", 1)[0]:
            raise Failed(f"{entry}: registered without the F flag: the interpreter is not reachable in a chroot")

    def base(self, arch: str) -> Path:
        """The debootstrapped bookworm root of `arch`, as a tar file (made once, ~4 minutes under emulation)."""
        tar = self.cache / f"{SUITE}-{arch}-base.tar"
        if tar.exists():
            return tar
        root = self.cache / f"{SUITE}-{arch}-debootstrap"
        remove_root(root)
        self.run(["debootstrap", "--foreign", "--variant=minbase", f"--arch={arch}", f"--include={BASE_PACKAGES}",
                  SUITE, str(root), MIRROR], f"{arch}-debootstrap")
        self.chroot(root, "/debootstrap/debootstrap --second-stage", f"{arch}-debootstrap")
        self.chroot(root, "apt-get clean", f"{arch}-debootstrap")
        self.run(["tar", "-C", str(root), "-cf", f"{tar}.part", "."], f"{arch}-debootstrap")
        os.replace(f"{tar}.part", tar)
        remove_root(root)
        return tar

    def fresh(self, arch: str, name: str) -> Path:
        root = self.cache / f"{name}-{arch}"
        remove_root(root)
        root.mkdir(parents=True)
        self.run(["tar", "-C", str(root), "-xf", str(self.base(arch))], f"{arch}-{name}")
        shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")  # pip and apt reach the network
        if self.host_ca is not None:
            shutil.copy(self.host_ca, root / _HOST_CA.lstrip("/"))
        return root

    # -- the gateway bundle -------------------------------------------------------------------------------------

    def wheel(self) -> Path:
        wheel = self.dist / f"citynerve-{version()}-py3-none-any.whl"
        if not wheel.exists():
            raise Failed(f"{wheel} is missing: run make dist first")
        return wheel

    def wheelhouse(self, arch: str, report: dict[str, Any]) -> Path:
        """Every wheel `citynerve[agent]` needs on `arch`: PyPI's where it has one, built here where it has not."""
        wheel = self.wheel()
        root = self.fresh(arch, "wheels")
        shutil.copy(wheel, root / "tmp" / wheel.name)
        want = f"'/tmp/{wheel.name}[agent]'"
        log = f"{arch}-wheelhouse"
        self.chroot(root, "python3 -m venv /opt/pip", log)
        started = time.monotonic()
        got = self.chroot(root, f"/opt/pip/bin/pip download --only-binary=:all: -d /wheels {want}", log, check=False)
        built: list[str] = []
        if got.returncode != 0:
            report["pypi_binary_only"] = _last_error(got.stdout)
            self.chroot(root, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                              f"--no-install-recommends {' '.join(BUILD_PACKAGES)}", log)
            report["build_packages_s"] = round(time.monotonic() - started, 1)
            before = time.monotonic()
            self.chroot(root, f"rm -rf /wheels && /opt/pip/bin/pip wheel -w /wheels {want}", log)
            report["build_wheels_s"] = round(time.monotonic() - before, 1)
            built = [p.name for p in (root / "wheels").iterdir() if p.name.endswith(f"linux_{_machine(arch)}.whl")]
        else:
            report["pypi_binary_only"] = "ok: every wheel from PyPI"
        house = self.dist / f"wheels-{arch}"
        shutil.rmtree(house, ignore_errors=True)
        shutil.copytree(root / "wheels", house)
        shutil.copy(wheel, house / wheel.name)
        report["wheels"] = sorted(p.name for p in house.iterdir())
        report["built_here"] = sorted(built)
        report["wheelhouse_s"] = round(time.monotonic() - started, 1)
        remove_root(root)
        return house

    def bundle(self, arch: str, report: dict[str, Any]) -> Path:
        house = self.wheelhouse(arch, report)
        name = f"citynerve-{version()}-gateway-{arch}"
        tar = self.dist / f"{name}.tar.gz"
        with tarfile.open(f"{tar}.part", "w:gz") as out:
            out.add(house, f"{name}/wheels")
            for part in ("README.md", "LICENSE", "systemd", "examples", "docs/install.md"):
                out.add(ROOT / part, f"{name}/{part}")
        os.replace(f"{tar}.part", tar)
        report["bundle"] = tar.name
        report["bundle_bytes"] = tar.stat().st_size
        return tar

    # -- the proof ----------------------------------------------------------------------------------------------

    def check(self, arch: str, report: dict[str, Any]) -> None:
        from labkit.meter_sim import meter_in_thread, sdm630_values

        tar = self.bundle(arch, report)
        root = self.fresh(arch, "target")
        log = f"{arch}-target"
        facts = self.chroot(root, "uname -m; python3 --version; . /etc/os-release; echo $PRETTY_NAME; "
                                  "command -v cc gcc arm-linux-gnueabihf-gcc aarch64-linux-gnu-gcc || echo no-compiler",
                            log).stdout.splitlines()
        report.update(machine=facts[0], python=facts[1], os=facts[2])
        if facts[-1] != "no-compiler":
            raise Failed(f"the target root has a compiler: {facts[3:]}")
        with tarfile.open(tar) as bundle:
            bundle.extractall(root / "root", filter="data")
        name = tar.name.removesuffix(".tar.gz")
        # docs/install.md, "A Raspberry Pi without a compiler", word for word
        started = time.monotonic()
        self.chroot(root, f"python3 -m venv /opt/citynerve && /opt/citynerve/bin/pip install --no-index "
                          f"--find-links /root/{name}/wheels 'citynerve[agent]'", log)
        report["install_s"] = round(time.monotonic() - started, 1)
        report["installed"] = self.chroot(root, "/opt/citynerve/bin/pip freeze --all", log).stdout.split()
        report["version"] = self.chroot(root, "/opt/citynerve/bin/edge-agent --version", log).stdout.strip()
        with meter_in_thread() as sim:
            (root / "etc" / "citynerve").mkdir(exist_ok=True)
            (root / "etc" / "citynerve" / "agent.toml").write_text(_AGENT_TOML.format(port=sim.port))
            self.chroot(root, "/opt/citynerve/bin/edge-agent check /etc/citynerve/agent.toml", log)
            started = time.monotonic()
            polled = self.chroot(root, "/opt/citynerve/bin/edge-agent poll-once /etc/citynerve/agent.toml", log)
            report["poll_once_s"] = round(time.monotonic() - started, 1)
            served = {round(v, 3) for entry in sim.served for v in sdm630_values(entry).values()}
        readings = [json.loads(line) for line in polled.stdout.splitlines() if line.startswith("{")]
        fields = {k: v for r in readings if r.get("device") == "meter-1" for k, v in r.get("fields", {}).items()}
        if "voltage_l1" not in fields or round(fields["voltage_l1"], 3) not in served:
            raise Failed(f"poll-once did not print what the simulator served: {polled.stdout[-800:]}")
        report["poll_once"] = {k: round(fields[k], 2) for k in ("voltage_l1", "current_l1", "power", "power_total")
                               if k in fields}
        report["poll_once_fields"] = len(fields)
        # The wheels with C in them at work: enroll makes Ed25519/X25519 keys and a CSR (cryptography, which loads
        # cffi's backend); poll-once above decoded through msgspec.
        started = time.monotonic()
        self.chroot(root, "/opt/citynerve/bin/edge-agent enroll --gateway-id gw-arm-check --dir /etc/citynerve/pki",
                    log)
        report["enroll_s"] = round(time.monotonic() - started, 1)
        report["enroll"] = sorted(p.name for p in (root / "etc" / "citynerve" / "pki").iterdir())
        if "tls.csr" not in report["enroll"] or "identity.key" not in report["enroll"]:
            raise Failed(f"edge-agent enroll made {report['enroll']}")
        # The other path: PyPI, binary wheels only (what a Pi gets without a compiler and without the bundle).
        pypi = self.chroot(root, f"python3 -m venv /opt/pypi && /opt/pypi/bin/pip install --only-binary=:all: "
                                 f"'/root/{name}/wheels/{self.wheel().name}[agent]'", f"{log}-pypi", check=False)
        report["pypi_only_binary_install"] = "ok" if pypi.returncode == 0 else _last_error(pypi.stdout)
        remove_root(root)


_AGENT_TOML = """\
[gateway]
id = "gw-arm-check"
state_dir = "/var/lib/citynerve"

[mqtt]  # poll-once publishes nothing
host = "127.0.0.1"
tls = false

[[devices]]
kind = "modbus-tcp"
id = "meter-1"
host = "127.0.0.1"
port = {port}
unit = 1
profile = "eastron_sdm630"
"""


def _machine(arch: str) -> str:
    return {"arm64": "aarch64", "armhf": "armv7l"}[arch]


def _last_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR")]
    return lines[-1] if lines else output.strip().splitlines()[-1] if output.strip() else "failed"


@contextlib.contextmanager
def mounted_proc(root: Path) -> Iterator[None]:
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=False)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def remove_root(root: Path) -> None:
    """rm -rf of an emulated root, never through a mount point (a /proc or a bind mount left behind)."""
    if not root.exists():
        return
    for point in sorted(mounts_under(root), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    if mounts_under(root):
        raise Failed(f"{root}: still has mounts {mounts_under(root)}; not removing it")
    shutil.rmtree(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.arm", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["bundle", "check"])
    parser.add_argument("--arch", action="append", choices=sorted(QEMU), help="repeatable (default: both)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("ARM_CACHE", "/var/tmp/citynerve-arm")))
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("labkit.arm needs root (debootstrap, chroot, mount)", file=sys.stderr)
        return 2
    lab = Lab(args.cache, args.dist)
    results: dict[str, Any] = {"host": platform.machine(), "citynerve": version(), "suite": SUITE, "arch": {}}
    failed = False
    for arch in args.arch or ["arm64", "armhf"]:
        report: dict[str, Any] = {}
        results["arch"][arch] = report
        started = time.monotonic()
        try:
            lab.binfmt(arch)
            base_started = time.monotonic()
            lab.base(arch)
            report["base_s"] = round(time.monotonic() - base_started, 1)
            if args.action == "bundle":
                lab.bundle(arch, report)
            else:
                lab.check(arch, report)
            report["result"] = "ok"
        except (Failed, subprocess.TimeoutExpired, OSError) as exc:
            report["result"] = f"failed: {exc}"
            failed = True
        report["total_s"] = round(time.monotonic() - started, 1)
        print(f"{arch}: {report['result']} in {report['total_s']} s", flush=True)
    out = args.dist / f"arm-{args.action}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"details: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
