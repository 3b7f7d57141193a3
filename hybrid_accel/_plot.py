"""matplotlib, optional (the dev extra): figures are skipped with a message where it is missing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def pyplot(what: str) -> Any | None:
    """``matplotlib.pyplot`` on the headless Agg backend, or None (with a message naming ``what``)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {what} (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path) -> Path:
    """Lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
