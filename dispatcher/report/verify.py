"""The report's verify section: what `dispatcher verify` found, from its output files."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import orjson

from dispatcher.results.verify import VerifyClass, read_verify_lines

__all__ = ["VerifySection", "is_verify_file"]

SHOWN: Final = 10  # records not consumed, listed with their reason


def is_verify_file(path: str) -> bool:
    """Whether ``path`` is a `dispatcher verify` output (its first line says)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    obj = orjson.loads(raw)
                    return isinstance(obj, dict) and "class" in obj and "reads" in obj
    except (OSError, orjson.JSONDecodeError):
        return False
    return False


class VerifySection:
    """Counts by class over every verify file added, and the first records not consumed."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.not_consumed: list[dict[str, Any]] = []
        self.files: list[str] = []

    def add_file(self, path: str) -> None:
        """Raises :class:`ValueError` naming the file and line of a bad line."""
        self.files.append(path)
        for line in read_verify_lines(path):
            cls = line["class"]
            self.counts[cls] += 1
            settled = cls in {VerifyClass.CONSUMED, VerifyClass.NOT_VERIFIED}
            if not settled and len(self.not_consumed) < SHOWN:
                self.not_consumed.append(line)

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "counts": {str(c): self.counts.get(c, 0) for c in VerifyClass},
            "not_consumed": [
                {k: r.get(k) for k in ("instance_id", "event_type", "class", "reason")}
                for r in self.not_consumed
            ],
        }

    def append_to(self, report: str, fmt: str) -> str:
        """``report`` (as rendered in ``fmt``) with this section at its end."""
        if fmt == "json":
            doc = orjson.loads(report)
            doc["verify"] = self.as_dict()
            return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
        return f"{report}\n\n{self.render(fmt)}"

    def render(self, fmt: str) -> str:
        if fmt == "json":
            return orjson.dumps({"verify": self.as_dict()}, option=orjson.OPT_INDENT_2).decode()
        total = sum(self.counts.values())
        rows = [(str(c), self.counts.get(c, 0)) for c in VerifyClass]
        examples = [
            (r.get("instance_id"), r.get("event_type"), r["class"], r.get("reason"))
            for r in self.not_consumed
        ]
        if fmt == "markdown":
            out = ["## Verify", "", "| class | records |", "| --- | ---: |"]
            out += [f"| `{c}` | {n} |" for c, n in rows]
            out.append(f"| total | {total} |")
            if examples:
                out += ["", "| instance | event type | class | reason |"]
                out.append("| --- | --- | --- | --- |")
                out += [f"| {i} | {e} | `{c}` | {r} |" for i, e, c, r in examples]
            return "\n".join(out)
        out = [f"Verify ({', '.join(self.files)})"]
        out += [f"  {c:<14} {n:>8}" for c, n in rows]
        out.append(f"  {'total':<14} {total:>8}")
        if examples:
            out.append("  not consumed (first ones):")
            out += [f"    {i} {e}: {c}: {r}" for i, e, c, r in examples]
        return "\n".join(out)
