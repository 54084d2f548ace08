"""Import released Open-MAGVIT2 checkpoints (TencentARC/SEED-Voken) into the project's models.

Both releases are Lightning checkpoints, ``torch.load(path)["state_dict"]``:

Tokenizer (``imagenet_256_L.ckpt``, ``imagenet_128_L.ckpt``, ``pretrain256_*.ckpt``; ``VQModel`` in
``src/Open_MAGVIT2/models/lfqgan.py``)::

    encoder.*, decoder.*         raw generator weights; names as ``Magvit2Encoder`` / ``Magvit2Decoder``
    loss.*                       discriminator (and LPIPS, if kept): ignored
    quantize.*                   the LFQ has no persistent tensors: ignored if present
    model_ema.decay, model_ema.num_updates
    model_ema.<name without dots> ``LitEma`` shadow of every trainable parameter (encoder, decoder and
                                 the loss' discriminator), e.g. ``model_ema.encoderconv_inweight``

AR (``AR_256_{B,L,XL}.ckpt``; ``Net2NetTransformer`` in ``models/cond_transformer_gpt.py``)::

    transformer.*                the GPT of ``modules/transformer/gpt.py`` (renamed by ``GPT_KEY_MAP``)
    first_stage_model.encoder.*, first_stage_model.decoder.*
                                 the frozen tokenizer it was trained on (raw weights, no EMA)

Every import is strict: missing, unexpected or mis-shaped weights raise ``CheckpointLayoutError``
listing all of them. Only the prefixes above are ignored.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.factory import build_tokenizer
from ..models.gpt import GPT, ModelArgs
from ..runs.checkpoint import compare_states

WEIGHTS = ("auto", "ema", "raw")
TOKENIZER_PREFIXES = ("", "first_stage_model.")  # tokenizer checkpoint, AR checkpoint
IGNORED_TOKENIZER_PREFIXES = ("loss.", "quantize.")
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("decay", "num_updates")
GPT_PREFIX = "transformer."
# Official heads per width (Open-MAGVIT2-AR B / L / XL: head_dim 64); other widths need n_head.
OFFICIAL_HEADS = {1024: 16, 1280: 20, 1536: 24}

# Official GPT name -> project GPT name. Inside a block the names are the same:
# attention_norm, attention.wqkv, attention.wo, ffn_norm, feed_forward.w1 / w2 / w3.
GPT_KEY_MAP: list[tuple[str, str]] = [
    (r"^pre_emb\.weight$", "tok_embeddings.0.weight"),
    (r"^post_emb\.weight$", "tok_embeddings.1.weight"),
    (r"^tok_emb\.weight$", "tok_embeddings.0.weight"),  # unfactorized variant (never released)
    (r"^class_emb\.embedding_table\.weight$", "cls_embedding.weight"),
    (r"^spatial_blocks\.(\d+)\.", r"layers.\1."),
    (r"^factorized_blocks\.(\d+)\.", r"intra_blocks.\1."),
    (r"^norm\.weight$", "norm.weight"),
    (r"^head\.(\d+)\.weight$", r"heads.\1.weight"),
]
# Project GPT name -> official name (the inverse, for writing checkpoints in the official layout).
GPT_INVERSE_MAP: list[tuple[str, str]] = [
    (r"^tok_embeddings\.0\.weight$", "pre_emb.weight"),
    (r"^tok_embeddings\.1\.weight$", "post_emb.weight"),
    (r"^cls_embedding\.weight$", "class_emb.embedding_table.weight"),
    (r"^layers\.(\d+)\.", r"spatial_blocks.\1."),
    (r"^intra_blocks\.(\d+)\.", r"factorized_blocks.\1."),
    (r"^norm\.weight$", "norm.weight"),
    (r"^heads\.(\d+)\.weight$", r"head.\1.weight"),
]
_BLOCK_PARAMS = re.compile(
    r"^(layers|intra_blocks)\.\d+\.(attention_norm\.weight|ffn_norm\.weight|attention\.(wqkv|wo)\.weight"
    r"|feed_forward\.w[123]\.weight)$"
)
_IGNORED_GPT = re.compile(r"\.attention\.kv_cache\.[kv]_cache$")  # inference buffers, if ever saved


class CheckpointLayoutError(ValueError):
    """An official checkpoint does not fit the model built for it; lists every problem."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        super().__init__(
            f"{source} does not fit the model: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {mismatched}"
        )


# ------------------------------------------------------------------------------------------ reading


def read_official_state(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The flat ``state_dict`` of a Lightning checkpoint (or a bare state dict) file.

    Loads with ``weights_only=True``; a checkpoint that pickles other objects (hyper-parameters as
    OmegaConf nodes, callbacks) needs ``trust_pickle=True`` (only for files you trust).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Open-MAGVIT2 checkpoint not found: {path}")
    try:  # mmap: multi-GB AR checkpoints are not read into memory twice
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} pickles objects other than tensors ({str(error).splitlines()[0]}); if you trust the "
            "file, pass trust_pickle=True"
        ) from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (since torch 1.6) can be memory-mapped; the legacy format cannot."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


# ---------------------------------------------------------------------------------------- tokenizer


def _tokenizer_prefix(state: Mapping[str, Tensor]) -> str:
    for prefix in TOKENIZER_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            return prefix
    raise ValueError("no Open-MAGVIT2 tokenizer weights (encoder.* or first_stage_model.encoder.*) found")


def infer_tokenizer_config(state: Mapping[str, Tensor], resolution: int = 256) -> dict[str, Any]:
    """The ``tokenizer`` config group (kind magvit2) that fits the raw encoder weights of ``state``.

    ch from conv_in, one ch_mult entry per ``down.{i}`` level (its first conv's width / ch),
    num_res_blocks from level 0, z_channels from conv_out. resolution is not stored in the weights.
    """
    enc = _tokenizer_prefix(state) + "encoder."
    ch = state[enc + "conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(enc) + r"down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(enc) + r"down\.0\.block\.(\d+)\.", k))}
    return {
        "kind": "magvit2",
        "name": "open_magvit2",
        "ch": ch,
        "ch_mult": [state[f"{enc}down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels],
        "num_res_blocks": len(blocks),
        "z_channels": state[enc + "conv_out.weight"].shape[0],
        "resolution": resolution,
    }


def tokenizer_weights(
    state: Mapping[str, Tensor], names: list[str], weights: str = "auto"
) -> tuple[dict[str, Tensor], str, list[str]]:
    """Pick the tokenizer tensors for the official names ``names`` (``encoder.*``/``decoder.*``).

    weights: 'raw' (encoder.* / decoder.*), 'ema' (model_ema.<name without dots>) or 'auto' (EMA
    when the checkpoint has it). -> (weights by name, the kind used, unexpected official keys).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: use one of {WEIGHTS}")
    prefix = _tokenizer_prefix(state)
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(prefix + EMA_PREFIX)}
    generator_ema = {k: v for k, v in ema.items() if k.startswith(("encoder", "decoder"))}
    if weights == "auto":
        weights = "ema" if generator_ema else "raw"
    raw = {k[len(prefix):]: v for k, v in state.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(("encoder.", "decoder."))}
    unknown = [k for k in state if k.startswith(prefix) and not _known_tokenizer_key(k[len(prefix):])]
    if weights == "raw":
        return raw, "raw", unknown
    if not generator_ema:
        raise ValueError("weights='ema' but the checkpoint has no model_ema.encoder*/decoder* tensors "
                         "(use weights='raw')")
    flat = {name.replace(".", ""): name for name in names}
    if len(flat) != len(names):
        raise ValueError("parameter names collide once their dots are removed: cannot map EMA weights")
    picked = {flat[s]: v for s, v in generator_ema.items() if s in flat}
    unknown += [EMA_PREFIX + s for s in generator_ema if s not in flat]
    unknown += [prefix + k for k in raw if k not in flat.values()]  # the raw names describe the layout too
    return picked, "ema", unknown


def _known_tokenizer_key(key: str) -> bool:
    if key.startswith(("encoder.", "decoder.", *IGNORED_TOKENIZER_PREFIXES)):
        return True
    return key.startswith(EMA_PREFIX)  # EMA keys are matched separately; loss EMA and bookkeeping ignored


def load_open_magvit2_tokenizer(
    path: str | Path,
    weights: str = "auto",
    tokenizer: Mapping[str, Any] | None = None,
    resolution: int = 256,
    trust_pickle: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Open-MAGVIT2 tokenizer checkpoint (or an AR checkpoint's first stage) -> (Magvit2Tokenizer, config).

    tokenizer: the ``tokenizer`` config group to build (e.g. conf/tokenizer/open_magvit2.yaml); None
    infers it from the weights (``infer_tokenizer_config``). config is the plain builder config
    {tokenizer, variant, quantizer, recovery} (what ``interop.hub.save_pretrained`` stores).
    The model is in eval mode; ``encode(x [B,3,H,W] in [-1,1])`` gives codes [B, (H/16)*(W/16)].
    """
    state = read_official_state(path, trust_pickle)
    group = dict(tokenizer) if tokenizer is not None else infer_tokenizer_config(state, resolution)
    config = {"tokenizer": group, "variant": None, "quantizer": {"bits": group["z_channels"]}, "recovery": None}
    model = build_tokenizer(group, None, config["quantizer"])
    names = list(model.state_dict())
    picked, used, unknown = tokenizer_weights(state, names, weights)
    missing, unexpected, mismatched = compare_states(model.state_dict(), picked)
    if missing or unexpected or mismatched or unknown:
        raise CheckpointLayoutError(f"{path} ({used} weights)", missing, sorted(unexpected + unknown), mismatched)
    model.load_state_dict(picked, strict=True)
    return model.eval(), config


# ---------------------------------------------------------------------------------------------- AR


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return None


def official_to_project_gpt_key(key: str) -> str | None:
    """Official GPT parameter name (without ``transformer.``) -> project name; None if unknown."""
    new = _rename(key, GPT_KEY_MAP)
    if new is None or (new.startswith(("layers.", "intra_blocks.")) and not _BLOCK_PARAMS.match(new)):
        return None
    return new


def project_to_official_gpt_key(key: str) -> str:
    """Inverse of ``official_to_project_gpt_key`` (KeyError for names the official GPT lacks)."""
    new = _rename(key, GPT_INVERSE_MAP)
    if new is None or key.startswith("keep_embedding"):
        raise KeyError(f"{key} has no official Open-MAGVIT2 counterpart")
    return new


def official_gpt_state(gpt: GPT) -> dict[str, Tensor]:
    """Our GPT's weights under the official names (the ``transformer.`` prefix not included)."""
    return {project_to_official_gpt_key(k): v for k, v in gpt.state_dict().items()}


def _gpt_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The GPT part of an AR checkpoint (``transformer.*``) or of a bare GPT state dict."""
    if any(k.startswith(GPT_PREFIX) for k in state):
        return {k[len(GPT_PREFIX):]: v for k, v in state.items() if k.startswith(GPT_PREFIX)}
    if any(k.startswith("first_stage_model.") for k in state):
        raise ValueError("AR checkpoint without transformer.* weights")
    return dict(state)


def _count_blocks(state: Mapping[str, Tensor], name: str) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(rf"{name}\.(\d+)\.", k))})


def infer_gpt_args(
    state: Mapping[str, Tensor], n_head: int | None = None, grid: tuple[int, int] = (16, 16), **overrides
) -> ModelArgs:
    """ModelArgs that fit official GPT weights (official names, ``transformer.`` stripped).

    dim and num_classes from the class table ([num_classes + 1, dim]), depths from the block
    counts, factorized_bits from the two embedding tables, the SwiGLU width from w1. The head count
    and the token grid are not in the weights: n_head defaults to the released B/L/XL value for the
    width (``OFFICIAL_HEADS``), grid to 16 x 16 (block_size 256).
    """
    classes, dim = state["class_emb.embedding_table.weight"].shape
    if n_head is None:
        if dim not in OFFICIAL_HEADS:
            raise ValueError(f"width {dim} is not a released Open-MAGVIT2-AR size: pass n_head")
        n_head = OFFICIAL_HEADS[dim]
    if "pre_emb.weight" in state:
        sizes = (state["pre_emb.weight"].shape[0], state["post_emb.weight"].shape[0])
        vocab = {"factorized_bits": tuple(int(math.log2(s)) for s in sizes)}
    else:
        vocab = {"vocab_size": state["tok_emb.weight"].shape[0]}
    args = dict(
        dim=dim,
        n_layer=_count_blocks(state, "spatial_blocks"),
        n_head=n_head,
        intra_layers=_count_blocks(state, "factorized_blocks"),
        ffn_hidden=state["spatial_blocks.0.feed_forward.w1.weight"].shape[0],
        num_classes=classes - 1,
        grid=tuple(grid),
        **vocab,
    )
    return ModelArgs(**{**args, **overrides})


def load_open_magvit2_gpt(
    path: str | Path, n_head: int | None = None, grid: tuple[int, int] = (16, 16), trust_pickle: bool = False,
    **overrides,
) -> GPT:
    """Open-MAGVIT2-AR checkpoint (``AR_256_{B,L,XL}.ckpt``) -> our ``GPT`` in eval mode.

    Same computation as the official model: codes [B, 256] (joined 18-bit LFQ indices; the official
    (pre, post) pair is ``split_codes(codes, (6, 12))``), labels [B] -> (logits_pre [B, 256, 64],
    logits_post [B, 256, 4096]). ``overrides`` go to ``ModelArgs`` (e.g. dropout rates).
    """
    official = _gpt_tensors(read_official_state(path, trust_pickle))
    args = infer_gpt_args(official, n_head, grid, **overrides)
    weights, origin, unknown = {}, {}, []
    for key, value in official.items():
        if _IGNORED_GPT.search(key):
            continue
        new = official_to_project_gpt_key(key)
        if new is None:
            unknown.append(key)
        else:
            weights[new], origin[new] = value, key
    model = GPT(args)
    missing, unexpected, mismatched = compare_states(model.state_dict(), weights)
    if missing or unexpected or mismatched or unknown:
        # reported under the official names (the ones in the file)
        missing = [_official_name(k) for k in missing]
        unexpected = sorted([origin[k] for k in unexpected] + unknown)
        mismatched = [f"{origin[m.split(':')[0]]} ({m})" for m in mismatched]
        raise CheckpointLayoutError(str(path), missing, unexpected, mismatched)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _official_name(key: str) -> str:
    try:
        return project_to_official_gpt_key(key)
    except KeyError:
        return key
