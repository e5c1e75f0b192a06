"""bench.sources builds configs that `cpt validate` takes (its loader: load_config), and compares like with like:
the replay run and the sources run differ in their data spelling only, and the two lines in their schedule only."""

from __future__ import annotations

from pathlib import Path

import yaml

from bench.sources import WEIGHTS, common_settings, line_config, part_a_configs
from tasks.core.config.tree import load_config


def validated(cfg: dict, path: Path):
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return load_config(path)


def test_the_bench_configs_validate_and_differ_only_where_they_compare(tmp_path):
    common = common_settings(40, 1.5e-4)
    arms = part_a_configs(tmp_path, tmp_path / "base", common, [], eval_rows=200)
    replay, sources = (validated(arms[n], tmp_path / f"{n}.yaml") for n in ("replay", "sources"))
    assert [s.name for s in replay.data_sources()] == ["corpus", "replay"]
    assert [s.name for s in sources.data_sources()] == list(WEIGHTS)
    # the same total trained tokens: the domain read once is the same share of them on both sides
    assert replay.replay.fraction == 1 - WEIGHTS["domain"] == sum(w for n, w in WEIGHTS.items() if n != "domain")
    assert replay.train == sources.train and replay.chunk == sources.chunk and replay.evaluate == sources.evaluate

    lines = {m: validated(line_config(m, tmp_path, tmp_path / "base", common, 30, 200), tmp_path / f"{m}.yaml")
             for m in ("standard", "stable_anneal")}
    assert lines["stable_anneal"].train.schedule == "stable_anneal" and lines["standard"].train.schedule == "standard"
    assert lines["stable_anneal"].train.max_steps == lines["standard"].train.max_steps == 30
    assert lines["standard"].train.init == lines["stable_anneal"].train.init == "last_promoted"
    assert lines["standard"].model_dump(exclude={"train", "push"}) == \
        lines["stable_anneal"].model_dump(exclude={"train", "push"})
