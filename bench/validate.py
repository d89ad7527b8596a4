"""Check a suite's cells against the registries before anything runs: models exist, each model
takes each resolution, the dataset is known. Kept apart from suite.py so the schema stays torch-free."""

from __future__ import annotations

from bench.errors import BenchError, SuiteError
from bench.suite import Cell, Suite, expand


def resolve_cells(suite: Suite) -> list[Cell]:
    """Expand a suite with the model registry and reject any cell that cannot run as written."""
    from bench import data, models

    try:
        data.parse_name(suite.dataset)
        cells = expand(suite, resolve_model=models.resolve)
    except SuiteError:
        raise
    except BenchError as exc:
        raise SuiteError(f"{suite.source}: {exc}") from None
    checked: set[tuple[str, int, str | None]] = set()
    for cell in cells:
        key = (cell.model, cell.resolution, cell.weights)
        if key in checked:
            continue
        try:
            models.check_resolution(cell.model, cell.resolution, weights=cell.weights)
        except BenchError as exc:
            raise SuiteError(f"{suite.source}: cell {cell.id}: {exc}; drop it with an exclude entry "
                             f"such as {{model: {cell.model.split(':', 1)[-1]}, resolution: {cell.resolution}}}") from None
        checked.add(key)
    return cells
