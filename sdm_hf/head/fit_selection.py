"""``FitSelection``: what a fit kept (procedure, setting, state, rows) and why, printable in a few lines."""

from __future__ import annotations

__all__ = ["FitSelection"]


class FitSelection(dict):
    """``head.selection``: which state a fit kept and, for ``"auto"``, which setting and why.

    A dict with keys ``procedure``, ``settings``, ``shuffle``, ``epoch``, ``calibration_loss``,
    ``support_rows``, ``calibration_rows``, ``selection_rows`` (and for ``"auto"`` ``chosen``, ``reason``,
    ``candidates``) that prints as a few readable lines."""

    def summary(self) -> str:
        """The selection in a few lines: procedure, kept state, row counts, candidates."""
        lines = [f"procedure {self.get('procedure')!r}: kept shuffle {self.get('shuffle')} epoch {self.get('epoch')}"]
        rows = {k: len(self[k]) for k in ("support_rows", "selection_rows", "calibration_rows") if k in self}
        if rows:
            lines.append("rows: " + ", ".join(f"{v} {k.replace('_rows', '')}" for k, v in rows.items()))
        if "chosen" in self:
            lines.append(f"chosen: {_settings_text(self['chosen'])} ({self.get('reason', '')})")
            for c in self.get("candidates", []):
                lines.append(
                    f"  {_settings_text(c['settings'])}: held-out loss {c['loss']:.4f} at epoch {c['epoch']}, "
                    f"estimated admitted {c['admitted_share']:.1%}, worst-class accuracy "
                    f"{_accuracy_text(c['class_accuracy'])}, {'holds' if c['holds'] else 'below alpha'}"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"FitSelection(\n  {self.summary().replace(chr(10), chr(10) + '  ')}\n)"

    __str__ = summary


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "defaults"


def _accuracy_text(accuracies: list) -> str:
    seen = [a for a in accuracies if a is not None]
    if len(seen) < len(accuracies):
        return "R (a class never admitted)"
    return f"{min(seen):.3f}"
