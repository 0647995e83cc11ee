"""PKCS#11 URIs (RFC 7512) as key sources: parsing with the offending part
named, the PIN taken out (``pin-value`` or ``pin-source=file:``), and a
redacted form for logs and errors. No PKCS#11 library is loaded here, so
the launcher and the command line may use it too.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import quote

from .errors import ConfigError

SCHEME = "pkcs11:"
#: Path attributes shmkey matches a token and a key by (RFC 7512 2.3).
PATH_ATTRS = ("token", "manufacturer", "serial", "model", "slot-id", "slot-description",
              "slot-manufacturer", "object", "id", "type")
#: Query attributes shmkey reads.
QUERY_ATTRS = ("module-path", "pin-value", "pin-source")
#: RFC 7512 attributes shmkey does not offer: named, so the error can say so.
_UNOFFERED = ("library-manufacturer", "library-description", "library-version", "module-name")
_PIN_MAX = 256


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed key URI; ``path`` and ``query`` hold percent-decoded values
    (``id`` as bytes in :attr:`key_id`), the PIN only in ``query``."""

    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    key_id: Optional[bytes] = None
    slot_id: Optional[int] = None

    def redacted(self) -> str:
        """The URI with any ``pin-value`` replaced by ``***``: for logs and errors."""
        return unparse(self, hide_pin=True)


def is_uri(source: str) -> bool:
    """True if a key source is a PKCS#11 URI rather than a file path."""
    return source[:len(SCHEME)].lower() == SCHEME


def _decode(raw: str, attr: str, uri_shown: str) -> bytes:
    """Percent-decode one value strictly; a bad escape names the attribute."""
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
                at = "" if attr == "pin-value" else f" (at '%{pair}')"
                raise ConfigError(f"PKCS#11 URI {uri_shown}: bad percent-encoding in "
                                  f"attribute {attr!r}{at}")
            out.append(int(pair, 16))
            i += 3
        else:
            out += ch.encode()
            i += 1
    return bytes(out)


def _split(part: str, sep: str, allowed: tuple[str, ...], where: str,
           uri_shown: str) -> dict[str, bytes]:
    values: dict[str, bytes] = {}
    for item in part.split(sep) if part else []:
        name, eq, raw = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            what = repr(item) if where == "path" else "an item"    # the query may hold the PIN
            raise ConfigError(f"PKCS#11 URI {uri_shown}: {what} in the {where} part is not "
                              "attribute=value")
        if name in values:
            raise ConfigError(f"PKCS#11 URI {uri_shown}: attribute {name!r} is given twice")
        if name in _UNOFFERED:
            raise ConfigError(f"PKCS#11 URI {uri_shown}: attribute {name!r} is not supported "
                              "(name the module with module-path=)")
        if name not in allowed:
            if name.startswith("x-"):
                continue            # vendor attributes (RFC 7512 2.3) do not concern us
            other = "query" if where == "path" else "path"
            misplaced = name in (QUERY_ATTRS if where == "path" else PATH_ATTRS)
            hint = f" (it belongs in the {other} part)" if misplaced else ""
            raise ConfigError(f"PKCS#11 URI {uri_shown}: unknown {where} attribute {name!r}{hint}")
        values[name] = _decode(raw, name, uri_shown)
    return values


def parse(uri: str) -> Pkcs11Uri:
    """Parse a key URI such as
    ``pkcs11:token=web;object=tls?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin``.

    Raises:
        ConfigError: not a ``pkcs11:`` URI, an unknown or repeated attribute,
            bad percent-encoding, a ``type`` other than ``private``, a
            non-numeric ``slot-id``, both PIN attributes, or nothing naming a key.
            The message names the offending part and never contains the PIN.
    """
    if not is_uri(uri):
        raise ConfigError(f"{uri!r} is not a PKCS#11 URI (it must start with 'pkcs11:')")
    body = uri[len(SCHEME):]
    path_part, _, query_part = body.partition("?")
    shown = _shown(path_part, query_part)
    raw_path = _split(path_part, ";", PATH_ATTRS, "path", shown)
    raw_query = _split(query_part, "&", QUERY_ATTRS, "query", shown)
    key_id = raw_path.pop("id", None)
    try:
        path = {k: v.decode() for k, v in raw_path.items()}
        query = {k: v.decode() for k, v in raw_query.items()}
    except UnicodeDecodeError:
        raise ConfigError(f"PKCS#11 URI {shown}: an attribute is not UTF-8 "
                          "(only id= may hold raw bytes)") from None
    if path.get("type", "private") != "private":
        raise ConfigError(f"PKCS#11 URI {shown}: type={path['type']!r}; a key source "
                          "names a private key (type=private, or no type)")
    slot_id = None
    if "slot-id" in path:
        if not path["slot-id"].isdigit():
            raise ConfigError(f"PKCS#11 URI {shown}: slot-id={path['slot-id']!r} is not a number")
        slot_id = int(path["slot-id"])
    if "pin-value" in query and "pin-source" in query:
        raise ConfigError(f"PKCS#11 URI {shown}: give pin-value or pin-source, not both")
    if "object" not in path and key_id is None:
        raise ConfigError(f"PKCS#11 URI {shown}: name the key with object= (its label) or id=")
    if "pin-source" in query and not query["pin-source"].startswith("file:"):
        raise ConfigError(f"PKCS#11 URI {shown}: pin-source must be a file: URI "
                          f"(got {query['pin-source'].split(':', 1)[0]!r})")
    return Pkcs11Uri(path, query, key_id, slot_id)


def _shown(path_part: str, query_part: str) -> str:
    """The URI as written for messages: query values other than the module and
    the PIN file are hidden, since one of them may be the PIN."""
    path = ";".join("pin-value=***" if i.strip().lower().startswith("pin-value") else i
                    for i in path_part.split(";"))
    items = []
    for item in query_part.split("&") if query_part else []:
        name, eq, _ = item.partition("=")
        keep = eq and name.strip().lower() in ("module-path", "pin-source")
        items.append(item if keep else f"{name}=***" if eq else "***")
    return f"'{SCHEME}{path}" + ("?" + "&".join(items) if items else "") + "'"


def unparse(uri: Pkcs11Uri, hide_pin: bool = False, drop_pin: bool = False) -> str:
    """The URI back as text, values percent-encoded where RFC 7512 needs it."""
    def enc(value: bytes) -> str:
        return quote(value, safe="-._~:/@")

    path = [f"{k}={enc(v.encode())}" for k, v in uri.path.items()]
    if uri.key_id is not None:
        path.append("id=" + "".join(f"%{b:02x}" for b in uri.key_id))
    query = []
    for k, v in uri.query.items():
        if k == "pin-value":
            if drop_pin:
                continue
            query.append("pin-value=***" if hide_pin else f"pin-value={enc(v.encode())}")
        else:
            query.append(f"{k}={enc(v.encode())}")
    return SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")


def without_pin(source: str) -> tuple[str, Optional[str]]:
    """(the URI without its ``pin-value``, that PIN or None); file paths pass unchanged.

    For callers that start an oracle: the PIN then travels over a pipe,
    never on a command line.
    """
    if not is_uri(source):
        return source, None
    uri = parse(source)
    pin = uri.query.get("pin-value")
    return (unparse(uri, drop_pin=True), pin) if pin is not None else (source, None)


def with_pin(source: str, pin: str) -> str:
    """The URI with ``pin-value`` set (in memory only)."""
    uri = parse(source)
    return unparse(Pkcs11Uri(uri.path, {**uri.query, "pin-value": pin}, uri.key_id, uri.slot_id))


def read_pin(uri: Pkcs11Uri) -> Optional[bytes]:
    """The PIN: ``pin-value``, or the first line of the ``pin-source`` file.

    The file must be a regular file (not a symlink) owned by this process's
    user or root and not readable or writable by group or others, as ssh
    demands of a private key file.

    Raises:
        ConfigError: the file is missing, of the wrong kind, owner or mode, or empty.
    """
    if "pin-value" in uri.query:
        return uri.query["pin-value"].encode()
    source = uri.query.get("pin-source")
    if source is None:
        return None
    path = source[len("file:"):]
    if path.startswith("//"):           # file:///etc/pin
        path = path[2:]
        if not path.startswith("/"):
            raise ConfigError(f"pin-source {source!r}: only local files (file:/path) are supported")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot open the PIN file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the PIN file {path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(f"the PIN file {path} belongs to uid {st.st_uid}; it must "
                              f"belong to the oracle's user (uid {os.geteuid()}) or root")
        if st.st_mode & 0o077:
            raise ConfigError(f"the PIN file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                              "group and others must have no access (chmod 600)")
        raw = os.read(fd, _PIN_MAX + 2)
    finally:
        os.close(fd)
    pin = raw.split(b"\n", 1)[0].rstrip(b"\r")
    if not pin or len(pin) > _PIN_MAX:
        raise ConfigError(f"the PIN file {path} holds no PIN on its first line")
    return pin


def hide_pins_in_cmdline() -> bool:
    """Overwrite every ``pin-value=`` in this process's command line (what
    ``ps`` and ``/proc/PID/cmdline`` show) with asterisks of the same length.

    It closes the window only from now on: from exec until this call, the PIN
    was readable by every local user, which is why ``pin-source`` is the way.

    Returns:
        True if something was hidden.
    """
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # proc(5): arg_start and arg_end are fields 48 and 49; fields[0] is field 3.
    start, end = int(fields[45]), int(fields[46])
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        raw = mem.read(end - start)
        hidden = re.sub(rb"(?i)(pin-value=)([^&\x00]*)",
                        lambda m: m.group(1) + b"*" * len(m.group(2)), raw)
        if hidden == raw:
            return False
        mem.seek(start)
        mem.write(hidden)
    return True
