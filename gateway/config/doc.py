"""The defaults tables of the docs, made from the declarations: docs/configuration.md and
docs/cost-control.md hold them under the section's heading (## `[gateway]`,
## `[[ports]]`...), and a test keeps the two equal (`python -m gateway.service.config
--doc-tables --write` rewrites them)."""

from gateway.config.schema import ListOfTables


def heading(section):
    """The heading a section's table follows: "## `[gateway]`" or "## `[[ports]]`"."""
    brackets = "[[%s]]" if isinstance(section, ListOfTables) else "[%s]"
    return "## `%s`" % (brackets % section.key)


def default_text(field):
    if field.doc_default is not None:
        return field.doc_default
    if field.required is True:
        return "required"
    if field.default is None:
        return "none"
    return "`%s`" % field.kind.text(field.default)


def allowed_text(field):
    if field.choices is not None:
        return ", ".join("`%s`" % field.kind.text(c) for c in field.choices)
    low, high = field.minimum, field.maximum
    if low is not None and high is not None:
        return "%s, %s to %s" % (field.kind.word, low, high)
    if low is not None:
        return "%s >= %s" % (field.kind.word, low)
    if high is not None:
        return "%s <= %s" % (field.kind.word, high)
    return field.kind.word


def table(section):
    """The markdown table of a section's keys: key, default, what is allowed, meaning."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in section.fields:
        lines.append("| `%s` | %s | %s | %s |" % (f.name, default_text(f), allowed_text(f),
                                                 f.doc))
    return lines


def _span(lines, section):
    """Where the table under the section's heading is: (first line, line after it)."""
    head = heading(section)
    for i, line in enumerate(lines):
        if line == head or line.startswith(head + ":") or line.startswith(head + " "):
            start = i + 1
            while start < len(lines) and not lines[start].startswith("|"):
                if lines[start].startswith("#"):
                    raise ValueError("no table under %s" % head)
                start += 1
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            return start, end
    raise ValueError("no heading %s" % head)


def documented(text, section):
    """The table the document shows for a section, as lines."""
    lines = text.splitlines()
    start, end = _span(lines, section)
    return lines[start:end]


def rewrite(text, sections):
    """The document with the tables of these sections made from their declarations."""
    lines = text.splitlines()
    for section in sections:
        start, end = _span(lines, section)
        lines[start:end] = table(section)
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")
