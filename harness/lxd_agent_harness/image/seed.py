"""A NoCloud seed that installs the project's .deb into a cloud image at first boot.

The seed is an ISO 9660 image with volume label `cidata` holding `user-data` and `meta-data`,
built without root by `pycdlib`. The user-data carries the .deb itself (base64 in `write_files`,
so no network and no second disk is needed) and installs it in `runcmd`; the package's postinst
replays the udev "add" event, which starts the agent in the running guest.

Host side only. It writes the seed file it is given a path for and nothing else; it never boots
anything (that is `vm.instance`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pycdlib

from lxd_agent_harness.base.errors import HarnessError
from lxd_agent_harness.image.deb import DEB_PACKAGE

SEED_LABEL = "cidata"
SEED_DIR = "/var/lib/lxd-agent-seed"
# Printed on the serial console by the seed's runcmd, so the harness can tell the install ran.
INSTALLED_MARKER = "lxd-agent-seed: installed"
FAILED_MARKER = "lxd-agent-seed: install failed"


class SeedError(HarnessError):
    """The NoCloud seed could not be made."""


def user_data(deb: Path) -> str:
    """A `#cloud-config` document that writes `deb` into the guest and installs it."""
    try:
        payload = deb.read_bytes()
    except OSError as e:
        raise SeedError(
            f"tried to read the package {deb} for the seed: {e.strerror}; "
            "pass an existing --deb (in a clone of the project, `make deb` makes one)"
        ) from None
    target = f"{SEED_DIR}/{deb.name}"
    # dpkg first: it needs no network when the dependencies are in the image already; apt
    # fetches what is missing otherwise (a stock cloud image may lack python3-systemd).
    install = (
        f"dpkg -i {target} || {{ apt-get update && apt-get install -y -f; }} "
        f"&& dpkg-query -W -f='${{Status}}' {DEB_PACKAGE} | grep -q 'ok installed' "
        f"&& echo '{INSTALLED_MARKER}' > /dev/console "
        f"|| {{ echo '{FAILED_MARKER}' > /dev/console; exit 1; }}"
    )
    config = {
        "write_files": [
            {
                "path": target,
                "encoding": "b64",
                "content": base64.b64encode(payload).decode("ascii"),
                "permissions": "0644",
            }
        ],
        "runcmd": [["sh", "-c", install]],
    }
    # JSON is YAML, so cloud-init reads it as it is; no YAML library on the host.
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


def meta_data(deb: Path) -> str:
    # A new instance-id for every package makes cloud-init run the user-data again.
    instance = hashlib.sha256(deb.read_bytes()).hexdigest()[:12]
    return f"instance-id: lxd-agent-{instance}\nlocal-hostname: lxd-agent-guest\n"


def make_seed_iso(deb: Path, path: Path) -> Path:
    """Write the NoCloud seed ISO for `deb` to `path` and return `path`."""
    files = {"user-data": user_data(deb), "meta-data": meta_data(deb)}
    iso = pycdlib.PyCdlib()
    # Rock Ridge and Joliet carry the real names; ISO 9660 level 3 needs 8.3-style ones too.
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_LABEL)
    buffers = []
    try:
        for name, text in files.items():
            data = text.encode()
            buffer = io.BytesIO(data)
            buffers.append(buffer)
            short = name.replace("-", "").upper()
            iso.add_fp(buffer, len(data), f"/{short}.;1", rr_name=name, joliet_path=f"/{name}")
        partial = path.with_name(path.name + ".partial")
        iso.write(str(partial))
        partial.replace(path)
    except (OSError, pycdlib.pycdlibexception.PyCdlibException) as e:
        raise SeedError(f"could not write the NoCloud seed {path}: {e}") from None
    finally:
        iso.close()
    return path
