"""Every recipe in configs/ is a valid training config: a typo in a shipped recipe fails here,
not an hour into someone's run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import TrainConfig, load_yaml_config
from training.engine import network_from_config

ROOT = Path(__file__).resolve().parents[1]
# configs/soups/ holds weight-averaging recipes (earlyexit-soup), not training configs.
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "soups" not in p.parts)
SOUPS = sorted((ROOT / "configs" / "soups").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_is_a_valid_config(path: Path) -> None:
    data = load_yaml_config(str(path))
    if data.get("freeze_backbone"):
        # Frozen-backbone recipes take the trained model on the command line (--init).
        assert "init" not in data and "--init" in path.read_text(encoding="utf-8")
        data["init"] = "runs/plain/best.pt"
    cfg = TrainConfig.from_dict(data).resolved()
    cfg.validate()
    assert cfg.epochs >= 1
    # The recipe builds a network with the exits it names, and one image goes through it:
    # a placement or head a backbone cannot take fails here, not an hour into a run.
    model = network_from_config(cfg, num_classes=10).eval()
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, 32, 32))
    assert len(outputs.logits) == cfg.exits
    assert all(t.shape == (1, 10) for t in outputs.logits)


@pytest.mark.parametrize("path", SOUPS, ids=lambda p: p.name)
def test_soup_recipe_is_valid(path: Path) -> None:
    import argparse

    from training.soup_cli import soup_config

    args = argparse.Namespace(
        recipe=path, ingredients=[], bn=None, weights=None, batches=None, seed=None, data_dir=None
    )
    config = soup_config(args)
    config.validate()
    # Every ingredient is a relative path (a recipe must work from any clone).
    assert all(not Path(p).is_absolute() for p in config.ingredients)
