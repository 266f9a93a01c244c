"""experiments/robust_barriers.py --quick: it runs, and its tables agree with its own JSON."""
import importlib.util
import json

import numpy as np

from conftest import ROOT


def test_quick_run_writes_consistent_results(tmp_path):
    spec = importlib.util.spec_from_file_location("robust_barriers", ROOT / "experiments" / "robust_barriers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.run("quick", tmp_path)
    for name in ("robust_barriers_quick.json", "robust_barriers_quick.md", "robust_barriers_quick.png",
                 "robust_barriers_quick_slices.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "robust_barriers_quick.json").read_text())
    pair = saved["pairs"][0]
    assert set(pair["adversarial"]) == {"alignment_cosine", "line", "aligned line", "aligned curve",
                                        "aligned robust curve"}
    for kind in ("adversarial", "standard"):
        for path in ("line", "aligned line", "aligned curve"):
            r = pair[kind][path]
            ts, robust = np.asarray(r["ts"]), np.asarray(r["robust_test_loss"])
            # the robust barrier by hand: max over t of L(t) - [(1-t) L(0) + t L(1)], clipped at 0
            by_hand = max(0.0, float(np.max(robust - ((1 - ts) * robust[0] + ts * robust[-1]))))
            assert abs(r["robust_loss_barrier"] - by_hand) < 1e-9
            assert r["min_robust_acc"] <= min(r["endpoint_robust_acc"]) <= r["max_robust_acc"]
    md = (tmp_path / "robust_barriers_quick.md").read_text()
    assert f"{result['pairs'][0]['adversarial']['line']['robust_loss_barrier']:.3f}" in md
