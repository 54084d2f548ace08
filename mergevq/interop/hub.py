"""Hugging Face Hub folders for the project's tokenizers and generators.

A folder (local or a Hub repo) holds three files::

    config.json        the plain config our builders take, nothing else:
                         tokenizer  {"tokenizer": {...}, "variant": {...} | null, "quantizer": {...},
                                     "recovery": {...} | null}  -> models.factory.build_tokenizer(**config)
                         generator  the ModelArgs fields plus "mergear": {window, keep_options,
                                     duplicate_rule} | null     -> GPT(ModelArgs(**fields)), MergeARConfig
    model.safetensors  the model's state dict
    README.md          model card: usage, the config, the evaluation card (if any), provenance

    pretrained = from_pretrained("user/mergevq-gr-256")    # or a local folder
    tokenizer = pretrained.model                           # nn.Module in eval mode
    save_pretrained(tokenizer, "out/", config={"tokenizer": ..., "variant": ..., "quantizer": ..., "recovery": ...})
    export_run("outputs/train_tokenizer/<run>", "hub/mergevq-gr")   # a training run -> a hub folder

Nothing is instantiated from ``_target_`` strings: the loader calls the builders. A repo id goes through
``huggingface_hub`` (``HF_HUB_OFFLINE=1`` reads the local cache only). ``HubTokenizer`` and
``HubGenerator`` are ``ModelHubMixin`` classes, so ``push_to_hub`` works on a loaded or wrapped model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin, hf_hub_download
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from safetensors.torch import load_file, save_model
from torch import nn

from ..models.factory import build_tokenizer, layout
from ..models.gpt import GPT, ModelArgs
from ..models.mergear import MergeARConfig
from ..runs.checkpoint import compare_states
from .magvit2_import import CheckpointLayoutError

CARD_NAME = "README.md"
EVAL_CARD = "eval_card.md"
TOKENIZER_KEYS = ("tokenizer", "variant", "quantizer", "recovery")
PAPER_URL = "https://arxiv.org/abs/2504.00999"


class _HubModel(
    ModelHubMixin,
    library_name="mergevq",
    license="apache-2.0",
    paper_url=PAPER_URL,
    tags=["mergevq", "image-tokenization"],
):
    """A built model (``self.model``) and the plain config that rebuilds it (``self.config``)."""

    kind = "model"
    model: nn.Module
    config: dict[str, Any]
    card: str | None = None  # README body; None -> ``model_card()`` writes a short one

    def _adopt(self, model: nn.Module, card: str | None) -> None:
        """Replace the freshly built model by ``model`` after checking that it has the same weights."""
        problems = compare_states(self.model.state_dict(), model.state_dict())
        if any(problems):
            raise CheckpointLayoutError(f"the {self.kind} config", *problems)
        self.model, self.card = model, card

    def model_card(self) -> str:
        return self.card if self.card is not None else render_card(self.kind, self.config)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_model(self.model, str(save_directory / SAFETENSORS_SINGLE_FILE),
                   metadata={"format": "pt", "mergevq_kind": self.kind})
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        (save_directory / CARD_NAME).write_text(self.model_card())

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", **init_kwargs):
        handle = cls(**init_kwargs)
        weights = _resolve(model_id, SAFETENSORS_SINGLE_FILE, revision=revision, cache_dir=cache_dir,
                           force_download=force_download, local_files_only=local_files_only, token=token)
        state = load_file(weights, device=str(map_location))
        problems = compare_states(handle.model.state_dict(), state)
        if any(problems):
            raise CheckpointLayoutError(weights, *problems)
        handle.model.load_state_dict(state, strict=True)
        handle.model.to(map_location).eval()
        card = Path(weights).with_name(CARD_NAME)
        handle.card = card.read_text() if card.is_file() else None
        return handle


class HubTokenizer(_HubModel, tags=["image-tokenizer"]):
    """Tokenizer handle: config = {tokenizer, variant, quantizer, recovery} for ``build_tokenizer``."""

    kind = "tokenizer"

    def __init__(self, tokenizer, variant=None, quantizer=None, recovery=None):
        group = {**tokenizer, "encoder_init": None} if "encoder_init" in tokenizer else dict(tokenizer)
        self.config = {"tokenizer": group, "variant": variant, "quantizer": quantizer, "recovery": recovery}
        self._hub_mixin_config = self.config
        self.model = build_tokenizer(group, variant, quantizer, recovery).eval()


class HubGenerator(_HubModel, tags=["image-generation", "autoregressive"]):
    """Generator handle: config = ModelArgs fields + ``mergear`` (MergeARConfig fields or None)."""

    kind = "generator"

    def __init__(self, mergear=None, **args):
        self.mergear = MergeARConfig(**mergear) if mergear is not None else None
        model_args = ModelArgs(**args)
        if self.mergear is not None and (model_args.prefix_tokens, model_args.num_keep_options) != (
            2, len(self.mergear.keep_options)
        ):
            raise ValueError("a MergeAR generator needs prefix_tokens=2 and num_keep_options = len(keep_options)")
        fields = None if self.mergear is None else dataclasses.asdict(self.mergear)
        self.config = _jsonable({**dataclasses.asdict(model_args), "mergear": fields})
        self._hub_mixin_config = self.config
        self.model = GPT(model_args).eval()


# ------------------------------------------------------------------------------------------ public API


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    config: dict[str, Any] | None = None,
    mergear: MergeARConfig | None = None,
    card: str | None = None,
    **push_kwargs,
) -> Path:
    """Write ``model`` as a hub folder -> the folder.

    Tokenizers need ``config`` ({tokenizer, variant, quantizer, recovery}, as in the run config); a
    ``GPT`` takes its config from ``model.args`` (+ ``mergear`` for MergeAR). The config is checked by
    building the model on the meta device and comparing parameter names and shapes. card: the README
    text (default: a short card from the config). ``push_kwargs`` (``push_to_hub=True, repo_id=...``)
    go to ``ModelHubMixin.save_pretrained``.
    """
    handle = wrap(model, config, mergear, card)
    handle.save_pretrained(Path(directory), **push_kwargs)
    return Path(directory)


def wrap(model: nn.Module, config: dict[str, Any] | None = None, mergear: MergeARConfig | None = None,
         card: str | None = None) -> _HubModel:
    """A ``HubTokenizer`` / ``HubGenerator`` around an existing model (see ``save_pretrained``)."""
    with torch.device("meta"):
        if isinstance(model, GPT):
            mergear_fields = dataclasses.asdict(mergear) if mergear is not None else None
            handle = HubGenerator(mergear=mergear_fields, **dataclasses.asdict(model.args))
        else:
            if config is None or "tokenizer" not in config:
                raise ValueError("a tokenizer needs config={'tokenizer': ..., 'variant': ..., 'quantizer': ..., "
                                 "'recovery': ...} (the groups of its run config)")
            handle = HubTokenizer(**{k: config.get(k) for k in TOKENIZER_KEYS})
    handle._adopt(model, card)
    return handle


def from_pretrained(
    dir_or_repo: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    map_location: str = "cpu",
) -> _HubModel:
    """A hub folder or repo id -> ``HubTokenizer`` or ``HubGenerator`` (``.model`` in eval mode,
    ``.config``, ``.card``; generators also ``.mergear``). The kind is read from config.json."""
    options = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    config = json.loads(Path(_resolve(str(dir_or_repo), CONFIG_NAME, **options)).read_text())
    if "tokenizer" in config:
        cls = HubTokenizer
    elif "dim" in config and "n_layer" in config:
        cls = HubGenerator
    else:
        raise ValueError(f"{dir_or_repo}: config.json is neither a mergevq tokenizer nor a generator config")
    check_config_json(config, cls.kind, str(dir_or_repo))
    return cls.from_pretrained(str(dir_or_repo), map_location=map_location, **options)


def check_config_json(config: dict[str, Any], kind: str, where: str) -> None:
    """Refuse a config.json with keys our builders do not take, or any ``_target_`` (nothing is
    instantiated from a hub folder), naming them."""
    from ..errors import ConfigError
    from ..runs.restore import _targets

    targets = [key for key, _ in _targets(config)]
    if targets:
        raise ConfigError(f"{where}/config.json names _target_ entries ({', '.join(targets)}): mergevq builds models "
                          "from plain values only; remove them")
    if kind == "tokenizer":
        known = set(TOKENIZER_KEYS)
    else:
        known = {f.name for f in dataclasses.fields(ModelArgs)} | {"mergear"}
        mergear = config.get("mergear") or {}
        unknown = sorted(set(mergear) - {f.name for f in dataclasses.fields(MergeARConfig)})
        if unknown:
            raise ConfigError(f"{where}/config.json: unknown mergear keys {unknown}: remove them")
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"{where}/config.json: unknown keys {unknown} for a {kind} (known: {', '.join(sorted(known))}): "
                          "remove them")


def _resolve(model_id: str, filename: str, **options) -> str:
    """Path of ``filename`` in a local folder, or in the (cached) Hub repo ``model_id``."""
    if os.path.isdir(model_id):
        path = Path(model_id) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{model_id} has no {filename} (not a mergevq hub folder?)")
        return str(path)
    if Path(model_id).expanduser().exists() or model_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{model_id} is not a directory")
    options = {k: v for k, v in options.items() if v is not None}
    return hf_hub_download(repo_id=model_id, filename=filename, **options)


def _jsonable(value: Any) -> Any:
    """Tuples -> lists (what config.json stores, so a loaded config equals a saved one)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ model card


def describe(kind: str, config: dict[str, Any]) -> str:
    """One line saying what the model is."""
    if kind == "tokenizer":
        group, variant = config["tokenizer"], config.get("variant") or {}
        if group.get("kind") == "magvit2":
            return (f"Open-MAGVIT2 LFQ tokenizer ({group.get('resolution')} px, 2^{group['z_channels']} codes, "
                    "no token merging).")
        spec = layout(group, variant)
        return (f"MergeVQ tokenizer, size {group.get('name', '?')}, variant {variant.get('name', '?')}: "
                f"{group.get('resolution')} px, {spec['num_positions']} positions merged to a nominal "
                f"K = {spec['keep']} tokens (any reachable K at inference), 2^{group['z_channels']} LFQ codes, "
                f"Source Recovery {'on' if (config.get('recovery') or {}).get('enabled') else 'off'}.")
    mergear = config.get("mergear")
    what = f"MergeAR generator (keep options {mergear['keep_options']})" if mergear else "raster AR generator"
    return (f"Class-conditional {what}: {config['n_layer']} layers, width {config['dim']}, "
            f"{config['grid'][0]}x{config['grid'][1]} tokens, {config['num_classes']} classes.")


def render_card(kind: str, config: dict[str, Any], evaluation: str | None = None,
                provenance: dict[str, Any] | None = None) -> str:
    """README.md: YAML front matter, description, evaluation card, usage, config, provenance."""
    tags = ["mergevq", "image-tokenizer" if kind == "tokenizer" else "image-generation"]
    usage = ("tokens = model.encode(x, keep=K)   # x [B,3,H,W] in [-1,1]\nxrec = model.decode(tokens)"
             if kind == "tokenizer" else
             "logits = model(codes, labels)       # codes [B,L] int64, labels [B]")
    lines = [
        "---", "library_name: mergevq", "license: apache-2.0", "tags:", *[f"- {t}" for t in tags], "---", "",
        f"# MergeVQ {kind}", "", describe(kind, config), "", "## Evaluation", "",
    ]
    if evaluation:
        lines += [_demote(evaluation).strip(), ""]
    else:
        lines += ["No evaluation card was found for this checkpoint (run `python -m mergevq.entries.evaluate` and export "
                  "again).", ""]
    lines += [
        "## Usage", "", "```python", "from mergevq.interop.hub import from_pretrained", "",
        'model = from_pretrained("<this repo or folder>").model', usage, "```", "",
        "## Config (`config.json`)", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", "",
    ]
    if provenance:
        lines += ["## Export", "", *[f"- **{k}**: `{v}`" for k, v in provenance.items()], ""]
    lines += [f"Paper: [MergeVQ (CVPR 2025)]({PAPER_URL}).", ""]
    return "\n".join(lines)


def _demote(markdown: str) -> str:
    """Shift headings one level down so an embedded card nests under '## Evaluation'."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown.splitlines())


# ------------------------------------------------------------------------------------------ export


def find_eval_card(run_dir: str | Path) -> Path | None:
    """``eval_card.md`` in the run dir, else in its ``eval/`` subdir (newest anywhere below it), else None."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / EVAL_CARD, run_dir / "eval" / EVAL_CARD):
        if candidate.is_file():
            return candidate
    found = sorted((run_dir / "eval").rglob(EVAL_CARD), key=lambda p: p.stat().st_mtime) if (run_dir / "eval").is_dir() else []
    return found[-1] if found else None


def export_run(
    run_or_checkpoint_dir: str | Path,
    out_dir: str | Path,
    weights: str = "ema",
    eval_card: str | Path | None = None,
) -> Path:
    """One of our training checkpoints (a run dir or checkpoints/step_*) -> a hub folder in ``out_dir``.

    Tokenizer runs load with ``load_trained_tokenizer``, generator runs (a ``gpt.safetensors``) with
    ``load_trained_generator`` (which reads the run's code cache for the grid and keep options).
    README.md embeds ``eval_card`` or the one ``find_eval_card`` finds in the run dir.
    """
    from ..runs.checkpoint import read_state
    from ..runs.restore import load_trained_generator, load_trained_tokenizer, resolve_checkpoint

    checkpoint = resolve_checkpoint(run_or_checkpoint_dir)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    if (checkpoint / "gpt.safetensors").is_file():
        model, mergear, _, _, _ = load_trained_generator(checkpoint, weights)
        used = "ema" if weights == "ema" and (checkpoint / "gpt_ema.safetensors").is_file() else "raw"
        handle = wrap(model, mergear=mergear)
    else:
        model, run_config, _ = load_trained_tokenizer(checkpoint, weights)
        used = weights
        handle = wrap(model, {k: run_config.get(k) for k in TOKENIZER_KEYS})
    card_path = Path(eval_card) if eval_card is not None else find_eval_card(run_dir)
    if card_path is not None and not card_path.is_file():
        raise FileNotFoundError(f"eval_card={card_path} does not exist")
    provenance = {
        "checkpoint": str(checkpoint.resolve()),
        "step": read_state(checkpoint).get("step"),
        "weights": used,
        "evaluation card": str(card_path.resolve()) if card_path else None,
    }
    evaluation = card_path.read_text() if card_path else None
    handle.card = render_card(handle.kind, handle.config, evaluation, provenance)
    handle.save_pretrained(Path(out_dir))
    return Path(out_dir)
