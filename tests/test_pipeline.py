"""`crossdict run` end to end on two tiny local models: stage skipping, targeted reruns, the HTML report in Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from crossdict.config import config_from_dict
from crossdict.pipeline import run_all


def tiny_run_config(tiny_models, tmp_path, **align):
    text = tmp_path / "corpus.txt"
    if not text.exists():
        from conftest import corpus_texts

        text.write_text("\n\n".join(corpus_texts(600)))
    return config_from_dict({
        "run_name": "tiny", "output_dir": str(tmp_path / "runs"),
        "model_a": {"name": str(tiny_models["gpt2"]), "layers": [1, 3], "max_ctx": 48},
        "model_b": {"name": str(tiny_models["llama"]), "layers": [1, 2], "max_ctx": 40},
        "corpus": {"source": str(text), "max_passages": 160, "passage_chars": 300, "heldout_fraction": 0.3},
        "extract": {"batch_size": 16, "shard_passages": 64, "layer_sweep_tokens": 300},
        "sae": {"expansion_factor": 2, "k": 4, "batch_size": 256, "train_tokens": 256 * 30, "checkpoint_every": 10,
                "dead_tokens_threshold": 2000, "aux_k": 8},
        "align": {"n_bootstrap": 4, "n_null": 4, "n_match_null": 99, "n_match_bootstrap": 2, "metric_max_tokens": 400,
                  "retrieval_candidates": 50, "retrieval_queries": 200,
                  # tiny random-init models read little beyond the token: the token-stratified null leaves the
                  # transfer stage nothing to inject, so this plumbing test turns it off (tested in test_baselines)
                  "match_token_null": False, **align},
        "transfer": {"n_features": 2, "alphas": [4.0], "n_random_controls": 8, "n_passages": 8, "passage_chars": 200,
                     "n_patch_features": 2, "n_patch_controls": 4},
    })


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_run_config(tiny_models, tmp)
    status = run_all(cfg, progress=False)
    return cfg, status


def test_first_run_runs_every_stage_and_writes_the_report(finished_run):
    cfg, status = finished_run
    assert set(status.values()) == {"ran"} and list(status) == ["extract", "train", "align", "transfer", "report"]
    html = (cfg.report_dir / "index.html").read_text()
    assert "<script src=" not in html and "http://" not in html.replace("http://www.w3.org", "")  # self-contained
    for section in ('id="summary"', 'id="universality"', 'id="layers"', 'class="heatmap"', 'id="saes"', 'id="browser"', "data:image/png;base64,"):
        assert section in html, section
    rows = list(csv.DictReader((cfg.report_dir / "layer_cka.csv").open()))
    assert len(rows) == 4 * 3 and {r["source"] for r in rows} == {"layer_sweep"}  # every layer of A x every layer of B
    assert (cfg.run_dir / "cache_random" / "manifest.json").is_file()
    metrics = list(csv.DictReader((cfg.report_dir / "metrics.csv").open()))
    assert any(r["space"] == "resid_random_b" for r in metrics)  # the floor is in the numbers


def test_rerun_skips_everything_without_loading_a_model(finished_run, capsys):
    cfg, _ = finished_run
    capsys.readouterr()
    status = run_all(cfg, progress=False)
    out = capsys.readouterr().out
    assert set(status.values()) == {"skipped"}, out
    assert "loaded" not in out and out.count("up to date, skipped") == 5


def _rewrite_timings(manifest_path):
    """What a re-extraction writes: the same data, other timings (through crossdict's writer, so its digest is new)."""
    from crossdict.cache import write_manifest

    m = json.loads(manifest_path.read_text())
    m["extract_seconds"] = m.get("extract_seconds", 0) + 123.0
    m["tokens_per_second"] = 1.0
    for model in m["models"].values():
        model.get("source", {})["load_s"] = 99.0
    write_manifest(manifest_path.parent, m)


def test_rewritten_timing_fields_leave_every_stage_and_every_sae_up_to_date(finished_run, capsys):
    """Issue 15: the SAE fingerprint and the stage digests hash the fields that define the data, not timings."""
    from crossdict.train import run_train

    cfg, _ = finished_run
    for path in (cfg.cache_dir / "manifest.json", cfg.run_dir / "cache_random" / "manifest.json"):
        _rewrite_timings(path)
    weights = sorted((cfg.run_dir / "saes").rglob("sae_weights.safetensors"))
    assert weights
    before = {w: w.stat().st_mtime_ns for w in weights}
    capsys.readouterr()
    status = run_all(cfg, progress=False)
    out = capsys.readouterr().out
    assert set(status.values()) == {"skipped"}, out
    run_train(cfg, progress=False)  # `crossdict train` alone reuses every SAE too
    assert {w: w.stat().st_mtime_ns for w in weights} == before


def test_config_change_reruns_exactly_the_stages_it_reaches(finished_run, tiny_models, capsys):
    cfg, _ = finished_run
    changed = tiny_run_config(tiny_models, cfg.run_dir.parent.parent, n_null=5)
    capsys.readouterr()
    status = run_all(changed, progress=False)
    out = capsys.readouterr().out
    assert status == {"extract": "skipped", "train": "skipped", "align": "ran", "transfer": "ran", "report": "ran"}
    assert "config changed (align.n_null: 4 -> 5)" in out
    # A deleted output reruns the stage that owns it (and what reads it), nothing upstream.
    (cfg.report_dir / "layer_cka.csv").unlink()
    status = run_all(changed, progress=False)
    assert status["extract"] == status["train"] == "skipped" and status["align"] == "ran"
    assert "outputs missing" in capsys.readouterr().out


def test_transfer_with_no_significant_match_names_the_null_resolution(finished_run):
    """Issue 15: `crossdict run`'s transfer stage (not select_pairs alone) names the shuffle null's resolution when it
    is why no pair passes. run_transfer keeps only the significant pairs for their support, so the hint saw no tested
    pair and a tiny run stopped with a bare "no significant feature matches"."""
    import dataclasses

    from crossdict.interventions import TransferError, run_transfer

    cfg, _ = finished_run
    # n_match_null 99: p >= 1/100, so BH q >= 0.01 for every pair: none can reach q < 1e-4, whatever the data
    strict = dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, q_threshold=1e-4))
    with pytest.raises(TransferError) as err:
        run_transfer(strict, progress=False)
    msg = str(err.value)
    assert "no significant feature matches" in msg and "The shuffle null's resolution is the cause" in msg, msg
    assert "align.n_match_null=99" in msg and "1/100" in msg, msg


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _chromium() -> str:
    """Debian's Chromium; the test skips (saying so) only when it is absent, and fails instead under CI."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        msg = "Chromium is not installed (no `chromium` or `chromium-browser` on PATH; `make browser` installs it)"
        if _under_ci():
            pytest.fail(f"CI={os.environ['CI']}: {msg}; CI must run the browser test, not skip it")
        pytest.skip(msg)
    return path


def test_browser_test_skips_only_without_chromium_and_never_under_ci(monkeypatch):
    import _pytest.outcomes as outcomes

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(outcomes.Skipped, match="Chromium is not installed"):
        _chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(outcomes.Failed, match="CI must run the browser test"):
        _chromium()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/chromium" if name == "chromium" else None)
    assert _chromium() == "/usr/bin/chromium"


def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    """Open the report from disk, check numbers render, click a pair, see both models' contexts, screenshot."""
    chromium = _chromium()
    playwright = pytest.importorskip("playwright.sync_api") if not _under_ci() else __import__(
        "playwright.sync_api", fromlist=["sync_playwright"])  # under CI a missing Playwright fails, not skips
    cfg, _ = finished_run
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors, requests = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto((cfg.report_dir / "index.html").resolve().as_uri())
        cells = page.locator("table.heatmap td")
        assert cells.count() == 2 * 4 * 3  # z-scored and raw maps, 4 x 3 layers each
        values = [float(v) for v in cells.evaluate_all("els => els.map(e => e.dataset.value)")]
        assert all(0.0 <= v <= 1.0 for v in values) and max(values) > 0.1
        summary = page.locator("#summary table").first.inner_text()  # metrics down, layer pairs across
        assert "A1 ↔ B1" in summary and page.locator("#summary table .fvc b").count() > 0
        assert all(any(ch.isdigit() for ch in v) for v in page.locator("#summary table .fvc b").all_inner_texts())
        assert page.locator("#saes img").evaluate("img => img.naturalWidth") > 100  # the inline PNG decoded
        n_pairs = page.locator("#pairs tbody tr").count()
        assert n_pairs > 0
        page.locator("#pairs tbody tr").first.click()
        assert page.locator("#detail-a .context").count() > 0 and page.locator("#detail-b .context").count() > 0
        assert page.locator("#detail-a .ctx-a .hl-a").count() > 0  # A's feature highlighted in its own top context
        page.fill("#filter", "no-such-feature-xyz")
        assert page.locator("#pairs tbody tr").count() == 0
        page.fill("#filter", "")
        assert page.locator("#pairs tbody tr").count() == n_pairs
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing fetched from a network
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_unwritable_output_dir_fails_clearly(tiny_models, tmp_path, capsys):
    from crossdict.cli import main

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output directory should be")
    cfg_path = tmp_path / "cfg.yaml"
    import yaml

    cfg = tiny_run_config(tiny_models, tmp_path)
    d = cfg.to_dict()
    d["output_dir"] = str(blocker / "runs")
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["run", "--config", str(cfg_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot write to" in err and "not_a_dir" in err and "choose a writable output_dir" in err
    assert blocker.read_text().startswith("a file")


def test_full_disk_fails_clearly_and_keeps_earlier_outputs(finished_run, monkeypatch, capsys):
    import errno

    from crossdict import report
    from crossdict.cli import main

    cfg, _ = finished_run
    html_before = (cfg.report_dir / "index.html").read_bytes()
    metrics_before = (cfg.report_dir / "metrics.csv").read_bytes()
    (cfg.run_dir / "stages" / "report.json").unlink()  # force the report stage to run

    real = report.atomic_write_text

    def full_disk(path, text):
        from crossdict.utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_text", full_disk)
    cfg_path = cfg.run_dir / "config.yaml"
    assert main(["run", "--config", str(cfg_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "disk full while writing" in err and "index.html" in err
    assert (cfg.report_dir / "index.html").read_bytes() == html_before  # old report intact, no half file
    assert (cfg.report_dir / "metrics.csv").read_bytes() == metrics_before
    assert not list(cfg.report_dir.glob(".*.tmp"))
    monkeypatch.setattr(report, "atomic_write_text", real)
    capsys.readouterr()
    from crossdict.config import load_config

    status = run_all(load_config(cfg_path), progress=False)  # space is back: only the report runs
    assert status == {"extract": "skipped", "train": "skipped", "align": "skipped", "transfer": "skipped", "report": "ran"}


def test_interrupted_training_resumes_from_its_checkpoint(tiny_models, tmp_path, monkeypatch, capsys):
    from crossdict import train

    cfg = tiny_run_config(tiny_models, tmp_path)
    real = train.train_saes
    calls = []

    def killed_after_15_steps(acts, rows, sae_cfg, seeds, out_dirs, resume, *a, **k):
        calls.append((out_dirs[0], (out_dirs[0] / train.CKPT_FILE).is_file()))
        real(acts, rows, sae_cfg, seeds, out_dirs, resume, *a, **{**k, "max_steps": 15})
        raise KeyboardInterrupt  # Ctrl-C right after the step-15 checkpoint

    monkeypatch.setattr(train, "train_saes", killed_after_15_steps)
    with pytest.raises(KeyboardInterrupt):
        run_all(cfg, progress=False)
    first = calls[0][0]
    assert (first / train.CKPT_FILE).is_file() and not (cfg.run_dir / "stages" / "train.json").exists()

    def watched(acts, rows, sae_cfg, seeds, out_dirs, resume, *a, **k):
        calls.append((out_dirs[0], (out_dirs[0] / train.CKPT_FILE).is_file()))
        return real(acts, rows, sae_cfg, seeds, out_dirs, resume, *a, **k)

    monkeypatch.setattr(train, "train_saes", watched)
    capsys.readouterr()
    status = run_all(cfg, progress=False)
    assert status["extract"] == "skipped" and status["train"] == "ran"
    assert calls[1] == (first, True)  # the interrupted SAE started from its checkpoint ...
    log = [line for line in (first / train.LOG_FILE).read_text().splitlines() if line]
    assert len(log) == len({json.loads(r)["step"] for r in log}) and json.loads(log[-1])["step"] == 29  # ... and finished once
    assert not (first / train.CKPT_FILE).exists()


def test_transfer_stage_writes_injection_stitching_and_patching(finished_run):
    cfg, _ = finished_run
    rows = list(csv.DictReader((cfg.report_dir / "transfer.csv").open()))
    assert {r["direction"] for r in rows} == {"a_self", "b_matched", "b_mapped", "b_unmatched"}
    # 2 features x 1 alpha x (a_self + 3 B directions x 3 null kinds) per layer pair
    assert len(rows) == len(cfg.layer_pairs) * 2 * (1 + 3 * 3)
    b = [r for r in rows if r["direction"] != "a_self"]
    assert {r["control"] for r in b} == {"specificity", "on_manifold", "isotropic"}
    assert all(r["family"] == f"inject {r['direction']} vs {r['control']} alpha=4" for r in b)
    paired = list(csv.DictReader((cfg.report_dir / "transfer_paired.csv").open()))
    assert {(r["x"], r["y"]) for r in paired} == {("b_mapped", "b_matched"), ("b_mapped", "b_unmatched"),
                                                   ("b_matched", "b_unmatched")}
    assert all(0 <= float(r["p_value"]) <= 1 and r["test"].startswith("wilcoxon") for r in paired)
    assert all(-1 <= float(r["agreement"]) <= 1 and 1 / 9 - 1e-6 <= float(r["p_value"]) <= 1 for r in b), [
        (r["direction"], r["agreement"], r["p_value"]) for r in b]
    assert all(float(r["q_value"]) >= float(r["p_value"]) for r in b)
    stitch = list(csv.DictReader((cfg.report_dir / "stitching.csv").open()))
    maps = {r["map"] for r in stitch if r["control"] == "none"}
    assert {"procrustes", "ridge", "procrustes_z", "ridge_z"} <= maps
    assert {r["map"] for r in stitch if r["control"] == "shuffled"} == maps  # every map has its shuffled control
    for r in stitch:
        if r["map"] != "none":
            assert float(r["ci_low"]) <= float(r["frac_recovered"]) + 1e-9 <= float(r["ci_high"]) + 2e-9
        if r["control"] == "clean":
            assert float(r["frac_recovered"]) == 1.0
        if r["control"] == "mean":
            assert float(r["frac_recovered"]) == 0.0
    sae_t = list(csv.DictReader((cfg.report_dir / "sae_transfer.csv").open()))
    assert {r["sae"] for r in sae_t} == {"b_own", "b_own_random_error", "a_transferred", "a_random_map"}
    assert all(float(r["fvu"]) >= 0 for r in sae_t)
    patch = list(csv.DictReader((cfg.report_dir / "feature_patching.csv").open()))
    assert len(patch) == 2 * len(cfg.layer_pairs) and all(float(r["kl_patch"]) >= 0 for r in patch)
    ex = json.loads((cfg.report_dir / "transfer_examples.json").read_text())["examples"]
    assert all(len(e["promoted_a"]) == 20 and len(e["promoted_b"]) == 20 for e in ex)


def _transfer_cli(cfg, *args):
    from crossdict.cli import main

    return main(["transfer", "--config", str(cfg.run_dir / "config.yaml"), "--no-progress", *args])


def test_transfer_bad_requests_fail_clearly_and_write_nothing(finished_run, capsys):
    cfg, _ = finished_run
    before = {p.name: p.read_bytes() for p in cfg.report_dir.iterdir() if p.is_file()}
    la = cfg.model_a.layers[0]
    d_sae = 32 * cfg.sae.expansion_factor
    assert _transfer_cli(cfg, "--layer", str(la), "--feature_idx", str(d_sae)) == 1
    assert f"--feature_idx {d_sae} is out of range: A's SAE at layer {la} has {d_sae} features" in capsys.readouterr().err
    matched = {int(r["feat_a"]) for r in csv.DictReader((cfg.report_dir / "feature_matches.csv").open())
               if r["layer_a"] == str(la) and float(r["q_value"]) < cfg.align.q_threshold}
    lonely = next(f for f in range(d_sae) if f not in matched)
    assert _transfer_cli(cfg, "--layer", str(la), "--feature_idx", str(lonely)) == 1
    err = capsys.readouterr().err
    assert f"feature {lonely} of A (layer {la}) has no significant match" in err and "Nearest B features" in err
    assert _transfer_cli(cfg, "--layer", str(la), "--feature_idx", "1", "--alpha", "nan") == 1
    assert "alpha must be a finite number" in capsys.readouterr().err
    assert _transfer_cli(cfg, "--layer", "2") == 1
    assert "layer 2 of model A is not configured" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in cfg.report_dir.iterdir() if p.is_file()}
    assert after == before


def test_transfer_one_feature_writes_its_own_file(finished_run):
    cfg, _ = finished_run
    m = next(r for r in csv.DictReader((cfg.report_dir / "transfer.csv").open()) if r["direction"] == "b_mapped")
    assert _transfer_cli(cfg, "--layer", m["layer_a"], "--feature_idx", m["feat_a"], "--alpha", "4") == 0
    rows = list(csv.DictReader((cfg.report_dir / f"transfer_L{m['layer_a']}_F{m['feat_a']}.csv").open()))
    mapped = next(r for r in rows if r["direction"] == "b_mapped")
    assert float(mapped["agreement"]) == pytest.approx(float(m["agreement"]), abs=1e-4)  # same seed, same numbers


def test_transfer_without_z_maps_stitches_and_splices_the_saved_maps_only(finished_run, tmp_path):
    """Issue 20: with align.standardized_space false the align stage saves no `_z` maps; transfer then stitches and
    splices the maps it finds, and fails clearly (before loading a model) only if a missing one is asked for.
    `transfer.maps` picks maps from a run that has them all."""
    import dataclasses

    from crossdict.interventions import TransferError, run_transfer

    cfg, _ = finished_run
    full = {(r["layer_a"], r["map"], r["control"]): r for r in csv.DictReader((cfg.report_dir / "stitching.csv").open())}
    assert any(k[1].endswith("_z") for k in full)
    shutil.copytree(cfg.run_dir, tmp_path / "runs" / cfg.run_name)
    run = dataclasses.replace(cfg, output_dir=str(tmp_path / "runs"))
    chosen = dataclasses.replace(run, transfer=dataclasses.replace(run.transfer, maps=["procrustes"]))
    out = run_transfer(chosen, progress=False)
    assert {r["map"] for r in out["stitching"]} == {r["map"] for r in out["sae_transfer"]} == {"none", "procrustes"}

    from crossdict.interventions import _load_maps

    la, lb = cfg.layer_pairs[0]
    off = dataclasses.replace(run, align=dataclasses.replace(run.align, standardized_space=False))
    assert set(_load_maps(run, la, lb)) == {"procrustes", "ridge", "procrustes_z", "ridge_z"}
    assert set(_load_maps(off, la, lb)) == {"procrustes", "ridge"}  # _z files on disk, but not this config's: stale

    for f in (run.run_dir / "alignment").glob("*/*_z.*"):  # what align writes with standardized_space: false
        f.unlink()
    out = run_transfer(run, progress=False)
    for name in ("stitching", "sae_transfer"):
        written = list(csv.DictReader((run.report_dir / f"{name}.csv").open()))
        assert {r["map"] for r in written} == {r["map"] for r in out[name]} == {"none", "procrustes", "ridge"}, name
    first = str(cfg.layer_pairs[0][0])  # the first layer pair draws what it drew with the z maps there
    for r in out["stitching"]:
        if str(r["layer_a"]) == first:
            assert r["loss"] == pytest.approx(float(full[(first, r["map"], r["control"])]["loss"]), rel=1e-5)

    before = {p.name: p.read_bytes() for p in run.report_dir.iterdir() if p.is_file()}
    for key, value in (("direction_map", "procrustes_z"), ("maps", ["procrustes", "ridge_z"])):
        bad = dataclasses.replace(run, transfer=dataclasses.replace(run.transfer, **{key: value}))
        with pytest.raises(TransferError, match=r"need the map\(s\) \['\w+_z'\].*standardized_space: true"):
            run_transfer(bad, backends={}, progress=False)  # no backend is needed to find out
    assert {p.name: p.read_bytes() for p in run.report_dir.iterdir() if p.is_file()} == before
    from crossdict.config import ConfigError

    for bad, why in ((["procrustes", "svcca"], "not allowed"), (["ridge", "ridge"], "distinct"), ([], "non-empty")):
        with pytest.raises(ConfigError, match=why):
            config_from_dict({**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "transfer"},
                              "transfer": {"maps": bad}})


def test_pairs_beyond_n_control_features_get_no_controls_but_enter_the_paired_test(finished_run, tmp_path):
    """transfer.n_control_features = 1 of n_features = 2: the first pair per layer pair keeps its controls, with the
    numbers the full run gave it (first layer pair: later ones draw from a stream the full run advanced further);
    the second has one row per direction (control 'none', no p-value) and still counts
    in the paired Wilcoxon, whose n_pairs is the number of pairs, not of controlled ones."""
    import dataclasses

    from crossdict.interventions import run_transfer

    cfg, _ = finished_run
    full = list(csv.DictReader((cfg.report_dir / "transfer.csv").open()))
    shutil.copytree(cfg.run_dir, tmp_path / "runs" / cfg.run_name)
    run = dataclasses.replace(cfg, output_dir=str(tmp_path / "runs"))
    run = dataclasses.replace(run, transfer=dataclasses.replace(run.transfer, n_control_features=1))
    out = run_transfer(run, progress=False)
    rows = out["transfer"]
    for la, lb in cfg.layer_pairs:
        here = [r for r in rows if (r["layer_a"], r["layer_b"]) == (la, lb) and r["direction"] != "a_self"]
        first, second = sorted({r["feat_a"] for r in here}, key=[r["feat_a"] for r in here].index)
        ctrl = [r for r in here if r["feat_a"] == first]
        assert {r["control"] for r in ctrl} == {"specificity", "on_manifold", "isotropic"}
        assert all(1 / 9 - 1e-6 <= r["p_value"] <= 1 for r in ctrl)
        old = {(r["direction"], r["control"]): r for r in full if (int(r["layer_a"]), int(r["feat_a"])) == (la, first)}
        for r in ctrl if (la, lb) == cfg.layer_pairs[0] else []:  # its controls are drawn as in the full run
            assert r["p_value"] == pytest.approx(float(old[(r["direction"], r["control"])]["p_value"]), abs=1e-5)
        bare = [r for r in here if r["feat_a"] == second]
        assert sorted(r["direction"] for r in bare) == ["b_mapped", "b_matched", "b_unmatched"]
        assert all(r["control"] == "none" and "p_value" not in r and r["kl"] >= 0 for r in bare)
        old2 = {r["direction"]: r for r in full if (int(r["layer_a"]), int(r["feat_a"])) == (la, second)}
        for r in bare:  # effect and agreement need no control: the same as with controls
            assert r["agreement"] == pytest.approx(float(old2[r["direction"]]["agreement"]), abs=1e-5)
    paired = [r for r in out["paired"]]
    assert paired and all(r["n_pairs"] == 2 for r in paired)
    written = list(csv.DictReader((run.report_dir / "transfer.csv").open()))
    assert sum(r["control"] == "none" and r["direction"] != "a_self" for r in written) == 3 * len(cfg.layer_pairs)


def test_sae_metrics_rewritten_with_new_train_seconds_leave_every_stage_current(finished_run, tmp_path, capsys):
    """A retrained SAE that comes out byte-identical rewrites sae_metrics.csv with a new `wall_s`; that alone must
    not rerun align and transfer (it did: ~6 min on the issue-15 run). A changed metric still reruns train. Records
    of digest version 2 (raw bytes of sae_metrics.csv) stay current until their stage reruns."""
    import dataclasses

    from crossdict.pipeline import files_digest

    cfg, _ = finished_run
    shutil.copytree(cfg.run_dir, tmp_path / "runs" / cfg.run_name)
    run = dataclasses.replace(cfg, output_dir=str(tmp_path / "runs"))
    run_all(run, progress=False)  # current for this config (earlier tests in this module rerun stages with others)
    path = run.report_dir / "sae_metrics.csv"
    rows = list(csv.DictReader(path.open()))
    cols = list(rows[0])
    assert "wall_s" in cols

    def write(rows: list[dict]) -> None:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            w.writerows(rows)

    write([{**r, "wall_s": str(float(r["wall_s"] or 0) + 4.15)} for r in rows])
    capsys.readouterr()
    assert set(run_all(run, progress=False).values()) == {"skipped"}, capsys.readouterr().out

    from crossdict.pipeline import _train_outputs
    from crossdict.utils import atomic_write_json

    assert files_digest([path], 2) != files_digest([path], 3)  # version 2 hashed the raw bytes
    rec_path = run.run_dir / "stages" / "train.json"
    rec = json.loads(rec_path.read_text())
    v2 = files_digest(_train_outputs(run), 2)
    atomic_write_json(rec_path, {**rec, "digest_version": 2, "outputs": v2})
    for other in (run.run_dir / "stages").glob("*.json"):  # as a version-2 run would have recorded them
        r = json.loads(other.read_text())
        if "train" in r.get("inputs", {}).get("upstream", {}):
            r["inputs"]["upstream"]["train"] = v2
            atomic_write_json(other, r)
    status = run_all(run, progress=False)
    assert set(status.values()) == {"skipped"}, (status, capsys.readouterr().out)

    write([{**r, "fvu": "0.5"} if i == 0 else r for i, r in enumerate(rows)])
    status = run_all(run, progress=False)
    out = capsys.readouterr().out
    assert status["train"] == "ran" and "train: running (outputs were modified" in out, out
