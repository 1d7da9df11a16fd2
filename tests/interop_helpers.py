"""What every converted checkpoint must do: train and serve like a native turbos model."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import torch

from serve_helpers import running_server
from turbos.data.tokenizer import save_tokenizer
from turbos.interop.convert import convert_from_hf
from turbos.model import TurboSForCausalLM
from turbos.post.sft import SFTRecipe, run_sft
from turbos.serve import LLMEngine
from turbos.serve.chat_template import save_chat_template


def check_trains_and_serves(hf_model, tokenizer, tmp_path: Path) -> None:
    """``hf_model`` (a transformers causal LM over ``tokenizer``'s vocabulary) saved, converted,
    one SFT step taken (the weights move) and the result served over loopback (a chat reply
    comes back), with our tokenizer: the test checkpoints have none of their own."""
    hf_model.save_pretrained(tmp_path / "hf")
    save_tokenizer(tokenizer, tmp_path / "hf")
    save_chat_template(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "turbos")

    chats = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "What is 2 + 1?"}, {"role": "assistant", "content": "Answer: 3"}]
    chats.write_text(json.dumps({"messages": chat}) + "\n")
    recipe = SFTRecipe(
        model=str(tmp_path / "turbos"),
        data=[{"path": str(chats)}],
        output_dir=str(tmp_path / "sft"),
        max_len=64,
        steps=1,
        batch_size=2,
        warmup_steps=0,
    )
    summary = run_sft(recipe, progress=False)
    before = TurboSForCausalLM.from_pretrained(tmp_path / "turbos").state_dict()
    after = TurboSForCausalLM.from_pretrained(summary["model_dir"]).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "one SFT step changed nothing"

    engine = LLMEngine.from_pretrained(summary["model_dir"], max_running=2, seed=0)
    with running_server(engine, "converted") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="converted", messages=[{"role": "user", "content": "What is 2 + 1?"}], max_tokens=5
        )
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
