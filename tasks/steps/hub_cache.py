"""dataset-hub-cache: what the Hub shows of a dataset, in one answer (the viewer's hub-cache): `{preview,
viewer, partial, num_rows, tags, libraries, modalities, formats}`, from dataset-is-valid,
dataset-compatible-libraries, dataset-modalities and the configs' config-size entries (summed as dataset-size
sums them: it is not an ancestor, they are). It ends the chain dataset-is-valid, dataset-filetypes,
dataset-modalities, dataset-compatible-libraries: every entry it reads is in the cache. `tags` is
`["croissant"]` when Croissant can load the dataset. `num_rows` is null when no config has a size;
`partial` is true when a config's size is partial, failed or missing.
"""

from __future__ import annotations

from typing import Any

from tasks.step_task import StepJob
from tasks.steps.gathered import ancestor_content, current_entries, dataset_configs


def dataset_hub_cache(job: StepJob) -> dict[str, Any]:
    """{"preview", "viewer", "partial", "num_rows", "tags", "libraries", "modalities", "formats"}"""
    libraries = job.previous_step("dataset-compatible-libraries")
    configs = dataset_configs(job)
    entries = current_entries(job, ["config-size"])
    job.progress.update(1, 1, f"{len(entries)} config size(s)")
    valid = ancestor_content("dataset-is-valid", job.dataset)
    modalities = ancestor_content("dataset-modalities", job.dataset)
    sizes = [entry.content.get("size", {}).get("config", {}) for entry in entries]
    rows = [size.get("estimated_num_rows") or size.get("num_rows") for size in sizes]
    names = [item.get("library") for item in libraries.get("libraries") or []]
    return {
        "preview": bool(valid.get("preview", False)),
        "viewer": bool(valid.get("viewer", False)),
        "partial": len(entries) < len(configs) or any(entry.content.get("partial") for entry in entries),
        "num_rows": sum(row for row in rows if isinstance(row, int)) if sizes else None,
        "tags": ["croissant"] if "mlcroissant" in names else [],
        "libraries": [name for name in names if isinstance(name, str)],
        "modalities": list(modalities.get("modalities") or []),
        "formats": list(libraries.get("formats") or []),
    }
