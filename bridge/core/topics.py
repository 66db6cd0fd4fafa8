"""MQTT topic names and filters: validation, matching, and an index of filters.

Pure and I/O-free. The index is a trie over topic levels, so finding the filters that match
a published topic costs O(levels x matching branches), not O(all filters) as in amqtt.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "MARKET_PREFIX",
    "SERVICE_PREFIX",
    "USER_PREFIX",
    "TopicIndex",
    "is_valid_filter",
    "is_valid_topic",
    "matcher",
    "matches",
    "topic_class",
]

# The topic tree, owned here: market data, messages for one user, notices for a service.
MARKET_PREFIX = "market/"  # market/<exchange>/<PAIR>
USER_PREFIX = "user/"  # user/<sub>/<anything>
SERVICE_PREFIX = "service/"  # service/<sub>/<anything>

_MAX_TOPIC_BYTES = 65535


def topic_class(topic: str) -> str:
    """The label for per-topic metrics: bounded (never the topic itself)."""
    if topic.startswith(MARKET_PREFIX):
        return "market"
    if topic.startswith(USER_PREFIX):
        return "user"
    if topic.startswith(SERVICE_PREFIX):
        return "service"
    return "other"


def is_valid_topic(topic: str) -> bool:
    """A topic name for PUBLISH: non-empty, no wildcards, no NUL, at most 65535 UTF-8 bytes."""
    return (
        bool(topic)
        and "+" not in topic
        and "#" not in topic
        and "\x00" not in topic
        and len(topic.encode("utf-8", "surrogatepass")) <= _MAX_TOPIC_BYTES
    )


def is_valid_filter(topic_filter: str) -> bool:
    """A SUBSCRIBE filter: '+' fills a whole level, '#' only as the whole last level."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def matches(topic: str, topic_filter: str) -> bool:
    """Does ``topic`` match ``topic_filter``? Wildcards at level 0 never match ``$`` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def matcher(topic_filter: str) -> Callable[[str], bool]:
    """``matches(topic, topic_filter)`` as a function of the topic, for one filter checked
    against many topics (a retained snapshot): filters without '+' are string compares."""
    if "+" in topic_filter:
        return lambda topic: matches(topic, topic_filter)
    if topic_filter == "#":
        return lambda topic: not topic.startswith("$")
    if topic_filter.endswith("/#"):
        parent = topic_filter[:-2]
        prefix = topic_filter[:-1]  # the parent and its '/'
        return lambda topic: topic.startswith(prefix) or topic == parent
    return topic_filter.__eq__


class _Node:
    __slots__ = ("children", "terminal")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.terminal: str | None = None  # the filter that ends at this node


class TopicIndex:
    """A set of topic filters that answers "which filters match this topic?"."""

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, topic_filter: object) -> bool:
        if not isinstance(topic_filter, str):
            return False
        node: _Node | None = self._root
        for level in topic_filter.split("/"):
            node = node.children.get(level) if node else None
        return node is not None and node.terminal is not None

    def add(self, topic_filter: str) -> None:
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        if node.terminal is None:
            node.terminal = topic_filter
            self._size += 1

    def remove(self, topic_filter: str) -> None:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.terminal is None:
            return
        node.terminal = None
        self._size -= 1
        # Prune empty branches so memory follows the live filter set.
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.terminal is not None or child.children:
                break
            del parent.children[level]

    def match(self, topic: str) -> list[str]:
        """Every filter in the index that matches ``topic``."""
        found: list[str] = []
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wild_ok = not (dollar and depth == 0)
            if wild_ok:
                hash_node = node.children.get("#")
                if hash_node is not None and hash_node.terminal is not None:
                    found.append(hash_node.terminal)
            if depth == len(levels):
                if node.terminal is not None:
                    found.append(node.terminal)
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            if wild_ok:
                plus = node.children.get("+")
                if plus is not None:
                    stack.append((plus, depth + 1))
        return found
