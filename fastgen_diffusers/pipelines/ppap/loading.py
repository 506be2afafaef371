"""Where a saved `PPAPGuidance` lives, given the names users write: one rule for `FastPipeline`, `PPAPPipeline` and
`fastgen --ppap`, so that they all read the same name the same way.

A PPAP *collection* (the shipped `shapes-ppap`) is a folder of saved guidances, one per subfolder (`classifier/`,
`classifier-single-expert/`, `regressor/`); naming the collection alone means its `classifier/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download

from ... import assets
from ...guidance.ppap import CONFIG_NAME, PPAPGuidance

# The member a bare collection name stands for.
DEFAULT_MEMBER = "classifier"


def resolve_ppap_location(name_or_path: str | os.PathLike, member: str | None = None, **hub_kwargs) -> Path:
    """The local folder holding the `ppap_config.json` of the guidance `name_or_path` names.

    Accepted: a folder holding `ppap_config.json`; an embedded collection's member (`shapes-ppap/regressor`); a
    collection (an embedded name such as `shapes-ppap`, a folder, or a Hub id), meaning its `member` (default
    `classifier`); a Hub id (`user/repo`, or `user/repo/member`), downloaded with `snapshot_download` (`hub_kwargs`:
    `revision`, `token`, `cache_dir`). `member` is read only where the location is a collection.
    """
    name = str(name_or_path)
    asset, _, inside = name.partition("/")
    if asset in assets.names():
        location = assets.path(asset) / inside
    elif Path(name).exists():
        location = Path(name)
    elif name.count("/") in (1, 2) and not name.startswith(("/", ".", "~")):
        parts = name.split("/")
        repo_id, inside = "/".join(parts[:2]), "/".join(parts[2:])
        location = Path(snapshot_download(repo_id, **hub_kwargs)) / inside
    else:
        raise ValueError(
            f"`ppap` {name!r} is neither a folder, an embedded PPAP collection or member ({ppap_asset_names()}, e.g."
            " 'shapes-ppap/regressor'), nor a Hub id."
        )
    if (location / CONFIG_NAME).is_file():
        return location
    members = sorted(config.parent.name for config in location.glob(f"*/{CONFIG_NAME}"))
    if not members:
        raise ValueError(f"`ppap` {name!r} ({location}) holds no {CONFIG_NAME}: not a saved PPAPGuidance or a collection of them.")
    chosen = member or DEFAULT_MEMBER
    if chosen not in members:
        raise ValueError(f"`ppap` {name!r} is a PPAP collection without a member {chosen!r}; its members: {members}.")
    return location / chosen


def load_ppap_guidance(
    name_or_path: str | os.PathLike, member: str | None = None, allow_pickle: bool = False, **hub_kwargs
) -> PPAPGuidance:
    """The `PPAPGuidance` that `name_or_path` names (see `resolve_ppap_location`), in float32: the gradient the
    guidance takes is small next to the sampler's UNet, and it is taken in float32 whatever the base's dtype."""
    location = resolve_ppap_location(name_or_path, member, **hub_kwargs)
    return PPAPGuidance.from_pretrained(location, allow_pickle=allow_pickle)


def ppap_asset_names() -> list[str]:
    """The embedded PPAP collections and guidances (folders holding saved guidances, or one)."""
    return [
        name
        for name in assets.names()
        if (assets.path(name) / CONFIG_NAME).is_file() or any(assets.path(name).glob(f"*/{CONFIG_NAME}"))
    ]
