"""`FastPipeline`: the front door that picks the right pipeline class for a checkpoint.

Like Diffusers' `AutoPipeline*` classes it reads `model_index.json`, but it also knows the
package's own pipelines and the published layouts they load (InstaFlow's checkpoints say
`RectifiedFlowPipeline`). Embedded ShapesWorld asset names work wherever a path does.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from .. import assets
from ..utils.safe_loading import check_weight_files

if TYPE_CHECKING:
    from ..guidance import PPAPGuidance

# `_class_name` in model_index.json -> "module:Class" of the pipeline that loads it.
PIPELINE_CLASSES: dict[str, str] = {
    "FastDiffusionPipeline": "fastgen_diffusers.pipelines.core:FastDiffusionPipeline",
    "InstaFlowPipeline": "fastgen_diffusers.pipelines.instaflow:InstaFlowPipeline",
    "RectifiedFlowPipeline": "fastgen_diffusers.pipelines.instaflow:InstaFlowPipeline",
    "OneStepPipeline": "fastgen_diffusers.pipelines.one_step:OneStepPipeline",
    "OMSPipeline": "fastgen_diffusers.pipelines.oms:OMSPipeline",
}


def resolve_model_location(name_or_path: str | os.PathLike) -> str:
    """An embedded asset name becomes its folder; paths and Hub ids pass through."""
    name_or_path = str(name_or_path)
    if name_or_path in assets.names():
        return str(assets.path(name_or_path))
    return name_or_path


def read_model_index(location: str, **hub_kwargs) -> dict:
    """The checkpoint's `model_index.json`, from a local folder or the Hub (`DiffusionPipeline.load_config`)."""
    local = Path(location)
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise ValueError(f"`pretrained_model_name_or_path` {location!r} is a folder without model_index.json.")
    if not local.is_dir() and (local.exists() or location.count("/") != 1):
        raise ValueError(
            f"`pretrained_model_name_or_path` {location!r} is not a pipeline folder, a Hub id, "
            f"or an embedded model (embedded: {assets.pipeline_names()})."
        )
    return DiffusionPipeline.load_config(location, **hub_kwargs)


def pipeline_class_for(class_name: str) -> type[DiffusionPipeline]:
    """The fastgen pipeline registered for `class_name`, else the Diffusers pipeline of that name."""
    if class_name in PIPELINE_CLASSES:
        module_name, attribute = PIPELINE_CLASSES[class_name].split(":")
        return getattr(importlib.import_module(module_name), attribute)
    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        known = sorted(PIPELINE_CLASSES)
        raise ValueError(f"model_index.json names {class_name!r}, which is neither a fastgen pipeline {known} nor a Diffusers one.")
    return pipeline_class


class FastPipeline:
    """Load any fastgen or Diffusers text-to-image checkpoint with the pipeline class it needs.

    ```py
    pipe = FastPipeline.from_pretrained("shapes-teacher")  # an embedded ShapesWorld model, a folder or a Hub id
    ```
    """

    def __init__(self, *args, **kwargs):
        raise EnvironmentError("Use `FastPipeline.from_pretrained(...)`; it returns the pipeline the checkpoint needs.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        oms: str | os.PathLike | None = None,
        ppap: str | os.PathLike | PPAPGuidance | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> DiffusionPipeline:
        """The checkpoint's pipeline; with `oms` (a One More Step module: embedded name, folder or Hub id), an
        `OMSPipeline` that runs the module in front of it; with `ppap` (a saved `PPAPGuidance`: a folder, an embedded
        collection member such as `shapes-ppap/regressor`, a collection such as `shapes-ppap` meaning its
        `classifier/`, or a Hub id; or a `PPAPGuidance`), a `PPAPPipeline` whose calls take `guide_class` /
        `guide_target`. With both, OMS makes the first latent and PPAP guides the base's steps after it.

        Weights load from safetensors only: a pickle (`.bin`, `.ckpt`) runs any code it holds when loaded, so one is
        read only with `allow_pickle=True` (Diffusers' fallback where a component has no safetensors file) or
        Diffusers' `use_safetensors=False`. A truncated or corrupted local weights file raises a `ValueError`
        naming it."""
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        location = resolve_model_location(pretrained_model_name_or_path)
        check_weight_files(location, allow_pickle=kwargs["use_safetensors"] is not True)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
        pipeline_class = pipeline_class_for(read_model_index(location, **hub_kwargs)["_class_name"])
        if ppap is not None:  # loaded first: a bad name fails before the base loads
            from ..guidance import PPAPGuidance
            from .ppap import PPAPPipeline, load_ppap_guidance, with_guidance_loop

            if not isinstance(ppap, PPAPGuidance):
                ppap_kwargs = {k: kwargs[k] for k in ("token", "cache_dir") if k in kwargs}
                ppap = load_ppap_guidance(ppap, allow_pickle=kwargs["use_safetensors"] is not True, **ppap_kwargs)
        pipe = pipeline_class.from_pretrained(location, **kwargs)
        if ppap is not None:
            pipe = with_guidance_loop(pipe)  # before OMS, so that the pipeline OMS hands its latent to takes guidance
        if oms is not None:
            from .oms import OMSPipeline

            oms_kwargs = {
                k: kwargs[k] for k in ("dtype", "torch_dtype", "token", "cache_dir", "use_safetensors") if k in kwargs
            }
            check_weight_files(resolve_model_location(oms), allow_pickle=kwargs["use_safetensors"] is not True)
            pipe = OMSPipeline.from_pretrained(resolve_model_location(oms), base_pipeline=pipe, **oms_kwargs)
        if ppap is not None:
            pipe = PPAPPipeline(ppap, base_pipeline=pipe)
        return pipe


FASTGEN_METADATA_FILE = "fastgen.json"


def read_fastgen_metadata(location: str, **hub_kwargs) -> dict:
    """The `fastgen.json` our training scripts write beside `model_index.json` (method, default sampler); {} if absent."""
    local = Path(location)
    if local.is_dir():
        path = local / FASTGEN_METADATA_FILE
        return json.loads(path.read_text()) if path.is_file() else {}
    try:
        return json.loads(Path(hf_hub_download(location, FASTGEN_METADATA_FILE, **hub_kwargs)).read_text())
    except EntryNotFoundError:
        return {}


def write_fastgen_metadata(output_dir: str | os.PathLike, metadata: dict) -> None:
    """Write `fastgen.json` atomically (a partial file renamed into place)."""
    path = Path(output_dir) / FASTGEN_METADATA_FILE
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(metadata, indent=2) + "\n")
    os.replace(partial, path)
