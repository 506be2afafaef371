"""Does a negative prompt remove what it names and leave the rest alone? `fastgen eval --negative` on ShapesWorld.

The prompts are the evaluation prompts with the colour phrase left out ("a large circle at the top left on a
black background"), so the model picks a colour. For each palette colour c in turn, the same prompts are generated
with the same seeds once more with `negative_prompt=c`, and the judge reads every image:

- colour removal: the share of images judged colour c without and with the negative prompt, and the relative
  reduction 1 - with / without (goal: at least 80%);
- collateral damage: the adherence of the attributes the prompt does name (shape, size, position, background)
  without and with, and the drop in points (goal: at most 3).

All `num_prompts` prompts serve every colour. The run without a negative prompt does not depend on c, so it is
generated once and shared; each colour adds one run with its negative prompt: (1 + 8) x `num_prompts` images for
the 8 colours. Same prompt and same initial noise make every comparison paired, and each colour's shares are
measured on all `num_prompts` images (a colour appears in ~1/8 of the baseline images), not on an eighth of them.

Averages over colours: shares and adherence are plain means; the relative reduction is pooled,
1 - sum(with) / sum(without), so a colour the model rarely draws unprompted cannot swing it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .captions import COLOURS, Attributes, make_caption
from .dataset import EvalPrompt, evaluation_prompts
from .evaluate import generate_images
from .metrics import attribute_adherence, attribute_rate


# The attributes a colour-free prompt names, in the order the tables show them.
OTHER_ATTRIBUTES = ("shape", "size", "position", "background")
GOALS = {"relative_reduction": 0.8, "adherence_drop_points": 3.0}


def colour_free_prompts(num_prompts: int = 1000, seed: int = 0) -> list[EvalPrompt]:
    """The evaluation prompts with the colour left out of both caption and attributes (drawing seeds kept)."""
    prompts = []
    for prompt in evaluation_prompts(num_prompts, seed=seed):
        attributes = replace(prompt.attributes, colour=None)
        prompts.append(EvalPrompt(make_caption(attributes), attributes, prompt.seed))
    return prompts


def other_attribute_adherence(predicted: list[Attributes], prompted: list[Attributes]) -> dict[str, float]:
    """Adherence of shape, size, position and background; `mean` over the four and `all` (all four right)."""
    if any(p.colour is not None for p in prompted):
        raise ValueError("`prompted` must leave the colour out: its adherence is what the negative prompt changes.")
    adherence = attribute_adherence(predicted, prompted)
    scores = {name: adherence[name] for name in OTHER_ATTRIBUTES}
    return {**scores, "mean": sum(scores.values()) / len(scores), "all": adherence["all"]}


def relative_reduction(share_without: float, share_with: float) -> float | None:
    """1 - with / without; None when the colour never appears without the negative prompt (nothing to remove)."""
    return 1.0 - share_with / share_without if share_without > 0 else None


def negative_prompt_metrics(
    prompted: list[Attributes], baseline: list[Attributes], negated: dict[str, list[Attributes]]
) -> dict[str, Any]:
    """The metrics from judged attributes: `baseline[i]` and `negated[c][i]` are images of prompt `prompted[i]`
    (same seed) without and with `negative_prompt=c`."""
    if not negated:
        raise ValueError("`negated` must hold at least one colour.")
    for colour, predicted in negated.items():
        if colour not in COLOURS:
            raise ValueError(f"`negated` keys must be colours {list(COLOURS)}, got {colour!r}.")
        if len(predicted) != len(prompted) or len(baseline) != len(prompted):
            raise ValueError("`prompted`, `baseline` and every `negated` list must have one entry per prompt.")
    adherence_without = other_attribute_adherence(baseline, prompted)
    per_colour = {}
    for colour, predicted in negated.items():
        share_without, share_with = (
            attribute_rate(baseline, "colour", colour),
            attribute_rate(predicted, "colour", colour),
        )
        adherence_with = other_attribute_adherence(predicted, prompted)
        per_colour[colour] = {
            "share_without": share_without,
            "share_with": share_with,
            "relative_reduction": relative_reduction(share_without, share_with),
            "adherence_with": adherence_with,
            "adherence_drop_points": {k: 100 * (adherence_without[k] - v) for k, v in adherence_with.items()},
        }

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    rows = per_colour.values()
    average = {
        "share_without": mean(r["share_without"] for r in rows),
        "share_with": mean(r["share_with"] for r in rows),
        "relative_reduction": relative_reduction(
            sum(r["share_without"] for r in rows), sum(r["share_with"] for r in rows)
        ),
        "adherence_with": {k: mean(r["adherence_with"][k] for r in rows) for k in adherence_without},
        "adherence_drop_points": {k: mean(r["adherence_drop_points"][k] for r in rows) for k in adherence_without},
    }
    reduction = average["relative_reduction"]
    return {
        "colours": list(negated),
        "adherence_without": adherence_without,
        "per_colour": per_colour,
        "average": average,
        "goals": dict(GOALS),
        "meets_goals": {
            "relative_reduction": reduction is not None and reduction >= GOALS["relative_reduction"],
            "adherence_drop_points": average["adherence_drop_points"]["mean"] <= GOALS["adherence_drop_points"],
        },
    }


def evaluate_negative_prompts(
    pipe,
    judge,
    num_prompts: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    colours: tuple[str, ...] = tuple(COLOURS),
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Generate and judge the colour-free prompts without and with each colour as negative prompt (module doc).

    `pipe` is any pipeline whose call takes `negative_prompt` (at guidance <= 1 the package's one-step pipelines
    steer attention with it; above 1 it is CFG's unconditional prompt). `call_kwargs` go to every call.
    """
    if "negative_prompt" in call_kwargs:
        raise ValueError("`call_kwargs` must not set `negative_prompt`: each colour is the negative prompt in turn.")
    prompts = colour_free_prompts(num_prompts, seed=seed)
    captions = [p.caption for p in prompts]
    baseline = judge.read(generate_images(pipe, captions, seed=seed, batch_size=batch_size, **call_kwargs))
    negated = {
        colour: judge.read(
            generate_images(pipe, captions, seed=seed, batch_size=batch_size, negative_prompt=colour, **call_kwargs)
        )
        for colour in colours
    }
    return {"n": num_prompts, **negative_prompt_metrics([p.attributes for p in prompts], baseline, negated)}


def format_negative_table(result: dict[str, Any]) -> str:
    """Markdown tables: colour removal and other-attribute adherence (mean of the four) per colour, then the
    average per attribute, then the goals."""

    def percent(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    without = result["adherence_without"]
    lines = [
        f"negative prompts on {result['n']} colour-free prompts, each colour in turn (same prompts and seeds)",
        "| negative | share without | share with | reduction | adherence without | adherence with | drop (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [*result["per_colour"].items(), ("average", result["average"])]
    for name, row in rows:
        lines.append(
            f"| {name} | {row['share_without']:.3f} | {row['share_with']:.3f} | {percent(row['relative_reduction'])}"
            f" | {without['mean']:.3f} | {row['adherence_with']['mean']:.3f}"
            f" | {row['adherence_drop_points']['mean']:.1f} |"
        )
    average = result["average"]
    lines += ["", "| attribute (average over colours) | without | with | drop (points) |", "|---|---|---|---|"]
    for name in (*OTHER_ATTRIBUTES, "all"):
        lines.append(
            f"| {name} | {without[name]:.3f} | {average['adherence_with'][name]:.3f}"
            f" | {average['adherence_drop_points'][name]:.1f} |"
        )
    met = result["meets_goals"]
    lines.append(
        f"\ngoals: reduction >= {100 * result['goals']['relative_reduction']:.0f}%"
        f" ({'met' if met['relative_reduction'] else 'not met'}), adherence drop <="
        f" {result['goals']['adherence_drop_points']:g} points ({'met' if met['adherence_drop_points'] else 'not met'})"
    )
    return "\n".join(lines)
