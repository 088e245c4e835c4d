"""mkdocs hook: pages that exist only once someone has produced them join the nav when present.

- ``docs/leaderboard-*.md`` (written by ``harness report ... --out docs/leaderboard-NAME.md``, e.g.
  ``leaderboard-cifar10.md`` once the CIFAR-10 grid has run) are appended, sorted, to the
  "Leaderboard" section;
- ``docs/imagenet.md`` (the ImageNet protocols) goes after "Datasets and classifiers".

Any other page missing from ``mkdocs.yml``'s nav still fails the strict build (``omitted_files``).
"""

from __future__ import annotations

from pathlib import Path


def _listed(nav) -> set[str]:
    out: set[str] = set()
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out |= _listed(value)
        else:
            out.add(value)
    return out


def on_config(config, **_):
    """Add the optional pages that exist in docs_dir to the nav."""
    docs, nav = Path(config["docs_dir"]), config["nav"]
    listed = _listed(nav)
    boards = sorted(p.name for p in docs.glob("leaderboard-*.md") if p.name not in listed)
    for item in nav:
        if isinstance(item, dict) and "Leaderboard" in item:
            item["Leaderboard"] += [{p[len("leaderboard-"):-3]: p} for p in boards]
    if (docs / "imagenet.md").is_file() and "imagenet.md" not in listed:
        at = next(i for i, item in enumerate(nav) if isinstance(item, dict) and "Datasets and classifiers" in item)
        nav.insert(at + 1, {"ImageNet with the papers' networks": "imagenet.md"})
    return config
