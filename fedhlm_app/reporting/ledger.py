"""Communication ledger: serialized bytes and item counts per link and phase.

Every message that crosses a tier is recorded with the link it travels on and
the phase it belongs to. Links:

- ``edge->client`` / ``client->edge``: instructions and replies between a
  client and its edge server (head weights, thresholds, control);
- ``cloud->edge`` / ``edge->cloud``: the global model sent to each edge and the
  edge aggregates sent to the cloud (one per cluster and round);
- ``client->llm`` / ``llm->client``: escalated items (text, distribution,
  draft) and the LLM's feedback;
- ``cloud->oracle`` / ``oracle->cloud``: HTTP requests and responses between
  the ServerApp and a networked oracle backend (``openai``, ``remote``).

Phases: ``setup``, ``head``, ``threshold`` (training-time escalations included)
and ``inference:<policy>`` (final evaluation of each routing policy).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

LINKS = (
    "edge->client", "client->edge", "cloud->edge", "edge->cloud", "client->llm", "llm->client", "cloud->oracle", "oracle->cloud",
)


@dataclass
class Entry:
    bytes: int = 0
    messages: int = 0
    items: int = 0


@dataclass
class Ledger:
    """Running totals keyed by (phase, link)."""

    entries: dict[tuple[str, str], Entry] = field(default_factory=lambda: defaultdict(Entry))

    def add(self, phase: str, link: str, nbytes: int, items: int = 0, messages: int = 1) -> None:
        if link not in LINKS:
            raise ValueError(f"unknown link '{link}' (known: {LINKS})")
        entry = self.entries[(phase, link)]
        entry.bytes += int(nbytes)
        entry.messages += int(messages)
        entry.items += int(items)

    def total(self, phase: str | None = None, link: str | None = None, what: str = "bytes") -> int:
        """Sum of ``what`` over entries matching ``phase`` (prefix) and ``link``."""
        return sum(
            getattr(e, what)
            for (p, lk), e in self.entries.items()
            if (phase is None or p == phase or p.startswith(phase + ":")) and (link is None or lk == link)
        )

    def to_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        """{phase: {link: {bytes, messages, items}}}, sorted for stable output."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (phase, link), e in sorted(self.entries.items()):
            out.setdefault(phase, {})[link] = {"bytes": e.bytes, "messages": e.messages, "items": e.items}
        return out
