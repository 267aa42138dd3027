"""The class behind the wide table (tests/test_backbones.py): every causal-LM family the installed transformers
ships, built tiny, goes through the start-up probe, and a fast layout it keeps gives the padded batch's rewards on
pairs the probe never scored. Slow (about 2.5 minutes on 2 cores; `python -m pytest -m slow
tests/test_backbone_sweep.py`): one forked child per family in tests/scripts/backbone_sweep.py.

transformers 5.24 (196 families): 133 reach a layout (78 segment attention, 14 4D-mask rows, 41 padded with the
reason), 63 are skipped with the reason (encoder-decoders, settings a family refuses or that build a model over
20M parameters, a padded forward that fails with the generic settings).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from launch_utils import ROOT, run_command

pytestmark = pytest.mark.slow

# Layers that carry state along the sequence (state-space, linear attention, recurrence) or attend both ways: a
# packed row or a shared prompt cannot be exact; the probe must measure it wherever such a family builds.
NOT_PACKABLE = {
    "mamba",
    "falcon_mamba",
    "rwkv",
    "xlstm",
    "recurrent_gemma",
    "jamba",
    "falcon_h1",
    "nemotron_h",
    "qwen3_next",
    "minimax",
    "kimi_linear",
    "bert",
    "roberta",
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, dict]:
    output = tmp_path_factory.mktemp("sweep") / "results.json"
    script = os.path.join(ROOT, "tests", "scripts", "backbone_sweep.py")
    run_command([sys.executable, script, str(output)], timeout=1800)
    return json.loads(output.read_text(encoding="utf-8"))


def families(sweep: dict[str, dict], status: str) -> dict[str, dict]:
    return {family: result for family, result in sweep.items() if result["status"] == status}


def test_every_family_gets_a_layout_or_a_named_skip_and_none_crashes_the_start_up(sweep):
    assert families(sweep, "error") == {}
    assert all(result["why"] for result in families(sweep, "skipped").values())
    decided = families(sweep, "layout")
    assert len(decided) >= 60, sorted(families(sweep, "skipped"))
    assert all(result["reason"] for result in decided.values() if result["attention"] == "padded")


def test_a_fast_layout_the_probe_keeps_gives_the_padded_rewards_on_unseen_pairs(sweep):
    fast = {
        name: result for name, result in families(sweep, "layout").items() if result["attention"] != "padded"
    }
    assert len(fast) >= 40
    wrong = {  # fp32: 1e-5 of the reward scale, set here, not read from the probe it checks
        name: (result["attention"], result["difference"], result["scale"])
        for name, result in fast.items()
        if not result["difference"] <= 1e-5 * result["scale"]
    }
    assert wrong == {}
    assert all("proved exact at start-up" in result["reason"] for result in fast.values())


def test_families_with_state_along_the_sequence_or_both_way_attention_train_padded(sweep):
    decided = families(sweep, "layout")
    present = NOT_PACKABLE & set(decided)
    assert len(present) >= 6, sorted(present)
    for family in present:
        assert decided[family]["attention"] == "padded", (family, decided[family])
        assert not decided[family]["packing"] and not decided[family]["share_prompt"]
