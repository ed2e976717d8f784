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
                  "retrieval_candidates": 50, "retrieval_queries": 200, **align},
    })


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_run_config(tiny_models, tmp)
    status = run_all(cfg, progress=False)
    return cfg, status


def test_first_run_runs_every_stage_and_writes_the_report(finished_run):
    cfg, status = finished_run
    assert set(status.values()) == {"ran"} and list(status) == ["extract", "train", "align", "report"]
    html = (cfg.report_dir / "index.html").read_text()
    assert "<script src=" not in html and "http://" not in html.replace("http://www.w3.org", "")  # self-contained
    for section in ('id="summary"', 'id="layers"', 'class="heatmap"', 'id="saes"', 'id="browser"', "data:image/png;base64,"):
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
    assert "loaded" not in out and out.count("up to date, skipped") == 4


def test_config_change_reruns_exactly_the_stages_it_reaches(finished_run, tiny_models, capsys):
    cfg, _ = finished_run
    changed = tiny_run_config(tiny_models, cfg.run_dir.parent.parent, n_null=5)
    capsys.readouterr()
    status = run_all(changed, progress=False)
    out = capsys.readouterr().out
    assert status == {"extract": "skipped", "train": "skipped", "align": "ran", "report": "ran"}
    assert "config changed (align.n_null: 4 -> 5)" in out
    # A deleted output reruns the stage that owns it (and what reads it), nothing upstream.
    (cfg.report_dir / "layer_cka.csv").unlink()
    status = run_all(changed, progress=False)
    assert status["extract"] == status["train"] == "skipped" and status["align"] == "ran"
    assert "outputs missing" in capsys.readouterr().out


def _chromium() -> str | None:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium for the browser test (see .ci/run)")
    return path


def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    """Open the report from disk, check numbers render, click a pair, see both models' contexts, screenshot."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
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
        summary = page.locator("#summary table tbody tr").first.inner_text()
        assert "A1 ↔ B1" in summary and any(ch.isdigit() for ch in summary.split("A1 ↔ B1")[1])
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
    assert status == {"extract": "skipped", "train": "skipped", "align": "skipped", "report": "ran"}


def test_interrupted_training_resumes_from_its_checkpoint(tiny_models, tmp_path, monkeypatch, capsys):
    from crossdict import train

    cfg = tiny_run_config(tiny_models, tmp_path)
    real = train.train_sae
    calls = []

    def killed_after_15_steps(acts, rows, sae_cfg, seed, out_dir, resume, *a, **k):
        calls.append((out_dir, (out_dir / train.CKPT_FILE).is_file()))
        real(acts, rows, sae_cfg, seed, out_dir, resume, *a, **{**k, "max_steps": 15})
        raise KeyboardInterrupt  # Ctrl-C right after the step-15 checkpoint

    monkeypatch.setattr(train, "train_sae", killed_after_15_steps)
    with pytest.raises(KeyboardInterrupt):
        run_all(cfg, progress=False)
    first = calls[0][0]
    assert (first / train.CKPT_FILE).is_file() and not (cfg.run_dir / "stages" / "train.json").exists()

    def watched(acts, rows, sae_cfg, seed, out_dir, resume, *a, **k):
        calls.append((out_dir, (out_dir / train.CKPT_FILE).is_file()))
        return real(acts, rows, sae_cfg, seed, out_dir, resume, *a, **k)

    monkeypatch.setattr(train, "train_sae", watched)
    capsys.readouterr()
    status = run_all(cfg, progress=False)
    assert status["extract"] == "skipped" and status["train"] == "ran"
    assert calls[1] == (first, True)  # the interrupted SAE started from its checkpoint ...
    log = [line for line in (first / train.LOG_FILE).read_text().splitlines() if line]
    assert len(log) == len({json.loads(r)["step"] for r in log}) and json.loads(log[-1])["step"] == 29  # ... and finished once
    assert not (first / train.CKPT_FILE).exists()
