"""qabel_rest: the local REST server of the Qabel desktop client.

The desktop app starts it (in a thread, or as its own process) on 127.0.0.1:9696;
every other local program reads and changes the client's two settings documents
through it:

    GET  /settings   the local settings document       PUT  {"key": K, "value": V}
    GET  /synced     the synced settings document      POST {"settings": {...}}
    GET  /health     {"status": "ok"}, no key needed

Usage:

    python qabel_rest.py --port 9696 --data-dir ~/.config/qabel-rest

    server = qabel_rest.make_server(data_dir=path, api_key=key, port=9696)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.settings.put("poll_interval", 10)
    server.shutdown(); server.server_close()

Security stance: the documents hold private keys and tokens, so every request must
name an allowed Host (against DNS rebinding), carry no foreign Origin (against web
pages), and present the API key (X-API-Key or Authorization: Bearer, compared in
constant time) except GET /health. No CORS header is ever sent; errors and logs never
contain the key or a settings value; files are mode 0600 in a 0700 directory.
"""

import copy
import errno
import io
import json
import math
import os
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections import namedtuple
from http import HTTPStatus
from types import MappingProxyType

try:  # POSIX: advisory lock released by the OS when the process dies
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:  # Windows: byte-range lock, also released when the process dies
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

__version__ = "1.0.0"
__all__ = [
    "QabelRestError",
    "StartupError",
    "InvalidKey",
    "InvalidValue",
    "DocumentUnavailable",
    "SaveError",
    "DocumentChanged",
    "SettingsDocument",
    "QabelRestServer",
    "RequestHandler",
    "make_server",
    "main",
]


def _logger():
    """The logger "qabel_rest". logging (and hmac, below) are imported when a server
    is made, not on import: together they are a third of the import time."""
    import logging
    return logging.getLogger("qabel_rest")


# ---------------------------------------------------------------------------
# Constants and schema
# ---------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9696  # the port of the Qabel spec
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: a synced document with many identities fits
DEFAULT_IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may wait for a request
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds for one whole request, first byte to last
DEFAULT_MAX_CONNECTIONS = 128  # one thread each; beyond, an idle one is closed, or 503
SHUTDOWN_GRACE = 5.0  # seconds server_close() waits for requests in flight

# Any JSON value may nest at most this deep (document root = 0). Far below the
# interpreter's recursion limit, so no parser or validator ever hits it.
MAX_DEPTH = 64
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
# Longest decimal text of a 64-bit integer, with sign. Longer text is out of range,
# and int() never sees it (CPython refuses over 4,300 digits with a ValueError).
_MAX_INT_TEXT = 20

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_ENV_DATA_DIR = "QABEL_REST_DATA_DIR"
_ENV_API_KEY = "QABEL_REST_API_KEY"
_KEY_FILE = "api-key"
_LOCK_FILE = "qabel_rest.lock"
_SETTINGS_FILE = "settings.json"
_SYNCED_FILE = "synced.json"
_FILE_MODE = 0o600
_DIR_MODE = 0o700

# The schema of the Qabel "Client Configuration". A node is one of:
#   a leaf name (a key of _LEAVES), "any" (any JSON value),
#   _Obj: an object with declared fields only, some of them required,
#   _List: a list of items; items with an "id" field must have unique ids,
#   _Map: an object with any names, each value of one kind.
_Obj = namedtuple("_Obj", "fields required")
_List = namedtuple("_List", "item")
_Map = namedtuple("_Map", "value")


def _is_url(value):
    # RFC 3986: no spaces or control characters anywhere in a URI
    if type(value) is not str or not value.isprintable() or " " in value:
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_count(value):
    return type(value) is int and 0 <= value <= _INT64_MAX


# leaf name -> (what it must be, for error messages; its check)
_LEAVES = MappingProxyType({
    "id": ("an integer >= 0", _is_count),
    "time": ("an integer >= 0 (seconds since the epoch)", _is_count),
    "interval": ("a number > 0", lambda v: type(v) in (int, float) and v > 0),
    "str": ("a string", lambda v: type(v) is str),
    "bool": ("true or false", lambda v: type(v) is bool),
    "url": ("an absolute http or https URL", _is_url),
    "name": ("a non-empty string", lambda v: type(v) is str and v != ""),
    "key": ("a string", lambda v: type(v) is str),
    "object": ("an object", lambda v: type(v) is dict),
})


def _item(**fields):
    """An item of a synced list: id (required, unique), time stamps, and fields."""
    declared = {"id": "id", "updated": "time", "created": "time", "deleted": "time"}
    declared.update(fields)
    return _Obj(MappingProxyType(declared), frozenset({"id"}))


_MODULE_DATA = _Map("object")  # module name -> object, anything JSON inside
_KEY_NAMES = ("private_primary_key", "public_primary_key", "private_enc_key",
              "public_enc_key", "private_sign_key", "public_sign_key")

LOCAL_SCHEMA = _Obj(MappingProxyType({
    "poll_interval": "interval",
    "drop_last_update": "str",
    "module_data": _MODULE_DATA,
}), frozenset())

SYNCED_SCHEMA = _Obj(MappingProxyType({
    "accounts": _List(_item(provider="str", user="str", auth="str")),
    "drop_servers": _List(_item(url="url", auth="str", active="bool")),
    "storage_servers": _List(_item(url="url", auth="str")),
    "storage_volumes": _List(_item(storage_server_id="id", public_identifier="str",
                                   token="str", revoke_token="str")),
    "identities": _List(_item(
        alias="name",
        keys=_Obj(MappingProxyType({name: "key" for name in _KEY_NAMES}), frozenset()),
        drops=_List("url"))),
    "module_data": _MODULE_DATA,
}), frozenset())

# The documents of a fresh data dir, as JSON text so that nobody can change them.
# A stored document missing a top-level field gets it from here.
LOCAL_DEFAULTS = '{"poll_interval": 30, "drop_last_update": "", "module_data": {}}'
SYNCED_DEFAULTS = ('{"accounts": [], "drop_servers": [], "storage_servers": [],'
                   ' "storage_volumes": [], "identities": [], "module_data": {}}')


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class QabelRestError(Exception):
    """Base of every error this module raises; `status` is its HTTP answer."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message, status=None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = HTTPStatus(status)


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


class DocumentChanged(QabelRestError):
    """Another program kept rewriting the file during a save of this change: 409."""

    status = HTTPStatus.CONFLICT


class _HTTPError(QabelRestError):
    """An answer of the request path: status, extra headers, and whether to close."""

    def __init__(self, status, message, headers=(), close=False):
        super().__init__(message, status)
        self.headers = headers
        self.close = close


class _NotJSON(ValueError):
    """The text does not parse as JSON (RFC 8259)."""


# ---------------------------------------------------------------------------
# JSON and dotted keys
# ---------------------------------------------------------------------------

def _is_digits(text):
    """One run of ASCII digits (str.isdigit alone also takes other scripts' digits)."""
    return text.isascii() and text.isdigit()


def _is_index(segment):
    """A decimal list index: digits, no leading zero."""
    return _is_digits(segment) and (segment == "0" or segment[0] != "0")


def _reject_constant(name):
    raise _NotJSON(f"{name} is not JSON")


def _parse_int(text):
    if len(text) > _MAX_INT_TEXT:
        raise InvalidValue("an integer is out of the 64-bit range")
    return int(text)


def _parse_float(text):
    number = float(text)
    if not math.isfinite(number):  # 1e400 parses to inf
        raise InvalidValue("a number is out of range")
    return number


def _build_object(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        raise InvalidValue("an object has a duplicate key")
    return result


# Stateless, so one instance of each serves every thread. Documents and answers are
# compact: json.dumps with indent runs the pure-Python encoder, about ten times
# slower than the C one on a large document.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(object_pairs_hook=_build_object, parse_float=_parse_float,
                            parse_int=_parse_int, parse_constant=_reject_constant)


def _parse_json(data):
    """Parse strict JSON from UTF-8 bytes or text.

    Raises _NotJSON when it is not JSON at all, InvalidValue when it is JSON that no
    document may hold (duplicate keys, numbers out of range, too deep).
    """
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


def _dump_document(document):
    """The bytes of a JSON value as served and stored: compact UTF-8 JSON."""
    return _ENCODER.encode(document).encode("utf-8")


def parse_key(key):
    """Split a dotted key (or take a list of segments) into a tuple of segments.

    `\\.` is a literal dot and `\\\\` a literal backslash. Raises InvalidKey.
    """
    if type(key) is str:
        if key == "":
            raise InvalidKey("the key is empty")
        segments = key.split(".") if "\\" not in key else _split_escaped(key)
    elif type(key) in (list, tuple):
        if not key:
            raise InvalidKey("the key is empty")
        segments = []
        for segment in key:
            if type(segment) is int and segment >= 0:
                segment = str(segment)
            elif type(segment) is not str:
                raise InvalidKey("key segments must be strings")
            segments.append(segment)
    else:
        raise InvalidKey("the key must be a string or a list of strings")
    for segment in segments:
        if segment == "":
            raise InvalidKey("the key has an empty segment")
        if not _is_text(segment):
            raise InvalidKey("the key is not valid Unicode")
    return tuple(segments)


def _split_escaped(text):
    segments, current = [], []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped not in (".", "\\"):
                raise InvalidKey("the key has a backslash not followed by . or \\")
            current.append(escaped)
        elif char == ".":
            segments.append("".join(current))
            current = []
        else:
            current.append(char)
    segments.append("".join(current))
    return segments


def format_key(segments):
    """The dotted form of a tuple of segments, escaping dots and backslashes."""
    return ".".join(s.replace("\\", "\\\\").replace(".", "\\.") for s in segments) or "(document)"


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def _is_text(text):
    """True if text is valid Unicode: no lone surrogates, so it encodes as UTF-8."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_json(value, path):
    """Check that value is plain JSON that stays strict UTF-8 JSON when written."""
    kind = type(value)
    if kind is str:
        if not _is_text(value):
            raise InvalidValue(f"{format_key(path)}: a string is not valid Unicode")
    elif kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidValue(f"{format_key(path)}: an integer is out of the 64-bit range")
    elif kind is float:
        if not math.isfinite(value):
            raise InvalidValue(f"{format_key(path)}: NaN and Infinity are not JSON")
    elif kind is dict or kind is list:
        if len(path) >= MAX_DEPTH:
            raise InvalidValue(f"{format_key(path[:MAX_DEPTH])}: nested deeper than "
                               f"{MAX_DEPTH} levels")
        if kind is list:
            for index, item in enumerate(value):
                _check_json(item, path + (str(index),))
            return
        for name, item in value.items():
            if type(name) is not str or not _is_text(name):
                raise InvalidValue(f"{format_key(path)}: object keys must be strings")
            _check_json(item, path + (name,))
    elif not (kind is bool or value is None):
        raise InvalidValue(f"{format_key(path)}: not a JSON value")


def _check_schema(value, node, path):
    """Check value (already plain JSON) against a schema node."""
    if type(node) is str:
        if node != "any":
            what, check = _LEAVES[node]
            if not check(value):
                raise InvalidValue(f"{format_key(path)}: must be {what}")
    elif type(node) is _Obj:
        if type(value) is not dict:
            raise InvalidValue(f"{format_key(path)}: must be an object")
        for name, item in value.items():
            field = node.fields.get(name)
            if field is None:
                raise InvalidValue(f"{format_key(path + (name,))}: unknown field")
            _check_schema(item, field, path + (name,))
        for name in sorted(node.required - value.keys()):
            raise InvalidValue(f"{format_key(path + (name,))}: required field is missing")
    elif type(node) is _List:
        if type(value) is not list:
            raise InvalidValue(f"{format_key(path)}: must be a list")
        for index, item in enumerate(value):
            _check_schema(item, node.item, path + (str(index),))
        if _has_ids(node):
            seen = set()
            for index, item in enumerate(value):
                if item["id"] in seen:
                    raise InvalidValue(f"{format_key(path + (str(index), 'id'))}: duplicate id")
                seen.add(item["id"])
    else:  # _Map
        if type(value) is not dict:
            raise InvalidValue(f"{format_key(path)}: must be an object")
        for name, item in value.items():
            _check_schema(item, node.value, path + (name,))


def _has_ids(node):
    return type(node) is _List and type(node.item) is _Obj and "id" in node.item.fields


def validate(value, node, path=()):
    """Raise InvalidValue unless value is valid JSON for the schema node at path."""
    _check_json(value, path)
    _check_schema(value, node, path)


def _child_node(node, segment, path):
    """The schema node below node at segment; InvalidKey if there is none."""
    if type(node) is _Obj:
        field = node.fields.get(segment)
        if field is None:
            raise InvalidKey(f"{format_key(path)}: unknown field")
        return field
    if type(node) is _Map:
        return node.value
    if node in ("any", "object"):
        return "any"
    raise InvalidKey(f"{format_key(path)}: cannot go below a {node} value")


def _empty_container(node, path):
    """A missing intermediate container for a key that goes below it."""
    if type(node) is _List:
        return []
    if type(node) in (_Obj, _Map) or node in ("any", "object"):
        return {}
    raise InvalidKey(f"{format_key(path)}: cannot go below a {node} value")


def _deep_merge(base, patch):
    """A new object: patch's fields over base's, objects merged recursively."""
    result = dict(base)
    for name, value in patch.items():
        old = result.get(name)
        if type(old) is dict and type(value) is dict:
            value = _deep_merge(old, value)
        result[name] = value
    return result


_MISSING = object()


def _assign(node_value, node, path, depth, value, merge):
    """Return (a copy of node_value with value set at path[depth:], the stored value).

    node_value is never changed: containers on the path are copied, the rest is
    shared. The new value is validated against the schema, and only it (plus the ids
    of the list it lands in): the rest of the document is valid already.
    """
    segment = path[depth]
    here = path[:depth + 1]
    last = depth == len(path) - 1
    if type(node_value) is dict:
        child = _child_node(node, segment, here)
        result = dict(node_value)
        if last:
            result[segment] = stored = _new_value(node_value.get(segment, _MISSING),
                                                  value, merge, child, here)
        else:
            old = node_value.get(segment, _MISSING)
            if old is _MISSING:
                old = _empty_container(child, here)
            result[segment], stored = _assign(old, child, path, depth + 1, value, merge)
        return result, stored
    if type(node_value) is list:
        item_node = node.item if type(node) is _List else "any"
        if segment == "-":
            if not last:
                raise InvalidKey(f"{format_key(here)}: '-' can only be the last segment")
            index = len(node_value)
        elif _is_index(segment) and int(segment) < len(node_value):
            index = int(segment)
        else:
            raise InvalidKey(f"{format_key(here)}: no such list item")
        result = list(node_value)
        if index == len(result):
            result.append(None)
        if last:
            old = node_value[index] if index < len(node_value) else _MISSING
            result[index] = stored = _new_value(old, value, merge, item_node, here)
        else:
            result[index], stored = _assign(node_value[index], item_node, path,
                                            depth + 1, value, merge)
        if _has_ids(node):
            _check_unique_id(result, index, here)
        return result, stored
    raise InvalidKey(f"{format_key(path[:depth])}: cannot go below a scalar value")


def _new_value(old, value, merge, node, path):
    if value is _MISSING:
        raise InvalidValue("the value is missing")
    if merge and type(old) is dict and type(value) is dict:
        value = _deep_merge(old, value)
    validate(value, node, path)
    return value


def _check_unique_id(items, index, path):
    new_id = items[index]["id"]
    for other_index, item in enumerate(items):
        if other_index != index and item["id"] == new_id:
            raise InvalidValue(f"{format_key(path + ('id',))}: duplicate id")


def _lookup(document, path):
    value = document
    for depth, segment in enumerate(path):
        if type(value) is dict and segment in value:
            value = value[segment]
        elif (type(value) is list and _is_index(segment)
              and int(segment) < len(value)):
            value = value[int(segment)]
        else:
            raise InvalidKey(f"{format_key(path[:depth + 1])}: no such key")
    return value


# ---------------------------------------------------------------------------
# Storage: atomic, durable files
# ---------------------------------------------------------------------------

_REPLACE_ATTEMPTS = 6  # Windows: a virus scanner or indexer may hold the file briefly
_REPLACE_BACKOFF = 0.01  # seconds, doubled each attempt (0.31 s in all)
_REBASE_ATTEMPTS = 3  # a file rewritten under us this often in one save: 409
# O_EXCL: never reuse or follow an existing name. Windows: binary, not inherited.
_TEMP_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
               | getattr(os, "O_NOINHERIT", 0))


def _replace_file(source, target):
    """os.replace, retried a bounded number of times on PermissionError.

    On Windows, replacing a file another process has open (antivirus, indexer,
    backup) fails with a sharing violation that clears within milliseconds.
    """
    delay = _REPLACE_BACKOFF
    for attempt in range(_REPLACE_ATTEMPTS):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if attempt == _REPLACE_ATTEMPTS - 1:
                raise
            time.sleep(delay)
            delay *= 2


def _fsync_file(fd):
    # macOS fsync() does not flush the drive's cache; F_FULLFSYNC does.
    if fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):  # pragma: no cover - macOS
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def _open_dir(directory):
    """A descriptor to fsync directory with, or None where that is not possible:
    Windows cannot open a directory as a file, and NTFS journals renames itself."""
    if os.name != "posix":  # pragma: no cover - Windows
        return None
    return os.open(directory, os.O_RDONLY)


def _fsync_dir(directory, dir_fd=None):
    """Make a rename in directory durable (POSIX)."""
    fd = _open_dir(directory) if dir_fd is None else dir_fd
    if fd is None:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        if dir_fd is None:
            os.close(fd)


def atomic_write(path, data, dir_fd=None):
    """Write data to path atomically and durably, mode 0600.

    A temp file in the same directory is written, fsynced and renamed over path,
    then the directory is fsynced (through dir_fd if given, an open descriptor of
    it). On failure the temp file is removed, path is untouched, and the OSError
    propagates.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(6).hex()}.tmp")
    fd = os.open(temp, _TEMP_FLAGS, _FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            _fsync_file(fd)
        finally:
            os.close(fd)
        _replace_file(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_dir(directory, dir_fd)


def _file_signature(path):
    """What changes when another program rewrites the file; None if it is missing."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return ("unreadable", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_existing(path):
    """A descriptor to read path with, or None if it is missing. Raises OSError."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except (FileNotFoundError, NotADirectoryError):  # a missing file or data dir
        return None


def _read_to_end(fd, size):
    """All of fd, read in one call when it holds size bytes (whatever the size, the
    file may have changed)."""
    data = os.read(fd, size + 1)
    if len(data) <= size:  # a short read is the end of a regular file
        return data
    chunks = [data]
    while data:
        data = os.read(fd, 1 << 16)
        chunks.append(data)
    return b"".join(chunks)


def _read_file(path):
    """(signature, content) of a file; (None, None) if it is missing. Raises OSError."""
    fd = _open_existing(path)
    if fd is None:
        return None, None
    try:
        st = os.fstat(fd)
        data = _read_to_end(fd, st.st_size)
    finally:
        os.close(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), data


def _read_content(path, expected):
    """The content of a file (None if missing), in one read if it is as long as
    expected: no stat, for the check before every save. Raises OSError."""
    fd = _open_existing(path)
    if fd is None:
        return None
    try:
        return _read_to_end(fd, len(expected or b""))
    finally:
        os.close(fd)


def _settle(ticket, outcome):
    """Give a change its outcome and wake its writer."""
    ticket[0] = outcome
    ticket[3].release()


# One version of a document; replaced whole, never changed.
#   document: the parsed value (never mutated), body: its bytes as served,
#   etag: a strong entity tag for body, signature/raw: the file it came from or went
#   to (raw None: no file), error: why the file cannot be used (then document is None).
_State = namedtuple("_State", "document body etag signature raw error")


class SettingsDocument:
    """One settings document: its file, schema, and current version.

    Thread-safe. A change is validated, then saved by the document's saver thread
    together with every change that arrived during the save before it (group commit:
    one fsync for many writers), and acknowledged only once the write containing it
    is durable. Readers see only what is on disk; they never wait, except for a file
    changed by another program.
    """

    def __init__(self, path, schema, defaults):
        self.path = path
        self.name = os.path.basename(path)
        self._schema = schema
        self._defaults = defaults
        self._etag_prefix = os.urandom(6).hex()  # new per process: tags never repeat
        self._generation = 0
        # _lock guards the fields below and is never held while the file is written.
        # Only the saver thread writes the file, so saves never overlap.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)  # the saver waits on it for work
        self._saver = None  # started by the first change
        self._durable = None  # _State on disk: what readers get
        self._head = None  # the newest accepted document, saved or not yet
        # A ticket per change not yet saved: [outcome, apply, result, done]. outcome
        # is None, then True or (exception class, message, status); done is a lock
        # held until the outcome is known.
        self._pending = []
        self._saving = False  # the saver is writing (its batch has left _pending)
        self._closed = False
        self._dir_fd = None  # the data dir, open for fsync once the first save needs it

    # -- public, in-process API ----------------------------------------------

    def get(self, key=None):
        """A copy of the whole document, or of the value at key."""
        state = self._current()
        if key is None:
            return json.loads(state.body)
        return copy.deepcopy(_lookup(state.document, parse_key(key)))

    def put(self, key, value, merge=False):
        """Set value at key (deep-merged into an object there if merge); return it."""
        return copy.deepcopy(self._put(key, copy.deepcopy(value), merge))

    def replace(self, document):
        """Substitute the whole document; return a copy of it as stored."""
        return copy.deepcopy(self._replace(copy.deepcopy(document)))

    # -- used by the HTTP handler: no defensive copies ---------------------------

    def load(self):
        """Read the file at startup (again: only if it changed); StartupError if it
        is unusable."""
        with self._lock:
            state = self._read_state(self._durable)
            self._set_durable(state)
        if state.error:
            raise StartupError(f"{self.name}: {state.error} ({self.path})")

    def create_if_missing(self):
        """At startup: write the default document if there is no file, so that the
        data dir shows (and other programs find) both documents."""
        with self._lock:
            state = self._durable
            if state.raw is not None or state.error:
                return
            try:
                atomic_write(self.path, state.body)
            except OSError as exc:
                raise StartupError(f"cannot write {self.name}: {exc.strerror} "
                                   f"({self.path})") from None
            self._durable = state._replace(signature=_file_signature(self.path),
                                           raw=state.body)

    def close(self):
        """Refuse every later change; a save under way finishes, waiting ones fail."""
        with self._lock:
            self._closed = True
            self._wakeup.notify()
            saver = self._saver
        if saver is not None:
            saver.join()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _quiet(self):
        """No change of ours is waiting or being saved, so the file is ours to read.
        Holds _lock."""
        return not self._pending and not self._saving

    def _current(self):
        """The version on disk, re-read first if another program changed the file."""
        state = self._durable
        if _file_signature(self.path) != state.signature:
            with self._lock:
                if self._quiet():
                    self._set_durable(self._read_state(self._durable))
                state = self._durable
        if state.error:
            raise DocumentUnavailable(f"{self.name} on disk is not valid: {state.error}")
        return state

    def _put(self, key, value, merge):
        path = parse_key(key)
        if type(merge) is not bool:
            raise InvalidValue("merge must be true or false")
        return self._change(lambda document: _assign(document, self._schema, path, 0,
                                                     value, merge))

    def _replace(self, document):
        validate(document, self._schema)
        complete = self._complete(document)
        return self._change(lambda _: (complete, complete))

    def _change(self, apply):
        """Apply a change to the newest document and save it; return what apply says.

        apply(document) -> (new document, result) must not change its argument.
        """
        with self._lock:
            if self._closed:
                raise DocumentUnavailable("the server is shutting down")
            if self._quiet():  # catch up with another program's change, if any
                self._set_durable(self._read_state(self._durable))
            if self._durable.error:
                raise DocumentUnavailable(
                    f"{self.name} on disk is not valid: {self._durable.error}")
            self._head, result = apply(self._head)
            done = threading.Lock()
            done.acquire()
            ticket = [None, apply, result, done]
            self._pending.append(ticket)
            if self._saver is None:
                self._saver = threading.Thread(target=self._run_saver, daemon=True,
                                               name=f"qabel_rest saver {self.name}")
                self._saver.start()
            self._wakeup.notify()
        done.acquire()  # until the saver settles the ticket
        if ticket[0] is not True:
            kind, message, status = ticket[0]
            raise kind(message, status)
        return ticket[2]

    def _run_saver(self):
        """The saver thread: save the newest document whenever changes wait.

        Group commit: each save holds every change accepted until it starts, and
        settles all of their tickets at once; changes arriving meanwhile wait for the
        next one, which starts the moment this one ends. A daemon thread: changes
        not yet saved at exit were never acknowledged.
        """
        with self._lock:
            while True:
                while not self._pending and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    self._fail((), DocumentUnavailable, "the server is shutting down")
                    return
                document, known = self._head, self._durable
                batch, self._pending = self._pending, []
                self._saving = True
                self._lock.release()
                try:
                    self._write_batch(document, known, batch)
                except BaseException:  # a bug: fail the batch, keep saving
                    _logger().exception("unexpected error saving %s", self.path)
                finally:
                    self._lock.acquire()
                    self._saving = False
                    for ticket in batch:
                        if ticket[0] is None:
                            _settle(ticket, (SaveError, "internal error while saving", None))

    def _write_batch(self, document, known, batch):
        # The file must still be what we last read or wrote. Compare content, not
        # stat: an in-place rewrite within one timestamp tick keeps size and mtime.
        for _ in range(_REBASE_ATTEMPTS):
            try:
                current = _read_content(self.path, known.raw)
            except OSError:
                current = ()
            if current == known.raw:
                break
            with self._lock:
                document, known, batch = self._rebase(batch)
            if not batch:
                return
        else:
            with self._lock:
                self._fail(batch, DocumentChanged,
                           f"{self.name} keeps being changed by another program")
            return
        body = _dump_document(document)
        try:
            if self._dir_fd is None:
                self._dir_fd = _open_dir(os.path.dirname(self.path))
            atomic_write(self.path, body, self._dir_fd)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EFBIG,
                                 getattr(errno, "EDQUOT", errno.ENOSPC))
            _logger().error("could not save %s: %s", self.path, exc.strerror)
            with self._lock:
                self._fail(batch, SaveError,
                           f"could not save {self.name}: {exc.strerror or 'error'}",
                           HTTPStatus.INSUFFICIENT_STORAGE if full else None)
            return
        state = self._new_state(document, body, _file_signature(self.path), body)
        with self._lock:
            self._durable = state  # the head stays: it may hold newer changes
            for ticket in batch:
                _settle(ticket, True)

    def _rebase(self, batch):
        """Another program rewrote the file while changes waited: take its content as
        current and apply the waiting changes to it again, in order; those no longer
        valid fail alone. Returns (document to save, its base, the batch left). Holds
        _lock."""
        fresh = self._durable = self._read_state(self._durable, force=True)
        if fresh.error:
            self._fail(batch, DocumentUnavailable,
                       f"{self.name} on disk is not valid: {fresh.error}")
            return None, fresh, []
        document = self._reapply(batch, fresh.document)
        self._head = self._reapply(self._pending, document)
        self._pending = [ticket for ticket in self._pending if ticket[0] is None]
        return document, fresh, [ticket for ticket in batch if ticket[0] is None]

    @staticmethod
    def _reapply(tickets, document):
        for ticket in tickets:
            try:
                document, ticket[2] = ticket[1](document)
            except QabelRestError as exc:
                _settle(ticket, (type(exc), exc.message, exc.status))
        return document

    def _fail(self, batch, kind, message, status=None):
        """Fail the batch and every change made after it (they were made on top of
        it); the newest document is the durable one again. Holds _lock."""
        outcome = (kind, message, status)
        for ticket in (*batch, *self._pending):
            _settle(ticket, outcome)
        self._pending = []
        self._head = self._durable.document

    def _set_durable(self, state):
        """Make state the version on disk and the newest. Holds _lock, and _quiet()."""
        self._durable = state
        if state.document is not None:
            self._head = state.document

    def _new_state(self, document, body, signature, raw):
        self._generation += 1
        return _State(document, body, f'"{self._etag_prefix}-{self._generation}"',
                      signature, raw, None)

    def _read_state(self, known, force=False):
        """The file's version: known itself if the file has not changed (by stat,
        unless force, and by content)."""
        if not force and known is not None and _file_signature(self.path) == known.signature:
            return known
        try:
            signature, data = _read_file(self.path)
        except OSError as exc:
            return _State(None, None, None, ("unreadable", exc.errno), (),
                          f"cannot read: {exc.strerror}")
        if known is not None and data == known.raw and known.error is None:
            return known._replace(signature=signature)
        if data is None:
            document = json.loads(self._defaults)
            return self._new_state(document, _dump_document(document), None, None)
        try:
            if not data.strip():
                raise _NotJSON("the file is empty")
            document = _parse_json(data)
            validate(document, self._schema)
        except (_NotJSON, QabelRestError) as exc:
            return _State(None, None, None, signature, data, str(exc))
        document = self._complete(document)
        return self._new_state(document, _dump_document(document), signature, data)

    def _complete(self, document):
        """The document with every missing top-level field at its default."""
        defaults = json.loads(self._defaults)
        defaults.update(document)
        return defaults


# ---------------------------------------------------------------------------
# Data directory: location, lock, API key
# ---------------------------------------------------------------------------

def default_data_dir(environ=None, platform=None):
    """$QABEL_REST_DATA_DIR, else the platform's per-user config dir + qabel-rest."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if environ.get(_ENV_DATA_DIR):
        return environ[_ENV_DATA_DIR]
    home = os.path.expanduser("~")
    if platform == "win32":
        base = environ.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
    elif platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:  # XDG: a relative XDG_CONFIG_HOME is invalid and must be ignored
        base = environ.get("XDG_CONFIG_HOME", "")
        if not os.path.isabs(base):
            base = os.path.join(home, ".config")
    return os.path.join(base, "qabel-rest")


def _prepare_data_dir(path):
    try:
        if not os.path.isdir(path):
            os.makedirs(path, mode=_DIR_MODE)
            os.chmod(path, _DIR_MODE)  # makedirs' mode is filtered by the umask
    except OSError as exc:
        raise StartupError(f"cannot create the data dir: {exc.strerror} ({path})") from None


class _DataDirLock:
    """One server per data dir: an exclusive lock that dies with the process."""

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, _LOCK_FILE)
        self._fd = None

    def acquire(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as exc:
            raise StartupError(f"the data dir is not writable: {exc.strerror} "
                               f"({self.directory})") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # pragma: no cover - Windows: lock one byte far past the pid text
                os.lseek(fd, 1 << 20, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise StartupError(f"another qabel_rest{holder} is already using the data dir "
                               f"({self.directory})") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @staticmethod
    def _read_holder(fd):
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            pid = os.read(fd, 32).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):  # pragma: no cover - Windows
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self):
        if self._fd is not None:
            # Closing the descriptor releases flock and msvcrt locks alike. The file
            # stays: removing it would let a third process lock a different inode.
            os.close(self._fd)
            self._fd = None


def _remove_stale_temp_files(directory):
    """Temp files of a process killed mid-write: never renamed, so never current."""
    for name in (_SETTINGS_FILE, _SYNCED_FILE, _KEY_FILE):
        prefix = "." + name + "."
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and entry.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(directory, entry))
                except OSError:
                    pass


def _check_api_key(key, source):
    # printable ASCII without spaces: it has to travel in a header
    if type(key) is not str or not (key.isascii() and key.isprintable()) or " " in key or not key:
        raise StartupError(f"the API key from {source} must be printable ASCII "
                           f"without spaces, and not empty")
    return key


def _read_or_create_key_file(data_dir):
    """(key, path) from DATA_DIR/api-key, generating the file if it is missing."""
    path = os.path.join(data_dir, _KEY_FILE)
    try:
        with open(path, "rb") as file:
            text = file.read().decode("ascii", "replace").strip()
    except FileNotFoundError:
        import secrets  # here, not at the top: only a first start needs it
        text = secrets.token_urlsafe(32)  # 256 bits
        try:
            atomic_write(path, (text + "\n").encode("ascii"))
        except OSError as exc:
            raise StartupError(f"cannot write the key file: {exc.strerror} ({path})") from None
        _logger().info("generated a new API key in %s", path)
    except OSError as exc:
        raise StartupError(f"cannot read the key file: {exc.strerror} ({path})") from None
    return _check_api_key(text, path), path


def _host_name(value):
    """The lower-case host of a Host header value (port dropped); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal: [::1]:9696
        end = value.find("]") + 1
        if end == 0:
            return None
        host, rest = value[:end], value[end:]
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and _is_digits(rest[1:])):
        return None
    return host or None


def _normal_host(name):
    """A host name as it appears in a Host header: lower case, IPv6 in brackets."""
    name = name.strip().lower()
    if ":" in name and not name.startswith("["):
        return f"[{name}]"
    return name


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

_ROUTES = MappingProxyType({
    "/settings": ("GET", "PUT", "POST"),
    "/synced": ("GET", "PUT", "POST"),
    "/health": ("GET",),
})
# Methods HTTP defines (RFC 9110 section 9): on a known path and not allowed, 405;
# any other method is not recognised at all, 501.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                            "TRACE", "CONNECT"})
# RFC 9110 section 5.6.2: the characters of a token (method, header name)
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789"
                         "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")  # of a chunk size
_JSON_TYPE = "application/json"
_FORM_TYPE = "application/x-www-form-urlencoded"
_MAX_FORM_FIELDS = 16
_MAX_LINE = 65536  # longest request line (else 414) or header line (else 431)
_MAX_HEADERS = 100  # header lines in one request (else 431), as in http.client
_MAX_HEADER_BYTES = 65536  # all of them together (else 431)
_LARGE_BODY = 65536  # bodies from here on go out without being copied
_LINGER_SECONDS = 2.0  # after refusing a body, read and drop it this long at most...
_LINGER_BYTES = 64 << 20  # ...and this much (about 30 ms on loopback)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_TIMEOUTS = (TimeoutError, socket.timeout)  # distinct classes before Python 3.10
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
           "Nov", "Dec")


def _http_date(seconds):
    """An IMF-fixdate (RFC 9110 section 5.6.7), independent of the locale."""
    t = time.gmtime(seconds)
    return (f"{_WEEKDAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def _is_token(text):
    return bool(text) and _TOKEN_CHARS.issuperset(text)


class _SocketReader(io.RawIOBase):
    """A socket's input, read under a deadline (a time.monotonic() value).

    A per-recv timeout alone lets a client that sends one byte a second hold a
    thread forever; the deadline bounds the whole request.
    """

    def __init__(self, sock):
        self._sock = sock
        self.deadline = math.inf

    def readable(self):
        return True

    def readinto(self, buffer):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class RequestHandler(socketserver.BaseRequestHandler):
    """One connection: HTTP/1.1 requests read, checked and answered in turn.

    The request path, in order: request line and headers (RFC 9112), framing, Host,
    Origin, key, method and path, size, content type, 100-continue, body, the
    document. Errors are raised as QabelRestError anywhere below _handle_one and
    turned into a JSON response there, once. Every answer goes out in one write.

    Not http.server.BaseHTTPRequestHandler: importing http.server loads http.client,
    email and ssl (about 35 ms and 7 MB here, more than all of qabel_rest), and
    its email-based header parser is the slowest part of a request. Everything it
    did for us is below, stricter.
    """

    server_version = f"qabel_rest/{__version__}"  # the Server header: no Python version
    disable_nagle_algorithm = True  # no 40 ms stall waiting for a delayed ACK

    def setup(self):
        sock = self.request
        if self.disable_nagle_algorithm:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._reader = _SocketReader(sock)
        self.rfile = io.BufferedReader(self._reader)
        self._linger = False
        self._reset()

    def _reset(self):
        """Forget the previous request on this connection."""
        self.command = self.path = None
        self.request_version = "HTTP/1.1"
        self.headers = {}
        self.close_connection = True
        self._responded = False
        self._body_pending = False
        self._chunked = False
        self._length = 0
        self._expect_continue = False

    def handle(self):
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def finish(self):
        if self._linger:
            self._lingering_close()
        self.rfile.close()

    def _lingering_close(self):
        """Read and drop what the client still sends, briefly, after our answer.

        Closing a socket with unread input sends a reset, which can destroy the
        answer before the client reads it (RFC 9112 section 9.6): a client still
        sending a body we refused would see "connection reset", not our 413.
        """
        sock = self.request
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            received = 0
            while received < _LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                received += len(chunk)
        except OSError:
            pass

    # -- one request ------------------------------------------------------------

    def handle_one_request(self):
        server = self.server
        self._reset()
        self._reader.deadline = time.monotonic() + server.idle_timeout
        try:
            if not self.rfile.peek(1):
                return  # the client closed the connection
        except (OSError, ValueError):
            return  # idle timeout, reset, or closed by server_close
        if not server._begin_request(self.request):
            self._send_error(_HTTPError(HTTPStatus.SERVICE_UNAVAILABLE,
                                        "the server is shutting down", close=True))
            return
        try:
            self._reader.deadline = time.monotonic() + server.request_timeout
            self._handle_one()
        except _TIMEOUTS:
            if not self._responded:
                self._send_error(_HTTPError(HTTPStatus.REQUEST_TIMEOUT,
                                            "the request took too long", close=True))
            self.close_connection = True
        except OSError:
            self.close_connection = True  # reset, broken pipe: nobody to answer
        finally:
            if server._end_request(self.request):
                self.close_connection = True

    def _handle_one(self):
        try:
            if not self._read_head():
                return
            self._dispatch()
        except _TIMEOUTS:
            raise
        except QabelRestError as exc:
            self._send_error(exc)
        except OSError:
            raise
        except Exception:  # a bug: answer 500, keep serving others
            self.server.logger.exception("unexpected error in %s %s", self.command,
                                         self._path_only())
            self._send_error(_HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR,
                                        "internal error", close=True))
        if self._body_pending and not self.close_connection:
            self._drain_body()

    def _read_head(self):
        """Read the request line and headers (RFC 9112 sections 3 and 5).

        Returns False at a clean end of the connection; raises _HTTPError for a
        malformed request (the answer closes the connection).
        """
        line = self.rfile.readline(_MAX_LINE + 1)
        if line in (b"\r\n", b"\n"):  # one empty line before a request is allowed
            line = self.rfile.readline(_MAX_LINE + 1)
        if not line:
            return False
        if len(line) > _MAX_LINE:
            raise _HTTPError(HTTPStatus.REQUEST_URI_TOO_LONG, "the request line is too long",
                             close=True)
        if not line.endswith(b"\n"):
            return False  # the connection ended within the request line
        words = line.decode("latin-1").split()
        if len(words) == 2:  # HTTP/0.9 has no version and no status line to answer with
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported",
                             close=True)
        if len(words) != 3 or not _is_token(words[0]):
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed request line", close=True)
        self.command, self.path, version = words
        if not (len(version) == 8 and version.startswith("HTTP/") and version[6] == "."
                and _is_digits(version[5] + version[7])):
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed HTTP version", close=True)
        if version[5] != "1":
            raise _HTTPError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                             "only HTTP/1.0 and HTTP/1.1 are supported", close=True)
        self.request_version = "HTTP/1.0" if version[7] == "0" else "HTTP/1.1"
        headers = self.headers
        count = size = 0
        while True:
            line = self.rfile.readline(_MAX_LINE + 1)
            if line in (b"\r\n", b"\n"):
                break
            count += 1
            size += len(line)
            if len(line) > _MAX_LINE or count > _MAX_HEADERS or size > _MAX_HEADER_BYTES:
                raise _HTTPError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 "the request headers are too large", close=True)
            if not line.endswith(b"\n"):
                return False  # the connection ended within the headers
            name, colon, value = line.decode("latin-1").partition(":")
            # RFC 9112 5.1/5.2: no space before the colon, no obsolete line folding
            if not colon or not _is_token(name):
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed header line",
                                 close=True)
            headers.setdefault(name.lower(), []).append(value.strip(" \t\r\n"))
        connection = {token.strip().lower()
                      for value in headers.get("connection", ()) for token in value.split(",")}
        if "close" in connection:
            self.close_connection = True
        else:
            self.close_connection = (self.request_version == "HTTP/1.0"
                                     and "keep-alive" not in connection)
        for value in headers.get("expect", ()):
            if value.lower() != "100-continue":
                raise _HTTPError(HTTPStatus.EXPECTATION_FAILED, "unsupported expectation",
                                 close=True)
            # RFC 9110 10.1.1: the 100 goes out only once the request has passed every
            # check (_read_body); an HTTP/1.0 client gets none.
            self._expect_continue = self.request_version == "HTTP/1.1"
        return True

    def _header(self, name):
        """The only value of a header, or None; several values count as none."""
        values = self.headers.get(name, ())
        return values[0] if len(values) == 1 else None

    def _dispatch(self):
        server = self.server
        self._check_framing()
        self._check_host(server)
        self._check_origin(server)
        path = self._path_only()
        method = "GET" if self.command == "HEAD" else self.command
        if not (path == "/health" and method == "GET"):
            self._check_key(server)
        if self.command not in _KNOWN_METHODS:
            raise _HTTPError(HTTPStatus.NOT_IMPLEMENTED, "method not implemented")
        allowed = _ROUTES.get(path)
        if allowed is None:
            raise _HTTPError(HTTPStatus.NOT_FOUND, "no such resource")
        allow = (("Allow", ", ".join(allowed)),)
        if method == "OPTIONS":
            self._send_json(HTTPStatus.OK, {"allow": list(allowed)}, allow)
            return
        if method not in allowed:
            raise _HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", allow)
        if path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok"})
            return
        document = server.settings if path == "/settings" else server.synced
        if method == "GET":
            self._do_get(document)
            return
        try:
            form = self._content_is_form()
            body = self._read_body(server.max_body)
            if method == "PUT":
                self._do_put(document, body, form)
            else:
                self._do_post(document, body, form)
        except InvalidKey as exc:  # a 405 of the Qabel spec: still carries Allow
            raise _HTTPError(exc.status, exc.message, allow) from None

    # -- checks, in the order of the spec ------------------------------------------

    def _check_framing(self):
        """RFC 9112 section 6: exactly one way to find the body's end, or 400."""
        headers = self.headers
        if len(headers.get("host", ())) != 1:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "exactly one Host header is required",
                             close=True)
        if not self.path.startswith("/"):  # absolute-form, authority-form, asterisk
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "the request target must be a path",
                             close=True)
        codings = headers.get("transfer-encoding")
        lengths = headers.get("content-length")
        if codings:
            if lengths:  # a request smuggling vector (RFC 9112 section 6.3)
                raise _HTTPError(HTTPStatus.BAD_REQUEST,
                                 "both Transfer-Encoding and Content-Length", close=True)
            if self.request_version == "HTTP/1.0":
                raise _HTTPError(HTTPStatus.BAD_REQUEST,
                                 "Transfer-Encoding in an HTTP/1.0 request", close=True)
            names = [name.strip().lower() for value in codings for name in value.split(",")]
            if names != ["chunked"]:
                raise _HTTPError(HTTPStatus.NOT_IMPLEMENTED,
                                 "transfer coding not supported", close=True)
            self._chunked = self._body_pending = True
        elif lengths:
            values = set()
            for value in lengths:
                if not _is_digits(value):
                    raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed Content-Length",
                                     close=True)
                values.add(value.lstrip("0") or "0")
            if len(values) > 1:
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "conflicting Content-Length",
                                 close=True)
            value = values.pop()
            self._length = int(value) if len(value) <= 18 else sys.maxsize
            self._body_pending = self._length > 0

    def _check_host(self, server):
        if _host_name(self.headers["host"][0]) not in server.allowed_hosts:
            raise _HTTPError(HTTPStatus.FORBIDDEN, "host not allowed")

    def _check_origin(self, server):
        for origin in self.headers.get("origin", ()):
            scheme, sep, rest = origin.partition("://")
            if (not sep or scheme.lower() not in ("http", "https") or "/" in rest
                    or "@" in rest or _host_name(rest) not in server.allowed_hosts):
                raise _HTTPError(HTTPStatus.FORBIDDEN, "origin not allowed")

    def _check_key(self, server):
        presented = list(self.headers.get("x-api-key", ()))
        for value in self.headers.get("authorization", ()):
            scheme, _, token = value.partition(" ")
            presented.append(token if scheme.lower() == "bearer" else "")
        if not presented:
            raise _HTTPError(HTTPStatus.UNAUTHORIZED, "an API key is required",
                             (("WWW-Authenticate", "Bearer"),))
        valid = True
        for token in presented:  # every one compared, each in constant time
            token = token.strip().encode("latin-1")
            valid &= server._compare_digest(token, server._api_key)
        if not valid:
            raise _HTTPError(HTTPStatus.UNAUTHORIZED, "wrong API key",
                             (("WWW-Authenticate", "Bearer"),))

    def _content_is_form(self):
        """True for a form body, False for JSON; 415 for any other type.

        No Content-Type at all is read as JSON (RFC 9110 8.3 leaves it to us): what
        a client sends with a JSON string and no header, as some libraries do.
        """
        value = self._header("content-type")
        if value is None and not self.headers.get("content-type"):
            return False
        media, _, params = (value or "").partition(";")
        media = media.strip().lower()
        for param in params.split(";"):
            name, _, charset = param.partition("=")
            if (name.strip().lower() == "charset"
                    and charset.strip().strip('"').lower() not in ("utf-8", "utf8")):
                raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "only UTF-8 is accepted")
        if media == _JSON_TYPE:
            return False
        if media == _FORM_TYPE:
            return True
        raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                         f"the body must be {_JSON_TYPE} or {_FORM_TYPE}")

    # -- body ------------------------------------------------------------------

    def _read_body(self, limit):
        if not self._chunked and self._length > limit:
            raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"the body is larger than {limit} bytes", close=True)
        if self._expect_continue:
            self._expect_continue = False
            self._write(_CONTINUE)
        body = self._read_chunked(limit) if self._chunked else self.rfile.read(self._length)
        if not self._chunked and len(body) < self._length:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "the body ended early", close=True)
        self._body_pending = False
        return body

    def _read_chunked(self, limit):
        """Decode a chunked body (RFC 9112 section 7.1), at most limit bytes."""
        body = bytearray()
        while True:
            line = self.rfile.readline(4096)
            if not line.endswith(b"\n"):
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunk", close=True)
            size = line.split(b";", 1)[0].strip(b" \t\r\n")
            if not (0 < len(size) <= 16 and _HEX_DIGITS.issuperset(size)):
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunk size", close=True)
            size = int(size, 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                 f"the body is larger than {limit} bytes", close=True)
            data = self.rfile.read(size)
            if len(data) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunk", close=True)
            body += data
        for _ in range(64):  # trailer fields, ignored
            line = self.rfile.readline(4096)
            if line in (b"\r\n", b"\n"):
                return bytes(body)
            if not line.endswith(b"\n"):
                break
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "malformed chunked trailer", close=True)

    def _drain_body(self):
        """Read and drop a body we answered without reading, to keep the framing."""
        if self._chunked or self._expect_continue or self._length > self.server.max_body:
            self.close_connection = True  # a 100-continue client may never send it
            self._linger = True
            return
        if len(self.rfile.read(self._length)) < self._length:
            self.close_connection = True

    # -- the documents -------------------------------------------------------------

    def _do_get(self, document):
        state = document._current()
        etag = (("ETag", state.etag),)
        for value in self.headers.get("if-none-match", ()):
            tags = {tag.strip().removeprefix("W/") for tag in value.split(",")}
            if state.etag in tags or "*" in tags:
                self._send(HTTPStatus.NOT_MODIFIED, b"", etag)
                return
        self._send(HTTPStatus.OK, state.body, etag)

    def _do_put(self, document, body, form):
        if form:
            fields = _parse_form(body)
            key = fields.get("key", _MISSING)
            if type(key) is str and key.startswith("["):
                try:
                    key = _parse_json(key)
                except (_NotJSON, QabelRestError):
                    raise InvalidKey("the key is not a valid JSON list") from None
            value = fields.get("value", _MISSING)
            if value is not _MISSING:
                try:
                    value = _parse_json(value)
                except _NotJSON:
                    pass  # a plain string
            merge = False
        else:
            try:
                request = _parse_json(body)
            except _NotJSON as exc:
                raise InvalidValue(f"the body is not JSON: {exc}") from None
            if type(request) is not dict:
                raise InvalidValue("the body must be a JSON object")
            key = request.get("key", _MISSING)
            value = request.get("value", _MISSING)
            merge = request.get("merge", False)
        if key is _MISSING:
            raise InvalidKey("the key is missing")
        stored = document._put(key, value, merge)
        self._send_json(HTTPStatus.OK, {"key": key, "value": stored})

    def _do_post(self, document, body, form):
        try:
            if form:
                text = _parse_form(body).get("settings")
                if text is None:
                    raise InvalidKey("settings is missing")
                settings = _parse_json(text)
            else:
                request = _parse_json(body)
                if type(request) is not dict or "settings" not in request:
                    raise InvalidKey("settings is missing")
                settings = request["settings"]
        except _NotJSON as exc:
            raise InvalidKey(f"settings is not a valid JSON document: {exc}") from None
        self._send(HTTPStatus.OK, _dump_document(document._replace(settings)))

    # -- answers -----------------------------------------------------------------

    def _send_json(self, status, payload, headers=()):
        self._send(status, _dump_document(payload), headers)

    def _send_error(self, error):
        if error.status >= 500:
            self.server.logger.warning("%s %s: %d %s", self.command, self._path_only(),
                           error.status, error.message)
        if getattr(error, "close", False):
            self.close_connection = True
            self._linger = self._body_pending
        self._send_json(error.status, {"error": error.message}, getattr(error, "headers", ()))

    def _send(self, status, body, headers=()):
        """Send status line, headers and body in one write."""
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                f"Server: {self.server_version}\r\n"
                f"Date: {self.server._date()}\r\n"
                "Cache-Control: no-store\r\n"
                "X-Content-Type-Options: nosniff\r\n"]
        if status != HTTPStatus.NOT_MODIFIED:  # a 304 has no body to describe
            head.append(f"Content-Type: {_JSON_TYPE}\r\nContent-Length: {len(body)}\r\n")
        for name, value in headers:
            head.append(f"{name}: {value}\r\n")
        if self.close_connection:
            head.append("Connection: close\r\n")
        elif self.request_version == "HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        head = "".join(head).encode("latin-1")
        self._responded = True
        if self.command == "HEAD" or not body:
            self._write(head)
        elif len(body) < _LARGE_BODY:
            self._write(head + body)
        else:
            self._write(head, body)
        self.log_request(status.value, len(body))

    def _write(self, *parts):
        """Send parts whole within request_timeout; without copying where the OS
        has sendmsg (POSIX), else joined into one buffer."""
        sock = self.request
        sock.settimeout(self.server.request_timeout)
        if len(parts) == 1 or not hasattr(sock, "sendmsg"):
            sock.sendall(b"".join(parts))
            return
        views = [memoryview(part) for part in parts]
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _path_only(self):
        return (self.path or "").partition("?")[0]

    def log_request(self, code="-", size="-"):
        # Never the query string (a client may misplace the key there), never a body.
        logger = self.server.logger
        if logger.isEnabledFor(10):  # logging.DEBUG
            logger.debug('%s "%s %s" %s %s', self.client_address[0], self.command,
                         self._path_only(), code, size)


def _parse_form(body):
    """The fields of a form-encoded body; 400 for bad encoding or a repeated field."""
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                       encoding="utf-8", errors="strict",
                                       max_num_fields=_MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise InvalidValue("the form body is malformed") from None
    fields = {}
    for name, value in pairs:
        if name in fields:
            raise InvalidValue(f"the form field {name!r} is repeated")
        fields[name] = value
    return fields


# ---------------------------------------------------------------------------
# Server lifecycle
# ---------------------------------------------------------------------------

_REFUSED_BODY = b'{"error": "too many connections"}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nCache-Control: no-store\r\n"
            b"X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n%s"
            % (len(_REFUSED_BODY), _REFUSED_BODY))


class QabelRestServer(socketserver.ThreadingTCPServer):
    """The HTTP server with its two documents; build it with make_server().

    A thread per connection, as http.server.ThreadingHTTPServer. Thread-safe.
    `settings` and `synced` are the in-process API of the documents. shutdown() may
    be called from any thread, before or during serve_forever().
    """

    daemon_threads = True
    block_on_close = False  # server_close() joins its own threads, with a bound
    # POSIX: rebind at once after a restart (TIME_WAIT). Windows: SO_REUSEADDR would
    # let another process bind the same port and steal requests, so it gets
    # SO_EXCLUSIVEADDRUSE instead (server_bind).
    allow_reuse_address = os.name != "nt"
    request_queue_size = DEFAULT_MAX_CONNECTIONS

    def __init__(self, address, handler_class, *, data_dir, settings, synced, max_body,
                 allowed_hosts, idle_timeout, request_timeout, max_connections):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.data_dir = data_dir
        self.key_source = None  # where the API key came from: set by make_server
        self.settings = settings
        self.synced = synced
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        import hmac  # see _logger()
        self._compare_digest = hmac.compare_digest
        self.logger = _logger()
        self._api_key = None  # bytes: set by make_server, never logged or shown
        self._dir_lock = None
        self._state_lock = threading.RLock()  # RLock: shutdown() may run in a signal handler
        self._stop_requested = False
        self._serving_thread = None
        self._stopped = threading.Event()
        self._connections = {}  # socket -> [thread, idle?]
        self._closing = False
        self._date_cache = (0, "")
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            super().__init__(address, handler_class)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise
        bound = self.server_address[0]
        self.allowed_hosts = frozenset(
            {*_LOCAL_HOSTS, _normal_host(address[0]), _normal_host(bound),
             *(_normal_host(name) for name in allowed_hosts)})

    @property
    def url(self):
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def server_bind(self):
        if os.name == "nt":  # pragma: no cover - Windows
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        super().server_bind()

    def _date(self):
        """The Date header's value, formatted once a second."""
        now = int(time.time())
        cached = self._date_cache
        if cached[0] != now:
            cached = self._date_cache = (now, _http_date(now))
        return cached[1]

    # -- serving and stopping -------------------------------------------------------

    def serve_forever(self, poll_interval=0.5):
        """Handle requests until shutdown(); returns at once if it came first."""
        with self._state_lock:
            if self._stop_requested:
                return
            self._serving_thread = threading.current_thread()
            self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop_requested:
                    for key, _ in selector.select(poll_interval):
                        if self._stop_requested:
                            break
                        if key.fileobj is self:
                            self._handle_request_noblock()
                    self.service_actions()
        finally:
            with self._state_lock:
                self._serving_thread = None
                self._stopped.set()

    def shutdown(self):
        """Stop serve_forever() and wait for it, unless called from its own thread
        (a request handler, a signal handler) or before it started."""
        with self._state_lock:
            self._stop_requested = True
            thread = self._serving_thread
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already closed, or its buffer is full: both mean awake
        if thread is not None and thread is not threading.current_thread():
            self._stopped.wait()

    def server_close(self):
        """Close the port, end idle connections, let requests in flight finish
        (bounded by SHUTDOWN_GRACE), refuse later changes, release the data dir."""
        with self._state_lock:
            self._stop_requested = True
            self._closing = True
            entries = list(self._connections.items())
        for sock, (thread, idle) in entries:
            if idle:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().server_close()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for sock, (thread, idle) in entries:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.settings.close()
        self.synced.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._dir_lock is not None:
            self._dir_lock.release()

    # -- connections -------------------------------------------------------------------

    def process_request(self, request, client_address):
        with self._state_lock:
            refuse = self._closing or len(self._connections) >= self.max_connections
            if refuse and not self._closing:
                # Make room by closing the oldest idle keep-alive connection (HTTP
                # lets a server close an idle one at any time), so that idle clients
                # cannot starve new ones. Refuse only when all are mid-request.
                for sock, (_, idle) in self._connections.items():  # oldest first
                    if idle:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        self._connections[sock][1] = False  # closing: not again
                        refuse = False
                        break
            if not refuse:
                thread = threading.Thread(target=self.process_request_thread,
                                          args=(request, client_address),
                                          name="qabel_rest connection", daemon=True)
                self._connections[request] = [thread, True]
        if refuse:
            self._refuse(request)
            return
        thread.start()

    def _refuse(self, request):
        try:
            request.settimeout(1.0)
            request.sendall(_REFUSED)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._state_lock:
                self._connections.pop(request, None)

    def _begin_request(self, sock):
        """Mark a connection busy; False if the server is closing."""
        with self._state_lock:
            if self._closing:
                return False
            self._connections[sock][1] = False
            return True

    def _end_request(self, sock):
        """Mark a connection idle; True if it must close because the server is."""
        with self._state_lock:
            entry = self._connections.get(sock)
            if entry is not None:
                entry[1] = True
            return self._closing


def make_server(data_dir=None, api_key=None, host=DEFAULT_HOST, port=DEFAULT_PORT, *,
                max_body=DEFAULT_MAX_BODY, allowed_hosts=(),
                idle_timeout=DEFAULT_IDLE_TIMEOUT, request_timeout=DEFAULT_REQUEST_TIMEOUT,
                max_connections=DEFAULT_MAX_CONNECTIONS, handler_class=RequestHandler):
    """Load both documents, bind, lock the data dir, write any missing document with
    its defaults; return a QabelRestServer.

    data_dir defaults to $QABEL_REST_DATA_DIR or the platform's config dir; api_key
    to $QABEL_REST_API_KEY, the key file, or a newly generated key file. Raises
    StartupError if the server cannot start; then no file was changed or created.
    """
    environ = os.environ
    if type(max_body) is not int or max_body < 1:
        raise StartupError("max_body must be a positive integer")
    data_dir = os.path.abspath(data_dir or default_data_dir(environ))
    if api_key is None and environ.get(_ENV_API_KEY):
        api_key, key_source = environ[_ENV_API_KEY], "$" + _ENV_API_KEY
    else:
        key_source = "the command line"
    if api_key is not None:
        _check_api_key(api_key, key_source)
    settings = SettingsDocument(os.path.join(data_dir, _SETTINGS_FILE), LOCAL_SCHEMA,
                                LOCAL_DEFAULTS)
    synced = SettingsDocument(os.path.join(data_dir, _SYNCED_FILE), SYNCED_SCHEMA,
                              SYNCED_DEFAULTS)
    # Every check that can fail without writing comes first: the documents, then
    # the port. Only then is anything created: the data dir, the lock, the key.
    settings.load()
    synced.load()
    try:
        server = QabelRestServer(
            (host, port), handler_class, data_dir=data_dir, settings=settings,
            synced=synced, max_body=max_body, allowed_hosts=allowed_hosts,
            idle_timeout=idle_timeout, request_timeout=request_timeout,
            max_connections=max_connections)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    try:
        _prepare_data_dir(data_dir)
        server._dir_lock = _DataDirLock(data_dir)
        server._dir_lock.acquire()
        _remove_stale_temp_files(data_dir)
        for document in (settings, synced):
            document.load()  # again, now that no other instance can be writing
            document.create_if_missing()
        if api_key is None:
            api_key, key_source = _read_or_create_key_file(data_dir)
        server._api_key = api_key.encode("ascii")
        server.key_source = key_source
    except BaseException:
        server.server_close()
        raise
    return server


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def main(argv=None):
    """Run the server until SIGINT or SIGTERM; return the exit status."""
    import argparse  # here, not at the top: an embedding app never needs it
    parser = argparse.ArgumentParser(
        prog="qabel_rest", description="The local REST server of the Qabel desktop client.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (%(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port, 0 for any free one (%(default)s)")
    parser.add_argument("--data-dir", help="where the documents and the key file live")
    parser.add_argument("--api-key", help="the API key (default: $QABEL_REST_API_KEY, "
                                          "else DATA_DIR/api-key, generated if missing)")
    parser.add_argument("--max-body", type=_positive_int, default=DEFAULT_MAX_BODY,
                        metavar="BYTES", help="largest request body (%(default)s)")
    parser.add_argument("--allowed-host", action="extend", nargs="+", default=[],
                        metavar="NAME", help="other names clients may use in the Host "
                                             "header (repeatable)")
    args = parser.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s qabel_rest %(levelname)s %(message)s")
    if hasattr(signal, "SIGXFSZ"):
        # Over a file size limit a write then fails with EFBIG (answered 507)
        # instead of the signal killing the server.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        server = make_server(args.data_dir, args.api_key, args.host, args.port,
                             max_body=args.max_body, allowed_hosts=args.allowed_host)
    except StartupError as exc:
        print(f"qabel_rest: {exc}", file=sys.stderr, flush=True)
        return 1

    def stop(signum, frame):
        server.shutdown()  # from the serving thread: returns at once

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)
    where = (f"API key file {server.key_source}" if os.path.isabs(server.key_source)
             else f"API key from {server.key_source}")
    print(f"qabel_rest listening on {server.url} ({where})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    _logger().info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
