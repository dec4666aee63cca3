"""YAML for config files: a safe loader that refuses duplicate keys and anchors / aliases.

A duplicate key (or a second ``optimizer:`` section) would make the first one vanish without a
word; an alias can expand a few hundred bytes into billions of strings ("billion laughs").
Both are refused while the document is composed, before anything is expanded, as a
``yaml.MarkedYAMLError`` naming file, line and column (reported as one ``error:`` line).
"""
from __future__ import annotations

from typing import IO, Any, Union

import yaml
from yaml.constructor import ConstructorError
from yaml.composer import ComposerError


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without anchors, aliases or duplicate keys."""

    def compose_node(self, parent, index):  # noqa: D102 - see the class docstring
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ComposerError(None, None, f"YAML alias '*{event.anchor}' is not allowed in a config "
                                "file (write the value out)", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise ComposerError(None, None, f"YAML anchor '&{event.anchor}' is not allowed in a config "
                                "file (write the value out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: D102
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ConstructorError(None, None, f"unhashable mapping key {key!r}", key_node.start_mark) from None
            if key in seen:
                first = seen[key]
                raise ConstructorError(None, None, f"duplicate key '{key}' (first at line {first.line + 1}; "
                                       "the first value would be lost)", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load(stream: Union[str, IO[str]]) -> Any:
    """One YAML document read with `ConfigLoader`."""
    return yaml.load(stream, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
