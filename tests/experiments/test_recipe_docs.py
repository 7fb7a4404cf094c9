"""The reproduction table of benchmarks/RESULTS.md lists every shipped recipe with its published figure."""
from pathlib import Path

from mambacl.experiments.recipe import get_recipe, list_recipes

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "RESULTS.md"


def test_every_recipe_has_a_row_with_its_published_figure_and_command():
    section = RESULTS.read_text().split("## Reproducing the papers (recipes)")[1].split("\n## ")[0]
    for name in list_recipes():
        recipe = get_recipe(name)
        row = next(line for line in section.splitlines() if line.startswith(f"| `{recipe.tag}` |"))
        figure = recipe.published if isinstance(recipe.published, str) else f"Avg {recipe.published['avg']:.2f}"
        assert figure in row and f"mambacl run --recipe {name} " in row, row
