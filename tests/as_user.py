"""Run the ``shmkey`` command as another user, as ``setpriv --reuid U --regid G
--clear-groups`` would (or ``--groups``): ``python -m tests.as_user USER
GROUP[,GROUP...] -- ARGS...``, the first group the primary one, the rest
supplementary.

Why not setpriv itself: the interpreter running the tests may live where the
other user cannot read it (a pyenv under root's 0700 home), so that user's
python would be another one. This runs as root, imports what the commands
load, then drops to the user for good (groups, gid, uid) and only then runs
the command: a real process of that uid, as setpriv makes.
"""
from __future__ import annotations

import grp
import importlib
import os
import pkgutil
import pwd
import sys

import cryptography.hazmat
import shmkey


def _preload() -> None:
    """Import every module of shmkey and of cryptography's hazmat (and the
    codecs and helpers they load on demand) while root can still read them."""
    for package in (shmkey, cryptography.hazmat):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith(".__main__"):
                continue        # it would run the command
            try:
                importlib.import_module(info.name)
            except ImportError:
                pass            # optional extras (prometheus-client, ...)
    for name in ("encodings.idna", "encodings.latin_1", "getpass"):
        importlib.import_module(name)


def main(argv: list[str]) -> int:
    """Become user ``argv[0]`` with groups ``argv[1]`` and run ``shmkey
    argv[3:]`` (``argv[2]`` is ``--``); its exit status."""
    _preload()
    from shmkey import cli

    user, group, sep, *args = argv
    assert sep == "--", argv
    uid = pwd.getpwnam(user).pw_uid
    gid, *extra = (grp.getgrnam(g).gr_gid for g in group.split(","))
    os.setgroups(extra)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
