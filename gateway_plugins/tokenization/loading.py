"""Where a tokenizer comes from and how its files become what transformers 5 (and so vLLM) makes of them.

A source is a folder or ``hf://org/repo[@revision]``. From the folder: ``tokenizer.json`` loaded by the
Rust ``tokenizers`` package; the chat templates (``chat_template.jinja`` and
``additional_chat_templates/*.jinja`` win over ``tokenizer_config.json``'s ``chat_template``); the named
special tokens (``tokenizer_config.json``, or ``special_tokens_map.json`` when the config has no
``added_tokens_decoder``), added to the vocabulary when missing, as ``TokenizersBackend.__init__`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway_plugins.tokenization.errors import TokenizerLoadError

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

HF_SCHEME = "hf://"
#: The files a tokenizer is made of, as ``snapshot_download`` patterns: no weights are fetched.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
)
#: transformers' named special tokens; the chat template sees each (and model-specific ones) by name.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass
class TokenizerFiles:
    """What a tokenizer folder holds, loaded."""

    folder: Path
    tokenizer: Tokenizer
    spec: dict[str, Any]  # tokenizer.json itself (normalizer, pre-tokenizer: what the piece cache checks)
    templates: dict[str, str]
    special_tokens: dict[str, str]  # template variables: bos_token, eos_token, ...
    tokenizer_class: str | None


def resolve_source(source: str) -> Path:
    """The local folder of ``source``: the folder itself, or the Hugging Face snapshot of
    ``hf://org/repo[@revision]`` (downloaded into the HF cache if needed; blocking)."""
    if source.startswith(HF_SCHEME):
        repo, at, revision = source.removeprefix(HF_SCHEME).partition("@")
        if not repo or repo.count("/") > 1 or not all(repo.split("/")) or (at and not revision):
            raise TokenizerLoadError(
                f"tokenizer source {source!r}: expected hf://org/repo or hf://org/repo@revision"
            )
        return _hub_snapshot(source, repo, revision or None)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    hint = " (a file: name the folder holding tokenizer.json)" if path.is_file() else ""
    raise TokenizerLoadError(
        f"tokenizer source {source!r} is neither a folder nor hf://org/repo[@revision]{hint}"
    )


def _hub_snapshot(source: str, repo: str, revision: str | None) -> Path:
    """The tokenizer files of a Hub repository through the HF cache. ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``
    and ``HF_HUB_CACHE`` are read now (huggingface_hub reads them once, when imported)."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as exc:
        raise TokenizerLoadError(f"tokenizer source {source!r} needs the huggingface_hub package") from exc
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=list(TOKENIZER_FILES),
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            local_files_only=offline,
        )
    except Exception as exc:  # the Hub's failures are many; each means this source cannot be had
        where = "in the HF cache (HF_HUB_OFFLINE)" if offline else "on the Hub or in the HF cache"
        raise TokenizerLoadError(f"tokenizer source {source!r}: not found {where}: {exc}") from exc
    return Path(str(folder))


def load_files(source: str) -> TokenizerFiles:
    """Everything ``ModelTokenizer`` needs from ``source`` (blocking: file I/O, maybe a download)."""
    folder = resolve_source(source)
    config = _read_json(folder / "tokenizer_config.json")
    tokenizer, spec, special_tokens = _build_tokenizer(folder, config)
    tokenizer_class = config.get("tokenizer_class")
    return TokenizerFiles(
        folder=folder,
        tokenizer=tokenizer,
        spec=spec,
        templates=_chat_templates(folder, config),
        special_tokens=special_tokens,
        tokenizer_class=tokenizer_class if isinstance(tokenizer_class, str) else None,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object")
    return data


def _chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The model's named chat templates; template files replace the config's ``chat_template``."""
    templates: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    configured = config.get("chat_template")
    if isinstance(configured, str):
        return {"default": configured}
    if isinstance(configured, list):  # [{"name": ..., "template": ...}]
        return {t["name"]: t["template"] for t in configured if isinstance(t, dict) and "name" in t}
    return {}


def _special_tokens(
    config: Mapping[str, Any], legacy_map: Mapping[str, Any]
) -> tuple[dict[str, Any], list[Any]]:
    """The named special tokens (transformers' seven, then model-specific ``*_token`` entries) and the
    extra ones, as transformers 5's ``from_pretrained`` collects them."""
    merged = dict(config)
    if "added_tokens_decoder" not in merged:  # transformers reads the legacy map only then
        for key, value in legacy_map.items():  # where a token as an object is always an AddedToken
            is_object = isinstance(value, dict) and key != "extra_special_tokens"
            merged[key] = {**value, "__type": "AddedToken", "special": True} if is_object else value
    named = {key: merged[key] for key in SPECIAL_TOKEN_NAMES if merged.get(key) is not None}
    for key, value in merged.items():
        is_token = isinstance(value, str) or (isinstance(value, dict) and value.get("__type") == "AddedToken")
        if key.endswith("_token") and key not in SPECIAL_TOKEN_NAMES and is_token:
            named[key] = value
    listed = merged.get("extra_special_tokens") or merged.get("additional_special_tokens")
    if isinstance(listed, dict):  # named, model-specific
        named.update(listed)
        return named, []
    return named, list(listed) if isinstance(listed, list) else []


def _token_text(value: Any) -> str:
    return str(value["content"]) if isinstance(value, dict) else str(value)


def _added_token(value: Any, *, special: bool | None = None) -> AddedToken | None:
    """A config's token entry (a string, or an ``AddedToken`` as JSON) as an ``AddedToken``."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        return AddedToken(value, special=bool(special))
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {
            k: bool(v) for k, v in value.items() if k in ("single_word", "lstrip", "rstrip", "normalized")
        }
        is_special = value.get("special", False) if special is None else special
        return AddedToken(value["content"], special=bool(is_special), **flags)
    return None


def _build_tokenizer(
    folder: Path, config: Mapping[str, Any]
) -> tuple[Tokenizer, dict[str, Any], dict[str, str]]:
    """``tokenizer.json`` made into what ``TokenizersBackend`` makes of it: (tokenizer, the file's JSON,
    the special tokens as template variables)."""
    from tokenizers import AddedToken, Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerLoadError(f"{folder} has no tokenizer.json (only fast tokenizers are supported)")
    text = path.read_text(encoding="utf-8")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exception
        raise TokenizerLoadError(f"{path}: {exc}") from exc
    spec = json.loads(text)
    tokenizer.no_truncation()  # vLLM tokenizes whole prompts (and refuses over-long ones)
    tokenizer.no_padding()

    named, extras = _special_tokens(config, _read_json(folder / "special_tokens_map.json"))
    # The added tokens transformers passes on: the config's added_tokens_decoder, else (legacy)
    # added_tokens.json's and tokenizer.json's own, by id.
    decoder: dict[int, AddedToken] = {}
    if isinstance(config.get("added_tokens_decoder"), dict):
        for index, entry in config["added_tokens_decoder"].items():
            if (token := _added_token(entry)) is not None:
                decoder[int(index)] = token
    else:
        specials = {_token_text(v) for v in (*named.values(), *extras)}
        for content, index in _read_json(folder / "added_tokens.json").items():
            is_special = content in specials
            decoder[int(index)] = AddedToken(
                content, rstrip=False, lstrip=False, normalized=not is_special, special=is_special
            )
        for entry in spec.get("added_tokens") or []:
            if (token := _added_token(entry)) is not None:
                decoder[int(entry["id"])] = token
    to_add = [decoder[index] for index in sorted(decoder)]
    known = {t.content for t in tokenizer.get_added_tokens_decoder().values()} | {t.content for t in to_add}
    for value in (*named.values(), *extras):  # special tokens the vocabulary lacks
        token = _added_token(value, special=True if isinstance(value, str) else None)
        if token is not None and token.content not in known:
            to_add.append(token)
            known.add(token.content)
    named_texts = {_token_text(v) for v in named.values()}
    for token in to_add:
        if not token.special and token.content in named_texts:
            token.special = True  # as transformers does (an unset ``normalized`` follows it)
    if to_add:
        tokenizer.add_tokens(to_add)
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return tokenizer, spec, {key: _token_text(value) for key, value in named.items()}
