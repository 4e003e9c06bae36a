"""Recipes: YAML lists of steps run, cached and resumed by ``recipe.py``; ready ones beside it."""

from pocketlm.recipes.recipe import RecipeError, describe, parse, run

__all__ = ["RecipeError", "describe", "parse", "run"]
