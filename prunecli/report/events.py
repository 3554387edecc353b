"""Training progress events (``finetune``'s ``progress`` callback) as lines of text, for callers that have no
console of their own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prunecli.humanize import human


def event_message(event: Mapping[str, Any]) -> str | None:
    """A training event (``finetune``'s ``progress`` argument, also soft pruning's and EDP's "select") as one
    line of text; None for events not worth a line."""
    kind = event.get("event")
    if kind == "epoch":
        val = event.get("val_top1")
        return (f"epoch {event.get('epoch')}: train loss {event.get('train_loss', 0):.3f}, "
                f"val top-1 {val if val is not None else '-'}")
    if kind == "select":
        return (f"epoch {event.get('epoch')}: {event.get('removed')} channels selected for removal"
                + (f" ({event['zero_coefficient_groups']} coefficient rows/columns already zero, "
                   f"{human(event['estimated_cost'])} after removal)" if "estimated_cost" in event else ""))
    if kind == "step":
        return (f"epoch {event.get('epoch')} step {event.get('step')}: loss {event.get('loss', 0):.3f}, "
                f"{event.get('images_per_second', 0):.0f} img/s")
    return None


def messages_to(say: Callable[[str], None]) -> Callable[[Mapping[str, Any]], None]:
    """A training ``progress`` callback that passes each event worth a line to ``say`` as text."""

    def tell(event: Mapping[str, Any]) -> None:
        message = event_message(event)
        if message is not None:
            say(message)

    return tell
