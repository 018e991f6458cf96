"""Helpers of the graph tests (a module with a unique name: test files import it, not `conftest`)."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "workflows"


def example(name: str) -> dict:
    """A shipped example workflow (examples/workflows/NAME.json)."""
    return json.loads((EXAMPLES / f"{name}.json").read_text())
