"""A name -> class registry that also resolves aliases."""
from __future__ import annotations


class Registry(dict):
    """name -> class; also resolves aliases (``"hb"``), while iteration lists canonical names only."""

    def __init__(self, entries, aliases):
        super().__init__(entries)
        self.aliases = dict(aliases)

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __getitem__(self, name):
        return super().__getitem__(self.canonical(name))

    def __contains__(self, name):
        return super().__contains__(self.canonical(name))

    def get(self, name, default=None):
        return super().get(self.canonical(name), default)

    def names(self) -> list[str]:
        """Canonical names followed by aliases (for CLI choices)."""
        return list(self) + list(self.aliases)
