"""Why torch.load could not read a file, in one line."""

from __future__ import annotations


def why_unreadable(e: Exception) -> str:
    """torch.load's error, without its advice: retrying with weights_only=False would run
    whatever code the file holds and cannot mend a damaged file (checkpoints and state dicts
    hold only tensors and plain data), nor does the rest of the paragraph apply."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return f"not a torch file of tensors and plain data ({' '.join(detail.split())})"
    first = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else ""
    if not first and isinstance(e, EOFError):
        first = "the file ends early"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
