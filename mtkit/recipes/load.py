"""Finding, loading and listing recipes: a shipped one by name or a YAML file, with its
``--set`` overrides and (with ``--smoke``) its smoke variant, validated."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtkit.config import load_raw_config
from mtkit.config_fields import ModelConfig
from mtkit.data.catalog import Catalog, load_catalog
from mtkit.errors import MtkitError, unknown_name
from mtkit.recipes.schema import Recipe, apply_recipe_overrides, config_raw, validate
from mtkit.recipes.smoke import smoke_variant

RECIPE_DIR = Path(__file__).parent.parent / "recipes_data"  # the recipes shipped inside the package


def recipe_paths() -> list[Path]:
    """The recipes shipped with mtkit (package data, also in a plain ``pip install``)."""
    return sorted(RECIPE_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or a shipped recipe by name. ``recipes/NAME.yaml`` (the
    place the recipes had in a source checkout) names the shipped recipe when no such file exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.stem if path.suffix in (".yaml", ".yml") and path.parent.name in ("", "recipes") else str(name_or_path)
    shipped = RECIPE_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    if path.parent.name not in ("", "recipes") or path.exists():
        raise MtkitError(f"recipe file not found: {path}")
    raise MtkitError(unknown_name("recipe", name, [p.stem for p in recipe_paths()]))


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), smoke: bool = False, catalog: Catalog | None = None
) -> Recipe:
    """Read, override and validate a recipe (and, with ``smoke``, its smoke variant); ``path``
    may also be a shipped recipe's name (:func:`find_recipe`)."""
    path = find_recipe(path)
    catalog = catalog or load_catalog()
    raw = apply_recipe_overrides(load_raw_config(path), overrides)
    recipe = validate(raw, path, catalog)
    if smoke:
        recipe = validate(apply_recipe_overrides(smoke_variant(raw), overrides), path, catalog, smoke=True)
    return recipe


def check_recipe(
    path: str | Path, overrides: Sequence[str] = (), data_dir: Any = None, smoke: bool = False
) -> dict[str, Any]:
    """Validate a recipe without running anything; says where each data file would come from."""
    from mtkit.data.catalog import resolution_plan

    catalog = load_catalog()
    recipe = load_recipe(path, overrides, smoke=smoke, catalog=catalog)
    if not smoke:
        load_recipe(path, overrides, smoke=True, catalog=catalog)  # the smoke variant must hold too
    files = [(ref, lang) for ref in recipe.data_refs() for lang in (recipe.src_lang, recipe.tgt_lang)]
    rep = recipe.raw["reproduces"]
    return {
        "recipe": recipe.name, "ok": True, "arch": recipe.config.model.arch,
        "preset": recipe.raw.get("preset"),
        "reproduces": f"{rep['paper']}, {rep['table']}: {rep.get('value')} {rep['metric']} on {rep['test_set']}",
        "tests": [t.name for t in recipe.tests], "data": resolution_plan(files, data_dir, catalog),
    }


def list_recipes() -> list[dict[str, Any]]:
    """Name, languages, model family and the cited number of every shipped recipe."""
    rows = []
    for path in recipe_paths():
        raw = load_raw_config(path)
        rep = raw.get("reproduces") or {}
        arch = ((config_raw(raw).get("model") or {}).get("arch")) or ModelConfig.arch
        rows.append({
            "name": path.stem, "src_lang": raw.get("src_lang"), "tgt_lang": raw.get("tgt_lang"), "arch": arch,
            "preset": raw.get("preset"), "value": rep.get("value"), "metric": rep.get("metric"),
            "test_set": rep.get("test_set"), "paper": rep.get("paper"),
        })
    return rows


def format_recipe_list(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`list_recipes` as the aligned text ``mtkit recipe list`` prints."""
    width = max((len(r["name"]) for r in rows), default=4)
    lines = [f"{'recipe':<{width}}  pair   model          cites"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:g}"
        lines.append(f"{r['name']:<{width}}  {r['src_lang']}-{r['tgt_lang']}  {r['arch']:<13}  "
                     f"{value} {r['metric']} on {r['test_set']}")
    return "\n".join(lines)
