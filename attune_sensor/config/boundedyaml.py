"""YAML from files and environment variables, within fixed bounds of time, memory and depth.

A configuration file is input an attacker may shape. This reads only regular files (a named
pipe would block forever, /dev/zero never ends), at most MAX_FILE_BYTES, and parses with a
loader that refuses what plain safe_load lets through:

* aliases (`*name`): nine anchors of nine aliases expand to billions of nodes;
* nesting deeper than MAX_DEPTH: deep documents exhaust the interpreter's stack;
* a key given twice in one mapping: safe_load keeps the last silently, so a worker could run
  under a name nobody meant.

Every refusal is a BoundError (a ValueError) whose message says what and where, on one line.
"""

import os
import stat

import yaml

MAX_FILE_BYTES = 1024 * 1024
MAX_VALUE_BYTES = 64 * 1024
MAX_DEPTH = 32
DEV_NULL = os.makedev(1, 3)


class BoundError(ValueError):
    pass


def _where(mark):
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _Loader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise BoundError("YAML aliases (*name) are not allowed" + _where(self.peek_event().start_mark))
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise BoundError(f"nested deeper than {MAX_DEPTH} levels" + _where(self.peek_event().start_mark))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
        mapping = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in mapping
            except TypeError:
                raise BoundError("a mapping key must be a plain value" + _where(key_node.start_mark)) from None
            if duplicate:
                shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
                raise BoundError(f"key {shown} appears twice" + _where(key_node.start_mark))
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def loads(text, limit=MAX_VALUE_BYTES):
    """Parses one YAML document. BoundError (ValueError) for anything refused or malformed."""
    if len(text.encode("utf-8", "surrogatepass")) > limit:
        raise BoundError(f"is larger than {limit} bytes")
    loader = None
    try:
        loader = _Loader(text)  # its reader already refuses control characters
        return loader.get_single_data()
    except BoundError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise BoundError(f"YAML syntax error{_where(mark)}: {problem}") from None
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        # e.g. an integer of more digits than Python converts
        raise BoundError(f"holds a value that cannot be read ({type(exc).__name__})") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_regular_file(path, limit=MAX_FILE_BYTES):
    """The file's text. OSError for the usual failures; BoundError when it is not a regular file,
    is larger than `limit`, or is not UTF-8."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    try:
        info = os.fstat(fd)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a directory")
        if stat.S_ISCHR(mode) and info.st_rdev == DEV_NULL:
            return ""  # --config /dev/null: settings from the environment only
        if not stat.S_ISREG(mode):
            raise BoundError("is not a regular file")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise BoundError(f"is larger than {limit} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise BoundError("is not UTF-8 text") from None
