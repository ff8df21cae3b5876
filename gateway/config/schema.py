"""The schema kit: a configuration section is declared as data (a table of fields: name,
type, default, bounds, choices) and one walker checks a TOML document against the
declarations, collecting every problem as one line naming the key, and builds frozen,
slotted records.

    GATEWAY = Table("gateway", "GatewaySettings", [
        Field("id", str, required=True, doc="..."),
        Field("status_interval_s", float, 5.0, minimum=1, doc="..."),
    ])

A field's value, in order: the type (`int`, `float`, `str`, `bool`, `list` or a kind such
as `Money(places=2)`), `choices`, `minimum`/`maximum`, then `check(value)`, which returns a
message or None. `message` replaces every one of these messages for a field whose wording
is part of the contract. A bad value falls back to the default, so later checks see a
usable value and the walk goes on. A section's `check(values, bad, context)` holds the
rules between fields, entries and sections, and computes the section's `derived` values
(into the record's values, never into the document). [tariffs.NAME] tables are made into
objects by a converter (NamedTables).
"""

import os
import types
from decimal import Decimal, InvalidOperation

from gateway.model import GatewayError
from gateway.money import parse_yuan


def unknown_key(key, known):
    """'unknown key', and the key it was probably meant to be (a typo, a word from another
    section's vocabulary such as `baud` for `baudrate`)."""
    import difflib
    key = str(key)
    names = [str(k) for k in known]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.75) or \
        [k for k in names if len(key) >= 3 and (k.startswith(key) or key.startswith(k))][:1]
    return "unknown key (did you mean %r?)" % close[0] if close else "unknown key"


def key_lines(text):
    """{'meters[0].baud': 14, 'meters[0]': 10, ...}: the line on which each key of a TOML
    text is set, for the keys as the walker names them. A light reading of the text (table
    headers and `key =` lines), enough to point at a line; tomllib has no positions."""
    out = {}
    counts = {}
    table = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[["):
            name = _dotted(line[2:line.find("]]")])
            counts[name] = counts.get(name, -1) + 1
            table = "%s[%d]" % (name, counts[name])
            out.setdefault(table, number)
        elif line.startswith("["):
            table = _dotted(line[1:line.find("]")])
            out.setdefault(table, number)
        elif "=" in line:
            key = _dotted(line.split("=", 1)[0])
            out.setdefault("%s.%s" % (table, key) if table else key, number)
    return out


def _dotted(text):
    return ".".join(part.strip().strip('"\'') for part in text.split("."))


def line_of(lines, key):
    """The line of `key`, or of the nearest enclosing key that has one (None: unknown)."""
    while key:
        if key in lines:
            return lines[key]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return None


class ConfigError(GatewayError):
    """All problems of a configuration file, one line each."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Invalid(ValueError):
    """A value a field refuses; the text is the message after the key."""


# ---------------------------------------------------------------- kinds of values

class Kind:
    """A type of value beyond TOML's own: `parse` returns the value kept or raises
    Invalid; `word` names it and `text` shows a default, in the docs."""

    word = "value"

    def parse(self, value):
        raise NotImplementedError

    def text(self, value):
        return str(value)


class _Builtin(Kind):
    def __init__(self, word, types, message, cast=None):
        self.word, self.types, self.message, self.cast = word, types, message, cast

    def parse(self, value):
        if isinstance(value, bool) and bool not in self.types or \
                not isinstance(value, self.types):
            raise Invalid(self.message % (value,))
        return self.cast(value) if self.cast else value

    def text(self, value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return "%g" % value
        if isinstance(value, (list, tuple)):
            return "[%s]" % ", ".join('"%s"' % v if isinstance(v, str) else str(v)
                                      for v in value)
        return str(value)


KINDS = {
    int: _Builtin("whole number", (int,), "must be a whole number, not %r"),
    float: _Builtin("number", (int, float), "must be a number, not %r", float),
    str: _Builtin("text", (str,), "must be a string, not %r"),
    bool: _Builtin("`true` or `false`", (bool,), "must be true or false, not %r"),
    list: _Builtin("list", (list, tuple), "must be a list, not %r", tuple),
}
NAME = _Builtin("name", (object,), "%r")        # a reference a section's check resolves
NUMBER = _Builtin("number", (int, float), "must be a number, not %r")    # int or float, as given


class Money(Kind):
    """Yuan as a decimal string ("10.00"), kept as Decimal: gateway/money.py's one parser,
    so a value accepted here is accepted in commands and head-end updates too."""

    def __init__(self, places=2):
        self.places = places
        self.word = "yuan (a string, %d decimals at most)" % places

    def parse(self, value):
        try:
            amount = parse_yuan(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if amount.as_tuple().exponent < -self.places:
            raise Invalid("at most %d decimals, not %r" % (self.places, value))
        return amount


class DecimalNumber(Kind):
    """A number as TOML gives it or as a string ("60"), kept as Decimal."""

    word = "number"

    def parse(self, value):
        try:
            return Decimal(str(value))
        except InvalidOperation:
            raise Invalid("a number, not %r" % (value,)) from None


class ListOf(Kind):
    """A list whose every item has one kind (strings, for instance); kept as a tuple."""

    def __init__(self, item, message, word="list"):
        self.item, self.message, self.word = item, message, word

    def parse(self, value):
        if not isinstance(value, (list, tuple)) or \
                not all(isinstance(v, self.item) for v in value):
            raise Invalid(self.message % (value,))
        return tuple(value)

    def text(self, value):
        return KINDS[list].text(value)


# ---------------------------------------------------------------- declarations

class Field:
    """One key of a section: `kind` is int, float, str, bool, list or a Kind; `required`
    may be a function of the values taken before it (the meter's protocol, say); `doc`
    and `doc_default` are what the docs' table says."""

    __slots__ = ("name", "kind", "default", "value", "required", "choices", "minimum",
                 "maximum", "check", "message", "doc", "doc_default")

    def __init__(self, name, kind, default=None, *, required=False, choices=None,
                 minimum=None, maximum=None, check=None, message=None, doc="",
                 doc_default=None):
        self.name, self.default, self.required = name, default, required
        self.kind = KINDS.get(kind, kind)
        self.choices, self.minimum, self.maximum = choices, minimum, maximum
        self.check, self.message = check, message
        self.doc, self.doc_default = doc, doc_default
        # the value a record holds when the key is absent (money defaults are Decimal)
        self.value = default if default is None else self.kind.parse(default)

    def take(self, table, where, bad, values):
        """This field's value from `table`; every problem goes to bad(key, message)."""
        key = "%s.%s" % (where, self.name) if where else self.name
        if self.name not in table:
            required = self.required(values) if callable(self.required) else self.required
            if required:
                bad(key, "is required")
            return self.value
        raw = table[self.name]
        try:
            value = self.kind.parse(raw)
            if self.choices is not None and value not in self.choices:
                raise Invalid("must be one of %s, not %r"
                              % (", ".join(repr(c) for c in self.choices), value))
            if self.minimum is not None and value < self.minimum:
                raise Invalid("must be at least %s, not %r" % (self.minimum, value))
            if self.maximum is not None and value > self.maximum:
                raise Invalid("must be at most %s, not %r" % (self.maximum, value))
            why = self.check(value) if self.check else None
            if why:
                raise Invalid(why)
        except Invalid as exc:
            bad(key, self.message.format(value=raw) if self.message else str(exc))
            return self.value
        return value


class Record:
    """Base of the records the walker builds: frozen and slotted (a thousand meters), with
    attribute access, and read-only item access (`rec["meter"]`, `dict(rec)`) for code that
    copies a record into a mutable dict. Not dataclasses: importing them costs 1.4 MB
    resident (inspect, ast, tokenize), a lot against the 40 MB budget."""

    __slots__ = ()
    FIELDS = ()

    def __init__(self, *args, **kwargs):
        if len(args) > len(self.FIELDS):
            raise TypeError("%s takes %d values" % (type(self).__name__, len(self.FIELDS)))
        values = dict(zip(self.FIELDS, args))
        for k, v in kwargs.items():
            if k not in self.FIELDS or k in values:
                raise TypeError("%s: unexpected or repeated field %r" % (type(self).__name__,
                                                                         k))
            values[k] = v
        missing = [k for k in self.FIELDS if k not in values]
        if missing:
            raise TypeError("%s: missing %s" % (type(self).__name__, ", ".join(missing)))
        for k in self.FIELDS:
            object.__setattr__(self, k, values[k])

    def __setattr__(self, key, value):
        raise AttributeError("%s is frozen: use replace()" % type(self).__name__)

    __delattr__ = __setattr__

    def __eq__(self, other):
        return type(other) is type(self) and all(
            getattr(self, k) == getattr(other, k) for k in self.FIELDS)

    def __hash__(self):
        return hash((type(self).__name__,) + tuple(_hashable(getattr(self, k))
                                                   for k in self.FIELDS))

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (k, getattr(self, k)) for k in self.FIELDS))

    def __getitem__(self, key):
        if key not in self.FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key):
        return key in self.FIELDS

    def get(self, key, default=None):
        return getattr(self, key) if key in self.FIELDS else default

    def keys(self):
        return self.FIELDS

    def items(self):
        return [(k, getattr(self, k)) for k in self.FIELDS]

    def replace(self, **changes):
        """A copy with some values changed (the record itself never changes)."""
        values = {k: getattr(self, k) for k in self.FIELDS}
        values.update(changes)
        return type(self)(**values)

    def __reduce__(self):
        return (type(self), tuple(getattr(self, k) for k in self.FIELDS))


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:
        return id(value)


def record_type(name, names, module=__name__, doc=None):
    """A frozen record class with __slots__ and these fields."""
    names = tuple(names)
    namespace = {"__slots__": names, "FIELDS": names, "__module__": module,
                 "__qualname__": name, "__doc__": doc or "A %s record." % name}
    return type(name, (Record,), namespace)


class Context:
    """What a section's check sees besides its own values: the entries before this one
    (a list of tables), the sections walked before this one, and the fields whose value
    was refused (their value is the default: a rule between fields may skip them)."""

    __slots__ = ("earlier", "sections", "failed")

    def __init__(self, earlier, sections, failed):
        self.earlier, self.sections, self.failed = earlier, sections, failed


class Section:
    """A top-level key of the file and its declaration."""

    def __init__(self, key, record, fields=(), *, check=None, derived=(), doc=""):
        self.key, self.fields, self.check, self.doc = key, tuple(fields), check, doc
        self.derived = tuple(derived)
        self.record = record_type(record, [f.name for f in self.fields] + list(derived),
                                  doc=doc) if fields else None

    def entry(self, table, where, bad, earlier=(), sections=None):
        """One table of this section as a record (`earlier`: the entries before it)."""
        values, failed = {}, set()

        def bad_field(key, message):
            failed.add(key.rsplit(".", 1)[-1])
            bad(key, message)

        for f in self.fields:
            values[f.name] = f.take(table, where, bad_field, values)
        for key in table:
            if key not in values:
                bad("%s.%s" % (where, key) if where else key, unknown_key(key, values))
        for name in self.derived:
            values[name] = None
        if self.check:
            self.check(values, lambda k, m: bad("%s.%s" % (where, k), m),
                       Context(earlier, sections or {}, failed))
        return self.record(**values)

    def default(self):
        """The record of an absent section (every field at its default)."""
        return self.walk({}, lambda k, m: None, {})


class Table(Section):
    """[key]: one table."""

    def __init__(self, key, record, fields, shape=None, **kw):
        super().__init__(key, record, fields, **kw)
        self.shape = shape or "must be a table ([%s])" % key

    def walk(self, value, bad, sections):
        if not isinstance(value, dict):
            bad(self.key, self.shape)
            value = {}
        return self.entry(value, self.key, bad, (), sections)


class ListOfTables(Section):
    """[[key]]: a list of tables, one record each, kept as a tuple."""

    def walk(self, value, bad, sections):
        if not isinstance(value, list):
            bad(self.key, "must be a list of tables ([[%s]])" % self.key)
            value = []
        out = []
        for i, table in enumerate(value):
            where = "%s[%d]" % (self.key, i)
            if not isinstance(table, dict):
                bad(where, "must be a table")
                continue
            out.append(self.entry(table, where, bad, out, sections))
        return tuple(out)


class NamedTables(Section):
    """[key.NAME]: tables by name, each made into an object by `parse(name, table)`, which
    raises ValueError (with `.key` below [key.NAME] and `.message`, when it has them)."""

    def __init__(self, key, parse, doc=""):
        super().__init__(key, None, doc=doc)
        self.parse = parse

    def walk(self, value, bad, sections):
        out = {}
        if not isinstance(value, dict):
            bad(self.key, "must be tables [%s.NAME]" % self.key)
            value = {}
        for name, table in value.items():
            where = "%s.%s" % (self.key, name)
            if not isinstance(table, dict):
                bad(where, "must be a table")
                continue
            try:
                out[name] = self.parse(name, table)
            except ValueError as exc:
                sub = getattr(exc, "key", None)
                bad("%s.%s" % (where, sub) if sub else where,
                    getattr(exc, "message", str(exc)))
        return types.MappingProxyType(out)


class FileSchema:
    """The whole file: its sections, walked in order (a section's check sees the sections
    before it), into one record with `path` and one field per section."""

    def __init__(self, sections, record="Config"):
        self.sections = tuple(sections)
        self.record = record_type(record, ["path"] + [s.key for s in self.sections])

    def validate(self, doc, path="<config>", source=None):
        """The configuration record, or ConfigError listing every problem. Each problem
        names the line it is on (`gw.toml:14: meters[0].baud: ...`) when the TOML text is
        at hand: `source`, or else the file at `path`."""
        problems = []
        if source is None and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
            except (OSError, UnicodeDecodeError):
                source = None
        lines = key_lines(source) if source else {}

        def bad(key, message):
            line = line_of(lines, str(key))
            problems.append("%s%s: %s: %s" % (path, ":%d" % line if line else "", key,
                                              message))

        for key in doc:
            if key not in self.record.FIELDS or key == "path":
                bad(key, unknown_key(key, [s.key for s in self.sections]))
        sections = {}
        for s in self.sections:
            absent = {} if isinstance(s, (Table, NamedTables)) else []
            sections[s.key] = s.walk(doc.get(s.key, absent), bad, sections)
        if problems:
            raise ConfigError(problems)
        return self.record(path=path, **sections)
