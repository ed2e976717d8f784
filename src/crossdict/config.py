"""Run configuration: plain dataclasses loaded from YAML and validated before any heavy work.

One YAML file describes a whole run (models, layers, corpus, SAE, alignment, transfer). Every
mistake we can see without loading a model fails here, naming the key, the bad value and what
is allowed: an unknown or misspelled key, a wrong type, an out-of-range number. Layer indices
are checked against the model's depth later, in `models.check_layers`, once the model's
config is known (that needs no weights).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config value is missing, misspelled, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    name: str
    """Packaged name (`smollm2-135m`, `gemma3-270m`), hub id, local HF directory or `.gguf` file."""
    layers: list[int]
    """Residual-stream layers to keep: output of block L (`blocks.L.hook_resid_post`)."""
    backend: Literal["hf", "tlens"] = "hf"
    max_ctx: int = 128
    """Tokens per passage, BOS included."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    sae_source: Union[str, dict[int, str]] = "train"
    """Where each layer's SAE comes from: `train`, `saelens:<release>/<sae_id>`, or a SAELens / sparsify /
    dictionary_learning directory (see `crossdict.pretrained`); one string for all layers or {layer: source}."""


@dataclass
class CorpusConfig:
    source: str = "builtin:pydocs"
    """`builtin:pydocs`, `hf:<dataset>/<config>:<split>`, a `.txt`/`.jsonl` file or a directory of them."""
    max_passages: int = 2000
    passage_chars: int = 1200
    """Target passage length before truncation to both tokenizers' max_ctx; cut at whitespace."""
    heldout_fraction: float = 0.2
    text_field: str = "text"
    """Field holding the text in `.jsonl` and HF datasets."""


@dataclass
class ExtractConfig:
    batch_size: int = 16
    shard_passages: int = 128
    """Passages per on-disk shard; extraction resumes shard by shard."""
    store_dtype: Literal["float32", "float16"] = "float32"
    pairing: Literal["end_offset", "word_final"] = "end_offset"
    random_floor: bool = True
    """Also extract model B with random weights (same architecture, tokenizer and anchors): the floor baseline."""
    layer_sweep_tokens: int = 1024
    """Held-out anchor pairs at which every layer of both models is kept, for the all-layers CKA map (0: off)."""
    autocast: Literal["off", "bf16", "fp16"] = "off"
    """Mixed-precision forward passes on CUDA (weights as loaded, states stored as float32); no effect on CPU."""


@dataclass
class SAEConfig:
    architecture: Literal["topk", "batchtopk", "l1"] = "topk"
    expansion_factor: int = 8
    k: int = 32
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 200
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    dead_tokens_threshold: int = 100_000
    lr: float = 4e-4
    lr_warmup_steps: int = 100
    lr_decay_fraction: float = 0.2
    grad_clip_norm: float = 1.0
    """Clip the gradient of the per-token squared error (scaled space: SAELens's loss units) to this norm, as
    SAELens does; 0 = off. Adam (beta2 0.999) otherwise remembers the large early gradients for ~1000 steps and
    a short run learns slowly (issue 14: planted-feature MCC 0.42 without, 0.49 with, SAELens 0.50)."""
    batch_size: int = 4096
    train_tokens: int = 2_000_000
    checkpoint_every: int = 200
    seeds: list[int] = field(default_factory=lambda: [0])
    lm_eval_passages: int = 32
    """Held-out passages on which the LM loss with the SAE spliced in is measured (evaluation only)."""
    lm_eval_seeds: Literal["first", "all"] = "all"
    """Seeds whose SAEs get that LM eval: all, or only the first of `seeds` (the one later stages use); the
    others keep empty LM columns in sae_metrics.csv (FVU, L0 and seed stability are measured for every seed).
    The LM eval is most of the train stage's time on large-vocabulary models (evaluation only)."""
    max_norm_ratio: float = 10.0
    """Tokens with residual norm above this multiple of the median (massive activations, attention sinks)
    are left out of SAE training and evaluation; 0 keeps every token."""
    decoder_init: Literal["random", "data"] = "random"
    """Decoder rows start as random unit vectors, or as sampled (centred, scaled) training activations."""
    per_layer: dict[str, dict[str, Union[int, float, str]]] = field(default_factory=dict)
    """Overrides for one model's layer, keyed `a.<layer>` / `b.<layer>`, e.g. `{"b.13": {"l1_coefficient": 1.0}}`;
    any key above except seeds, lm_eval_passages, lm_eval_seeds and max_norm_ratio (the row mask all stages share)."""

    def for_layer(self, key: str, layer: int) -> "SAEConfig":
        """The config that trains model `key`'s SAEs at `layer`: this one with its `per_layer` overrides applied."""
        over = self.per_layer.get(f"{key}.{layer}")
        if not over:
            return dataclasses.replace(self, per_layer={})
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_layer"}
        return _build(SAEConfig, {**base, **over}, f"sae.per_layer[{key}.{layer}]")


@dataclass
class AlignConfig:
    methods: list[str] = field(default_factory=lambda: ["procrustes", "svcca", "ridge"])
    ridge_alpha: float = 1.0
    svcca_variance: float = 0.99
    n_bootstrap: int = 200
    """Passage resamples per CI (half-samples or bootstrap draws, see ci_method)."""
    ci_method: Literal["half_sample", "bootstrap"] = "half_sample"
    """CI from half-samples of passages (default) or the cluster bootstrap; see `stats.with_ci`."""
    n_null: int = 200
    retrieval_candidates: int = 1000
    top_k_overlap: int = 8
    q_threshold: float = 0.05
    procrustes_scale: bool = True
    """Fit an isotropic scale with the Procrustes rotation."""
    standardized_space: bool = True
    """Also report metrics and maps with every dimension z-scored (space `resid_z`, methods `:z`)."""
    metric_max_tokens: int = 2000
    """Held-out anchors (whole passages) on which each metric and its resamples / null are computed."""
    pairwise_max_tokens: int = 1000
    """Subsample for the O(n²) metrics (RBF CKA, mutual kNN)."""
    rsa_max_tokens: int = 500
    """Subsample for RSA (each resample ranks n²/2 distances)."""
    match_max_tokens: int = 100_000
    """Train anchors used to choose feature matches."""
    n_match_bootstrap: int = 20
    """Passage-bootstrap resamples for match stability (each recomputes an m_a × m_b correlation)."""
    n_match_null: int = 1000
    """Shuffled-pairing draws per matched pair; the smallest possible p-value is 1/(n_match_null+1)."""
    match_pvalue: Literal["empirical", "pooled", "normal"] = "empirical"
    """Per-match p-value from the shuffled-pairing null; see `matching.p_values`."""
    mknn_k: int = 10
    min_feature_passages: int = 5
    """A feature is tested for a match only when it fires in at least this many held-out passages."""
    min_feature_tokens: int = 20
    """... and on at least this many held-out tokens; dead and rarer features are counted, not matched."""
    match_min_corr: float = 0.1
    """Effect-size threshold next to q: a significant match also needs held-out act_corr >= this."""
    match_token_null: bool = True
    """Also test each match against the null that re-pairs anchors within B's token id (see `matching`)."""
    input_floors: list[str] = field(default_factory=lambda: ["token", "context"])
    """Floors that share the input (see `baselines`): B replaced by its token id / token + previous token."""
    floor_nulls: bool = True
    """Also draw the shuffled-pairing null of each floor's own residual numbers (alignment.csv `:<floor>_b`
    rows, metrics.csv `resid_<floor>_b`: null_mean, p_value). The floors are the reference of the real
    number (paired test, universality), which needs only their passage resamples; false halves their cost.
    Feature-match nulls of the code floors are always drawn (significant-match counts need them)."""
    retrieval_queries: int = 5000
    layer_cka_max_tokens: int = 20_000
    min_passages: int = 10
    """Fewest held-out passages accepted for passage-resampling CIs and shuffled-pairing nulls."""
    min_anchors: int = 32
    """Fewest train and held-out anchor pairs accepted for fitting and scoring a map."""
    workers: int = 1
    """Processes the align stage runs its tasks in (each layer pair's residual part and SAE part, the
    layer-CKA sweep), each with cores // workers BLAS threads. Every task draws from its own random
    stream, so the numbers do not depend on it (only the time does); 1 runs them in this process."""


@dataclass
class TransferConfig:
    enabled: bool = True
    """Run the transfer stage in `crossdict run` (injection, stitching, feature patching)."""
    n_features: int = 16
    """Top matched pairs (by activation correlation, q < align.q_threshold, both features firing in >=
    `min_support_passages` held-out passages) injected per layer pair."""
    min_support_passages: int = 5
    """Support rule: a matched pair is tested only if both features fire in this many held-out passages."""
    alphas: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    """Injection strengths in units of the feature's typical activation (0 is skipped: the identity)."""
    n_random_controls: int = 199
    """Controls per null kind (specificity, on-manifold, isotropic), feature and alpha, all of the candidate's norm;
    the smallest permutation p is 1/(n + 1) (0.005 at 199)."""
    n_control_features: Optional[int] = None
    """Controls are drawn for the first this many of the `n_features` pairs per layer pair (None: all). The others
    still get each direction's agreement, KL and |Δ log p| and enter the paired tests (transfer_paired.csv), which
    need no controls: their power comes from the number of pairs (Wilcoxon over n pairs: smallest two-sided p
    2/2^n), the controls' from n_random_controls. A budget knob for the demo."""
    min_freq: float = 0.001
    """Only pairs whose features both fire on at least this fraction of train tokens are injected: a
    correlation resting on a handful of tokens ranks high but says little about the direction."""
    n_passages: int = 32
    """Held-out passages the interventions run on (those where the tested A features fire most are chosen)."""
    passage_chars: int = 400
    """Each passage is cut to this many characters (at whitespace); both models read the same text."""
    batch_size: int = 8
    top_strings: int = 20
    """Promoted strings compared across models (top-k overlap) and shown in the report."""
    direction_map: Literal["procrustes", "procrustes_z", "ridge", "ridge_z"] = "procrustes"
    """Fitted map whose linear part carries A's decoder direction into B (`b_mapped`)."""
    maps: Optional[list[Literal["procrustes", "ridge", "procrustes_z", "ridge_z"]]] = None
    """Fitted maps stitched into B (stitching.csv) and carrying A's SAE into B (sae_transfer.csv); None: every one
    the align stage saved. The `_z` maps (fitted on z-scored dimensions, basis-dependent; fitted and used only with
    align.standardized_space) cost 4 full-vocabulary forwards in B per layer pair: [procrustes, ridge] skips them.
    A listed map the align stage did not save is an error, as is a `direction_map` it did not save."""
    n_patch_features: int = 16
    """Matched pairs tested by feature-level patching per layer pair."""
    n_patch_controls: int = 199
    """Random live B features patched the same way, per pair (smallest p 1/(n + 1): 0.005 at 199)."""
    max_shared_strings: Optional[int] = None
    """Agreement is computed over at most this many shared vocabulary strings (a seeded uniform sample; None: all,
    ~46k for the embedded pair). The restricted unembedding over them is most of a control's forward in B once the
    blocks before the edit are skipped: 8192 makes a control 1.5-2x cheaper again."""


@dataclass
class CrosscoderConfig:
    """Optional stage (issue 9): one crosscoder per configured layer pair over anchor-paired activations."""

    enabled: bool = False
    """Off by default: `crossdict run` trains crosscoders only when true (`crossdict crosscode` always does)."""
    architecture: Literal["topk", "l1"] = "topk"
    expansion_factor: int = 8
    """Latents = expansion_factor x the larger d_model (one SAE's width, shared by both models)."""
    k: Optional[int] = None
    """Active latents per token (TopK); None uses sae.k, so crosscoder and SAEs compare at equal L0."""
    l1_coefficient: float = 5.0
    l1_warmup_steps: int = 200
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    dead_tokens_threshold: int = 100_000
    lr: float = 4e-4
    lr_warmup_steps: int = 100
    lr_decay_fraction: float = 0.2
    batch_size: int = 4096
    train_tokens: int = 2_000_000
    """Anchor pairs seen in training (each pair feeds every model once)."""
    checkpoint_every: int = 200
    seed: int = 0
    exclusive_r: float = 0.1
    """Relative decoder norm r = |d_A| / (|d_A| + |d_B|) <= this: B-only; >= 1 - this: A-only; else shared."""
    agreement_min_cos: float = 0.5
    """A shared latent agrees with a matched SAE pair when its nearest SAE features (decoder cosine >= this) form one."""


@dataclass
class RunConfig:
    model_a: ModelConfig
    model_b: ModelConfig
    run_name: str = "default"
    seed: int = 0
    output_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    crosscoder: CrosscoderConfig = field(default_factory=CrosscoderConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        """Configured (layer of A, layer of B) pairs, by position in the two `layers` lists."""
        return list(zip(self.model_a.layers, self.model_b.layers))

    def model(self, key: str) -> ModelConfig:
        if key not in ("a", "b"):
            raise KeyError(f"model key must be 'a' or 'b', got {key!r}")
        return self.model_a if key == "a" else self.model_b

    def model_slug(self, key: str) -> str:
        """Filesystem-safe model name: `EleutherAI/pythia-70m` -> `EleutherAI__pythia-70m`."""
        name = self.model(key).name
        return Path(name).stem.replace("/", "__") if name.endswith(".gguf") else name.replace("/", "__").strip("._")

    def sae_dir(self, key: str, layer: int, seed: int | None = None) -> Path:
        """`runs/<name>/saes/<model>/blocks.L.hook_resid_post/`; seeds after the first get `.seed<s>`."""
        seed = self.sae.seeds[0] if seed is None else seed
        suffix = "" if seed == self.sae.seeds[0] else f".seed{seed}"
        return self.run_dir / "saes" / self.model_slug(key) / f"blocks.{layer}.hook_resid_post{suffix}"

    @property
    def cache_dir(self) -> Path:
        return self.run_dir / "cache"

    @property
    def report_dir(self) -> Path:
        return self.run_dir / "report"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some top-level sections; a stage's outputs are valid while it is unchanged."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Value checks that types alone cannot express: (predicate, what is allowed).
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "max_ctx": (lambda v: v >= 4, "an integer >= 4"),
    "max_passages": (lambda v: v >= 1, "an integer >= 1"),
    "passage_chars": (lambda v: v >= 16, "an integer >= 16"),
    "max_shared_strings": (lambda v: v >= 100, "an integer >= 100 (or null: all shared strings)"),
    "heldout_fraction": (lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "shard_passages": (lambda v: v >= 1, "an integer >= 1"),
    "layer_sweep_tokens": (lambda v: v >= 0, "an integer >= 0 (0 turns the sweep off)"),
    "expansion_factor": (lambda v: v >= 1, "an integer >= 1"),
    "k": (lambda v: v >= 1, "an integer >= 1"),
    "l1_coefficient": (lambda v: v >= 0, "a number >= 0"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "train_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "lm_eval_passages": (lambda v: v >= 1, "an integer >= 1"),
    "max_norm_ratio": (lambda v: v == 0 or v > 1, "0 (off) or a number > 1"),
    "ridge_alpha": (lambda v: v >= 0, "a number >= 0"),
    "svcca_variance": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "n_bootstrap": (lambda v: v >= 0, "an integer >= 0"),
    "n_null": (lambda v: v >= 0, "an integer >= 0"),
    "n_match_bootstrap": (lambda v: v >= 0, "an integer >= 0"),
    "n_match_null": (lambda v: v >= 0, "an integer >= 0"),
    "metric_max_tokens": (lambda v: v >= 16, "an integer >= 16"),
    "pairwise_max_tokens": (lambda v: v >= 16, "an integer >= 16"),
    "rsa_max_tokens": (lambda v: v >= 16, "an integer >= 16"),
    "min_passages": (lambda v: v >= 2, "an integer >= 2"),
    "min_anchors": (lambda v: v >= 4, "an integer >= 4"),
    "workers": (lambda v: v >= 1, "an integer >= 1"),
    "min_feature_passages": (lambda v: v >= 1, "an integer >= 1"),
    "min_feature_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "match_min_corr": (lambda v: -1.0 <= v < 1.0, "a correlation in [-1, 1)"),
    "input_floors": (lambda v: set(v) <= {"token", "context"}, "a list of 'token' and/or 'context'"),
    "retrieval_candidates": (lambda v: v >= 2, "an integer >= 2"),
    "q_threshold": (lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1"),
    "n_random_controls": (lambda v: v >= 1, "an integer >= 1"),
    "min_support_passages": (lambda v: v >= 1, "an integer >= 1"),
    "alphas": (lambda v: len(v) >= 1 and all(math.isfinite(a) for a in v), "a non-empty list of finite numbers"),
    "n_features": (lambda v: v >= 1, "an integer >= 1"),
    "n_control_features": (lambda v: v is None or v >= 0, "null or an integer >= 0"),
    "n_passages": (lambda v: v >= 1, "an integer >= 1"),
    "min_freq": (lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)"),
    "top_strings": (lambda v: v >= 1, "an integer >= 1"),
    "n_patch_features": (lambda v: v >= 0, "an integer >= 0"),
    "n_patch_controls": (lambda v: v >= 1, "an integer >= 1"),
    "maps": (lambda v: len(v) >= 1 and len(set(v)) == len(v), "a non-empty list of distinct map names (or null: all saved)"),
    "exclusive_r": (lambda v: 0.0 < v < 0.5, "a number strictly between 0 and 0.5"),
    "agreement_min_cos": (lambda v: -1.0 <= v <= 1.0, "a number in [-1, 1]"),
    "layers": (lambda v: len(v) >= 1 and all(x >= 0 for x in v), "a non-empty list of layer indices >= 0"),
}


def _check_value(path: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; expected one of {list(allowed)}")
        return value
    if origin in (list,):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_value(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(hint)
        return {_check_value(f"{path} key", k, kt): _check_value(f"{path}[{k!r}]", v, vt) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for a in args[:-1]:  # the first type that accepts the value; the last one's error otherwise
            try:
                return _check_value(path, value, a)
            except ConfigError:
                pass
        return _check_value(path, value, args[-1])
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type, data: Any, path: str = "") -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}; allowed keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required config key {prefix}{name!r}")
            continue
        value = _check_value(prefix + name, data[name], hints[name])
        check = _RANGES.get(name)
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"{prefix}{name}: {value!r} is out of range; expected {check[1]}")
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, data)
    if len(cfg.model_a.layers) != len(cfg.model_b.layers):
        raise ConfigError(
            f"model_a.layers {cfg.model_a.layers} and model_b.layers {cfg.model_b.layers} must have the same "
            "length: layers are paired by position"
        )
    _check_per_layer(cfg)
    for key in ("a", "b"):
        m = cfg.model(key)
        if isinstance(m.sae_source, dict) and set(m.sae_source) - set(m.layers):
            raise ConfigError(f"model_{key}.sae_source names layers {sorted(set(m.sae_source) - set(m.layers))} "
                              f"that are not in model_{key}.layers {m.layers}")
        sources = m.sae_source.values() if isinstance(m.sae_source, dict) else [m.sae_source]
        if any(not s.strip() for s in sources):
            raise ConfigError(f"model_{key}.sae_source: empty source; use 'train' or a path / saelens:<release>/<sae_id>")
    return cfg


PER_LAYER_FIXED = ("seeds", "lm_eval_passages", "lm_eval_seeds", "max_norm_ratio", "per_layer")
"""SAE keys `sae.per_layer` cannot override: they are shared by every layer (seed pairs, LM eval, the row mask)."""


def _check_per_layer(cfg: RunConfig) -> None:
    """`sae.per_layer` names configured layers (`a.<layer>`, `b.<layer>`) and valid, overridable SAE keys."""
    for name, over in cfg.sae.per_layer.items():
        key, _, layer = name.partition(".")
        if key not in ("a", "b") or not layer.isdigit() or int(layer) not in cfg.model(key).layers:
            raise ConfigError(f"sae.per_layer: {name!r} is not a configured layer; use 'a.<layer>' or 'b.<layer>' with "
                              f"a layer of model_a.layers {cfg.model_a.layers} / model_b.layers {cfg.model_b.layers}")
        fixed = sorted(set(over) & set(PER_LAYER_FIXED))
        if fixed:
            raise ConfigError(f"sae.per_layer[{name}]: {fixed} cannot differ between layers; set them in sae:")
        cfg.sae.for_layer(key, int(layer))  # unknown keys, wrong types and ranges fail here, naming the key


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config; `overrides` maps dotted keys (`sae.k`) to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, offset {e.start}): "
                          "a config must be a UTF-8 YAML file; re-save it as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of config sections (model_a:, corpus:, ...), "
                          f"got a {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
