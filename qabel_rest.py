"""qabel_rest: the local REST server of the Qabel desktop client.

Every local program reads and changes the client's two settings documents through
it: GET/PUT/POST/PATCH /settings and /synced, GET /events (the change feed), and
GET /health. Built on http.server (ThreadingHTTPServer, BaseHTTPRequestHandler).

    python qabel_rest.py --port 9696 --data-dir ~/.config/qabel-rest

    server = qabel_rest.make_server(data_dir=path, api_key=key, port=9696)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.settings.put("poll_interval", 10)
    server.shutdown(); server.server_close()

The documents hold private keys, so every request must name an allowed Host, carry
no foreign Origin and present the API key (except GET /health); no CORS header is
ever sent, and errors and logs never contain the key or a settings value.
"""

import collections
import contextlib
import copy
import email.errors
import errno
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import math
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
import unicodedata
import urllib.parse
from http import HTTPStatus
from types import MappingProxyType

try:  # POSIX: advisory lock released by the OS when the process dies
    import fcntl
except ImportError:  # Windows
    fcntl = None

__version__ = "1.1.0"
__all__ = ["QabelRestError", "StartupError", "InvalidKey", "InvalidValue", "DocumentUnavailable",
           "SaveError", "DocumentChanged", "PreconditionFailed", "CursorGone", "SettingsDocument",
           "QabelRestServer", "RequestHandler", "make_server", "main"]


def _logger():
    """The logger "qabel_rest"; logging (and hmac) are imported only when needed."""
    import logging
    return logging.getLogger("qabel_rest")


def _one_line(text):  # for a terminal or a log: a path or a name in a file may hold "\n", ESC
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# --- Constants and schema -----------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9696  # the port of the Qabel spec
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: a synced document with many identities fits
DEFAULT_IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may wait for a request
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds for one whole request, first byte to last
DEFAULT_MAX_CONNECTIONS = 512  # pooling clients (Node's fetch, aiohttp) hold 2 sockets per request
SHUTDOWN_GRACE = 5.0  # seconds server_close() waits for requests in flight

MAX_DEPTH = 64  # how deep a value may nest: far below Python's recursion limit
MAX_KEY_LENGTH = 4096  # characters of a key (a path, not data: events hold it)
_INT64_MAX = (1 << 63) - 1
_MAX_INT_TEXT = 20  # digits and sign of a 64-bit integer: int() never sees more
_MISSING = object()  # a value not given, unlike None (JSON null)

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_OWS = " \t"  # the white space around HTTP header values (RFC 9110 5.6.3); not str.strip's
# A Host header value (RFC 9110 7.2): a name or a bracketed IPv6 literal, then :port
_HOST = re.compile(r"(\[[^\]]+\]|(?!\[)[^:]*)(?::[0-9]*)?")  # RFC 3986 3.2.3: a port may be empty
# An absolute http(s) URL (RFC 3986, 3987), the same on every Python (urlsplit's checks are not)
_URL = (r"(?ai:https?)://(?P<authority>(?:[^\s/?#@\[\]\\]*@)?"  # compiled (0.5 ms) when first used
        r"(?:(?:[A-Za-z0-9\-._~!$&'()*+,;=%]|[^\x00-\x7f])+|\[(?P<ip>[0-9A-Fa-f:.]+)\]))"
        r"(?::(?P<port>[0-9]{0,5}))?(?:[/?#]\S*)?")
# Nor controls, spaces, invisible formats (zero width, bidi, BOM, tags), surrogates, private use
_UNSEEN = (r"[\s\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff"
           r"\ud800-\uf8ff\ufdd0-\ufdef\ufff9-\ufffb\ufffe\uffff\U00013430-\U0001343f"
           r"\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e007f\U000f0000-\U0010ffff]")
_ENV_DATA_DIR, _ENV_API_KEY = "QABEL_REST_DATA_DIR", "QABEL_REST_API_KEY"
_KEY_FILE, _LOCK_FILE = "api-key", "qabel_rest.lock"
_LOCAL_FILE, _SYNCED_FILE = "settings.json", "synced.json"
_FILE_MODE, _DIR_MODE = 0o600, 0o700

# The Qabel "Client Configuration" schema. A node is a leaf name (of _LEAVES), "any" (any JSON),
# an _Obj (declared fields only), a _List (unique item ids) or a _Map (any names, one kind of item).
_Obj = collections.namedtuple("_Obj", "fields required")
_List = collections.namedtuple("_List", "item")
_Map = collections.namedtuple("_Map", "item")


def _is_url(value):  # fixed ranges: str.isprintable() follows each Python's Unicode version
    match = type(value) is str and not re.search(_UNSEEN, value) and re.fullmatch(_URL, value)
    try:  # NFKC, as IDNA applies it, must not make a delimiter of "\uff20" (CVE-2019-9636)
        return (bool(match) and int(match["port"] or 0) <= 0xFFFF
                and not re.search(r"[/?#@:\[\]]", unicodedata.normalize(
                    "NFKC", re.sub(r"[\x00-\x7f]", "", match["authority"])))
                and (match["ip"] is None or ipaddress.IPv6Address(match["ip"]) is not None))
    except ValueError:  # not an IPv6 address
        return False


_COUNT = ("an integer >= 0", lambda v: type(v) is int and 0 <= v <= _INT64_MAX,
          {"type": "integer", "minimum": 0, "maximum": _INT64_MAX,
           "description": "written without a fraction or exponent: 1, not 1.0"})
_LEAVES = MappingProxyType({  # leaf -> (what it must be, for errors; its check; its JSON Schema)
    "id": _COUNT,
    "time": (f"{_COUNT[0]} (seconds since the epoch)", *_COUNT[1:]),
    "interval": ("a number > 0", lambda v: type(v) in (int, float) and v > 0,
                 {"type": "number", "exclusiveMinimum": 0,
                  "description": "an integer within 64 bits, or a finite fraction"}),
    "str": ("a string", lambda v: type(v) is str, {"type": "string"}),
    "bool": ("true or false", lambda v: type(v) is bool, {"type": "boolean"}),
    "url": ("an absolute http or https URL", _is_url,
            {"type": "string", "description": "an absolute http(s) URL"}),  # "format" claims more
    "name": ("a non-empty string", lambda v: type(v) is str and v != "",
             {"type": "string", "minLength": 1}),
})


def _obj(*required, **fields):
    """An object node: the fields declared (in order), and which of them are required."""
    return _Obj(MappingProxyType(fields), frozenset(required))


def _item(**fields):
    """An item of a synced list: id (required, unique), time stamps, and fields."""
    return _obj("id", id="id", updated="time", created="time", deleted="time", **fields)


_ANY_OBJECT = _Map("any")
_MODULE_DATA = _Map(_ANY_OBJECT)  # module name -> object, anything JSON inside
_KEY_NAMES = ("private_primary_key", "public_primary_key", "private_enc_key",
              "public_enc_key", "private_sign_key", "public_sign_key")

LOCAL_SCHEMA = _obj(poll_interval="interval", drop_last_update="str", module_data=_MODULE_DATA)

SYNCED_SCHEMA = _obj(
    accounts=_List(_item(provider="str", user="str", auth="str")),
    drop_servers=_List(_item(url="url", auth="str", active="bool")),
    storage_servers=_List(_item(url="url", auth="str")),
    storage_volumes=_List(_item(storage_server_id="id", public_identifier="str", token="str",
                                revoke_token="str")),
    identities=_List(_item(alias="name", keys=_obj(**dict.fromkeys(_KEY_NAMES, "str")),
                           drops=_List("url"))),
    module_data=_MODULE_DATA)

# The documents of a fresh data dir (text: immutable); a stored one gets missing fields here.
LOCAL_DEFAULTS = '{"poll_interval": 30, "drop_last_update": "", "module_data": {}}'
SYNCED_DEFAULTS = ('{"accounts": [], "drop_servers": [], "storage_servers": [],'
                   ' "storage_volumes": [], "identities": [], "module_data": {}}')


# --- Errors -------------------------------------------------------------------

class QabelRestError(Exception):
    """Base of every error this module raises; `status` is its HTTP answer."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message, status=None):
        super().__init__(message)
        self.message, self.status = message, HTTPStatus(status or self.status)


class StartupError(QabelRestError):
    """The server cannot start: port taken, data dir or a document unusable."""


class InvalidKey(QabelRestError):
    """The key is not valid for the document (the Qabel spec answers 405)."""

    status = HTTPStatus.METHOD_NOT_ALLOWED


class InvalidValue(QabelRestError):
    """The value or document is not valid (the Qabel spec answers 400)."""

    status = HTTPStatus.BAD_REQUEST


class DocumentUnavailable(QabelRestError):
    """The document file is invalid on disk, or the server is closing: 503."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class SaveError(QabelRestError):
    """Saving failed; nothing was changed, in memory or on disk."""


class PreconditionFailed(QabelRestError):
    """If-Match names no tag the document has now, or If-None-Match is *: 412 (RFC 9110 13.1)."""

    status = HTTPStatus.PRECONDITION_FAILED


class DocumentChanged(QabelRestError):
    """Another program kept rewriting the file during a save of this change: 409."""

    status = HTTPStatus.CONFLICT


class _HTTPError(QabelRestError):
    """An answer of the request path: status, extra headers, and whether to close."""

    def __init__(self, status, message, headers=(), close=False):
        super().__init__(message, status)
        self.headers, self.close = headers, close


class _Malformed(_HTTPError):
    """A request whose framing cannot be trusted: answered, then the connection closes."""

    def __init__(self, message, status=HTTPStatus.BAD_REQUEST):
        super().__init__(status, message, close=True)


class _NotJSON(ValueError):
    """The text does not parse as JSON (RFC 8259)."""


@contextlib.contextmanager
def _startup_error(what, path):
    """Turn an OSError in the block into StartupError("what: its reason (path)")."""
    try:
        yield
    except OSError as exc:
        raise StartupError(f"{what}: {exc.strerror} ({path})") from None


# --- JSON and dotted keys -----------------------------------------------------

def _is_digits(text):  # str.isdigit alone also takes other scripts' digits
    return text.isascii() and text.isdigit()


def _reject_constant(name):
    raise _NotJSON(f"{name} is not JSON")


class _Unfit(InvalidValue):
    """In place of a JSON value no document may hold: validate refuses it, after the key."""

    def refuse(self):  # as json.dumps(default=_Unfit.refuse) calls it
        raise self


def _build_object(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):  # each name given twice holds what no document may
        counts = collections.Counter(name for name, _ in pairs)
        result.update((name, _Unfit("a name appears twice")) for name, n in counts.items() if n > 1)
    return result


# Shared by every thread. Compact: with indent, json runs its slow Python encoder.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(  # 1e400 is inf, a longer integer 2**63: validate refuses both
    object_pairs_hook=_build_object, parse_constant=_reject_constant,
    parse_int=lambda text: int(text) if len(text) <= _MAX_INT_TEXT else _INT64_MAX + 1)


def _parse_json(data):
    """Strict JSON of UTF-8 bytes or text, else _NotJSON; an _Unfit for what no document holds."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _NotJSON(f"not UTF-8 (byte {exc.start})") from None
    if data.startswith("\ufeff"):
        raise _NotJSON("starts with a byte order mark")
    try:
        return _DECODER.decode(data)
    except json.JSONDecodeError as exc:  # its message never quotes the text
        raise _NotJSON(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise InvalidValue(f"nested deeper than {MAX_DEPTH} levels") from None


def _dump_document(document):  # the bytes of a JSON value, as served and stored
    return _ENCODER.encode(document).encode("utf-8")


def parse_key(key):
    """The segments of a dotted key (`\\.` a dot, `\\\\` a backslash) or a list; else InvalidKey."""
    if type(key) not in (str, list, tuple):
        raise InvalidKey("the key must be a string or a list of strings")
    if not key:
        raise InvalidKey("the key is empty")
    if type(key) is str:
        segments = key.split(".") if "\\" not in key else _split_escaped(key)
    elif all(type(s) is str or type(s) is int and 0 <= s <= _INT64_MAX for s in key):
        segments = [str(segment) for segment in key]
    else:
        raise InvalidKey("key segments must be strings or 64-bit integers >= 0")
    if len(segments) > MAX_DEPTH:
        raise InvalidKey(f"the key is deeper than {MAX_DEPTH} levels")
    if len(format_key(segments)) > MAX_KEY_LENGTH:  # as given, or a list's dotted form
        raise InvalidKey(f"the key is longer than {MAX_KEY_LENGTH} characters")
    for segment in segments:
        if segment == "":
            raise InvalidKey("the key has an empty segment")
        if not _is_text(segment):
            raise InvalidKey("the key is not valid Unicode")
    return tuple(segments)


def _split_escaped(text):
    segments = [""]
    for token in re.findall(r"\\.?|\.|[^\\.]+", text):  # an escape, a dot, or text
        if token == ".":
            segments.append("")
        elif token[0] == "\\" and token not in ("\\.", "\\\\"):
            raise InvalidKey("the key has a backslash not followed by . or \\")
        else:
            segments[-1] += token.removeprefix("\\")
    return segments


def format_key(segments):
    """The dotted form of a tuple of segments, escaping dots and backslashes."""
    return ".".join(s.replace("\\", "\\\\").replace(".", "\\.") for s in segments) or "(document)"


def _list_index(items, segment, path):
    """The index of the item segment names, else InvalidKey (int() refuses over 4,300 digits)."""
    if (_is_digits(segment) and (segment == "0" or segment[0] != "0")
            and len(segment) <= len(str(len(items))) and int(segment) < len(items)):
        return int(segment)
    raise InvalidKey(f"{format_key(path)}: no such list item")


# --- Validation ---------------------------------------------------------------

def _is_text(text):
    """True if text is valid Unicode: no lone surrogates, so it encodes as UTF-8."""
    return text.isascii() or re.search("[\ud800-\udfff]", text) is None


def validate(value, node, path=(), partial=False):
    """Raise InvalidValue unless value is strict (UTF-8) JSON that fits the schema node at path;
    partial: a value to merge, whose objects may lack required fields (the target has them)."""
    kind = type(value)
    if kind is dict or kind is list:
        if len(path) >= MAX_DEPTH:
            raise InvalidValue(f"{format_key(path)}: nested deeper than {MAX_DEPTH} levels")
        if node == "any":
            node = _ANY_OBJECT if kind is dict else _List("any")
    elif kind is str and not _is_text(value):
        raise InvalidValue(f"{format_key(path)}: a string is not valid Unicode")
    elif kind is int and not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise InvalidValue(f"{format_key(path)}: an integer is out of the 64-bit range")
    elif kind is float and not math.isfinite(value):
        raise InvalidValue(f"{format_key(path)}: a number is out of range, or not finite")
    elif kind not in (str, int, float, bool, type(None)):
        reason = value.message if kind is _Unfit else "not a JSON value"
        raise InvalidValue(f"{format_key(path)}: {reason}")
    if type(node) is str:  # a leaf, or "any" (a scalar: any will do)
        if node != "any" and not _LEAVES[node][1](value):
            raise InvalidValue(f"{format_key(path)}: must be {_LEAVES[node][0]}")
    elif type(node) is _List:
        if kind is not list:
            raise InvalidValue(f"{format_key(path)}: must be a list")
        for index, item in enumerate(value):
            validate(item, node.item, path + (str(index),))
        _check_ids(value, node, path)
    else:  # _Obj or _Map
        if kind is not dict:
            raise InvalidValue(f"{format_key(path)}: must be an object")
        fields = node.fields if type(node) is _Obj else None
        for name, item in value.items():
            if type(name) is not str or not _is_text(name):
                raise InvalidValue(f"{format_key(path)}: object keys must be valid Unicode strings")
            if fields is not None and name not in fields:
                raise InvalidValue(f"{format_key(path + (name,))}: unknown field")
            validate(item, node.item if fields is None else fields[name], path + (name,), partial)
        for name in sorted(node.required - value.keys()) if fields and not partial else ():
            raise InvalidValue(f"{format_key(path + (name,))}: required field is missing")


def _json_copy(value):
    """A deep copy of a value to store; an _Unfit if it cannot be copied: not JSON."""
    try:  # anything JSON can be; the rest is judged after the key, as over HTTP
        return copy.deepcopy(value)
    except Exception:  # an object of its own, or nesting deeper than copying can go
        return _Unfit("the value is not JSON")


def _check_ids(items, node, path, only=None):
    """Ids unique within a list of items that have them; with only, just that item's."""
    if not (type(node.item) is _Obj and "id" in node.item.fields):
        return
    seen = {}
    for index, item in enumerate(items):
        if item["id"] in seen and only in (None, index, seen[item["id"]]):
            raise InvalidValue(f"{format_key(path + (str(index), 'id'))}: duplicate id")
        seen[item["id"]] = index


def _child_node(node, segment, path, last):
    """The schema node below node at segment (last: of the key); InvalidKey if there is none."""
    if type(node) is _Obj:
        if segment not in node.fields:
            raise InvalidKey(f"{format_key(path)}: unknown field")
        return node.fields[segment]
    if type(node) is _List and (segment != "-" or not last):  # no list has this index: 405
        _list_index(range(sys.maxsize), segment, path)
    if type(node) in (_List, _Map):
        return node.item
    if node == "any":
        return "any"
    raise InvalidKey(f"{format_key(path[:-1])}: cannot go below a scalar value")  # a leaf


def _node_at(node, path):
    """The schema node at a key; InvalidKey where the schema has none."""
    for depth, segment in enumerate(path):
        node = _child_node(node, segment, path[:depth + 1], depth == len(path) - 1)
    return node


def _same(a, b):
    """The same JSON (Python's == takes 1 for True, 0.0 for -0.0); shared parts at once."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(value, b[name]) for name, value in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b and (type(a) is not float or math.copysign(1, a) == math.copysign(1, b))


def _merge_patch(target, patch, null_removes=True):
    """RFC 7396 merge patch; with null_removes false, null is a value: the deep merge of a PUT."""
    if type(patch) is not dict:
        return patch
    result = dict(target) if type(target) is dict else {}
    for name, value in patch.items():
        if value is None and null_removes:
            result.pop(name, None)
        else:
            result[name] = _merge_patch(result.get(name), value, null_removes)
    return result


def _assign(node_value, node, path, depth, value, merge, ids=True):
    """(a copy of node_value with value set at path[depth:], the stored value, the event's
    key: an append "-" as the index it got). Only containers on the path are copied and
    only the new value (and, if ids, the ids of its list) validated: the rest is shared."""
    segment, here = path[depth], path[:depth + 1]  # and the key up to it
    last = depth == len(path) - 1
    child = _child_node(node, segment, here, last)
    result = copy.copy(node_value)  # a dict or list (a scalar is refused below): a shallow copy
    if type(node_value) is dict:
        slot, old = segment, node_value.get(segment, _MISSING)
    elif type(node_value) is list:
        if segment == "-" and last:  # an append
            slot, old = len(result), _MISSING
            result.append(None)
        else:
            slot = _list_index(node_value, segment, here)
            old = node_value[slot]
    else:
        raise InvalidKey(f"{format_key(path[:depth])}: cannot go below a scalar value")
    if last:
        if value is _MISSING:
            raise InvalidValue("the value is missing")
        if type(merge) is not bool:  # judged after the key, as the value is
            raise InvalidValue("merge must be true or false")
        if merge:  # (in process, a value may hold itself: merging it would never end)
            validate(value, "any", here)
            value = _merge_patch(old, value, null_removes=False)
        validate(value, child, here)
        result[slot] = stored = value
        key = [*path[:depth], str(slot)]
    else:
        if old is _MISSING:  # a missing container on the way is created
            old = [] if type(child) is _List else {}
        result[slot], stored, key = _assign(old, child, path, depth + 1, value, merge, ids)
    if type(node) is _List and ids:
        _check_ids(result, node, path[:depth], only=slot)
    return result, stored, key


def _lookup(value, path):
    for depth, segment in enumerate(path):
        if type(value) is list:
            value = value[_list_index(value, segment, path[:depth + 1])]
        elif type(value) is dict and segment in value:
            value = value[segment]
        else:
            raise InvalidKey(f"{format_key(path[:depth + 1])}: no such key")
    return value


# --- Storage: atomic, durable files -------------------------------------------

_REPLACE_ATTEMPTS = 6  # Windows: a virus scanner may hold the file for a moment;
_REPLACE_BACKOFF = 0.01  # seconds, doubled each attempt (0.31 s in all)
_REBASE_ATTEMPTS = 3  # a file rewritten under us this often in one save: 409
_WAKE_EVERY = 0.5  # seconds a queued writer waits before it looks again (its turn may be lost)
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))  # 507


@contextlib.contextmanager
def _synced_dir(path):
    """Open the directory of path by name (before any change), yield it, fsync it after the block:
    a rename or unlink in it is durable then. Not on Windows: it cannot open one (NTFS journals)."""
    directory = os.path.dirname(os.path.abspath(path))  # of a bare name too (dirname: "")
    fd = os.open(directory, os.O_RDONLY) if os.name == "posix" else None
    try:
        yield directory
        if fd is not None:
            os.fsync(fd)
    finally:
        if fd is not None:
            os.close(fd)


def _replace_file(source, target, check=lambda name: None):
    """os.replace, retried on PermissionError (a Windows sharing violation clears); on Linux a
    swap, so that check(source) sees what it took out (a rewrite since the last check: put back)."""
    swapped = missing = False  # renamed instead: another OS (macOS's renamex_np untried), no
    with contextlib.suppress(ImportError, AttributeError, OSError):  # ctypes, glibc < 2.28, -1: no
        import ctypes  # file there, an old kernel or a file system without it (EINVAL)
        swapped = sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).renameat2(
            -100, os.fsencode(source), -100, os.fsencode(target), 2) == 0  # AT_FDCWD, EXCHANGE
        missing = not swapped and ctypes.get_errno() == errno.ENOENT
    if missing:  # a file deleted since the last check is a change too: never undone unseen
        check(target)
    if swapped:
        try:
            check(source)
        except BaseException:
            os.replace(source, target)  # back, durably: the error skips atomic_write's fsync
            with _synced_dir(target):
                pass
            raise
        return os.unlink(source)  # the version replaced
    for attempt in range(_REPLACE_ATTEMPTS - 1):
        with contextlib.suppress(PermissionError):
            return os.replace(source, target)
        time.sleep(_REPLACE_BACKOFF * 2 ** attempt)
    os.replace(source, target)  # the last attempt: its error is raised


def _signature(st, content):
    """What changes when another program rewrites a file, and content() while a rewrite in place
    may keep all that: within the time stamps' tick (whole seconds: HFS+, FAT; else a few ms)."""
    ctime = st.st_ctime_ns if os.name == "posix" else 0  # Windows: fstat's is not stat's (3.12)
    stamp = max(st.st_mtime_ns, ctime)  # a rewrite may set the mtime back, not ctime
    tick = 3 * 10**9 if stamp % 10**9 == 0 else 10**8  # with a margin: the stamps' clock lags
    racy = time.time_ns() - stamp < tick and content()  # as git's "racily clean"
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, ctime, racy)


def atomic_write(path, data, check=lambda name: None):
    """Write data to path atomically and durably, mode 0600: temp file, fsync, rename, fsync of
    the directory. What check(path) raises just before the rename (check(temp) after a swap: see
    _replace_file) abandons the write. Returns the new file's signature (from its descriptor).
    On failure the temp file is removed and path untouched (unless the directory fsync failed)."""
    with _synced_dir(path) as directory:  # by name, as the rename finds it (it may be replaced)
        temp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(6).hex()}.tmp")
        file = None  # until open() returns: it may fail once its opener made the file
        try:
            file = open(temp, "xb", buffering=0,  # "x": O_EXCL, never reusing or following a
                        opener=lambda p, f: os.open(p, f, _FILE_MODE))  # name; Windows: binary
            fd = file.fileno()
            with contextlib.suppress(OSError):  # what the umask took away (Windows: read-only;
                os.chmod(fd if os.chmod in os.supports_fd else temp, _FILE_MODE)  # FAT: no modes)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            try:  # macOS fsync() does not flush the drive's cache; F_FULLFSYNC does
                fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            except (AttributeError, OSError) as exc:  # not macOS (Windows: no fcntl), or not on
                if getattr(exc, "errno", None) in (errno.EIO, *_DISK_FULL):  # this FS (SMB). But
                    raise  # EIO or a full disk is data lost, which a retried fsync would hide
                os.fsync(fd)
            check(path)
            if os.name != "posix":  # Windows cannot rename an open file. A rename keeps what
                st = os.fstat(fd)  # _signature reads there; on POSIX it changes st_ctime,
                file.close()  # so the descriptor is read after it
            _replace_file(temp, path, check)
            signature = _signature(st if file.closed else os.fstat(fd), lambda: data)
            file.close()
        except BaseException:
            with contextlib.suppress(OSError, AttributeError):  # first: Windows cannot remove
                file.close()  # an open file
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    return signature


def _file_signature(path):
    """The signature of the file at path; () if it is missing."""
    try:
        return _signature(os.stat(path), lambda: _read_file(path)[1])
    except (FileNotFoundError, NotADirectoryError):
        return ()
    except OSError as exc:
        return ("unreadable", exc.errno)


def _read_file(path):
    """(signature, content) of a file, ((), None) if it is missing; OSError."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX: a FIFO there must not block the open
    try:  # by name: open() closes the descriptor when it cannot use it (a directory)
        file = open(path, "rb", buffering=0, opener=lambda p, f: os.open(p, f | nonblocking))
    except (FileNotFoundError, NotADirectoryError):  # a missing file or data dir
        return (), None
    with file:  # no buffer: two system calls fewer
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        content = file.read()  # None for EAGAIN (O_NONBLOCK, FUSE), or the part read before it:
        if content is None or file.read(1) != b"":  # never taken for no file, or the whole file
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return _signature(st, lambda: content), content


# An immutable version; body: bytes as served, raw: the file's (None: no file), error: why it is
# unusable (then document, body and etag are those of the last usable version read, if any).
_Version = collections.namedtuple("_Version", "document body etag signature raw error")


class _Change:
    """A change waiting for its save: apply(document) -> (new document, result, event key)
    never changes its argument; if_match is a tag, "*", a list of tags (If-Match), or None."""

    def __init__(self, apply, if_match, lock):
        if_match = (if_match,) if isinstance(if_match, str) else if_match
        if if_match is not None and (type(if_match) not in (list, tuple)
                                     or not all(isinstance(t, str) for t in if_match)):
            raise InvalidValue("if_match must be a tag or a list of tags")
        self.apply, self.if_match = apply, None if if_match is None else tuple(if_match)
        self.result = self.key = self.tag = self.error = None  # tag: the document's after it
        self.changed = self.done = False  # changed: an event; done: saved, or failed (error: why)
        self.wake = threading.Condition(lock)  # notified when done, or to save the queue

    def matches(self, tag):
        return self.if_match is None or self.if_match == ("*",) or tag in self.if_match

    def run(self, document, tag, new_tag):
        """Apply it to a document and its tag; return both after it (a new tag if it changed)."""
        new, self.result, self.key = self.apply(document)
        self.changed = not _same(new, document)
        self.tag = new_tag() if self.changed else tag
        return (new, self.tag) if self.changed else (document, tag)


class SettingsDocument:
    """One settings document: its file, schema, and current version. Thread-safe.

    Group commit: changes are validated and queued; a writer finding no save running writes them
    all with one fsync; each returns once durable. A reader finding the file changed during saves
    waits for the one under way and the next (at most 5 s), which takes in the rewrite."""

    def __init__(self, path, schema, defaults):
        self.path, self.name = path, os.path.basename(path)
        self.schema, self._defaults = schema, defaults  # the default document, as text
        prefix, numbers = os.urandom(6).hex(), itertools.count(1)  # a new prefix per process:
        self._new_tag = lambda: f'"{prefix}-{next(numbers)}"'  # never repeats; next() is atomic
        self._lock = threading.Lock()  # guards what follows (not the save's write: see _save_queue)
        self._saved = threading.Condition(self._lock)  # notified when a save or the queue ends
        self._disk = _Version(*[None] * 6)  # _Version on disk: what readers get (none read yet)
        self._head = self._head_tag = None  # newest accepted document and its tag: If-Match's
        self._queue = []  # _Change objects accepted and not yet in a save
        self._saving, self._closed, self._saves = False, False, 0  # _saves: saves ended
        self.publish = lambda key, etag: None  # the server's feed: each change on disk, under _lock
        self._refresh()  # read the file now, as every method expects

    def get(self, key=None):
        """A copy of the whole document, or of the value at key."""
        if key is None:
            return json.loads(self.current().body)
        return copy.deepcopy(_lookup(self.current().document, parse_key(key)))

    def put(self, key, value, merge=False, if_match=None):
        """Set value at key (deep-merged if merge); return a copy as stored.
        PreconditionFailed unless if_match is None, "*" or the tag."""
        return copy.deepcopy(self.update(key, _json_copy(value), merge, if_match)[0])

    def replace(self, document, if_match=None):
        """Substitute the whole document; return a copy as stored (see put)."""
        return copy.deepcopy(self.substitute(_json_copy(document), if_match)[0])

    def patch(self, patch, if_match=None):
        """Apply a JSON merge patch (RFC 7396); return a copy as stored (see put)."""
        return copy.deepcopy(self.merge_patch(_json_copy(patch), if_match)[0])

    @property
    def etag(self):
        """The tag of the version get() reads (the ETag header's), not of a change being saved."""
        return self.current().etag

    # -- the interface of the HTTP handler: no copies; returns (result, new tag) ----

    def update(self, key, value, merge=False, if_match=None):
        path = parse_key(key)
        node = _node_at(self.schema, path)  # 405 before If-Match; "-" in a list: its items' node

        def check_alone():  # the answer without If-Match (ids not compared), but for a key
            try:  # the newest document lacks: the client's version may have it (412)...
                _assign(self._head, self.schema, path, 0, value, merge, ids=False)
            except InvalidKey:  # ...unless the rest is wrong anyway: then this 405 (raise)
                with contextlib.suppress(InvalidValue):
                    if type(merge) is bool and value is not _MISSING:
                        validate(value, node, path, partial=merge)
                        return  # right on its own: 412
                raise
        return self._change(lambda document: _assign(document, self.schema, path, 0, value, merge),
                            if_match, check_alone)

    def substitute(self, document, if_match=None):
        complete = self._validated(document)
        return self._change(lambda _: (complete, complete, None), if_match)

    def merge_patch(self, patch, if_match=None):
        validate(patch, "any")  # its names too, though null removes; in process, not a cycle
        if type(patch) is not dict:
            raise InvalidValue("a merge patch must be a JSON object")

        def apply(document):
            merged = self._validated(_merge_patch(document, patch))  # a field removed: its default
            return merged, merged, None
        return self._change(apply, if_match, lambda: apply(self._head))

    def current(self):
        """The version on disk (shared: never change it), re-read if the file changed."""
        version, signature = self._disk, _file_signature(self.path)
        if signature != version.signature:  # a save's rename, a rewrite, or the tick has ended
            with self._lock:  # that the next save to begin reads: wait for it (and one under way)
                ticked = signature[:-1] == version.signature[:-1] and not signature[-1]  # no wait
                last = self._saves + (0 if ticked else 2 if self._saving else 1)  # not later ones
                self._saved.wait_for(lambda: self._saves >= last or not (
                    self._saving or self._queue), SHUTDOWN_GRACE)
                version = self._refresh()
        return self._usable(version)

    def load(self, create=False):
        """Read the file (again: only if it changed); StartupError if it is unusable.
        create: at startup, write the default document if there is no file."""
        with self._lock:
            version = self._refresh()
            if version.error:
                raise StartupError(f"{self.name}: {version.error} ({self.path})")
            if create and version.raw is None:  # no file (one it cannot read has raised)
                with _startup_error(f"cannot write {self.name}", self.path):
                    signature = atomic_write(self.path, version.body)
                self._disk = version._replace(signature=signature, raw=version.body)

    def close(self, timeout=SHUTDOWN_GRACE):
        """Refuse later changes; return whether no save is under way within timeout seconds."""
        with self._lock:
            self._closed = True
            return self._saved.wait_for(lambda: not self._saving, timeout)

    def _usable(self, version):
        if version.error:
            raise DocumentUnavailable(f"{self.name} on disk is not valid: {version.error}")
        return version

    def _refresh(self):
        """The version on disk, re-read if changed (unless ours to write now). Holds _lock."""
        if not (self._queue or self._saving) and _file_signature(self.path) != self._disk.signature:
            old, self._disk = self._disk, self._read_version(self._disk)
            if self._disk.error is None:
                self._head, self._head_tag = self._disk.document, self._disk.etag
                if self._disk.etag != old.etag:
                    self.publish(None, self._disk.etag)
        return self._disk

    def _change(self, apply, if_match=None, check_alone=lambda: None):
        """Apply a change to the newest document; once saved, return (what apply gives back,
        the new tag, the same if nothing changed); check_alone() comes before If-Match."""
        with self._lock:
            if self._closed:
                raise DocumentUnavailable("the server is shutting down")
            self._usable(self._refresh())
            change = _Change(apply, if_match, self._lock)
            if not change.matches(self._head_tag):
                check_alone()
                raise PreconditionFailed(f"{self.name} has changed: If-Match does not name its tag")
            self._head, self._head_tag = change.run(self._head, self._head_tag, self._new_tag)
            if not (change.changed or self._queue or self._saving):
                return change.result, self._head_tag  # nothing to save
            self._queue.append(change)
            while not change.done:
                if self._saving:  # woken when done or to save next: one writer, not all;
                    change.wake.wait(_WAKE_EVERY)  # bounded: that writer may have left
                elif change not in self._queue:  # in a batch whose save broke off unsettled
                    self._end([change], self._disk, None, SaveError("internal error while saving"))
                elif self._closed:
                    self._end([], self._disk, None,
                              DocumentUnavailable("the server is shutting down"))
                else:
                    self._save_queue()
        if change.error is not None:
            raise change.error
        return change.result, change.tag

    def _save_queue(self):
        """Save the newest document with every queued change; holds _lock but for the write."""
        batch, self._queue, self._saving = self._queue, [], True
        document, tag, base = self._head, self._head_tag, self._disk
        self._lock.release()
        disk, rebased, error = base, None, SaveError("internal error while saving")
        try:
            disk, rebased, error = self._write(document, tag, base, batch)
        except Exception:  # a bug, or (by the finally) an interrupt: the batch fails, all goes on
            _logger().exception("unexpected error saving %s", _one_line(self.path))
        finally:
            self._lock.acquire()
            self._saving = False
            self._saves += 1
            self._end(batch, disk, rebased, error)

    def _end(self, batch, disk, rebased, error):
        """Settle a batch whose save left disk on disk, wake the next writer, publish the changes;
        on error the queued ones fail too, after a rebase they are re-applied to it. Holds _lock."""
        old, self._disk = self._disk, disk
        if error is not None:
            batch, self._queue = batch + self._queue, []
            self._head, self._head_tag = disk.document, disk.etag
        elif rebased is not None:
            self._head, self._head_tag = self._reapply(self._queue, disk.document, disk.etag)
            batch = batch + [change for change in self._queue if change.error is not None]
            self._queue = [change for change in self._queue if change.error is None]
        for change in batch:  # all settled before any event: a publish that raises strands none
            change.error, change.done = change.error or error, True
            change.wake.notify()
        self._saved.notify_all()  # readers and close() waiting for a save or the queue to end
        if self._queue:  # the writer of the oldest change queued meanwhile saves them all
            self._queue[0].wake.notify()
        if rebased is not None and rebased.etag != old.etag:  # though unusable now
            self.publish(None, rebased.etag)
        for change in (change for change in batch if change.error is None and change.changed):
            self.publish(change.key, change.tag)

    def _reapply(self, changes, document, tag):
        """Apply changes again to another document and its tag, each that changes it with a
        new tag; those no longer valid fail alone. Returns (document, tag) after them."""
        for change in changes:
            if not change.matches(None):  # its If-Match named the version replaced
                change.error = PreconditionFailed(f"{self.name} was changed by another "
                                                  "program: If-Match does not name its tag")
            if change.error is None:
                try:
                    document, tag = change.run(document, tag, self._new_tag)
                except Exception as exc:  # a bug, or no memory: this one fails, the rest goes on
                    change.error = exc
        return document, tag

    def _write(self, document, tag, base, batch):
        """Write document (base with batch), re-applying batch if another program rewrote the
        file. Returns (the version on disk, the other program's version or None, error)."""
        def check_unchanged(name):  # by content: stat misses a rewrite within one clock tick
            current = ()  # if unreadable: never equal, re-reading says why
            with contextlib.suppress(OSError):
                current = _read_file(name)[1]
            if current != base.raw:
                raise DocumentChanged(f"{self.name} was rewritten by another program")

        rebased = None
        for _ in range(_REBASE_ATTEMPTS):
            body = _dump_document(document)
            try:
                signature = atomic_write(self.path, body, check_unchanged)
                return _Version(document, body, tag, signature, body, None), rebased, None
            except DocumentChanged:  # check_unchanged found a rewrite: read it
                known, base = base, self._read_version(base)
                if base.etag == known.etag and not base.error:  # only reformatted: no rebase
                    continue
                rebased = base
            except BaseException as exc:
                undone = self._put_back(base, body)
                if not isinstance(exc, OSError):
                    raise  # a bug, or an interrupt: _save_queue fails the batch
                _logger().error("could not save %s: %s", _one_line(self.path), exc.strerror)
                return base, rebased, SaveError(
                    f"could not save {self.name}: {exc.strerror or 'error'}{undone}",
                    HTTPStatus.INSUFFICIENT_STORAGE if exc.errno in _DISK_FULL else None)
            if base.error:
                return base, rebased, DocumentUnavailable(
                    f"{self.name} on disk is not valid: {base.error}")
            document, tag = self._reapply(batch, base.document, base.etag)
            if not any(change.changed and not change.error for change in batch):
                return base, rebased, None  # nothing left to write
        return base, rebased, DocumentChanged(f"{self.name} keeps being changed by another program")

    def _put_back(self, base, body):
        """Undo a failed save whose rename happened (the directory fsync failed): put base back.
        What the error adds: "" unless the file may still hold the change (read as a rewrite)."""
        try:
            if body != base.raw and _read_file(self.path)[1] == body:
                if base.raw is None:
                    with _synced_dir(self.path):
                        os.unlink(self.path)
                else:
                    atomic_write(self.path, base.raw)
        except OSError as exc:
            _logger().error("could not restore %s: %s", _one_line(self.path), exc.strerror)
            return "; undoing it failed too, so the file may hold it"
        return ""

    def _read_version(self, known):
        """The file's version; known's document and tag if the content is the same, or unusable."""
        try:
            signature, raw = _read_file(self.path)
        except OSError as exc:
            return known._replace(signature=("unreadable", exc.errno), raw=(),
                                  error=f"cannot read: {exc.strerror}")
        if raw is not None and raw == known.raw:  # as read or written before: no parse
            return known._replace(signature=signature)
        try:
            if raw is not None and not raw.strip():
                raise _NotJSON("the file is empty")
            document = self._validated({} if raw is None else _parse_json(raw))  # no file: defaults
        except (_NotJSON, QabelRestError) as exc:
            return known._replace(signature=signature, raw=raw, error=_one_line(exc))  # logged too
        if _same(document, known.document):  # never equal to None: a document is an object
            return known._replace(signature=signature, raw=raw, error=None)
        return _Version(document, _dump_document(document), self._new_tag(), signature, raw, None)

    def _validated(self, document):
        """Validate the document; return it with missing top-level fields at their defaults."""
        validate(document, self.schema)
        return {**json.loads(self._defaults), **document}


# --- Change feed -------------------------------------------------------------

EVENTS_KEPT = 1000  # the newest events the feed keeps, and the most one answer holds
MAX_WAIT = 300  # seconds a request may wait for events
_LOOK_EVERY = 0.5  # seconds between looks at the files, and at whether waiting clients left


class CursorGone(QabelRestError):
    """A cursor this run did not hand out, or older than the events kept: 410.
    `cursor` is the current one: read the documents again, then go on from it."""

    status = HTTPStatus.GONE

    def __init__(self, message, cursor=None):  # None: as pickle makes it, then sets cursor
        super().__init__(message)
        self.cursor = cursor


def _event(document, key, etag):
    return {"document": document, "key": None if key is None else list(key), "etag": etag}


class _Waiter:
    """A request waiting for events: its cursor's number, how it gets its answer, and
    whether its client left (then it is answered at once: its connection closes)."""

    def __init__(self, number, deliver, gone):
        self.number, self.deliver, self.gone = number, deliver, gone  # deliver(answer)
        self.answer = None  # the answer, the CursorGone it gets, or what deliver returned
        self.done = threading.Event()


class _Feed:
    """Every change to either document as an event, in order; event n has the cursor
    "<n>-<tag>". One thread answers waiting requests (a hundred threads woken at once would
    queue for the GIL) and looks at the files; another calls the subscribers."""

    def __init__(self, look):
        self._look = look  # looks at the files, publishing another program's rewrite
        from hashlib import blake2b  # see _logger(); keyed, and it keeps the GIL (hmac does not)
        key = os.urandom(16)  # this run's: a cursor it did not hand out has no valid tag
        self._cursor = lambda n: f"{n}-{blake2b(b'%d' % n, key=key, digest_size=8).hexdigest()}"
        self._events = collections.deque(maxlen=EVENTS_KEPT)  # (document, key, etag)
        self._last = 0  # the number of the newest event
        self._changed = threading.Condition()  # notified on each event, and on close
        self._closed, self._final, self._waiters = False, False, set()
        self._subscribers = []  # [the last event before it subscribed, callback]
        self._pending = collections.deque()  # (number, event) for the subscribers: all kept
        self._threads = set()  # the names of the feed's threads started (when needed)

    def publish(self, document, key, etag):
        with self._changed:
            self._events.append((document, key, etag))
            self._last += 1
            if self._subscribers:  # after close too: a change in flight is still saved
                self._pending.append((self._last, (document, key, etag)))
                self._start(self._dispatch)
            self._changed.notify_all()

    def close(self, final=False):
        """Answer every waiting request now, and every later one at once; after a final close
        (server_close), one that would wait raises DocumentUnavailable instead."""
        with self._changed:
            self._closed, self._final = True, self._final or final
            self._changed.notify_all()

    def events(self, since=None, timeout=0, deliver=None, gone=lambda: False):
        """{"cursor", "events"} after since, waiting up to timeout for one. Over HTTP, the feed's
        thread calls gone() (has the client left?) and deliver(answer) (its result is returned)."""
        if type(timeout) not in (int, float) or not 0 <= timeout <= MAX_WAIT:
            raise InvalidValue(f"timeout must be a number of seconds from 0 to {MAX_WAIT}")
        if since is not None:  # another program's rewrite is an event now, not at a later look
            self._look()
        with self._changed:
            number = self._last if since is None else self._number(since)
            answer = self._answer(number)
            if self._final and deliver is None and since and timeout and not answer["events"]:
                raise DocumentUnavailable("the server is shutting down")  # in process: it stops
            if answer["events"] or since is None or self._closed or timeout == 0:
                return answer
            waiter = _Waiter(number, deliver or (lambda answer: answer), gone)
            self._waiters.add(waiter)
            self._start(self._serve)
            if len(self._waiters) == 1:  # the first: the feed's thread starts looking at the files
                self._changed.notify_all()  # (not at each one: a hundred waking it queue for it)
        if not waiter.done.wait(timeout):
            with self._changed:  # the feed's thread does not take the waiter meanwhile
                if waiter in self._waiters:  # else it is answering it
                    self._waiters.remove(waiter)
                    return answer
            waiter.done.wait()
        if isinstance(waiter.answer, CursorGone):
            raise waiter.answer
        return waiter.answer

    def subscribe(self, callback):
        """Call callback(event) for each later event, in order; return unsubscribe()."""
        with self._changed:
            entry = [self._last, callback]
            self._subscribers.append(entry)  # the first event starts the thread calling them
            self._start(self._serve)  # which looks at the files while anyone follows
            self._changed.notify_all()  # (it may be waiting for a waiter, idle)

        def unsubscribe():
            with self._changed:
                self._subscribers = [s for s in self._subscribers if s is not entry]
        return unsubscribe

    def _number(self, since):
        """The number of the event a cursor names; CursorGone unless this run handed
        it out and every event after it is kept. Holds _changed."""
        number = since.partition("-")[0] if type(since) is str else ""
        if (_is_digits(number) and len(number) <= _MAX_INT_TEXT
                and since == self._cursor(int(number))
                and self._last - len(self._events) <= int(number) <= self._last):
            return int(number)
        raise self._gone()

    def _gone(self):
        return CursorGone("the cursor is unknown or too old: read the documents again",
                          self._cursor(self._last))

    def _answer(self, number):
        """The answer for the events after number; a CursorGone if some are no longer
        kept (a waiter fell behind). Holds _changed."""
        start = number - (self._last - len(self._events))
        if start < 0:
            return self._gone()
        found = list(itertools.islice(self._events, start, start + EVENTS_KEPT))
        return {"cursor": self._cursor(number + len(found)), "events": [_event(*e) for e in found]}

    def _start(self, target):
        if target.__name__ not in self._threads:
            with contextlib.suppress(RuntimeError):  # no thread to be had: the next call tries
                threading.Thread(target=target, daemon=True, name="qabel_rest events").start()
                self._threads.add(target.__name__)

    def _serve(self):
        """Until close: answer waiters (all on close, any whose client left); look at files."""
        next_look = 0.0
        while True:
            with self._changed:
                if not self._closed and not any(w.number < self._last for w in self._waiters):
                    self._changed.wait(_LOOK_EVERY if self._waiters or self._subscribers else None)
                look = (self._waiters or self._subscribers) and time.monotonic() >= next_look
                ready = [w for w in self._waiters
                         if w.number < self._last or self._closed or look and w.gone()]
                self._waiters.difference_update(ready)
                for waiter in ready:
                    waiter.answer = self._answer(waiter.number)
                closed = self._closed
            for waiter in ready:  # every answer is sent before any waiter wakes
                try:
                    waiter.answer = waiter.deliver(waiter.answer)
                except Exception:
                    waiter.answer = b""  # its connection closes unanswered
                    _logger().exception("unexpected error answering a request for events")
            for waiter in ready:
                waiter.done.set()
            ready = waiter = None  # not kept while this thread waits: a handler holds its socket
            if closed:
                return
            if look:
                next_look = time.monotonic() + _LOOK_EVERY
                try:  # without the lock: a rewrite found publishes
                    self._look()
                except Exception:  # a bug, or no memory: this thread must go on
                    _logger().exception("unexpected error looking at the documents' files")

    def _dispatch(self):
        """Until close: call the subscribers for each event, in order."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:  # closed: a later event starts a thread again
                    self._threads.discard("_dispatch")
                    return
                number, event = self._pending.popleft()
                subscribers = list(self._subscribers)
            for entry in subscribers:  # not one unsubscribed meanwhile (it may be torn down)
                if number > entry[0] and any(entry is s for s in self._subscribers):
                    try:
                        entry[1](_event(*event))
                    except BaseException:  # SystemExit too: it would end this thread
                        _logger().exception("a subscriber of the change feed failed")


# --- Data directory: location, lock, API key ----------------------------------

def default_data_dir(environ=os.environ, platform=None):
    """$QABEL_REST_DATA_DIR, else the platform's per-user config dir + qabel-rest."""
    platform = sys.platform if platform is None else platform
    if environ.get(_ENV_DATA_DIR):
        return environ[_ENV_DATA_DIR]
    home = os.path.expanduser("~")
    if platform == "win32":
        base = environ.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
    elif platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:  # XDG: a relative XDG_CONFIG_HOME is invalid and must be ignored
        xdg = environ.get("XDG_CONFIG_HOME", "")
        base = xdg if os.path.isabs(xdg) else os.path.join(home, ".config")
    return os.path.join(base, "qabel-rest")


def _lock_data_dir(directory):
    """One server per data dir: lock the lock file (the OS unlocks it if we die), return its
    fd (closing it unlocks). It stays: else a third process could lock another inode."""
    path = os.path.join(directory, _LOCK_FILE)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    with _startup_error("the data dir is not writable", directory):  # a link: refused (ELOOP)
        try:  # made by this start (O_EXCL: a lookup may be stale, as NFS caches a missing file)
            fd, made = os.open(path, flags | os.O_EXCL, _FILE_MODE), True
        except FileExistsError:  # or found (Windows: binary, the pid's "\n" as is, not "\r\n")
            fd, made = os.open(path, flags, _FILE_MODE), False
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows: lock one byte far past the pid text
            import msvcrt  # Windows only
            os.lseek(fd, 1 << 20, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            os.lseek(fd, 0, os.SEEK_SET)  # back, for the pid
    except OSError as exc:
        pid = ""  # the holder's, if its file can be read (a read may fail: EIO)
        with contextlib.suppress(OSError), open(fd, "rb") as file:  # which closes fd
            file.seek(0)
            pid = file.read(32).decode("ascii", "replace").strip()
        if fcntl and exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # refused, not held
            if made:  # (ENOLCK: NFS without its lock daemon): removed, as after a later failure.
                with contextlib.suppress(OSError):  # Windows: held, whatever msvcrt's errno
                    os.unlink(path)  # says (Wine leaves a stale one)
            raise StartupError(f"cannot lock the data dir: {exc.strerror} ({directory})") from None
        holder = f" (pid {pid})" if pid.isdigit() else ""
        raise StartupError(f"another qabel_rest{holder} is already using the data dir "
                           f"({directory})") from None
    with contextlib.suppress(OSError):  # 0600 whatever the umask, as atomic_write (FAT: as is)
        os.chmod(fd if os.chmod in os.supports_fd else path, _FILE_MODE)
    return fd


def _find_api_key(key, data_dir):
    """(the key, where it came from): key, else $QABEL_REST_API_KEY, else the key file in
    data_dir (None if there is none); StartupError for a key not usable."""
    source = "the command line"
    if key is None and os.environ.get(_ENV_API_KEY):
        key, source = os.environ[_ENV_API_KEY], "$" + _ENV_API_KEY
    elif key is None:
        source = os.path.join(data_dir, _KEY_FILE)
        with _startup_error("cannot read the key file", source):
            raw = _read_file(source)[1]
            if raw is None and os.path.islink(source):  # to no file (a volume not mounted):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))  # not none
        if raw is None:
            return None, source
        key = raw.removeprefix(b"\xef\xbb\xbf").strip().decode("ascii", "replace")  # UTF-8 BOM
    if type(key) is not str or not re.fullmatch(r"[!-~]{1,4096}", key):  # it travels in a header
        raise StartupError(f"the API key from {source} must be 1 to 4096 characters of "
                           "printable ASCII without spaces")
    return key, source


def _host_name(value):
    """The lower-case host of a Host header value (port dropped); None if malformed."""
    match = _HOST.fullmatch(value.strip(_OWS).lower())
    return (match[1] or None) if match else None


def _normal_host(name):
    """A host name as a Host header has it: lower case, IPv6 in brackets, a port dropped."""
    return _host_name(name) or f"[{name.strip(_OWS).lower()}]"  # IPv6, or what none matches


# --- API description ----------------------------------------------------------

def _json_schema(node, served=False):
    """The JSON Schema (2020-12, as in OpenAPI 3.1) of a schema node; served: with every
    field of an object required, as GET serves a document."""
    if node == "any":
        return {"description": f"any JSON, 64-bit ints, within {MAX_DEPTH} levels of the document"}
    if type(node) is str:
        return dict(_LEAVES[node][2])
    if type(node) is _List:
        unique = type(node.item) is _Obj and "id" in node.item.fields  # as _check_ids
        note = {"description": "no two items have the same id"} if unique else {}
        return {"type": "array", "items": _json_schema(node.item), **note}
    if type(node) is _Map:
        return {"type": "object", "additionalProperties": _json_schema(node.item)}
    return {"type": "object", "additionalProperties": False,
            "properties": {name: _json_schema(child) for name, child in node.fields.items()},
            "required": sorted(node.fields if served else node.required)}


def _openapi():
    """The OpenAPI 3.1 description of the API, as GET /openapi.json serves it."""
    def ref(kind, name):
        return {"$ref": f"#/components/{kind}/{name}"}

    def answer(description, schema=None, *headers):
        named = {name: ref("headers", name) for name in (*common, *headers)}
        content = {} if schema is None else {"content": {_JSON_TYPE: {"schema": schema}}}
        return {"description": description, "headers": named, **content}

    def change(body, description, schema, media=_JSON_TYPE):  # a PUT, POST or PATCH
        content = {media: {"schema": body}}
        if media == _JSON_TYPE:  # or a form with the same fields, as text
            content[_FORM_TYPE] = {"schema": {"type": "object", "additionalProperties": text,
                                              "required": body["required"]}}
        return {"parameters": conditions, "requestBody": {"required": True, "content": content},
                "responses": {"200": answer(description, schema, "ETag"), **failed}}

    common = ("Content-Length", "Cache-Control", "X-Content-Type-Options", "Date", "Server",
              "Keep-Alive", "Connection")  # every answer's, but Keep-Alive or Connection: close
    text = {"type": "string"}
    error = ref("schemas", "Error")
    refusals = {"400": answer("a malformed request line, header block or framing", error),
                "403": answer("a Host or Origin not allowed", error),
                "411": answer("a chunked body: send Content-Length", error),
                "414": answer("a request line over 64 KiB", error),
                "417": answer("an Expect other than 100-continue", error),
                "431": answer("a header line over 64 KiB, 100 of them, or 128 KiB in all", error),
                "501": answer("a transfer coding other than chunked", error),
                "505": answer("HTTP/2 to HTTP/9: versions not spoken here", error),
                "503": answer("a document invalid on disk, too many connections (with "
                              "Retry-After) or shutting down", error, "Retry-After")}
    keyed = {"401": answer("no API key, or a wrong one", error, "WWW-Authenticate"), **refusals}
    failed = {**keyed, "400": answer("a value, document or body that is not valid", error),
              "405": answer("a key that is not valid, or settings that are not JSON "
                            "(the Qabel spec), or another method", error, "Allow"),
              "409": answer("another program kept rewriting the file", error),
              "412": answer("If-Match names no current tag, or If-None-Match is *", error),
              "413": answer("a body over the limit", error),
              "415": answer("another content type", error, "Accept-Patch"),
              "500": answer("saving failed", error), "507": answer("the disk is full", error)}
    conditions = [{"name": "If-Match", "in": "header", "schema": text,
                   "description": "tags or *: only if one names the current version (else 412)"},
                  {"name": "If-None-Match", "in": "header", "schema": text, "description": "tags"
                   " or *: 304 if one is current (GET, HEAD); on a change, * alone counts: 412"}]
    paths = {path: {"get": {"security": [], "responses": {
        "200": answer(description, {"type": "object"}), **refusals}}}
        for path, description in zip(_OPEN, ("the server is up", "this description"))}
    paths["/events"] = {"get": {"parameters": [
        {"name": "since", "in": "query", "schema": text,
         "description": "a cursor of this run; without it, the answer is at once"},
        {"name": "timeout", "in": "query",
         "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
         "description": f"seconds to wait for an event (30; at most {MAX_WAIT})"}],
        "responses": {**keyed, "200": answer("the events after since, and the cursor after them",
                                             ref("schemas", "Events")),
                      "400": answer("a bad timeout, a repeated parameter, or bad framing", error),
                      "410": answer("a cursor this run did not hand out, or too old",
                                    ref("schemas", "CursorGone"))}}}
    for path, name, schema in (("/settings", "LocalSettings", LOCAL_SCHEMA),
                               ("/synced", "SyncedSettings", SYNCED_SCHEMA)):
        document = ref("schemas", name)
        put = {"type": "object", "required": ["key", "value"], "properties": {
            "key": {"type": ["string", "array"], "description": "a dotted key, or its segments",
                    "minLength": 1, "minItems": 1, "items": {"type": ["string", "integer"]}},
            "value": {}, "merge": {"type": "boolean"}}}
        post = {"type": "object", "required": ["settings"],
                "properties": {"settings": _json_schema(schema)}}
        patch = {"type": "object", "properties": dict.fromkeys(schema.fields, {}),
                 "additionalProperties": {"type": "null"}}  # removing what is not there
        paths[path] = {
            "get": {"parameters": conditions,
                    "responses": {"200": answer("the document", document, "ETag"),
                                  "304": answer("If-None-Match names the tag", None, "ETag"),
                                  "412": answer("If-Match names no current tag", error),
                                  **keyed}},
            "put": change(put, "the value as stored", put),
            "post": change(post, "the stored document", document),
            "patch": change(patch, "the stored document", document, _PATCH_TYPE)}
    methods = {"type": "object", "properties": {"allow": {"type": "array", "items": text}}}
    for operations in paths.values():
        operations["head"] = {**operations["get"], "responses": {
            status: {key: value for key, value in response.items() if key != "content"}
            for status, response in operations["get"]["responses"].items()}}
        headers = ("Allow", "Accept-Patch") if "patch" in operations else ("Allow",)
        operations["options"] = {"responses": {"200": answer("the methods", methods, *headers),
                                               **keyed}}
    return {
        "openapi": "3.1.0", "security": [{"apiKey": []}, {"bearer": []}], "paths": paths,
        "info": {"title": "qabel_rest", "version": __version__, "description": "The local REST "
                 "server of the Qabel desktop client. Another path: 404; another method of a path: "
                 "405 with Allow; both after the Host, Origin and key checks (403, 401). A PUT or "
                 "POST body without a Content-Type is read as JSON."},
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                                "bearer": {"type": "http", "scheme": "bearer"}},
            "headers": {name: {"schema": text} for name in (
                "ETag", "Allow", "Accept-Patch", "WWW-Authenticate", "Retry-After", *common)},
            "schemas": {
                "LocalSettings": _json_schema(LOCAL_SCHEMA, served=True),
                "SyncedSettings": _json_schema(SYNCED_SCHEMA, served=True),
                "Error": {"type": "object", "required": ["error"], "properties": {"error": text}},
                "CursorGone": {"type": "object", "required": ["error", "cursor"],
                               "properties": {"error": text, "cursor": text}},
                "Events": {"type": "object", "required": ["cursor", "events"], "properties": {
                    "cursor": text, "events": {"type": "array", "items": {
                        "type": "object", "required": ["document", "key", "etag"],
                        "properties": {"document": {"enum": ["settings", "synced"]},
                                       "key": {"type": ["array", "null"], "items": text},
                                       "etag": text}}}}}}}}


# --- HTTP handler -------------------------------------------------------------

_ROUTES = MappingProxyType({  # a path's methods, as Allow lists them (RFC 9110 10.2.1)
    **dict.fromkeys(("/settings", "/synced"), ("GET", "PUT", "POST", "PATCH", "HEAD", "OPTIONS")),
    **dict.fromkeys(("/events", "/health", "/openapi.json"), ("GET", "HEAD", "OPTIONS")),
})
_OPEN = ("/health", "/openapi.json")  # the paths GET needs no key for
_JSON_TYPE, _FORM_TYPE = "application/json", "application/x-www-form-urlencoded"
_PATCH_TYPE = "application/merge-patch+json"  # RFC 7396
_SECONDS = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")  # a timeout= value
_LINGER_SECONDS = 2.0  # after refusing a body, read and drop it this long at most...
_LINGER_BYTES = 64 << 20  # ...and this much (about 30 ms on loopback)
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")  # not HTAB; a CR only as the line end's
# http.client stops at a malformed header line (a space before the colon, no colon) and
# takes the rest as a body; a "From " line (mbox envelope) it drops.
_HEADER_DEFECTS = (email.errors.MissingHeaderBodySeparatorDefect,
                   email.errors.MisplacedEnvelopeHeaderDefect)
_BEARER = (("WWW-Authenticate", "Bearer"),)


class _LineReader(io.BufferedReader):
    """http.server's input, refusing a line cut off, a folded line, and a control character
    inside a line (RFC 9112 2.2: a bare CR, which http.client's parser takes for a break)."""

    def readline(self, limit=-1):
        line = super().readline(limit)  # a LF can only be its last byte
        self.room -= len(line)  # left for the request line and headers: see RequestHandler._reset
        if self.room < 0:  # 100 lines of 64 KiB each would hold MBs while they trickle in
            raise _Malformed("header section too large", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if _CONTROL.search(line.removesuffix(b"\n").removesuffix(b"\r")):  # one class: fast
            raise _Malformed("a control character in a line")
        if line[:1] in (b" ", b"\t") and len(line) != limit:  # a fold (RFC 9112 5.2), which
            raise _Malformed("a line starts with white space")  # newer email parsers join
        if line[-1:] != b"\n" and len(line) != limit:  # not at the limit (414, 431): the input
            raise _Malformed("the request ended early")  # ended (RFC 9112 8: incomplete)
        return line


class RequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection. parse_request() is http.server's plus the contract's checks,
    do_<METHOD> routes, and handle_one_request() answers every error in JSON, once."""

    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    default_request_version = "HTTP/1.0"  # for a garbled request line: 0.9 has no status line
    server_version = f"qabel_rest/{__version__}"  # the Server header: no Python version
    disable_nagle_algorithm = True  # no 40 ms stall on a delayed ACK between writes
    wbufsize = 1 << 16  # one send per answer (_send flushes): each send is a GIL handoff

    def setup(self):
        super().setup()
        self.rfile = _LineReader(self.rfile.detach())  # http.server's, checking each line
        self._reset()

    def finish(self):
        # Closing a socket with unread input sends a reset, which can destroy our answer
        # (RFC 9112 9.6): a client still sending a body we refused would not see our 413.
        if self._linger:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                deadline, received = time.monotonic() + _LINGER_SECONDS, 0
                while received < _LINGER_BYTES and time.monotonic() < deadline:
                    self.connection.settimeout(max(0.001, deadline - time.monotonic()))
                    received += len(self.connection.recv(1 << 16)) or _LINGER_BYTES  # 0: closed
        super().finish()

    def version_string(self):
        return self.server_version

    def date_time_string(self, timestamp=None):  # once a second: formatdate is slow
        second = int(time.time() if timestamp is None else timestamp)
        if (cached := self.server._date)[0] != second:  # one read: another thread may write
            cached = self.server._date = (second, super().date_time_string(second))
        return cached[1]

    def handle(self):
        with contextlib.suppress(OSError):  # while answering an error or draining
            if self.server._move(self.connection, _IDLE, _IDLE,  # new: see process_request
                                 self.server.idle_timeout + _ROOM_AFTER):
                super().handle()
            else:  # refused for want of room, or closing: at once, not after a request
                self._refuse()

    def handle_one_request(self):
        """Wait for a request (idle timeout), then let http.server serve it (request timeout)."""
        self._reset()
        try:
            start = b""  # if reading fails: reset, or closed by the server
            with contextlib.suppress(OSError, ValueError):
                if self.rfile.peek(1)[:1] in (b"\r", b"\n"):  # RFC 9112 2.2: ignore an empty
                    self.rfile.readline(2)  # line, still idle (its LF may come later; bare CR: 400)
                start = self.rfile.peek(1)
            if not start:  # never busy: the finally's move fails and closes the connection
                return
            if self.server._move(self.connection, _IDLE, _BUSY, self.server.request_timeout):
                super().handle_one_request()
            elif self.server._closing:  # else closed for room or as idle as it came: shut,
                self._refuse()  # never half served, and no answer could go out (nor a log)
        except QabelRestError as exc:
            self._send_error(exc)
        except OSError:  # reset, broken pipe, or closed past its deadline: no answer
            self.close_connection = True
        except Exception:  # a bug: answer 500, keep serving others
            self.server.logger.exception("unexpected error in %s", self._what())
            self.close_connection = True
            if not self._responded:
                self._send_error(_Malformed("internal error", HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:  # a body answered unread is dropped (else _send closed) while still busy
            with contextlib.suppress(OSError):  # a reset: the next peek ends the connection
                if self._unread and not self.close_connection:
                    self.rfile.read(self._unread)
            self.close_connection = self.close_connection or not self.server._move(  # busy until
                self.connection, _BUSY, _IDLE, self.server.idle_timeout)  # finish() lingered

    def _reset(self):  # forget the previous request on this connection
        self.command, self.request_version = None, "HTTP/1.1"
        self._responded = self._expect = self._linger = False
        self._unread, self.rfile.room = 0, 1 << 17  # a body's unread length; the head's limit

    def _refuse(self):
        """Answer 503 without reading the request: no room for it, or closing."""
        reason = "the server is shutting down" if self.server._closing else "too many connections"
        self._send_error(_HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, reason,
                                    (("Retry-After", "1"),), close=True))

    def parse_request(self):
        """http.server's parse, then the contract's checks: framing, Host, Origin, key."""
        line = str(self.raw_requestline, "latin-1")  # RFC 9112 3: method SP target SP HTTP/d.d,
        words = re.fullmatch(r"\S+ (\S+) HTTP/[1-9]\.[0-9]\r?\n", line)  # the words split() finds
        if words is None:  # (\s: \x85, \xa0 too). Not HTTP/01.1, 1.00 or 0.9: http.server's 0.9
            raise _Malformed("malformed request line")  # has no status line (gh-70765: no headers)
        if not super().parse_request():
            return False  # http.server has answered
        self.path = words[1]  # as sent: http.server serves "//x" as "/x" (gh-87389); not here
        self._check_framing()
        if _host_name(self.fields.get("host", [""])[0]) not in self.server.allowed_hosts:
            raise _HTTPError(HTTPStatus.FORBIDDEN, "host not allowed")
        for origin in self.fields.get("origin", ()):
            scheme, sep, rest = origin.strip(_OWS).partition("://")
            if (not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme.lower()) or "/" in rest
                    or "@" in rest or _host_name(rest) not in self.server.allowed_hosts):
                raise _HTTPError(HTTPStatus.FORBIDDEN, "origin not allowed")
        if not (self._path_only() in _OPEN and self.command in ("GET", "HEAD")):
            self._check_key()
        return True

    def handle_expect_100(self):
        return True  # RFC 9110 10.1.1: the 100 goes out after every check (_read_body)

    def send_error(self, code, message=None, explain=None):
        """http.server's refusals (bad request line, 414, 431, 501) in JSON, unquoted (secrets)."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method with no do_ method: 404 or 405
            return self.do_GET()  # by path, as any other (a 5xx would blame the server)
        message = (message or HTTPStatus(code).phrase).partition(" (")[0]
        self._send_error(_HTTPError(code, message, close=True))

    def log_message(self, format, *args):
        self.server.logger.info("%s " + format, self.client_address[0], *args)

    def log_request(self, code="-", size="-"):  # never the query (a key misplaced?), nor a body
        if self.server.logger.isEnabledFor(10):  # logging.DEBUG: _what() costs a little
            self.server.logger.debug('%s "%s" %s', self.client_address[0], self._what(),
                                     int(code) if code != "-" else code)

    def _check_framing(self):
        """RFC 9112: a well-formed header block and one way to find the body's end."""
        self.fields = fields = {}  # by lower-case name: each lookup in a Message walks them all
        for name, value in self.headers.raw_items():
            fields.setdefault(name.lower(), []).append(value)
        payload = self.headers.get_payload()  # a last "From " line is taken for a body...
        if (any(isinstance(defect, _HEADER_DEFECTS) for defect in self.headers.defects)
                or isinstance(payload, str) and payload  # ...or, with message/*, its envelope
                or any(part.get_unixfrom() for part in self.headers.walk())):
            raise _Malformed("malformed header line")
        if len(fields.get("host", ())) > 1:  # none: not an allowed host (403)
            raise _Malformed("more than one Host header")
        if not self.path.startswith("/"):  # absolute-form, authority-form, asterisk
            raise _Malformed("the request target must be a path")
        tokens = {token.lower() for token in self._elements("connection")}  # on any line (RFC
        if tokens & {"close", "keep-alive"}:  # 9112 9.3): http.server reads the first one, whole
            self.close_connection = "close" in tokens
        for value in fields.get("expect", ()):
            if value.strip(_OWS).lower() != "100-continue":
                raise _Malformed("unsupported expectation", HTTPStatus.EXPECTATION_FAILED)
            self._expect = self.request_version != "HTTP/1.0"  # 1.0 clients expect none
        lengths = fields.get("content-length")
        if "transfer-encoding" in fields:
            if lengths:  # a request smuggling vector (RFC 9112 section 6.3)
                raise _Malformed("both Transfer-Encoding and Content-Length")
            if self.request_version == "HTTP/1.0":
                raise _Malformed("Transfer-Encoding in an HTTP/1.0 request")
            if [name.lower() for name in self._elements("transfer-encoding")] != ["chunked"]:
                raise _Malformed("transfer coding not supported", HTTPStatus.NOT_IMPLEMENTED)
            # A settings body has a known length: a chunked one is refused, as RFC 9112 6.3
            # allows, and never parsed (a body parser of our own is a smuggling risk).
            raise _Malformed("send the body with a Content-Length", HTTPStatus.LENGTH_REQUIRED)
        elif lengths:
            if not all(_is_digits(value.strip(_OWS)) for value in lengths):
                raise _Malformed("malformed Content-Length")
            if len(values := {value.strip(_OWS).lstrip("0") for value in lengths}) > 1:
                raise _Malformed("conflicting Content-Length")
            value = values.pop() or "0"
            self._unread = int(value) if len(value) <= 18 else sys.maxsize

    def _check_key(self):
        """X-API-Key or Authorization: Bearer (not Basic, which curl adds from ~/.netrc)."""
        presented = list(self.fields.get("x-api-key", ()))
        for value in self.fields.get("authorization", ()):
            scheme, _, token = value.strip(_OWS).partition(" ")
            if scheme.lower() == "bearer":
                presented.append(token)
        if not presented:
            raise _HTTPError(HTTPStatus.UNAUTHORIZED, "an API key is required", _BEARER)
        valid = [self.server._compare_digest(token.strip(_OWS).encode("latin-1"),
                                             self.server._api_key) for token in presented]
        if not all(valid):  # every one presented must be right, each in constant time
            raise _HTTPError(HTTPStatus.UNAUTHORIZED, "wrong API key", _BEARER)

    def _elements(self, name):
        """The non-empty elements (RFC 9110 5.6.1) of a comma-separated list header's lines."""
        return [item for value in self.fields.get(name, ())
                for element in value.split(",") if (item := element.strip(_OWS))]

    def _content_type(self):
        """(the body's media type in lower case, or None without a Content-Type;
        whether it has parameters other than charset); 415 for a charset but UTF-8."""
        if (values := self.fields.get("content-type")) is None:
            return None, False
        media, *params = (values[0] if len(values) == 1 else "").split(";")
        others = False
        for param in params:
            name, _, value = (part.strip(_OWS) for part in param.lower().partition("="))
            if name == "charset" and value.strip('"') not in ("utf-8", "utf8"):
                raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "only UTF-8 is accepted")
            others |= name not in ("", "charset")  # "type/subtype;": an empty one (RFC 9110 5.6.6)
        return media.strip(_OWS).lower(), others

    def _if_match(self):
        """The tags If-Match lists (None without it), as they are: W/"..." never matches."""
        return self._elements("if-match") if "if-match" in self.fields else None

    def do_GET(self):
        """Every method http.server hands us: route it by path, then by method."""
        path = self._path_only()
        if (allowed := _ROUTES.get(path)) is None:
            raise _HTTPError(HTTPStatus.NOT_FOUND, "no such resource")
        method = "GET" if self.command == "HEAD" else self.command
        if method == "OPTIONS":
            patch = (("Accept-Patch", _PATCH_TYPE),) if "PATCH" in allowed else ()
            self._send_json(HTTPStatus.OK, {"allow": list(allowed)},
                            (("Allow", ", ".join(allowed)), *patch))
        elif method not in allowed:
            raise _HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
        elif path in ("/health", "/openapi.json"):
            self._send_json(HTTPStatus.OK, {"status": "ok"} if path == "/health" else _openapi())
        elif path == "/events":
            self._do_events()
        else:
            document = self.server.settings if path == "/settings" else self.server.synced
            if method == "GET":
                return self._do_read(document)
            if self._unread > self.server.max_body:  # refused unread, whatever its type
                raise _Malformed(f"the body is larger than {self.server.max_body} bytes",
                                 HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            media, others = self._content_type()  # none: read as JSON (RFC 9110 8.3)
            if method == "PATCH" and (media != _PATCH_TYPE or others):
                raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                 f"a merge patch must be {_PATCH_TYPE}")
            if method != "PATCH" and media not in (None, _JSON_TYPE, _FORM_TYPE):
                raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                 f"the body must be {_JSON_TYPE} or {_FORM_TYPE}")
            if set(self._elements("if-none-match")) == {"*"}:  # RFC 9110 13.1.2: it exists
                raise PreconditionFailed(f"{document.name} exists: If-None-Match: * never holds")
            getattr(self, "_do_" + method.lower())(document, self._read_body(), media == _FORM_TYPE)

    # The methods of RFC 9110 9, logged by name; any other comes by send_error: 404 or 405.
    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = do_GET

    def _read_body(self):
        if self._expect:
            super().handle_expect_100()  # send 100 Continue now
            self.wfile.flush()
        try:  # read() allocates the whole length first: max_body may allow more than memory
            body = self.rfile.read(self._unread)
        except (MemoryError, OverflowError) as exc:  # within the default limit: ours, a 500
            raise exc if self._unread <= DEFAULT_MAX_BODY else _Malformed(
                "the body is too large to hold", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if len(body) < self._unread:
            raise _Malformed("the body ended early")
        self._unread = 0
        if not self.server._move(self.connection, _BUSY, _BUSY, math.inf):  # saving: not the
            raise ConnectionAbortedError("past its deadline")  # client's time. Cut: never served
        return body

    def _do_read(self, document):
        version = document.current()
        if (tags := self._if_match()) not in (None, ["*"]) and version.etag not in tags:
            raise PreconditionFailed(f"{document.name} has changed: If-Match does not name its tag")
        tags = {tag.removeprefix("W/") for tag in self._elements("if-none-match")}
        status = HTTPStatus.NOT_MODIFIED if version.etag in tags or tags == {"*"} else HTTPStatus.OK
        self._send(status, version.body, (("ETag", version.etag),))

    def _do_put(self, document, body, form):
        if form:
            request = _parse_form(body)
            if request.get("key", "").startswith("["):
                try:
                    request["key"] = _parse_json(request["key"])
                except (_NotJSON, QabelRestError):
                    raise InvalidKey("the key is not a valid JSON list") from None
        else:
            try:
                request = _parse_json(body)
            except _NotJSON as exc:
                raise InvalidValue(f"the body is not JSON: {exc}") from None
            if type(request) is not dict:
                raise InvalidValue("the body must be a JSON object")
        if "key" not in request:
            raise InvalidKey(f"the key is missing from the {'form' if form else 'JSON'} body")
        key, value = request["key"], request.get("value", _MISSING)
        if form and value is not _MISSING:
            # A string-typed field takes the text as given ("2026"); others JSON, if it parses.
            node = _node_at(document.schema, parse_key(key))
            if _json_schema(node).get("type") != "string":  # as /openapi.json types it
                with contextlib.suppress(_NotJSON):  # else a plain string
                    value = _parse_json(value)
        merge = False if form else request.get("merge", False)
        stored, tag = document.update(key, value, merge, self._if_match())
        self._send_json(HTTPStatus.OK, {"key": key, "value": stored}, (("ETag", tag),))

    def _do_post(self, document, body, form):
        try:
            request = _parse_form(body) if form else _parse_json(body)
            if type(request) is not dict or "settings" not in request:
                raise InvalidKey(f"settings is missing from the {'form' if form else 'JSON'} body")
            settings = _parse_json(request["settings"]) if form else request["settings"]
        except _NotJSON as exc:
            raise InvalidKey(f"settings is not a valid JSON document: {exc}") from None
        stored, tag = document.substitute(settings, self._if_match())
        self._send_json(HTTPStatus.OK, stored, (("ETag", tag),))

    def _do_patch(self, document, body, form):
        try:  # only parsing raises _NotJSON
            stored, tag = document.merge_patch(_parse_json(body), self._if_match())
        except _NotJSON as exc:
            raise InvalidValue(f"the merge patch is not JSON: {exc}") from None
        self._send_json(HTTPStatus.OK, stored, (("ETag", tag),))

    def _do_events(self):
        query = _parse_form(self.path.partition("?")[2], "a query parameter", errors="replace")
        timeout = query.get("timeout", "30")
        seconds = float(timeout) if _SECONDS.fullmatch(timeout) else None  # else the feed: 400
        self.server._move(self.connection, _BUSY, _BUSY, sys.float_info.max)  # never swept (not
        # to race its answer after a stall): its timeout ends it, server_close()'s grace too
        answer = self.server._feed.events(query.get("since"), seconds, self._deliver, self._gone)
        if type(answer) is bytes:  # delivered by the feed's thread: the rest is ours
            self.wfile.write(answer)  # flushed by http.server once do_GET returns
        else:
            self._send_json(HTTPStatus.OK, answer)

    def _gone(self):
        """Whether the client of a request waiting for events closed the connection (or half
        closed it: a peek cannot tell). Called by the feed's thread, so it never raises."""
        try:
            self.connection.setblocking(False)
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except Exception as exc:  # none to read yet: open; a reset, or a bug: the request is let go
            return not isinstance(exc, BlockingIOError)
        finally:
            with contextlib.suppress(OSError):
                self.connection.setblocking(True)

    def _deliver(self, answer):
        """From the feed's thread: send what the socket takes at once; return the rest."""
        wfile, self.wfile = self.wfile, io.BytesIO()
        try:
            if isinstance(answer, CursorGone):
                self._send_error(answer)
            else:
                self._send_json(HTTPStatus.OK, answer)
            data = self.wfile.getvalue()
            self.connection.setblocking(False)
            return data[self.connection.send(data):]
        except BlockingIOError:
            return data
        except OSError:  # the client is gone
            self.close_connection = True
            return b""
        except Exception:  # a bug, for the feed to log: the answer may be cut
            self.close_connection = True
            raise
        finally:
            self.wfile = wfile
            self.connection.setblocking(True)

    def _send_json(self, status, payload, headers=()):  # the client's time again (after a save)
        seconds = self.server.request_timeout
        if not self.server._move(self.connection, _BUSY, _BUSY, seconds):  # closing: no sweeps
            self.connection.settimeout(min(seconds, 2147483))  # each send (Windows: < 2**31 ms)
        self._send(status, _dump_document(payload), headers)

    def _send_error(self, error):
        """The JSON answer of a QabelRestError; a 405 carries Allow."""
        if error.status >= 500 and error.status not in (501, 505):  # not the client's doing
            self.server.logger.warning("%s: %d %s", self._what(), error.status, error.message)
        headers = getattr(error, "headers", ())
        cursor = {"cursor": error.cursor} if isinstance(error, CursorGone) else {}  # to go on from
        allowed = _ROUTES.get(self._path_only())
        if error.status == HTTPStatus.METHOD_NOT_ALLOWED and allowed:
            headers = (*headers, ("Allow", ", ".join(allowed)))
        if error.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE and self.command == "PATCH":
            headers = (*headers, ("Accept-Patch", _PATCH_TYPE))
        if getattr(error, "close", False):
            self.close_connection = self._linger = True
        self._send_json(error.status, {"error": error.message, **cursor}, headers)

    def _send(self, status, body, headers=()):
        """An answer with the headers every answer has; body not for HEAD or 304."""
        self._responded = True
        # Close (input that follows is dropped: finish) when stopping, or for an unread body over
        # the limit, or awaiting our 100 (it may never come), or closing anyway; else it is drained.
        if self.server._stopping or self._unread and (
                self._expect or self._unread > self.server.max_body or self.close_connection):
            self.close_connection = self._linger = True
        self.send_response(status)
        if status != HTTPStatus.NOT_MODIFIED:  # a 304 has no body to describe...
            self.send_header("Content-Type", _JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))  # ...but the 200's length (RFC 9110 8.6)
        for name, value in (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                            *headers):
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        else:
            self.send_header("Keep-Alive", f"timeout={int(self.server.idle_timeout)}")
            if self.request_version == "HTTP/1.0":
                self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD" and status != HTTPStatus.NOT_MODIFIED:
            self.wfile.write(body)
        self.wfile.flush()

    def _what(self):
        """The request for a log line: method and path if we serve them, else "-"."""
        path = self._path_only()  # never the query, where a client may put a secret
        served = path in _ROUTES and hasattr(self, f"do_{self.command}")
        return f"{self.command} {path}" if served else "-"

    def _path_only(self):
        return self.path.partition("?")[0] if self.command else ""


def _parse_form(data, what="a form field", errors="strict"):
    """The fields of a form body (bytes) or a query (text); 400 for bad encoding or a repeat."""
    try:  # as many fields as max_body allows
        text = data.decode("utf-8") if type(data) is bytes else data
        pairs = urllib.parse.parse_qsl(text, True, errors=errors)
    except ValueError:  # UnicodeDecodeError included
        raise InvalidValue("the form body is malformed") from None
    if len(fields := dict(pairs)) != len(pairs):  # which one would count?
        raise InvalidValue(f"{what} appears twice")
    return fields


# --- Server lifecycle ---------------------------------------------------------

# A connection waits for a request, serves one, or is being ended by us (shut or refused).
_IDLE, _BUSY, _CLOSING = range(3)
_ROOM_AFTER = 1.0  # seconds before a new connection may be closed for room


def _shut(sock):
    """End a connection another thread serves: its read sees the end at once."""
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class QabelRestServer(http.server.ThreadingHTTPServer):
    """The HTTP server with its two documents; build it with make_server(). Thread-safe:
    shutdown() may be called from any thread, before or during serve_forever()."""

    # POSIX: rebind at once after a restart (TIME_WAIT); Windows does so by default. There
    # SO_REUSEADDR would let another process steal the port, SO_EXCLUSIVEADDRUSE refuse a restart.
    allow_reuse_address = os.name != "nt"
    request_queue_size = DEFAULT_MAX_CONNECTIONS  # the listen backlog

    def __init__(self, address, handler_class, *, data_dir, settings, synced, max_body,
                 allowed_hosts, idle_timeout, request_timeout, max_connections):
        self.address_family = socket.AF_INET6 if ":" in address[0] else self.address_family
        self.data_dir, self.key_source = data_dir, None  # key_source: set by make_server
        self.settings, self.synced = settings, synced
        self.max_body, self.max_connections = max_body, max_connections
        self.idle_timeout, self.request_timeout = idle_timeout, request_timeout
        import hmac  # see _logger(); here: a request out of descriptors could not import it
        self._compare_digest, self.logger = hmac.compare_digest, _logger()
        self._api_key = self._dir_lock = None  # make_server's: key (bytes, never shown), lock fd
        self._state = threading.RLock()  # guards what follows; reentrant for a signal's shutdown()
        self._stopping = self._closing = False  # shutdown(), server_close() was called
        self._serving = None  # the thread that called serve_forever()
        self._connections = {}  # socket -> [thread, state, deadline]
        self._date = (None, "")  # (a second, its Date header): see date_time_string
        self._feed = _Feed(self._look)
        self.subscribe = self._feed.subscribe  # callback(event) for each later one, on disk
        self.events = lambda since=None, timeout=0: self._feed.events(since, timeout)  # GET /events
        settings.publish = lambda key, etag: self._feed.publish("settings", key, etag)
        synced.publish = lambda key, etag: self._feed.publish("synced", key, etag)
        hosts = [*map(_normal_host, (*_LOCAL_HOSTS, address[0], *allowed_hosts))]  # a wrong
        super().__init__(address, handler_class)  # one raises before the port is bound
        self.allowed_hosts = frozenset((*hosts, _normal_host(self.server_name)))
        self.url = f"http://{_normal_host(self.server_name)}:{self.server_port}"  # IPv6 in []

    def _look(self):
        for document in (self.settings, self.synced):
            with contextlib.suppress(QabelRestError):  # not waiting for a save: it looks too
                document.load()  # publishes another program's rewrite

    def server_bind(self):  # TCPServer's: HTTPServer's looks up a server_name for the address
        super(http.server.HTTPServer, self).server_bind()  # in DNS (getfqdn): 35 s on some Macs
        self.server_name, self.server_port = self.server_address[:2]  # the address as bound

    def serve_forever(self, poll_interval=0.5):
        """Handle requests until shutdown(); returns at once if that came first."""
        with self._state:  # a signal handler calling shutdown() here either sees this...
            self._serving = threading.current_thread()
            if self._stopping:  # ...or is seen here: else socketserver's would serve on
                self._serving = None  # a later shutdown() must not wait for it
                return
        super().serve_forever(poll_interval)

    def shutdown(self):
        """Stop serve_forever() and wait for it; from its own thread (a signal handler)
        or before it started, return at once: socketserver's would wait forever."""
        with self._state:
            self._stopping, serving = True, self._serving
        self._feed.close()  # requests waiting for events are answered now
        if serving is threading.current_thread():  # what socketserver's shutdown() sets, without
            self._BaseServer__shutdown_request = True  # its wait, or a thread (there may be none)
        elif serving is not None:
            super().shutdown()

    def server_close(self):
        """Close the port, end idle connections, let requests in flight finish
        (bounded by SHUTDOWN_GRACE), refuse later changes, release the data dir."""
        self._feed.close(final=True)  # at once: shutdown() may wait for serve_forever's poll
        self.shutdown()  # serve_forever() too: socketserver's would spin on the closed port
        with self._state:
            self._closing, entries = True, list(self._connections.items())
        for sock, (thread, state, _) in entries:
            if state != _BUSY:
                _shut(sock)
        super().server_close()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for sock, (thread, state, _) in entries:
            if thread is not threading.current_thread():  # a handler may close us
                thread.join(max(0.0, deadline - time.monotonic()))
                with self._state:  # cut as a sweep cuts (a body read later is never applied),
                    entry = self._connections.get(sock, [0, 0, math.inf])  # but not a save: its
                    if entry[2] < math.inf:  # answer follows it. Others end, stalled ones too
                        entry[1] = _CLOSING
                        _shut(sock)
        documents = (self.settings, self.synced)
        if all([document.close(max(0.0, deadline - time.monotonic())) for document in documents]):
            return self._unlock()
        # A save goes on: the data dir stays locked (no other instance beside it) until it ends.
        with contextlib.suppress(RuntimeError):  # at exit (3.12: no thread), the OS unlocks it
            threading.Thread(target=self._unlock, args=documents, daemon=True).start()

    def _unlock(self, *saving):
        """Release the data dir, once the saves of the documents given have ended."""
        for document in saving:
            document.close(None)  # waits for its save to end
        with self._state:  # once: a second server_close() may end its wait at the same time
            lock, self._dir_lock = self._dir_lock, None
        if lock is not None:
            with contextlib.suppress(OSError):  # EIO (a share's handle lost): closed all the same
                os.close(lock)  # releases the lock

    def process_request(self, request, client_address):
        """A thread per connection; at the cap, the one idle longest makes room, or a 503."""
        thread = threading.Thread(target=self.process_request_thread, daemon=True,
                                  args=(request, client_address), name="qabel_rest connection")
        with self._state:
            state, deadline = _IDLE, time.monotonic() + self.idle_timeout
            entries = self._connections
            if sum(entry[1] != _CLOSING for entry in entries.values()) >= self.max_connections:
                idle = min(entries, key=lambda s: (entries[s][1] != _IDLE, entries[s][2]))
                # A new one's deadline is _ROOM_AFTER later: its first request is on its way,
                # so until then it is neither idle longest nor due to make room.
                if entries[idle][1] != _IDLE or entries[idle][2] > deadline:
                    state = _CLOSING  # refused at once by its handler: 503, Retry-After
                else:
                    _shut(idle)
                    entries[idle][1] = _CLOSING
            entries[request] = [thread, state, deadline + _ROOM_AFTER]
        thread.start()  # no thread to be had: socketserver shuts the request down, as below

    def get_request(self):  # out of descriptors or memory, the port stays ready: a pause, or
        try:  # the loop would spin, a core busy until a connection closes (asyncio pauses too)
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)
            raise

    def shutdown_request(self, request):  # the end of every connection, served or not
        with self._state:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self):
        """Close connections idle past idle_timeout or busy past request_timeout (a client
        trickling bytes or never reading): on a socket, a timeout costs a poll() per read."""
        now = time.monotonic()
        with self._state:
            for sock, entry in self._connections.items():
                if entry[1] != _CLOSING and entry[2] < now:
                    _shut(sock)
                    entry[1] = _CLOSING

    def handle_error(self, request, client_address):
        """An error no handler answered (a reset during setup, or at the last flush): logged."""
        self.logger.debug("error on a connection from %s", client_address[0], exc_info=True)

    def _move(self, sock, old, new, seconds):
        """Move a connection from state old to new, its deadline seconds from now; False
        (and no move) if it is not in state old, or the server is closing (but for a save)."""
        with self._state:
            entry = self._connections[sock]
            if self._closing and seconds < math.inf or entry[1] != old:  # a save is answered
                return False
            entry[1:] = new, time.monotonic() + seconds
            return True


def make_server(data_dir=None, api_key=None, host=DEFAULT_HOST, port=DEFAULT_PORT, *,
                max_body=DEFAULT_MAX_BODY, allowed_hosts=(),
                idle_timeout=DEFAULT_IDLE_TIMEOUT, request_timeout=DEFAULT_REQUEST_TIMEOUT,
                max_connections=DEFAULT_MAX_CONNECTIONS, handler_class=RequestHandler):
    """Load both documents and the key, bind, lock the data dir, write any missing document (and a
    new key file); return a QabelRestServer. data_dir, api_key, host default as on the command line.
    StartupError if the server cannot start: then no file was changed or created."""
    limits = (("max_body", max_body, int), ("max_connections", max_connections, int),
              ("idle_timeout", idle_timeout, float), ("request_timeout", request_timeout, float))
    for name, value, kind in limits:  # a float may be given as an int, never as a bool
        top = sys.float_info.max if kind is float else math.inf  # not NaN; 10**400 is no float
        if type(value) is bool or not isinstance(value, (int, kind)) or not 0 < value <= top:
            raise StartupError(f"{name} must be a positive " + ("number", "integer")[kind is int])
    if RequestHandler not in getattr(getattr(handler_class, "func", handler_class), "__mro__", ()):
        raise StartupError("handler_class must be a subclass of RequestHandler")  # or a partial
    allowed_hosts = [allowed_hosts] if isinstance(allowed_hosts, str) else list(allowed_hosts)
    data_dir = os.path.abspath(data_dir or default_data_dir())
    host = host or DEFAULT_HOST  # "" too: bound as it is, it would listen on every interface
    settings = SettingsDocument(os.path.join(data_dir, _LOCAL_FILE), LOCAL_SCHEMA, LOCAL_DEFAULTS)
    synced = SettingsDocument(os.path.join(data_dir, _SYNCED_FILE), SYNCED_SCHEMA, SYNCED_DEFAULTS)
    # First what can fail without writing; then what creates files; last what changes some.
    settings.load()
    synced.load()
    api_key, key_source = _find_api_key(api_key, data_dir)
    with _startup_error("the data dir is not readable", data_dir):
        existed = set(os.listdir(data_dir)) if os.path.isdir(data_dir) else None
    new_dir = existed is None
    with contextlib.suppress(ImportError, ValueError, OverflowError, OSError):  # POSIX: room
        import resource  # for the connections (macOS starts an app with 256 files)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if 0 <= soft < max_connections + 64:  # + the documents', an embedding app's; no lower
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_connections + 64, hard))
    try:
        server = QabelRestServer((host, port), handler_class, data_dir=data_dir, settings=settings,
                                 synced=synced, allowed_hosts=allowed_hosts,
                                 **{name: value for name, value, _ in limits})  # as checked
    except (OSError, OverflowError, TypeError) as exc:  # a host IDNA cannot encode, a port "1"
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StartupError(f"cannot listen on {host}:{port}: {reason} ({data_dir})") from None
    try:
        with _startup_error("cannot create the data dir", data_dir):
            if not os.path.isdir(data_dir):  # exist_ok: another start may be creating it too
                os.makedirs(data_dir, mode=_DIR_MODE, exist_ok=True)
                with contextlib.suppress(OSError):  # a file system without modes (FAT) refuses it
                    os.chmod(data_dir, _DIR_MODE)  # makedirs' mode is filtered by the umask
            st = os.stat(data_dir)  # POSIX: the user's alone (Windows: as its ACL allows)
            if os.name == "posix" and (st.st_uid != os.geteuid() or st.st_mode & stat.S_IWOTH):
                raise StartupError(f"another user owns or may write to the data dir ({data_dir})")
        server._dir_lock = _lock_data_dir(data_dir)  # before any write: refused, no trace
        # No other instance runs now: files one made since the listing are not this start's.
        with _startup_error("the data dir is not readable", data_dir):
            existed = (existed or set()) | set(os.listdir(data_dir)) - {_LOCK_FILE}
        probe = os.path.join(data_dir, f".{_LOCK_FILE}.{os.urandom(6).hex()}.tmp")
        with _startup_error("the data dir is not writable", data_dir):  # for saves' temp files
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
            os.unlink(probe)
        for document in (settings, synced):
            document.load(create=True)  # again, now that no other instance can be writing
        if generated := api_key is None:  # a new key of 256 bits, in hex: never a leading "-"
            import secrets  # that a command line takes for an option (imported: a first start)
            api_key = secrets.token_hex(32)
            with _startup_error("cannot write the key file", key_source):
                atomic_write(key_source, (api_key + "\n").encode("ascii"))
        with _startup_error("cannot write the lock file", data_dir):  # our pid, for the next,
            written = os.write(server._dir_lock, f"{os.getpid()}\n".encode())  # over the old one
            os.ftruncate(server._dir_lock, written)  # then the rest: a failed write changes nothing
        if generated:  # said once nothing can fail the start (which would remove the file)
            _logger().info("generated a new API key in %s", _one_line(key_source))
        prefixes = tuple(f".{n}." for n in (_LOCAL_FILE, _SYNCED_FILE, _KEY_FILE, _LOCK_FILE))
        for name in existed:  # temp files of a process killed mid-write: never current
            if name.startswith(prefixes) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(data_dir, name))
        server._api_key, server.key_source = api_key.encode("ascii"), key_source
    except BaseException:
        if server._dir_lock is not None:  # ours alone: remove what this start made
            with contextlib.suppress(Exception):  # not listed (no descriptor or memory left)
                for name in set(os.listdir(data_dir)) - (existed or set()):
                    with contextlib.suppress(OSError):  # Windows: the open lock file stays
                        os.unlink(os.path.join(data_dir, name))
        server.server_close()
        if new_dir:  # made by this start, unless another one's files are in it
            with contextlib.suppress(OSError):
                os.rmdir(data_dir)
        raise
    return server


# --- Command line -------------------------------------------------------------

_CLIENT_COMMANDS = {  # command -> its arguments; a ? makes one optional
    "get": "doc key?", "set": "doc key value", "patch": "doc file", "export": "doc file?",
    "import": "doc file", "watch": ""}


def _client(command, argv):
    """Run a client command (get, set, patch, export, import, watch); the exit status."""
    import argparse
    parser = argparse.ArgumentParser(f"qabel_rest {command}", description="A qabel_rest client.")
    parser.add_argument("--url", default=os.environ.get("QABEL_REST_URL")
                        or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    parser.add_argument("--api-key", help="default: $QABEL_REST_API_KEY, else DATA_DIR/api-key")
    parser.add_argument("--data-dir", help="the server's, for its key file")
    for argument in _CLIENT_COMMANDS[command].split():
        parser.add_argument(argument.rstrip("?"), nargs="?" if "?" in argument else None)
    if command == "set":
        parser.add_argument("--merge", action="store_true")
    after = argv[argv.index("--") + 1:] if "--" in argv else []  # intermixed parsing takes a
    args, unknown = (parser.parse_known_args if any(a[:1] == "-" for a in after)  # "-x" there
                     else parser.parse_known_intermixed_args)(argv)  # for an option
    if unknown or "--" in after:  # not shown, as argparse would: a mistyped option may precede
        parser.error("unrecognized arguments")  # the key; a 2nd "--": dropped until gh-81691
    if getattr(args, "doc", "settings") not in ("settings", "synced"):  # nor quoted: it
        parser.error("DOC must be settings or synced")  # may be a key after a mistyped option
    if args.data_dir == "":  # "$DIR" with DIR unset: never the user's own key by mistake
        parser.error("--data-dir must not be empty")
    if not (_is_url(args.url) and re.fullmatch(r"(?i:http)://[^/?#@]+/?", args.url)):
        parser.error("--url (or $QABEL_REST_URL) must be http://HOST[:PORT]")  # no path: the
    url = urllib.parse.urlsplit(args.url)  # server answers at its root (a proxy's prefix too)
    connection = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=90)

    def call(method, path, body=_MISSING, media=_JSON_TYPE, allow=()):
        try:
            body = None if body is _MISSING else json.dumps(  # null is a body too; what no
                body, default=_Unfit.refuse, allow_nan=False).encode()  # document holds: refused
            try:
                connection.request(method, path, body, {"X-API-Key": key, "Content-Type": media})
            except (BrokenPipeError, ConnectionResetError):  # a body refused unread (413): its
                if connection.sock is None:  # answer came (unless the connect itself failed)
                    raise
            with connection.getresponse() as response:  # closed now: closed by its finalizer,
                data = response.read()  # it would swallow a Ctrl-C (a watch's end)
        except (OSError, http.client.HTTPException, UnicodeError) as exc:  # (IDNA: the host)
            raise QabelRestError(f"cannot reach {args.url}: {exc}") from None
        answer = None  # if not JSON: not a qabel_rest answer (a proxy's error page, say)
        with contextlib.suppress(ValueError):
            answer = json.loads(data)
        if type(answer) is not dict or response.status != 200 and response.status not in allow:
            error = answer.get("error") if type(answer) is dict else None
            raise QabelRestError(f"{response.status} {error or response.reason}")
        return response.status, answer

    def read(name):
        try:
            with open(name, "rb") if name != "-" else contextlib.nullcontext(sys.stdin.buffer) as f:
                return _parse_json(f.read())
        except (OSError, _NotJSON) as exc:
            raise QabelRestError(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}")

    def write(name, value, indent=2):  # UTF-8, whatever the console's encoding
        text = json.dumps(value, indent=indent, ensure_ascii=False).encode("utf-8") + b"\n"
        with (open(name, "wb", opener=lambda p, flags: os.open(p, flags, _FILE_MODE))  # 0600:
              if name not in (None, "-") else contextlib.nullcontext(  # synced holds keys
                  getattr(sys.stdout.buffer, "raw", sys.stdout.buffer))) as file:  # unbuffered:
            view = memoryview(text)  # what a buffer kept as a reader left would fail the exit's
            while view:  # flush too (exit 120). A raw file may take a part, and not raise;
                view = view[file.write(view):]  # FILE's close flushes it, inside the `with`

    try:
        data_dir = os.path.abspath(args.data_dir or default_data_dir())
        key = _find_api_key(args.api_key, data_dir)[0]
        if key is None:
            raise QabelRestError(f"no API key: give --api-key, set ${_ENV_API_KEY}, or name "
                                 f"the server's data dir with --data-dir (not {data_dir})")
        path = f"/{getattr(args, 'doc', '')}"
        segments = getattr(args, "key", None)  # dotted, or a JSON array (as in a form PUT)
        if segments and segments.startswith("["):
            segments = _parse_json(segments)
        if command in ("get", "export"):
            document = call("GET", path)[1]
            write(getattr(args, "file", None), document if segments is None else
                  _lookup(document, parse_key(segments)))
        elif command == "set":
            value = args.value  # a plain string, unless it is JSON
            with contextlib.suppress(_NotJSON):  # JSON no document holds is refused
                value = _parse_json(args.value)
            call("PUT", path, {"key": segments, "value": value, "merge": args.merge})
        elif command == "patch":
            call("PATCH", path, read(args.file), _PATCH_TYPE)
        elif command == "import":
            call("POST", path, {"settings": read(args.file)})
        else:  # watch, until SIGINT (also when started with SIGINT ignored, as by `&`)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            cursor = call("GET", "/events")[1]["cursor"]
            while True:
                query = urllib.parse.urlencode({"since": cursor,  # Windows: Ctrl-C cannot end
                                                "timeout": 60 if os.name != "nt" else 2})  # a wait
                status, answer = call("GET", f"/events?{query}", allow=(410,))
                if status == 410:
                    print("qabel_rest: events were missed; going on from now",
                          file=sys.stderr, flush=True)
                for event in answer.get("events", ()):
                    write(None, event, None)
                cursor = answer["cursor"]
    except (Exception, KeyboardInterrupt) as e:  # one line, whatever failed (SPEC 9)
        if isinstance(e, KeyboardInterrupt) and command == "watch":
            return 0  # watch ends on SIGINT; another command cut short has failed
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else _one_line(e)
        print(f"qabel_rest: {reason or type(e).__name__}", file=sys.stderr, flush=True)
        return 1  # (a closed stdout, a FILE past memory, an answer too deep or too large)
    finally:  # not left to its finalizer: python -X dev would warn of it on stderr
        connection.close()
    return 0


def main(argv=None):
    """Run the server until SIGINT or SIGTERM, or a client command; the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in _CLIENT_COMMANDS:  # what a Ctrl-C cut half built (an
        hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None  # HTTPResponse,
        try:  # a SocketIO) fails in its finalizer: no "Exception ignored" after the one line
            return _client(argv[0], argv[1:])
        finally:
            sys.unraisablehook = hook
    argv = argv[1:] if argv[:1] == ["serve"] else argv
    import argparse  # here, not at the top: an embedding app never needs it
    parser = argparse.ArgumentParser(prog="qabel_rest", description="The local REST server of "
                                     "the Qabel desktop client. Client: qabel_rest get|set|patch|"
                                     "export|import|watch ... (--help after the command).")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port, 0 for any free one (%(default)s)")
    parser.add_argument("--data-dir", help="where the documents and the key file live")
    parser.add_argument("--api-key", help="the API key (default: $QABEL_REST_API_KEY, "
                                          "else DATA_DIR/api-key, generated if missing)")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY,
                        metavar="BYTES", help="largest request body (%(default)s)")
    parser.add_argument("--allowed-host", action="extend", nargs="+", default=[],
                        metavar="NAME", help="another name clients may send as Host (repeatable)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # not shown, as argparse would: a mistyped option may precede the key
        parser.error("unrecognized arguments")
    if args.max_body < 1:
        parser.error("--max-body must be a positive number of bytes")
    if "" in (args.host, args.data_dir):  # "$X", X unset: not every interface, nor the user's data
        parser.error(f"{'--host' if args.host == '' else '--data-dir'} must not be empty")
    import logging
    logging.basicConfig(level="INFO", format="%(asctime)s qabel_rest %(levelname)s %(message)s")
    try:
        server = make_server(args.data_dir, args.api_key, args.host, args.port,
                             max_body=args.max_body, allowed_hosts=args.allowed_host)
    except StartupError as exc:
        print(f"qabel_rest: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    try:  # closed whatever fails: a thread but the main one cannot set a signal's handler
        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):  # shutdown() returns at once in the serving thread
                signal.signal(getattr(signal, name), lambda signum, frame: server.shutdown())
        with contextlib.suppress(AttributeError):  # no stdout (pythonw), or not a text file
            sys.stdout.reconfigure(errors="backslashreplace")  # a path it cannot encode
        try:
            source = f"{'file' if os.path.isabs(server.key_source) else 'from'} {server.key_source}"
            print(f"qabel_rest listening on {server.url} (API key {_one_line(source)})", flush=True)
        except OSError:  # stdout full, or a pipe nobody reads: serve all the same, to devnull
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the exit flushes)
        server.serve_forever()
    finally:
        server.server_close()
    _logger().info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
