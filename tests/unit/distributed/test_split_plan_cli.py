"""``maas models split-plan``: the table, the JSON, and clear refusals."""

from __future__ import annotations

import json

from tests.fixtures import make_onnx, make_tiny_llama


def test_split_plan_shows_each_stage_and_refuses_what_it_cannot_split(cli, tmp_path):
    folder = make_tiny_llama(tmp_path / "llama", num_layers=4)
    assert cli("models", "import", str(folder), "--name", "tiny")[0] == 0
    code, out, err = cli("models", "split-plan", "tiny", "--stages", "2")
    assert code == 0, err
    assert "blocks 0-1" in out and "blocks 2-3" in out and "largest stage" in out
    code, out, _ = cli("models", "split-plan", "tiny:1", "-k", "3", "--json")
    plan = json.loads(out)
    assert code == 0 and [len(s["units"]) for s in plan["stages"]] == [1, 2, 1]
    assert plan["stages"][0]["parameters"][0] == "embed.weight"
    assert plan["stages"][-1]["parameters"][-1] == "lm_head.weight"

    code, _, err = cli("models", "split-plan", "tiny", "--stages", "5")
    assert code == 1 and "cannot make 5 stages" in err
    code, _, err = cli("models", "split-plan", "tiny", "--dtype", "float8")
    assert code == 1 and "unknown dtype" in err
    assert cli("models", "split-plan", "nope")[0] == 1
    assert cli("models", "import", str(make_onnx(tmp_path / "m.onnx")), "-n", "onnx")[0] == 0
    code, _, err = cli("models", "split-plan", "onnx")
    assert code == 1 and "not a Llama-family LLM" in err
