"""A recipe (TOML) -> ordered stages -> one run folder: `recipe` parses, `runner` runs the stages with keys and
manifests, `measure` measures the exported files."""

from compress.pipeline.recipe import RunRecipe, Stage, default_recipe_text, load_recipe, parse_recipe
from compress.pipeline.folders import RunOptions
from compress.pipeline.runner import describe_plan, run, run_stages, stage_keys

__all__ = ["RunRecipe", "Stage", "RunOptions", "default_recipe_text", "describe_plan", "load_recipe", "parse_recipe",
           "run", "run_stages", "stage_keys"]
