"""The probe benchmark (egrpo.bench.probe) in its quick settings runs end to end and writes well-formed outputs.
Nothing here checks a measured number against a target: benchmarks report, they never fail on a number."""

import json
import math
import struct
from pathlib import Path

from egrpo.algo.budgets import at_or_above_median
from egrpo.bench import probe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COST_KEYS = ("forward_cost", "probed_forward_s", "pass_vs_rollout", "share", "share_with_reference",
             "share_overhead")


def _in_unit(value: float) -> bool:
    return -1e-6 <= value <= 1 + 1e-6  # normalised entropies are computed in float32


def test_statistics():
    assert probe.ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]
    assert math.isclose(probe.spearman([1, 2, 3, 4], [10, 20, 30, 45]), 1.0)
    assert math.isclose(probe.spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    assert probe.spearman([1, 2, 3], [5, 5, 5]) is None
    assert at_or_above_median([1.0, 2.0, 3.0, 4.0]) == [False, False, True, True]
    assert probe.split_agreement([1, 2, 3, 4], [1, 3, 2, 4]) == 0.5
    assert probe.split_agreement([1, 2, 3, 4], [2, 1, 4, 3], batch=2) == 0.0
    assert probe.jaccard([1, 2], [2, 3]) == 1 / 3 and probe.jaccard([], []) == 1.0


def test_candidates_resolve_to_probe_settings():
    full = probe.FULL_PROBE.probe(blocks=6, heads=8, image_tokens=144, seed=0)
    assert (full.blocks, full.heads, full.rows) == ((), (), 144)
    cheap = probe.Candidate("every-other", "half", 8, "T/2").probe(blocks=6, heads=8, image_tokens=144, seed=0)
    assert (cheap.blocks, cheap.heads, cheap.rows) == ((0, 2, 4), (0, 1, 2, 3), 8)
    assert probe.Candidate("all", "all", 64, "T").probe(4, 4, 64, 0) == probe.FULL_PROBE.probe(4, 4, 64, 0)
    names = [c.name for c in probe.CANDIDATES]
    assert len(set(names)) == len(names) and probe.FULL_PROBE.name in names


def test_probe_bench_quick(tmp_path: Path, capsys):
    assert probe.main(quick=True, out=tmp_path) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["prompts"] == probe.QUICK.prompts
    assert summary["models"] and summary["models"][0]["label"] == "toy"
    for model in summary["models"]:
        prompts = len(model["prompts"])
        assert prompts == len(model["seeds"]) == len(model["full_dE"]) == len(model["full_peaks"]) > 1
        assert all(d >= 0 and math.isfinite(d) for d in model["full_dE"])
        info = model["model"]
        assert all(len(p) <= info["peaks"] and all(0 <= t < info["peak_steps"] for t in p)
                   for p in model["full_peaks"])
        assert model["timing"]["forward_s"] > 0 and model["timing"]["rollout_s"] > 0
        assert _in_unit(model["timing"]["unprobed_pass_share"])
        full = model["curves"][probe.FULL_PROBE.name]
        for curves in (full["theta"], full["reference"]):
            assert len(curves) == prompts and all(len(row) == info["steps"] for row in curves)
            assert all(_in_unit(e) for row in curves for e in row)
        candidates = model["candidates"]
        assert [c["name"] for c in candidates] == [c.name for c in probe.CANDIDATES]
        timed = [c for c in candidates if "share" in c]
        assert {c["name"] for c in candidates if probe.one_axis(c)} <= {c["name"] for c in timed}
        for c in candidates:
            assert len(c["dE"]) == prompts
            assert c["dE_spearman"] is None or -1 - 1e-9 <= c["dE_spearman"] <= 1 + 1e-9
            for key in ("split_agreement", "split_agreement_per_iteration", "peak_jaccard", "units"):
                assert _in_unit(c[key]), (c["name"], key)
            assert isinstance(c["passes"], bool)
        for c in timed:
            assert all(c[key] >= 0 and math.isfinite(c[key]) for key in COST_KEYS), c["name"]
            assert all(_in_unit(c[key]) for key in ("share", "share_with_reference", "share_overhead"))
        full_row = next(c for c in candidates if c["name"] == probe.FULL_PROBE.name)
        assert math.isclose(full_row["dE_spearman"], 1.0) and full_row["split_agreement"] == 1
        assert full_row["passes"] and full_row["E_abs_error"] == 0
    rec = summary["recommendation"]
    assert rec["recommended"] is None or rec["recommended"] in rec["passing"]
    if rec["recommended"] is not None:
        assert isinstance(rec["share_target_met"], bool)
    png = Path(summary["figures"]["entropy_curves"]).read_bytes()
    assert png[:8] == PNG_SIGNATURE and struct.unpack(">II", png[16:24])[0] > 100
    assert len(png) < 300_000
    printed = capsys.readouterr().out
    assert "recommendation:" in printed and probe.FULL_PROBE.name in printed


def test_tiny_flux_folder(tmp_path: Path):
    """The full mode's second model is a loadable model.path (the quick mode skips it to stay short)."""
    folder = probe.build_tiny(tmp_path / "tiny")
    assert (folder / "model_index.json").is_file()
    settings = json.loads((folder / "egrpo.json").read_text())
    assert settings["height"] == settings["width"] == probe.TINY_SIZE
    assert settings["pixel_unshuffle"] == probe.TINY_MODEL["pixel_unshuffle"]
